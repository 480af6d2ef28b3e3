"""A SentencePiece vocabulary and a 12-image voken table shared by the retrieval-checkpoint tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from avg_jax.data.vocab import Vocabulary, train_sentencepiece
from avg_jax.identifiers.table import IdentifierTable

NUM_NEW, M = 8, 3


def tiny_vocab_and_table(root: Path) -> tuple[Path, int, IdentifierTable]:
    """(SentencePiece model, text vocabulary size, table): 12 images with random M-voken identifiers over NUM_NEW
    vokens, images 4 and 5 sharing one identifier."""
    texts = [f"{a} {b} {c}" for a in ("a", "two", "the", "red", "blue") for b in ("car", "dog", "bowl", "tree")
             for c in ("on a street", "playing", "of fruit", "in the park")]
    spm = train_sentencepiece(texts, root / "src" / "spm", vocab_size=60)
    text_size = Vocabulary(spm).text_size
    codes = np.random.default_rng(0).integers(0, NUM_NEW, size=(12, M))
    codes[5] = codes[4]  # a shared identifier
    table = IdentifierTable(image_ids=[f"img{i}" for i in range(12)], tokens=(text_size + codes).astype(np.int32),
                            lengths=np.full(12, M, np.int32), scheme="avg", num_new_tokens=NUM_NEW,
                            text_vocab_size=text_size, fixed_length=True)
    return spm, text_size, table


def instruction_batch(vocab: Vocabulary, instruction: str, texts: list[str], query_row: list[int], width: int = 64
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs [n, width], query_row [n], text [n, width]) of `instruction text` encoder inputs: `text` marks
    each row's query text pieces (after the instruction, before the EOS), none on memorize rows (query_row -1)."""
    n_instruction = len(vocab.encode(instruction, add_eos=False))
    inputs, text = np.zeros((len(texts), width), np.int32), np.zeros((len(texts), width), bool)
    for i, t in enumerate(texts):
        ids = vocab.encode(f"{instruction} {t}")
        inputs[i, : len(ids)] = ids
        text[i, n_instruction: len(ids) - 1] = query_row[i] != -1
    return inputs, np.asarray(query_row, np.int32), text
