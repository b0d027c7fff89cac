"""The package as pyproject.toml declares it: dependencies match the imports, requirements-tpu.txt is derived
from the `tpu` extra, and a wheel built from the repository installs the four commands and the stage configs."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib

import pytest
from helpers import TINY_OVERRIDES, write_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
COMMANDS = ("unite-train", "unite-encode", "unite-eval", "unite-convert")
# Import name -> distribution, for every third-party package the library imports.
DISTRIBUTIONS = {
    "PIL": "pillow", "absl": "absl-py", "av": "av", "chex": "chex", "etils": "etils", "flax": "flax",
    "grain": "grain", "jax": "jax", "ml_collections": "ml-collections", "ml_dtypes": "ml-dtypes", "numpy": "numpy",
    "optax": "optax", "orbax": "orbax-checkpoint", "tensorboardX": "tensorboardX", "tokenizers": "tokenizers",
    # optional, imported where the feature is used
    "faiss": "faiss-cpu", "skimage": "scikit-image", "sklearn": "scikit-learn",
    "tensorflow_datasets": "tensorflow-datasets",
}
OPTIONAL_EXTRAS = ("demo", "tfds", "faiss")


def distribution(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower()


def library_imports() -> set[str]:
    names = set()
    for directory, _, files in os.walk(os.path.join(ROOT, "unite_jax")):
        for name in (f for f in files if f.endswith(".py")):
            tree = ast.parse(open(os.path.join(directory, name), encoding="utf-8").read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "unite_jax"}


def test_every_import_is_declared_and_every_dependency_imported():
    imports = library_imports()
    unknown = sorted(imports - set(DISTRIBUTIONS))
    assert not unknown, f"the library imports {unknown}: declare them in pyproject.toml and in DISTRIBUTIONS here"
    required = {distribution(r) for r in PROJECT["dependencies"]}
    optional = {distribution(r) for extra in OPTIONAL_EXTRAS for r in PROJECT["optional-dependencies"][extra]}
    used = {DISTRIBUTIONS[name].lower() for name in imports}
    assert used <= required | optional, f"imported but not declared: {sorted(used - required - optional)}"
    assert required <= used, f"declared but never imported by the library: {sorted(required - used)}"
    for reference in ("torch", "transformers", "safetensors"):  # the tests' references only
        assert reference not in required and reference in {distribution(r) for r in PROJECT["optional-dependencies"]
                                                           ["test"]}


def expected_tpu_requirements() -> list[str]:
    """The [project] dependencies with jax replaced by the `tpu` extra's jax[tpu]."""
    tpu = PROJECT["optional-dependencies"]["tpu"]
    return tpu + [r for r in PROJECT["dependencies"] if distribution(r) != "jax"]


def test_requirements_tpu_is_derived_from_the_tpu_extra():
    lines = [line.strip() for line in open(os.path.join(ROOT, "requirements-tpu.txt")) if line.strip()]
    requirements = [line for line in lines if not line.startswith("#")]
    expected = expected_tpu_requirements()
    assert requirements == expected, ("requirements-tpu.txt disagrees with pyproject.toml; it should list:\n"
                                      + "\n".join(expected))
    jax = next(r for r in PROJECT["dependencies"] if distribution(r) == "jax")
    for extra, plugin in (("tpu", "tpu"), ("cuda12", "cuda12")):
        assert PROJECT["optional-dependencies"][extra] == [jax.replace("jax", f"jax[{plugin}]", 1)]
    assert "tensorboard" in {distribution(r) for r in PROJECT["optional-dependencies"]["tensorboard"]}
    assert PROJECT["requires-python"] == ">=3.11"
    gpu = open(os.path.join(ROOT, "launch", "gpu.sh")).read()
    assert '".[cuda12]"' in gpu and '"jax[cuda12]"' not in gpu  # the pinned extra, not an unpinned jax


def _source_tree(dst: str) -> str:
    """The files git knows (tracked, or new and not ignored), copied to `dst`: what a user's checkout holds."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for relative in filter(None, listed):
        source = os.path.join(ROOT, relative)
        if os.path.isfile(source):
            os.makedirs(os.path.dirname(os.path.join(dst, relative)), exist_ok=True)
            shutil.copy2(source, os.path.join(dst, relative))
    return dst


@pytest.mark.slow
def test_a_wheel_installs_the_four_commands_and_the_stage_configs(tmp_path):
    """`pip wheel`, then the wheel alone (--no-deps) in a fresh venv that sees the test environment's packages
    (but not this checkout): the commands run, and `unite-train --config=configs/stage1.py:tiny` trains from a
    directory without configs/ (the packaged config)."""
    source = _source_tree(str(tmp_path / "source"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path / "wheels"), source], check=True, timeout=600)
    (wheel,) = os.listdir(tmp_path / "wheels")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
                    str(tmp_path / "wheels" / wheel)], check=True, timeout=600)
    # The fresh venv sees the test environment's packages (jax, ...) through a path entry; the .pth files
    # there (this checkout's editable install among them) are not processed, so unite_jax is the wheel's.
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(site, "test_environment.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = dict(cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)

    where = subprocess.run([python, "-c", "import unite_jax; print(unite_jax.__file__)"], **run)
    assert where.returncode == 0 and where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr
    def shows_help(result) -> bool:  # argparse exits 0 after --help, absl (unite-train) exits 1
        return "--help" in result.stdout and result.returncode in (0, 1) and "Traceback" not in result.stderr

    for command in COMMANDS:
        result = subprocess.run([str(venv / "bin" / command), "--help"], **run)
        assert shows_help(result), (command, result.stdout[-500:], result.stderr[-2000:])
    for module in ("encode", "eval", "convert", "train"):
        result = subprocess.run([python, "-m", f"unite_jax.{module}", "--help"], **run)
        assert shows_help(result), (module, result.stdout[-500:], result.stderr[-2000:])

    manifest = write_manifest(str(tmp_path / "data"), num_pairs=16)
    overrides = {**TINY_OVERRIDES, "data.train": manifest, "train.steps": 1}
    workdir = tmp_path / "run"
    assert not os.path.exists(tmp_path / "configs")
    result = subprocess.run([str(venv / "bin" / "unite-train"), "--config=configs/stage1.py:tiny",
                             f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in overrides.items()]], **run)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    meta = json.load(open(workdir / "model" / "unite_model.json"))
    assert meta["extra"]["stage"] == "stage1" and meta["extra"]["steps"] == 1
    assert [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")] == [1]
