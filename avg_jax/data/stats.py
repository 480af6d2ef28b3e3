"""Corpus statistics (`avg-jax data inspect`): counts per split, feature dims, caption lengths, duplicates."""

from __future__ import annotations

import collections
import itertools

import numpy as np

from avg_jax.data.corpus import SPLITS, Corpus


def corpus_stats(corpus: Corpus) -> dict:
    """Counts per split, feature dims, a caption-length histogram and duplicate captions / image features."""
    images = collections.Counter(im.split for im in corpus.images)
    queries = collections.Counter(q.split for q in corpus.queries)
    lengths = np.array([len(q.text.split()) for q in corpus.queries])
    edges = [1, 3, 5, 8, 12, 20, 40, 10**9]
    hist = {f"{lo}-{hi - 1}" if hi < 10**9 else f"{lo}+": int(((lengths >= lo) & (lengths < hi)).sum())
            for lo, hi in itertools.pairwise(edges)}
    texts = collections.Counter(q.text for q in corpus.queries)
    has_features = corpus.image_features.shape[1] > 0
    if has_features:
        _, first = np.unique(np.round(corpus.image_features, 5), axis=0, return_index=True)
    return {
        "name": corpus.name,
        "synthetic": corpus.synthetic,
        "images_per_split": {s: images.get(s, 0) for s in SPLITS},
        "queries_per_split": {s: queries.get(s, 0) for s in SPLITS},
        "image_dim": int(corpus.image_features.shape[1]),
        "text_dim": None if corpus.text_features is None else int(corpus.text_features.shape[1]),
        "caption_words_histogram": hist,
        "caption_words_mean": float(lengths.mean()) if lengths.size else 0.0,
        "duplicate_caption_texts": sum(c - 1 for c in texts.values() if c > 1),
        "duplicate_image_features": int(corpus.num_images - first.size) if has_features else None,
    }
