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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from avg_jax import cli, config
from avg_jax.data.corpus import Corpus, normalize_rows
from avg_jax.data.synthetic import make_synthetic_corpus
from avg_jax.decoding.beam_search import BeamSearchOptions
from avg_jax.decoding.retrieve import Retriever
from avg_jax.decoding.trie import Trie, build_trie, identifier_window
from avg_jax.evaluation import dense, metrics
from avg_jax.evaluation.commands import evaluate_ranked, read_ranked_jsonl
from avg_jax.identifiers.table import IdentifierTable
from avg_jax.t5.decoding import t5_beam_search
from avg_jax.tokenizer.commands import tokenize_corpus
from avg_jax.training.commands import RETRIEVAL_DIR, RUN_FILE, train_retrieval
from avg_jax.training.metrics import METRICS_FILE as TRAIN_METRICS_FILE
from avg_jax.training.retrieval import RetrievalLossConfig
from avg_jax.training.trainer import CHECKPOINT_DIR

REPORT_FILE = "report.md"
METRICS_FILE = "metrics.json"
CONFIG_DIR = "configs"
PLOTS = {"training": "training_curves.png", "beam": "recall_vs_beam.png", "efficiency": "qps_vs_images.png"}
SPLIT = "test"
RETRIEVAL_CHECKPOINT = f"t5_run/{RETRIEVAL_DIR}"  # the trainer's export: `avg-jax retrieve` over the test images


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="end-to-end AVG on the built-in synthetic benchmark (report + plots)")
    p.add_argument("--out", required=True, help="output directory (report.md, metrics.json, plots, stages)")
    cli.add_gin_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config.parse_gin(["demo.gin", *args.gin_file], args.gin_param)
    result = run_demo(args.out)
    print(f"wrote {Path(args.out) / REPORT_FILE} ({result['wall_seconds']['total']:.0f} s): AVG R@10 "
          f"{result['avg']['recall@10']:.3f}, dense R@10 {result['dense']['recall@10']:.3f}, chance R@10 "
          f"{result['chance']['recall@10']:.3f}")
    return 0


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
        text_head, image_head = dense.tokenizer_head_projections(str(ids_dir))
        dense_metrics, dense_ranked = dense.dense_baseline(corpus, split=SPLIT, text_projection=text_head,
                                                           image_projection=image_head)
        chance = chance_recall(corpus, SPLIT)
        stages.done()

        stages.start("beam_sweep")
        model, instruction = load_retriever(run_dir)
        sweep = beam_sweep(model, instruction, corpus, beam_sizes, beam_sweep_queries)
        stages.done()

        stages.start("examples")
        dense_by_row = dict(zip(corpus.query_rows(SPLIT).tolist(), dense_ranked, strict=True))
        avg_by_row = dict(zip(avg_outputs.query_rows.tolist(), avg_outputs.image_ids, strict=True))
        examples = example_queries(corpus, avg_by_row, dense_by_row, num_examples, examples_top_k, seed)
        stages.done()

        stages.start("efficiency")
        code_dim = int(json.loads((ids_dir / "tokenizer_config.json").read_text())["config"]["code_dim"])
        efficiency = measure_efficiency(model, table, efficiency_sizes, code_dim, efficiency_batch,
                                        efficiency_beam, efficiency_repeats, seed)
        stages.done()

        stages.start("report")
        train_rows = _read_jsonl(run_dir / TRAIN_METRICS_FILE)
        result = {
            "corpus": {"name": corpus.name, "synthetic": corpus.synthetic, "num_images": corpus.num_images,
                       "num_test_images": len(test_ids), "num_test_queries": int(corpus.query_rows(SPLIT).size),
                       "num_train_queries": int(corpus.query_rows("train").size)},
            "identifiers": {"scheme": table.scheme, "max_len": table.max_len, "num_new_tokens": table.num_new_tokens,
                            "collision_policy": tokenizer_stats["collision_policy"],
                            "collision_rate_before_policy":
                                tokenizer_stats["collisions_before_policy"]["collision_rate"]},
            "t5": {"config": model.config.to_dict(), "steps": int(final["step"]),
                   "num_params": int(sum(x.size for x in jax.tree.leaves(model.params))),
                   "loss": dataclasses.asdict(RetrievalLossConfig())},
            "avg": avg_metrics, "dense": dense_metrics, "chance": chance, "beam_sweep": sweep,
            "examples": examples, "efficiency": efficiency,
        }
        plot_training(train_rows, dense_metrics, chance, out / PLOTS["training"])
        plot_beam_sweep(sweep, dense_metrics, chance, out / PLOTS["beam"])
        plot_efficiency(efficiency, out / PLOTS["efficiency"])
        stages.done()
        result["load_average_1min"] = {"start": load_start, "end": os.getloadavg()[0], "cpus": os.cpu_count()}
        result["wall_seconds"] = {**{k: round(v, 2) for k, v in stages.seconds.items()},
                                  "total": round(time.perf_counter() - total_start, 2)}
        (out / METRICS_FILE).write_text(json.dumps(_finite(result), indent=2) + "\n")
        (out / REPORT_FILE).write_text(render_report(result, train_rows))
        config.write_operative_config(out / CONFIG_DIR, "demo.gin")  # the whole run, run_demo included
        return result
    finally:
        stages.close()


def chance_recall(corpus: Corpus, split: str, ks: Sequence[int] = metrics.DEFAULT_KS) -> dict[str, float]:
    """Expected R@K and MRR@10 of a uniformly random ranking of the split's images (exact, per query)."""
    n = int(corpus.image_rows(split).size)
    relevant = [len(corpus.queries[j].image_ids) for j in corpus.query_rows(split)]

    def miss_first(r: int, k: int) -> float:  # P(no relevant image among the first k of n)
        return math.comb(n - r, k) / math.comb(n, k) if k <= n - r else 0.0

    out = {f"recall@{k}": float(np.mean([1.0 - miss_first(r, min(k, n)) for r in relevant])) for k in ks}
    # P(first relevant at position p) = miss_first(r, p - 1) - miss_first(r, p)
    cutoff = min(metrics.MRR_CUTOFF, n)
    out[f"mrr@{metrics.MRR_CUTOFF}"] = float(np.mean([
        sum((miss_first(r, p - 1) - miss_first(r, p)) / p for p in range(1, cutoff + 1)) for r in relevant]))
    return out


def load_retriever(run_dir: Path) -> tuple[Retriever, str]:
    """The trainer's exported retrieval checkpoint (the test images' trie) and the query instruction it trained
    with; the retriever's base beam is 1 so `retrieve(texts, k=b)` searches with beam b."""
    run = json.loads((run_dir / RUN_FILE).read_text())
    retriever = Retriever.load(run_dir / RETRIEVAL_DIR, options=BeamSearchOptions(beam_size=1), batch_size=64)
    return retriever, run.get("retrieve_instruction", "")


def beam_sweep(retriever: Retriever, instruction: str, corpus: Corpus, beam_sizes: Sequence[int],
               max_queries: int | None) -> dict[str, Any]:
    """Image-level metrics of the test queries for each beam size b (the top-b images; first `max_queries`);
    R@K for K > b and MRR@10 for b < 10 are inapplicable and absent (evaluation.metrics)."""
    rows = corpus.query_rows(SPLIT)[:max_queries]
    texts = [f"{instruction} {corpus.queries[j].text}" if instruction else corpus.queries[j].text for j in rows]
    relevant = [corpus.queries[j].image_ids for j in rows]
    per_beam = {}
    for beam in tqdm.tqdm(beam_sizes, desc="beam sweep", leave=False):
        t0 = time.perf_counter()
        ranked = [r.image_ids for r in retriever.retrieve(texts, k=beam)]
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


def _median_seconds(fn: Callable[[int], Any], repeats: int) -> float:
    """Median wall time of fn(i) over `repeats` calls after one warm-up (compilation) call."""
    jax.block_until_ready(fn(-1))
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(i))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_identifier_trie(n: int, levels: int, codebook_size: int, text_vocab_size: int, seed: int) -> Trie:
    """A trie of `n` distinct random voken identifiers [n, levels] (model ids `text_vocab_size + code`)."""
    if n > codebook_size ** levels:
        raise ValueError(f"efficiency size {n} exceeds the {codebook_size}^{levels} distinct identifiers of the "
                         "demo's codebook; lower run_demo.efficiency_sizes")
    flat = np.random.default_rng([seed, n]).choice(codebook_size ** levels, size=n, replace=False)
    codes = np.stack(np.unravel_index(flat, (codebook_size,) * levels), axis=1)  # [n, levels]
    tokens = (text_vocab_size + codes).astype(np.int32)
    return build_trie(tokens=tokens, lengths=np.full(n, levels, np.int32), fixed_length=True)


def measure_efficiency(model: Retriever, table: IdentifierTable, sizes: Sequence[int], code_dim: int,
                       batch: int, beam: int, repeats: int, seed: int, query_tokens: int = 16) -> dict[str, Any]:
    """Queries/s of the trained T5's (`model.params`) constrained decode (incl. its encoder) and of dense exact search
    (jit matmul + top_k over `code_dim` embeddings, search only) at each image-set size, batch `batch` of
    `query_tokens`-token queries."""
    levels = int(table.metadata.get("num_levels", table.max_len))
    codebook = int(table.metadata.get("codebook_size", table.num_new_tokens))
    rng = np.random.default_rng([seed, 11])
    queries = [normalize_rows(rng.standard_normal((batch, code_dim)).astype(np.float32)) for _ in range(4)]
    inputs = [jnp.asarray(rng.integers(3, model.vocab.text_size, (batch, query_tokens)), jnp.int32)
              for _ in range(4)]
    gen, dense_qps = {}, {}
    for n in tqdm.tqdm(sizes, desc="efficiency", leave=False):
        trie = random_identifier_trie(int(n), levels, codebook, model.vocab.text_size, seed)
        window = identifier_window(trie, model.config.vocab_size, model.vocab.text_size)
        options = BeamSearchOptions(beam_size=beam)
        search = jax.jit(lambda params, tables, ids, options=options, window=window: t5_beam_search(
            params, model.config, ids, tables, options=options, window=window))
        sec = _median_seconds(lambda i, s=search, t=trie: s(model.params, t.tables, inputs[i % 4]), repeats)
        gen[str(n)] = batch / sec
        index = dense.JaxExactIndex(normalize_rows(rng.standard_normal((int(n), code_dim)).astype(np.float32)))
        k = min(10, int(n))
        sec = _median_seconds(lambda i, ix=index, k=k: ix.search(queries[i % 4], k, batch_size=batch), repeats)
        dense_qps[str(n)] = batch / sec
        del index
    return {"sizes": [int(n) for n in sizes], "batch": batch, "beam": beam, "levels": levels,
            "codebook_size": codebook, "dim": code_dim, "query_tokens": query_tokens, "generative_qps": gen,
            "dense_search_qps": dense_qps,
            "device": f"{jax.devices()[0].platform} x{jax.device_count()}",
            "timing": f"median of {repeats} batches after one warm-up batch; q/s = batch / median"}


# ----------------------------------------------------------------------------------------------- plots + report


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(rows: list[dict[str, Any]], dense_metrics: dict[str, float], chance: dict[str, float],
                  path: Path) -> None:
    """Training loss and periodic test R@K against step, with the dense baseline and chance for reference."""
    plt = _pyplot()
    fig, (ax_loss, ax_rec) = plt.subplots(1, 2, figsize=(11, 5.2))
    train = [r for r in rows if "loss" in r]
    for key, label in (("loss", "total loss"), ("gen_loss", "generative loss"), ("dis_loss", "discriminative loss")):
        pts = [(r["step"], r[key]) for r in train if key in r and (key != "dis_loss" or r.get("dis_weight", 0) > 0)]
        if pts:
            ax_loss.plot(*zip(*pts, strict=True), label=label)
    ax_loss.set_xlabel("training step")
    ax_loss.set_ylabel("loss (nats per identifier)")
    ax_loss.set_title("T5 training loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    evals = [r for r in rows if "eval/recall@10" in r]
    for i, k in enumerate(metrics.DEFAULT_KS):
        colour = f"C{i}"
        if evals:
            ax_rec.plot([r["step"] for r in evals], [r[f"eval/recall@{k}"] for r in evals], "o-", color=colour,
                        label=f"AVG R@{k}")
        ax_rec.axhline(dense_metrics[f"recall@{k}"], color=colour, ls="--", lw=1, label=f"dense R@{k}")
        ax_rec.axhline(chance[f"recall@{k}"], color=colour, ls=":", lw=1, label=f"chance R@{k}")
    ax_rec.set_xlabel("training step")
    ax_rec.set_ylabel("recall (test queries)")
    ax_rec.set_ylim(0, 1)
    ax_rec.set_title("test recall during training")
    ax_rec.grid(alpha=0.3)
    ax_rec.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_beam_sweep(sweep: dict[str, Any], dense_metrics: dict[str, float], chance: dict[str, float],
                    path: Path) -> None:
    """Image-level R@K of the trained model against beam size."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    beams = sweep["beam_sizes"]
    for i, k in enumerate(metrics.DEFAULT_KS):
        colour = f"C{i}"
        ax.plot(beams, [sweep["per_beam"][str(b)].get(f"recall@{k}", math.nan) for b in beams], "o-", color=colour,
                label=f"AVG R@{k}")
        ax.axhline(dense_metrics[f"recall@{k}"], color=colour, ls="--", lw=1, label=f"dense R@{k}")
    ax.axhline(chance["recall@10"], color="grey", ls=":", lw=1, label="chance R@10")
    ax.set_xscale("log")
    ax.set_xticks(beams, [str(b) for b in beams])
    ax.set_xticks([], minor=True)
    ax.set_xlabel("beam size")
    ax.set_ylabel("image-level recall")
    ax.set_ylim(0, 1)
    ax.set_title(f"recall vs beam size ({sweep['num_queries']} test queries)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_efficiency(eff: dict[str, Any], path: Path) -> None:
    """Queries/s against image-set size, log-log, both systems measured in the same run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    sizes = eff["sizes"]
    ax.plot(sizes, [eff["dense_search_qps"][str(n)] for n in sizes], "o-", color="C0",
            label=f"dense exact search (jit matmul + top_k, d={eff['dim']})")
    ax.plot(sizes, [eff["generative_qps"][str(n)] for n in sizes], "o-", color="C3",
            label=f"AVG constrained beam search (demo T5, beam {eff['beam']})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("image-set size (identifiers)")
    ax.set_ylabel("queries / second")
    ax.set_title(f"{eff['device']}, batch {eff['batch']}, M={eff['levels']}, N={eff['codebook_size']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(x: float | None) -> str:
    return f"{100 * x:.1f}" if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def render_report(r: dict[str, Any], train_rows: list[dict[str, Any]]) -> str:
    """report.md: setup, retrieval table, beam sweep, examples, efficiency, timings."""
    c, ident, t5 = r["corpus"], r["identifiers"], r["t5"]
    cfg = t5["config"]
    ks = metrics.DEFAULT_KS
    lines = [
        "# avg-jax demo report", "",
        "**SYNTHETIC benchmark** (generated scenes, fixed random-network features; not real photos): "
        f"{c['num_images']} images, {c['num_train_queries']} training queries; evaluation on the "
        f"{c['num_test_queries']} test queries against the {c['num_test_images']} test images, which no "
        "training query describes.", "",
        f"- identifiers: {ident['scheme']} vokens, up to {ident['max_len']} tokens, {ident['num_new_tokens']} new "
        f"tokens; {_pct(ident['collision_rate_before_policy'])}% of images collide before the collision policy "
        f"'{ident['collision_policy']}' is applied",
        f"- T5 from scratch: d_model {cfg['d_model']}, {cfg['num_encoder_layers']}+{cfg['num_decoder_layers']} "
        f"layers, {cfg['num_heads']} heads, vocab {cfg['vocab_size']}, {t5['num_params']:,} parameters, "
        f"{t5['steps']} steps: {_loss_description(t5['loss'], t5['steps'])}",
        "- dense baseline: the tokenizer's contrastive projection heads (two towers), exact inner-product search",
        "", "## Retrieval (test split, values in %)", "",
        "| system | " + " | ".join(f"R@{k}" for k in ks) + " | MRR@10 | empty | id-level " +
        " | id-level ".join(f"R@{k}" for k in ks) + " | collision rate |",
        "|---" * (len(ks) * 2 + 4) + "|",
    ]
    for name, m in (("AVG (constrained beam search)", r["avg"]), ("dense two-tower", r["dense"]),
                    ("chance (random ranking)", r["chance"])):
        cells = [_pct(m.get(f"recall@{k}", float("nan"))) for k in ks] + [
            _pct(m.get("mrr@10", float("nan"))), _pct(m.get("empty_rate", float("nan")))]
        cells += [_pct(m.get(f"identifier_recall@{k}", float("nan"))) for k in ks]
        cells.append(_pct(m.get("collision_rate", float("nan"))))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Image level: a hit if a relevant image is among the first K images after each generated "
              "identifier is expanded to the images sharing it. Identifier level (what the official AVG code "
              "reports): a hit if a generated identifier equals a relevant image's identifier.", ""]
    evals = [row for row in train_rows if "eval/recall@10" in row]
    if evals:
        lines += ["## Training", "", f"![training curves]({PLOTS['training']})", "",
                  "| step | " + " | ".join(f"R@{k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
        lines += [f"| {row['step']} | " + " | ".join(_pct(row[f'eval/recall@{k}']) for k in ks) + " |"
                  for row in evals]
        lines.append("")
    sweep = r["beam_sweep"]
    lines += ["## Recall vs beam size", "", f"![recall vs beam]({PLOTS['beam']})", "",
              f"{sweep['num_queries']} test queries.", "",
              "| beam | " + " | ".join(f"R@{k}" for k in ks) + " | MRR@10 | seconds |", "|---" * (len(ks) + 3) + "|"]
    for b in sweep["beam_sizes"]:
        m = sweep["per_beam"][str(b)]
        lines.append(f"| {b} | " + " | ".join(_pct(m.get(f'recall@{k}')) for k in ks) +
                     f" | {_pct(m.get('mrr@10'))} | {m['seconds']:.1f} |")
    lines += ["", "## Example queries", ""]
    for ex in r["examples"]:
        lines += [f"**\"{ex['query']}\"** (relevant: {', '.join(ex['relevant'])})", "",
                  "| rank | AVG | hit | dense | hit |", "|---|---|---|---|---|"]
        for i in range(max(len(ex["avg"]), len(ex["dense"]))):
            a = ex["avg"][i] if i < len(ex["avg"]) else None
            d = ex["dense"][i] if i < len(ex["dense"]) else None

            def cell(x):
                return (f"{x['image_id']}: {x['caption']}", "**yes**" if x["relevant"] else "") if x else ("", "")

            lines.append(f"| {i + 1} | {' | '.join(cell(a))} | {' | '.join(cell(d))} |")
        lines.append("")
    eff = r["efficiency"]
    lines += ["## Efficiency (queries/s)", "", f"![queries/s vs image-set size]({PLOTS['efficiency']})", "",
              f"{eff['device']}, batch {eff['batch']}; AVG: the demo's trained T5 (encoder + constrained beam "
              f"search, beam {eff['beam']}, {eff['query_tokens']}-token queries) over random {eff['levels']}-voken "
              f"identifiers from N="
              f"{eff['codebook_size']}; dense: exact search over random d={eff['dim']} embeddings, search only "
              f"(the query encoder here is a linear head over precomputed features). {eff['timing']}.", "",
              "| images | AVG q/s | dense q/s |", "|---|---|---|"]
    for n in eff["sizes"]:
        lines.append(f"| {n:,} | {eff['generative_qps'][str(n)]:.1f} | {eff['dense_search_qps'][str(n)]:.1f} |")
    wall = r["wall_seconds"]
    load = r["load_average_1min"]
    lines += ["", "## Wall time (seconds)", "",
              f"1-minute load average {load['start']:.1f} at the start, {load['end']:.1f} at the end, on "
              f"{load['cpus']} CPUs (other processes on shared cores slow every stage down).", "",
              "| stage | s |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in wall.items()]
    lines += ["", f"Operative gin configs of every stage: `{CONFIG_DIR}/`. The trained model over the test images, "
              f"as a retrieval checkpoint: `avg-jax retrieve --checkpoint {RETRIEVAL_CHECKPOINT} --query "
              f"\"{r['examples'][0]['query'] if r['examples'] else 'two red circles'}\"` (run in this directory).",
              ""]
    return "\n".join(lines)


def _loss_description(loss: dict[str, Any], steps: int) -> str:
    if loss["discriminative_weight"] == 0 or loss["discriminative_start_step"] >= steps:
        return "generative loss only"
    start = loss["discriminative_start_step"]
    return (f"generative loss for {start} steps, then L_gen + {loss['discriminative_weight']:g} L_dis (listwise over "
            f"the top-{loss['beam_size']} constrained-beam candidates) for {steps - start} steps")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _finite(x: Any) -> Any:
    """JSON-safe: non-finite floats become null."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
