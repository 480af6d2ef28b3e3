"""expand_vocab: old tokens untouched, new rows hold the (scaled) codebook projection, sizes padded to 128."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.decomposition import TruncatedSVD

from avg_jax.data.vocab import pad_vocab_size
from avg_jax.t5.configs import named_t5_config
from avg_jax.t5.model import T5, init_params
from avg_jax.t5.vocab_expand import expand_vocab, project_codebook

TEXT_SIZE = 250  # below the tiny config's 256 rows: rows 250..255 are reused, as T5's 32100..32127 are


def _mean_norm(x):
    return float(np.mean(np.linalg.norm(x, axis=1)))


def _gram(x):
    x = np.asarray(x, np.float64)
    return x @ x.T


@pytest.mark.parametrize("version", ["1.0", "1.1"])
@pytest.mark.parametrize("d_code", [16, 64, 96])  # below, equal to and above d_model = 64
def test_old_logits_unchanged_and_new_rows_hold_the_codebook(version, d_code):
    config = named_t5_config("tiny", version)
    params = init_params(config, jax.random.key(0))
    n_new = 100  # more vokens than d_model, so the d_code > d_model case is a real rank reduction
    codebook = np.random.default_rng(0).normal(size=(n_new, d_code)).astype(np.float32)
    new_params, new_config = expand_vocab(params, config, n_new, "codebook", codebook, jax.random.key(1),
                                          text_size=TEXT_SIZE)
    assert new_config.vocab_size == pad_vocab_size(TEXT_SIZE + n_new) == 384
    embedding = new_params["token_embedder"]["embedding"]
    old = params["token_embedder"]["embedding"]
    np.testing.assert_array_equal(embedding[:TEXT_SIZE], old[:TEXT_SIZE])
    assert not embedding[TEXT_SIZE + n_new:].any()  # padding rows

    new_rows = embedding[TEXT_SIZE:TEXT_SIZE + n_new]
    np.testing.assert_allclose(_mean_norm(new_rows), _mean_norm(old[:TEXT_SIZE]), rtol=1e-5)
    scale = _mean_norm(new_rows) / _mean_norm(project_codebook(codebook, 64, jax.random.key(1)))
    if d_code <= config.d_model:  # an isometry up to the global scale: every inner product is kept
        np.testing.assert_allclose(_gram(new_rows), scale ** 2 * _gram(codebook), rtol=1e-4, atol=1e-3)
    else:  # best rank-64 approximation of the inner products, checked against sklearn's truncated SVD
        reference = TruncatedSVD(n_components=config.d_model, algorithm="arpack").fit_transform(codebook)
        np.testing.assert_allclose(_gram(new_rows), scale ** 2 * _gram(reference), rtol=1e-4, atol=1e-3)
    if d_code == config.d_model:
        np.testing.assert_allclose(new_rows, scale * codebook, rtol=1e-5)
    if not config.tie_word_embeddings:
        head = new_params["lm_head"]
        np.testing.assert_array_equal(head[:, :TEXT_SIZE], params["lm_head"][:, :TEXT_SIZE])
        assert head.shape == (config.d_model, 384)
        np.testing.assert_allclose(_mean_norm(head[:, TEXT_SIZE:TEXT_SIZE + n_new].T),
                                   _mean_norm(params["lm_head"][:, :TEXT_SIZE].T), rtol=1e-5)

    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(1, TEXT_SIZE, (3, 9)), jnp.int32)
    dec = jnp.asarray(rng.integers(1, TEXT_SIZE, (3, 5)), jnp.int32)
    before = jax.jit(T5(config).apply)({"params": params}, ids, dec)
    after = jax.jit(T5(new_config).apply)({"params": new_params}, ids, dec)
    np.testing.assert_allclose(after[..., :TEXT_SIZE], before[..., :TEXT_SIZE], atol=1e-5, rtol=1e-5)


def test_random_init_matches_the_text_rows_scale():
    config = named_t5_config("tiny", "1.1")
    params = init_params(config, jax.random.key(0))
    new_params, new_config = expand_vocab(params, config, 500, "random", rng=jax.random.key(2))
    assert new_config.vocab_size == pad_vocab_size(256 + 500)
    rows = new_params["token_embedder"]["embedding"][256:756]
    text_rms = np.sqrt(np.mean(np.square(params["token_embedder"]["embedding"])))
    np.testing.assert_allclose(np.sqrt(np.mean(np.square(rows))), text_rms, rtol=0.05)
    assert abs(float(np.mean(rows))) < 0.05


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 30), d_code=st.integers(1, 40), d_model=st.integers(1, 40), seed=st.integers(0, 99))
def test_projection_never_increases_inner_product_error_beyond_svd(n, d_code, d_model, seed):
    """Whatever the dims, the projected Gram matrix is the best rank-d_model one (exact when d_code <= d_model)."""
    codebook = np.random.default_rng(seed).normal(size=(n, d_code))
    projected = project_codebook(codebook, d_model, jax.random.key(seed))
    assert projected.shape == (n, d_model)
    singular = np.linalg.svd(codebook, compute_uv=False)
    best_error = np.sqrt(np.sum(singular[d_model:] ** 4))  # Frobenius error of the best rank-d_model Gram
    error = np.linalg.norm(_gram(projected) - _gram(codebook))
    assert error <= best_error + 1e-3 * (1 + np.linalg.norm(_gram(codebook)))


def test_expand_vocab_rejects_bad_arguments():
    config = named_t5_config("tiny", "1.0")
    params = init_params(config, jax.random.key(0))
    with pytest.raises(ValueError, match="codebook must be"):
        expand_vocab(params, config, 4, "codebook", np.zeros((3, 8)), jax.random.key(0))
    with pytest.raises(ValueError, match="needs the codebook"):
        expand_vocab(params, config, 4, "codebook")
    with pytest.raises(ValueError, match="rng"):
        expand_vocab(params, config, 4, "random")
    with pytest.raises(ValueError, match="text_size"):
        expand_vocab(params, config, 4, "random", rng=jax.random.key(0), text_size=300)
    with pytest.raises(ValueError, match="init must be"):
        expand_vocab(params, config, 4, "zeros")
