#!/usr/bin/env bash
# Trains on one host with all its GPUs (one process drives every local GPU; the mesh spans them).
#
#   bash launch/gpu.sh --config=configs/stage1.py:2b --workdir=runs/stage1 \
#       --config.model.init=/models/Qwen2-VL-2B-Instruct --config.data.train=/data/stage1.json
#
# Installs the package's `cuda12` extra into .venv on first use (jax[cuda12] pinned like the CPU jax, so the CUDA
# plugin matches; SKIP_INSTALL=1 skips it), lets XLA use most of the GPU memory, and runs launch/train.py with the
# given arguments. Rerun the same command to resume.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${SKIP_INSTALL:-0}" != "1" ]; then
  bash launch/setup_env.sh
  .venv/bin/python -m pip install --quiet -e ".[cuda12]"
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
exec .venv/bin/python launch/train.py "$@"
