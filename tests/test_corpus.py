"""Corpus format: round trips, synthetic generator properties, and every documented bad input."""

import json

import numpy as np
import pytest

from avg_jax.data.corpus import Corpus, CorpusError, ImageRecord, QueryRecord
from avg_jax.data.synthetic import make_synthetic_corpus


def _write_minimal(tmp_path, **overrides):
    images = overrides.get("images", [ImageRecord("a", "train"), ImageRecord("b", "test")])
    queries = overrides.get("queries", [QueryRecord("red circle", "train", ("a",)),
                                        QueryRecord("blue star", "test", ("b",))])
    corpus = Corpus("mini", images, np.eye(2, 3, dtype=np.float32), queries, np.ones((2, 4), np.float32))
    return corpus.save(tmp_path / "c")


def test_round_trip_preserves_everything(tmp_path, tiny_corpus):
    out = tiny_corpus.save(tmp_path / "syn")
    back = Corpus.load(out)
    assert back.images == tiny_corpus.images
    assert back.queries == tiny_corpus.queries
    np.testing.assert_array_equal(back.image_features, tiny_corpus.image_features)
    np.testing.assert_array_equal(back.text_features, tiny_corpus.text_features)
    assert back.synthetic and back.name == "synthetic"
    lines = (out / "images.jsonl").read_text().splitlines()
    assert len(lines) == 300 and json.loads(lines[7])["id"] == tiny_corpus.images[7].id


def test_synthetic_is_deterministic_and_sized():
    a = make_synthetic_corpus(seed=3, num_images=120, num_val=10, num_test=20, image_dim=32, text_dim=16)
    b = make_synthetic_corpus(seed=3, num_images=120, num_val=10, num_test=20, image_dim=32, text_dim=16)
    c = make_synthetic_corpus(seed=4, num_images=120, num_val=10, num_test=20, image_dim=32, text_dim=16)
    assert a.queries == b.queries and a.images == b.images
    np.testing.assert_array_equal(a.image_features, b.image_features)
    np.testing.assert_array_equal(a.text_features, b.text_features)
    assert a.queries != c.queries
    assert a.image_features.shape == (120, 32) and a.text_features.shape == (a.num_queries, 16)
    assert a.num_queries == 120 * 5
    assert sum(im.split == "test" for im in a.images) == 20
    assert sum(im.split == "val" for im in a.images) == 10


def test_synthetic_test_split_disjoint_from_training_captions(tiny_corpus):
    split_of = {im.id: im.split for im in tiny_corpus.images}
    train_texts = {q.text for q in tiny_corpus.queries if q.split == "train"}
    test = [q for q in tiny_corpus.queries if q.split == "test"]
    assert test and not train_texts & {q.text for q in test}
    # queries carry the split of their image: test images' captions are never training queries
    assert all(q.split == split_of[q.image_ids[0]] for q in tiny_corpus.queries)


def test_synthetic_has_near_duplicates(tiny_corpus):
    x = tiny_corpus.image_features
    sims = x @ x.T
    np.fill_diagonal(sims, -1)
    # family members are much closer to each other than random pairs
    assert np.median(sims.max(1)) > np.median(sims) + 0.3


@pytest.mark.parametrize("mutate, message", [
    (lambda d: (d / "image_features.npy").unlink(), "corpus file missing"),
    (lambda d: np.save(d / "image_features.npy", np.zeros((2, 3), np.int32)), "floating point"),
    (lambda d: np.save(d / "image_features.npy", np.zeros((3, 3), np.float32)), "has 3 rows but images.jsonl has 2"),
    (lambda d: np.save(d / "image_features.npy", np.zeros((2,), np.float32)), "2-D"),
    (lambda d: np.save(d / "image_features.npy", np.array([[0, 1, np.nan], [1, 1, 1]], np.float32)),
     r"NaN/inf, first rows \[0\]"),
    (lambda d: np.save(d / "text_features.npy", np.full((2, 4), np.inf, np.float32)), "text_features.npy: 2 row"),
    (lambda d: (d / "images.jsonl").write_text('{"id": "a", "split": "train"}\n{"id": "a", "split": "test"}\n'),
     "line 2: field 'id': duplicate image id 'a'"),
    (lambda d: (d / "images.jsonl").write_text('{"id": "a", "split": "train"}\n{"id": "b", "split": "dev"}\n'),
     "line 2: field 'split': unknown split 'dev'"),
    (lambda d: (d / "queries.jsonl").write_text('{"text": "  ", "split": "train", "image_ids": ["a"]}\n'
                                                '{"text": "x", "split": "test", "image_ids": ["b"]}\n'),
     "queries.jsonl line 1: field 'text' is empty"),
    (lambda d: (d / "queries.jsonl").write_text('{"text": "y", "split": "train", "image_ids": ["a"]}\n'
                                                '{"text": "x", "split": "test", "image_ids": ["zz"]}\n'),
     "queries.jsonl line 2: field 'image_ids' names unknown image 'zz'"),
    (lambda d: (d / "queries.jsonl").write_text('{"text": "y", "split": "train"}\n'
                                                '{"text": "x", "split": "test", "image_ids": ["b"]}\n'),
     "line 1: missing field 'image_ids'"),
    (lambda d: (d / "queries.jsonl").write_text('{"text": "y", "split": "train", "image_ids": ["a"]}\n'),
     "text_features.npy: has 2 rows but queries.jsonl has 1"),
    (lambda d: (d / "images.jsonl").write_text('{"id": "a", "split": "train"}\nnot json\n'), "line 2: not valid JSON"),
])
def test_bad_input_names_file_field_and_value(tmp_path, mutate, message):
    d = _write_minimal(tmp_path)
    mutate(d)
    with pytest.raises((CorpusError, FileNotFoundError), match=message):
        Corpus.load(d)


def test_skip_bad_records_reports_and_keeps_rows_aligned(tmp_path, capsys):
    d = _write_minimal(tmp_path)
    (d / "queries.jsonl").write_text('{"text": "", "split": "train", "image_ids": ["a"]}\n'
                                     '{"text": "blue star", "split": "test", "image_ids": ["b"]}\n')
    np.save(d / "text_features.npy", np.array([[0, 0, 0, 1], [5, 6, 7, 8]], np.float32))
    c = Corpus.load(d, skip_bad_records=True)
    assert [q.text for q in c.queries] == ["blue star"]
    np.testing.assert_array_equal(c.text_features, [[5, 6, 7, 8]])
    assert c.metadata["skipped_query_records"] == 1
    out = capsys.readouterr().out
    assert "skipped 1 bad query record" in out and "line 1" in out


def test_unknown_split_argument_is_an_error(tiny_corpus):
    with pytest.raises(CorpusError, match="unknown split 'testing'"):
        tiny_corpus.image_rows("testing")
