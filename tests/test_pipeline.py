"""grain batch pipeline: shapes, determinism, sharding, mid-epoch checkpoint/restore."""

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avg_jax.data.pipeline import corpus_examples, make_batch_iterator


def _examples(n, seed=0, max_len=9):
    rng = np.random.default_rng(seed)
    return [{"inputs": rng.integers(3, 100, size=int(rng.integers(1, max_len + 1))).astype(np.int32),
             "query_row": np.int32(i)} for i in range(n)]


def _take(it, k):
    return [next(it) for _ in range(k)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_batches_are_fixed_shape_padded_copies_of_the_examples():
    ex = _examples(30)
    it = make_batch_iterator(ex, 4, seed=1, seq_lengths={"inputs": 12}, shard_index=0, shard_count=1)
    for batch in _take(it, 20):  # crosses epoch boundaries
        assert batch["inputs"].shape == (4, 12) and batch["inputs"].dtype == np.int32
        assert batch["query_row"].shape == (4,) and batch["valid"].all()
        for row, q in zip(batch["inputs"], batch["query_row"], strict=True):
            tokens = ex[q]["inputs"]
            np.testing.assert_array_equal(row[: tokens.size], tokens)
            assert not row[tokens.size:].any()


def test_order_is_the_documented_seeded_permutation_per_epoch():
    n, seed = 23, 7
    it = make_batch_iterator(_examples(n), 5, seed, {"inputs": 9}, shard_index=0, shard_count=1, num_epochs=2,
                             drop_remainder=False)
    rows = np.concatenate([b["query_row"][b["valid"]] for b in it])
    expected = np.concatenate([np.random.default_rng([seed, e]).permutation(n) for e in range(2)])
    np.testing.assert_array_equal(rows, expected)


def test_same_seed_same_batches_other_seed_other_order():
    ex = _examples(40)
    a = _take(make_batch_iterator(ex, 8, 3, {"inputs": 9}, shard_index=0, shard_count=1), 6)
    b = _take(make_batch_iterator(ex, 8, 3, {"inputs": 9}, shard_index=0, shard_count=1, read_threads=2), 6)
    c = _take(make_batch_iterator(ex, 8, 4, {"inputs": 9}, shard_index=0, shard_count=1), 6)
    _assert_same(a, b)
    assert not np.array_equal(a[0]["query_row"], c[0]["query_row"])


@pytest.mark.parametrize("stop", [1, 3, 7])  # 7 batches of 8 > 50 examples: resumes inside epoch 2
def test_checkpoint_restore_mid_epoch_gives_the_uninterrupted_batches(stop):
    ex = _examples(50)

    def make():
        return make_batch_iterator(ex, 8, 11, {"inputs": 9}, shard_index=1, shard_count=2, read_threads=2)

    reference = _take(make(), stop + 5)
    it = make()
    _take(it, stop)
    state = json.loads(json.dumps(it.get_state()))  # JSON-able, as orbax / grain checkpoint handlers store it
    _take(it, 2)  # the interrupted run goes on a bit before "dying"
    resumed = make()
    resumed.set_state(state)
    _assert_same(_take(resumed, 5), reference[stop:])


def _shard_rows(n, shards, batch, epochs, drop):
    out = []
    for k in range(shards):
        it = make_batch_iterator(_examples(n), batch, 5, {"inputs": 9}, shard_index=k, shard_count=shards,
                                 num_epochs=epochs, drop_remainder=drop)
        batches = list(it)
        assert all(b["inputs"].shape == (batch, 9) for b in batches)
        out.append((len(batches), [r for b in batches for r in b["query_row"][b["valid"]].tolist()]))
    return out


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 60), shards=st.integers(1, 5), batch=st.integers(1, 7))
def test_shards_are_disjoint_cover_the_epoch_and_have_equal_batch_counts(n, shards, batch):
    per_shard = _shard_rows(n, shards, batch, epochs=1, drop=False)
    assert len({count for count, _ in per_shard}) == 1
    rows = [r for _, rs in per_shard for r in rs]
    assert sorted(rows) == list(range(n))  # disjoint and covering: every example exactly once


def test_drop_remainder_shards_stay_disjoint_with_equal_counts():
    per_shard = _shard_rows(53, 4, 4, epochs=1, drop=True)
    assert [count for count, _ in per_shard] == [3, 3, 3, 3]
    rows = [r for _, rs in per_shard for r in rs]
    assert len(rows) == len(set(rows)) == 48


def test_padding_rows_are_zero_and_marked_invalid():
    batches = list(make_batch_iterator(_examples(10), 4, 0, {"inputs": 9}, shard_index=0, shard_count=1,
                                       num_epochs=1, drop_remainder=False, shuffle=False))
    assert len(batches) == 3
    last = batches[-1]
    assert last["valid"].tolist() == [True, True, False, False]
    assert not last["inputs"][2:].any() and last["query_row"].tolist()[:2] == [8, 9]


def test_default_shard_is_this_jax_process():
    a = _take(make_batch_iterator(_examples(20), 4, 0, {"inputs": 9}), 3)
    b = _take(make_batch_iterator(_examples(20), 4, 0, {"inputs": 9}, shard_index=0, shard_count=1), 3)
    _assert_same(a, b)


def test_corpus_examples_pair_each_query_with_its_images(tiny_corpus):
    def tokenize(text):
        return [3 + len(w) for w in text.split()] + [1]

    ex = corpus_examples(tiny_corpus, "train", tokenize, targets=lambda image_id: [int(image_id[3:]) % 50 + 3, 1])
    train_rows = tiny_corpus.query_rows("train")
    assert [e["query_row"] for e in ex] == train_rows.tolist()
    index = tiny_corpus.image_index()
    for e in ex[:50]:
        q = tiny_corpus.queries[e["query_row"]]
        assert e["image_row"] == index[q.image_ids[0]]
        np.testing.assert_array_equal(e["inputs"], tokenize(q.text))
    batch = next(make_batch_iterator(ex, 16, 0, {"inputs": 40, "targets": 2}, shard_index=0, shard_count=1))
    assert batch["targets"].shape == (16, 2) and batch["image_row"].shape == (16,)


def test_bad_examples_and_arguments_are_named():
    ex = _examples(10, max_len=9)
    with pytest.raises(ValueError, match=r"example \d+: field 'inputs' has \d+ tokens > seq_lengths\['inputs'\] = 2"):
        make_batch_iterator(ex, 2, 0, {"inputs": 2}, shard_index=0, shard_count=1)
    cut = next(make_batch_iterator(ex, 2, 0, {"inputs": 2}, shard_index=0, shard_count=1, truncate=True, shuffle=False))
    np.testing.assert_array_equal(cut["inputs"][0], ex[0]["inputs"][:2])
    with pytest.raises(ValueError, match="example 3: keys"):
        make_batch_iterator([*ex[:3], {"inputs": ex[0]["inputs"]}], 2, 0, {"inputs": 9}, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="example 1: field 'inputs' must be a 1-D integer sequence"):
        make_batch_iterator([ex[0], {"inputs": np.ones(3, np.float32), "query_row": np.int32(1)}], 1, 0,
                            {"inputs": 9}, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match=r"shard_index 2 not in \[0, shard_count=2\)"):
        make_batch_iterator(ex, 2, 0, {"inputs": 9}, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="drop_remainder would yield no batch"):
        make_batch_iterator(ex, 8, 0, {"inputs": 9}, shard_index=0, shard_count=2, num_epochs=1)
    with pytest.raises(ValueError, match="no examples"):
        make_batch_iterator([], 8, 0, {"inputs": 9}, shard_index=0, shard_count=1)


def test_endless_iterator_keeps_going():
    it = make_batch_iterator(_examples(5), 2, 0, {"inputs": 9}, shard_index=0, shard_count=1)
    assert len(list(itertools.islice(it, 40))) == 40
