"""unite-jax: the UNITE universal multimodal embedder (Qwen2-VL + MAMCL) in JAX."""

__version__ = "0.1.0"


def __getattr__(name):
    # Imported lazily so `import unite_jax` stays cheap and does not initialise JAX.
    if name == "Embedder":
        from unite_jax.api import Embedder

        return Embedder
    raise AttributeError(f"module 'unite_jax' has no attribute {name!r}")


__all__ = ["Embedder", "__version__"]
