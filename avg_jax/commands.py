"""`avg-jax demo`, `avg-jax sweep` and `avg-jax launch-check`: argparse over the library functions
`avg_jax.demo.run_demo`, `avg_jax.sweep.run_sweep` and `avg_jax.distributed.launch_check`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from avg_jax import cli, config, demo, sweep
from avg_jax.distributed import launch_check


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sweep", help="run the experiments of a paper table and aggregate a markdown table")
    p.add_argument("--table", help=f"one of {sorted(sweep.TABLES)}")
    p.add_argument("--list", action="store_true", help="list the tables and their rows")
    p.add_argument("--corpus", help="corpus directory for every row (default: each row's CORPUS_DIR macro)")
    p.add_argument("--out", default="sweeps", help="output directory (default: sweeps)")
    p.add_argument("--dry_run", action="store_true", help="print what would run, where, and what is reused")
    p.add_argument("--rows", action="append",
                   help="run only this row (its label, repeatable; default all); the table shows every finished row")
    p.add_argument("--aggregate_only", action="store_true", help="only rebuild table.md from existing rows")
    cli.add_gin_flags(p)  # applied to every row after its own gin files (e.g. a mesh, smaller steps)
    p.set_defaults(func=run_sweep)

    p = subparsers.add_parser("demo", help="end-to-end AVG on the built-in synthetic benchmark (report + plots)")
    p.add_argument("--out", required=True, help="output directory (report.md, metrics.json, plots, stages)")
    cli.add_gin_flags(p)
    p.set_defaults(func=run_demo)

    p = subparsers.add_parser(
        "launch-check", help="join the jax.distributed cluster, build the mesh, check a sharded sum")
    cli.add_gin_flags(p)
    p.set_defaults(func=run_launch_check)


def run_sweep(args: argparse.Namespace) -> int:
    if args.list:
        print(sweep.describe_tables(), end="")
        return 0
    table = sweep.get_table(args.table)
    if args.aggregate_only:
        print(sweep.write_table(table, args.out).read_text(), end="")
        return 0
    failed = sweep.run_sweep(table, args.out, args.corpus, args.gin_file, args.gin_param, args.rows, args.dry_run)
    return 1 if failed else 0


def run_demo(args: argparse.Namespace) -> int:
    config.parse_gin(["demo.gin", *args.gin_file], args.gin_param)
    result = demo.run_demo(args.out)
    print(f"wrote {Path(args.out) / demo.REPORT_FILE} ({result['wall_seconds']['total']:.0f} s): AVG R@10 "
          f"{result['avg']['recall@10']:.3f}, dense R@10 {result['dense']['recall@10']:.3f}, chance R@10 "
          f"{result['chance']['recall@10']:.3f}")
    return 0


def run_launch_check(args: argparse.Namespace) -> int:
    """The smoke test the TPU scripts run before training: join the cluster, build the mesh, check a sharded sum."""
    config.parse_gin(args.gin_file, args.gin_param)
    result = launch_check()
    print("launch-check " + json.dumps(result, sort_keys=True), flush=True)
    if not result["ok"]:
        print(f"avg-jax launch-check: error: sharded sum {result['sharded_sum']} != expected "
              f"{result['expected_sum']} on process {result['process_id']}", file=sys.stderr)
        return 1
    return 0
