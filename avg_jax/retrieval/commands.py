"""`avg-jax retrieve`: ranked images for text queries from a retrieval checkpoint (`RetrievalModel`'s layout).

  --query TEXT    prints `rank<TAB>image_id<TAB>score` lines
  --queries FILE  JSONL (objects with "text", optional "query_row" echoed) or plain text (one query per
                  line); writes JSONL lines {"query_row"?, "text", "image_ids", "scores", "identifiers",
                  "identifier_scores"} to --out (stdout without), the format `avg-jax eval --ranked` reads.
  --query_features FILE.npy   fusion with the dense towers: the queries' text features (one float row per query,
                  in query order; read with allow_pickle=False) through the checkpoint's heads (heads.npz):
                  the aligned-voken prior inside the search (--prior_weight) and/or the beam's images rescored
                  and fused with the search score (--rerank_weight); `scores` are then the fused scores.
                  Weights / temperature: --rerank_weight / --prior_weight / --rerank_temperature, else the ones
                  stored at training. A query-conditioned checkpoint (query_conditioning.npz) REQUIRES them: its
                  text head maps them to the encoder prefix (fusion then only when heads.npz has a weight > 0
                  or one is given).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from avg_jax import cli, config
from avg_jax.json_io import read_json
from avg_jax.retrieval.model import HEADS_FILE, SPEC_FILE, Retriever, load_reranker


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
    p.add_argument("--query_features", help="generate-then-rerank: .npy of the queries' text features, one row per "
                   "query (needs the checkpoint's heads.npz)")
    p.add_argument("--rerank_weight", type=float, default=None,
                   help="fused = generative log-prob + weight * cosine / temperature (default: stored at training)")
    p.add_argument("--rerank_temperature", type=float, default=None)
    p.add_argument("--prior_weight", type=float, default=None,
                   help="aligned-voken prior: each voken adds weight * <text vector, voken vector> / temperature to "
                        "the search score (default: stored at training)")
    cli.add_gin_flags(p)
    p.set_defaults(func=run_retrieve)


def read_query_features(path: str | Path, num_queries: int) -> np.ndarray:
    """[num_queries, f] float32 features from a .npy file (no pickles), checked for shape and values."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"query features file not found: {path}")
    try:
        x = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{path}: not a plain numeric .npy array ({e})") from None
    if x.ndim != 2 or x.shape[0] != num_queries or not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{path}: query features of shape {x.shape} and dtype {x.dtype}; expected a numeric "
                         f"[{num_queries}, dim] array, one row per query in query order")
    return x.astype(np.float32)


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
    reranker = None
    spec_path = Path(args.checkpoint) / SPEC_FILE
    conditioned = spec_path.exists() and "query_conditioning" in read_json(spec_path, "retrieval model spec")
    if conditioned and not args.query_features:
        raise ValueError(f"{args.checkpoint} is a query-conditioned model: pass --query_features FILE.npy (the "
                         "queries' text features, one row per query)")
    fusion_flags = (args.rerank_weight, args.rerank_temperature, args.prior_weight)
    if args.query_features and conditioned and not (Path(args.checkpoint) / HEADS_FILE).exists():
        if any(f is not None for f in fusion_flags):
            load_reranker(args.checkpoint)  # raises: no dense towers to rerank with
    elif args.query_features:
        reranker = load_reranker(args.checkpoint, *fusion_flags)
        if conditioned and not reranker.config.enabled:
            reranker = None
        elif not reranker.config.enabled:
            raise ValueError("--query_features given but the rerank and prior weights are 0 (the checkpoint was "
                             "trained without fusion): pass --rerank_weight and/or --prior_weight")
    elif any(f is not None for f in fusion_flags):
        raise ValueError("--rerank_weight / --rerank_temperature / --prior_weight need --query_features")
    retriever = Retriever.load(args.checkpoint, args.identifiers, dtype=args.dtype, beam_size=args.beam_size,
                               batch_size=args.batch_size, reranker=reranker)
    if args.query is not None:
        features = read_query_features(args.query_features, 1) if args.query_features else None
        (result,) = retriever.retrieve([args.query], k=args.k, query_features=features)
        for rank, (image_id, score) in enumerate(zip(result.image_ids, result.scores, strict=True), 1):
            print(f"{rank}\t{image_id}\t{score:.6f}")
        return 0
    records = read_queries(args.queries)
    features = read_query_features(args.query_features, len(records)) if args.query_features else None
    results = retriever.retrieve([r["text"] for r in records], k=args.k, query_features=features)
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
