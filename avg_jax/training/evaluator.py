"""Periodic retrieval evaluation during training: constrained beam search over the EVAL image set's trie,
identifiers expanded to images, image-level R@1/5/10 (avg_jax.evaluation.metrics). A beam b < 10 returns b
identifiers: R@K for K > b (and MRR@10) are inapplicable and left out, as the paper's Table 7 has "-"."""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from avg_jax import partitioning
from avg_jax.data.corpus import Corpus
from avg_jax.data.vocab import Vocabulary
from avg_jax.decoding.beam_search import BeamSearchOptions
from avg_jax.decoding.t5_decode import identifier_window, t5_beam_search
from avg_jax.decoding.trie import Trie, build_trie
from avg_jax.evaluation.metrics import DEFAULT_KS, applicable_ks, evaluate_images
from avg_jax.identifiers.table import IdentifierTable
from avg_jax.t5.configs import T5Config
from avg_jax.training.examples import with_instruction


def pad_token_rows(rows: Sequence[Sequence[int]], length: int) -> np.ndarray:
    """[n, length] int32, PAD-padded, longer rows cut (as the training pipeline cuts them)."""
    out = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        r = r[:length]
        out[i, : len(r)] = r
    return out


class RetrievalEvaluator:
    """R@K of the queries of one split against the images of that split (the paper's test protocol).

    Periodic evaluation (`__call__`) may use only the first `max_queries` queries; `write_ranked` ranks all.
    """

    def __init__(self, corpus: Corpus, table: IdentifierTable, vocab: Vocabulary, config: T5Config, split: str,
                 input_length: int, beam_size: int = 10, batch_size: int = 32, max_queries: int | None = None,
                 instruction: str = "", mesh: jax.sharding.Mesh | None = None):
        image_ids = [corpus.images[i].id for i in corpus.image_rows(split)]
        query_rows = corpus.query_rows(split)
        if not image_ids or query_rows.size == 0:
            raise ValueError(f"evaluation split {split!r} has {len(image_ids)} images and {query_rows.size} queries")
        self.beam_size = beam_size
        self.ks = applicable_ks(DEFAULT_KS, beam_size)  # raises on beam_size < 1
        self.split, self.corpus, self.query_rows, self.num_images = split, corpus, query_rows, len(image_ids)
        self.trie: Trie = build_trie(table.subset(image_ids))
        texts = [with_instruction(instruction, corpus.queries[j].text) for j in query_rows]
        self.inputs = pad_token_rows([vocab.encode(t) for t in texts], input_length)
        self.relevant = [set(corpus.queries[j].image_ids) for j in query_rows]
        self.batch_size = batch_size
        self.max_queries = len(query_rows) if max_queries is None else min(max_queries, len(query_rows))
        options = BeamSearchOptions(beam_size=beam_size, score_normalization="vocab")
        window = identifier_window(self.trie, config.vocab_size, table.text_vocab_size)
        out_sharding = None if mesh is None else partitioning.replicated(mesh)

        def search(params, tables, input_ids):
            result = t5_beam_search(params, config, input_ids, tables, options=options, window=window)
            return result.groups, result.scores

        self._search = jax.jit(search, out_shardings=out_sharding)

    def rankings(self, params, n: int | None = None) -> tuple[list[list[str]], list[list[tuple[int, ...]]]]:
        """Ranked image ids and ranked identifiers of the first `n` (default all) queries."""
        images, identifiers = [], []
        n = len(self.inputs) if n is None else n
        for lo in range(0, n, self.batch_size):
            chunk = self.inputs[lo:min(lo + self.batch_size, n)]
            padded = np.zeros((self.batch_size, chunk.shape[1]), np.int32)  # one compiled shape
            padded[: len(chunk)] = chunk
            groups, scores = jax.device_get(self._search(params, self.trie.tables, jnp.asarray(padded)))
            for g, s in zip(groups[: len(chunk)], scores[: len(chunk)], strict=True):
                images.append([image for image, _ in self.trie.ranked_images(g, s)])
                identifiers.append([tuple(int(t) for t in self.trie.group_tokens[x][: self.trie.group_lengths[x]])
                                    for x in g if x >= 0])
        return images, identifiers

    def score(self, images: Sequence[Sequence[str]]) -> dict[str, float]:
        """Image-level metrics of the rankings of the first len(images) queries, at the beam's cutoffs."""
        return evaluate_images(images, self.relevant[: len(images)], num_results=self.beam_size)

    def __call__(self, params, step: int) -> dict[str, float]:
        images, _ = self.rankings(params, self.max_queries)
        metrics = self.score(images)
        k = max(self.ks)
        metrics[f"chance_recall@{k}"] = min(k, self.num_images) / self.num_images  # a random ranking
        return metrics

    def write_ranked(self, params, path: epath.PathLike) -> dict[str, float]:
        """Ranked outputs as `avg-jax eval` reads them (JSONL) plus the metrics; returns the metrics."""
        images, identifiers = self.rankings(params)
        epath.Path(path).write_text("".join(
            json.dumps({"query_row": int(j), "text": self.corpus.queries[j].text, "image_ids": im,
                        "identifiers": [list(x) for x in ids]}) + "\n"
            for j, im, ids in zip(self.query_rows, images, identifiers, strict=True)))
        return self.score(images)
