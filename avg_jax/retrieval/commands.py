"""`avg-jax retrieve`: ranked images for text queries from a retrieval checkpoint (`RetrievalModel`'s layout).

  --query TEXT    prints `rank<TAB>image_id<TAB>score` lines
  --queries FILE  JSONL (objects with "text", optional "query_row" echoed) or plain text (one query per
                  line); writes JSONL lines {"query_row"?, "text", "image_ids", "scores", "identifiers",
                  "identifier_scores"} to --out (stdout without), the format `avg-jax eval --ranked` reads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from avg_jax import cli, config
from avg_jax.retrieval.model import Retriever


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("retrieve", help="ranked images for text queries (trie-constrained beam search)")
    p.add_argument("--checkpoint", required=True, help="retrieval checkpoint dir (model/, identifiers/, spiece.model)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--query", help="one query text")
    group.add_argument("--queries", help="JSONL ({'text': ...}) or plain-text file of queries")
    p.add_argument("--k", type=int, default=10, help="images per query")
    p.add_argument("--out", help="JSONL output for --queries (default stdout); the gin config is saved beside it")
    p.add_argument("--identifiers", help="identifier table dir to search instead of the checkpoint's")
    p.add_argument("--beam_size", type=int, default=None,
                   help="beam width (default: gin BeamSearchOptions.beam_size); at least --k is used")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype of the search (bfloat16: float32 accumulation, faster on TPU and AMX CPUs)")
    cli.add_gin_flags(p)
    p.set_defaults(func=run_retrieve)


def read_queries(path: str | Path) -> list[dict]:
    """Query records {'text', optional 'query_row'}; JSONL when every non-empty line is a JSON object."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"queries file not found: {path}")
    lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no queries")
    if path.suffix != ".jsonl":
        return [{"text": line.strip()} for _, line in lines]
    records = []
    for i, line in lines:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError(f"{path}:{i}: expected an object with a string field 'text'")
        record = {"text": obj["text"]}
        if "query_row" in obj:
            record["query_row"] = obj["query_row"]
        records.append(record)
    return records


def run_retrieve(args: argparse.Namespace) -> int:
    config.parse_gin(args.gin_file, args.gin_param)
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    retriever = Retriever.load(args.checkpoint, args.identifiers, dtype=args.dtype, beam_size=args.beam_size,
                               batch_size=args.batch_size)
    if args.query is not None:
        (result,) = retriever.retrieve([args.query], k=args.k)
        for rank, (image_id, score) in enumerate(zip(result.image_ids, result.scores, strict=True), 1):
            print(f"{rank}\t{image_id}\t{score:.6f}")
        return 0
    records = read_queries(args.queries)
    results = retriever.retrieve([r["text"] for r in records], k=args.k)
    lines = [json.dumps({**record, "image_ids": result.image_ids, "scores": result.scores,
                         "identifiers": [list(i) for i in result.identifiers],
                         "identifier_scores": result.identifier_scores}) + "\n"
             for record, result in zip(records, results, strict=True)]
    if not args.out:
        sys.stdout.write("".join(lines))
        return 0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(lines))
    config.write_operative_config(Path(args.out).parent)
    return 0
