"""The trainer end to end on the tiny preset: learning, stages, resume after SIGKILL, meshes, processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import assert_trees_close, config_flags, tiny_config, write_manifest

from unite_jax.convert.orbax_model import load_model_dir
from unite_jax.train.loop import TrainingError, train

pytestmark = pytest.mark.slow  # end-to-end trainer runs

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_manifest(str(tmp_path_factory.mktemp("train_data")))


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_losses(workdir: str) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(workdir) if "loss" in r]


def final_params(workdir: str) -> dict:
    params, _, _ = load_model_dir(os.path.join(workdir, "model"))
    return jax.tree.map(np.asarray, params)


def test_stage1_learns_and_stage2_starts_from_it(manifest, tmp_path):
    stage1 = str(tmp_path / "stage1")
    summary = train(tiny_config("stage1", manifest, **{"train.steps": 10}), stage1)
    records = read_metrics(stage1)
    losses = [r["loss"] for r in records if "loss" in r]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 11))
    assert all("learning_rate" in r for r in records if "loss" in r)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses
    assert os.path.isdir(os.path.join(stage1, "tensorboard"))
    assert summary["model_dir"] == os.path.join(stage1, "model")

    # The trained model exports to Hugging Face format, reloads and encodes identically.
    from unite_jax import Embedder
    from unite_jax.convert.conversions import model_dir_to_hf

    exported = model_dir_to_hf(stage1, str(tmp_path / "hf"))
    items = [{"text": "a red square for one"}, {"image": os.path.join(os.path.dirname(manifest), "media", "001.png")},
             {"text": "<|IMAGE|> a blue circle", "image": os.path.join(os.path.dirname(manifest), "media", "002.png")}]
    from_workdir = Embedder.from_pretrained(stage1).encode(items)
    from_export = Embedder.from_pretrained(exported).encode(items)
    np.testing.assert_array_equal(from_workdir, from_export)
    assert np.abs(from_workdir @ from_workdir.T - np.eye(3)).max() > 1e-3  # not a degenerate encoder

    # Stage 2 with LoRA and a zero learning rate must end exactly where stage 1 ended: it starts from
    # stage 1's merged final model, and the zero-initialised B makes the merge a no-op.
    stage2 = str(tmp_path / "stage2")
    train(tiny_config("stage2", manifest, **{"model.init": stage1, "lora.rank": 4, "train.learning_rate": 0.0,
                                             "train.steps": 2}), stage2)
    assert_trees_close(final_params(stage2), final_params(stage1), atol=0.0)
    meta = json.load(open(os.path.join(stage2, "model", "unite_model.json")))
    assert meta["lora"]["rank"] == 4 and meta["lora"]["merged"]

    # A run killed after its final checkpoint but before writing model/ finishes the job when rerun.
    import shutil

    shutil.rmtree(os.path.join(stage2, "model"))
    train(tiny_config("stage2", manifest, **{"model.init": stage1, "lora.rank": 4, "train.learning_rate": 0.0,
                                             "train.steps": 2}), stage2)
    assert_trees_close(final_params(stage2), final_params(stage1), atol=0.0)

    # Rerunning a finished stage does nothing.
    again = train(tiny_config("stage2", manifest, **{"model.init": stage1, "lora.rank": 4,
                                                     "train.learning_rate": 0.0, "train.steps": 2}), stage2)
    assert again.get("resumed_finished")


def _run_train(workdir: str, manifest: str, steps: int, extra: dict | None = None, devices: int = 1):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONUNBUFFERED="1")
    flags = config_flags(manifest, **{"train.steps": steps, "checkpoint.async_save": True, **(extra or {})})
    cmd = [sys.executable, os.path.join(REPO, "launch", "train.py"), "--config=configs/stage1.py:tiny",
           f"--workdir={workdir}", *flags]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_then_resume_matches_uninterrupted_run(manifest, tmp_path):
    steps = 9
    reference = str(tmp_path / "reference")
    proc = _run_train(reference, manifest, steps)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out

    killed = str(tmp_path / "killed")
    proc = _run_train(killed, manifest, steps)
    metrics_path = os.path.join(killed, "metrics.jsonl")
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics_path) and sum(1 for _ in open(metrics_path)) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoints = os.listdir(os.path.join(killed, "checkpoints"))
    assert checkpoints, "no checkpoint was written before the kill"

    proc = _run_train(killed, manifest, steps)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "resumed from" in out
    assert train_losses(killed) == train_losses(reference)
    assert len(train_losses(killed)) == steps
    assert_trees_close(final_params(killed), final_params(reference), atol=0.0)


@pytest.fixture(scope="module")
def one_device_run(manifest, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("one_device"))
    train(tiny_config("stage1", manifest, **{"mesh.shape": (1, 1, 1), "mesh.num_devices": 1, "train.steps": 3,
                                             "lora.dropout": 0.0}), workdir)
    return workdir


def test_eight_device_mesh_matches_one_device(manifest, one_device_run, tmp_path):
    workdir = str(tmp_path / "mesh")
    train(tiny_config("stage1", manifest, **{"mesh.shape": (2, 2, 2), "train.steps": 3, "lora.dropout": 0.0}),
          workdir)
    reference = train_losses(one_device_run)
    for (step_a, loss_a), (step_b, loss_b) in zip(train_losses(workdir), reference, strict=True):
        assert step_a == step_b
        np.testing.assert_allclose(loss_a, loss_b, rtol=2e-5)
    assert_trees_close(final_params(workdir), final_params(one_device_run), atol=2e-5, rtol=1e-4)


def test_two_processes_match_one_process(manifest, one_device_run, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = str(tmp_path / "two_processes")
    procs = [_run_train(workdir, manifest, 3, devices=2, extra={
        "distributed.coordinator_address": f"127.0.0.1:{port}", "distributed.num_processes": 2,
        "distributed.process_id": i, "mesh.shape": "(2,2,1)", "lora.dropout": 0.0}) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    reference = train_losses(one_device_run)
    for (step_a, loss_a), (step_b, loss_b) in zip(train_losses(workdir), reference, strict=True):
        assert step_a == step_b
        np.testing.assert_allclose(loss_a, loss_b, rtol=2e-5)
    assert_trees_close(final_params(workdir), final_params(one_device_run), atol=2e-5, rtol=1e-4)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(manifest, tmp_path):
    workdir = str(tmp_path / "nan")
    # An absurd learning rate makes the weights overflow after the first update, so step 2's loss is NaN.
    config = tiny_config("stage1", manifest, **{"train.learning_rate": 1e30, "train.warmup_fraction": 0.0,
                                                "checkpoint.every_steps": 1, "train.steps": 6})
    with pytest.raises(TrainingError, match="non-finite"):
        train(config, workdir)
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps, "no checkpoint survived"
    from unite_jax.train.checkpoint import RunCheckpointer

    checkpointer = RunCheckpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    restored = checkpointer.manager.restore(steps[-1])
    leaves = jax.tree.leaves(restored["state"])
    assert leaves and all(np.all(np.isfinite(np.asarray(x))) for x in leaves if np.issubdtype(
        np.asarray(x).dtype, np.floating))
    assert not os.path.exists(os.path.join(workdir, "model"))

    skipped = str(tmp_path / "skip")
    config = tiny_config("stage1", manifest, **{"train.learning_rate": 1e30, "train.warmup_fraction": 0.0,
                                                "train.nonfinite": "skip", "train.steps": 4})
    train(config, skipped)
    assert any(r.get("skipped_nonfinite") for r in read_metrics(skipped))


def test_unwritable_workdir_is_a_clear_error_before_training(manifest, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="not writable"):
        train(tiny_config("stage1", manifest), str(blocker / "run"))


def test_grad_cache_with_hard_negatives_matches_plain_step(manifest, tmp_path):
    """GradCache over 2 chunks gives the plain step's losses and weights, hard negatives included."""
    settings = {"data.hard_negatives": True, "train.steps": 2, "mesh.shape": (4, 1, 1), "mesh.num_devices": 4}
    plain, chunked = str(tmp_path / "plain"), str(tmp_path / "chunked")
    train(tiny_config("stage1", manifest, **settings), plain)
    train(tiny_config("stage1", manifest, **settings, **{"train.grad_cache_chunks": 2}), chunked)
    for (step_a, loss_a), (step_b, loss_b) in zip(train_losses(chunked), train_losses(plain), strict=True):
        assert step_a == step_b
        np.testing.assert_allclose(loss_a, loss_b, rtol=2e-5)
    assert_trees_close(final_params(chunked), final_params(plain), atol=2e-5, rtol=1e-4)
