"""`launch/convert.py` as a user runs it: a subprocess, exit codes, one-line errors, a full round trip."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import hf_reference
import numpy as np
import pytest
import torch

from unite_jax.convert import safetensors_io as st

pytestmark = pytest.mark.slow  # the command line run as a subprocess

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SCRIPT = os.path.join(REPO, "launch", "convert.py")


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("convert.py: error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_tokenizer_dir):
    model = hf_reference.hf_model("gqa2_tied", seed=5)
    directory = hf_reference.save_hf_dir(model, str(tmp_path_factory.mktemp("cli") / "hf"), tiny_tokenizer_dir)
    return model, directory


def test_round_trip_through_the_cli_with_a_dtype(source, tmp_path):
    model, hf_dir = source
    orbax_dir, export_dir = str(tmp_path / "orbax"), str(tmp_path / "export")
    result = run(f"--src={hf_dir}", f"--dst={orbax_dir}", "--dtype=bfloat16")
    assert result.returncode == 0, result.stderr
    assert f"wrote Orbax model directory {orbax_dir}" in result.stdout
    meta = json.load(open(os.path.join(orbax_dir, "unite_model.json")))
    assert meta["format"] == "unite-jax-model" and meta["dtype"] == "bfloat16"

    result = run(f"--src={orbax_dir}", f"--dst={export_dir}")
    assert result.returncode == 0, result.stderr
    assert f"wrote Hugging Face directory {export_dir}" in result.stdout
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
            "README.md"} <= set(os.listdir(export_dir))
    checkpoint = st.Checkpoint(export_dir)
    # torch's in-memory names are 5.x (model.language_model.*, model.visual.*); files use 4.x names
    state = {re.sub(r"^model\.language_model\.", "model.", re.sub(r"^model\.visual\.", "visual.", k)): v
             for k, v in model.state_dict().items()}
    assert sorted(checkpoint.names()) == sorted(k for k in state if k != "lm_head.weight")  # tied: no lm_head
    for name in checkpoint.names():
        want = state[name].detach().to(torch.bfloat16).view(torch.int16).numpy()
        got = checkpoint.read(name)
        assert str(got.dtype) == "bfloat16" and np.array_equal(got.view(np.int16), want), name

    # the destination is now non-empty: refused without --overwrite, replaced with it
    result = run(f"--src={orbax_dir}", f"--dst={export_dir}")
    assert_one_line_error(result, export_dir, "not empty", "--overwrite")
    result = run(f"--src={orbax_dir}", f"--dst={export_dir}", "--overwrite", "--dtype=float32",
                 "--max_shard_gb=0.00002")
    assert result.returncode == 0, result.stderr
    assert st.INDEX_FILE in os.listdir(export_dir)  # 20 kB shards
    assert json.load(open(os.path.join(export_dir, "config.json")))["dtype"] == "float32"


def test_training_workdir_exports(source, tmp_path):
    _, hf_dir = source
    workdir = tmp_path / "workdir"
    assert run(f"--src={hf_dir}", f"--dst={workdir / 'model'}").returncode == 0
    result = run(f"--src={workdir}", f"--dst={tmp_path / 'export'}")
    assert result.returncode == 0, result.stderr
    assert os.path.isfile(tmp_path / "export" / "model.safetensors")


def test_errors_are_one_line_with_exit_code_2(source, tmp_path):
    _, hf_dir = source
    assert_one_line_error(run(f"--src={tmp_path / 'nowhere'}", f"--dst={tmp_path / 'out'}"),
                          "nowhere: no such directory")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    assert_one_line_error(run(f"--src={tmp_path / 'junk'}", f"--dst={tmp_path / 'out'}"),
                          "neither format", "config.json and *.safetensors", "unite_model.json and params/",
                          "notes.txt")
    assert not (tmp_path / "out").exists()
    bad_dtype = run(f"--src={hf_dir}", f"--dst={tmp_path / 'out'}", "--dtype=int8")
    assert bad_dtype.returncode == 2 and "invalid choice: 'int8'" in bad_dtype.stderr
