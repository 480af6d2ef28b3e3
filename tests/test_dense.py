"""Dense exact search (sharded jnp top-k, faiss) against numpy brute force; the dense baseline on a corpus."""

import dataclasses

import jax
import numpy as np
import pytest

from avg_jax import partitioning
from avg_jax.data.corpus import normalize_rows
from avg_jax.evaluation import dense, metrics

needs_8_devices = pytest.mark.skipif(jax.device_count() < 8,
                                     reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


def brute_force_check(queries, images, rows, scores, k):
    """Our rows must be k distinct images whose exact (float64) scores are the k best, in descending order."""
    exact = queries.astype(np.float64) @ images.astype(np.float64).T  # [q, n]
    best = -np.sort(-exact, axis=1)[:, :k]
    assert rows.shape == (queries.shape[0], k)
    assert all(len(set(r)) == k for r in rows.tolist())
    np.testing.assert_allclose(np.take_along_axis(exact, rows, axis=1), best, atol=1e-5)
    np.testing.assert_allclose(scores, best, atol=1e-5)
    # Exact ties are absent from random data, so the order itself matches too (up to float32 near-ties).
    assert np.mean(rows == np.argsort(-exact, axis=1)[:, :k]) > 0.99


@needs_8_devices
@pytest.mark.parametrize("mesh_shape, axis", [((8, 1), "data"), ((2, 4), "model"), ((4, 2), "data")])
@pytest.mark.parametrize("num_images, k", [(103, 20), (1000, 10), (9, 9)])
def test_sharded_search_matches_brute_force(mesh_shape, axis, num_images, k):
    rng = np.random.default_rng(num_images)
    images = rng.standard_normal((num_images, 32)).astype(np.float32)
    queries = rng.standard_normal((37, 32)).astype(np.float32)
    mesh = partitioning.make_device_mesh(*mesh_shape)
    index = dense.JaxExactIndex(images, mesh=mesh, axis=axis)
    assert len(index.images.sharding.device_set) == 8
    scores, rows = index.search(queries, k, batch_size=16)  # 37 queries: the last batch is padded
    brute_force_check(queries, images, rows, scores, k)


def test_default_mesh_search_and_faiss_match_brute_force():
    rng = np.random.default_rng(1)
    images = rng.standard_normal((517, 24)).astype(np.float32)
    queries = rng.standard_normal((50, 24)).astype(np.float32)
    scores, rows = dense.JaxExactIndex(images).search(queries, 10)
    brute_force_check(queries, images, rows, scores, 10)
    f_scores, f_rows = dense.faiss_search(queries, images, 10)
    brute_force_check(queries, images, f_rows, f_scores, 10)


def test_search_rejects_bad_input():
    index = dense.JaxExactIndex(np.ones((5, 4), np.float32))
    with pytest.raises(ValueError, match=r"k must be in \[1, 5\]"):
        index.search(np.ones((2, 4), np.float32), 6)
    with pytest.raises(ValueError, match="dim 3 does not match the index dim 4"):
        index.search(np.ones((2, 3), np.float32), 2)
    with pytest.raises(ValueError, match="contain NaN/inf"):
        dense.faiss_search(np.full((1, 4), np.nan, np.float32), np.ones((5, 4), np.float32), 1)


def test_dense_baseline_on_corpus(tiny_corpus):
    with pytest.raises(ValueError, match="text features have dim 48 but image features 64"):
        dense.dense_baseline(tiny_corpus)
    train_q = tiny_corpus.query_rows("train")
    index = tiny_corpus.image_index()
    targets = tiny_corpus.image_features[[index[tiny_corpus.queries[j].image_ids[0]] for j in train_q]]
    w = dense.fit_ridge_map(tiny_corpus.text_features[train_q], targets, l2=1.0)
    # Reference ridge solution by lstsq on the augmented system [X; sqrt(l2) I] W = [Y; 0].
    x = tiny_corpus.text_features[train_q].astype(np.float64)
    aug_x = np.concatenate([x, np.eye(x.shape[1])])
    aug_y = np.concatenate([targets, np.zeros((x.shape[1], targets.shape[1]))])
    np.testing.assert_allclose(w, np.linalg.lstsq(aug_x, aug_y, rcond=None)[0], atol=1e-4)

    def project(t):
        return t @ w

    ours, ranked = dense.dense_baseline(tiny_corpus, split="test", text_projection=project)
    _, ranked_faiss = dense.dense_baseline(tiny_corpus, split="test", backend="faiss", text_projection=project)
    # Reference: numpy cosine ranking over the test images, metrics from explicit rank positions.
    test_images = tiny_corpus.image_rows("test")
    test_q = tiny_corpus.query_rows("test")
    sims = normalize_rows(tiny_corpus.text_features[test_q] @ w) @ normalize_rows(
        tiny_corpus.image_features[test_images]).T
    order = np.argsort(-sims, axis=1)
    ids = np.array([tiny_corpus.images[i].id for i in test_images])
    first = []
    for j, q in enumerate(test_q):
        hits = np.flatnonzero(np.isin(ids[order[j]], tiny_corpus.queries[q].image_ids))
        first.append(hits[0] + 1)
    first = np.array(first)
    for k in (1, 5, 10):
        assert ours[f"recall@{k}"] == pytest.approx(np.mean(first <= k), abs=2 / len(first))
    assert ours["num_queries"] == len(test_q)
    assert ours["recall@10"] > 10 / len(test_images)  # the ridge map beats chance
    agree = np.mean([a == b for a, b in zip(ranked, ranked_faiss, strict=True)])
    assert agree > 0.95


def test_dense_baseline_errors(tiny_corpus):
    with pytest.raises(ValueError, match="backend must be one of"):
        dense.dense_baseline(tiny_corpus, backend="annoy")
    no_text = dataclasses.replace(tiny_corpus, text_features=None)
    with pytest.raises(ValueError, match=r"has no text_features\.npy"):
        dense.dense_baseline(no_text)
    with pytest.raises(ValueError, match="split 'val' has 0 images"):
        dense.dense_baseline(dataclasses.replace(
            tiny_corpus, images=[dataclasses.replace(im, split="train") for im in tiny_corpus.images]),
            split="val")


def test_evaluate_images_on_dense_rankings_matches_numpy():
    """R@K of a brute-force ranking computed two ways: our metrics and numpy rank arithmetic."""
    rng = np.random.default_rng(3)
    images = normalize_rows(rng.standard_normal((60, 8)))
    queries = normalize_rows(images[rng.integers(0, 60, 40)] + 0.3 * rng.standard_normal((40, 8)))
    truth = np.argmax(queries @ images.T + 0.2 * rng.standard_normal((40, 60)), axis=1)
    _, rows = dense.JaxExactIndex(images).search(queries, 10)
    m = metrics.evaluate_images([[f"i{r}" for r in row] for row in rows], [{f"i{t}"} for t in truth])
    rank = (np.argsort(-(queries @ images.T), axis=1) == truth[:, None]).argmax(axis=1) + 1
    for k in (1, 5, 10):
        assert m[f"recall@{k}"] == pytest.approx(np.mean(rank <= k))
