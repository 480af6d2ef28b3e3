"""`avg-jax tokenize`: build the identifier table of every image of a corpus (RQ vokens or a GRACE scheme).

Writes into --out what `avg_jax.tokenizer.pipeline.tokenize_corpus` writes (identifier table, vocabulary,
tokenizer checkpoint, codebook, stats.json) plus operative_config.gin, the gin config actually used.
"""

from __future__ import annotations

import argparse

from avg_jax import cli, config
from avg_jax.tokenizer.pipeline import tokenize_corpus


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tokenize", help="train the image tokenizer / build identifiers for every image")
    p.add_argument("--corpus", help="corpus directory (avg-jax data ...); default: the gin macro CORPUS_DIR")
    p.add_argument("--out", required=True, help="output directory for the identifier table and artefacts")
    p.add_argument("--sentencepiece_model", default=None,
                   help="text vocabulary; default: gin tokenize_corpus.sentencepiece_model, else train one")
    cli.add_gin_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config.parse_gin(args.gin_file, args.gin_param)
    corpus = config.path_from_flag_or_macro(args.corpus, "CORPUS_DIR", "--corpus")
    table, stats = tokenize_corpus(corpus, args.out, sentencepiece_model=args.sentencepiece_model)
    config.write_operative_config(args.out)
    print(f"wrote {table.scheme} identifiers for {table.num_images} images to {args.out}: max length "
          f"{table.max_len}, {table.num_new_tokens} new tokens, collision rate before policy "
          f"{stats['collisions_before_policy']['collision_rate']:.4f}")
    return 0
