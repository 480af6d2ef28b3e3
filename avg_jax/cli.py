"""`avg-jax` console script. Each pipeline stage contributes a module with `add_parser(subparsers)`.

Every subcommand accepts repeatable `--gin_file` and `--gin_param` (t5x style); commands that write
outputs save the operative gin config next to them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that register subcommands, in the order they appear in `--help`.
COMMAND_MODULES = (
    "avg_jax.data.commands",
    "avg_jax.tokenizer.commands",
    "avg_jax.evaluation.commands",
    "avg_jax.retrieval.commands",
    "avg_jax.training.commands",
    "avg_jax.commands",
)


def add_gin_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every subcommand shares."""
    parser.add_argument("--gin_file", action="append", default=[],
                        help="gin config file (repeatable; relative paths also searched in gin_configs/)")
    parser.add_argument("--gin_param", action="append", default=[],
                        help="gin binding such as 'train.steps = 10' (repeatable, applied after files)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avg-jax", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        print(f"avg-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
