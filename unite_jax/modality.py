"""Modality codes: one bit per modality, OR-ed for fused inputs (text + image = 3, text + video = 5).

The one definition shared by the contrastive loss (which masks columns by code) and the data
layer (which tags every example with its candidate's code). A leaf module: it imports nothing,
so the jax-free data layer and the jax-side loss can both depend on it.
"""

from __future__ import annotations

from typing import Any

TEXT = 1
IMAGE = 2
VIDEO = 4
KNOWN_BITS = TEXT | IMAGE | VIDEO  # 7: the largest valid code
BY_NAME = {"text": TEXT, "image": IMAGE, "video": VIDEO}


def parse(value: Any, field: str = "target_modal") -> int:
    """'text' -> 1, 'image' -> 2, 'video' -> 4, 'text,image' -> 3 (any order, spaces allowed); ints 1..7 pass.

    Raises ValueError naming `field` for anything else.
    """
    if isinstance(value, int) and not isinstance(value, bool) or _is_numpy_int(value):
        if 1 <= int(value) <= KNOWN_BITS:
            return int(value)
        raise ValueError(f"{field}: code {value} is not in 1..{KNOWN_BITS} (text={TEXT}, image={IMAGE}, "
                         f"video={VIDEO})")
    if not isinstance(value, str):
        raise ValueError(f"{field}: expected a string like 'text,image', got {type(value).__name__}")
    code = 0
    for name in value.split(","):
        name = name.strip().lower()
        if name not in BY_NAME:
            raise ValueError(f"{field}: unknown modality {name!r} in {value!r}; expected names among text, image, "
                             "video joined by ','")
        code |= BY_NAME[name]
    return code


def _is_numpy_int(value: Any) -> bool:
    # numpy integers without importing numpy here (a TFDS feature arrives as one)
    return type(value).__module__ == "numpy" and hasattr(value, "dtype") and value.dtype.kind in "iu"
