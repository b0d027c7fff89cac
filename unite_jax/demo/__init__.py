"""The demo: a small dataset built from data shipped in scikit-learn / scikit-image, and a random tiny model."""
