"""Plumbing shared by the source adapters (Karpathy JSON, JSONL + image folder, TFDS).

Every adapter reads source records in a documented order, maps feature-file rows to records by that
order, and either raises on the first malformed record (a CorpusError naming file, field and value) or,
when asked to skip, drops it and reports the count and the first few offenders.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from avg_jax.data.corpus import MAX_REPORTED, Corpus, CorpusError, check_features, load_npy, normalize_rows

# Source split names -> corpus splits. Karpathy's "restval" (COCO val2014 images outside the 5K val/test)
# is training data in every paper that uses the Karpathy splits.
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


class BadRecords:
    """Collects malformed source records: raises the first unless `skip`, else counts and reports them."""

    def __init__(self, source: str, skip: bool):
        self.source = source
        self.skip = skip
        self.messages: list[str] = []

    def add(self, error: CorpusError) -> None:
        if not self.skip:
            raise error
        self.messages.append(str(error))

    def report(self) -> dict[str, Any]:
        """Print the count and first offenders (if any); return them for the corpus metadata."""
        if self.messages:
            shown = "\n  ".join(self.messages[:MAX_REPORTED])
            print(f"[{self.source}] skipped {len(self.messages)} bad record(s); "
                  f"first {min(len(self.messages), MAX_REPORTED)}:\n  {shown}")
        return {"skipped_records": len(self.messages), "first_skipped": self.messages[:MAX_REPORTED]}


@dataclasses.dataclass
class FeatureRows:
    """A feature file whose rows follow a documented record order, loaded and shape-checked."""

    path: Path
    array: np.ndarray  # [num_rows, dim] float
    nonfinite: set[int]  # rows with NaN/inf: the owning record is bad

    def check_row(self, row: int, what: str) -> None:
        """Raise a CorpusError when the feature row of record `what` holds NaN/inf."""
        if row in self.nonfinite:
            raise CorpusError(f"{self.path} row {row}: NaN/inf in the feature row of {what}")


def load_feature_rows(path: str | Path | None, num_rows: int, records: str) -> FeatureRows | None:
    """Load a .npy feature file that must hold one row per entry of `records` (described in errors)."""
    if path is None:
        return None
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"feature file missing: {path}")
    x = load_npy(path)
    check_features(x, str(path), num_rows, records, finite=False)
    return FeatureRows(path, x, set(np.flatnonzero(~np.isfinite(x).all(axis=1)).tolist()))


def select_features(rows: FeatureRows | None, keep: list[int], normalize: bool) -> np.ndarray | None:
    """Kept rows as float32 (L2-normalised when asked); None when there is no feature file."""
    if rows is None:
        return None
    x = np.asarray(rows.array[np.asarray(keep, dtype=np.int64)], np.float32)  # [len(keep), dim]
    return normalize_rows(x) if normalize else x


def no_features(num_rows: int) -> np.ndarray:
    """A [num_rows, 0] placeholder: the corpus is valid and `avg-jax data extract` fills it in."""
    return np.zeros((num_rows, 0), np.float32)


def finish_corpus(corpus: Corpus, bad: BadRecords, source: str) -> Corpus:
    """Report skipped records into the metadata and validate the assembled corpus."""
    corpus.metadata = {**corpus.metadata, **bad.report()}
    if not corpus.images:
        raise CorpusError(f"{source}: no valid image records ({len(bad.messages)} skipped)")
    corpus.validate(source)
    return corpus
