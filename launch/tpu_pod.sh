#!/usr/bin/env bash
# Runs one training command on every worker of a Cloud TPU VM (a single host or a whole pod slice).
#
#   bash launch/tpu_pod.sh TPU_NAME ZONE -- --config=configs/stage1.py:2b --workdir=/mnt/shared/runs/stage1 \
#       --config.model.init=/data/Qwen2-VL-2B-Instruct --config.data.train=/data/stage1.json
#
# Steps: copy this repository to ~/unite-jax on all workers, install requirements-tpu.txt there, then start
# `python launch/train.py ARGS` on all workers at once. JAX finds the other hosts by itself on a TPU pod
# (jax.distributed.initialize() is called when the environment says there are several workers). The workdir
# must be a path every worker sees (a shared mount: Filestore, NFS or gcsfuse; the final model directory needs
# file-system renames); model and data paths must exist on every worker (copy them
# to the same local path on each, or use a shared file system). Rerun the same command after a preemption:
# training resumes from the newest checkpoint in the workdir.
# Options (environment): PROJECT (gcloud project), SKIP_INSTALL=1 (reuse an existing install).
set -euo pipefail
if [ $# -lt 3 ] || [ "$3" != "--" ]; then
  echo "usage: bash launch/tpu_pod.sh TPU_NAME ZONE -- TRAIN_ARGS..." >&2
  exit 2
fi
TPU_NAME=$1
ZONE=$2
shift 3
PROJECT_FLAG=()
if [ -n "${PROJECT:-}" ]; then PROJECT_FLAG=(--project="$PROJECT"); fi
cd "$(dirname "$0")/.."

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker=all --command="$1"
}

ARCHIVE=$(mktemp /tmp/unite-jax-XXXXXX.tar.gz)
git ls-files -z | tar --null -czf "$ARCHIVE" -T -
gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME":~/unite-jax.tar.gz --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker=all
rm -f "$ARCHIVE"
ssh_all "mkdir -p ~/unite-jax && tar -xzf ~/unite-jax.tar.gz -C ~/unite-jax"
if [ "${SKIP_INSTALL:-0}" != "1" ]; then
  ssh_all "cd ~/unite-jax && python3 -m pip install --quiet -r requirements-tpu.txt && python3 -m pip install --quiet --no-deps -e ."
fi
QUOTED=$(printf '%q ' "$@")
# jax.distributed.initialize() detects the pod by itself; the variable makes the trainer call it.
ssh_all "cd ~/unite-jax && UNITE_JAX_DISTRIBUTED=1 python3 launch/train.py $QUOTED"
