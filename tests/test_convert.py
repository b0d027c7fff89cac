"""Hugging Face checkpoint I/O: our safetensors reader/writer and the name table, against transformers.

The reference tree is built here from torch's `state_dict()` by an independent
rule (regex on the names, transposes decided by tensor rank), so a wrong entry
in the library's name table cannot cancel out.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct

import hf_reference
import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from helpers import assert_trees_bit_equal, flatten, raw_bytes

from unite_jax.convert import hf
from unite_jax.convert import safetensors_io as st
from unite_jax.model.config import ModelConfig
from unite_jax.model.params import param_shapes

VARIANTS = ("gqa2_tied", "gqa4_untied")


# ------------------------------------------------------------------ fixtures and helpers
@pytest.fixture(scope="module", params=VARIANTS)
def reference(request, tmp_path_factory, tiny_tokenizer_dir):
    """(variant, torch model, checkpoint directory written by save_pretrained)."""
    model = hf_reference.hf_model(request.param)
    directory = str(tmp_path_factory.mktemp(request.param))
    hf_reference.save_hf_dir(model, directory, tokenizer_dir=tiny_tokenizer_dir)
    return request.param, model, directory


@pytest.fixture(scope="module")
def untied(tmp_path_factory, tiny_tokenizer_dir):
    model = hf_reference.hf_model("gqa4_untied", seed=1)
    directory = str(tmp_path_factory.mktemp("untied"))
    hf_reference.save_hf_dir(model, directory, tokenizer_dir=tiny_tokenizer_dir)
    return model, directory


def numpy_state(model, dtype=torch.float32) -> dict[str, np.ndarray]:
    """state_dict as numpy; bfloat16 goes through its bit pattern (numpy has no torch bf16)."""
    out = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to(dtype)
        if dtype == torch.bfloat16:
            out[name] = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[name] = tensor.numpy().copy()
    return out


def expected_tree(state: dict[str, np.ndarray], tied: bool) -> dict[str, np.ndarray]:
    """Flat {"a/b/c": array} of our layout, derived from torch names (5.x in-memory layout)."""
    layered: dict[str, dict[int, np.ndarray]] = {}
    flat: dict[str, np.ndarray] = {}
    for name, value in state.items():
        if name == "lm_head.weight" and tied:
            continue
        name = re.sub(r"^model\.visual\.", "visual.", name)
        name = re.sub(r"^model\.language_model\.", "model.", name)
        parts = name.split(".")
        if "embed_tokens" in parts:
            parts[-1], leaf = "embedding", value
        elif value.ndim == 5:  # Conv3d [E, C, T, P, P] -> [C*T*P*P, E]
            parts[-1], leaf = "kernel", value.reshape(value.shape[0], -1).T
        elif value.ndim == 2:  # Linear [out, in] -> [in, out]
            parts[-1], leaf = "kernel", value.T
        else:
            leaf = value
        if parts[1] in ("blocks", "layers"):
            layer = int(parts.pop(2))
            layered.setdefault("/".join(parts), {})[layer] = leaf
        else:
            flat["/".join(parts)] = leaf
    for path, rows in layered.items():
        flat[path] = np.stack([rows[i] for i in range(len(rows))])
    return flat


def assert_trees_equal(actual, expected: dict[str, np.ndarray]):
    """`actual` (a nested tree) leaf for leaf, bit for bit, against `expected` keyed by "a/b/c" paths."""
    assert_trees_bit_equal(flatten(actual), expected)


def assert_state_dicts_equal(model_a, model_b, dtype=torch.float32):
    a, b = model_a.state_dict(), model_b.state_dict()
    assert sorted(a) == sorted(b)
    for name in a:
        x, y = a[name].detach().to(dtype), b[name].detach()
        assert y.dtype == dtype, name
        assert torch.equal(x.view(torch.int16) if dtype == torch.bfloat16 else x,
                           y.view(torch.int16) if dtype == torch.bfloat16 else y), name


def load_transformers(directory, dtype=torch.float32):
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(directory, dtype=dtype, attn_implementation="eager")


def copy_without_weights(src: str, dst: str) -> str:
    """The checkpoint directory's non-weight files (config.json, tokenizer, ...) in dst."""
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if not name.endswith(".safetensors") and not name.endswith(".index.json"):
            shutil.copy(os.path.join(src, name), dst)
    return dst


def rewrite_weights(src: str, dst: str, edit) -> str:
    """A copy of a single-file checkpoint whose tensors dict went through edit(tensors) -> tensors."""
    copy_without_weights(src, dst)
    tensors = st.load_file(os.path.join(src, st.SINGLE_FILE))
    st.save_file(edit(tensors), os.path.join(dst, st.SINGLE_FILE))
    return dst


# ------------------------------------------------------------------ loading
def test_load_matches_torch_state_dict(reference):
    variant, model, directory = reference
    cfg, params = hf.load_hf(directory)
    assert jax.tree.map(lambda a: a.shape, params) == param_shapes(cfg)
    assert ("lm_head" in params) == (not hf_reference.VARIANTS[variant]["tied"])
    assert_trees_equal(params, expected_tree(numpy_state(model), cfg.text.tie_word_embeddings))


def test_load_casts_to_bfloat16(reference):
    variant, model, directory = reference
    cfg = ModelConfig.from_pretrained(directory)
    params = hf.load_hf_params(directory, cfg, dtype="bfloat16")
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}
    # numpy's float32 -> bfloat16 cast and torch's both round to nearest even.
    assert_trees_equal(params, expected_tree(numpy_state(model, torch.bfloat16), cfg.text.tie_word_embeddings))


def test_load_5x_layout(reference, tmp_path):
    """A checkpoint keyed like transformers 5.x modules (including a tied model's lm_head copy)."""
    from safetensors.numpy import save_file

    variant, model, directory = reference
    state = numpy_state(model)
    assert any(k.startswith("model.language_model.") for k in state)  # the 5.x in-memory names
    if hf_reference.VARIANTS[variant]["tied"]:
        assert "lm_head.weight" in state  # present in the file, must be ignored
    out = copy_without_weights(directory, str(tmp_path / "v5"))
    save_file(state, os.path.join(out, st.SINGLE_FILE), metadata={"format": "pt"})
    assert hf.detect_layout(st.Checkpoint(out).names()) == "5.x"
    assert hf.detect_layout(st.Checkpoint(directory).names()) == "4.x"
    cfg, params = hf.load_hf(out)
    _, params_4x = hf.load_hf(directory)
    assert_trees_equal(params, flatten(params_4x))


def test_hf_tensors_are_what_save_pretrained_writes(reference):
    _, _, directory = reference
    cfg, params = hf.load_hf(directory)
    written = st.load_file(os.path.join(directory, st.SINGLE_FILE))
    ours = dict(hf.hf_tensors(params, cfg))
    assert sorted(ours) == sorted(written)
    for name, value in written.items():
        assert ours[name].flags.c_contiguous, name
        assert np.array_equal(ours[name], value), name


# ------------------------------------------------------------------ saving
def test_round_trip_float32(reference, tmp_path):
    _, model, directory = reference
    cfg, params = hf.load_hf(directory)
    files = hf.save_hf_params(params, cfg, str(tmp_path))
    assert files == [st.SINGLE_FILE, "config.json"]
    config = json.load(open(tmp_path / "config.json"))
    assert config["dtype"] == config["torch_dtype"] == "float32"
    _, again = hf.load_hf(str(tmp_path))
    assert_trees_equal(again, flatten(params))
    assert_state_dicts_equal(model, load_transformers(str(tmp_path)))


def test_round_trip_bfloat16(reference, tmp_path):
    _, model, directory = reference
    cfg, params = hf.load_hf(directory, dtype="bfloat16")
    hf.save_hf_params(params, cfg, str(tmp_path))
    assert json.load(open(tmp_path / "config.json"))["dtype"] == "bfloat16"
    header, _ = st.read_header(str(tmp_path / st.SINGLE_FILE))
    assert {info.dtype for info in header.values()} == {np.dtype(ml_dtypes.bfloat16)}
    _, again = hf.load_hf(str(tmp_path), dtype="bfloat16")
    assert_trees_equal(again, flatten(params))
    assert_state_dicts_equal(model, load_transformers(str(tmp_path), torch.bfloat16), torch.bfloat16)


def test_sharded_save_and_load(untied, tmp_path):
    model, directory = untied
    cfg, params = hf.load_hf(directory)
    specs = hf.hf_tensor_specs(params, cfg)
    largest = max(s.nbytes for s in specs)
    total = sum(s.nbytes for s in specs)
    out = str(tmp_path / "sharded")
    files = hf.save_hf_params(params, cfg, out, max_shard_bytes=largest)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert st.INDEX_FILE in files and st.SINGLE_FILE not in os.listdir(out)
    index = json.load(open(os.path.join(out, st.INDEX_FILE)))
    assert index["metadata"]["total_size"] == total
    assert sorted(index["weight_map"]) == sorted(s.name for s in specs)
    for shard in shards:
        assert os.path.getsize(os.path.join(out, shard)) - 8 <= largest + 4096  # data <= limit (+ header)
    _, again = hf.load_hf(out)
    assert_trees_equal(again, flatten(params))
    assert_state_dicts_equal(model, load_transformers(out))
    # Saving unsharded into the same directory removes the earlier shards and index.
    assert hf.save_hf_params(params, cfg, out) == [st.SINGLE_FILE, "config.json"]
    assert not [f for f in os.listdir(out) if f.startswith("model-") or f == st.INDEX_FILE]
    assert_trees_equal(hf.load_hf(out)[1], flatten(params))


def test_save_accepts_jax_arrays(untied, tmp_path):
    _, directory = untied
    cfg, params = hf.load_hf(directory)
    on_device = jax.tree.map(jax.numpy.asarray, params)
    assert isinstance(jax.tree.leaves(on_device)[0], jax.Array)
    hf.save_hf_params(on_device, cfg, str(tmp_path))
    assert_trees_equal(hf.load_hf(str(tmp_path))[1], flatten(params))


def test_save_rejects_a_wrong_tree(untied, tmp_path):
    _, directory = untied
    cfg, params = hf.load_hf(directory)
    params["model"]["norm"]["weight"] = np.zeros(3, np.float32)
    with pytest.raises(hf.CheckpointError, match=r"model/norm/weight: shape \[3\], expected \[96\]"):
        hf.save_hf_params(params, cfg, str(tmp_path))
    del params["model"]["norm"]
    with pytest.raises(hf.CheckpointError, match="missing .*model/norm/weight"):
        hf.save_hf_params(params, cfg, str(tmp_path))


# ------------------------------------------------------------------ checkpoint errors
def test_missing_tensor_is_named(untied, tmp_path):
    _, directory = untied
    name = "model.layers.1.self_attn.k_proj.bias"
    out = rewrite_weights(directory, str(tmp_path / "ckpt"), lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(hf.CheckpointError) as err:
        hf.load_hf(out)
    assert name in str(err.value) and out in str(err.value) and "missing" in str(err.value)


def test_wrong_shape_is_named(untied, tmp_path):
    _, directory = untied
    name = "visual.blocks.2.mlp.fc1.weight"

    def edit(tensors):
        tensors[name] = np.zeros((95, 48), np.float32)
        return tensors

    out = rewrite_weights(directory, str(tmp_path / "ckpt"), edit)
    with pytest.raises(hf.CheckpointError) as err:
        hf.load_hf(out)
    message = str(err.value)
    assert name in message and os.path.join(out, st.SINGLE_FILE) in message
    assert "[95, 48]" in message and "[96, 48]" in message


def test_unexpected_tensor_is_reported_but_rotary_buffers_are_not(untied, tmp_path):
    _, directory = untied

    def add(extra):
        return lambda tensors: {**tensors, extra: np.ones(4, np.float32)}

    harmless = rewrite_weights(directory, str(tmp_path / "a"), add("model.layers.0.self_attn.rotary_emb.inv_freq"))
    assert_trees_equal(hf.load_hf(harmless)[1], flatten(hf.load_hf(directory)[1]))
    odd = rewrite_weights(directory, str(tmp_path / "b"), add("model.layers.0.self_attn.extra.weight"))
    with pytest.raises(hf.CheckpointError, match=r"unexpected.*model\.layers\.0\.self_attn\.extra\.weight"):
        hf.load_hf(odd)


def test_tied_model_rejects_wrong_shaped_lm_head(reference, tmp_path):
    variant, _, directory = reference
    if not hf_reference.VARIANTS[variant]["tied"]:
        # The untied model needs its lm_head: dropping it must be reported as missing.
        out = rewrite_weights(directory, str(tmp_path / "c"),
                              lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"})
        with pytest.raises(hf.CheckpointError, match="missing.*lm_head.weight"):
            hf.load_hf(out)
        return
    out = rewrite_weights(directory, str(tmp_path / "c"),
                          lambda t: {**t, "lm_head.weight": np.zeros((7, 64), np.float32)})
    with pytest.raises(hf.CheckpointError, match="unexpected.*lm_head.weight"):
        hf.load_hf(out)


def test_truncated_file_is_named(untied, tmp_path):
    _, directory = untied
    out = copy_without_weights(directory, str(tmp_path / "ckpt"))
    path = os.path.join(out, st.SINGLE_FILE)
    data = open(os.path.join(directory, st.SINGLE_FILE), "rb").read()
    with open(path, "wb") as f:
        f.write(data[:-100])
    with pytest.raises(st.SafetensorsError, match=re.escape(path) + ".*truncated"):
        hf.load_hf(out)
    with open(path, "wb") as f:
        f.write(data[:200])  # cut inside the header
    with pytest.raises(st.SafetensorsError, match=re.escape(path) + ".*header length .* beyond the file size"):
        hf.load_hf(out)
    with open(path, "wb") as f:
        f.write(data[:5])
    with pytest.raises(st.SafetensorsError, match=re.escape(path) + ".*truncated"):
        st.read_header(path)


def test_missing_config_and_files_are_named(untied, tmp_path):
    _, directory = untied
    no_config = str(tmp_path / "no_config")
    os.makedirs(no_config)
    shutil.copy(os.path.join(directory, st.SINGLE_FILE), no_config)
    with pytest.raises(FileNotFoundError, match=re.escape(no_config) + ".*config.json"):
        hf.load_hf(no_config)
    no_weights = copy_without_weights(directory, str(tmp_path / "no_weights"))
    with pytest.raises(FileNotFoundError, match=re.escape(no_weights) + ".*safetensors"):
        hf.load_hf(no_weights)
    missing = str(tmp_path / "nothing.safetensors")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        st.read_header(missing)


def test_index_naming_a_missing_shard_is_reported(untied, tmp_path):
    _, directory = untied
    cfg, params = hf.load_hf(directory)
    out = str(tmp_path / "sharded")
    files = hf.save_hf_params(params, cfg, out, max_shard_bytes=50_000)
    os.remove(os.path.join(out, files[1]))
    with pytest.raises(FileNotFoundError, match=re.escape(st.INDEX_FILE) + ".*" + re.escape(files[1])):
        hf.load_hf(out)


# ------------------------------------------------------------------ safetensors format
def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(4, 2, generator=g).half(),
        "bf16": torch.randn(2, 3, 7, generator=g).bfloat16(),
        "f64": torch.randn(6, generator=g).double(),
        "i64": torch.arange(-5, 7, dtype=torch.int64).reshape(3, 4),
        "i32": torch.tensor([-(2**31), 0, 2**31 - 1], dtype=torch.int32),
        "i8": torch.tensor([-128, -1, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 1, 255], dtype=torch.uint8),
        "bool": torch.tensor([[True, False], [False, True]]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def test_reader_matches_safetensors_package(tmp_path):
    from safetensors.torch import save_file

    tensors = mixed_tensors()
    path = str(tmp_path / "mixed.safetensors")
    save_file(tensors, path, metadata={"format": "pt", "note": "mixed"})
    header, metadata = st.read_header(path)
    assert metadata == {"format": "pt", "note": "mixed"}
    ours = st.load_file(path)
    assert sorted(ours) == sorted(tensors)
    for name, tensor in tensors.items():
        expected = as_numpy(tensor)
        assert ours[name].dtype == expected.dtype and ours[name].shape == expected.shape, name
        assert np.array_equal(raw_bytes(ours[name]), raw_bytes(expected)), name
        mapped = st.read_tensor(header[name])  # the lazy path gives the same values
        assert np.array_equal(raw_bytes(mapped), raw_bytes(expected)), name


def test_writer_is_read_by_safetensors_package(tmp_path):
    from safetensors import safe_open

    tensors = mixed_tensors()
    path = str(tmp_path / "ours.safetensors")
    size = st.save_file({k: as_numpy(v) for k, v in tensors.items()}, path)
    assert size == sum(t.numel() * t.element_size() for t in tensors.values())
    assert os.listdir(tmp_path) == ["ours.safetensors"]  # no temporary file left behind
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            loaded = f.get_tensor(name)
            assert loaded.dtype == tensor.dtype and loaded.shape == tensor.shape, name
            assert torch.equal(loaded, tensor), name
    # The header is padded so tensor data starts 8-byte aligned, as the reference writer does.
    (header_len,) = struct.unpack("<Q", open(path, "rb").read(8))
    assert header_len % 8 == 0


def test_unknown_dtype_and_bad_offsets_are_named(tmp_path):
    def write(path, header, data=b"\0" * 8):
        raw = json.dumps(header).encode()
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw + data)
        return str(path)

    bad = write(tmp_path / "bad_dtype.safetensors", {"x": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}})
    with pytest.raises(st.SafetensorsError, match=re.escape(bad) + r".*'x'.*unknown dtype 'Q7'"):
        st.read_header(bad)
    short = write(tmp_path / "short.safetensors", {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})
    with pytest.raises(st.SafetensorsError, match=re.escape(short) + r".*'x'.*needs 12"):
        st.read_header(short)
    with pytest.raises(st.SafetensorsError, match="cannot be stored"):
        st.save_file({"c": np.zeros(2, np.complex64)}, str(tmp_path / "complex.safetensors"))


def test_failed_write_leaves_previous_file_intact(tmp_path):
    path = str(tmp_path / "model.safetensors")
    st.save_file({"a": np.arange(4, dtype=np.float32)}, path)
    before = open(path, "rb").read()

    def fail():
        raise RuntimeError("device lost")

    items = [st.pending("a", np.zeros(4, np.float32)), st.PendingTensor("b", (2,), np.dtype(np.float32), fail)]
    with pytest.raises(RuntimeError, match="device lost"):
        st.save_file(items, path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]
    wrong = [st.PendingTensor("a", (3,), np.dtype(np.float32), lambda: np.zeros(4, np.float32))]
    with pytest.raises(st.SafetensorsError, match=r"'a': announced float32\[3\], got float32\[4\]"):
        st.save_file(wrong, path)


def test_plan_shards_respects_the_limit():
    sizes = [10, 30, 25, 70, 5, 5, 100]
    items = [st.PendingTensor(f"t{i}", (n,), np.dtype(np.uint8), lambda: None) for i, n in enumerate(sizes)]
    shards = st.plan_shards(items, 50)
    assert [[t.nbytes for t in s] for s in shards] == [[10, 30], [25], [70], [5, 5], [100]]
    assert [t.name for s in shards for t in s] == [t.name for t in items]  # order kept
    assert st.shard_name(0, 3) == "model-00001-of-00003.safetensors"
