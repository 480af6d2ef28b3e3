"""Shared fixtures: small corpora built locally (no downloads)."""

import pytest

from avg_jax.data.synthetic import make_synthetic_corpus


@pytest.fixture(scope="session")
def tiny_corpus():
    """A 300-image synthetic corpus, the size most unit tests need."""
    return make_synthetic_corpus(seed=0, num_images=300, num_val=30, num_test=60, image_dim=64, text_dim=48)


@pytest.fixture(scope="session")
def tiny_vocab(tiny_corpus, tmp_path_factory):
    """A 120-piece SentencePiece vocabulary of `tiny_corpus`' training queries (deterministic, shared)."""
    from avg_jax.data.vocab import Vocabulary, train_sentencepiece

    spm = train_sentencepiece([tiny_corpus.queries[j].text for j in tiny_corpus.query_rows("train")],
                              tmp_path_factory.mktemp("spm") / "spm", vocab_size=120)
    return Vocabulary(spm)
