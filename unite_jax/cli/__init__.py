"""The command-line programs, one module each, with `main(argv=None)`:

    train.py    unite-train    python -m unite_jax.train    launch/train.py
    encode.py   unite-encode   python -m unite_jax.encode   launch/encode.py
    eval.py     unite-eval     python -m unite_jax.eval     launch/eval.py
    convert.py  unite-convert  python -m unite_jax.convert  launch/convert.py
    aot.py      unite-aot                                   launch/aot.py   (compile for a TPU topology)

common.py holds what encode and eval share (model flags, one-line errors).
"""
