"""`avg-jax train`: train T5 generative retrieval (AVG / GRACE) on a corpus and its identifier table
(argparse over `avg_jax.training.retrieval.train_retrieval`, which documents the run directory).

"""

from __future__ import annotations

import argparse

from avg_jax import cli, config
from avg_jax.distributed import initialize_distributed
from avg_jax.training.retrieval import train_retrieval
from avg_jax.training.trainer import PREEMPTED_EXIT_CODE


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train T5 generative retrieval (L_gen + λ L_dis, GRACE memorize)")
    p.add_argument("--corpus", default=None, help="corpus directory (default: the gin macro CORPUS_DIR)")
    p.add_argument("--identifiers", required=True, help="identifier table directory (avg-jax tokenize --out)")
    p.add_argument("--run_dir", required=True, help="output directory; an existing run is resumed")
    cli.add_gin_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config.parse_gin(args.gin_file, args.gin_param)
    initialize_distributed()  # joins a cluster only when configured (gin or JAX_* environment)
    corpus_dir = config.path_from_flag_or_macro(args.corpus, "CORPUS_DIR", "--corpus")
    result = train_retrieval(corpus_dir, args.identifiers, args.run_dir)
    return PREEMPTED_EXIT_CODE if result["preempted"] else 0
