"""What the programs share: model flags, a lazily loaded Embedder, and one-line errors (exit code 2)
instead of tracebacks for mistakes in the inputs (encode, eval); the packaged-config lookup of --config
(train, aot)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

import unite_jax.configs

USAGE_ERROR = 2
# Mistakes a user can fix (a bad path, a malformed line, a mismatched tokenizer, a missing
# optional package). Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, ImportError)


def run_main(main: Callable[[Sequence[str] | None, str], int | None], argv: Sequence[str] | None = None,
             prog: str | None = None) -> int:
    """Runs main(argv, prog); a user error becomes `PROG: error: MESSAGE` on stderr and exit code 2.

    prog: the program's name in messages (default: the running script's file name)."""
    prog = prog or os.path.basename(sys.argv[0])
    try:
        return int(main(argv, prog) or 0)
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a Hugging Face UNITE/Qwen2-VL directory or an Orbax checkpoint")
    parser.add_argument("--batch_size", type=int, default=16, help="items per forward pass (default 16)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="parameter and compute dtype (default: float32 on CPU, bfloat16 on GPU/TPU)")
    parser.add_argument("--max_text_tokens", type=int, default=2048, help="cap on each item's text tokens")
    parser.add_argument("--video_max_frames", type=int, default=None,
                        help="frames sampled per video at most (default: the model directory's, else 12)")
    parser.add_argument("--video_fps", type=float, default=None, help="video sampling rate (default 1 fps)")


def check_model_flags(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.max_text_tokens < 1:
        raise ValueError(f"--max_text_tokens must be >= 1, got {args.max_text_tokens}")


def processor_overrides(args: argparse.Namespace) -> dict:
    overrides = {"video_max_frames": args.video_max_frames, "video_fps": args.video_fps}
    return {key: value for key, value in overrides.items() if value is not None}


def model_key(args: argparse.Namespace) -> str:
    """Identifies the vectors this model directory gives under these flags (for caches and resumes)."""
    import jax

    from unite_jax.eval.store import model_fingerprint

    return model_fingerprint(args.model, dtype=args.dtype or f"default-{jax.default_backend()}",
                             max_text_tokens=args.max_text_tokens, **processor_overrides(args))


def lazy_encode_fn(args: argparse.Namespace) -> Callable[[list], object]:
    """encode_fn(items) backed by an Embedder that is loaded on the first call (not at all when
    every vector comes from a cache or from finished shards)."""
    state = {}

    def encode_fn(items: list):
        if "embedder" not in state:
            from unite_jax import Embedder

            state["embedder"] = Embedder.from_pretrained(args.model, dtype=args.dtype,
                                                         max_text_tokens=args.max_text_tokens,
                                                         **processor_overrides(args))
        return state["embedder"].encode(items, batch_size=args.batch_size)

    return encode_fn


PACKAGED_CONFIGS = os.path.dirname(os.path.abspath(unite_jax.configs.__file__))


def resolve_config(value: str) -> str:
    """A --config value with its file replaced by the packaged config of that name when the file is absent.

    `stage1:tiny`, `stage1.py` and `configs/stage1.py:tiny` (from any directory without that file) name
    unite_jax/configs/stage1.py; an existing file is used as given.
    """
    path, colon, preset = value.partition(":")
    if os.path.exists(path):
        return value
    name = os.path.basename(path)
    name = name[:-3] if name.endswith(".py") else name
    packaged = os.path.join(PACKAGED_CONFIGS, f"{name}.py")
    if name.isidentifier() and not name.startswith("_") and os.path.isfile(packaged):
        return packaged + colon + preset
    return value


def resolve_config_flags(argv: Sequence[str]) -> list[str]:
    """argv with every --config value (`--config=X` or `--config X`) passed through `resolve_config`."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + resolve_config(arg[len("--config="):])
        elif arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
    return out
