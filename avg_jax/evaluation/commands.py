"""`avg-jax eval` (metrics of ranked outputs), `avg-jax eval-dense` (the dense two-tower baseline) and
`avg-jax eval-ceiling` (the no-T5 ceilings of a trained tokenizer's identifiers).

The ranked-output JSONL format and its scoring: avg_jax/evaluation/ranked.py; the dense baseline:
avg_jax/evaluation/dense.py; the ceilings: avg_jax/evaluation/ceiling.py. `--identifiers` enables
identifier-level recall.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from avg_jax import cli, config
from avg_jax.data.corpus import SPLITS, Corpus
from avg_jax.evaluation import ceiling, dense, metrics
from avg_jax.evaluation.ranked import (
    NOVELTY_GROUPS,
    evaluate_ranked,
    paired_comparison,
    query_novelty,
    read_ranked_jsonl,
    write_metrics,
    write_ranked_jsonl,
)
from avg_jax.json_io import write_json
from avg_jax.tokenizer.train import load_tokenizer

RANKED_FILE = "ranked.jsonl"
PAIRED_FILE = "paired.json"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="metrics.json + table from ranked outputs (JSONL) on a corpus split")
    p.add_argument("--corpus", required=True, help="corpus directory")
    p.add_argument("--ranked", required=True, action="append",
                   help="ranked-output JSONL; repeat as NAME=FILE to compare systems")
    p.add_argument("--identifiers", help="identifier table directory, for identifier-level recall")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--beam_size", type=int, default=None,
                   help="the beam that produced the rankings: R@K above it (and MRR@10 below 10) is inapplicable "
                        "and left out, as the paper's '-'")
    p.add_argument("--by_novelty", action="store_true",
                   help="also score each system on the queries grouped by how new their text is to training "
                        "(seen text / new text of known words / a new word): rows 'NAME [group]'")
    p.add_argument("--prefix_recall_at", type=int, default=None, metavar="K",
                   help="with --identifiers: also the identifier prefix recall at K (depth d = a generated "
                        "identifier among the first K agrees with a relevant image's on its first d tokens), "
                        "printed as a second table: where in the identifier the generator loses the query")
    p.add_argument("--paired", action="store_true",
                   help="also compare every later --ranked system with the FIRST on the same queries: per K the "
                        "queries only one of the two finds within K and the exact sign test over them "
                        f"(table + OUT/{PAIRED_FILE})")
    p.add_argument("--out", required=True, help="output directory for metrics.json")
    cli.add_gin_flags(p)
    p.set_defaults(func=run_eval)

    p = subparsers.add_parser("eval-dense", help="the dense two-tower baseline (exact search) on a corpus split")
    p.add_argument("--corpus", required=True, help="corpus directory")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--backend", default="jax", choices=dense.BACKENDS)
    p.add_argument("--projection", default="none", choices=dense.PROJECTIONS,
                   help="none: features already aligned (e.g. CLIP); ridge: a linear text->image map fitted on "
                        "the train split's (query, image) pairs; heads: the contrastive projection heads of a "
                        "trained tokenizer (--tokenizer)")
    p.add_argument("--tokenizer", help="tokenizer directory whose heads --projection heads uses")
    p.add_argument("--out", required=True, help="output directory for metrics.json and ranked.jsonl")
    cli.add_gin_flags(p)
    p.set_defaults(func=run_eval_dense)

    p = subparsers.add_parser("eval-ceiling", help="the no-T5 ceilings of a tokenizer's identifiers on a corpus split "
                                                   "(what their aligned geometry alone ranks)")
    p.add_argument("--corpus", required=True, help="corpus directory")
    p.add_argument("--tokenizer", required=True, help="a trained RQ tokenizer's output directory (`avg-jax tokenize`)")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--mode", action="append", choices=ceiling.MODES,
                   help="'ceiling': <text head(query), quantized image>; 'ceiling_codes': the query's own RQ code "
                        "prefix (repeat for both; default both)")
    p.add_argument("--out", required=True, help="output directory for metrics.json and ranked_<mode>.jsonl")
    cli.add_gin_flags(p)
    p.set_defaults(func=run_eval_ceiling)


def run_eval(args: argparse.Namespace) -> int:
    config.parse_gin(args.gin_file, args.gin_param)
    if args.prefix_recall_at is not None and (not args.identifiers or args.prefix_recall_at < 1):
        raise ValueError(f"--prefix_recall_at {args.prefix_recall_at} needs --identifiers DIR and K >= 1")
    if args.paired and len(args.ranked) < 2:
        raise ValueError("--paired compares systems: give at least two --ranked NAME=FILE")
    corpus = Corpus.load(args.corpus)
    groups = None
    if args.identifiers:
        from avg_jax.identifiers.table import IdentifierTable

        split_ids = [corpus.images[i].id for i in corpus.image_rows(args.split)]
        try:
            groups = IdentifierTable.load(args.identifiers).subset(split_ids).groups()
        except KeyError as e:
            raise ValueError(f"{args.identifiers}: {e.args[0]} ({args.split!r} images of {args.corpus})") from None
    novelty_of = None  # query row -> NOVELTY_GROUPS entry, the same for every system
    if args.by_novelty:
        rows = corpus.query_rows(args.split)
        novelty_of = dict(zip(rows.tolist(), query_novelty(corpus, rows), strict=True))
    systems, ranked = {}, {}
    for spec in args.ranked:
        name, _, file = spec.rpartition("=")
        name = name or Path(file).stem
        outputs = ranked[name] = read_ranked_jsonl(file, corpus, args.split)
        if groups is not None and outputs.identifiers is None:
            raise ValueError(f"{file}: --identifiers was given but the file has no 'identifiers' field")
        systems[name] = evaluate_ranked(corpus, outputs, groups, num_results=args.beam_size,
                                        prefix_k=args.prefix_recall_at)
        if novelty_of is not None:
            novelty = np.array([novelty_of[j] for j in outputs.query_rows])
            for group in NOVELTY_GROUPS:
                if (novelty == group).any():
                    systems[f"{name} [{group}]"] = evaluate_ranked(corpus, outputs.subset(novelty == group), groups,
                                                                   num_results=args.beam_size,
                                                                   prefix_k=args.prefix_recall_at)
    path = write_metrics(args.out, corpus, args.corpus, args.split, systems)
    config.write_operative_config(args.out)
    _print_table(corpus, args.split, systems, path)
    if args.prefix_recall_at is not None:
        print(_prefix_table(systems, args.prefix_recall_at))
    if args.paired:
        (base, base_outputs), *others = ranked.items()
        paired = {name: paired_comparison(corpus, base_outputs, outputs, metrics.DEFAULT_KS, names=(base, name))
                  for name, outputs in others}
        write_json(Path(args.out) / PAIRED_FILE, {"split": args.split, "baseline": base, "systems": paired})
        print(_paired_table(base, paired, metrics.DEFAULT_KS))
    return 0


def run_eval_dense(args: argparse.Namespace) -> int:
    config.parse_gin(args.gin_file, args.gin_param)
    corpus = Corpus.load(args.corpus)
    if args.projection == "heads" and not args.tokenizer:
        raise ValueError("--projection heads needs --tokenizer DIR (a trained tokenizer's output directory)")
    text_projection, image_projection = dense.baseline_projections(corpus, args.projection, args.tokenizer)
    result, ranked = dense.dense_baseline(corpus, split=args.split, backend=args.backend,
                                          text_projection=text_projection, image_projection=image_projection)
    name = f"dense-{args.projection}-{args.backend}"
    path = write_metrics(args.out, corpus, args.corpus, args.split, {name: result})
    rows = corpus.query_rows(args.split)
    write_ranked_jsonl(Path(args.out) / RANKED_FILE, corpus, rows, ranked)
    config.write_operative_config(args.out)
    _print_table(corpus, args.split, {name: result}, path)
    return 0


def run_eval_ceiling(args: argparse.Namespace) -> int:
    config.parse_gin(args.gin_file, args.gin_param)
    corpus = Corpus.load(args.corpus)
    tok = load_tokenizer(args.tokenizer)
    systems, rankings = {}, {}
    for mode in args.mode or ceiling.MODES:
        systems[mode], rankings[mode] = ceiling.ceiling_diagnostic(corpus, tok, args.split, mode)
    path = write_metrics(args.out, corpus, args.corpus, args.split, systems)
    for mode, ranked in rankings.items():
        write_ranked_jsonl(Path(args.out) / f"ranked_{mode}.jsonl", corpus, corpus.query_rows(args.split), ranked)
    config.write_operative_config(args.out)
    _print_table(corpus, args.split, systems, path)
    return 0


def _paired_table(base: str, paired: dict[str, dict[str, float]], ks: Sequence[int]) -> str:
    """Per system and K: queries only the baseline finds within K, only the system, and the sign test p."""
    width = max(len(n) for n in paired)
    lines = [f"paired against {base} (same queries): only {base} / only the system finds a relevant image within K; "
             "exact two-sided sign test",
             f"{'system':<{width}}  " + "  ".join(f"{f'R@{k} only base/system':>22}  {'p':>6}" for k in ks)]
    for name, m in paired.items():
        cells = []
        for k in ks:
            counts = f"{m[metrics.paired_key('a_only', k)]} / {m[metrics.paired_key('b_only', k)]}"
            cells.append(f"{counts:>22}  {m[metrics.paired_key('p', k)]:>6.3f}")
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def _prefix_table(systems: dict[str, dict[str, float]], k: int) -> str:
    """Identifier prefix recall at k per system, one column per depth (%)."""
    depths = list(itertools.takewhile(lambda d: any(metrics.prefix_recall_key(d, k) in m for m in systems.values()),
                                      itertools.count(1)))
    width = max(len(n) for n in systems)
    lines = [f"identifier prefix recall@{k} (%): a generated identifier among the first {k} agrees with a relevant "
             "image's on its first d tokens",
             f"{'system':<{width}}  " + "  ".join(f"{f'd={d}':>6}" for d in depths)]
    for name, m in systems.items():
        lines.append(f"{name:<{width}}  " + "  ".join(
            f"{metrics.pct(m.get(metrics.prefix_recall_key(d, k))):>6}" for d in depths))
    return "\n".join(lines)


def _print_table(corpus: Corpus, split: str, systems: dict[str, dict[str, float]], path: Path) -> None:
    if corpus.synthetic:
        print("NOTE: SYNTHETIC corpus (generated scenes, random-network features).")
    print(f"corpus {corpus.name!r}, split {split!r}, {len(corpus.image_rows(split))} images")
    print(metrics.format_table(systems))
    print(f"wrote {path}")
