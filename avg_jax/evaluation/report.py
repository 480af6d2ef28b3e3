"""The demo's report.md and plots (training curves, recall against beam size, queries/s against image-set size);
`plot_qps` also draws benchmarks/efficiency.py's figure."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from avg_jax.evaluation import metrics
from avg_jax.evaluation.metrics import pct

PLOTS = {"training": "training_curves.png", "beam": "recall_vs_beam.png", "efficiency": "qps_vs_images.png"}


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(rows: list[dict[str, Any]], dense_metrics: dict[str, float], chance: dict[str, float],
                  path: Path) -> None:
    """Training loss and periodic test R@K against step, with the dense baseline and chance for reference."""
    plt = pyplot()
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
    plt = pyplot()
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
    """The demo's queries/s against image-set size: dense exact search and AVG's constrained decode."""
    plot_qps(path, eff["sizes"], [
        (f"dense exact search (jit matmul + top_k, d={eff['dim']})", eff["dense_search_qps"], "C0", "-"),
        (f"AVG constrained beam search (demo T5, beam {eff['beam']})", eff["generative_qps"], "C3", "-")],
        f"{eff['device']}, batch {eff['batch']}, M={eff['levels']}, N={eff['codebook_size']}")


def plot_qps(path: str | Path, sizes: Sequence[int], series: Sequence[tuple[str, Mapping[str, float], str, str]],
             title: str, crossover: int | None = None) -> None:
    """Queries/s against image-set size, log-log; `series`: (label, q/s by str(size), colour, line style)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for label, values, colour, style in series:
        ax.plot(sizes, [values[str(n)] for n in sizes], style, marker="o", color=colour, label=label)
    if crossover:
        ax.axvline(crossover, color="grey", ls=":", label="crossover")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("image-set size (identifiers)")
    ax.set_ylabel("queries / second")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_report(r: dict[str, Any], train_rows: list[dict[str, Any]], config_dir: str, retrieval_checkpoint: str
                  ) -> str:
    """The demo's report.md from its metrics.json `r` and the training metrics rows: setup, retrieval table,
    training curve, beam sweep, examples, efficiency, timings; `config_dir` holds the operative gin configs and
    `retrieval_checkpoint` the exported model (both relative to the report)."""
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
        f"tokens; {pct(ident['collision_rate_before_policy'])}% of images collide before the collision policy "
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
    systems = [("AVG (constrained beam search)", r["avg"])]
    if "avg_fused" in r:
        f = r["avg_fused"]
        chosen = (f", chosen on {f['chosen_on_queries']} {f['chosen_on_split']} queries by {f['chosen_by']}"
                  if "chosen_on_split" in f else "")
        systems.append((f"AVG + voken prior {f['prior_weight']:g} + rerank {f['rerank_weight']:g} "
                        f"(temperature {f['temperature']:g}{chosen})", f))
    systems.append(("dense two-tower", r["dense"]))
    if "ceiling" in r:
        systems.append(("ceiling, no T5: <text head(query), quantized image> (the identifiers' aligned geometry "
                        "alone; a generator that reads the text can pass it)", r["ceiling"]))
    for name, m in (*systems, ("chance (random ranking)", r["chance"])):
        cells = [pct(m.get(f"recall@{k}", float("nan"))) for k in ks] + [
            pct(m.get("mrr@10", float("nan"))), pct(m.get("empty_rate", float("nan")))]
        cells += [pct(m.get(f"identifier_recall@{k}", float("nan"))) for k in ks]
        cells.append(pct(m.get("collision_rate", float("nan"))))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Image level: a hit if a relevant image is among the first K images after each generated "
              "identifier is expanded to the images sharing it. Identifier level (what the official AVG code "
              "reports): a hit if a generated identifier equals a relevant image's identifier.", ""]
    evals = [row for row in train_rows if "eval/recall@10" in row]
    if evals:
        lines += ["## Training", "", f"![training curves]({PLOTS['training']})", "",
                  "| step | " + " | ".join(f"R@{k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
        lines += [f"| {row['step']} | " + " | ".join(pct(row[f'eval/recall@{k}']) for k in ks) + " |"
                  for row in evals]
        lines.append("")
    sweep = r["beam_sweep"]
    lines += ["## Recall vs beam size", "", f"![recall vs beam]({PLOTS['beam']})", "",
              f"{sweep['num_queries']} test queries.", "",
              "| beam | " + " | ".join(f"R@{k}" for k in ks) + " | MRR@10 | seconds |", "|---" * (len(ks) + 3) + "|"]
    for b in sweep["beam_sizes"]:
        m = sweep["per_beam"][str(b)]
        lines.append(f"| {b} | " + " | ".join(pct(m.get(f'recall@{k}')) for k in ks) +
                     f" | {pct(m.get('mrr@10'))} | {m['seconds']:.1f} |")
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
    lines += ["", f"Operative gin configs of every stage: `{config_dir}/`. The trained model over the test images, "
              f"as a retrieval checkpoint: `avg-jax retrieve --checkpoint {retrieval_checkpoint} --query "
              f"\"{r['examples'][0]['query'] if r['examples'] else 'two red circles'}\"` (run in this directory).",
              ""]
    return "\n".join(lines)


def _loss_description(loss: dict[str, Any], steps: int) -> str:
    if loss["discriminative_weight"] == 0 or loss["discriminative_start_step"] >= steps:
        return "generative loss only"
    start = loss["discriminative_start_step"]
    return (f"generative loss for {start} steps, then L_gen + {loss['discriminative_weight']:g} L_dis (listwise over "
            f"the top-{loss['beam_size']} constrained-beam candidates) for {steps - start} steps")
