"""IdentifierTable format and collision policies, checked against plain-Python grouping."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avg_jax.data.vocab import EOS_ID
from avg_jax.identifiers.table import (
    IdentifierTable,
    IdentifierTableError,
    collision_stats,
    make_identifier_table,
    position_usage_stats,
)

TEXT = 500


def _codes(rng, n, m, alphabet):
    return rng.integers(0, alphabet, size=(n, m)).astype(np.int32) + TEXT


def _python_groups(rows):
    out = {}
    for i, r in enumerate(rows):
        out.setdefault(tuple(int(v) for v in r), []).append(i)
    return out


@given(n=st.integers(1, 60), m=st.integers(1, 4), alphabet=st.integers(1, 4), seed=st.integers(0, 10**6))
@settings(max_examples=40, deadline=None)
def test_suffix_policy_unique_and_ordered_by_key(n, m, alphabet, seed):
    rng = np.random.default_rng(seed)
    codes = _codes(rng, n, m, alphabet)
    key = rng.random(n)
    ids = [f"im{i}" for i in range(n)]
    table = make_identifier_table(ids, codes, np.full(n, m), scheme="rq", num_scheme_tokens=alphabet,
                                  text_vocab_size=TEXT, variable_length=False, order_key=key)
    idents = table.identifiers()
    assert len(set(idents)) == n
    groups = _python_groups(codes)
    if all(len(g) == 1 for g in groups.values()):
        assert table.max_len == m and table.metadata["num_suffix_tokens"] == 0
        return
    suffix_start = TEXT + alphabet
    assert table.max_len == m + 1 and table.fixed_length
    assert table.metadata["suffix_token_range"][0] == suffix_start
    for members in groups.values():
        expected = sorted(members, key=lambda i: (key[i], i))
        for rank, i in enumerate(expected):
            assert idents[i][:m] == tuple(codes[i])
            assert idents[i][m] == suffix_start + rank
    assert table.num_new_tokens == alphabet + max(len(g) for g in groups.values())


@given(n=st.integers(1, 60), m=st.integers(1, 3), alphabet=st.integers(1, 3), seed=st.integers(0, 10**6))
@settings(max_examples=40, deadline=None)
def test_share_policy_groups_exactly_the_colliding_images(n, m, alphabet, seed):
    rng = np.random.default_rng(seed)
    codes = _codes(rng, n, m, alphabet)
    ids = [f"im{i}" for i in range(n)]
    table = make_identifier_table(ids, codes, np.full(n, m), scheme="rq", num_scheme_tokens=alphabet,
                                  text_vocab_size=TEXT, variable_length=False, collision_policy="share")
    expected = {k: [ids[i] for i in v] for k, v in _python_groups(codes).items()}
    assert table.groups() == expected
    colliding = sum(len(v) for v in expected.values() if len(v) > 1)
    assert table.metadata["collisions_before_policy"]["collision_rate"] == pytest.approx(colliding / n)
    assert table.num_new_tokens == alphabet


def test_variable_length_suffix_goes_before_eos():
    bodies = np.array([[5, 6, 0], [5, 6, 0], [5, 6, 7], [8, 0, 0]], np.int32)
    lengths = np.array([2, 2, 3, 1])
    table = make_identifier_table(["a", "b", "c", "d"], bodies, lengths, scheme="grace_semantic",
                                  num_scheme_tokens=0, text_vocab_size=TEXT, variable_length=True,
                                  order_key=np.array([0.5, 0.1, 0.0, 0.0]))
    assert not table.fixed_length
    assert table.identifiers() == [(5, 6, TEXT + 1, EOS_ID), (5, 6, TEXT + 0, EOS_ID),
                                   (5, 6, 7, TEXT + 0, EOS_ID), (8, TEXT + 0, EOS_ID)]
    assert table.num_new_tokens == 2


def test_round_trip_and_subset(tmp_path):
    rng = np.random.default_rng(0)
    codes = _codes(rng, 50, 3, 4)
    table = make_identifier_table([f"x{i}" for i in range(50)], codes, np.full(50, 3), scheme="rq",
                                  num_scheme_tokens=4, text_vocab_size=TEXT, variable_length=False,
                                  order_key=rng.random(50), metadata={"codebook_size": np.int64(4)})
    back = IdentifierTable.load(table.save(tmp_path / "t"))
    assert back.image_ids == table.image_ids and back.scheme == "rq" and back.fixed_length
    np.testing.assert_array_equal(back.tokens, table.tokens)
    np.testing.assert_array_equal(back.lengths, table.lengths)
    assert back.metadata["codebook_size"] == 4 and back.num_new_tokens == table.num_new_tokens
    sub = back.subset(["x7", "x3"])
    assert sub.image_ids == ["x7", "x3"] and sub.identifiers() == [table.identifier(7), table.identifier(3)]
    with pytest.raises(KeyError, match="nope"):
        back.subset(["nope"])


@pytest.mark.parametrize(("tokens", "lengths", "fixed", "match"), [
    ([[TEXT, 0, TEXT]], [3], True, "PAD"),
    ([[TEXT, TEXT]], [1], False, "non-PAD token after"),
    ([[TEXT, TEXT + 1]], [2], False, "not ended by EOS"),
    ([[TEXT, EOS_ID]], [2], True, "EOS in a fixed-length"),
    ([[TEXT + 99, TEXT]], [2], True, "outside"),
    ([[TEXT, TEXT], [TEXT, 0]], [2, 1], True, "fixed-length table but row 1"),
])
def test_validation_names_the_problem(tokens, lengths, fixed, match):
    with pytest.raises(IdentifierTableError, match=match):
        IdentifierTable(image_ids=[f"i{k}" for k in range(len(tokens))], tokens=np.array(tokens, np.int32),
                        lengths=np.array(lengths, np.int32), scheme="rq", num_new_tokens=2,
                        text_vocab_size=TEXT, fixed_length=fixed)


def test_load_rejects_bad_metadata(tmp_path):
    table = IdentifierTable(["a"], np.array([[TEXT]], np.int32), np.array([1], np.int32), "rq", 1, TEXT, True)
    root = table.save(tmp_path / "t")
    meta = json.loads((root / "identifiers.json").read_text())
    meta["num_new_tokens"] = "many"
    (root / "identifiers.json").write_text(json.dumps(meta))
    with pytest.raises(IdentifierTableError, match="num_new_tokens"):
        IdentifierTable.load(root)
    (root / "tokens.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokens\.npy"):
        IdentifierTable.load(root)


def test_stats_against_counts():
    tokens = np.array([[10, 20], [10, 21], [10, 20], [11, 22]], np.int32)
    stats = collision_stats(tokens)
    assert stats["collision_rate"] == 0.5 and stats["num_colliding_groups"] == 1 and stats["max_group_size"] == 2
    usage = position_usage_stats(tokens, np.full(4, 2))
    assert [u["distinct_tokens"] for u in usage] == [2, 3]
    p = np.array([3, 1]) / 4
    assert usage[0]["perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))


@given(n=st.integers(1, 60), m=st.integers(1, 3), alphabet=st.integers(1, 3), seed=st.integers(0, 10**6))
@settings(max_examples=30, deadline=None)
def test_suffix_scope_ranks_within_each_split(n, m, alphabet, seed):
    """suffix_scope: an image's suffix is its rank (by key, then table order) among the images of its OWN
    scope sharing its body, so identifiers are unique within a scope and a scope's first image gets rank 0
    whatever the other scopes hold; without a scope it is the rank over all images."""
    rng = np.random.default_rng(seed)
    codes = _codes(rng, n, m, alphabet)
    key = rng.random(n)
    split = rng.choice(["train", "val", "test"], n)
    ids = [f"i{i}" for i in range(n)]
    scoped = make_identifier_table(ids, codes, np.full(n, m), scheme="rq", num_scheme_tokens=alphabet,
                                   text_vocab_size=TEXT, variable_length=False, order_key=key, suffix_scope=split)
    plain = make_identifier_table(ids, codes, np.full(n, m), scheme="rq", num_scheme_tokens=alphabet,
                                  text_vocab_size=TEXT, variable_length=False, order_key=key)
    start = TEXT + alphabet
    for table, scope in ((scoped, split), (plain, np.array(["all"] * n))):
        if table.max_len == m:  # nothing collides anywhere: no suffix
            assert len(_python_groups(codes)) == n
            continue
        for i in range(n):
            peers = [j for j in range(n) if scope[j] == scope[i] and (codes[j] == codes[i]).all()]
            expected = sorted(peers, key=lambda j: (key[j], j)).index(i)
            assert table.identifier(i) == (*codes[i].tolist(), start + expected)
    for s in set(split.tolist()):  # unique within a split
        rows = [i for i in range(n) if split[i] == s]
        assert len({scoped.identifier(i) for i in rows}) == len(rows)


def test_suffix_scope_gives_a_lone_test_image_rank_zero():
    codes = np.array([[TEXT, TEXT + 1]] * 3, np.int32)
    table = make_identifier_table(["tr0", "tr1", "te0"], codes, np.full(3, 2), scheme="rq", num_scheme_tokens=2,
                                  text_vocab_size=TEXT, variable_length=False, order_key=np.array([0.0, 0.1, 0.2]),
                                  suffix_scope=["train", "train", "test"])
    assert [t[-1] - TEXT - 2 for t in table.identifiers()] == [0, 1, 0]
    assert table.metadata["suffix_scope"] == "scoped"
    with pytest.raises(ValueError, match="suffix_scope"):
        make_identifier_table(["a", "b"], codes[:2], np.full(2, 2), scheme="rq", num_scheme_tokens=2,
                              text_vocab_size=TEXT, variable_length=False, suffix_scope=["train"])
