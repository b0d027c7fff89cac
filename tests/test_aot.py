"""The ahead-of-time checker on a CPU host with libtpu: the trainer's own step compiles for TPU topologies.

- the tiny preset's train step compiles in full for v5e:2x2 with the splash kernels (flops reported);
- a two-slice topology: the mesh puts the slices on `data` (the network between slices) and compiles;
- the 2b recipe at its global batch (512) fits a v5e:4x4 chip's HBM with the README's 2 GradCache chunks,
  read from the compiler's buffer assignment (no code generation: about 20 s instead of ~10 minutes);
- a step that does not fit makes `launch/aot.py` exit 1 with the knobs that would help;
- a splash kernel that fails for some shape is reported, and the XLA attention path is compiled instead.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from unite_jax import parallel
from unite_jax.train import aot

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
from unite_jax.configs import stage1  # noqa: E402

GIB = 2**30


@pytest.mark.slow
def test_tiny_step_compiles_for_v5e_with_splash():
    report = aot.check(stage1.get_config("tiny"), aot.Target("v5e:2x2"))
    assert report.fits and report.attention == "splash" and not report.notes
    assert report.chips == 4 and report.chip_kind == "TPU v5 lite"
    assert report.flops_per_chip > 1e8 and report.compiler_flops_per_chip > 1e8
    assert 15 * GIB < report.capacity_bytes < 16 * GIB
    assert 0 < report.total_bytes < GIB and report.executable_bytes > 0


def test_two_slices_lie_on_the_data_axis():
    target = aot.Target("v5e:2x2", slices=2)
    devices = target.devices()
    assert len(devices) == 8
    mesh = parallel.make_mesh((2, -1, 1), devices=devices)
    slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (slice_of[0] == 0).all() and (slice_of[1] == 1).all()
    config = stage1.get_config("tiny")
    config.mesh.shape = (2, -1, 1)
    report = aot.check(config, target, fast=True)
    assert report.fits and report.chips == 8 and report.mesh == {"data": 2, "fsdp": 4, "tensor": 1}
    config.mesh.shape = (1, -1, 1)
    with pytest.raises(ValueError, match="multiple of 2"):
        aot.check(config, target, fast=True)


@pytest.mark.slow
def test_2b_recipe_fits_v5e_16_with_two_chunks():
    config = stage1.get_config("2b")
    config.train.grad_cache_chunks = 2
    report = aot.check(config, aot.Target("v5e:4x4"), fast=True)
    assert config.train.global_batch_size == 512 and report.mesh["fsdp"] == 16
    assert report.fits, f"{report.total_bytes / GIB:.2f} GiB per chip"
    assert report.total_bytes < 16 * GIB
    # FSDP splits the 2B parameters 16 ways: well under a GiB per chip, LoRA state is tiny
    assert report.params_bytes < 0.5 * GIB and report.opt_state_bytes < 0.05 * GIB


def test_cli_exits_1_with_knobs_when_the_step_does_not_fit():
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "aot.py"), f"--config={ROOT}/configs/stage1.py:tiny",
         "--topology=v5e:2x2", "--fast", "--config.train.global_batch_size=16384", "--config.data.seq_len=512"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    assert "DOES NOT FIT" in proc.stdout
    assert "knobs that would help" in proc.stderr and "--config.train.grad_cache_chunks=2" in proc.stderr


def test_a_kernel_that_does_not_lower_falls_back_to_xla(monkeypatch):
    from unite_jax.model import splash

    def refuse(*args, **kwargs):
        raise NotImplementedError("no kernel for this shape")

    monkeypatch.setattr(splash, "_kernel", refuse)
    report = aot.check(stage1.get_config("tiny"), aot.Target("v5e:2x2"), fast=True)
    assert report.attention == "xla" and report.fits
    assert len(report.notes) == 1 and "splash attention did not compile" in report.notes[0]
    assert "no kernel for this shape" in report.notes[0]
