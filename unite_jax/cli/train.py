"""Trains one UNITE stage; reruns of the same command resume from the newest checkpoint.

    unite-train --config=configs/stage1.py:tiny --workdir=runs/stage1          (or python launch/train.py ...)
    unite-train --config=configs/stage2.py:tiny --workdir=runs/stage2 --config.model.init=runs/stage1

Any config key can be overridden: --config.train.steps=200 --config.data.train=a.json@2,b.jsonl
--config names a config file with an optional `:PRESET` (2b, 7b, tiny). The stage configs ship with
the package (unite_jax/configs/): `--config=stage1:tiny` names the packaged one, and so does
`--config=configs/stage1.py:tiny` where no such file exists (an installed package run elsewhere).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from unite_jax.cli.common import resolve_config_flags

config_flags.DEFINE_config_file("config", None, "configs/stage1.py|stage2.py[:PRESET], or stage1|stage2[:PRESET]",
                                lock_config=True)
flags.DEFINE_string("workdir", None,
                    "run directory (a local or shared mounted path): checkpoints, metrics, final model")
flags.mark_flags_as_required(["config", "workdir"])

def _run(argv) -> None:
    del argv
    from unite_jax.convert.orbax_model import ModelDirError
    from unite_jax.data.records import DataError
    from unite_jax.train.loop import TrainingError, train

    logging.set_verbosity(logging.WARNING)
    try:
        train(flags.FLAGS.config, flags.FLAGS.workdir)
    except (TrainingError, DataError, ModelDirError, PermissionError, FileNotFoundError) as e:
        # problems of the run's inputs: one clear line, no traceback
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(1)


def main(argv: Sequence[str] | None = None) -> None:
    """The command line (argv defaults to sys.argv; argv[0] is the program name)."""
    app.run(_run, argv=resolve_config_flags(sys.argv if argv is None else argv))


if __name__ == "__main__":
    main()
