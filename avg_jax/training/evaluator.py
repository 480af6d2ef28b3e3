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
import json
import time
from typing import Any

import jax
import numpy as np
from etils import epath

from avg_jax import partitioning
from avg_jax.data.corpus import Corpus
from avg_jax.evaluation.metrics import DEFAULT_KS, applicable_ks, chance_metrics, evaluate_images
from avg_jax.identifiers.table import IdentifierTable
from avg_jax.retrieval.model import Rankings, Reranker, RetrievalModel, SearchIndex

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
        self.reranker = reranker if reranker is not None and reranker.config.enabled else None
        self.query_features = None
        if self.reranker is not None:
            if corpus.text_features is None:
                raise ValueError(f"corpus {corpus.name!r} has no text_features.npy: rerank needs the queries' "
                                 "text features")
            missing = [i for i in image_ids if i not in self.reranker.row]
            if missing:
                raise ValueError(f"reranker has no embedding for {len(missing)} {split} image(s), e.g. {missing[0]}")
            self.query_features = corpus.text_features[query_rows]
        if model.conditioned:  # the encoder prefix: the queries' own text features through the model's text head
            if corpus.text_features is None:
                raise ValueError(f"corpus {corpus.name!r} has no text_features.npy: a query-conditioned model needs "
                                 "the queries' text features")
            self.query_features = corpus.text_features[query_rows]

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
