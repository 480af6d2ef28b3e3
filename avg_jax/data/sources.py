"""Plumbing shared by the source adapters (Karpathy JSON, JSONL + image folder, TFDS).

Every adapter reads source records in a documented order, maps feature-file rows to records by that
order, and either raises on the first malformed record (a CorpusError naming file, field and value) or,
when asked to skip, drops it and reports the count and the first few offenders.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from avg_jax.data.corpus import (
    MAX_REPORTED,
    Corpus,
    CorpusError,
    ImageRecord,
    QueryRecord,
    check_features,
    load_npy,
    normalize_rows,
)

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


def load_caption_rows(path: str | Path | None, counts: list[int | None], records: str,
                      uncounted: Callable[[int], str]) -> FeatureRows | None:
    """Load a .npy with one row per caption of `counts` (captions per record, None when unreadable).

    A record whose caption count is None leaves the row of every later caption unknown: that is an error
    (`uncounted(i)` names record i and why), never a guess.
    """
    if path is None:
        return None
    unknown = [i for i, n in enumerate(counts) if n is None]
    if unknown:
        raise CorpusError(f"{uncounted(unknown[0])}, so rows of {path} cannot be matched to {records}")
    return load_feature_rows(path, sum(n or 0 for n in counts), records)


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


class CaptionedImages:
    """Images with one caption query each, kept with their feature rows; malformed records go to `bad`.

    Shared by the adapters whose records are an image plus its captions (Karpathy JSON, JSONL folder):
    a record or caption that fails its parse or has a NaN/inf feature row is reported and, when skipping,
    dropped together with its feature row.
    """

    def __init__(self, bad: BadRecords, image_rows: FeatureRows | None, text_rows: FeatureRows | None):
        self.bad, self.image_rows, self.text_rows = bad, image_rows, text_rows
        self.images: list[ImageRecord] = []
        self.queries: list[QueryRecord] = []
        self.image_keep: list[int] = []  # feature row of each kept image
        self.text_keep: list[int] = []  # feature row of each kept query

    def add_image(self, row: int, where: str, parse: Callable[..., ImageRecord], *args: Any) -> ImageRecord | None:
        """Keep `parse(*args)`, the record `where` owning image feature row `row`; None when it is bad."""
        try:
            image = parse(*args)
            if self.image_rows:
                self.image_rows.check_row(row, f"image {image.id!r} ({where})")
        except CorpusError as e:
            self.bad.add(e)
            return None
        self.images.append(image)
        self.image_keep.append(row)
        return image

    def add_caption(self, image: ImageRecord, row: int, what: str, parse: Callable[..., str], *args: Any) -> None:
        """Keep the caption text `parse(*args)` of `image` (described as `what`) owning text feature row `row`."""
        try:
            text = parse(*args)
            if self.text_rows:
                self.text_rows.check_row(row, what)
        except CorpusError as e:
            self.bad.add(e)
            return
        self.queries.append(QueryRecord(text=text, split=image.split, image_ids=(image.id,)))
        self.text_keep.append(row)

    def corpus(self, name: str, metadata: dict[str, Any], normalize: bool, source: str) -> Corpus:
        """The validated corpus of the kept records (zero-width image features without a feature file)."""
        image_x = select_features(self.image_rows, self.image_keep, normalize)
        corpus = Corpus(
            name=name, images=self.images,
            image_features=no_features(len(self.images)) if image_x is None else image_x,
            queries=self.queries, text_features=select_features(self.text_rows, self.text_keep, normalize),
            metadata=metadata,
        )
        return finish_corpus(corpus, self.bad, source)
