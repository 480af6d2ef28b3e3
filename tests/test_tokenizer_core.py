"""RQ core against independent references: numpy brute-force nearest codes, numpy eqs. 3-6, sklearn k-means."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import KMeans

from avg_jax.tokenizer.kmeans import kmeans_numpy
from avg_jax.tokenizer.losses import TokenizerLossWeights, info_nce, tokenizer_losses
from avg_jax.tokenizer.model import RQTokenizer, RQTokenizerConfig, init_params
from avg_jax.tokenizer.quantizer import rq_encode, rq_encode_codes, squared_distances


def brute_force_rq(z, codebooks, num_levels):
    """Plain loops: at each level scan every code, keep the strictly nearest (float64)."""
    z = z.astype(np.float64)
    codes = np.zeros((z.shape[0], num_levels), np.int64)
    partial = np.zeros((z.shape[0], num_levels, z.shape[1]))
    margin = np.full(z.shape[0], np.inf)  # gap between best and second best, for tie-robust comparison
    for b in range(z.shape[0]):
        r, acc = z[b].copy(), np.zeros(z.shape[1])
        for level in range(num_levels):
            book = codebooks[0 if codebooks.shape[0] == 1 else level].astype(np.float64)
            dists = [float(np.sum((r - c) ** 2)) for c in book]
            order = np.argsort(dists)
            codes[b, level] = order[0]
            margin[b] = min(margin[b], dists[order[1]] - dists[order[0]])
            acc = acc + book[order[0]]
            partial[b, level] = acc
            r = r - book[order[0]]
    return codes, partial, margin


@pytest.mark.parametrize(("num_codebooks", "num_levels", "n", "dim", "num_codes"),
                         [(1, 4, 200, 16, 32), (3, 3, 150, 8, 7), (1, 1, 50, 5, 3)])
def test_rq_encode_matches_brute_force(num_codebooks, num_levels, n, dim, num_codes):
    rng = np.random.default_rng(num_levels)
    z = rng.standard_normal((n, dim)).astype(np.float32)
    books = (rng.standard_normal((num_codebooks, num_codes, dim)) * 0.7).astype(np.float32)
    expect, partial, margin = brute_force_rq(z, books, num_levels)
    got = jax.jit(rq_encode, static_argnums=2)(jnp.asarray(z), jnp.asarray(books), num_levels)
    codes, zq = rq_encode_codes(jnp.asarray(z), jnp.asarray(books), num_levels)
    clear = margin > 1e-3  # rows whose nearest codes are not float32 near-ties
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(np.asarray(got.codes)[clear], expect[clear])
    np.testing.assert_array_equal(np.asarray(codes)[clear], expect[clear])
    np.testing.assert_allclose(np.asarray(got.partial_sums)[clear], partial[clear], atol=1e-4)
    np.testing.assert_allclose(np.asarray(zq)[clear], partial[clear, -1], atol=1e-4)
    residual_after = z[clear] - partial[clear, -1]
    np.testing.assert_allclose(np.asarray(got.errors)[clear, -1], np.sum(residual_after ** 2, -1), rtol=1e-3,
                               atol=1e-4)


def test_squared_distances_expanded_form():
    rng = np.random.default_rng(1)
    r, c = rng.standard_normal((9, 6)), rng.standard_normal((11, 6))
    expect = ((r[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(np.asarray(squared_distances(jnp.asarray(r, jnp.float32),
                                                            jnp.asarray(c, jnp.float32))), expect, rtol=1e-5,
                               atol=1e-5)


def numpy_losses(x, v_i, partial, v_hat, v_hat_code, v_t, mask, w):
    """AVG eqs. 3-6 (and the prefix_align extension) written out per image, per level, per caption."""
    recon, commit, codebook, align, prefix, with_caption = [], [], [], [], [], 0
    for b in range(v_i.shape[0]):
        recon.append(np.sum((x[b] - v_hat[b]) ** 2))
        commit.append(sum(np.sum((v_i[b] - partial[b, d]) ** 2) for d in range(partial.shape[1])))
        codebook.append(commit[-1])  # same value; only the stop-gradient side differs
        caps = [np.sum((v_hat_code[b] - v_t[b, k]) ** 2) for k in range(v_t.shape[1]) if mask[b, k]]
        if caps:
            align.append(np.mean(caps))
            # levels 1 .. M-1: each partial sum against the image's captions, mean over captions, then levels
            prefix.append(np.mean([np.mean([np.sum((partial[b, lvl] - v_t[b, k]) ** 2)
                                            for k in range(v_t.shape[1]) if mask[b, k]])
                                   for lvl in range(partial.shape[1] - 1)]) if partial.shape[1] > 1 else 0.0)
            with_caption += 1
    out = {"recon": np.mean(recon), "commit": np.mean(commit), "codebook": np.mean(codebook),
           "align": np.sum(align) / max(with_caption, 1), "prefix_align": np.sum(prefix) / max(with_caption, 1)}
    out["total"] = w.recon * out["recon"] + w.commit * out["commit"] + w.codebook * out["codebook"] \
        + w.align * out["align"] + w.prefix_align * out["prefix_align"]
    return out


@pytest.mark.parametrize(("m", "prefix_align"), [(3, 0.0), (3, 0.7), (1, 2.0)])
def test_losses_match_numpy_eqs_3_to_6(m, prefix_align):
    rng = np.random.default_rng(2)
    b, d, k = 5, 4, 3
    x, v_hat = rng.standard_normal((b, 7)), rng.standard_normal((b, 7))  # input feature dim 7 != code dim
    v_i, v_hat_code = rng.standard_normal((b, d)), rng.standard_normal((b, d))
    partial, v_t = rng.standard_normal((b, m, d)), rng.standard_normal((b, k, d))
    mask = np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0], [0, 1, 0]], np.float32)
    w = TokenizerLossWeights(recon=1.0, commit=0.5, codebook=2.0, align=0.3, prefix_align=prefix_align)
    arrays = (x, v_i, partial, v_hat, v_hat_code, v_t, mask)
    got = tokenizer_losses(*(jnp.asarray(a, jnp.float32) for a in arrays), w)
    expect = numpy_losses(*arrays, w)
    for name, value in expect.items():
        assert float(got[name]) == pytest.approx(value, rel=1e-5), name


def test_prefix_align_pulls_the_first_levels_vokens_towards_the_captions():
    """prefix_align's gradient reaches the partial sums of levels 1..M-1 (their vokens) and the caption vectors,
    never the last level, v_i or v̂; a negative weight is refused."""
    rng = np.random.default_rng(4)
    v_i, partial = jnp.asarray(rng.standard_normal((4, 3))), jnp.asarray(rng.standard_normal((4, 3, 3)))
    v_t, mask = jnp.asarray(rng.standard_normal((4, 2, 3))), jnp.ones((4, 2))

    def term(a, p, t):
        return tokenizer_losses(a, a, p, a, a, t, mask, TokenizerLossWeights(prefix_align=1.0))["prefix_align"]

    g_v, g_p, g_t = jax.grad(term, argnums=(0, 1, 2))(v_i, partial, v_t)
    assert np.abs(g_v).sum() == 0 and np.abs(g_p[:, -1]).sum() == 0
    assert np.abs(g_p[:, :-1]).min() > 0 and np.abs(g_t).sum() > 0
    with pytest.raises(ValueError, match="prefix_align must be >= 0"):
        TokenizerLossWeights(prefix_align=-1.0)


def test_stop_gradients_route_commit_to_encoder_and_codebook_term_to_codes():
    rng = np.random.default_rng(3)
    v_i, partial = jnp.asarray(rng.standard_normal((4, 3))), jnp.asarray(rng.standard_normal((4, 2, 3)))
    v_t, mask = jnp.zeros((4, 1, 3)), jnp.ones((4, 1))

    def term(name, a, p):
        return tokenizer_losses(a, a, p, a, a, v_t, mask, TokenizerLossWeights())[name]

    g_commit = jax.grad(functools.partial(term, "commit"), argnums=(0, 1))(v_i, partial)
    g_book = jax.grad(functools.partial(term, "codebook"), argnums=(0, 1))(v_i, partial)
    assert np.abs(g_commit[0]).sum() > 0 and np.abs(g_commit[1]).sum() == 0
    assert np.abs(g_book[0]).sum() == 0 and np.abs(g_book[1]).sum() > 0


def test_residual_codebook_target_moves_each_voken_to_the_residuals_it_quantizes():
    """codebook_target 'residuals' (RQ-VAE's per-step update): value Σ_d ||r_d − voken_d||² (batch mean) and
    gradient 2/B Σ_{(b,d): code n} (c_n − r_bd) per voken n, from numpy loops over a real RQ of a shared
    codebook: no gradient reaches the earlier steps' vokens through ẑ^(d), none reaches v_i."""
    rng = np.random.default_rng(5)
    b, m, d, n = 6, 3, 4, 5
    z = rng.standard_normal((b, d)).astype(np.float32)
    books = rng.standard_normal((1, n, d)).astype(np.float32)
    w = TokenizerLossWeights(codebook_target="residuals")
    v_t, mask = jnp.zeros((b, 1, d)), jnp.ones((b, 1))

    def codebook_term(books_, z_):
        rq = rq_encode(z_, books_, m)
        return tokenizer_losses(z_, z_, rq.partial_sums, z_, z_, v_t, mask, w, rq.residuals)["codebook"]

    codes = brute_force_rq(z, books, m)[0]
    value, expect_grad, r = 0.0, np.zeros((n, d)), z.astype(np.float64).copy()
    for level in range(m):
        c = books[0][codes[:, level]].astype(np.float64)  # [b, d]
        value += np.sum((r - c) ** 2) / b
        np.add.at(expect_grad, codes[:, level], 2.0 * (c - r) / b)
        r = r - c
    got_value = codebook_term(jnp.asarray(books), jnp.asarray(z))
    assert float(got_value) == pytest.approx(value, rel=1e-5)
    g_books, g_z = jax.grad(codebook_term, argnums=(0, 1))(jnp.asarray(books), jnp.asarray(z))
    np.testing.assert_allclose(np.asarray(g_books)[0], expect_grad, rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(g_z)).sum() == 0
    with pytest.raises(ValueError, match="codebook_target must be 'partial_sums' or 'residuals', got 'x'"):
        TokenizerLossWeights(codebook_target="x")


def test_info_nce_matches_numpy():
    rng = np.random.default_rng(4)
    a, t = rng.standard_normal((6, 5)), rng.standard_normal((6, 5))
    logits = a @ t.T / 0.1

    def ce(lg):
        lg = lg - lg.max(1, keepdims=True)
        return -np.mean(np.diag(lg) - np.log(np.exp(lg).sum(1)))

    expect = 0.5 * (ce(logits) + ce(logits.T))
    assert float(info_nce(jnp.asarray(a, jnp.float32), jnp.asarray(t, jnp.float32), 0.1)) == pytest.approx(
        expect, rel=1e-5)


def test_info_nce_mask_equals_the_valid_subset():
    rng = np.random.default_rng(7)
    a, t = (jnp.asarray(rng.standard_normal((7, 4)), jnp.float32) for _ in range(2))
    valid = np.array([1, 0, 1, 1, 0, 1, 1], bool)
    got = info_nce(a, t, 0.2, jnp.asarray(valid))
    assert float(got) == pytest.approx(float(info_nce(a[valid], t[valid], 0.2)), rel=1e-5)


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def test_model_forward_matches_numpy_pipeline():
    """Heads -> brute-force RQ -> MLP decoder, recomputed in numpy from the parameters."""
    cfg = RQTokenizerConfig(code_dim=8, codebook_size=16, num_levels=3, decoder_hidden_dim=12)
    params = init_params(cfg, image_dim=10, text_dim=6, seed=0)
    rng = np.random.default_rng(5)
    x, t = rng.standard_normal((20, 10)).astype(np.float32), rng.standard_normal((20, 2, 6)).astype(np.float32)
    out = RQTokenizer(cfg, 10).apply({"params": params}, jnp.asarray(x), jnp.asarray(t))
    p = jax.tree.map(np.asarray, params)
    v_i = x @ p["image_head"]["out"]["kernel"] + p["image_head"]["out"]["bias"]
    v_i /= np.linalg.norm(v_i, axis=1, keepdims=True)
    codes, partial, margin = brute_force_rq(v_i, p["codebooks"], 3)
    h = _gelu_tanh(partial[:, -1] @ p["decoder"]["hidden_0"]["kernel"] + p["decoder"]["hidden_0"]["bias"])
    v_hat = h @ p["decoder"]["out"]["kernel"] + p["decoder"]["out"]["bias"]
    clear = margin > 1e-4
    np.testing.assert_array_equal(np.asarray(out["rq"].codes)[clear], codes[clear])
    np.testing.assert_allclose(np.asarray(out["v_hat"])[clear], v_hat[clear], atol=1e-4)
    assert out["v_hat"].shape == x.shape  # eq. 3 reconstructs the input image feature
    # Straight-through: recon reaches both the vokens (through ẑ) and the image head (through v_i).
    def recon(prm):
        o = RQTokenizer(cfg, 10).apply({"params": prm}, jnp.asarray(x), jnp.asarray(t))
        return jnp.sum((o["v_hat"] - jnp.asarray(x)) ** 2)

    g = jax.grad(recon)(params)
    assert np.abs(g["codebooks"]).sum() > 0 and np.abs(g["image_head"]["out"]["kernel"]).sum() > 0


def test_kmeans_recovers_sklearn_partition_on_blobs():
    rng = np.random.default_rng(6)
    centers = rng.standard_normal((5, 4)) * 6
    x = (centers[rng.integers(0, 5, 300)] + rng.standard_normal((300, 4)) * 0.3).astype(np.float32)
    cents, ours = kmeans_numpy(x, 5, seed=0)
    ref = KMeans(5, n_init=10, random_state=0).fit_predict(x)
    # Same partition up to label names: a one-to-one label mapping.
    pairs = set(zip(ours.tolist(), ref.tolist(), strict=True))
    assert len(pairs) == 5 == len({a for a, _ in pairs}) == len({b for _, b in pairs})
    # Lloyd fixed point: centroids are member means and members are nearest to their own centroid.
    for j in range(5):
        np.testing.assert_allclose(cents[j], x[ours == j].mean(0), atol=1e-4)
    assert (((x[:, None] - cents[None]) ** 2).sum(-1).argmin(1) == ours).all()
