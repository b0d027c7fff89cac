"""Builds the demo dataset (digits, photos, moving-digit videos; manifests and eval files).

    python launch/make_demo_data.py --out=DIR [--seed=0] [--scale=1.0]

Everything comes from data inside installed packages (scikit-learn's digits,
scikit-image's sample photos); the same seed gives the same files. Existing files
of the same names in DIR are overwritten. See unite_jax/demo/dataset.py.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from unite_jax.demo.dataset import build_demo_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the number of training records")
    args = parser.parse_args()
    start = time.perf_counter()
    summary = build_demo_data(args.out, seed=args.seed, scale=args.scale)
    for name, count in summary.items():
        if name.endswith((".json", ".jsonl")):
            print(f"{os.path.join(args.out, name)}: {count} records")
    print(f"media: {summary['media_images']} images, {summary['media_videos']} videos; "
          f"{summary['total_bytes'] / 1e6:.2f} MB in {time.perf_counter() - start:.1f} s")
    print(f"data.train (stage 1): {summary['train_stage1']}")
    print(f"data.train (stage 2): {summary['train_stage2']}")


if __name__ == "__main__":
    main()
