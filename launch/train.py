"""Trains one UNITE stage; reruns of the same command resume from the newest checkpoint.

    python launch/train.py --config=configs/stage1.py:tiny --workdir=runs/stage1
    python launch/train.py --config=configs/stage2.py:tiny --workdir=runs/stage2 --config.model.init=runs/stage1

Any config key can be overridden: --config.train.steps=200 --config.data.train=a.json@2,b.jsonl
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "configs/stage1.py|stage2.py[:PRESET]", lock_config=True)
flags.DEFINE_string("workdir", None, "run directory (a local or shared mounted path): checkpoints, metrics, final model")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from unite_jax.convert.orbax_model import ModelDirError
    from unite_jax.data.records import DataError
    from unite_jax.train.loop import TrainingError, train

    logging.set_verbosity(logging.WARNING)
    try:
        train(flags.FLAGS.config, flags.FLAGS.workdir)
    except (TrainingError, DataError, ModelDirError, PermissionError, FileNotFoundError) as e:
        # problems of the run's inputs: one clear line, no traceback
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
