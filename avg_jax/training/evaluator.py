"""Retrieval evaluation of one split (the paper's test protocol): the split's queries, encoded and ranked by
the `RetrievalModel` over the split's images (its trie), identifiers expanded to images, image-level R@1/5/10
(avg_jax.evaluation.metrics). A beam b < 10 returns b identifiers: R@K for K > b (and MRR@10) are
inapplicable and left out, as the paper's Table 7 has "-".

`constrained=False` is GRACE's "w/o constrained generation" ablation (its Table 2): free beam search over the
model's identifier window for up to the longest identifier's length, a beam ending at EOS; a generated
sequence retrieves images only when it is exactly the identifier of an image of the split. The metrics then
add `invalid_rate` (share of generated sequences that are no image's identifier: out of corpus) and
`out_of_split_rate` (the identifier of images outside the split only, e.g. training images), the two failure
modes the GRACE paper names.

Fusion with the dense towers (`reranker`, a `Reranker` with `RerankConfig.enabled`): the aligned-voken prior
inside the search (`prior_weight`) and/or generate-then-rerank (`weight`: the beam's images rescored and fused
with the search score), both from the split queries' own text FEATURES (`corpus.text_features`) through the
tokenizer's heads. The evaluator then reports both rankings:
the pure generative metrics (unprefixed) and the reranked ones under `rerank/`, each with its throughput
(`queries_per_s`, `rerank/queries_per_s`: wall time of the whole `rank` call, search compiled beforehand);
`write_ranked` writes the generative ranking and, beside it, the reranked one (`rerank_path`).

A query-conditioned model (`QueryConditioning`) gets the split queries' own text features as its encoder
prefix (through its text head) in every ranking.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import time
from collections.abc import Callable
from typing import Any

import gin
import jax
import numpy as np
from etils import epath

from avg_jax import partitioning
from avg_jax.data.corpus import Corpus
from avg_jax.evaluation.metrics import DEFAULT_KS, MRR_CUTOFF, applicable_ks, chance_metrics, evaluate_images
from avg_jax.identifiers.table import IdentifierTable
from avg_jax.retrieval.model import Rankings, RerankConfig, Reranker, RetrievalModel, SearchIndex

GENERATION_METRICS = ("invalid_rate", "out_of_split_rate")  # reported by unconstrained evaluation only
RERANK_PREFIX = "rerank/"


class RetrievalEvaluator:
    """R@K of the queries of one split against the images of that split.

    Periodic evaluation (`__call__`) and `write_ranked` rank every query of `query_rows`; a periodic subset is
    `subset(rows)` (`train_retrieval`'s `evenly_spaced` rows), which shares this evaluator's index and encodings.
    """

    def __init__(self, model: RetrievalModel, corpus: Corpus, table: IdentifierTable, split: str,
                 beam_size: int = 10, batch_size: int = 32,
                 mesh: jax.sharding.Mesh | None = None, constrained: bool = True,
                 reranker: Reranker | None = None, query_rows: np.ndarray | None = None):
        """`reranker`: also rank with generate-then-rerank (module docstring); it must cover the split's images.
        `query_rows`: the split's queries to evaluate (corpus rows; default all of them)."""
        image_ids = [corpus.images[i].id for i in corpus.image_rows(split)]
        if query_rows is None:
            query_rows = corpus.query_rows(split)
        elif any(corpus.queries[j].split != split for j in query_rows):
            raise ValueError(f"RetrievalEvaluator: query_rows must be {split!r} queries")
        if not image_ids or query_rows.size == 0:
            raise ValueError(f"evaluation split {split!r} has {len(image_ids)} images and {query_rows.size} queries")
        self.model, self.beam_size, self.constrained = model, beam_size, constrained
        self.ks = applicable_ks(DEFAULT_KS, beam_size)  # raises on beam_size < 1
        self.split, self.corpus, self.query_rows = split, corpus, query_rows
        self.index = SearchIndex.from_table(table.subset(image_ids), full_table=table)
        self.inputs = model.encode_queries([corpus.queries[j].text for j in query_rows], source=f"{split} query")
        self.relevant = [set(corpus.queries[j].image_ids) for j in query_rows]
        self.num_images = len(image_ids)
        self.chance = chance_metrics(self.num_images, [len(r) for r in self.relevant], self.ks)
        self.batch_size = batch_size
        self.out_sharding = None if mesh is None else partitioning.replicated(mesh)
        self.image_ids = image_ids
        self.reranker, self.query_features = None, None
        if model.conditioned:  # the encoder prefix: the queries' own text features through the model's text head
            self.query_features = self.text_features("a query-conditioned model")
        self._fuse_with(reranker)

    def text_features(self, needed_by: str) -> np.ndarray:
        """[queries, f] the corpus text features of this evaluator's queries (error naming `needed_by` if none)."""
        if self.corpus.text_features is None:
            raise ValueError(f"corpus {self.corpus.name!r} has no text_features.npy: {needed_by} needs the "
                             "queries' text features")
        return self.corpus.text_features[self.query_rows]

    def _fuse_with(self, reranker: Reranker | None) -> None:
        """Set the reranker (None or a disabled config: the generative ranking only), checked against the split."""
        self.reranker = reranker if reranker is not None and reranker.config.enabled else None
        if self.reranker is None:
            return
        missing = [i for i in self.image_ids if i not in self.reranker.row]
        if missing:
            raise ValueError(f"reranker has no embedding for {len(missing)} {self.split} image(s), e.g. {missing[0]}")
        self.query_features = self.text_features("rerank / the voken prior")

    def with_reranker(self, reranker: Reranker | None) -> RetrievalEvaluator:
        """This evaluator fusing with `reranker` instead of its own (None: none); the same model, index, queries
        and encodings (nothing is built or encoded again)."""
        out = copy.copy(self)
        out._fuse_with(reranker)
        return out

    def rankings(self, params: Any, n: int | None = None, rerank: bool = False) -> Rankings:
        """Ranked image ids and identifiers (and free generations) of the first `n` (default all) queries;
        `rerank`: generate-then-rerank (needs the evaluator's `reranker`)."""
        inputs = self.inputs if n is None else self.inputs[:n]
        extra: dict[str, Any] = {}
        if self.model.conditioned:
            extra = {"query_features": self.query_features[: len(inputs)]}
        if rerank:
            if self.reranker is None:
                raise ValueError("this evaluator has no reranker (RerankConfig.weight > 0)")
            extra = {"rerank": self.reranker, "query_features": self.query_features[: len(inputs)]}
        return self.model.rank(params, inputs, self.index, beam_size=self.beam_size, constrained=self.constrained,
                               batch_size=self.batch_size, out_sharding=self.out_sharding, **extra)

    def subset(self, query_rows: np.ndarray) -> RetrievalEvaluator:
        """This evaluator over some of its queries (corpus rows, each one of its `query_rows`): the same model,
        index and reranker, the queries' encodings taken from this one's (nothing is built or encoded again)."""
        if len(query_rows) == 0:
            raise ValueError(f"RetrievalEvaluator.subset: no {self.split!r} queries given")
        position = {int(j): p for p, j in enumerate(self.query_rows)}
        missing = [int(j) for j in query_rows if int(j) not in position]
        if missing:
            raise ValueError(f"RetrievalEvaluator.subset: corpus row {missing[0]} is not one of this evaluator's "
                             f"{self.split!r} queries")
        take = np.asarray([position[int(j)] for j in query_rows], np.int64)
        sub = copy.copy(self)
        sub.query_rows = np.asarray(query_rows)
        sub.inputs = self.inputs[take]
        sub.relevant = [self.relevant[p] for p in take]
        sub.chance = chance_metrics(self.num_images, [len(r) for r in sub.relevant], self.ks)
        if self.query_features is not None:
            sub.query_features = self.query_features[take]
        return sub

    def timed_rankings(self, params: Any) -> tuple[dict[str, Rankings], dict[str, float]]:
        """{"": generative, "rerank/": reranked (with a reranker)} rankings and their queries per second
        (`queries_per_s` under each prefix). One batch is ranked first so compilation is not timed."""
        self.rankings(params, 1, rerank=self.reranker is not None)  # warm-up: the compiled search
        out, speed = {}, {}
        for prefix in ("", RERANK_PREFIX) if self.reranker is not None else ("",):
            start = time.perf_counter()
            out[prefix] = ranked = self.rankings(params, rerank=bool(prefix))
            speed[f"{prefix}queries_per_s"] = len(ranked.images) / max(time.perf_counter() - start, 1e-9)
        return out, speed

    def score(self, rankings: Rankings) -> dict[str, float]:
        """Image-level metrics of the first len(rankings.images) queries at the beam's cutoffs, plus the
        free-generation failure rates when unconstrained."""
        metrics = evaluate_images(rankings.images, self.relevant[: len(rankings.images)],
                                  num_results=self.beam_size)
        if rankings.generated is not None:
            sequences = [seq for per_query in rankings.generated for seq in per_query]
            total = max(len(sequences), 1)
            out_of_split = sum(seq in self.index.other_identifiers for seq in sequences)
            in_split = sum(seq in self.index.groups for seq in sequences)
            metrics["invalid_rate"] = (len(sequences) - in_split - out_of_split) / total
            metrics["out_of_split_rate"] = out_of_split / total
        return metrics

    def score_all(self, rankings: dict[str, Rankings]) -> dict[str, float]:
        """`score` of each ranking of `timed_rankings`, the reranked one's keys prefixed `rerank/`."""
        return {f"{prefix}{k}": v for prefix, ranked in rankings.items() for k, v in self.score(ranked).items()}

    def __call__(self, params: Any, step: int) -> dict[str, float]:
        if self.reranker is None:
            metrics = self.score(self.rankings(params))
        else:
            metrics = self.score_all({"": self.rankings(params), RERANK_PREFIX: self.rankings(params, rerank=True)})
        k = max(self.ks)
        metrics[f"chance_recall@{k}"] = self.chance[f"recall@{k}"]  # expected R@k of a random ranking
        return metrics

    def write_ranked(self, params: Any, path: epath.PathLike) -> dict[str, float]:
        """Ranked outputs as `avg-jax eval` reads them (JSONL) plus the metrics (and throughput); returns the
        metrics. With a reranker the reranked outputs go to `rerank_path(path)`, their metrics under `rerank/`."""
        rankings, speed = self.timed_rankings(params)
        for prefix, ranked in rankings.items():
            lines = []
            for q, j in enumerate(self.query_rows):
                record = {"query_row": int(j), "text": self.corpus.queries[j].text, "image_ids": ranked.images[q],
                          "identifiers": [list(x) for x in ranked.identifiers[q]]}
                if prefix:
                    record["ranking"] = "rerank"
                    record["scores"] = ranked.image_scores[q]
                if ranked.generated is not None:  # every free generation, valid or not
                    record["generated"] = [list(x) for x in ranked.generated[q]]
                lines.append(json.dumps(record) + "\n")
            epath.Path(rerank_path(path) if prefix else path).write_text("".join(lines))
        return {**self.score_all(rankings), **speed}


def rerank_path(path: epath.PathLike) -> epath.Path:
    """Where the reranked outputs of `path` (ranked_<split>.jsonl) go: ranked_<split>_rerank.jsonl."""
    path = epath.Path(path)
    return path.parent / f"{path.stem}_rerank{path.suffix}"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class FusionSelection:
    """The fusion weights chosen on held-out queries instead of fixed in the config (gin: `FusionSelection.split =
    'val'`; None = off, the configs' `train_retrieval.eval_prior_weight` / `eval_rerank_weight`).

    After training, the split's queries (`max_queries` evenly spaced ones; None = all) are ranked over the split's
    images once per voken-prior weight of `prior_weights` (the prior changes the search), and each such beam is
    rescored with every rerank weight of `rerank_weights` (no further search: fused = search score + weight *
    cosine / temperature, `Reranker`). The pair with the highest `metric` ('recall@K' or 'mrr@10'; ties go to
    the pair listed first) then fuses the evaluation split's ranking and is stored in the retrieval checkpoint's
    heads.npz, so `avg-jax retrieve` uses it too. The temperature stays `train_retrieval.eval_rerank_temperature`
    (only weight / temperature matters). The split must be indexed (its images among the model's training
    targets: pseudo-queries / memorize rows of `TrainMixture.memorize_splits`) and none of its queries may reach
    training, as with a validation split. A corpus without queries of the split is an error, unless
    `if_available` (the emoji fused configs: emoji has no validation queries, a corpus run with those configs may
    have them): then the fixed weights stay and the run records that nothing was chosen."""

    split: str | None = None
    prior_weights: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)
    rerank_weights: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)
    metric: str = f"mrr@{MRR_CUTOFF}"
    max_queries: int | None = None
    if_available: bool = False

    def __post_init__(self):
        for name in ("prior_weights", "rerank_weights"):
            values = getattr(self, name)
            if not values or any(not np.isfinite(v) or v < 0 for v in values):
                raise ValueError(f"FusionSelection.{name} must be a non-empty list of finite weights >= 0, got "
                                 f"{values}")
        if not re.fullmatch(rf"recall@\d+|mrr@{MRR_CUTOFF}", self.metric):
            raise ValueError(f"FusionSelection.metric must be 'recall@K' or 'mrr@{MRR_CUTOFF}', got {self.metric!r}")
        if self.max_queries is not None and self.max_queries < 1:
            raise ValueError(f"FusionSelection.max_queries must be >= 1 or None, got {self.max_queries}")
        if self.split in ("train", "test"):
            raise ValueError(f"FusionSelection.split {self.split!r}: the weights must be chosen on held-out queries "
                             "that are not the evaluation's (train queries are fitted, test queries are the "
                             "result); use a validation split ('val')")


def select_fusion(evaluator: RetrievalEvaluator, params: Any, reranker: Callable[[RerankConfig], Reranker],
                  selection: FusionSelection, temperature: float) -> tuple[RerankConfig, list[dict[str, float]]]:
    """`selection`'s grid on `evaluator`'s queries (its split is the held-out one): the best `RerankConfig` and
    every grid point's metrics (prior_weight, rerank_weight and the image-level metrics), in grid order.
    `reranker(config)`: the dense towers fused by `config` over the evaluator's images."""
    features = evaluator.text_features("FusionSelection")
    grid: list[dict[str, float]] = []
    best: tuple[float, RerankConfig] | None = None
    for prior in selection.prior_weights:
        searched = evaluator.with_reranker(reranker(RerankConfig(0.0, temperature, prior)))
        beams = searched.rankings(params, rerank=searched.reranker is not None)
        for weight in selection.rerank_weights:
            config = RerankConfig(weight, temperature, prior)
            metrics = evaluator.score(reranker(config)(beams, features))
            if selection.metric not in metrics:
                raise ValueError(f"FusionSelection.metric {selection.metric!r} is not scored at beam "
                                 f"{evaluator.beam_size} (scored: {sorted(metrics)})")
            grid.append({"prior_weight": prior, "rerank_weight": weight, **metrics})
            if best is None or metrics[selection.metric] > best[0]:
                best = (metrics[selection.metric], config)
    assert best is not None  # the grids are non-empty (FusionSelection)
    return best[1], grid
