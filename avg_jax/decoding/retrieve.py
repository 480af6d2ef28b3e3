"""Text -> ranked images with a trained T5 and the trie of an image set.

A retrieval checkpoint is a directory of files written by the stages that own them, all read without
executing anything:

  DIR/model/          HuggingFace T5 directory (config.json + model.safetensors), `avg_jax.t5.hf_io.save_hf_t5`
  DIR/identifiers/    the identifier table of the image set to search, `IdentifierTable.save`
  DIR/spiece.model    the SentencePiece model of the text vocabulary

The text vocabulary's T5 sentinel count follows from the table (`text_vocab_size` minus the pieces),
so nothing else is needed. `save_retrieval_checkpoint` writes this layout.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from avg_jax.data.vocab import Vocabulary
from avg_jax.decoding.beam_search import BeamSearchOptions
from avg_jax.decoding.trie import Trie, build_trie, identifier_window
from avg_jax.identifiers.table import IdentifierTable
from avg_jax.t5.configs import T5Config
from avg_jax.t5.decoding import t5_beam_search
from avg_jax.t5.hf_io import load_hf_t5, save_hf_t5

MODEL_DIR = "model"
IDENTIFIERS_DIR = "identifiers"
SENTENCEPIECE_FILE = "spiece.model"
QUERY_LENGTH_MULTIPLE = 16  # query token lengths are padded to multiples of this (one compile per bucket)


@dataclasses.dataclass(frozen=True)
class RetrievalResult:
    """One query's ranking: images (identifier groups expanded in table order) and identifiers."""

    text: str
    image_ids: list[str]
    scores: list[float]  # of each image's identifier
    identifiers: list[tuple[int, ...]]  # ranked identifiers (before expansion to images)
    identifier_scores: list[float]


def save_retrieval_checkpoint(out_dir: str | Path, params: dict, config: T5Config, table: IdentifierTable,
                              sentencepiece_model: str | Path) -> Path:
    """Write the checkpoint layout above."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_hf_t5(params, config, out / MODEL_DIR)
    table.save(out / IDENTIFIERS_DIR)
    shutil.copyfile(sentencepiece_model, out / SENTENCEPIECE_FILE)
    return out


class Retriever:
    """Jitted constrained search over one image set; queries are batched to a fixed `batch_size`."""

    def __init__(self, params: dict, config: T5Config, table: IdentifierTable, vocab: Vocabulary,
                 options: BeamSearchOptions | None = None, batch_size: int = 32, max_query_length: int = 128):
        if config.vocab_size < table.vocab_size:
            raise ValueError(f"model vocabulary {config.vocab_size} is smaller than the identifier table's "
                             f"{table.vocab_size} (text {table.text_vocab_size} + {table.num_new_tokens} new)")
        if vocab.text_size != table.text_vocab_size:
            raise ValueError(f"SentencePiece vocabulary has {vocab.text_size} text ids, the identifier table "
                             f"expects {table.text_vocab_size}")
        self.params, self.config, self.table, self.vocab = params, config, table, vocab
        self.options = options or BeamSearchOptions()
        self.batch_size, self.max_query_length = batch_size, max_query_length
        self.trie: Trie = build_trie(table)
        self._window = identifier_window(self.trie, config.vocab_size, table.text_vocab_size)
        self._searchers: dict = {}  # beam size -> jitted search

    @classmethod
    def load(cls, checkpoint: str | Path, identifiers: str | Path | None = None, dtype: str = "float32",
             **kwargs) -> Retriever:
        """From a retrieval checkpoint; `identifiers` overrides its image set (e.g. another split's table).

        `dtype` is the compute dtype of the search ('bfloat16': float32 parameters, bf16 activations, float32
        accumulation and scores; much faster on CPUs with bf16 matrix units and on TPU).
        """
        root = Path(checkpoint)
        if not root.is_dir():
            raise FileNotFoundError(f"retrieval checkpoint directory not found: {root}")
        spm_path = root / SENTENCEPIECE_FILE
        if not spm_path.exists():
            raise FileNotFoundError(f"retrieval checkpoint has no SentencePiece model: {spm_path}")
        params, config = load_hf_t5(root / MODEL_DIR, dropout_rate=0.0, dtype=dtype)
        table = IdentifierTable.load(identifiers if identifiers is not None else root / IDENTIFIERS_DIR)
        pieces = Vocabulary(spm_path).text_size
        if table.text_vocab_size < pieces:
            raise ValueError(f"{spm_path} has {pieces} pieces but the identifier table's text_vocab_size is "
                             f"{table.text_vocab_size}")
        vocab = Vocabulary(spm_path, num_extra_ids=table.text_vocab_size - pieces, num_new=table.num_new_tokens)
        return cls(jax.device_put(params), config, table, vocab, **kwargs)

    def _searcher(self, beam: int):
        if beam not in self._searchers:
            options = dataclasses.replace(self.options, beam_size=beam)
            self._searchers[beam] = jax.jit(lambda params, tables, ids: t5_beam_search(
                params, self.config, ids, tables, options=options, window=self._window))
        return self._searchers[beam]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), bucketed length] query token ids (EOS-terminated, truncated to max_query_length)."""
        ids = []
        for text in texts:
            tokens = self.vocab.encode(text)
            ids.append(tokens[:self.max_query_length - 1] + tokens[-1:] if len(tokens) > self.max_query_length
                       else tokens)
        width = -(-max(map(len, ids)) // QUERY_LENGTH_MULTIPLE) * QUERY_LENGTH_MULTIPLE
        out = np.zeros((len(ids), width), np.int32)
        for i, tokens in enumerate(ids):
            out[i, :len(tokens)] = tokens
        return out

    def retrieve(self, texts: Sequence[str], k: int = 10) -> list[RetrievalResult]:
        """Top-k images per text. The beam is max(beam_size, k), so k identifiers are always reachable."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        search = self._searcher(max(self.options.beam_size, k))
        results = []
        for lo in range(0, len(texts), self.batch_size):
            chunk = list(texts[lo:lo + self.batch_size])
            ids = self.encode(chunk)
            ids = np.pad(ids, ((0, self.batch_size - len(chunk)), (0, 0)))  # fixed batch: one compile
            out = jax.device_get(search(self.params, self.trie.tables, ids))
            for q, text in enumerate(chunk):
                results.append(self._result(text, out.groups[q], out.scores[q], k))
        return results

    def _result(self, text: str, groups: np.ndarray, scores: np.ndarray, k: int) -> RetrievalResult:
        ranked = self.trie.ranked_images(groups.tolist(), scores.tolist(), k=k)
        valid = groups >= 0
        identifiers = [tuple(int(t) for t in self.trie.group_tokens[g][:self.trie.group_lengths[g]])
                       for g in groups[valid]]
        return RetrievalResult(text=text, image_ids=[i for i, _ in ranked], scores=[s for _, s in ranked],
                               identifiers=identifiers, identifier_scores=[float(s) for s in scores[valid]])
