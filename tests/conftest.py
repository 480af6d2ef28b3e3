"""Shared fixtures: small corpora built locally (no downloads)."""

import pytest

from avg_jax.data.synthetic import make_synthetic_corpus


@pytest.fixture(scope="session")
def tiny_corpus():
    """A 300-image synthetic corpus, the size most unit tests need."""
    return make_synthetic_corpus(seed=0, num_images=300, num_val=30, num_test=60, image_dim=64, text_dim=48)
