"""`avg-jax sweep`: run the experiments of one paper table and lay their metrics out like the paper's table.

A table is a list of rows (label, experiment gin files, the paper's R@1/5/10). Each row runs the stages'
library functions in this process, sequentially: `tokenize_corpus` (identifier table), `train_retrieval`
(training + final constrained-beam evaluation), then image- and identifier-level metrics into the row's
`metrics.json`. Rows whose tokenizer bindings are identical share one identifier table, and rows that differ
only in evaluation settings (beam size, rerank) share one trained run, so e.g. Table 7 trains once.

Row kinds (`SweepRow.kind`): 'train' (the above), and three that need only the tokenizer (no T5 is trained):
'dense' (`dense.dense_baseline` with the tokenizer's contrastive heads: the two-tower baseline), 'ceiling' and
'ceiling_codes' (`evaluation.ceiling`: the no-T5 diagnostic ceilings of the vokens). A row whose gin file is
missing (or fails to parse) is reported as that row's error; the other rows still run. Every row's row.json
records its wall seconds (`wall_s`; a row reusing another's table or run only pays what it adds), shown in
the table. Output layout:

  OUT/identifiers/<key>/      identifier tables (avg-jax tokenize --out), shared by rows
  OUT/runs/<key>/             training runs (avg-jax train --run_dir), shared by rows
  OUT/<table>/<row>/          metrics.json, ranked_<split>.jsonl, operative_config.gin, row.json (or error.txt)
  OUT/<table>/table.md        the aggregated table; table.json the same numbers

On a TPU pod each row is its own job: `--dry_run` prints every row's gin files and directories.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gin

from avg_jax import config
from avg_jax.evaluation.metrics import FIT_PREFIX, pct, prefix_recall_key

METRICS_FILE = "metrics.json"
ROW_FILE = "row.json"
ERROR_FILE = "error.txt"
TABLE_MD = "table.md"
TABLE_JSON = "table.json"
PAPER_KS = (1, 5, 10)
FIT_RECALL = f"{FIT_PREFIX}recall@10"
# Identifier prefix recall at depth 1 (metrics.identifier_prefix_recall): a top-10 generated identifier starts
# with a relevant image's first voken. Scored for rows whose beam returns at least 10 identifiers.
FIRST_VOKEN_K = 10
FIRST_VOKEN_RECALL = prefix_recall_key(1, FIRST_VOKEN_K)
# Bindings of the tokenizer stage: rows agreeing on these (and on the corpus) share an identifier table.
TOKENIZER_CONFIGURABLES = ("tokenize_corpus", "train_tokenizer", "RQTokenizerConfig", "TokenizerLossWeights",
                           "grace_semantic_identifiers", "grace_structured_identifiers")
# Parameters read only by the final evaluation: rows differing only in these share one trained run.
EVAL_ONLY_PARAMS = ("train_retrieval.eval_beam_size", "train_retrieval.eval_batch_size",
                    "train_retrieval.eval_max_queries", "train_retrieval.eval_constrained",
                    "train_retrieval.eval_rerank_weight", "train_retrieval.eval_rerank_temperature",
                    "train_retrieval.eval_prior_weight", "train_retrieval.fit_queries")
# Configurables read only by the final evaluation: every parameter of theirs is evaluation-only.
EVAL_ONLY_CONFIGURABLES = ("FusionSelection",)
ROW_KINDS = ("train", "dense", "ceiling", "ceiling_codes")  # see the module docstring
DATASETS = ("flickr30k", "coco", "emoji")

# GRACE's beam-size study plots R@1 and R@10 (its Figure 6, no table; the beams are not listed): AVG Table 7's
# beams. Below 10 the beam returns fewer than R@10's 10 identifiers, so R@10 is "-" there (R@5 below 5).
GRACE_BEAMS = (1, 5, 10, 20, 30, 40, 50)

Paper = tuple[float | None, float | None, float | None]  # R@1, R@5, R@10 in %, None where the paper has "-"


class SweepPreempted(RuntimeError):
    """A row's training stopped on SIGTERM (checkpoint saved): the sweep stops too, since a later row sharing the
    run would resume it and train on while the job is being taken away."""


@dataclasses.dataclass(frozen=True)
class SweepRow:
    label: str
    gin_files: tuple[str, ...]
    paper: Paper | None = None
    gin_params: tuple[str, ...] = ()  # after the files: a study of one setting without a file per value
    kind: str = "train"  # one of ROW_KINDS: train a T5, or a tokenizer-only row (dense / ceiling diagnostics)

    def __post_init__(self):
        if self.kind not in ROW_KINDS:
            raise ValueError(f"SweepRow {self.label!r}: kind must be one of {ROW_KINDS}, got {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class SweepTable:
    name: str
    title: str  # the paper's caption, shortened
    row_header: str  # first column, as in the paper ("Method", "Codebook Size", ...)
    dataset: str  # the paper's numbers are shown beside ours when the corpus is this dataset
    rows: tuple[SweepRow, ...]


def _row(label: str, gin_file: str, paper: Paper | None = None, kind: str = "train") -> SweepRow:
    return SweepRow(label, (gin_file,), paper, kind=kind)


_AVG = "experiments/avg/flickr30k_"
_EMOJI = "experiments/avg/emoji_"
_AVG_REF = _AVG + "table3_full.gin"  # AVG at N = 1024, M = 4, T5-base, beam 10: the ablation tables' AVG row
_GRACE_NAMES = {"numeric": "Numeric Id", "string": "String Id", "semantic": "Semantic Id",
                "structured": "Structured Id", "atomic": "Atomic Id"}
# Paper numbers: AVG paper Tables 1, 3-7; GRACE paper Tables 1-2 (../shared/papers/*.md).
_GRACE_F30K = {"numeric": (22.5, 28.9, 29.4), "string": (30.5, 39.0, 40.4), "semantic": (22.9, 34.9, 37.4),
               "structured": (37.4, 59.5, 66.2), "atomic": (68.4, 88.9, 93.7)}
_GRACE_COCO = {"numeric": (0.03, 0.14, 0.28), "string": (0.12, 0.37, 0.88), "semantic": (13.3, 30.4, 35.9),
               "structured": (16.7, 39.2, 50.3), "atomic": (41.5, 69.1, 79.1)}
_GRACE_NO_MEMORIZE = {"numeric": (18.2, 24.3, 24.9), "string": (26.1, 33.3, 34.6),
                      "semantic": (19.3, 31.2, 34.3), "structured": (36.5, 61.1, 68.2)}
_GRACE_NO_CONSTRAINED = {"numeric": (7.72, 16.7, 21.1), "string": (10.9, 22.3, 28.0),
                         "semantic": (0.6, 2.3, 3.0), "structured": (10.2, 22.3, 29.3)}


def _grace_rows(dataset: str, numbers: dict[str, Paper], schemes: Sequence[str]) -> tuple[SweepRow, ...]:
    return tuple(_row(f"GRACE ({_GRACE_NAMES[s]})", f"experiments/grace/{dataset}_{s}.gin", numbers[s])
                 for s in schemes)


def _fusion_rows(prefix: str) -> tuple[SweepRow, ...]:
    """Beside a main AVG row (`{prefix}main.gin`): AVG fused with the dense towers (evaluation-only, the same
    run), AVG + query conditioning (a second run) alone and fused, the dense baseline of the same tokenizer's
    heads and the no-T5 ceiling (no paper numbers)."""
    return (_row("AVG + voken prior + rerank", prefix + "prior_rerank.gin"),
            _row("AVG + query conditioning", prefix + "conditioned.gin"),
            _row("AVG + query conditioning + voken prior + rerank", prefix + "conditioned_prior.gin"),
            _row("Dense (tokenizer heads, no T5)", prefix + "main.gin", kind="dense"),
            _row("Ceiling: text head . quantized image (no T5)", prefix + "main.gin", kind="ceiling"))


TABLES: dict[str, SweepTable] = {t.name: t for t in (
    SweepTable("avg_table1", "AVG Table 1: generative cross-modal retrieval on Flickr30K", "Method", "flickr30k",
               (*_grace_rows("flickr30k", _GRACE_F30K, ("numeric", "string", "semantic", "structured")),
                _row("IRGen", _AVG + "irgen.gin", (49.0, 68.9, 72.5)),
                _row("AVG", _AVG + "main.gin", (62.8, 85.4, 91.2)),
                *_fusion_rows(_AVG))),
    SweepTable("avg_table1_coco", "AVG Table 1: generative cross-modal retrieval on MS-COCO (5K)", "Method",
               "coco",
               (*_grace_rows("coco", _GRACE_COCO, ("numeric", "string", "semantic", "structured")),
                _row("IRGen", "experiments/avg/coco_irgen.gin", (29.6, 50.7, 56.3)),
                _row("AVG", "experiments/avg/coco_main.gin", (31.3, 58.0, 66.5)),
                *_fusion_rows("experiments/avg/coco_"))),
    SweepTable("avg_table3", "AVG Table 3: ablation study on key components of AVG (Flickr30K)", "Method",
               "flickr30k",
               (_row("AVG", _AVG_REF, (62.3, 83.5, 86.6)),
                _row("w/o cross-modal alignment", _AVG + "table3_no_alignment.gin", (56.8, 76.5, 79.2)),
                _row("w/o voken embedding", _AVG + "table3_no_voken_init.gin", (62.4, 82.7, 85.8)),
                _row("w/o discriminative loss", _AVG + "table3_no_discriminative.gin", (60.1, 81.9, 85.0)))),
    SweepTable("avg_table4", "AVG Table 4: performance versus the codebook size N on Flickr30K", "Codebook Size",
               "flickr30k",
               (_row("256", _AVG + "table4_n256.gin", (60.8, 82.0, 84.8)),
                _row("512", _AVG + "table4_n512.gin", (61.1, 82.8, 86.1)),
                _row("1,024", _AVG_REF, (62.3, 83.5, 86.6)),
                _row("2,048", _AVG + "table4_n2048.gin", (61.2, 83.0, 86.0)))),
    SweepTable("avg_table5", "AVG Table 5: performance versus the voken length M on Flickr30K", "Voken Length",
               "flickr30k",
               (_row("2", _AVG + "table5_m2.gin", (45.7, 73.1, 80.6)),
                _row("4", _AVG_REF, (62.3, 83.5, 86.6)),
                _row("6", _AVG + "table5_m6.gin", (63.2, 84.0, 86.7)),
                _row("8", _AVG + "table5_m8.gin", (62.1, 82.6, 85.2)),
                _row("10", _AVG + "table5_m10.gin", (64.1, 84.2, 87.1)))),
    SweepTable("avg_table6", "AVG Table 6: autoregressive model backbones on Flickr30K (full fine-tuning)",
               "Backbone", "flickr30k",
               (_row("T5-small", _AVG + "table6_t5_small.gin"),
                _row("T5-base", _AVG_REF, (62.3, 83.5, 86.6)),
                _row("T5-large", _AVG + "table6_t5_large.gin", (64.0, 84.5, 87.6)),
                _row("T5-XL", _AVG + "table6_t5_xl.gin", (64.6, 84.9, 88.0)))),
    SweepTable("avg_table7", "AVG Table 7: performance of AVG versus the beam size (Flickr30K)", "Beam Size",
               "flickr30k",
               (_row("1", _AVG + "table7_beam1.gin", (44.2, None, None)),
                _row("5", _AVG + "table7_beam5.gin", (60.6, 78.1, None)),
                _row("10", _AVG_REF, (62.3, 83.5, 86.6)),
                _row("20", _AVG + "table7_beam20.gin", (62.7, 85.1, 90.2)),
                _row("30", _AVG + "table7_beam30.gin", (62.7, 85.5, 91.1)),
                _row("40", _AVG + "table7_beam40.gin", (62.8, 85.4, 91.2)),
                _row("50", _AVG + "table7_beam50.gin", (62.8, 85.4, 91.1)))),
    SweepTable("avg_emoji", "AVG vs IRGen on the real emoji benchmark (no paper numbers)", "Method", "emoji",
               (_row("IRGen", _EMOJI + "irgen.gin"),
                _row("AVG", _EMOJI + "main.gin"),
                _row("AVG + rerank", _EMOJI + "rerank.gin"),
                _row("AVG, codebook N = 1,024", _EMOJI + "n1024.gin"),
                _row("AVG, codebook N = 1,024, M = 2", _EMOJI + "n1024_m2.gin"),
                _row("IRGen, codebook N = 1,024, M = 2", _EMOJI + "irgen_n1024_m2.gin"),
                _row("AVG + voken prior", _EMOJI + "prior.gin"),
                _row("AVG + voken prior + rerank", _EMOJI + "prior_rerank.gin"),
                _row("AVG + query conditioning", _EMOJI + "conditioned.gin"),
                _row("AVG + query conditioning + voken prior + rerank", _EMOJI + "conditioned_prior.gin"),
                _row("AVG + query conditioning + text dropout", _EMOJI + "conditioned_text_dropout.gin"),
                _row("AVG + query conditioning + text dropout + voken prior + rerank",
                     _EMOJI + "conditioned_text_dropout_prior.gin"),
                _row("AVG + dense distillation", _EMOJI + "distill.gin"),
                _row("AVG + dense distillation + voken prior + rerank", _EMOJI + "distill_prior.gin"),
                _row("AVG + query conditioning, codebook N = 512", _EMOJI + "conditioned_n512.gin"),
                _row("AVG + query conditioning, codebook N = 512 + voken prior + rerank",
                     _EMOJI + "conditioned_n512_prior.gin"),
                _row("AVG + query conditioning, codebook N = 1,024", _EMOJI + "conditioned_n1024.gin"),
                _row("AVG + query conditioning, codebook N = 1,024 + voken prior + rerank",
                     _EMOJI + "conditioned_n1024_prior.gin"),
                _row("AVG + query conditioning, codebook N = 1,024, M = 2", _EMOJI + "conditioned_n1024_m2.gin"),
                _row("AVG + query conditioning, codebook N = 1,024, M = 2 + voken prior",
                     _EMOJI + "conditioned_n1024_m2_voken_prior.gin"),
                _row("AVG + query conditioning, codebook N = 1,024, M = 2 + voken prior + rerank",
                     _EMOJI + "conditioned_n1024_m2_prior.gin"),
                _row("AVG + hierarchical alignment", _EMOJI + "prefix_align.gin"),
                _row("AVG + hierarchical alignment + voken prior + rerank", _EMOJI + "prefix_align_prior.gin"),
                _row("w/o alignment", _EMOJI + "no_alignment.gin"),
                _row("w/o L_dis", _EMOJI + "no_dis.gin"),
                _row("L_dis on pseudo-queries too", _EMOJI + "dis_pseudo.gin"),
                _row("L_dis over fused scores + voken prior + rerank", _EMOJI + "dis_prior.gin"),
                _row("random voken embeddings", _EMOJI + "random_voken.gin"),
                _row("w/o gallery indexing", _EMOJI + "no_indexing.gin"),
                _row("Dense (tokenizer heads, no T5)", _EMOJI + "main.gin", kind="dense"),
                _row("Ceiling: text head . quantized image (no T5)", _EMOJI + "main.gin", kind="ceiling"),
                _row("Ceiling: query's own RQ code prefix (no T5)", _EMOJI + "main.gin", kind="ceiling_codes"))),
    SweepTable("grace_table1", "GRACE Table 1: text-to-image retrieval on Flickr30K", "Identifier", "flickr30k",
               _grace_rows("flickr30k", _GRACE_F30K, tuple(_GRACE_NAMES))),
    SweepTable("grace_table1_coco", "GRACE Table 1: text-to-image retrieval on MS-COCO (5K)", "Identifier", "coco",
               _grace_rows("coco", _GRACE_COCO, tuple(_GRACE_NAMES))),
    SweepTable("grace_beam", "GRACE appendix B (Figure 6): retrieval versus the beam size (Flickr30K)",
               "Identifier, beam", "flickr30k",
               tuple(SweepRow(f"{_GRACE_NAMES[s]}, {b}", (f"experiments/grace/flickr30k_{s}.gin",),
                              gin_params=(f"train_retrieval.eval_beam_size = {b}",))
                     for s in ("numeric", "string", "semantic", "structured") for b in GRACE_BEAMS)),
    SweepTable("grace_table2", "GRACE Table 2: ablation study (Flickr30K)", "Identifier", "flickr30k",
               tuple(r for s in ("numeric", "string", "semantic", "structured") for r in (
                   _row(f"{_GRACE_NAMES[s]}", f"experiments/grace/flickr30k_{s}.gin", _GRACE_F30K[s]),
                   _row(f"{_GRACE_NAMES[s]} w/o learning to memorize",
                        f"experiments/grace/flickr30k_{s}_no_memorize.gin", _GRACE_NO_MEMORIZE[s]),
                   _row(f"{_GRACE_NAMES[s]} w/o constrained generation",
                        f"experiments/grace/flickr30k_{s}_no_constrained.gin", _GRACE_NO_CONSTRAINED[s])))),
)}


def _exists(gin_file: str) -> bool:
    return (config.GIN_CONFIG_DIR / gin_file).exists()


def experiment_files() -> list[str]:
    """Every experiment gin file some table runs (relative to gin_configs/) that exists, sorted."""
    return sorted({f for t in TABLES.values() for r in t.rows for f in r.gin_files if _exists(f)})


def missing_experiment_files() -> list[str]:
    """Gin files named by a table row but not (yet) in gin_configs/: those rows report the missing file."""
    return sorted({f for t in TABLES.values() for r in t.rows for f in r.gin_files if not _exists(f)})


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_") or "row"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def tokenizer_key(corpus_dir: str) -> str:
    """Digest of the parsed config's tokenizer-stage bindings (macros resolved) and the corpus directory."""
    bindings = {name: gin.get_bindings(name) for name in TOKENIZER_CONFIGURABLES}
    return _digest(json.dumps({"corpus": str(Path(corpus_dir).resolve()), "bindings": bindings}, sort_keys=True,
                              default=repr))


def training_key(tok_key: str) -> str:
    """Digest of the whole parsed config without the evaluation-only parameters, and of the identifier table.
    A configurable's section left with nothing but its header (all of its parameters evaluation-only, e.g.
    `FusionSelection`) goes too, so setting it does not split a run."""
    eval_only = re.compile(r"^(" + "|".join([*(re.escape(p) for p in EVAL_ONLY_PARAMS),
                                              *(re.escape(c) + r"\.\w+" for c in EVAL_ONLY_CONFIGURABLES)])
                           + r")\s*=")
    sections = []
    for section in gin.config_str().split("\n\n"):
        lines = section.splitlines()
        kept = [line for line in lines if not eval_only.match(line)]
        if len(kept) == len(lines) or any(line and not line.startswith("#") for line in kept):
            sections.append("\n".join(kept))
    return _digest(tok_key + "\n" + "\n\n".join(sections))


@dataclasses.dataclass(frozen=True)
class RowPlan:
    """Where one row's stages read and write, resolved from its parsed gin config."""

    table: str
    row: SweepRow
    gin_files: tuple[str, ...]
    gin_params: tuple[str, ...]
    corpus_dir: str
    identifiers_dir: Path
    run_dir: Path
    row_dir: Path
    config_digest: str


def row_dir(table: SweepTable, row: SweepRow, out_dir: str | Path) -> Path:
    return Path(out_dir) / table.name / _slug(row.label)


def parse_row(table: SweepTable, row: SweepRow, out_dir: str | Path, corpus_dir: str | None = None,
              gin_files: Sequence[str] = (), gin_params: Sequence[str] = ()) -> RowPlan:
    """Parse the row's gin files (then `gin_files`, `gin_params` and the corpus override) and plan its dirs."""
    params = [*row.gin_params, *gin_params] + ([f"CORPUS_DIR = {str(corpus_dir)!r}"] if corpus_dir else [])
    files = (*row.gin_files, *gin_files)
    config.parse_gin(files, params)
    corpus = config.path_from_flag_or_macro(None, "CORPUS_DIR", f"{table.name} row {row.label!r}: --corpus")
    tok = tokenizer_key(corpus)
    out = Path(out_dir)
    return RowPlan(table=table.name, row=row, gin_files=files, gin_params=tuple(params), corpus_dir=corpus,
                   identifiers_dir=out / "identifiers" / tok, run_dir=out / "runs" / training_key(tok),
                   row_dir=row_dir(table, row, out),
                   config_digest=_digest(("" if row.kind == "train" else row.kind) + gin.config_str()))


def run_row(plan: RowPlan) -> dict[str, float]:
    """Tokenize (unless the table exists), train (resumes; a finished run only re-evaluates) and score one row;
    a tokenizer-only row (dense / ceiling) scores the tokenizer instead of training.

    Expects the row's gin config to be parsed (`parse_row`). Returns the image-level metrics; row.json records
    the row's wall seconds.
    """
    start = time.perf_counter()
    scores = _run_row(plan)
    record = {**_row_record(plan), "wall_s": round(time.perf_counter() - start, 3)}
    (plan.row_dir / ROW_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return scores


def _tokenizer_row(plan: RowPlan, corpus: Any, split: str) -> tuple[dict[str, float], list[list[str]]]:
    """Metrics and ranked image ids of a dense / ceiling row: the tokenizer of `plan.identifiers_dir` only."""
    from avg_jax.evaluation import ceiling, dense
    from avg_jax.tokenizer.train import load_tokenizer

    tok = load_tokenizer(plan.identifiers_dir)
    if plan.row.kind == "dense":
        text, image = dense.head_projections(tok)
        return dense.dense_baseline(corpus, split, text_projection=text, image_projection=image)
    return ceiling.ceiling_diagnostic(corpus, tok, split, plan.row.kind)


def _run_row(plan: RowPlan) -> dict[str, float]:
    from avg_jax.data.corpus import Corpus
    from avg_jax.evaluation.ranked import evaluate_ranked, read_ranked_jsonl, write_metrics, write_ranked_jsonl
    from avg_jax.identifiers.table import IdentifierTable
    from avg_jax.tokenizer.pipeline import tokenize_corpus
    from avg_jax.training.evaluator import GENERATION_METRICS
    from avg_jax.training.retrieval import train_retrieval  # the trainer; imported here so tables load without it

    if not Path(plan.corpus_dir).exists():
        raise FileNotFoundError(f"corpus directory {plan.corpus_dir} (CORPUS_DIR of {list(plan.gin_files)}) does "
                                "not exist; build it as the data gin file says, or pass --corpus DIR")
    if not (plan.identifiers_dir / "identifiers.json").exists():
        tokenize_corpus(plan.corpus_dir, str(plan.identifiers_dir))
        config.write_operative_config(plan.identifiers_dir)
    if plan.row.kind != "train":
        corpus = Corpus.load(plan.corpus_dir)
        split = gin.get_bindings("train_retrieval").get("eval_split", "test") or "test"
        start = time.perf_counter()
        scores, ranked_ids = _tokenizer_row(plan, corpus, split)
        scores["queries_per_s"] = len(ranked_ids) / max(time.perf_counter() - start, 1e-9)
        plan.row_dir.mkdir(parents=True, exist_ok=True)
        write_ranked_jsonl(plan.row_dir / f"ranked_{split}.jsonl", corpus, corpus.query_rows(split), ranked_ids)
        write_metrics(plan.row_dir, corpus, plan.corpus_dir, split, {plan.row.label: scores})
        config.write_operative_config(plan.row_dir)
        return scores
    result = train_retrieval(plan.corpus_dir, str(plan.identifiers_dir), str(plan.run_dir))
    if result.get("preempted"):
        raise SweepPreempted(f"training of {plan.run_dir} was stopped (SIGTERM) at step {result['step']}; rerun "
                             "the sweep to resume it")
    split = result.get("split")
    if split is None:
        raise ValueError(f"{plan.table} row {plan.row.label!r}: train_retrieval.eval_split is None, nothing to "
                         "score")
    # AVG + rerank: the reranked outputs (the generative ones stay in the run; their metrics are the AVG row's).
    ranked = Path(result.get("rerank_ranked") or plan.run_dir / f"ranked_{split}.jsonl")
    corpus = Corpus.load(plan.corpus_dir)
    table = IdentifierTable.load(plan.identifiers_dir)
    split_ids = [corpus.images[i].id for i in corpus.image_rows(split)]
    outputs = read_ranked_jsonl(ranked, corpus, split)
    # A beam b returns b identifiers: R@K for K > b is inapplicable (the paper's "-") and left out.
    scores = evaluate_ranked(corpus, outputs, table.subset(split_ids).groups(),
                             num_results=result["beam_size"],
                             prefix_k=FIRST_VOKEN_K if result["beam_size"] >= FIRST_VOKEN_K else None)
    scores.update({k: result[k] for k in GENERATION_METRICS if k in result})  # free generation's failures
    scores.update({k: v for k, v in result.items() if k.startswith(FIT_PREFIX)})  # the train queries' fit
    prefix = "rerank/" if result.get("rerank_ranked") else ""
    if f"{prefix}queries_per_s" in result:
        scores["queries_per_s"] = result[f"{prefix}queries_per_s"]
    plan.row_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ranked, plan.row_dir / ranked.name)
    write_metrics(plan.row_dir, corpus, plan.corpus_dir, split, {plan.row.label: scores})
    config.write_operative_config(plan.row_dir)
    return scores


def _row_record(plan: RowPlan) -> dict[str, Any]:
    return {"table": plan.table, "label": plan.row.label, "gin_files": list(plan.gin_files),
            "gin_params": list(plan.gin_params), "kind": plan.row.kind, "corpus": plan.corpus_dir,
            "identifiers": str(plan.identifiers_dir), "run_dir": str(plan.run_dir),
            "config_digest": plan.config_digest}


def is_done(plan: RowPlan) -> bool:
    """The row's metrics exist and were made by exactly this config."""
    record = plan.row_dir / ROW_FILE
    if not (plan.row_dir / METRICS_FILE).exists() or not record.exists():
        return False
    return json.loads(record.read_text()).get("config_digest") == plan.config_digest


# ----------------------------------------------------------------------------------------------- aggregation

def _dataset_of(metrics: dict[str, Any]) -> str | None:
    """'flickr30k' / 'coco' / 'emoji' when metrics.json's corpus is (a real copy of) that dataset, else None."""
    if metrics.get("synthetic"):
        return None
    name = re.sub(r"[^a-z0-9]", "", str(metrics.get("corpus_name", "")).lower())
    return next((d for d in DATASETS if d in name), None)


def _number(value: Any) -> str:
    return f"{value:.0f}" if isinstance(value, (int, float)) and value == value else "-"


def _paper(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def aggregate(table: SweepTable, out_dir: str | Path) -> tuple[str, dict[str, Any]]:
    """The markdown table (ours R@1/5/10 and MRR@10 in %, the paper's R@1/5/10 beside them when the corpus is
    the paper's dataset) and the same numbers as a dict, from each row's metrics.json under OUT/<table>/."""
    root = Path(out_dir) / table.name
    rows, datasets, notes = [], set(), []
    for row in table.rows:
        directory = root / _slug(row.label)
        entry: dict[str, Any] = {"label": row.label, "gin_files": list(row.gin_files),
                                 "paper": None if row.paper is None else dict(zip(
                                     [f"recall@{k}" for k in PAPER_KS], row.paper, strict=True))}
        path = directory / METRICS_FILE
        if (directory / ROW_FILE).exists():
            entry["wall_s"] = json.loads((directory / ROW_FILE).read_text()).get("wall_s")
        if path.exists():
            metrics = json.loads(path.read_text())
            systems = metrics.get("systems", {})
            if len(systems) != 1:
                raise ValueError(f"{path}: expected one system under 'systems', got {sorted(systems)}")
            entry.update(status="done", metrics=next(iter(systems.values())), split=metrics.get("split"),
                         corpus_name=metrics.get("corpus_name"), synthetic=bool(metrics.get("synthetic")))
            datasets.add(_dataset_of(metrics))
        elif (directory / ERROR_FILE).exists():
            entry.update(status="failed", error=(directory / ERROR_FILE).read_text().strip().splitlines()[-1])
        else:
            entry["status"] = "not run"
        rows.append(entry)
    corpora = {r["corpus_name"] for r in rows if r["status"] == "done"}
    if len(corpora) > 1:
        raise ValueError(f"{root}: rows were run on different corpora {sorted(corpora)}; one table, one corpus")
    show_paper = datasets == {table.dataset}
    header = [table.row_header, "R@1", "R@5", "R@10", "MRR@10", "id R@10", "collisions"]
    # Free generation (w/o constrained generation) rows: % of generations that are no image's identifier.
    show_invalid = any("invalid_rate" in r.get("metrics", {}) for r in rows)
    if show_invalid:
        header.append("invalid")
    # With train_retrieval.fit_queries: the generator's R@10 on TRAIN queries over the TRAIN images.
    show_fit = any(FIT_RECALL in r.get("metrics", {}) for r in rows)
    if show_fit:
        header.append("train R@10")
        notes.append("train R@10: the generator's R@10 on evenly spaced TRAIN queries over the TRAIN images "
                     "(train_retrieval.fit_queries), how well it fits what it was trained on.")
    # Rows scored with their identifiers: where the generator loses a query (its first voken or after it).
    show_first = any(FIRST_VOKEN_RECALL in r.get("metrics", {}) for r in rows)
    if show_first:
        header.append("first voken R@10")
        notes.append("first voken R@10: one of the top-10 generated identifiers starts with a relevant image's "
                     "first voken (`avg-jax eval --prefix_recall_at 10`); R@10 below it is lost deeper in the "
                     "identifier. On a re-ranked row, of the search's identifiers before re-ranking.")
    header += ["q/s", "time (s)"]
    num_ours = len(header) - 1
    if show_paper:
        header += ["paper R@1", "paper R@5", "paper R@10"]
    lines = [f"## {table.title}", ""]
    if corpora:
        corpus = next(iter(corpora))
        synthetic = any(r.get("synthetic") for r in rows if r["status"] == "done")
        lines.append(f"Ours on corpus `{corpus}`{' (SYNTHETIC)' if synthetic else ''}, split "
                     f"`{next(r['split'] for r in rows if r['status'] == 'done')}`, image-level recall in %.")
        if not show_paper:
            notes.append(f"Paper numbers ({table.dataset}) are not shown: this corpus is not that dataset.")
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if r["status"] == "done":
            m = r["metrics"]
            cells = [pct(m.get(f"recall@{k}")) for k in PAPER_KS] + [
                pct(m.get("mrr@10")), pct(m.get("identifier_recall@10")), pct(m.get("collision_rate"), 2)]
            cells += [pct(m.get("invalid_rate"))] if show_invalid else []
            cells += [pct(m.get(FIT_RECALL))] if show_fit else []
            cells += [pct(m.get(FIRST_VOKEN_RECALL))] if show_first else []
            cells += [_number(m.get("queries_per_s")), _number(r.get("wall_s"))]
        else:
            cells = [r["status"]] + [""] * (num_ours - 1)
            if r["status"] == "failed":
                notes.append(f"{r['label']}: {r['error']}")
        if show_paper:
            cells += [_paper(v) for v in (r["paper"] or {}).values()] or ["-"] * 3
        lines.append("| " + " | ".join([r["label"], *cells]) + " |")
    if any(r["status"] == "done" and f"recall@{max(PAPER_KS)}" not in r["metrics"] for r in rows):
        notes.append("-: R@K with K above the beam size, and MRR@10 below beam 10, are inapplicable (the beam "
                     "returns only that many identifiers), as in the paper.")
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines).rstrip() + "\n", {"table": table.name, "title": table.title, "rows": rows,
                                               "paper_shown": show_paper}


def write_table(table: SweepTable, out_dir: str | Path) -> Path:
    """Aggregate and write OUT/<table>/table.md and table.json; returns the markdown path."""
    markdown, data = aggregate(table, out_dir)
    root = Path(out_dir) / table.name
    root.mkdir(parents=True, exist_ok=True)
    (root / TABLE_JSON).write_text(json.dumps(data, indent=2) + "\n")
    path = root / TABLE_MD
    path.write_text(markdown)
    return path


def get_table(name: str | None) -> SweepTable:
    if name not in TABLES:
        raise ValueError(f"--table must be one of {sorted(TABLES)}, got {name!r}")
    return TABLES[name]


def describe_tables() -> str:
    """Every table with its rows and their gin files (`avg-jax sweep --list`)."""
    lines = []
    for t in TABLES.values():
        lines.append(f"{t.name}: {t.title}")
        lines += [f"  {r.label:<45} {' '.join(r.gin_files)}" + "".join(f" [{p}]" for p in r.gin_params)
                  for r in t.rows]
    return "\n".join(lines) + "\n"


def run_sweep(table: SweepTable, out_dir: str, corpus_dir: str | None = None, gin_files: Sequence[str] = (),
              gin_params: Sequence[str] = (), rows: Sequence[str] | None = None, dry_run: bool = False) -> int:
    """Run the rows of `table` (those labelled in `rows`, default all) that are not done yet, one after the other
    in this process, then rewrite the aggregated table; `gin_files`/`gin_params` apply to every row after its
    own files. A failing row is written to its error.txt and the others still run. Returns the number of
    failed rows. `dry_run` prints what would run, where, and what is reused."""
    labels = {_slug(r.label): r for r in table.rows}
    unknown = [x for x in rows or () if _slug(x) not in labels]
    if unknown:
        raise ValueError(f"rows {unknown} are not rows of {table.name} ({[r.label for r in table.rows]})")
    chosen = {_slug(x) for x in rows} if rows else set(labels)
    failed = 0
    for i, row in enumerate(table.rows, start=1):
        head = f"[{i}/{len(table.rows)}] {table.name} / {row.label}"
        if _slug(row.label) not in chosen:
            continue
        try:
            plan = parse_row(table, row, out_dir, corpus_dir, gin_files, gin_params)
        except Exception as e:  # e.g. a row's gin file is missing: that row's error, not the sweep's
            summary = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
            print(f"{head}: FAILED to parse its config: {summary}", flush=True)
            if not dry_run:
                failed += 1
                out = row_dir(table, row, out_dir)
                out.mkdir(parents=True, exist_ok=True)
                (out / ERROR_FILE).write_text(traceback.format_exc() + "\n" + summary + "\n")
            continue
        if dry_run:
            tokenized = (plan.identifiers_dir / "identifiers.json").exists()
            print(f"{head} ({row.kind})\n  gin files:   {' '.join(plan.gin_files)}\n"
                  f"  gin params:  {list(plan.gin_params)}\n"
                  f"  corpus:      {plan.corpus_dir}\n"
                  f"  identifiers: {plan.identifiers_dir}{' (exists)' if tokenized else ''}\n"
                  f"  run dir:     {plan.run_dir}\n  metrics:     {plan.row_dir / METRICS_FILE}"
                  f"{' (done)' if is_done(plan) else ''}")
            continue
        if is_done(plan):
            print(f"{head}: done already ({plan.row_dir})")
            continue
        print(f"{head}: {' '.join(plan.gin_files)}", flush=True)
        (plan.row_dir / ERROR_FILE).unlink(missing_ok=True)
        try:
            scores = run_row(plan)
        except SweepPreempted:  # not one row's failure: the whole job is being stopped
            write_table(table, out_dir)
            raise
        except Exception as e:  # one failed row must not lose the others; the table names it, error.txt has all
            failed += 1
            plan.row_dir.mkdir(parents=True, exist_ok=True)
            summary = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"  # the table's note
            (plan.row_dir / ERROR_FILE).write_text(traceback.format_exc() + "\n" + summary + "\n")
            print(f"{head}: FAILED: {summary} (see {plan.row_dir / ERROR_FILE})", flush=True)
            continue
        print(f"{head}: " + " ".join(f"R@{k}={pct(scores.get(f'recall@{k}'))}" for k in PAPER_KS), flush=True)
    if not dry_run:
        path = write_table(table, out_dir)
        print(path.read_text(), end="")
        print(f"wrote {path}")
    return failed
