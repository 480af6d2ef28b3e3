"""GRACE identifier schemes against independent checks (sklearn k-means, brute-force nearest caption)."""

import numpy as np
import pytest
from sklearn.cluster import KMeans

from avg_jax.data.vocab import EOS_ID, Vocabulary, train_sentencepiece
from avg_jax.identifiers import grace


@pytest.fixture(scope="module")
def vocab(tiny_corpus, tmp_path_factory):
    texts = [q.text for q in tiny_corpus.queries if q.split == "train"] + [str(n) for n in range(1, 301)]
    return Vocabulary(train_sentencepiece(texts, tmp_path_factory.mktemp("spm") / "spm", vocab_size=300))


def test_numeric_one_digit_per_token_and_a_permutation(vocab):
    ids = [f"im{i}" for i in range(123)]
    table = grace.grace_numeric_identifiers(ids, vocab, seed=4)
    digit_of = {vocab.piece_id(d): d for d in "0123456789"}
    numbers = [int("".join(digit_of[t] for t in ident)) for ident in table.identifiers()]
    assert sorted(numbers) == list(range(1, 124)) and table.fixed_length and table.max_len == 3
    assert table.num_new_tokens == 0


def test_string_identifiers_decode_to_the_number(vocab):
    ids = [f"im{i}" for i in range(250)]
    table = grace.grace_string_identifiers(ids, vocab, seed=4)
    numeric = grace.grace_numeric_identifiers(ids, vocab, seed=4)
    digit_of = {vocab.piece_id(d): d for d in "0123456789"}
    assert not table.fixed_length and len(table.groups()) == 250
    for s_ident, n_ident in zip(table.identifiers(), numeric.identifiers(), strict=True):
        assert s_ident[-1] == EOS_ID
        assert vocab.decode(s_ident) == str(int("".join(digit_of[t] for t in n_ident)))
    assert table.lengths.mean() < numeric.max_len + 1  # multi-digit pieces, not one token per digit


def test_atomic_one_new_token_each():
    table = grace.grace_atomic_identifiers(["a", "b", "c"], text_vocab_size=1000)
    assert table.identifiers() == [(1000,), (1001,), (1002,)] and table.num_new_tokens == 3


def _blobs(rng, k, per, dim, spread):
    centers = rng.standard_normal((k, dim)) * 10
    return np.concatenate([c + rng.standard_normal((per, dim)) * spread for c in centers]).astype(np.float32)


def test_structured_identifiers_follow_the_cluster_tree():
    rng = np.random.default_rng(0)
    # 3 well separated groups of 3 sub-blobs each: a two-level tree that any k-means recovers.
    x = np.concatenate([_blobs(rng, 3, 20, 6, 0.05) + rng.standard_normal(6) * 100 for _ in range(3)])
    k, c, text = 3, 25, 500
    table = grace.grace_structured_identifiers([f"i{j}" for j in range(len(x))], x, text, seed=0, k=k, c=c)
    idents = table.identifiers()
    assert len(set(idents)) == len(x) and all(ident[-1] == EOS_ID for ident in idents)
    depth = table.metadata["depth"]
    first = np.array([ident[0] - text for ident in idents])
    assert ((0 <= first) & (first < k)).all()
    # Level 1 = sklearn's partition of the normalised features, up to label names.
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    ref = KMeans(k, n_init=10, random_state=0).fit_predict(xn)
    assert len(set(zip(first.tolist(), ref.tolist(), strict=True))) == k
    # Every node larger than c was split again; leaves hold <= c images; positions index the leaf.
    leaves = {}
    for j, ident in enumerate(idents):
        path, pos = ident[:-2], ident[-2] - text - depth * k
        for level, tok in enumerate(path):
            assert level * k <= tok - text < (level + 1) * k
        leaves.setdefault(path, []).append((pos, j))
    for path, members in leaves.items():
        assert len(members) <= c and len(path) == depth == 2
        assert sorted(p for p, _ in members) == list(range(len(members)))
        assert [j for _, j in sorted(members)] == sorted(j for _, j in members)  # table order
    # Level-2 assignments are a k-means fixed point inside each level-1 cluster (numpy check).
    for top in range(k):
        rows = np.flatnonzero(first == top)
        second = np.array([idents[r][1] for r in rows])
        labels = np.unique(second)
        cents = np.stack([xn[rows[second == s]].mean(0) for s in labels])
        nearest = labels[((xn[rows][:, None] - cents[None]) ** 2).sum(-1).argmin(1)]
        np.testing.assert_array_equal(nearest, second)


def test_structured_identical_points_do_not_recurse_forever():
    x = np.ones((40, 3), np.float32)
    table = grace.grace_structured_identifiers([f"i{j}" for j in range(40)], x, 100, seed=0, k=2, c=5)
    assert len(table.groups()) == 40 and table.metadata["num_position_tokens"] == 40


def test_semantic_identifiers_use_training_captions_only(vocab):
    rng = np.random.default_rng(1)
    train_caps = ["a red circle", "two blue squares", "a green star on the left", "three small hearts"]
    cap_emb = rng.standard_normal((4, 8)).astype(np.float32)
    image_emb = rng.standard_normal((6, 8)).astype(np.float32)
    own = ["two blue squares", None, None, "a red circle", None, None]  # images 1,2,4,5: no training caption
    table = grace.grace_semantic_identifiers([f"i{j}" for j in range(6)], own, image_emb, train_caps, cap_emb,
                                             vocab, collision_policy="share")
    norm = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    for j in range(6):
        if own[j] is not None:
            expect = own[j]
        else:  # brute force: the most cosine-similar training caption
            sims = [float(norm(image_emb)[j] @ norm(cap_emb)[t]) for t in range(4)]
            expect = train_caps[int(np.argmax(sims))]
        assert vocab.decode(table.identifier(j)) == expect
    assert table.metadata["num_nearest_training_caption"] == 4
