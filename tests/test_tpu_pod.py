"""launch/tpu_pod.sh without a TPU: `gcloud` is a stub on PATH that runs each ssh command on this machine as
one TPU worker (worker 0 of its slice) and `python3` is a stand-in trainer that records its arguments and
environment and then waits. Checked: the script is shellcheck-clean; start detaches and returns, with a
per-worker log and pid under WORKDIR/logs and the commands to follow and stop; a second start on the same
workdir is refused; status and stop work by process id; a stopped (stale) run can be started again; two
slices get the MEGASCALE_* variables of one multislice job."""

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SCRIPT = os.path.join(ROOT, "launch", "tpu_pod.sh")

GCLOUD = """#!/usr/bin/env bash
# gcloud compute tpus tpu-vm ssh|scp|describe ... : one local worker per TPU name
echo "$*" >> "$STUB_CALLS"
case "$4" in
  ssh) for a in "$@"; do case $a in --command=*) cmd=${a#--command=} ;; esac; done
       exec bash -c "$cmd" ;;
  scp) cp "$5" "$HOME/unite-jax.tar.gz" ;;
  describe) echo 10.1.2.3 ;;
esac
"""
CURL = """#!/usr/bin/env bash
echo 0
"""
TRAINER = """#!/usr/bin/env bash
# stands in for `python3 launch/train.py ARGS`: records what it was given, then runs until stopped
{ printf '%s\\n' "$@"; env | grep -E '^(UNITE_JAX|MEGASCALE)' | sort; } > "$STUB_ARGS.tmp.$$"
mv "$STUB_ARGS.tmp.$$" "$STUB_ARGS.$MEGASCALE_SLICE_ID"
echo "step 1/10 loss 1.0"
exec sleep 300
"""


@pytest.fixture
def pod(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("gcloud", GCLOUD), ("curl", CURL), ("python3", TRAINER)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "home").mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path / "home"),
           "SKIP_INSTALL": "1", "STUB_CALLS": str(tmp_path / "calls"), "STUB_ARGS": str(tmp_path / "args")}
    env.pop("LOG_DIR", None)
    workdir = tmp_path / "shared" / "run one"  # a space: every path must stay quoted
    started = []

    def run(*args):
        proc = subprocess.run(["bash", SCRIPT, *args], env=env, capture_output=True, text=True, timeout=120)
        return proc.returncode, proc.stdout + proc.stderr

    yield run, workdir, tmp_path, started
    for pid_file in (workdir / "logs").glob("*.pid") if (workdir / "logs").exists() else []:
        try:  # the stand-in trainers this test started, by their process group id
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _wait_for(path, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.1)
    raise AssertionError(f"{path} never appeared")


def test_shellcheck_clean():
    shellcheck = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    proc = subprocess.run([shellcheck, SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_start_status_refuse_stop_restart(pod):
    run, workdir, tmp_path, _ = pod
    train_args = ["--config=configs/stage1.py:2b", f"--workdir={workdir}", "--config.data.train=a b.jsonl@2"]
    rc, out = run("start", "my-tpu", "zone-a", "--", *train_args)
    assert rc == 0, out
    logs = workdir / "logs"
    printed = {line.split(":")[0].strip(): shlex.split(line.split(":", 1)[1]) for line in out.splitlines()
               if line.strip().startswith(("follow:", "status:", "stop:"))}
    assert printed["follow"] == ["bash", "launch/tpu_pod.sh", "logs", "my-tpu", "zone-a", str(workdir), "[N]"], out
    assert printed["stop"] == ["bash", "launch/tpu_pod.sh", "stop", "my-tpu", "zone-a", str(workdir)], out
    recorded = _wait_for(tmp_path / "args.").splitlines()
    assert recorded[:4] == ["launch/train.py", *train_args]  # arguments arrive intact, spaces included
    assert "UNITE_JAX_DISTRIBUTED=1" in recorded
    pid = int((logs / "slice-0-worker-0.pid").read_text())
    assert _alive(pid)
    assert "step 1/10" in _wait_for(logs / "slice-0-worker-0.log")
    assert (logs / "RUNNING").read_text().split()[1] == str(pid)

    rc, out = run("start", "my-tpu", "zone-a", "--", *train_args)
    assert rc == 3 and "refusing to start a second run" in out and "still running" in out, out

    rc, out = run("status", "my-tpu", "zone-a", str(workdir))
    assert rc == 0 and "slice-0-worker-0: running: step 1/10" in out, out

    rc, out = run("stop", "my-tpu", "zone-a", str(workdir))
    assert rc == 0, out
    deadline = time.time() + 10
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)
    assert not (logs / "RUNNING").exists()

    # a run whose processes are gone leaves nothing that blocks the next start (e.g. after a preemption)
    (logs / "RUNNING").write_text(f"{os.uname().nodename} {pid} my-tpu then\n")
    rc, out = run("start", "my-tpu", "zone-a", "--", *train_args)
    assert rc == 0 and "stale" in out, out


def test_run_on_another_vm_needs_force(pod):
    run, workdir, _, _ = pod
    (workdir / "logs").mkdir(parents=True)
    (workdir / "logs" / "RUNNING").write_text("other-host 123 old-tpu 2026-01-01T00:00:00Z\n")
    rc, out = run("start", "my-tpu", "zone-a", "--", f"--workdir={workdir}")
    assert rc == 3 and "other-host" in out and "FORCE=1" in out, out


def test_multislice_environment(pod):
    run, workdir, tmp_path, _ = pod
    rc, out = run("start", "qr-0,qr-1", "zone-a", "--", "--config.mesh.shape=(2,-1,1)", f"--workdir={workdir}")
    assert rc == 0, out
    for slice_id in (0, 1):
        env = _wait_for(tmp_path / f"args.{slice_id}").splitlines()
        assert "MEGASCALE_COORDINATOR_ADDRESS=10.1.2.3:8080" in env
        assert "MEGASCALE_NUM_SLICES=2" in env
        assert f"MEGASCALE_SLICE_ID={slice_id}" in env
    calls = (tmp_path / "calls").read_text()
    assert "ssh qr-0" in calls and "ssh qr-1" in calls and "describe qr-0" in calls


def test_start_needs_a_workdir(pod):
    run, *_ = pod
    rc, out = run("start", "my-tpu", "zone-a", "--", "--config=configs/stage1.py:2b")
    assert rc == 2 and "--workdir" in out
