"""The one corpus format every data source produces, with on-disk layout and validation.

A corpus directory holds:
  corpus.json           metadata: format version, name, synthetic flag, counts, feature dims
  images.jsonl          one image per line: {"id", "split", "path"?}; line i <-> row i of image_features.npy
  image_features.npy    float32 [num_images, image_dim]
  queries.jsonl         one query per line: {"text", "split", "image_ids": [...]}; line j <-> row j of text_features.npy
  text_features.npy     float32 [num_queries, text_dim] (optional)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from avg_jax.json_io import read_json, read_jsonl, write_json, write_jsonl

FORMAT = "avg_jax.corpus/1"
SPLITS = ("train", "val", "test")
IMAGES_FILE = "images.jsonl"
QUERIES_FILE = "queries.jsonl"
IMAGE_FEATURES_FILE = "image_features.npy"
TEXT_FEATURES_FILE = "text_features.npy"
META_FILE = "corpus.json"
MAX_REPORTED = 5  # offenders listed by name when bad records are skipped


class CorpusError(ValueError):
    """Bad corpus input; the message names the file, the field and the offending value or row."""


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    id: str
    split: str
    path: str | None = None


@dataclasses.dataclass(frozen=True)
class QueryRecord:
    text: str
    split: str
    image_ids: tuple[str, ...]


@dataclasses.dataclass
class Corpus:
    """Images with feature vectors and text queries that point at relevant images."""

    name: str
    images: list[ImageRecord]
    image_features: np.ndarray  # [num_images, image_dim] float32
    queries: list[QueryRecord]
    text_features: np.ndarray | None = None  # [num_queries, text_dim] float32
    synthetic: bool = False
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_queries(self) -> int:
        return len(self.queries)

    def image_index(self) -> dict[str, int]:
        """Image id -> row in `image_features`."""
        return {im.id: i for i, im in enumerate(self.images)}

    def image_rows(self, split: str | None = None) -> np.ndarray:
        """Rows of the images in `split` (all images when None), [n] int64."""
        check_split(split, "split argument")
        return np.array([i for i, im in enumerate(self.images) if split is None or im.split == split],
                        dtype=np.int64)

    def query_rows(self, split: str | None = None) -> np.ndarray:
        """Rows of the queries in `split` (all queries when None), [n] int64."""
        check_split(split, "split argument")
        return np.array([j for j, q in enumerate(self.queries) if split is None or q.split == split],
                        dtype=np.int64)

    def validate(self, source: str = "<in memory>") -> None:
        """Raise CorpusError on any inconsistency; nothing is repaired or dropped here."""
        check_features(self.image_features, f"{source}/{IMAGE_FEATURES_FILE}", len(self.images),
                        IMAGES_FILE)
        if self.text_features is not None:
            check_features(self.text_features, f"{source}/{TEXT_FEATURES_FILE}", len(self.queries),
                            QUERIES_FILE)
        seen: dict[str, int] = {}
        for i, im in enumerate(self.images):
            where = f"{source}/{IMAGES_FILE} line {i + 1}"
            if not isinstance(im.id, str) or not im.id.strip():
                raise CorpusError(f"{where}: field 'id' must be a non-empty string, got {im.id!r}")
            check_split(im.split, f"{where}: field 'split'")
            if im.id in seen:
                raise CorpusError(f"{where}: field 'id': duplicate image id {im.id!r} "
                                  f"(first on line {seen[im.id] + 1})")
            seen[im.id] = i
        for j, q in enumerate(self.queries):
            _check_query(q, f"{source}/{QUERIES_FILE} line {j + 1}", seen)

    def save(self, out_dir: str | Path) -> Path:
        """Write the corpus directory (validated first, so nothing invalid reaches disk)."""
        self.validate()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / IMAGES_FILE, (_drop_none(dataclasses.asdict(im)) for im in self.images))
        write_jsonl(out / QUERIES_FILE,
                     ({"text": q.text, "split": q.split, "image_ids": list(q.image_ids)}
                      for q in self.queries))
        np.save(out / IMAGE_FEATURES_FILE, np.asarray(self.image_features, np.float32))
        if self.text_features is not None:
            np.save(out / TEXT_FEATURES_FILE, np.asarray(self.text_features, np.float32))
        meta = {
            "format": FORMAT, "name": self.name, "synthetic": self.synthetic,
            "num_images": self.num_images, "num_queries": self.num_queries,
            "image_dim": int(self.image_features.shape[1]),
            "text_dim": None if self.text_features is None else int(self.text_features.shape[1]),
            "metadata": self.metadata,
        }
        write_json(out / META_FILE, meta)
        return out

    @classmethod
    def load(cls, corpus_dir: str | Path, skip_bad_records: bool = False) -> Corpus:
        """Read and validate a corpus directory. With `skip_bad_records`, malformed query records
        (and their feature rows) are dropped and reported with a count and the first offenders;
        image-level problems are always fatal because identifiers depend on every image."""
        root = Path(corpus_dir)
        meta_path = _require(root / META_FILE)
        meta = read_json(meta_path, "corpus file", CorpusError)
        if meta.get("format") != FORMAT:
            raise CorpusError(f"{meta_path}: field 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
        images = [_image_from_json(obj, f"{root / IMAGES_FILE} line {n}")
                  for n, obj in read_jsonl(_require(root / IMAGES_FILE), CorpusError)]
        image_features = load_npy(_require(root / IMAGE_FEATURES_FILE))
        raw_queries = list(read_jsonl(_require(root / QUERIES_FILE), CorpusError))
        text_path = root / TEXT_FEATURES_FILE
        text_features = load_npy(text_path) if text_path.exists() else None
        if meta.get("text_dim") is not None and text_features is None:
            raise CorpusError(f"{root / META_FILE}: field 'text_dim' is {meta['text_dim']} but "
                              f"{text_path} is missing")
        corpus = cls(name=meta.get("name", root.name), images=images, image_features=image_features,
                     queries=[], text_features=None, synthetic=bool(meta.get("synthetic", False)),
                     metadata=meta.get("metadata", {}))
        # Images first: queries are checked against the validated image ids.
        check_features(image_features, str(root / IMAGE_FEATURES_FILE), len(images), IMAGES_FILE)
        corpus.validate(str(root))
        ids = corpus.image_index()
        if text_features is not None:
            check_features(text_features, str(text_path), len(raw_queries), QUERIES_FILE)
        keep, bad = [], []
        for n, obj in raw_queries:
            where = f"{root / QUERIES_FILE} line {n}"
            try:
                q = _query_from_json(obj, where)
                _check_query(q, where, ids)
            except CorpusError as e:
                if not skip_bad_records:
                    raise
                bad.append(str(e))
                continue
            keep.append((n - 1, q))
        if bad:
            shown = "\n  ".join(bad[:MAX_REPORTED])
            print(f"[corpus] skipped {len(bad)} bad query record(s) in {root / QUERIES_FILE}; "
                  f"first {min(len(bad), MAX_REPORTED)}:\n  {shown}")
        corpus.queries = [q for _, q in keep]
        if text_features is not None:
            corpus.text_features = text_features[[r for r, _ in keep]] if bad else text_features
        corpus.metadata = {**corpus.metadata, "skipped_query_records": len(bad)}
        return corpus


def check_split(split: str | None, where: str) -> None:
    if split is not None and split not in SPLITS:
        raise CorpusError(f"{where}: unknown split {split!r}; expected one of {list(SPLITS)}")


def _check_query(q: QueryRecord, where: str, known_ids: dict[str, int]) -> None:
    if not isinstance(q.text, str) or not q.text.strip():
        raise CorpusError(f"{where}: field 'text' is empty or whitespace-only: {q.text!r}")
    check_split(q.split, f"{where}: field 'split'")
    if not q.image_ids:
        raise CorpusError(f"{where}: field 'image_ids' is empty")
    for image_id in q.image_ids:
        if image_id not in known_ids:
            raise CorpusError(f"{where}: field 'image_ids' names unknown image {image_id!r}")


def check_features(x: np.ndarray, path: str, num_records: int, records_file: str, finite: bool = True) -> None:
    """Features must be a 2-D float array with one row per record (and, with `finite`, no NaN/inf)."""
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        shape = getattr(x, "shape", None)
        raise CorpusError(f"{path}: features must be a 2-D array [rows, dim], got shape {shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise CorpusError(f"{path}: features must be floating point, got dtype {x.dtype}")
    if x.shape[0] != num_records:
        raise CorpusError(f"{path}: has {x.shape[0]} rows but {records_file} has {num_records} records")
    if not finite:
        return
    ok = np.isfinite(x).all(axis=1)
    if not ok.all():
        rows = np.flatnonzero(~ok)
        raise CorpusError(f"{path}: {rows.size} row(s) contain NaN/inf, first rows {rows[:MAX_REPORTED].tolist()}")


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"corpus file missing: {path}")
    return path


def load_npy(path: Path) -> np.ndarray:
    """np.load without pickles; a non-numeric file is a CorpusError naming it."""
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        raise CorpusError(f"{path}: not a plain numeric .npy array ({e})") from None


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def _field(obj: dict, name: str, where: str) -> Any:
    if name not in obj:
        raise CorpusError(f"{where}: missing field {name!r}")
    return obj[name]


def _image_from_json(obj: dict, where: str) -> ImageRecord:
    image_id = _field(obj, "id", where)
    if not isinstance(image_id, str):
        raise CorpusError(f"{where}: field 'id' must be a string, got {image_id!r}")
    return ImageRecord(id=image_id, split=_field(obj, "split", where), path=obj.get("path"))


def _query_from_json(obj: dict, where: str) -> QueryRecord:
    ids = _field(obj, "image_ids", where)
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise CorpusError(f"{where}: field 'image_ids' must be a list of strings, got {ids!r}")
    text = _field(obj, "text", where)
    if not isinstance(text, str):
        raise CorpusError(f"{where}: field 'text' must be a string, got {text!r}")
    return QueryRecord(text=text, split=_field(obj, "split", where), image_ids=tuple(ids))


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalise feature rows (float32); zero rows stay zero."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def queries_by_image(corpus: Corpus, rows: Sequence[int] | None = None) -> dict[str, list[int]]:
    """Image id -> the query rows whose relevant images include it."""
    out: dict[str, list[int]] = {}
    for j in range(corpus.num_queries) if rows is None else rows:
        for image_id in corpus.queries[j].image_ids:
            out.setdefault(image_id, []).append(int(j))
    return out
