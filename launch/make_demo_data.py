"""Builds the demo dataset (digits, photos, moving-digit videos; manifests and eval files).

    python launch/make_demo_data.py --out=DIR [--seed=0] [--scale=1.0]

Everything comes from data inside installed packages (scikit-learn's digits,
scikit-image's sample photos); the same seed gives the same files. Existing files
of the same names in DIR are overwritten. The program is `unite_jax.demo.dataset.main`.
"""

from unite_jax.demo.dataset import main

if __name__ == "__main__":
    main()
