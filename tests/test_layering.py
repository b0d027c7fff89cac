"""The package's import rule, read from the source: model <- loss <- data <- train/eval/convert <- api <- launch.

Every `import` / `from ... import` of a `unite_jax` module (at any depth of a file, lazy imports too) must
point to the same layer or a lower one. The layers, lowest first:

  0 leaf      unite_jax/modality.py, files.py, progress.py: import nothing from the package
  1 model     unite_jax/model/
  2 loss      unite_jax/loss.py, gradcache.py, parallel.py
  3 data      unite_jax/data/ (and only leaf + data: no model, no loss, and never jax)
  4 run       unite_jax/train/, eval/, convert/, encoding.py
  5 api       unite_jax/api.py, unite_jax/demo/
  6 launch    unite_jax/__init__.py (the lazy `Embedder`), cli/, configs/, encode.py, every __main__.py
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "unite_jax")
LAYERS = {"leaf": 0, "model": 1, "loss": 2, "data": 3, "run": 4, "api": 5, "launch": 6}
LEAF_MODULES = {"unite_jax.modality", "unite_jax.files", "unite_jax.progress"}
LOSS_MODULES = {"unite_jax.loss", "unite_jax.gradcache", "unite_jax.parallel"}
# Third-party packages that mean "JAX is imported": never in the data layer (Grain workers, configs).
JAX_PACKAGES = {"jax", "jaxlib", "flax", "optax", "orbax", "chex"}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if module == "unite_jax" or parts[-1] == "__main__" or module == "unite_jax.encode":
        return "launch"
    if module in LEAF_MODULES:
        return "leaf"
    if module in LOSS_MODULES:
        return "loss"
    if module in ("unite_jax.api",) or parts[1] == "demo":
        return "api"
    if module == "unite_jax.encoding" or parts[1] in ("train", "eval", "convert"):
        return "run"
    if parts[1] in ("model", "data"):
        return parts[1]
    if parts[1] in ("cli", "configs"):
        return "launch"
    raise AssertionError(f"{module}: no layer assigned; add it to tests/test_layering.py and the README")


def package_modules() -> dict[str, str]:
    """{dotted module name: file path} of every .py file of the package."""
    modules = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join(parts)] = path
    return modules


def imports_of(path: str, module: str, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file; `from a import b` counts a.b when it is a module."""
    is_package = path.endswith("__init__.py")
    package = module if is_package else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((node.lineno, full if full in known else base))
    return found


def test_imports_flow_down_the_layers():
    modules = package_modules()
    known = set(modules)
    upward, data_imports_jax = [], []
    for module, path in sorted(modules.items()):
        mine = layer_of(module)
        for line, imported in imports_of(path, module, known):
            top = imported.split(".")[0]
            if top in JAX_PACKAGES and mine == "data":
                data_imports_jax.append(f"{path}:{line}: imports {imported}")
            if top != "unite_jax":
                continue
            theirs = layer_of(imported)
            data_breach = mine == "data" and theirs not in ("leaf", "data")
            leaf_breach = mine == "leaf"
            if LAYERS[theirs] > LAYERS[mine] or data_breach or leaf_breach:
                upward.append(f"{os.path.relpath(path, ROOT)}:{line}: {mine} imports {imported} ({theirs})")
    assert not upward, "imports against the layer rule:\n" + "\n".join(upward)
    assert not data_imports_jax, "the data layer imports JAX:\n" + "\n".join(data_imports_jax)


def test_every_module_has_a_layer():
    for module in package_modules():
        layer_of(module)


# A meta-path entry that refuses jax: grain (0.2) imports jax opportunistically when it is installed and
# falls back when it is not, so with this in place an import of jax can only come from our own code, and
# would fail loudly. The worker's dataset is built and read exactly as a Grain worker process does.
_WORKER_SCRIPT = textwrap.dedent("""
    import json, os, sys
    class RefuseJax:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("jax", "jaxlib"):
                raise ImportError("jax is refused in this process: " + name)
    sys.meta_path.insert(0, RefuseJax())
    import configs.base
    import configs.stage1
    assert "jax" not in sys.modules and "grain" not in sys.modules, "configs import jax or grain"
    config = configs.stage1.get_config("tiny")
    manifest, tokenizer_dir = sys.argv[1], sys.argv[2]
    config.data.train = manifest
    from unite_jax.data import media
    from unite_jax.data.pipeline import BatchSpec, build_train_iterator
    from unite_jax.data.tokenize import PromptTokenizer
    tokenizer = PromptTokenizer.from_pretrained(tokenizer_dir)
    processor = media.ProcessorConfig(min_pixels=16 * 28 * 28, max_pixels=64 * 28 * 28)
    spec = BatchSpec.from_config(config.data, num_chunks=1, local_shards=2, rows_per_shard=2,
                                 pad_id=tokenizer.pad_id, patch_dim=processor.patch_dim)
    iterator = build_train_iterator(config.data, spec, tokenizer, processor, seed=0, process_index=0,
                                    process_count=1)
    worker_dataset = iterator._dataset  # what mp_prefetch hands each worker process
    batch = next(iter(worker_dataset))
    assert batch["arrays"] is not None and batch["num_good"] == 4, batch["bad"]
    print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax", "optax"))))
""")


def test_configs_and_a_grain_worker_never_import_jax(tmp_path, tiny_tokenizer_dir):
    import json

    from PIL import Image

    Image.new("RGB", (56, 56), (200, 30, 30)).save(tmp_path / "red.png")
    records = [{"query": {"text": f"a red square {i}"}, "candidate": {"image": "red.png"}} for i in range(6)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-c", _WORKER_SCRIPT, str(tmp_path / "train.jsonl"), tiny_tokenizer_dir],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("module", ["unite_jax.data.items", "unite_jax.data.pipeline", "unite_jax.configs.stage2"])
def test_data_modules_import_without_jax(module):
    code = ("import sys\n"
            "class RefuseJax:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('jax', 'jaxlib'):\n"
            "            raise ImportError(name)\n"
            f"sys.meta_path.insert(0, RefuseJax())\nimport {module}\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
