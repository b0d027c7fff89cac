"""The PyTorch reference training step of benchmarks/train_step.py: transformers Qwen2-VL + LoRA + UNITE loss.

What one step does (the same computation as `unite_jax.train.step.train_step` with LoRA, C = 1):
  1. each stream (query, candidate) is embedded on its own: the vision tower on the stream's
     concatenated patches, its merged tokens `masked_scatter`-ed into the <|image_pad|>/<|video_pad|>
     slots of the token embeddings, the language model over the left-padded rows with the
     attention mask, the last position, L2-normalised;
  2. symmetric InfoNCE: (CE(q @ c^T / tau) + CE(c @ q^T / tau)) / 2 with the diagonal as targets
     (UNITE stage 1: no modality mask);
  3. grad-norm clip 1.0, AdamW (weight decay 0) on the LoRA pairs only; the base model is frozen.

LoRA (`LoRALinear`) wraps q, k, v, o, gate, up, down of every decoder layer:
    y = base(x) + scale * ((x @ A) @ B),   A [in, r], B [r, out]
the layout of unite_jax.model.lora, so the JAX side's initial A can be copied in as is; B starts
at zero. The branch runs in the activations' dtype (A and B stay float32 master weights, cast per
use), as the JAX linear does. No LoRA dropout: dropout would draw different masks on the two sides.

Inputs travel between the JAX worker and this one as an .npz of unpacked examples
(`save_streams` / `load_streams`); this module imports torch only inside the functions that need it,
so the JAX side can import it too.
"""

from __future__ import annotations

import time

import numpy as np

STREAMS = ("query", "candidate")
TARGETS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


# ----------------------------------------------------------------------------- inputs (numpy only)
def save_streams(path: str, streams: dict[str, list]) -> None:
    """streams: {"query": [PackableInput, ...], "candidate": [...]} -> one .npz (row order kept).

    Per stream: ids (all rows' token ids concatenated), lengths [rows], patches (every media's
    patches, row then media order), grids [media, 3], media_per_row [rows].
    """
    arrays = {}
    for name, items in streams.items():
        arrays[f"{name}/ids"] = np.concatenate([np.asarray(x.input_ids, np.int32) for x in items])
        arrays[f"{name}/lengths"] = np.asarray([x.num_tokens for x in items], np.int64)
        patches = [p for x in items for p in x.patches]
        arrays[f"{name}/patches"] = (np.concatenate(patches).astype(np.float32) if patches
                                     else np.zeros((0, 1), np.float32))
        arrays[f"{name}/grids"] = np.asarray([g for x in items for g in x.grids], np.int64).reshape(-1, 3)
        arrays[f"{name}/media_per_row"] = np.asarray([len(x.grids) for x in items], np.int64)
    np.savez(path, **arrays)


def load_streams(path: str) -> dict[str, dict[str, np.ndarray]]:
    """The .npz of `save_streams` as {stream: {ids, lengths, patches, grids, media_per_row}}."""
    with np.load(path) as data:
        out: dict[str, dict[str, np.ndarray]] = {}
        for key in data.files:
            stream, field = key.split("/")
            out.setdefault(stream, {})[field] = data[key]
    return out


def left_pad(ids: np.ndarray, lengths: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated rows -> (ids [rows, max_len] left-padded with pad_id, mask [rows, max_len] int64)."""
    rows, width = len(lengths), int(lengths.max())
    out = np.full((rows, width), pad_id, np.int64)
    mask = np.zeros((rows, width), np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for r, (start, n) in enumerate(zip(starts, lengths)):
        out[r, width - n:] = ids[start:start + n]
        mask[r, width - n:] = 1
    return out, mask


# ----------------------------------------------------------------------------- model
def lora_linear_class():
    import torch

    class LoRALinear(torch.nn.Module):
        """base(x) + scale * ((x @ A) @ B) with a frozen base nn.Linear; A [in, r], B [r, out] trainable."""

        def __init__(self, base: torch.nn.Linear, lora_a: np.ndarray, scale: float):
            super().__init__()
            self.base = base
            self.scale = float(scale)
            a = torch.tensor(np.asarray(lora_a, np.float32), device=base.weight.device)
            self.lora_a = torch.nn.Parameter(a)
            self.lora_b = torch.nn.Parameter(torch.zeros(a.shape[1], base.out_features, device=base.weight.device))

        def forward(self, x):
            branch = (x @ self.lora_a.to(x.dtype)) @ self.lora_b.to(x.dtype)
            return self.base(x) + self.scale * branch

    return LoRALinear


def add_lora(model, lora_a: dict[str, np.ndarray], scale: float) -> list:
    """Freezes `model` and wraps the seven LLM linears of every layer; returns the LoRA parameters.

    lora_a: {"self_attn/q_proj": [layers, in, r], ...} (the JAX tree's lora_a leaves).
    """
    LoRALinear = lora_linear_class()
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = []
    for i, layer in enumerate(model.model.language_model.layers):
        for module_name, names in TARGETS.items():
            module = getattr(layer, module_name)
            for name in names:
                base = getattr(module, name)
                wrapped = LoRALinear(base, lora_a[f"{module_name}/{name}"][i], scale)
                setattr(module, name, wrapped)
                trainable += [wrapped.lora_a, wrapped.lora_b]
    return trainable


def stream_tensors(stream: dict[str, np.ndarray], pad_id: int, device, dtype) -> dict:
    """The torch inputs of one stream: ids, mask, pixel_values (dtype) and grid_thw on `device`."""
    import torch

    ids, mask = left_pad(stream["ids"], stream["lengths"], pad_id)
    out = {"ids": torch.tensor(ids, device=device), "mask": torch.tensor(mask, device=device), "pixels": None,
           "grids": None}
    if len(stream["grids"]):
        out["pixels"] = torch.tensor(stream["patches"], device=device).to(dtype)
        out["grids"] = torch.tensor(stream["grids"], device=device)
    return out


def unite_embed(model, inputs: dict):
    """[rows, hidden] float32 L2-normalised embeddings: visual -> masked_scatter -> LLM -> last position."""
    import torch

    config = model.config
    language_model = model.model.language_model
    ids = inputs["ids"]
    embeds = language_model.embed_tokens(ids)
    if inputs["pixels"] is not None:
        out = model.model.visual(inputs["pixels"], grid_thw=inputs["grids"])
        features = out if isinstance(out, torch.Tensor) else out.pooler_output  # 5.x returns an output object
        slots = ((ids == config.image_token_id) | (ids == config.video_token_id)).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(slots, features.to(embeds.dtype))
    hidden = language_model(inputs_embeds=embeds, attention_mask=inputs["mask"],
                            use_cache=False).last_hidden_state[:, -1]
    return torch.nn.functional.normalize(hidden.float(), dim=-1)


def symmetric_info_nce(query, candidate, temperature: float):
    """(CE(q c^T / t, diag) + CE(c q^T / t, diag)) / 2, float32."""
    import torch

    logits = query @ candidate.T / temperature
    targets = torch.arange(query.shape[0], device=query.device)
    ce = torch.nn.functional.cross_entropy
    return 0.5 * (ce(logits, targets) + ce(logits.T, targets))


def load_model(model_dir: str, *, dtype: str, device: str, random_init: bool):
    """Qwen2VLForConditionalGeneration from `model_dir` (weights), or its config.json with torch's own
    random init made directly on `device` (random_init: nothing to read, for the 2B GPU shapes)."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch_dtype = getattr(torch, dtype)
    if random_init:
        config = Qwen2VLConfig.from_pretrained(model_dir)
        with torch.device(device):
            model = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch_dtype,
                                                                 attn_implementation="sdpa")
        return model
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch_dtype, attn_implementation="sdpa")
    return model.to(device)


def run_reference(model_dir: str, inputs_path: str, lora_path: str, *, steps: int, warmup: int, dtype: str,
                  device: str, checkpointing: bool, random_init: bool, lora_scale: float, temperature: float,
                  learning_rate: float, pad_id: int, threads: tuple[int, ...] = (),
                  later_steps: int = 5) -> dict:
    """Loads the model and inputs, runs warmup + steps optimisation steps on the same batch, once per
    intra-op thread count in `threads` (() = torch's default only; training goes on across them; the
    settings after the first time min(steps, later_steps) steps: on a loaded machine an oversubscribed
    thread pool can be 10x slower, and the sweep must not eat the benchmark's time).

    Returns {"step_times": [s per timed step] of the first setting, "by_threads": {threads: step
    times}, "losses": [loss of every step of the first setting, warm-up first], "tokens": non-pad
    tokens of both streams (vision tokens included), "load_s": model load time, "peak_gib"}.
    """
    import torch

    if threads:
        torch.set_num_threads(threads[0])
    torch.manual_seed(0)
    start = time.perf_counter()
    model = load_model(model_dir, dtype=dtype, device=device, random_init=random_init)
    with np.load(lora_path) as data:
        lora_a = {k: data[k] for k in data.files}
    trainable = add_lora(model, lora_a, lora_scale)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # Qwen2-VL has no dropout; train mode is what turns gradient checkpointing on
    load_s = time.perf_counter() - start
    streams = load_streams(inputs_path)
    torch_dtype = getattr(torch, dtype)
    batch = {name: stream_tensors(streams[name], pad_id, device, torch_dtype) for name in STREAMS}
    tokens = int(sum(int(streams[name]["lengths"].sum()) for name in STREAMS))
    padded = int(sum(batch[name]["ids"].numel() for name in STREAMS))  # token slots torch computes
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = symmetric_info_nce(unite_embed(model, batch["query"]), unite_embed(model, batch["candidate"]),
                                  temperature)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        return float(loss.detach())  # the host read waits for the step, like the JAX side's block

    by_threads, first_losses = {}, None
    for k, setting in enumerate(threads or (torch.get_num_threads(),)):
        torch.set_num_threads(setting)
        losses, times = [], []
        for i in range(warmup + (steps if k == 0 else min(steps, later_steps))):
            sync()
            begin = time.perf_counter()
            losses.append(step())
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - begin)
        by_threads[str(setting)] = times
        first_losses = first_losses or losses
    peak_gib = (torch.cuda.max_memory_allocated() / 2**30) if device.startswith("cuda") else None
    return {"step_times": next(iter(by_threads.values())), "by_threads": by_threads, "losses": first_losses,
            "tokens": tokens, "padded_tokens": padded, "load_s": load_s, "peak_gib": peak_gib}
