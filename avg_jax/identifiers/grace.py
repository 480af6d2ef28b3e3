"""GRACE's image identifiers (paper §3.3) as identifier tables.

  numeric     images shuffled (seeded) and numbered 1..n; the number, zero-padded to a fixed width, one
              digit per token (the vocabulary's single-character digit pieces). Fixed length, no EOS.
  string      the same number as text, tokenized by the SentencePiece vocabulary (multi-digit pieces). EOS.
  semantic    a caption-like text: a train image with training captions gets its first one (corpus order);
              every other image (val/test, or a train image without captions) gets the TRAINING caption
              nearest to its projected image feature in the code space of the InfoNCE-trained heads. An
              image's own captions are never looked at unless they are training captions of that image,
              standing in for GRACE's caption model trained on the training set. EOS. Images that end up
              with the same text collide; the collision policy resolves them (ordered by the image-caption
              distance).
  structured  hierarchical k-means over the (L2-normalised) image features: k clusters per level, clusters
              with more than c images are split again; a leaf appends the image's position in the leaf.
              Cluster j at level l is new token l*k + j ("C_l_j"); position p is new token L*k + p, with L
              the deepest level. Unique by construction. EOS (depths differ).
  atomic      one new token per image (table order). Fixed length 1.
New-token ids are `text_vocab_size + j` (see avg_jax/data/vocab.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import gin
import numpy as np

from avg_jax.data.corpus import normalize_rows
from avg_jax.data.vocab import UNK_ID, Vocabulary
from avg_jax.identifiers.table import IdentifierTable, make_identifier_table
from avg_jax.tokenizer.kmeans import kmeans_numpy

DIGITS = "0123456789"


def grace_numbers(num_images: int, seed: int) -> np.ndarray:
    """The number (1..n) of each image in table order, from a seeded shuffle."""
    numbers = np.empty((num_images,), np.int64)
    numbers[np.random.default_rng(seed).permutation(num_images)] = np.arange(1, num_images + 1)
    return numbers


def digit_token_ids(vocab: Vocabulary) -> list[int]:
    """Vocabulary ids of the ten single-digit pieces; a clear error when the model lacks one."""
    ids = [vocab.piece_id(d) for d in DIGITS]
    missing = [d for d, i in zip(DIGITS, ids, strict=True) if i == UNK_ID]
    if missing:
        raise ValueError(f"SentencePiece model {vocab.path} has no single piece for digit(s) {missing}; numeric "
                         "identifiers need one per digit (train it on texts containing numbers)")
    return ids


def _pad_bodies(seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(s) for s in seqs], np.int32)
    if (lengths == 0).any():
        raise ValueError(f"empty identifier body for row {int(np.flatnonzero(lengths == 0)[0])}")
    bodies = np.zeros((len(seqs), int(lengths.max()) if len(seqs) else 1), np.int32)
    for i, s in enumerate(seqs):
        bodies[i, : len(s)] = s
    return bodies, lengths


def grace_numeric_identifiers(image_ids: Sequence[str], vocab: Vocabulary, seed: int) -> IdentifierTable:
    numbers = grace_numbers(len(image_ids), seed)
    width = len(str(len(image_ids)))
    digits = np.array(digit_token_ids(vocab), np.int32)
    chars = np.array([[int(ch) for ch in f"{n:0{width}d}"] for n in numbers], np.int64).reshape(-1, width)
    return make_identifier_table(image_ids, digits[chars], np.full(len(image_ids), width), scheme="grace_numeric",
                                 num_scheme_tokens=0, text_vocab_size=vocab.text_size, variable_length=False,
                                 metadata={"seed": seed, "width": width, "digit_token_ids": digits.tolist()})


def grace_string_identifiers(image_ids: Sequence[str], vocab: Vocabulary, seed: int,
                             collision_policy: str = "suffix") -> IdentifierTable:
    numbers = grace_numbers(len(image_ids), seed)
    bodies, lengths = _pad_bodies([vocab.encode(str(n), add_eos=False) for n in numbers])
    return make_identifier_table(image_ids, bodies, lengths, scheme="grace_string", num_scheme_tokens=0,
                                 text_vocab_size=vocab.text_size, variable_length=True,
                                 collision_policy=collision_policy, metadata={"seed": seed})


@gin.configurable(denylist=["image_ids", "own_captions", "image_emb", "train_captions", "train_caption_emb",
                            "vocab", "collision_policy"])
def grace_semantic_identifiers(
    image_ids: Sequence[str],
    own_captions: Sequence[str | None],
    image_emb: np.ndarray,
    train_captions: Sequence[str],
    train_caption_emb: np.ndarray,
    vocab: Vocabulary,
    collision_policy: str = "suffix",
    max_caption_tokens: int = 32,
) -> IdentifierTable:
    """own_captions[i]: image i's first TRAINING caption or None; embeddings are L2-normalised code space."""
    if len(train_captions) == 0:
        raise ValueError("semantic identifiers need at least one training caption")
    image_emb, train_caption_emb = normalize_rows(image_emb), normalize_rows(train_caption_emb)
    nearest = np.empty((len(image_ids),), np.int64)
    for start in range(0, len(image_ids), 4096):  # [chunk, num_train_captions] similarities
        nearest[start:start + 4096] = np.argmax(image_emb[start:start + 4096] @ train_caption_emb.T, axis=1)
    texts, source = [], []
    for i, own in enumerate(own_captions):
        texts.append(own if own is not None else train_captions[nearest[i]])
        source.append("own_training_caption" if own is not None else "nearest_training_caption")
    seqs = [vocab.encode(t, add_eos=False)[:max_caption_tokens] for t in texts]
    bodies, lengths = _pad_bodies(seqs)
    caption_of = {t: j for j, t in enumerate(train_captions)}
    dist = np.sum((image_emb - train_caption_emb[[caption_of[t] for t in texts]]) ** 2, axis=1)
    return make_identifier_table(
        image_ids, bodies, lengths, scheme="grace_semantic", num_scheme_tokens=0, text_vocab_size=vocab.text_size,
        variable_length=True, collision_policy=collision_policy, order_key=dist,
        metadata={"max_caption_tokens": max_caption_tokens,
                  "num_nearest_training_caption": source.count("nearest_training_caption")})


@gin.configurable(denylist=["image_ids", "features", "text_vocab_size", "seed"])
def grace_structured_identifiers(
    image_ids: Sequence[str],
    features: np.ndarray,
    text_vocab_size: int,
    seed: int,
    k: int = 10,
    c: int = 100,
    kmeans_iters: int = 25,
) -> IdentifierTable:
    """Hierarchical k-means paths + positional suffix (see module docstring)."""
    if k < 2 or c < 1:
        raise ValueError(f"grace_structured_identifiers needs k >= 2 and c >= 1, got k={k}, c={c}")
    paths, positions = hierarchical_kmeans(normalize_rows(features), k, c, seed, kmeans_iters)
    depth = max((len(p) for p in paths), default=0)
    num_positions = int(positions.max()) + 1 if positions.size else 1
    seqs = [[text_vocab_size + level * k + j for level, j in enumerate(path)]
            + [text_vocab_size + depth * k + int(pos)] for path, pos in zip(paths, positions, strict=True)]
    bodies, lengths = _pad_bodies(seqs)
    return make_identifier_table(
        image_ids, bodies, lengths, scheme="grace_structured", num_scheme_tokens=depth * k + num_positions,
        text_vocab_size=text_vocab_size, variable_length=True,
        metadata={"k": k, "c": c, "seed": seed, "depth": depth, "num_position_tokens": num_positions,
                  "cluster_token": "text_vocab_size + level * k + cluster",
                  "position_token": "text_vocab_size + depth * k + position"})


def hierarchical_kmeans(x: np.ndarray, k: int, c: int, seed: int, num_iters: int = 25,
                        ) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """Cluster path (tuple of cluster indices) and position inside its leaf, per row of x [n, d].

    A node with more than c rows is split by k-means into k children (empty ones dropped); a node that
    k-means cannot split (all rows identical) becomes an oversized leaf rather than recursing forever.
    """
    n = x.shape[0]
    paths: list[tuple[int, ...]] = [()] * n
    positions = np.zeros((n,), np.int64)
    stack: list[tuple[np.ndarray, tuple[int, ...]]] = [(np.arange(n), ())]
    while stack:
        rows, prefix = stack.pop()
        assign = None
        if rows.size > c:
            _, assign = kmeans_numpy(x[rows], k, seed=seed + len(prefix), num_iters=num_iters)
            if np.unique(assign).size < 2:
                assign = None
        if assign is None:  # leaf: positions in table order
            for pos, r in enumerate(rows):
                paths[r], positions[r] = prefix, pos
            continue
        for j in sorted(np.unique(assign).tolist(), reverse=True):
            stack.append((rows[assign == j], (*prefix, int(j))))
    return paths, positions


def grace_atomic_identifiers(image_ids: Sequence[str], text_vocab_size: int) -> IdentifierTable:
    n = len(image_ids)
    return make_identifier_table(image_ids, (text_vocab_size + np.arange(n, dtype=np.int32))[:, None],
                                 np.ones(n, np.int32), scheme="grace_atomic", num_scheme_tokens=n,
                                 text_vocab_size=text_vocab_size, variable_length=False,
                                 metadata={"atomic_token": "text_vocab_size + table row"})
