"""Text vocabulary (SentencePiece) extended by new tokens (vokens, cluster or atomic ids).

Layout of the model vocabulary, the T5 convention plus our extension:
  [0, text_size)                      SentencePiece pieces (pad=0, eos=1, unk=2) and T5 sentinel ids
  [text_size, text_size + num_new)    new tokens: voken j has id text_size + j
  [text_size + num_new, size)         padding rows so `size` is a multiple of 128 (TPU lanes)
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
VOCAB_MULTIPLE = 128


def pad_vocab_size(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Round `n` up to a multiple of `multiple`."""
    return -(-n // multiple) * multiple


class Vocabulary:
    """A SentencePiece text vocabulary (+ optional T5 sentinel ids) followed by `num_new` new tokens."""

    def __init__(self, sentencepiece_model: str | Path, num_extra_ids: int = 0, num_new: int = 0):
        path = Path(sentencepiece_model)
        if not path.exists():
            raise FileNotFoundError(f"SentencePiece model not found: {path}")
        self.path = path
        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        if (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id()) != (PAD_ID, EOS_ID, UNK_ID):
            raise ValueError(f"{path}: expected T5 special ids pad=0 eos=1 unk=2, got pad={self._sp.pad_id()} "
                             f"eos={self._sp.eos_id()} unk={self._sp.unk_id()}")
        self.num_extra_ids = num_extra_ids
        self.num_new = num_new

    @property
    def text_size(self) -> int:
        """Pieces plus T5 sentinel (extra) ids: the first new-token id."""
        return self._sp.get_piece_size() + self.num_extra_ids

    @property
    def size(self) -> int:
        """Total model vocabulary, padded to a multiple of 128."""
        return pad_vocab_size(self.text_size + self.num_new)

    def with_new_tokens(self, num_new: int) -> Vocabulary:
        return Vocabulary(self.path, self.num_extra_ids, num_new)

    def new_token_id(self, j: int) -> int:
        if not 0 <= j < self.num_new:
            raise ValueError(f"new token index {j} out of range [0, {self.num_new})")
        return self.text_size + j

    def piece_id(self, piece: str) -> int:
        """Id of one SentencePiece piece (UNK_ID when the model has no such piece)."""
        return int(self._sp.piece_to_id(piece))

    def encode(self, text: str, add_eos: bool = True) -> list[int]:
        ids = self._sp.encode(text)
        return [*ids, EOS_ID] if add_eos else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text pieces are decoded; new tokens print as <new_j>; decoding stops at EOS."""
        out, text = [], []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i >= self.text_size:
                out.append(self._sp.decode(text))
                text = []
                out.append(f"<new_{i - self.text_size}>")
            elif i < self._sp.get_piece_size() and i != PAD_ID:
                text.append(i)
        out.append(self._sp.decode(text))
        return "".join(out)


def train_sentencepiece(texts: Iterable[str], model_prefix: str | Path, vocab_size: int = 1000,
                        seed_sentencepiece_size: int = 100_000) -> Path:
    """Train a small unigram SentencePiece model with T5 special ids on `texts` (for from-scratch runs)."""
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("train_sentencepiece: no non-empty texts to train on")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1, hard_vocab_limit=False,
        seed_sentencepiece_size=seed_sentencepiece_size, minloglevel=2,
        num_threads=1,
    )
    path = Path(f"{model_prefix}.model")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path
