"""Generate-then-rerank (`Reranker` in `RetrievalModel.rank`) on a random tiny T5: the fused order equals a
numpy brute force over the beam's images, weight 0 is today's generative ranking, and the evaluator reports
both rankings (`rerank/` metrics, ranked_<split>_rerank.jsonl, queries per second)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from avg_jax.identifiers.table import IdentifierTable
from avg_jax.retrieval.model import RerankConfig, Reranker, RetrievalModel, model_window
from avg_jax.t5.configs import named_t5_config
from avg_jax.t5.model import init_params
from avg_jax.training.evaluator import RetrievalEvaluator, rerank_path

BEAM, NUM_QUERIES, INPUT_LENGTH, DIM = 6, 12, 48, 8


@pytest.fixture(scope="module")
def setup(tiny_corpus, tiny_vocab):
    vocab = tiny_vocab
    config = named_t5_config("tiny", vocab_size=vocab.size)
    params = init_params(config, jax.random.key(2))
    # Two-token identifiers over a few text tokens, shared by several images each (so reranking reorders
    # images within an identifier as well as across identifiers).
    image_ids = [im.id for im in tiny_corpus.images]
    tokens = np.array([(3 + k % 5, 3 + (k // 5) % 4) for k in range(len(image_ids))], np.int32)
    table = IdentifierTable(image_ids=image_ids, tokens=tokens, lengths=np.full(len(image_ids), 2, np.int32),
                            scheme="grace_numeric", num_new_tokens=0, text_vocab_size=vocab.text_size,
                            fixed_length=True)
    model = RetrievalModel(config, vocab, window=model_window(table, config.vocab_size), input_length=INPUT_LENGTH,
                           target_length=table.max_len)
    rng = np.random.default_rng(0)
    w_text = rng.normal(size=(tiny_corpus.text_features.shape[1], DIM)).astype(np.float32)
    w_image = rng.normal(size=(tiny_corpus.image_features.shape[1], DIM)).astype(np.float32)
    return tiny_corpus, model, params, table, w_text, w_image


def _reranker(corpus, w_text, w_image, weight, temperature=0.5):
    return Reranker(RerankConfig(weight, temperature), [im.id for im in corpus.images],
                    corpus.image_features @ w_image, lambda x: x @ w_text)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_rerank_fused_order_equals_numpy_brute_force(setup):
    corpus, model, params, table, w_text, w_image = setup
    reranker = _reranker(corpus, w_text, w_image, weight=2.0)
    evaluator = RetrievalEvaluator(model, corpus, table, "test", beam_size=BEAM, batch_size=4, reranker=reranker)
    generative = evaluator.rankings(params, NUM_QUERIES)
    fused = evaluator.rankings(params, NUM_QUERIES, rerank=True)
    image_vec = {im.id: v for im, v in zip(corpus.images, _unit(corpus.image_features @ w_image), strict=True)}
    query_vec = _unit(corpus.text_features[corpus.query_rows("test")[:NUM_QUERIES]] @ w_text)
    moved = 0
    for q in range(NUM_QUERIES):
        pairs = list(zip(generative.images[q], generative.image_scores[q], strict=True))
        want = sorted(pairs, key=lambda p: -(p[1] + 2.0 * float(image_vec[p[0]] @ query_vec[q]) / 0.5))
        assert fused.images[q] == [p[0] for p in want], q  # only the beam's images, in fused order
        np.testing.assert_allclose(fused.image_scores[q],
                                   [p[1] + 4.0 * float(image_vec[p[0]] @ query_vec[q]) for p in want], rtol=1e-5)
        assert fused.identifiers[q] == generative.identifiers[q]  # the beam itself is unchanged
        moved += fused.images[q] != generative.images[q]
    assert moved  # the rerank changes something, so the comparison is not vacuous


def test_weight_zero_is_the_generative_ranking_and_errors(setup):
    corpus, model, params, table, w_text, w_image = setup
    evaluator = RetrievalEvaluator(model, corpus, table, "test", beam_size=BEAM, batch_size=4)
    inputs = evaluator.inputs[:NUM_QUERIES]
    features = corpus.text_features[corpus.query_rows("test")[:NUM_QUERIES]]
    plain = model.rank(params, inputs, evaluator.index, beam_size=BEAM, batch_size=4)
    off = model.rank(params, inputs, evaluator.index, beam_size=BEAM, batch_size=4,
                     rerank=_reranker(corpus, w_text, w_image, weight=0.0), query_features=features)
    assert off == plain
    on = _reranker(corpus, w_text, w_image, weight=1.0)
    with pytest.raises(ValueError, match="query_features"):
        model.rank(params, inputs, evaluator.index, beam_size=BEAM, batch_size=4, rerank=on)
    with pytest.raises(ValueError, match="query feature rows"):
        model.rank(params, inputs, evaluator.index, beam_size=BEAM, batch_size=4, rerank=on,
                   query_features=features[:3])
    with pytest.raises(ValueError, match="temperature"):
        RerankConfig(1.0, 0.0)
    with pytest.raises(ValueError, match="weight"):
        RerankConfig(-1.0)


def test_evaluator_reports_both_rankings(setup, tmp_path):
    corpus, model, params, table, w_text, w_image = setup
    evaluator = RetrievalEvaluator(model, corpus, table, "test", beam_size=BEAM, batch_size=16,
                                   reranker=_reranker(corpus, w_text, w_image, weight=2.0))
    path = tmp_path / "ranked_test.jsonl"
    metrics = evaluator.write_ranked(params, path)
    plain = [json.loads(line) for line in path.read_text().splitlines()]
    reranked = [json.loads(line) for line in rerank_path(path).read_text().splitlines()]
    assert rerank_path(path).name == "ranked_test_rerank.jsonl"
    assert len(plain) == len(reranked) == len(corpus.query_rows("test"))
    assert all(r["ranking"] == "rerank" and sorted(r["image_ids"]) == sorted(p["image_ids"])
               for p, r in zip(plain, reranked, strict=True))
    assert {"recall@1", "recall@5", "rerank/recall@1", "rerank/recall@5", "queries_per_s",
            "rerank/queries_per_s"} <= set(metrics)
    assert metrics["queries_per_s"] > 0 and metrics["rerank/queries_per_s"] > 0
    assert metrics["recall@1"] == evaluator.score(evaluator.rankings(params))["recall@1"]
    periodic = evaluator(params, step=1)
    assert "rerank/recall@1" in periodic and "recall@1" in periodic


def test_subset_equals_an_evaluator_built_over_those_queries(setup):
    """`subset` (the periodic evaluation's evenly spaced queries) shares the index and encodings; what it ranks
    and scores must equal an evaluator built from scratch over the same corpus rows, in their order."""
    corpus, model, params, table, w_text, w_image = setup
    reranker = _reranker(corpus, w_text, w_image, weight=2.0)
    full = RetrievalEvaluator(model, corpus, table, "test", beam_size=BEAM, batch_size=4, reranker=reranker)
    rows = full.query_rows[::3][::-1]  # not a prefix, not in corpus order
    sub = full.subset(rows)
    fresh = RetrievalEvaluator(model, corpus, table, "test", beam_size=BEAM, batch_size=4, reranker=reranker,
                               query_rows=rows)
    assert sub.index is full.index and sub.query_rows.tolist() == rows.tolist()
    np.testing.assert_array_equal(sub.inputs, fresh.inputs)
    np.testing.assert_array_equal(sub.query_features, corpus.text_features[rows])
    assert sub.relevant == [set(corpus.queries[j].image_ids) for j in rows]
    assert sub(params, step=1) == fresh(params, step=1)
    assert sub.rankings(params, rerank=True) == fresh.rankings(params, rerank=True)
    assert len(full.relevant) == len(full.query_rows) > len(rows)  # the full evaluator is left as it was
    train_row = int(corpus.query_rows("train")[0])
    with pytest.raises(ValueError, match=f"corpus row {train_row} is not one of this evaluator's 'test' queries"):
        full.subset(np.asarray([rows[0], train_row]))
    with pytest.raises(ValueError, match="no 'test' queries given"):
        full.subset(np.asarray([], np.int64))
