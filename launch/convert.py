"""Converts between Hugging Face directories and this project's Orbax model directories.

    python launch/convert.py --src=DIR --dst=DIR [--overwrite] [--dtype=bfloat16|float32]

The direction follows from --src: a Hugging Face Qwen2-VL / UNITE directory
(config.json + *.safetensors, transformers 4.x or 5.x layout) becomes an Orbax
model directory; an Orbax model directory (unite_model.json + params/) or a
finished training workdir (WORKDIR/model) becomes a Hugging Face directory that
`transformers.Qwen2VLForConditionalGeneration.from_pretrained` loads, with the
tokenizer, pre-processor files and a model card. The weights keep their dtype
unless --dtype is given. Errors are one line on stderr with exit code 2.

The program is `unite_jax.cli.convert` (also installed as `unite-convert`; `python -m unite_jax.convert`).
"""

import sys

from unite_jax.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
