"""Parity of the JAX vision tower, text model and M-RoPE positions with transformers (PyTorch, float32)."""

import hf_reference
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.vision_utils import get_vision_position_ids

from unite_jax.convert.hf import load_hf_params
from unite_jax.data.packing import PackableInput, mrope_positions
from unite_jax.model.config import ModelConfig
from unite_jax.model.options import RunOptions
from unite_jax.model.text import text_model
from unite_jax.model.vision import vision_tower

TOL = 1e-5
RUN = RunOptions()  # float32, XLA attention, no remat
VARIANTS = sorted(hf_reference.VARIANTS)


@pytest.fixture(scope="module", params=VARIANTS)
def loaded(request, tmp_path_factory):
    """(variant, torch model, ModelConfig, params loaded from its saved directory)."""
    model = hf_reference.hf_model(request.param, seed=1)
    directory = hf_reference.save_hf_dir(model, str(tmp_path_factory.mktemp(request.param)))
    cfg = ModelConfig.from_pretrained(directory)
    return request.param, model, cfg, load_hf_params(directory, cfg)


def _pack_vision(grids, patches, pad_to):
    """One packed row: a segment per (media, temporal slice), -1 padding at the end."""
    segments, positions, next_id = [], [], 0
    for t, h, w in grids:
        segments.append(next_id + np.repeat(np.arange(t), h * w))
        next_id += t
    positions = get_vision_position_ids(torch.tensor(grids), 2).numpy()
    n = patches.shape[0]
    segment_ids = np.full(pad_to, -1, np.int32)
    segment_ids[:n] = np.concatenate(segments)
    row = np.zeros((pad_to, patches.shape[1]), np.float32)
    row[:n] = patches
    pos = np.zeros((pad_to, 2), np.int32)
    pos[:n] = positions
    return row[None], segment_ids[None], pos[None]


def test_vision_tower_packed_row_matches_transformers(loaded):
    _, model, cfg, params = loaded
    # three images of different grids and a video of three temporal slices in one packed row
    grids = [(1, 4, 6), (1, 8, 4), (1, 2, 2), (3, 4, 2)]
    n = sum(t * h * w for t, h, w in grids)
    pixel_values = np.random.default_rng(0).standard_normal((n, cfg.vision.patch_dim)).astype(np.float32)
    with torch.no_grad():
        expected = model.model.visual(torch.tensor(pixel_values), grid_thw=torch.tensor(grids)).pooler_output.numpy()
    row, segment_ids, positions = _pack_vision(grids, pixel_values, n + 16)
    got = np.asarray(vision_tower(params["visual"], row, segment_ids, positions, cfg, RUN))[0, : n // 4]
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=TOL)


def test_vision_tower_is_block_diagonal(loaded):
    """An image's merged tokens do not depend on what else is packed in the row."""
    _, _, cfg, params = loaded
    rng = np.random.default_rng(1)
    alone = rng.standard_normal((16, cfg.vision.patch_dim)).astype(np.float32)
    other = rng.standard_normal((24, cfg.vision.patch_dim)).astype(np.float32)
    row_a = _pack_vision([(1, 4, 4)], alone, 16)
    row_b = _pack_vision([(1, 4, 6), (1, 4, 4)], np.concatenate([other, alone]), 48)
    out_a = np.asarray(vision_tower(params["visual"], *row_a, cfg, RUN))[0, :4]
    out_b = np.asarray(vision_tower(params["visual"], *row_b, cfg, RUN))[0, 6:10]
    np.testing.assert_allclose(out_a, out_b, atol=TOL, rtol=TOL)


def test_text_model_left_padding_sequential_positions(loaded):
    _, model, cfg, params = loaded
    rng = np.random.default_rng(2)
    batch, seq = 3, 14
    ids = rng.integers(7, cfg.text.vocab_size, (batch, seq))
    mask = np.ones((batch, seq), np.int64)
    mask[0, :6] = 0
    mask[1, :1] = 0
    with torch.no_grad():
        embeds = model.model.language_model.embed_tokens(torch.tensor(ids))
        expected = model.model.language_model(inputs_embeds=embeds, attention_mask=torch.tensor(mask),
                                              position_ids=None).last_hidden_state.numpy()
    positions = np.broadcast_to(np.arange(seq)[None, None], (batch, 3, seq))
    got = np.asarray(text_model(params["model"], embeds.numpy(), mask, positions, cfg, RUN))
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], expected[valid], atol=TOL, rtol=TOL)


def _image_prompt_ids(cfg, text_before, grid, text_after):
    pads = grid[0] * grid[1] * grid[2] // 4
    ids = np.concatenate([text_before, [cfg.vision_start_token_id], np.full(pads, cfg.image_token_id),
                          [cfg.vision_end_token_id], text_after]).astype(np.int64)
    return ids, (len(text_before) + 1, pads)


def test_mrope_positions_match_get_rope_index_and_language_model(loaded):
    _, model, cfg, params = loaded
    rng = np.random.default_rng(3)
    grids = [(1, 4, 6), (1, 8, 2)]
    rows, items = [], []
    for grid, (before, after) in zip(grids, [(3, 5), (7, 2)]):
        ids, run = _image_prompt_ids(cfg, rng.integers(7, 300, before), grid, rng.integers(7, 300, after))
        rows.append(ids)
        n = grid[0] * grid[1] * grid[2]
        items.append(PackableInput(ids.astype(np.int32), [np.zeros((n, 1), np.float32)], [grid], [run]))
    seq = max(len(r) for r in rows) + 2
    input_ids = np.zeros((len(rows), seq), np.int64)
    mask = np.zeros((len(rows), seq), np.int64)
    for i, r in enumerate(rows):
        input_ids[i, seq - len(r):] = r
        mask[i, seq - len(r):] = 1
    token_type = (input_ids == cfg.image_token_id).astype(np.int64)
    with torch.no_grad():
        expected_pos, _ = model.model.get_rope_index(torch.tensor(input_ids), torch.tensor(token_type),
                                                     image_grid_thw=torch.tensor(grids),
                                                     attention_mask=torch.tensor(mask))
    expected_pos = expected_pos.numpy()  # [3, batch, seq]
    ours = np.zeros((len(rows), 3, seq), np.int32)
    for i, item in enumerate(items):
        ours[i, :, seq - item.num_tokens:] = mrope_positions(item, 2)
        np.testing.assert_array_equal(ours[i, :, mask[i] == 1], expected_pos[:, i, mask[i] == 1].T)
    embeds = torch.tensor(np.random.default_rng(4).standard_normal((len(rows), seq, cfg.hidden_size)),
                          dtype=torch.float32)
    with torch.no_grad():
        expected = model.model.language_model(inputs_embeds=embeds, attention_mask=torch.tensor(mask),
                                              position_ids=torch.tensor(expected_pos)).last_hidden_state.numpy()
    got = np.asarray(text_model(params["model"], embeds.numpy(), mask, ours, cfg, RUN.replace(positions="mrope")))
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], expected[valid], atol=TOL, rtol=TOL)


def test_mrope_video_continues_after_block_maximum():
    """A video with more temporal slices than its merged height/width: text resumes at max position + 1."""
    grid = (5, 4, 4)  # merged 5 x 2 x 2: temporal reaches start + 4
    ids = np.arange(2 + 20 + 3, dtype=np.int32)
    item = PackableInput(ids, [np.zeros((80, 1), np.float32)], [grid], [(2, 20)])
    pos = mrope_positions(item, 2)
    np.testing.assert_array_equal(pos[:, :2], [[0, 1]] * 3)
    np.testing.assert_array_equal(pos[0, 2:22], 2 + np.repeat(np.arange(5), 4))
    np.testing.assert_array_equal(pos[1, 2:6], 2 + np.array([0, 0, 1, 1]))
    np.testing.assert_array_equal(pos[2, 2:6], 2 + np.array([0, 1, 0, 1]))
    np.testing.assert_array_equal(pos[:, 22:], [[7, 8, 9]] * 3)


def test_config_reads_flat_and_nested_layouts(loaded):
    _, model, cfg, _ = loaded
    nested = model.config.to_dict()
    flat = {k: v for k, v in nested.items() if k != "text_config"}
    flat.update({k: v for k, v in nested["text_config"].items() if k not in ("rope_parameters", "model_type")})
    flat["rope_theta"] = nested["text_config"]["rope_parameters"]["rope_theta"]
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": nested["text_config"]["rope_parameters"]["mrope_section"]}
    assert ModelConfig.from_hf_dict(flat) == cfg
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    assert cfg.text.num_kv_heads == hf_reference.VARIANTS[loaded[0]]["kv"]
    assert cfg.text.tie_word_embeddings == hf_reference.VARIANTS[loaded[0]]["tied"]


@pytest.mark.parametrize("name,hf_text,hf_vision,tied", [
    ("2b", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6), dict(hidden_size=1536), True),
    ("7b", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6), dict(hidden_size=3584), False),
])
def test_presets_have_the_published_parameter_count(name, hf_text, hf_vision, tied):
    """Our tree for the 2B/7B presets holds exactly the tensors transformers builds for Qwen2-VL."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from unite_jax.model.config import preset
    from unite_jax.model.params import param_shapes

    config = Qwen2VLConfig(text_config=dict(hf_text, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                      "mrope_section": [16, 24, 24]}),
                           vision_config=hf_vision, tie_word_embeddings=tied)
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(config)
    expected = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    shapes = jax.tree.leaves(param_shapes(preset(name)), is_leaf=lambda x: isinstance(x, tuple))
    assert sum(int(np.prod(s)) for s in shapes) == expected
    assert ModelConfig.from_hf_dict(config.to_dict()).replace() == preset(name)


def test_remat_and_unrolled_layers_compute_the_same(loaded):
    _, _, cfg, params = loaded
    rng = np.random.default_rng(5)
    embeds = rng.standard_normal((2, 9, cfg.hidden_size)).astype(np.float32)
    mask = np.ones((2, 9), np.int32)
    positions = np.broadcast_to(np.arange(9)[None, None], (2, 3, 9))
    base = np.asarray(text_model(params["model"], embeds, mask, positions, cfg, RUN))
    for variant in (RUN.replace(remat="full"), RUN.replace(remat="dots"), RUN.replace(scan_layers=False)):
        # same math; XLA may fuse the unrolled and scanned forms differently (float32 rounding only)
        np.testing.assert_allclose(np.asarray(text_model(params["model"], embeds, mask, positions, cfg, variant)),
                                   base, atol=1e-5, rtol=1e-5)
    grad = lambda run: jax.grad(lambda p: jnp.sum(text_model(p, embeds, mask, positions, cfg, run)[:, -1]))(
        params["model"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), grad(RUN),
                 grad(RUN.replace(remat="full")))


def test_bfloat16_compute_stays_close_to_float32(loaded):
    """bf16 matmuls (norms, softmax and rotary in float32) keep the embedding direction: cosine > 0.99."""
    from unite_jax.model.embedder import embed

    _, _, cfg, params = loaded
    rng = np.random.default_rng(6)
    seq, n_patch = 12, 16
    batch = {
        "input_ids": rng.integers(7, 300, (2, seq)).astype(np.int32),
        "attention_mask": np.ones((2, seq), np.int32),
        "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int32), (2, 3, seq)).copy(),
        "patches": rng.standard_normal((1, n_patch, cfg.vision.patch_dim)).astype(np.float32),
        "patch_segment_ids": np.zeros((1, n_patch), np.int32),
        "patch_positions": vision_positions(1, 4, 4),
        "merged_dest": np.array([[3, 4, 5, 6]], np.int32),
    }
    f32 = np.asarray(embed(params, batch, cfg, RUN))
    bf16_params = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
    bf16 = np.asarray(embed(bf16_params, batch, cfg, RUN.replace(compute_dtype="bfloat16", param_dtype="bfloat16")))
    assert bf16.dtype == np.float32
    cosine = np.sum(f32 * bf16, axis=-1)
    assert (cosine > 0.99).all(), cosine
    assert np.abs(f32 - bf16).max() > 0  # it really ran in a lower precision


def vision_positions(t, h, w):
    return get_vision_position_ids(torch.tensor([[t, h, w]]), 2).numpy()[None].astype(np.int32)


def test_tiny_preset_token_ids_are_the_tiny_tokenizers(tiny_tokenizer_dir):
    """The tiny preset spells its vocabulary size and special-token ids as literals (model/ does not import
    data/); they must be what the tiny tokenizer really assigns."""
    from tokenizers import Tokenizer

    from unite_jax.data import tiny_tokenizer
    from unite_jax.model.config import preset

    cfg = preset("tiny")
    tokenizer = Tokenizer.from_file(f"{tiny_tokenizer_dir}/tokenizer.json")
    assert cfg.text.vocab_size == tiny_tokenizer.VOCAB_SIZE >= tokenizer.get_vocab_size(with_added_tokens=True)
    assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id) == tuple(
        tokenizer.token_to_id(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"))
