"""Test setup: JAX on CPU with 8 simulated devices, float32 matmuls, shared fixtures.

The device count must be fixed before jax is imported anywhere, so it is set
here, at the top of the first module pytest imports.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    if len(jax.devices()) != 8:
        raise RuntimeError(f"tests need 8 simulated CPU devices, got {jax.devices()}")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A directory with the tiny BPE tokenizer (tokenizer.json + tokenizer_config.json)."""
    from unite_jax.data import tiny_tokenizer

    directory = str(tmp_path_factory.mktemp("tiny_tokenizer"))
    tiny_tokenizer.build(directory)
    return directory


@pytest.fixture(scope="session")
def tokenizer(tiny_tokenizer_dir):
    """The tiny tokenizer as the library reads it (`PromptTokenizer`)."""
    from unite_jax.data.tokenize import PromptTokenizer

    return PromptTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def hf_tokenizer(tiny_tokenizer_dir):
    """The tiny tokenizer as transformers reads it (the reference of the prompt tests)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
