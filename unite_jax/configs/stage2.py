"""Stage 2, instruction tuning: MAMCL query->candidate, LoRA r8 / alpha 64, lr 2e-5, from stage 1.

    python launch/train.py --config=configs/stage2.py:2b --workdir=runs/stage2 \
        --config.model.init=runs/stage1 --config.data.train=/data/stage2.json
"""

from unite_jax.configs import base


def get_config(preset: str = "tiny"):
    c = base.get_config(preset)
    c.stage = "stage2"
    c.loss.symmetric = False
    c.loss.modality_mask = True
    c.lora.rank, c.lora.alpha, c.lora.dropout = 8, 64.0, 0.05
    c.train.learning_rate = 2e-5
    if preset in ("2b", "7b"):
        c.train.steps = 2540 if preset == "2b" else 1270  # one epoch of the 1.3M published pairs
    else:
        # The recipe's LoRA (r8, alpha 64) on the tiny stage-1 model, with a learning rate a model
        # this small needs to move within a few minutes.
        c.train.learning_rate = 1e-3
        c.train.warmup_fraction = 0.1
        c.train.steps = 250
    return c
