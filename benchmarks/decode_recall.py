"""Recall and speed of the beam-search score normalisations and compute dtypes on a trained retrieval checkpoint.

'vocab' (full-vocabulary softmax, HF-compatible), 'window' (softmax over the voken rows: the cheaper head)
and 'allowed' (renormalised over the trie's allowed tokens) in float32, and 'vocab' / 'window' with bfloat16
activations ('<mode>_bfloat16'), on the same queries, same model, same image set.
Usage: `python benchmarks/decode_recall.py --checkpoint RUN/retrieval --corpus CORPUS_DIR`
(e.g. the directories `avg-jax demo --out OUT` writes: OUT/t5_run/retrieval and OUT/corpus). Prints ONE
JSON object: image-level metrics and q/s per mode, and each mode's R@K minus the 'vocab' mode's.
"""

from __future__ import annotations

import argparse
import json
import time

from avg_jax.data.corpus import Corpus
from avg_jax.decoding.beam_search import SCORE_NORMALIZATIONS
from avg_jax.evaluation.metrics import evaluate_images
from avg_jax.retrieval.model import RetrievalModel, Retriever


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="retrieval checkpoint dir (avg_jax/retrieval/model.py)")
    parser.add_argument("--corpus", required=True, help="corpus dir whose split queries are searched")
    parser.add_argument("--split", default="test")
    parser.add_argument("--beam", type=int, default=20)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)

    corpus = Corpus.load(args.corpus)
    queries = [corpus.queries[j] for j in corpus.query_rows(args.split)]
    texts, relevant = [q.text for q in queries], [set(q.image_ids) for q in queries]
    report: dict = {"num_queries": len(texts), "beam": args.beam, "k": args.k, "modes": {}}
    modes = [(norm, "float32") for norm in SCORE_NORMALIZATIONS] + [(norm, "bfloat16") for norm in ("vocab", "window")]
    for norm, dtype in modes:
        model, params, table = RetrievalModel.load_checkpoint(args.checkpoint, dtype=dtype)
        retriever = Retriever(model.replace(score_normalization=norm), params, table, beam_size=args.beam,
                              batch_size=args.batch)
        retriever.retrieve(texts[:args.batch], k=args.k)  # compile
        t = time.perf_counter()
        results = retriever.retrieve(texts, k=args.k)
        seconds = time.perf_counter() - t
        metrics = evaluate_images([r.image_ids for r in results], relevant)
        report["modes"][norm if dtype == "float32" else f"{norm}_{dtype}"] = {**metrics, "qps": len(texts) / seconds}
    base = report["modes"]["vocab"]
    report["recall_delta_vs_vocab"] = {
        norm: {key: m[key] - base[key] for key in m if key.startswith("recall@")}
        for norm, m in report["modes"].items() if norm != "vocab"}
    print(json.dumps(report, indent=1, sort_keys=True))
    return report


if __name__ == "__main__":
    main()
