"""`avg-jax data ...` subcommands: make the synthetic corpus, inspect any corpus directory."""

from __future__ import annotations

import argparse
import collections
import itertools
import json
from pathlib import Path

import numpy as np

from avg_jax import cli, config
from avg_jax.data import emoji
from avg_jax.data.corpus import SPLITS, Corpus


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="build, convert and inspect corpora")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("make-synthetic", help="write the built-in SYNTHETIC benchmark corpus")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    cli.add_gin_flags(p)
    p.set_defaults(func=make_synthetic)

    emoji.add_parser(sub)

    p = sub.add_parser("inspect", help="counts per split, feature dims, caption lengths, duplicates")
    p.add_argument("corpus_dir")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    cli.add_gin_flags(p)
    p.set_defaults(func=inspect)


def make_synthetic(args: argparse.Namespace) -> int:
    from avg_jax.data.synthetic import make_synthetic_corpus

    config.parse_gin(args.gin_file, args.gin_param)
    corpus = make_synthetic_corpus(seed=args.seed)
    out = corpus.save(args.out)
    config.write_operative_config(out)
    print(f"wrote SYNTHETIC corpus to {out}: {corpus.num_images} images, {corpus.num_queries} queries")
    return 0


def corpus_stats(corpus: Corpus) -> dict:
    """The statistics `data inspect` prints."""
    images = collections.Counter(im.split for im in corpus.images)
    queries = collections.Counter(q.split for q in corpus.queries)
    lengths = np.array([len(q.text.split()) for q in corpus.queries])
    edges = [1, 3, 5, 8, 12, 20, 40, 10**9]
    hist = {f"{lo}-{hi - 1}" if hi < 10**9 else f"{lo}+": int(((lengths >= lo) & (lengths < hi)).sum())
            for lo, hi in itertools.pairwise(edges)}
    texts = collections.Counter(q.text for q in corpus.queries)
    rounded = np.round(corpus.image_features, 5)
    _, first = np.unique(rounded, axis=0, return_index=True)
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
        "duplicate_image_features": int(corpus.num_images - first.size),
    }


def inspect(args: argparse.Namespace) -> int:
    corpus = Corpus.load(Path(args.corpus_dir))
    stats = corpus_stats(corpus)
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    if corpus.synthetic:
        print("NOTE: this corpus is SYNTHETIC (generated scenes and random-network features, not real images).")
    print(f"corpus {stats['name']!r} at {args.corpus_dir}")
    for s in SPLITS:
        print(f"  {s:5s}: {stats['images_per_split'][s]:7d} images  {stats['queries_per_split'][s]:8d} queries")
    print(f"  feature dims: image {stats['image_dim']}, text {stats['text_dim']}")
    print(f"  caption length (words), mean {stats['caption_words_mean']:.1f}:")
    peak = max(stats["caption_words_histogram"].values()) or 1
    for k, v in stats["caption_words_histogram"].items():
        print(f"    {k:>6s} {v:8d} {'#' * round(40 * v / peak)}")
    print(f"  duplicate caption texts: {stats['duplicate_caption_texts']}")
    print(f"  duplicate image feature rows: {stats['duplicate_image_features']}")
    return 0
