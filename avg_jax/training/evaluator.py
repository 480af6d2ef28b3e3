"""Periodic retrieval evaluation during training: constrained beam search over the EVAL image set's trie,
identifiers expanded to images, image-level R@1/5/10 (avg_jax.evaluation.metrics). A beam b < 10 returns b
identifiers: R@K for K > b (and MRR@10) are inapplicable and left out, as the paper's Table 7 has "-".

`constrained=False` is GRACE's "w/o constrained generation" ablation (its Table 2): free beam search over the
identifier window of the vocabulary (the whole vocabulary for text-token identifiers) for up to the longest
identifier's length, a beam ending at EOS. A generated sequence (cut after its EOS) retrieves images only
when it is exactly the identifier of an image of the evaluated split; anything else is a miss. The metrics
then add `invalid_rate` (share of generated sequences that are no image's identifier: out of corpus) and
`out_of_split_rate` (the identifier of images outside the split only, e.g. training images), the two
failure modes the GRACE paper names.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from avg_jax import partitioning
from avg_jax.data.corpus import Corpus
from avg_jax.data.vocab import EOS_ID, Vocabulary
from avg_jax.decoding.beam_search import BeamSearchOptions
from avg_jax.decoding.trie import Trie, build_trie, identifier_window
from avg_jax.evaluation.metrics import DEFAULT_KS, applicable_ks, evaluate_images
from avg_jax.identifiers.table import IdentifierTable
from avg_jax.t5.configs import T5Config
from avg_jax.t5.decoding import t5_beam_search
from avg_jax.training.examples import with_instruction

GENERATION_METRICS = ("invalid_rate", "out_of_split_rate")  # reported by unconstrained evaluation only
Identifier = tuple[int, ...]


class Rankings(NamedTuple):
    """Per query, best first: ranked image ids, the split identifiers they came from, and (unconstrained
    only, else None) every generated sequence."""

    images: list[list[str]]
    identifiers: list[list[Identifier]]
    generated: list[list[Identifier]] | None


def generated_sequence(row: Sequence[int]) -> Identifier:
    """A free-generation output row `[max_length]` as a sequence: cut after its first EOS, else all of it
    (PAD after an EOS is the search's filler; a PAD before one was generated and stays)."""
    row = [int(t) for t in row]
    return tuple(row[: row.index(EOS_ID) + 1] if EOS_ID in row else row)


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
                 instruction: str = "", mesh: jax.sharding.Mesh | None = None, constrained: bool = True):
        image_ids = [corpus.images[i].id for i in corpus.image_rows(split)]
        query_rows = corpus.query_rows(split)
        if not image_ids or query_rows.size == 0:
            raise ValueError(f"evaluation split {split!r} has {len(image_ids)} images and {query_rows.size} queries")
        self.beam_size = beam_size
        self.ks = applicable_ks(DEFAULT_KS, beam_size)  # raises on beam_size < 1
        self.split, self.corpus, self.query_rows, self.num_images = split, corpus, query_rows, len(image_ids)
        split_table = table.subset(image_ids)
        self.trie: Trie = build_trie(split_table)
        texts = [with_instruction(instruction, corpus.queries[j].text) for j in query_rows]
        self.inputs = pad_token_rows([vocab.encode(t) for t in texts], input_length)
        self.relevant = [set(corpus.queries[j].image_ids) for j in query_rows]
        self.batch_size = batch_size
        self.max_queries = len(query_rows) if max_queries is None else min(max_queries, len(query_rows))
        options = BeamSearchOptions(beam_size=beam_size, score_normalization="vocab")
        window = identifier_window(self.trie, config.vocab_size, table.text_vocab_size)
        out_sharding = None if mesh is None else partitioning.replicated(mesh)
        self.constrained = constrained
        if constrained:
            self._tables = self.trie.tables

            def search(params, tables, input_ids):
                result = t5_beam_search(params, config, input_ids, tables, options=options, window=window)
                return result.groups, result.scores
        else:
            self._tables = None
            self.split_groups = split_table.groups()
            self.other_identifiers = set(table.groups()) - set(self.split_groups)
            max_length = table.max_len  # the longest identifier of any split, so other splits' are matched whole

            def search(params, tables, input_ids):
                result = t5_beam_search(params, config, input_ids, tables, options=options, window=window,
                                        max_length=max_length, eos_id=EOS_ID)
                return result.tokens, result.scores

        self._search = jax.jit(search, out_shardings=out_sharding)

    def rankings(self, params, n: int | None = None) -> Rankings:
        """Ranked image ids and identifiers (and free generations) of the first `n` (default all) queries."""
        images, identifiers, generated = [], [], []
        n = len(self.inputs) if n is None else n
        for lo in range(0, n, self.batch_size):
            chunk = self.inputs[lo:min(lo + self.batch_size, n)]
            padded = np.zeros((self.batch_size, chunk.shape[1]), np.int32)  # one compiled shape
            padded[: len(chunk)] = chunk
            outputs, scores = jax.device_get(self._search(params, self._tables, jnp.asarray(padded)))
            for out, s in zip(outputs[: len(chunk)], scores[: len(chunk)], strict=True):
                if self.constrained:  # out: [beam] trie groups, -1 = none
                    images.append([image for image, _ in self.trie.ranked_images(out, s)])
                    identifiers.append([tuple(int(t) for t in self.trie.group_tokens[x][:self.trie.group_lengths[x]])
                                        for x in out if x >= 0])
                    continue
                sequences = [generated_sequence(row) for row, score in zip(out, s, strict=True)  # out: [beam, L]
                             if np.isfinite(score)]
                valid = [seq for seq in sequences if seq in self.split_groups]
                generated.append(sequences)
                identifiers.append(valid)
                images.append([image for seq in valid for image in self.split_groups[seq]])
        return Rankings(images, identifiers, None if self.constrained else generated)

    def score(self, rankings: Rankings) -> dict[str, float]:
        """Image-level metrics of the first len(rankings.images) queries at the beam's cutoffs, plus the
        free-generation failure rates when unconstrained."""
        metrics = evaluate_images(rankings.images, self.relevant[: len(rankings.images)],
                                  num_results=self.beam_size)
        if rankings.generated is not None:
            sequences = [seq for per_query in rankings.generated for seq in per_query]
            total = max(len(sequences), 1)
            out_of_split = sum(seq in self.other_identifiers for seq in sequences)
            in_split = sum(seq in self.split_groups for seq in sequences)
            metrics["invalid_rate"] = (len(sequences) - in_split - out_of_split) / total
            metrics["out_of_split_rate"] = out_of_split / total
        return metrics

    def __call__(self, params, step: int) -> dict[str, float]:
        metrics = self.score(self.rankings(params, self.max_queries))
        k = max(self.ks)
        metrics[f"chance_recall@{k}"] = min(k, self.num_images) / self.num_images  # a random ranking
        return metrics

    def write_ranked(self, params, path: epath.PathLike) -> dict[str, float]:
        """Ranked outputs as `avg-jax eval` reads them (JSONL) plus the metrics; returns the metrics."""
        rankings = self.rankings(params)
        lines = []
        for q, j in enumerate(self.query_rows):
            record = {"query_row": int(j), "text": self.corpus.queries[j].text, "image_ids": rankings.images[q],
                      "identifiers": [list(x) for x in rankings.identifiers[q]]}
            if rankings.generated is not None:  # every free generation, valid or not
                record["generated"] = [list(x) for x in rankings.generated[q]]
            lines.append(json.dumps(record) + "\n")
        epath.Path(path).write_text("".join(lines))
        return self.score(rankings)
