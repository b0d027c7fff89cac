"""Settings shared by both UNITE training stages; `get_config(preset)` with preset 2b, 7b or tiny.

Every key can be overridden on the command line: `--config.train.steps=100`.
The stage files (stage1.py, stage2.py) start from this and set what differs.
"""

import ml_collections

from unite_jax.data.spec import default_data_config

PRESETS = ("2b", "7b", "tiny")


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {PRESETS} (e.g. --config=configs/stage1.py:2b)")
    c = ml_collections.ConfigDict()
    c.stage = "train"
    c.preset = preset
    c.seed = 0

    # Starting weights: a Hugging Face dir, an Orbax model dir, a finished workdir, or "random".
    c.model = ml_collections.ConfigDict(dict(
        init="", preset=preset, tokenizer="", init_std=0.02,
        dtype="bfloat16", compute_dtype="bfloat16", remat="full", positions="sequential",
        attention_impl="",  # "" = splash kernels on TPU, cudnn on GPU in bf16, xla elsewhere
        scan_layers=True,
    ))

    c.data = default_data_config()

    c.train = ml_collections.ConfigDict(dict(
        global_batch_size=512, steps=1000, learning_rate=1e-4, warmup_fraction=0.03, weight_decay=0.0,
        clip_norm=1.0, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8,
        grad_cache_chunks=1,  # > 1: the batch in N chunks; activation memory of one chunk
        # how chunks combine: "gradcache" (the exact gradient of the whole batch's contrastive loss) or
        # "accumulate" (plain gradient accumulation: each chunk its own contrastive batch, fewer negatives)
        chunk_mode="gradcache",
        master_dtype="float32",  # dtype of trainable weights and optimizer state
        nonfinite="stop",  # "stop" or "skip" a step whose loss or gradient is not finite
        log_every=10,
        prefetch_batches=2,  # global batches placed on the devices ahead of the step
    ))
    c.loss = ml_collections.ConfigDict(dict(
        temperature=0.03, modality_mask=True, symmetric=False,
        chunk_size=0,  # > 0: stream the logits N candidate columns at a time (huge global batches)
        scale=1.0,
    ))
    c.lora = ml_collections.ConfigDict(dict(
        rank=8, alpha=16.0, dropout=0.05, targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3, async_save=True))
    # (data, fsdp, tensor); -1 = the rest. num_devices: use the first N devices (0 = all).
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1), num_devices=0))
    c.eval = ml_collections.ConfigDict(dict(files="", every_steps=0, batch_size=32, at_start=False, at_end=True))
    c.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1))

    if preset in ("2b", "7b"):
        # The published recipe: 64 per GPU x 8 (2B) or 16 x 64 GPUs (7B); 1 epoch.
        c.train.global_batch_size = 512 if preset == "2b" else 1024
        c.mesh.shape = (1, -1, 1)  # FSDP over every device
    else:
        # A random-init model small enough to train on a CPU in minutes.
        c.model.init = "random"
        c.model.dtype = "float32"
        c.model.compute_dtype = "float32"
        c.model.remat = "none"
        c.train.global_batch_size = 32
        c.train.steps = 60
        c.train.log_every = 1
        c.checkpoint.every_steps = 20
        c.data.seq_len = 128
        c.data.patches_per_row = 128
        c.data.vision_block = 64
        c.data.max_text_tokens = 64
    return c
