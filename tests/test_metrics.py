"""Retrieval metrics against a hand-computed example, trec_eval (pytrec_eval) and a numpy re-formulation."""

import itertools
import json

import numpy as np
import pytest
import pytrec_eval
from hypothesis import given, settings
from hypothesis import strategies as st

from avg_jax.evaluation import metrics


def test_hand_computed_example():
    ranked = [
        ["a", "b", "c"],                                   # relevant 'a' at rank 1
        ["x", "y", "z", "w", "v", "c"],                    # relevant 'c' at rank 6
        ["x", "b", "y"],                                   # relevant {'b', 'y'}: first at rank 2
        [],                                                # empty output
        ["p", "q", "r", "s", "t", "u", "v", "w", "x", "y", "z"],  # relevant 'z' at rank 11
    ]
    relevant = [{"a"}, {"c"}, {"b", "y"}, {"a"}, {"z"}]
    m = metrics.evaluate_images(ranked, relevant)
    assert m["recall@1"] == pytest.approx(1 / 5)
    assert m["recall@5"] == pytest.approx(2 / 5)
    assert m["recall@10"] == pytest.approx(3 / 5)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 6 + 1 / 2) / 5)
    assert m["empty_rate"] == pytest.approx(1 / 5)
    assert m["num_queries"] == 5


def test_identifier_level_inflated_by_collisions():
    # Identifiers (1, 2) is shared by three images; (3, 4) and (5, 6) are unique.
    groups = {(1, 2): ["i0", "i1", "i2"], (3, 4): ["i3"], (5, 6): ["i4"]}
    ranked = [[(1, 2), (3, 4)],   # relevant i2: identifier hit at 1; image rank 3
              [(3, 4), (1, 2)],   # relevant i1: identifier rank 2; image rank 1 + 2 = 3
              [(5, 6)],           # relevant i3: miss at both levels
              [(1, 2)]]           # relevant i0: hit at 1 at both levels (first in the group)
    relevant = [{"i2"}, {"i1"}, {"i3"}, {"i0"}]
    m = metrics.evaluate_identifiers(ranked, relevant, groups, ks=(1, 2, 3))
    assert m["identifier_recall@1"] == pytest.approx(2 / 4)
    assert m["identifier_recall@2"] == pytest.approx(3 / 4)
    assert m["recall@1"] == pytest.approx(1 / 4)
    assert m["recall@2"] == pytest.approx(1 / 4)
    assert m["recall@3"] == pytest.approx(3 / 4)
    assert m["collision_rate"] == pytest.approx(3 / 5)
    assert m["identifier_mrr@10"] == pytest.approx((1 + 1 / 2 + 0 + 1) / 4)
    assert m["mrr@10"] == pytest.approx((1 / 3 + 1 / 3 + 0 + 1) / 4)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_identifier_prefix_recall_matches_padded_array_reference(data):
    """Identifier prefix recall against a numpy reference over padded [.., L] arrays (cumprod of token
    equality); variable-length identifiers (a suffix token on some) included. Depth L of fixed-length
    identifiers equals identifier-level recall."""
    max_len = data.draw(st.integers(1, 4))
    fixed = data.draw(st.booleans())
    idents = data.draw(st.lists(st.lists(st.integers(0, 2), min_size=max_len if fixed else 1, max_size=max_len)
                                .map(tuple), min_size=1, max_size=8, unique=True))
    groups = {ident: [f"i{n}"] for n, ident in enumerate(idents)}
    ident_of = {f"i{n}": ident for n, ident in enumerate(idents)}
    images = list(ident_of)
    num_q = data.draw(st.integers(1, 6))
    relevant = [set(data.draw(st.lists(st.sampled_from(images), min_size=1, max_size=3))) for _ in range(num_q)]
    ranked = [data.draw(st.lists(st.sampled_from(idents), max_size=5)) for _ in range(num_q)]
    k = data.draw(st.integers(1, 5))
    got = metrics.identifier_prefix_recall(ranked, relevant, groups, k)
    top_len = max(len(i) for i in idents)

    def padded(ids, pad):  # generated padded with -1, relevant with -2: nothing matches past a shorter end
        return np.array([list(i) + [pad] * (top_len - len(i)) for i in ids]).reshape(-1, top_len)

    for depth in range(1, top_len + 1):
        hits = 0
        for rank, rel in zip(ranked, relevant, strict=True):
            if not rank[:k]:
                continue
            gen, tgt = padded(rank[:k], -1), padded([ident_of[i] for i in rel], -2)
            shared = np.cumprod(gen[:, None, :] == tgt[None, :, :], axis=-1).sum(-1)  # [k, rel]
            hits += bool((shared >= depth).any())
        assert got[f"identifier_prefix{depth}_recall@{k}"] == pytest.approx(hits / num_q)
    if fixed:
        id_level = metrics.identifier_level_metrics(ranked, relevant, groups, ks=(k,))
        assert got[f"identifier_prefix{max_len}_recall@{k}"] == pytest.approx(id_level[f"identifier_recall@{k}"])


def test_expand_identifiers_order_and_errors():
    groups = {(7,): ["b", "a"], (8,): ["c"]}
    assert metrics.expand_identifiers([(8,), (7,), (8,)], groups) == ["c", "b", "a"]
    with pytest.raises(ValueError, match=r"\(9,\) is not in the identifier table"):
        metrics.expand_identifiers([(9,)], groups)
    with pytest.raises(ValueError, match="appears under two identifiers"):
        metrics.image_to_identifier({(1,): ["a"], (2,): ["a"]})


def test_bad_inputs():
    with pytest.raises(ValueError, match="2 ranked lists but 1 relevance sets"):
        metrics.evaluate_images([["a"], ["b"]], [{"a"}])
    with pytest.raises(ValueError, match="query 0 has no relevant image"):
        metrics.evaluate_images([["a"]], [set()])
    with pytest.raises(ValueError, match="have no identifier in the table"):
        metrics.identifier_level_metrics([[(1,)]], [{"zz"}], {(1,): ["a"]})


rankings = st.lists(
    st.tuples(st.lists(st.integers(0, 30), max_size=15, unique=True),
              st.lists(st.integers(0, 30), min_size=1, max_size=4, unique=True)),
    min_size=1, max_size=25)


@settings(max_examples=60, deadline=None)
@given(rankings)
def test_matches_trec_eval(data):
    """success@k and reciprocal rank (run cut at 10) from trec_eval; empty runs count as misses."""
    ranked = [[f"d{d}" for d in r] for r, _ in data]
    relevant = [{f"d{d}" for d in rel} for _, rel in data]
    ours = metrics.evaluate_images(ranked, relevant)
    qrels = {f"q{j}": dict.fromkeys(rel, 1) for j, rel in enumerate(relevant)}
    # Strictly decreasing scores so trec_eval's tie-breaking never reorders our ranking.
    run = {f"q{j}": {d: float(len(r) - i) for i, d in enumerate(r)} for j, r in enumerate(ranked) if r}
    run10 = {q: {d: s for d, s in docs.items() if s > len(docs) - 10} for q, docs in run.items()}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"success.1,5,10"}).evaluate(run)
    per_query_rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run10)
    n = len(ranked)
    for k in (1, 5, 10):
        ref = sum(v[f"success_{k}"] for v in per_query.values()) / n
        assert ours[f"recall@{k}"] == pytest.approx(ref)
    assert ours["mrr@10"] == pytest.approx(sum(v["recip_rank"] for v in per_query_rr.values()) / n)
    assert ours["empty_rate"] == pytest.approx(sum(1 for r in ranked if not r) / n)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_image_level_matches_offset_formulation(data):
    """Image-level hit@K computed from group offsets (cumulative group sizes) in numpy, not by expansion."""
    num_images = data.draw(st.integers(1, 20))
    codes = np.array(data.draw(st.lists(st.integers(0, 5), min_size=num_images, max_size=num_images)))
    image_ids = [f"im{i}" for i in range(num_images)]
    groups: dict = {}
    for image_id, c in zip(image_ids, codes, strict=True):
        groups.setdefault((int(c),), []).append(image_id)
    keys = list(groups)
    ranked, relevant = [], []
    for _ in range(data.draw(st.integers(1, 10))):
        order = data.draw(st.permutations(range(len(keys))))[:data.draw(st.integers(0, len(keys)))]
        ranked.append([keys[i] for i in order])
        relevant.append({image_ids[i] for i in data.draw(
            st.lists(st.integers(0, num_images - 1), min_size=1, max_size=3))})
    ks = (1, 2, 5)
    ours = metrics.evaluate_identifiers(ranked, relevant, groups, ks=ks)
    for k in ks:
        hits, id_hits = [], []
        for r, rel in zip(ranked, relevant, strict=True):
            sizes = np.array([len(groups[key]) for key in r], dtype=np.int64)
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if sizes.size else sizes
            positions = [starts[a] + groups[key].index(im) for a, key in enumerate(r)
                         for im in groups[key] if im in rel]
            hits.append(bool(positions) and min(positions) < k)
            id_hits.append(any(any(im in rel for im in groups[key]) for key in r[:k]))
        assert ours[f"recall@{k}"] == pytest.approx(np.mean(hits))
        assert ours[f"identifier_recall@{k}"] == pytest.approx(np.mean(id_hits))
        assert ours[f"recall@{k}"] <= ours[f"identifier_recall@{k}"] + 1e-12
    sizes = np.bincount(codes)
    assert ours["collision_rate"] == pytest.approx(sizes[sizes > 1].sum() / num_images)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_beam_below_k_leaves_inapplicable_cutoffs_out(data):
    """A beam of b identifiers (b < 10): R@K for K <= b equals the unbounded value (numpy brute force on the
    expanded rankings, ties of a group included), R@K for K > b and MRR@10 are absent, at both levels."""
    beam = data.draw(st.sampled_from([1, 2, 5, 9, 10, 20]))
    groups = {(i,): [f"im{i}a", f"im{i}b"][: data.draw(st.integers(1, 2))] for i in range(12)}
    ranked, relevant = [], []
    for _ in range(data.draw(st.integers(1, 8))):
        ranked.append([(i,) for i in data.draw(st.permutations(range(12)))[:beam]])
        relevant.append({f"im{data.draw(st.integers(0, 11))}a"})
    ours = metrics.evaluate_identifiers(ranked, relevant, groups, num_results=beam)
    json.dumps(ours, allow_nan=False)  # JSON-valid: no NaN stands in for "-"
    for k in (1, 5, 10):
        for prefix in ("", "identifier_"):
            assert (f"{prefix}recall@{k}" in ours) == (k <= beam)
        if k <= beam:
            expanded = [[im for key in r for im in groups[key]] for r in ranked]
            ref = np.mean([any(im in rel for im in e[:k]) for e, rel in zip(expanded, relevant, strict=True)])
            assert ours[f"recall@{k}"] == pytest.approx(ref)
    assert ("mrr@10" in ours) == ("identifier_mrr@10" in ours) == (beam >= 10)
    with pytest.raises(ValueError, match=r"num_results .* must be >= 1, got 0"):
        metrics.evaluate_images([["a"]], [{"a"}], num_results=0)


def test_format_table_lists_systems():
    m = metrics.evaluate_identifiers([[(1,)]], [{"a"}], {(1,): ["a", "b"]})
    text = metrics.format_table({"avg": m, "dense": metrics.evaluate_images([["b", "a"]], [{"a"}])})
    assert "avg" in text and "dense" in text and "id_R@1" in text and "100.00" in text


@pytest.mark.parametrize("num_images,relevant_counts", [(6, [1, 2]), (7, [3]), (4, [1, 4]), (12, [2, 5])])
def test_chance_metrics_match_enumeration_and_sampling(num_images, relevant_counts):
    """Expected R@K / MRR@10 of a random ranking vs every permutation of the images (small n) or 20000 sampled
    permutations (n = 12), with r relevant images per query (R@K = 1 - C(n-r, K) / C(n, K), not min(K, n) / n)."""
    got = metrics.chance_metrics(num_images, relevant_counts)
    if num_images <= 7:
        perms, tol = np.array(list(itertools.permutations(range(num_images)))), 1e-9
    else:
        rng = np.random.default_rng(0)
        perms, tol = np.array([rng.permutation(num_images) for _ in range(20000)]), 0.015
    expected = {}
    for r in relevant_counts:  # images 0..r-1 are relevant; first relevant position of every permutation
        firsts = np.argmax(perms < r, axis=1) + 1
        for k in metrics.DEFAULT_KS:
            expected.setdefault(f"recall@{k}", []).append(np.mean(firsts <= k))
        expected.setdefault("mrr@10", []).append(np.mean(np.where(firsts <= 10, 1.0 / firsts, 0.0)))
    for key, values in expected.items():
        assert got[key] == pytest.approx(np.mean(values), abs=tol), key
    if max(relevant_counts) > 1:  # the naive min(K, n) / n is wrong when a query has several relevant images
        assert got["recall@1"] > 1 / num_images
