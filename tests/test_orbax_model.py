"""Orbax model directories: HF -> Orbax -> HF round trips, parity with transformers, LoRA, atomicity, errors.

References are independent of the code under test: source tensors come from
torch (`state_dict`, `save_pretrained`), embeddings from transformers run with
the UNITE recipe (tests/test_embedder.py's reference), merged LoRA kernels
from a float64 numpy formula.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil

import hf_reference
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from helpers import assert_trees_bit_equal, flatten, photo, random_lora, raw_bytes, video_frames

from unite_jax import Embedder
from unite_jax.convert import conversions, hf, orbax_io, orbax_model
from unite_jax.convert import safetensors_io as st
from unite_jax.convert.model_card import SNIPPET_IMAGE, SNIPPET_PATH, snippet_from_card
from unite_jax.model.config import ModelConfig

TOL = 1e-5
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------ sources and helpers
@pytest.fixture(scope="module")
def models():
    """The two tiny torch reference models (every tensor random)."""
    return {variant: hf_reference.hf_model(variant, seed=3) for variant in hf_reference.VARIANTS}


def write_source(model, directory: str, layout: str, dtype: str, tokenizer_dir: str) -> str:
    """A HF directory of `model` in `dtype`: save_pretrained's layout ("4.x"), or the 5.x module names
    (the state dict as transformers 5.x holds it in memory, tied lm_head copy included)."""
    cast = copy.deepcopy(model).to(TORCH_DTYPES[dtype])
    hf_reference.save_hf_dir(cast, directory, tokenizer_dir=tokenizer_dir)
    if layout == "5.x":
        from safetensors.torch import save_file

        for name in os.listdir(directory):
            if name.endswith(".safetensors") or name.endswith(".index.json"):
                os.remove(os.path.join(directory, name))
        state = {k: v.detach().clone().contiguous() for k, v in cast.state_dict().items()}
        save_file(state, os.path.join(directory, st.SINGLE_FILE), metadata={"format": "pt"})
    assert hf.detect_layout(st.Checkpoint(directory).names()) == layout
    return directory


def to_4x_name(name: str) -> str:
    return re.sub(r"^model\.language_model\.", "model.", re.sub(r"^model\.visual\.", "visual.", name))


def hf_tensors(directory: str) -> dict[str, np.ndarray]:
    checkpoint = st.Checkpoint(directory)
    return {name: checkpoint.read(name, copy=True) for name in checkpoint.names()}



# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("layout,dtype,variant", [
    ("4.x", "float32", "gqa4_untied"), ("4.x", "bfloat16", "gqa2_tied"),
    ("5.x", "float32", "gqa2_tied"), ("5.x", "bfloat16", "gqa4_untied"),
])
def test_round_trip_hf_orbax_hf_is_bit_exact(models, layout, dtype, variant, tmp_path, tiny_tokenizer_dir):
    source = write_source(models[variant], str(tmp_path / "hf"), layout, dtype, tiny_tokenizer_dir)
    model_dir = conversions.hf_to_model_dir(source, str(tmp_path / "orbax"))
    exported = conversions.model_dir_to_hf(model_dir, str(tmp_path / "export"))

    # the model directory: metadata, the source's tree (load_hf_params is checked against torch elsewhere)
    meta = json.load(open(os.path.join(model_dir, orbax_model.MODEL_META)))
    assert (meta["format"], meta["version"], meta["dtype"], meta["lora"]) == ("unite-jax-model", 1, dtype, None)
    assert os.path.abspath(source) in meta["source"] and meta["extra"]["hf_layout"] == layout
    params, cfg, _ = orbax_model.load_model_dir(model_dir)
    assert {np.dtype(leaf.dtype) for leaf in jax.tree.leaves(params)} == {np.dtype(jnp.dtype(dtype))}
    assert_trees_bit_equal(params, hf.load_hf_params(source, ModelConfig.from_pretrained(source), dtype=dtype))

    # the export: the source's tensors, byte for byte, under 4.x names (a tied model's lm_head copy dropped)
    tied = hf_reference.VARIANTS[variant]["tied"]
    expected = {to_4x_name(k): v for k, v in hf_tensors(source).items() if not (tied and k == "lm_head.weight")}
    got = hf_tensors(exported)
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        assert np.array_equal(raw_bytes(got[name]), raw_bytes(value)), name
    config = json.load(open(os.path.join(exported, "config.json")))
    assert config["dtype"] == config["torch_dtype"] == dtype
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        assert open(os.path.join(exported, name), "rb").read() == open(os.path.join(source, name), "rb").read()
    assert "Summary above" in open(os.path.join(exported, "README.md")).read()


def test_dtype_option_casts_like_torch(models, tmp_path, tiny_tokenizer_dir):
    model = models["gqa2_tied"]
    source = write_source(model, str(tmp_path / "hf"), "4.x", "float32", tiny_tokenizer_dir)
    model_dir = conversions.hf_to_model_dir(source, str(tmp_path / "orbax"), dtype="bfloat16")
    assert json.load(open(os.path.join(model_dir, orbax_model.MODEL_META)))["dtype"] == "bfloat16"
    exported = conversions.model_dir_to_hf(model_dir, str(tmp_path / "export_f32"), dtype="float32")
    got = hf_tensors(exported)
    for name, tensor in model.state_dict().items():
        name = to_4x_name(name)
        if name not in got:  # the tied lm_head
            continue
        want = tensor.detach().to(torch.bfloat16).to(torch.float32).numpy()
        assert got[name].dtype == np.float32 and np.array_equal(got[name], want), name
    assert json.load(open(os.path.join(exported, "config.json")))["dtype"] == "float32"


def test_export_shards_with_an_index(models, tmp_path, tiny_tokenizer_dir):
    source = write_source(models["gqa4_untied"], str(tmp_path / "hf"), "4.x", "float32", tiny_tokenizer_dir)
    model_dir = conversions.hf_to_model_dir(source, str(tmp_path / "orbax"))
    exported = conversions.model_dir_to_hf(model_dir, str(tmp_path / "export"), max_shard_bytes=60_000,
                                           group_bytes=20_000)  # several restore groups too
    shards = sorted(f for f in os.listdir(exported) if f.endswith(".safetensors"))
    assert len(shards) > 2 and st.SINGLE_FILE not in shards
    index = json.load(open(os.path.join(exported, st.INDEX_FILE)))
    assert sorted(set(index["weight_map"].values())) == shards
    largest = max(int(np.prod(v.shape)) * 4 for v in hf_tensors(source).values())
    for shard in shards:
        assert os.path.getsize(os.path.join(exported, shard)) <= max(60_000, largest) + 4096
    got, want = hf_tensors(exported), hf_tensors(source)
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)


# ------------------------------------------------------------------ parity with transformers
def test_export_loads_in_transformers_and_matches_embedder(models, tmp_path, tiny_tokenizer_dir):
    from transformers import Qwen2VLForConditionalGeneration

    model = models["gqa4_untied"]
    source = write_source(model, str(tmp_path / "hf"), "4.x", "float32", tiny_tokenizer_dir)
    workdir = tmp_path / "workdir"  # a finished training workdir holds its model at WORKDIR/model
    model_dir = conversions.hf_to_model_dir(source, str(workdir / "model"))
    exported = conversions.model_dir_to_hf(str(workdir), str(tmp_path / "export"))
    loaded = Qwen2VLForConditionalGeneration.from_pretrained(exported, dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    original, again = model.state_dict(), loaded.state_dict()
    assert sorted(original) == sorted(again)
    assert all(torch.equal(original[k], again[k]) for k in original)

    photo_path, picture = photo(tmp_path, "astronaut", np.s_[40:317, 60:451])
    frames = video_frames(0)
    items = [{"text": "a photo of a cat sitting on a red sofa"}, {"image": photo_path}, {"video": frames},
             {"text": "<|IMAGE|>\nWhat is in the picture?", "image": photo_path}]
    specs = [{"content": "a photo of a cat sitting on a red sofa", "modalities": "sentence"},
             {"content": "<IMG>", "images": [picture], "modalities": "image"},
             {"content": "<VID>", "videos": [frames], "modalities": "video"},
             {"content": "<IMG>\nWhat is in the picture?", "images": [picture], "modalities": "sentence and image"}]
    expected = hf_reference.reference_embeddings(loaded, exported, specs)
    embedder = Embedder.from_pretrained(model_dir)
    assert embedder.run.param_dtype == "float32"
    got = embedder.encode(items, batch_size=4)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    # the workdir resolves to the same model; the HF export encodes the same
    assert np.array_equal(Embedder.from_pretrained(str(workdir)).encode(items, batch_size=4), got)
    np.testing.assert_allclose(Embedder.from_pretrained(exported).encode(items, batch_size=4), got, atol=TOL, rtol=0)

    # the model card's transformers snippet computes the same embeddings
    card = open(os.path.join(exported, "README.md")).read()
    assert "last position" in card and "L2-normalised" in card and "LEFT" in card and "0..L-1" in card
    code = snippet_from_card(card).replace(SNIPPET_PATH, exported).replace(SNIPPET_IMAGE, photo_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    ours = embedder.encode([{"text": "a dog catching a frisbee"}, {"image": photo_path},
                            {"text": "<|IMAGE|>\nWhat is the dog doing?", "image": photo_path}])
    np.testing.assert_allclose(namespace["texts"].numpy(), ours[:1], atol=TOL, rtol=0)
    np.testing.assert_allclose(namespace["photos"].numpy(), ours[1:], atol=TOL, rtol=0)


# ------------------------------------------------------------------ LoRA
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_merged_into_params_is_saved_loaded_and_exported(models, dtype, tmp_path, tiny_tokenizer_dir):
    """What the trainer writes: LoRA folded into the kernels (merge_lora), recorded in unite_model.json."""
    from unite_jax.model.lora import merge_lora

    source = write_source(models["gqa2_tied"], str(tmp_path / "hf"), "4.x", "float32", tiny_tokenizer_dir)
    cfg = ModelConfig.from_pretrained(source)
    params = hf.load_hf_params(source, cfg, dtype=dtype)
    targets = [("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "down_proj")]
    lora = random_lora(params, targets, rank=2, seed=0)
    scale = 5 / 2
    merged = merge_lora(params, lora, scale)
    model_dir = orbax_model.save_model_dir(str(tmp_path / "orbax"), merged, cfg, assets_from=source,
                                           lora_meta={"rank": 2, "alpha": 5, "targets": ["down_proj", "q_proj",
                                                                                         "v_proj"]})
    meta = json.load(open(os.path.join(model_dir, orbax_model.MODEL_META)))
    assert meta["lora"] == {"rank": 2, "alpha": 5, "targets": ["down_proj", "q_proj", "v_proj"], "merged": True}
    loaded, _, _ = orbax_model.load_model_dir(model_dir)

    expected = copy.deepcopy(params)
    for module, name in targets:
        kernel = params["model"]["layers"][module][name]["kernel"]
        pair = lora["model"]["layers"][module][name]
        exact = np.stack([kernel[k].astype(np.float64) + scale * pair["lora_a"][k].astype(np.float64)
                          @ pair["lora_b"][k].astype(np.float64) for k in range(kernel.shape[0])])
        got = loaded["model"]["layers"][module][name]["kernel"]
        assert got.dtype == kernel.dtype
        # float32 math then one rounding to the kernel's dtype: within an ulp of the exact value
        ulp = 2.0**-23 if dtype == "float32" else 2.0**-7
        np.testing.assert_allclose(got.astype(np.float64), exact, rtol=ulp, atol=1e-6)
        assert not np.array_equal(got, kernel)
        expected["model"]["layers"][module][name]["kernel"] = got
    assert_trees_bit_equal(loaded, expected)  # every other leaf untouched
    assert_trees_bit_equal(loaded, merged)
    exported = conversions.model_dir_to_hf(model_dir, str(tmp_path / "export"), group_bytes=30_000)
    assert_trees_bit_equal(hf.load_hf_params(exported, cfg, dtype=dtype), loaded)
    assert "rank 2, alpha 5" in open(os.path.join(exported, "README.md")).read()


def test_lora_metadata_errors(models, tmp_path, tiny_tokenizer_dir):
    source = write_source(models["gqa2_tied"], str(tmp_path / "hf"), "4.x", "float32", tiny_tokenizer_dir)
    cfg = ModelConfig.from_pretrained(source)
    params = hf.load_hf_params(source, cfg)
    with pytest.raises(orbax_model.ModelDirError, match=r"'lora.rank' is 0, expected a positive integer"):
        orbax_model.save_model_dir(str(tmp_path / "x"), params, cfg, assets_from=source,
                                   lora_meta={"rank": 0, "alpha": 1})
    with pytest.raises(orbax_model.ModelDirError, match=r"'lora.merged' is False; only LoRA merged"):
        orbax_model.save_model_dir(str(tmp_path / "x"), params, cfg, assets_from=source,
                                   lora_meta={"rank": 2, "alpha": 1, "merged": False})
    assert not os.path.exists(tmp_path / "x")
    # LoRA already folded in (what the trainer writes): recorded, nothing merged on load
    merged_dir = orbax_model.save_model_dir(str(tmp_path / "merged"), params, cfg, assets_from=source,
                                            lora_meta={"rank": 8, "alpha": 16, "targets": ["q_proj"]})
    meta_path = os.path.join(merged_dir, orbax_model.MODEL_META)
    meta = json.load(open(meta_path))
    assert meta["lora"]["merged"] is True
    assert_trees_bit_equal(orbax_model.load_model_dir(merged_dir)[0], params)
    # a directory claiming unmerged LoRA, or holding a lora/ directory, is refused with a clear message
    json.dump({**meta, "lora": {**meta["lora"], "merged": False}}, open(meta_path, "w"))
    with pytest.raises(orbax_model.ModelDirError, match=r"unite_model\.json: field 'lora.merged' is False"):
        orbax_model.load_model_dir(merged_dir)
    json.dump(meta, open(meta_path, "w"))
    os.makedirs(os.path.join(merged_dir, "lora"))
    with pytest.raises(orbax_model.ModelDirError, match="holds a lora/ directory of unmerged LoRA weights"):
        orbax_model.load_model_dir(merged_dir)


# ------------------------------------------------------------------ sharded arrays, Orbax interoperability
def test_sharded_jax_params_save_and_load_with_shardings(models, tmp_path, tiny_tokenizer_dir):
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding, PartitionSpec

    source = write_source(models["gqa2_tied"], str(tmp_path / "hf"), "4.x", "float32", tiny_tokenizer_dir)
    cfg = ModelConfig.from_pretrained(source)
    params = hf.load_hf_params(source, cfg)
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))

    def spec(x):  # shard the first axis divisible by 8, as FSDP would
        axes = [i for i, d in enumerate(x.shape) if d % 8 == 0]
        parts = [None] * x.ndim
        if axes:
            parts[axes[0]] = "fsdp"
        return NamedSharding(mesh, PartitionSpec(*parts))

    shardings = jax.tree.map(spec, params)
    sharded = jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
               for x in jax.tree.leaves(sharded))
    model_dir = orbax_model.save_model_dir(str(tmp_path / "orbax"), sharded, cfg, assets_from=source)

    host, _, _ = orbax_model.load_model_dir(model_dir)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host))
    assert_trees_bit_equal(host, params)
    placed, cfg_again, _ = orbax_model.load_model_dir(model_dir, dtype="bfloat16", sharding=shardings)
    assert cfg_again == cfg
    for path, leaf in flatten(placed).items():
        assert leaf.sharding == flatten(shardings)[path] and leaf.dtype == jax.numpy.bfloat16, path
        want = flatten(params)[path].astype(ml_dtypes.bfloat16)
        assert np.array_equal(raw_bytes(np.asarray(leaf)), raw_bytes(want)), path
    replicated = NamedSharding(mesh, PartitionSpec())
    one, _, _ = orbax_model.load_model_dir(model_dir, sharding=replicated)
    assert all(x.sharding == replicated for x in jax.tree.leaves(one))

    # params/ is a plain Orbax checkpoint: the trainer's StandardCheckpointer reads it, and writes one we read
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)
    restored = ocp.StandardCheckpointer().restore(os.path.join(model_dir, orbax_model.PARAMS_DIR), abstract)
    assert_trees_bit_equal(jax.tree.map(np.asarray, restored), params)
    shutil.rmtree(os.path.join(model_dir, orbax_model.PARAMS_DIR))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(model_dir, orbax_model.PARAMS_DIR), sharded)
    assert_trees_bit_equal(orbax_model.load_model_dir(model_dir)[0], params)


# ------------------------------------------------------------------ atomic writes, destinations
@pytest.fixture
def small(models, tmp_path, tiny_tokenizer_dir):
    source = write_source(models["gqa2_tied"], str(tmp_path / "hf"), "4.x", "float32", tiny_tokenizer_dir)
    cfg = ModelConfig.from_pretrained(source)
    return source, cfg, hf.load_hf_params(source, cfg)


def test_relative_paths_write_read_and_export(small, tmp_path, monkeypatch):
    """Commands get paths relative to the working directory (the demo's demo_out/...); Orbax itself
    refuses relative paths, so the library resolves them."""
    source, _, params = small
    monkeypatch.chdir(tmp_path)
    model_dir = conversions.hf_to_model_dir(os.path.relpath(source, tmp_path), "orbax_rel")
    assert os.path.isdir(tmp_path / "orbax_rel")
    loaded, _, _ = orbax_model.load_model_dir("orbax_rel")
    assert_trees_bit_equal(loaded, params)
    assert os.path.isdir(conversions.model_dir_to_hf("orbax_rel", "hf_rel"))
    assert model_dir == str(tmp_path / "orbax_rel")


def test_orbax_without_the_deep_copy_option_still_saves(small, tmp_path, monkeypatch):
    """Orbax 0.12.4 (in the project's range) has no NumpyHandler(deepcopy_host_arrays=...)."""
    import orbax.checkpoint as ocp

    class OldNumpyHandler(ocp.type_handlers.NumpyHandler):
        def __init__(self, metadata_key=None):
            super().__init__(metadata_key=metadata_key)

    monkeypatch.setattr(ocp.type_handlers, "NumpyHandler", OldNumpyHandler)
    source, _, params = small
    model_dir = conversions.hf_to_model_dir(source, str(tmp_path / "orbax"))
    loaded, _, _ = orbax_model.load_model_dir(model_dir)
    assert_trees_bit_equal(loaded, params)


def leftovers(directory) -> list[str]:
    return [name for name in os.listdir(directory) if name.startswith(".")]


@pytest.mark.parametrize("fail_at", ["_write_meta", "copy_assets"])
def test_failed_save_leaves_no_directory(small, tmp_path, monkeypatch, fail_at):
    source, cfg, params = small
    out = tmp_path / "out"

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(orbax_model, fail_at, boom)
    with pytest.raises(RuntimeError, match="disk full"):
        orbax_model.save_model_dir(str(out), params, cfg, assets_from=source)
    assert not out.exists() and leftovers(tmp_path) == []
    # replacing an existing model directory: a failure keeps the old one intact
    monkeypatch.undo()
    orbax_model.save_model_dir(str(out), params, cfg, assets_from=source, source="first")
    monkeypatch.setattr(orbax_model, fail_at, boom)
    with pytest.raises(RuntimeError, match="disk full"):
        orbax_model.save_model_dir(str(out), params, cfg, assets_from=source, source="second", overwrite=True)
    assert json.load(open(out / orbax_model.MODEL_META))["source"] == "first"
    assert leftovers(tmp_path) == []


def test_failed_export_leaves_no_directory(small, tmp_path, monkeypatch):
    source, cfg, params = small
    model_dir = orbax_model.save_model_dir(str(tmp_path / "orbax"), params, cfg, assets_from=source)
    calls = []

    def fail_on_second_tensor(original):
        def read(self, path):
            calls.append(path)
            if len(calls) == 2:
                raise RuntimeError("read error")
            return original(self, path)
        return read

    monkeypatch.setattr(orbax_io.LeafReader, "get", fail_on_second_tensor(orbax_io.LeafReader.get))
    with pytest.raises(RuntimeError, match="read error"):
        conversions.model_dir_to_hf(model_dir, str(tmp_path / "export"))
    assert not (tmp_path / "export").exists() and leftovers(tmp_path) == []


def test_non_empty_destination_is_refused_unless_overwrite(small, tmp_path):
    source, cfg, params = small
    out = tmp_path / "out"
    out.mkdir()
    orbax_model.save_model_dir(str(out), params, cfg, assets_from=source)  # an empty directory is fine
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"out is not empty .*notes\.txt.*--overwrite"):
        orbax_model.save_model_dir(str(out), params, cfg, assets_from=source)
    with pytest.raises(FileExistsError, match="not empty"):
        conversions.hf_to_model_dir(source, str(out))
    export = tmp_path / "export"
    export.mkdir()
    (export / "x").write_text("")
    with pytest.raises(FileExistsError, match="not empty"):
        conversions.model_dir_to_hf(str(out), str(export))
    orbax_model.save_model_dir(str(out), params, cfg, assets_from=source, overwrite=True)
    assert not (out / "notes.txt").exists() and orbax_model.is_model_dir(str(out))
    conversions.model_dir_to_hf(str(out), str(export), overwrite=True)
    assert not (export / "x").exists() and orbax_model.is_hf_dir(str(export))
    with pytest.raises(orbax_model.ModelDirError, match="would destroy the source"):
        conversions.model_dir_to_hf(str(out), str(out), overwrite=True)
    with pytest.raises(orbax_model.ModelDirError, match="would destroy the source"):
        conversions.hf_to_model_dir(source, str(tmp_path), overwrite=True)  # the parent of the source
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------ errors
def test_wrong_or_incomplete_directories_are_named(small, tmp_path):
    source, cfg, params = small
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: not an Orbax model directory .*unite_model\.json.*"
                                                r"model/unite_model\.json.*nothing \(empty\)"):
        orbax_model.resolve_model_dir(str(empty))
    with pytest.raises(FileNotFoundError, match=r"hf: not an Orbax model directory .*holds \[config\.json"):
        orbax_model.load_model_dir(source)
    with pytest.raises(FileNotFoundError, match="nowhere: no such directory"):
        orbax_model.resolve_model_dir(str(tmp_path / "nowhere"))
    with pytest.raises(orbax_model.ModelDirError, match=r"neither format.*config\.json and \*\.safetensors.*"
                                                        r"unite_model\.json and params/"):
        conversions.conversion_direction(str(empty))
    assert conversions.conversion_direction(source) == "hf_to_orbax"

    model_dir = orbax_model.save_model_dir(str(tmp_path / "m"), params, cfg, assets_from=source)
    assert conversions.conversion_direction(model_dir) == "orbax_to_hf"
    meta_path = os.path.join(model_dir, orbax_model.MODEL_META)
    good = open(meta_path).read()
    open(meta_path, "w").write(good[:40])
    with pytest.raises(orbax_model.ModelDirError, match=r"unite_model\.json: line \d+: invalid JSON"):
        orbax_model.load_model_dir(model_dir)
    meta = json.loads(good)
    for field, value, message in [("format", "something-else", "field 'format' is 'something-else'"),
                                  ("version", 7, "field 'version' is 7"),
                                  ("config", None, "field 'config' is missing")]:
        json.dump({**meta, field: value}, open(meta_path, "w"))
        with pytest.raises(orbax_model.ModelDirError, match=re.escape(message)):
            orbax_model.load_model_dir(model_dir)
    wrong_depth = copy.deepcopy(meta)
    wrong_depth["config"]["text_config"]["intermediate_size"] = 100
    json.dump(wrong_depth, open(meta_path, "w"))
    with pytest.raises(orbax_model.ModelDirError,
                       match=r"(?s)params: parameter shapes do not match.*model/layers/mlp/down_proj/kernel: "
                             r"shape \[2, 112, 64\], expected \[2, 100, 64\]"):
        orbax_model.load_model_dir(model_dir)
    json.dump(meta, open(meta_path, "w"))
    shutil.rmtree(os.path.join(model_dir, orbax_model.PARAMS_DIR))
    with pytest.raises(orbax_model.ModelDirError, match=r"m/params: missing"):
        orbax_model.load_model_dir(model_dir)
    os.makedirs(os.path.join(model_dir, orbax_model.PARAMS_DIR))
    with pytest.raises(orbax_model.ModelDirError, match=r"m/params: not a complete Orbax checkpoint"):
        orbax_model.load_model_dir(model_dir)


def test_mismatched_or_missing_tokenizer_is_an_error(small, tmp_path):
    source, cfg, params = small
    mismatched = tmp_path / "mismatched"
    shutil.copytree(source, mismatched)
    config = json.load(open(mismatched / "config.json"))
    config["image_token_id"] = 9  # the tokenizer's <|image_pad|> is 5: tokenizer of another model
    json.dump(config, open(mismatched / "config.json", "w"))
    with pytest.raises(ValueError, match=r"tokenizer\.json: <\|image_pad\|>/<\|video_pad\|> ids are 5/6 but "
                                         r"the model config expects 9/6"):
        conversions.hf_to_model_dir(str(mismatched), str(tmp_path / "a"))
    small_vocab = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=300))
    with pytest.raises(orbax_model.ModelDirError, match="tokenizer has 512 tokens but the model's embedding has 300"):
        orbax_model.check_tokenizer(source, small_vocab)
    assert not os.path.exists(tmp_path / "a")

    bare = orbax_model.save_model_dir(str(tmp_path / "bare"), params, cfg, assets_from=None)
    with pytest.raises(orbax_model.ModelDirError, match=r"bare: no tokenizer\.json; exporting needs"):
        conversions.model_dir_to_hf(bare, str(tmp_path / "export"))
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        Embedder.from_pretrained(bare)
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(source, no_tokenizer)
    os.remove(no_tokenizer / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match=r"no_tokenizer: no tokenizer\.json"):
        conversions.hf_to_model_dir(str(no_tokenizer), str(tmp_path / "b"))
