"""`avg-jax demo`: the whole AVG pipeline on the built-in SYNTHETIC benchmark, no downloads, a few minutes on CPU.

Stages (each one the library function its own CLI command calls, configured by gin):
  1. data        `make_synthetic_corpus`                    -> OUT/corpus
  2. tokenizer   `tokenize_corpus` (RQ vokens + alignment)   -> OUT/identifiers
  3. T5          `train_retrieval` (from scratch, gen loss + optional discriminative loss) -> OUT/t5_run
  4. evaluate    AVG: constrained beam search over the TEST images (the trainer's final ranked outputs),
                 image- and identifier-level metrics; dense two-tower baseline (the tokenizer's contrastive
                 heads, exact search) on the same queries; chance level
  5. beam sweep  R@K against beam size with the trained model
  6. examples    a few test queries with their ranked images, AVG and dense
  7. efficiency  queries/s against image-set size: our constrained decode (the trained T5) vs dense exact search
Writes OUT/report.md, OUT/metrics.json, OUT/*.png and every stage's operative gin config under OUT/configs/.
Timing lives in avg_jax/evaluation/efficiency.py (shared with benchmarks/efficiency.py), the report and plots in
avg_jax/evaluation/report.py, chance level in `avg_jax.evaluation.metrics.chance_metrics`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gin
import jax
import numpy as np
import tqdm

from avg_jax import config
from avg_jax.data.corpus import Corpus
from avg_jax.data.synthetic import make_synthetic_corpus
from avg_jax.evaluation import ceiling, dense, metrics
from avg_jax.evaluation.efficiency import TIMING, dense_search_qps, generative_qps, random_unit_rows
from avg_jax.evaluation.ranked import evaluate_ranked, read_ranked_jsonl
from avg_jax.evaluation.report import PLOTS, plot_beam_sweep, plot_efficiency, plot_training, render_report
from avg_jax.identifiers.table import IdentifierTable
from avg_jax.json_io import read_jsonl, write_json
from avg_jax.retrieval.model import RetrievalLossConfig, Retriever
from avg_jax.tokenizer.pipeline import tokenize_corpus
from avg_jax.tokenizer.train import load_tokenizer
from avg_jax.training.metrics import METRICS_FILE as TRAIN_METRICS_FILE
from avg_jax.training.retrieval import RETRIEVAL_DIR, train_retrieval
from avg_jax.training.trainer import CHECKPOINT_DIR

REPORT_FILE = "report.md"
METRICS_FILE = "metrics.json"
CONFIG_DIR = "configs"
SPLIT = "test"
RETRIEVAL_CHECKPOINT = f"t5_run/{RETRIEVAL_DIR}"  # the trainer's export: `avg-jax retrieve` over the test images


class _Stages:
    """One progress bar over the demo's stages, timing each and copying its operative gin config."""

    def __init__(self, names: Sequence[str], config_dir: Path):
        self.bar = tqdm.tqdm(total=len(names), desc="demo", unit="stage", position=0, dynamic_ncols=True)
        self.seconds: dict[str, float] = {}
        self.config_dir = config_dir
        self._name, self._start = "", 0.0

    def start(self, name: str) -> None:
        self._name, self._start = name, time.perf_counter()
        self.bar.set_description(f"demo [{name}]")
        self.bar.refresh()

    def done(self, save_config: bool = False) -> None:
        """End the stage; `save_config`: copy the operative gin config (everything configured so far)."""
        self.seconds[self._name] = time.perf_counter() - self._start
        if save_config:
            config.write_operative_config(self.config_dir, f"{self._name}.gin")
        self.bar.update(1)
        tqdm.tqdm.write(f"demo: stage {self._name} done in {self.seconds[self._name]:.1f} s")

    def close(self) -> None:
        self.bar.close()


@gin.configurable(denylist=["out_dir"])
def run_demo(
    out_dir: str,
    seed: int = 0,
    beam_sizes: Sequence[int] = (1, 2, 5, 10, 20),
    beam_sweep_queries: int | None = None,
    num_examples: int = 3,
    examples_top_k: int = 5,
    efficiency_sizes: Sequence[int] = (1000, 10000, 100000),
    efficiency_batch: int = 32,
    efficiency_beam: int = 10,
    efficiency_repeats: int = 3,
) -> dict[str, Any]:
    """Run every stage into `out_dir`; returns what metrics.json holds. Fully set by gin + seed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus_dir, ids_dir, run_dir = out / "corpus", out / "identifiers", out / "t5_run"
    stages = _Stages(["data", "tokenizer", "t5", "evaluate", "beam_sweep", "examples", "efficiency", "report"],
                     out / CONFIG_DIR)
    total_start, load_start = time.perf_counter(), os.getloadavg()[0]
    try:
        stages.start("data")
        corpus = make_synthetic_corpus(seed=seed)
        corpus.save(corpus_dir)
        config.write_operative_config(corpus_dir)
        stages.done(save_config=True)

        stages.start("tokenizer")
        _, tokenizer_stats = tokenize_corpus(str(corpus_dir), str(ids_dir), seed=seed)
        config.write_operative_config(ids_dir)
        stages.done(save_config=True)

        stages.start("t5")
        if (run_dir / CHECKPOINT_DIR).exists():  # a stale run would be resumed by the trainer, not retrained
            shutil.rmtree(run_dir)
        final = train_retrieval(str(corpus_dir), str(ids_dir), str(run_dir), seed=seed)
        if final.get("preempted"):
            raise RuntimeError(f"T5 training in {run_dir} was interrupted (SIGTERM); rerun the demo")
        stages.done(save_config=True)

        stages.start("evaluate")
        table = IdentifierTable.load(ids_dir)
        test_ids = [corpus.images[i].id for i in corpus.image_rows(SPLIT)]
        groups = table.subset(test_ids).groups()
        ranked_file = run_dir / f"ranked_{SPLIT}.jsonl"
        avg_outputs = read_ranked_jsonl(ranked_file, corpus, SPLIT)
        avg_metrics = evaluate_ranked(corpus, avg_outputs, groups)
        # With a fused evaluation (train_retrieval.eval_prior_weight / eval_rerank_weight): the trainer's ranking
        # with the dense towers fused in, beside the pure generative one.
        fused_metrics = (evaluate_ranked(corpus, read_ranked_jsonl(final["rerank_ranked"], corpus, SPLIT), groups)
                         if final.get("rerank_ranked") else None)
        tok = load_tokenizer(ids_dir)
        text_head, image_head = dense.head_projections(tok)
        dense_metrics, dense_ranked = dense.dense_baseline(corpus, split=SPLIT, text_projection=text_head,
                                                           image_projection=image_head)
        # The no-T5 ceiling (issue 13 item 10): what the identifiers' aligned geometry alone ranks.
        ceiling_metrics = (ceiling.ceiling_diagnostic(corpus, tok, SPLIT, "ceiling")[0] if table.scheme == "rq"
                           else None)
        chance = metrics.chance_metrics(len(test_ids), [len(corpus.queries[j].image_ids)
                                                        for j in corpus.query_rows(SPLIT)])
        stages.done()

        stages.start("beam_sweep")
        retriever = load_retriever(run_dir)
        sweep = beam_sweep(retriever, corpus, beam_sizes, beam_sweep_queries)
        stages.done()

        stages.start("examples")
        dense_by_row = dict(zip(corpus.query_rows(SPLIT).tolist(), dense_ranked, strict=True))
        avg_by_row = dict(zip(avg_outputs.query_rows.tolist(), avg_outputs.image_ids, strict=True))
        examples = example_queries(corpus, avg_by_row, dense_by_row, num_examples, examples_top_k, seed)
        stages.done()

        stages.start("efficiency")
        code_dim = int(json.loads((ids_dir / "tokenizer_config.json").read_text())["config"]["code_dim"])
        efficiency = measure_efficiency(retriever, table, efficiency_sizes, code_dim, efficiency_batch,
                                        efficiency_beam, efficiency_repeats, seed)
        stages.done()

        stages.start("report")
        train_rows = [row for _, row in read_jsonl(run_dir / TRAIN_METRICS_FILE)]
        result = {
            "corpus": {"name": corpus.name, "synthetic": corpus.synthetic, "num_images": corpus.num_images,
                       "num_test_images": len(test_ids), "num_test_queries": int(corpus.query_rows(SPLIT).size),
                       "num_train_queries": int(corpus.query_rows("train").size)},
            "identifiers": {"scheme": table.scheme, "max_len": table.max_len, "num_new_tokens": table.num_new_tokens,
                            "collision_policy": tokenizer_stats["collision_policy"],
                            "collision_rate_before_policy":
                                tokenizer_stats["collisions_before_policy"]["collision_rate"]},
            "t5": {"config": retriever.model.config.to_dict(), "steps": int(final["step"]),
                   "num_params": int(sum(x.size for x in jax.tree.leaves(retriever.params))),
                   "loss": dataclasses.asdict(RetrievalLossConfig())},
            "avg": avg_metrics, **({"avg_fused": {**fused_metrics, "prior_weight": final["prior_weight"],
                                                  "rerank_weight": final["rerank_weight"],
                                                  "temperature": final["rerank_temperature"],
                                                  **_chosen_on(final.get("fusion_selection"))}}
                                   if fused_metrics else {}),
            "dense": dense_metrics, **({"ceiling": ceiling_metrics} if ceiling_metrics else {}),
            "chance": chance, "beam_sweep": sweep,
            "examples": examples, "efficiency": efficiency,
        }
        plot_training(train_rows, dense_metrics, chance, out / PLOTS["training"])
        plot_beam_sweep(sweep, dense_metrics, chance, out / PLOTS["beam"])
        plot_efficiency(efficiency, out / PLOTS["efficiency"])
        stages.done()
        result["load_average_1min"] = {"start": load_start, "end": os.getloadavg()[0], "cpus": os.cpu_count()}
        result["wall_seconds"] = {**{k: round(v, 2) for k, v in stages.seconds.items()},
                                  "total": round(time.perf_counter() - total_start, 2)}
        write_json(out / METRICS_FILE, result)
        (out / REPORT_FILE).write_text(render_report(result, train_rows, CONFIG_DIR, RETRIEVAL_CHECKPOINT))
        config.write_operative_config(out / CONFIG_DIR, "demo.gin")  # the whole run, run_demo included
        return result
    finally:
        stages.close()


def _chosen_on(selection: dict | None) -> dict:
    """Where the fused weights came from (`FusionSelection`; empty when the config fixed them)."""
    if not selection or "skipped" in selection:
        return {}
    return {"chosen_on_split": selection["split"], "chosen_on_queries": selection["queries"],
            "chosen_by": selection["metric"]}


def load_retriever(run_dir: Path) -> Retriever:
    """The trainer's exported retrieval checkpoint (the test images' trie); the retriever's base beam is 1 so
    `retrieve(texts, k=b)` searches with beam b."""
    return Retriever.load(run_dir / RETRIEVAL_DIR, beam_size=1, batch_size=64)


def beam_sweep(retriever: Retriever, corpus: Corpus, beam_sizes: Sequence[int],
               max_queries: int | None) -> dict[str, Any]:
    """Image-level metrics of the test queries for each beam size b (the top-b images; first `max_queries`);
    R@K for K > b and MRR@10 for b < 10 are inapplicable and absent (evaluation.metrics)."""
    rows = corpus.query_rows(SPLIT)[:max_queries]
    texts = [corpus.queries[j].text for j in rows]
    relevant = [corpus.queries[j].image_ids for j in rows]
    # a query-conditioned model reads each query's text feature (its encoder prefix); the retriever has no
    # reranker, so the rankings stay the pure generative ones
    features = corpus.text_features[rows] if retriever.model.conditioned else None
    per_beam = {}
    for beam in tqdm.tqdm(beam_sizes, desc="beam sweep", leave=False):
        t0 = time.perf_counter()
        ranked = [r.image_ids for r in retriever.retrieve(texts, k=beam, query_features=features)]
        per_beam[str(beam)] = metrics.evaluate_images(ranked, relevant, num_results=beam)
        per_beam[str(beam)]["seconds"] = time.perf_counter() - t0
    return {"num_queries": int(rows.size), "beam_sizes": [int(b) for b in beam_sizes], "per_beam": per_beam}


def example_queries(corpus: Corpus, avg: dict[int, list[str]], dense_ranked: dict[int, list[str]], num: int,
                    top_k: int, seed: int) -> list[dict[str, Any]]:
    """`num` test queries drawn by seed, each with the top-k images of AVG and dense and which are relevant."""
    rows = corpus.query_rows(SPLIT)
    picks = np.random.default_rng([seed, 7]).choice(rows, size=min(num, rows.size), replace=False)
    describe = _image_descriptions(corpus)
    out = []
    def listing(ids: list[str], relevant: set[str]) -> list[dict[str, Any]]:
        return [{"image_id": i, "relevant": i in relevant, "caption": describe.get(i, "")} for i in ids[:top_k]]

    for j in sorted(int(p) for p in picks):
        relevant = set(corpus.queries[j].image_ids)
        out.append({"query_row": j, "query": corpus.queries[j].text, "relevant": sorted(relevant),
                    "avg": listing(avg[j], relevant), "dense": listing(dense_ranked[j], relevant)})
    return out


def _image_descriptions(corpus: Corpus) -> dict[str, str]:
    """The first caption of every image (what a synthetic image 'shows')."""
    out: dict[str, str] = {}
    for q in corpus.queries:
        for i in q.image_ids:
            out.setdefault(i, q.text)
    return out


def measure_efficiency(retriever: Retriever, table: IdentifierTable, sizes: Sequence[int], code_dim: int,
                       batch: int, beam: int, repeats: int, seed: int, query_tokens: int = 16) -> dict[str, Any]:
    """Queries/s of the trained model's (`retriever.params`) constrained decode (incl. its encoder) and of dense
    exact search (jit matmul + top_k over `code_dim` embeddings, search only) at each image-set size, batch `batch` of
    `query_tokens`-token queries."""
    levels = int(table.metadata.get("num_levels", table.max_len))
    codebook = int(table.metadata.get("codebook_size", table.num_new_tokens))
    gen, _ = generative_qps(retriever.model, retriever.params, retriever.model.vocab.text_size, sizes, levels,
                            codebook, batch, beam, query_tokens, repeats, seed)
    rng = np.random.default_rng([seed, 11])
    queries = [random_unit_rows(rng, batch, code_dim) for _ in range(4)]
    dense_qps = {str(n): dense_search_qps(random_unit_rows(rng, int(n), code_dim), queries, min(10, int(n)), repeats)[0]
                 for n in tqdm.tqdm(sizes, desc="efficiency", leave=False)}
    return {"sizes": [int(n) for n in sizes], "batch": batch, "beam": beam, "levels": levels,
            "codebook_size": codebook, "dim": code_dim, "query_tokens": query_tokens,
            "generative_qps": {str(n): v for n, v in gen.items()},
            "dense_search_qps": dense_qps,
            "device": f"{jax.devices()[0].platform} x{jax.device_count()}",
            "timing": f"{TIMING} ({repeats} batches)"}
