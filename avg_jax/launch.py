"""`avg-jax launch-check`: the smoke test the TPU scripts run before training (`avg_jax.distributed.launch_check`).

It joins the jax.distributed cluster, builds the ('data', 'model') mesh and checks a sharded sum; the library
side (cluster start-up, the check itself) lives in avg_jax/distributed.py and the mesh in avg_jax/partitioning.py.
"""

from __future__ import annotations

import argparse
import json
import sys

from avg_jax import cli, config
from avg_jax.distributed import launch_check


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "launch-check", help="join the jax.distributed cluster, build the mesh, check a sharded sum")
    cli.add_gin_flags(p)
    p.set_defaults(func=launch_check_command)


def launch_check_command(args: argparse.Namespace) -> int:
    config.parse_gin(args.gin_file, args.gin_param)
    result = launch_check()
    print("launch-check " + json.dumps(result, sort_keys=True), flush=True)
    if not result["ok"]:
        print(f"avg-jax launch-check: error: sharded sum {result['sharded_sum']} != expected "
              f"{result['expected_sum']} on process {result['process_id']}", file=sys.stderr)
        return 1
    return 0
