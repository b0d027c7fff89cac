#!/usr/bin/env bash
# Runs a training stage detached on every worker of a Cloud TPU VM (one host, a pod slice, or several slices).
#
#   bash launch/tpu_pod.sh start  TPU ZONE -- --config=configs/stage1.py:2b --workdir=/mnt/shared/runs/stage1 \
#       --config.model.init=/data/Qwen2-VL-2B-Instruct --config.data.train=/data/stage1.json
#   bash launch/tpu_pod.sh status TPU ZONE WORKDIR        # which workers still run, last log line of each
#   bash launch/tpu_pod.sh logs   TPU ZONE WORKDIR [N]    # follow worker N's log (default 0); Ctrl-C stops following only
#   bash launch/tpu_pod.sh stop   TPU ZONE WORKDIR        # stop the run on every worker (SIGTERM, by process id)
#
# start: copies this repository to ~/unite-jax on every worker, installs requirements-tpu.txt there (skip with
# SKIP_INSTALL=1), then starts `python3 launch/train.py ARGS` on all workers at once, detached (it survives the
# ssh session and a closed laptop). Each worker writes LOG_DIR/slice-S-worker-N.log and .pid, LOG_DIR being
# WORKDIR/logs unless LOG_DIR is set. It prints the commands to follow and stop the run, and returns.
# A second start on the same workdir is refused while the first one runs (LOG_DIR/RUNNING names it); a run whose
# processes are gone (finished, crashed, preempted) leaves a stale RUNNING, which start replaces: rerunning the
# same start command after a preemption resumes from the newest checkpoint in the workdir.
#
# The workdir must be a path every worker sees (Filestore, NFS or gcsfuse); model and data paths must exist on
# every worker. jax.distributed finds the other hosts by itself (UNITE_JAX_DISTRIBUTED=1 makes the trainer call it).
# Environment: PROJECT (gcloud project), SKIP_INSTALL=1, LOG_DIR, FORCE=1 (start even though RUNNING names a
# run on another TPU VM, whose processes cannot be checked from here).
#
# Queued resources (capacity that arrives later, or spot/preemptible): create the slice, wait until it is
# ACTIVE, then start as above with the node id as TPU:
#   gcloud compute tpus queued-resources create my-qr --node-id=my-tpu --zone=ZONE \
#       --accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite [--spot]
#   gcloud compute tpus queued-resources describe my-qr --zone=ZONE   # state: ACTIVE
# Multislice (several slices over the data-center network): create them in one request, then pass every node
# as a comma-separated TPU; the launcher sets MEGASCALE_* so the slices form one job, and the trainer puts the
# slices on mesh axis `data` (give a data entry that is a multiple of the slice count):
#   gcloud compute tpus queued-resources create my-qr --node-count=2 --node-prefix=my-tpu --zone=ZONE \
#       --accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite
#   bash launch/tpu_pod.sh start my-tpu-0,my-tpu-1 ZONE -- --config=configs/stage1.py:2b \
#       --config.mesh.shape='(2,-1,1)' --workdir=/mnt/shared/runs/stage1 ...
# Check first that the step fits the slice: python launch/aot.py --config=... --topology=v5e:4x4 [--slices=2].
set -euo pipefail

usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

[ $# -ge 3 ] || usage
ACTION=$1
TPUS=$2
ZONE=$3
shift 3
IFS=, read -r -a SLICES <<<"$TPUS"
PROJECT_FLAG=()
if [ -n "${PROJECT:-}" ]; then PROJECT_FLAG=(--project="$PROJECT"); fi
cd "$(dirname "$0")/.."

# ssh_slice SLICE WORKER COMMAND: run COMMAND on one worker (or "all") of slice SLICE.
ssh_slice() {
  gcloud compute tpus tpu-vm ssh "${SLICES[$1]}" --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker="$2" --command="$3"
}

ssh_everywhere() {
  local s
  for s in "${!SLICES[@]}"; do ssh_slice "$s" all "$1"; done
}

# The worker's number inside its slice, from the TPU VM metadata server (expanded on the worker).
# shellcheck disable=SC2016
WORKER_ID='$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || echo 0)'

workdir_from_args() {
  local arg
  for arg in "$@"; do
    case $arg in --workdir=*) echo "${arg#--workdir=}"; return 0 ;; esac
  done
  echo "tpu_pod.sh: the training arguments need --workdir=DIR (a path every worker sees)" >&2
  exit 2
}

log_dir_for() { echo "${LOG_DIR:-$1/logs}"; }

case $ACTION in
  status|logs|stop)
    [ $# -ge 1 ] || usage
    LOGS=$(log_dir_for "$1")
    QLOGS=$(printf '%q' "$LOGS")
    ;;
  start) ;;
  *) usage ;;
esac

if [ "$ACTION" = status ]; then
  ssh_everywhere "for p in $QLOGS/*.pid; do [ -e \"\$p\" ] || continue; n=\${p%.pid}; \
if kill -0 \"\$(cat \"\$p\")\" 2>/dev/null; then s=running; else s=stopped; fi; \
echo \"\$(hostname) \$(basename \"\$n\"): \$s: \$(tail -n 1 \"\$n.log\" 2>/dev/null)\"; done"
  exit 0
fi

if [ "$ACTION" = logs ]; then
  ssh_slice 0 "${2:-0}" "tail -n 50 -F $QLOGS/slice-0-worker-${2:-0}.log"
  exit 0
fi

if [ "$ACTION" = stop ]; then
  # SIGTERM to each worker's own process group (started with setsid), found by the pid it wrote.
  ssh_everywhere "for p in $QLOGS/*.pid; do [ -e \"\$p\" ] || continue; pid=\$(cat \"\$p\"); \
if kill -0 \"\$pid\" 2>/dev/null && [ \"\$(cat \"\${p%.pid}.host\" 2>/dev/null)\" = \"\$(hostname)\" ]; then \
kill -TERM -- -\"\$pid\" && echo \"\$(hostname): stopped \$(basename \"\${p%.pid}\") (pid \$pid)\"; fi; done"
  ssh_slice 0 0 "rm -f $QLOGS/RUNNING"
  echo "stopped; the newest checkpoint in the workdir is where the next start resumes"
  exit 0
fi

# ---------------------------------------------------------------------------------------------- start
if [ $# -lt 1 ] || [ "$1" != "--" ]; then usage; fi
shift
[ $# -ge 1 ] || usage
WORKDIR=$(workdir_from_args "$@")
LOGS=$(log_dir_for "$WORKDIR")
QLOGS=$(printf '%q' "$LOGS")

# Refuse a second run: RUNNING holds "host pid tpu time" of the run's worker 0.
if ! ssh_slice 0 0 "mkdir -p $QLOGS && if [ -f $QLOGS/RUNNING ]; then read -r host pid tpu when < $QLOGS/RUNNING; \
if [ \"\$host\" = \"\$(hostname)\" ]; then kill -0 \"\$pid\" 2>/dev/null && \
{ echo \"a run (pid \$pid, started \$when) is still running in this workdir\"; exit 3; }; \
echo \"replacing a stale RUNNING (pid \$pid is gone)\"; \
elif [ \"${FORCE:-0}\" != 1 ]; then echo \"RUNNING names a run started on \$host (\$tpu, \$when), which cannot be \
checked from here; stop it (tpu_pod.sh stop) or set FORCE=1 if it is gone\"; exit 3; fi; fi"; then
  echo "tpu_pod.sh: refusing to start a second run on $WORKDIR" >&2
  exit 3
fi

ARCHIVE=$(mktemp /tmp/unite-jax-XXXXXX.tar.gz)
trap 'rm -f "$ARCHIVE"' EXIT
git ls-files -z | tar --null -czf "$ARCHIVE" -T -
for s in "${!SLICES[@]}"; do
  gcloud compute tpus tpu-vm scp "$ARCHIVE" "${SLICES[$s]}":~/unite-jax.tar.gz --zone="$ZONE" "${PROJECT_FLAG[@]}" \
    --worker=all
done
ssh_everywhere "mkdir -p ~/unite-jax && tar -xzf ~/unite-jax.tar.gz -C ~/unite-jax"
if [ "${SKIP_INSTALL:-0}" != "1" ]; then
  ssh_everywhere "cd ~/unite-jax && python3 -m pip install --quiet -r requirements-tpu.txt && \
python3 -m pip install --quiet --no-deps -e ."
fi

MEGASCALE=""
if [ "${#SLICES[@]}" -gt 1 ]; then
  COORDINATOR=$(gcloud compute tpus tpu-vm describe "${SLICES[0]}" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
    --format='value(networkEndpoints[0].ipAddress)')
  MEGASCALE="MEGASCALE_COORDINATOR_ADDRESS=$COORDINATOR:8080 MEGASCALE_NUM_SLICES=${#SLICES[@]}"
fi
QUOTED=$(printf '%q ' "$@")
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
for s in "${!SLICES[@]}"; do
  SLICE_ENV=""
  if [ -n "$MEGASCALE" ]; then SLICE_ENV="$MEGASCALE MEGASCALE_SLICE_ID=$s"; fi
  # setsid + nohup: the run leaves the ssh session's process group and ignores its hangup.
  ssh_slice "$s" all "cd ~/unite-jax || exit 1; mkdir -p $QLOGS || exit 1; w=$WORKER_ID; name=$QLOGS/slice-$s-worker-\$w; \
UNITE_JAX_DISTRIBUTED=1 $SLICE_ENV setsid nohup python3 launch/train.py $QUOTED > \"\$name.log\" 2>&1 < /dev/null & \
echo \$! > \"\$name.pid\"; hostname > \"\$name.host\"; \
if [ $s = 0 ] && [ \"\$w\" = 0 ]; then echo \"\$(hostname) \$(cat \"\$name.pid\") $TPUS $STARTED\" > $QLOGS/RUNNING; fi"
done

ME="bash launch/tpu_pod.sh"
echo "started on ${#SLICES[@]} slice(s) of $TPUS; logs in $LOGS/slice-S-worker-N.log on each worker"
echo "  follow: $ME logs $TPUS $ZONE $(printf '%q' "$WORKDIR") [N]"
echo "  status: $ME status $TPUS $ZONE $(printf '%q' "$WORKDIR")"
echo "  stop:   $ME stop $TPUS $ZONE $(printf '%q' "$WORKDIR")"
