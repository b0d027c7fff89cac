"""Stage 1, retrieval adaptation: symmetric InfoNCE (no modality mask), LoRA r8 / alpha 16, lr 1e-4.

    python launch/train.py --config=configs/stage1.py:2b --workdir=runs/stage1 \
        --config.model.init=/models/Qwen2-VL-2B-Instruct --config.data.train=/data/stage1.json
"""

from unite_jax.configs import base


def get_config(preset: str = "tiny"):
    c = base.get_config(preset)
    c.stage = "stage1"
    c.loss.symmetric = True
    c.loss.modality_mask = False
    c.lora.rank, c.lora.alpha, c.lora.dropout = 8, 16.0, 0.05
    c.train.learning_rate = 1e-4
    if preset in ("2b", "7b"):
        c.train.steps = 12500  # one epoch of the 6.4M published pairs at batch 512
        if preset == "7b":
            c.train.steps = 6250
    else:
        # A random-init tiny model has nothing pretrained to adapt: train every weight, faster, with a
        # longer warmup (at 2e-3 it collapses to a constant embedding; at 1e-4 it learns nothing in minutes).
        c.lora.rank = 0
        c.train.learning_rate = 1e-3
        c.train.warmup_fraction = 0.1
        c.train.steps = 600
    return c
