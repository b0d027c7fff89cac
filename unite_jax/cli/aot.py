"""Compiles the real train step for a Cloud TPU topology on this machine (no TPU needed) and says whether
it fits: per-chip HBM (parameters, optimizer state, batch, temporaries) against the chip's, and flops.

    unite-aot --config=configs/stage1.py:2b --topology=v5e:4x4                (or python launch/aot.py ...)
    unite-aot --config=configs/stage1.py:7b --topology=v5p:4x4x4 --find_chunks
    unite-aot --config=configs/stage1.py:2b --topology=v5e:4x4 --slices=2 --config.mesh.shape='(2,-1,1)'

Takes the same --config flags as the trainer; needs libtpu (pip install "unite-jax[tpu]"). Exits 1 with the
knobs that would help when the step does not fit, 2 on a bad topology or a program the compiler rejects.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

# The compiler runs on this machine's CPU; no accelerator is used (set before anything imports JAX).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from unite_jax.cli.common import resolve_config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "configs/stage1.py|stage2.py[:PRESET], or stage1|stage2[:PRESET]",
                                lock_config=True)
flags.DEFINE_string("topology", None, "TPU topology, chips per axis: v5e:4x4, v6e:4x4, v5p:2x2x4, ...")
flags.DEFINE_integer("slices", 1, "slices joined over the data-center network (multislice); they lie on mesh "
                     "axis 'data', so mesh.shape's data entry must be a multiple of this")
flags.DEFINE_bool("fast", False, "read memory from the compiler's buffer assignment, without code generation "
                  "(seconds instead of minutes; no compiler cost analysis)")
flags.DEFINE_bool("find_chunks", False, "search the smallest train.grad_cache_chunks (1, 2, 4, ...) that fits")
flags.DEFINE_string("json", "", "append the report as one JSON line to this file")
flags.mark_flags_as_required(["config", "topology"])


def _run(argv) -> None:
    del argv
    from unite_jax.train import aot, aot_report

    logging.set_verbosity(logging.ERROR)
    prog = os.path.basename(sys.argv[0])
    config = flags.FLAGS.config
    target = aot.Target(flags.FLAGS.topology, slices=flags.FLAGS.slices)
    try:
        if flags.FLAGS.find_chunks:
            report, tried = aot_report.find_chunks(config, target, fast=flags.FLAGS.fast)
            for trial in tried[:-1]:
                print(f"{trial.chunks} chunk(s): {aot_report.gib(trial.total_bytes)} per chip, does not fit")
        else:
            report = aot.check(config, target, fast=flags.FLAGS.fast)
    except (ValueError, aot.CompileError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(aot_report.describe(report, config))
    print(aot_report.markdown_row(report, config))
    if flags.FLAGS.json:
        with open(flags.FLAGS.json, "a") as f:
            f.write(aot_report.as_json(report, config) + "\n")
    if not report.fits:
        knobs = "\n".join(f"  - {k}" for k in aot_report.suggestions(report, config))
        print(f"{prog}: the step needs {aot_report.gib(report.total_bytes)} per chip but a {report.chip_kind} has "
              f"{aot_report.gib(report.capacity_bytes)}; knobs that would help:\n{knobs}", file=sys.stderr)
        sys.exit(1)


def main(argv: Sequence[str] | None = None) -> None:
    """The command line (argv defaults to sys.argv; argv[0] is the program name)."""
    app.run(_run, argv=resolve_config_flags(sys.argv if argv is None else argv))


if __name__ == "__main__":
    main()
