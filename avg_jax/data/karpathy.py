"""Karpathy-split JSON (`dataset_flickr30k.json`, `dataset_coco.json`) + precomputed features -> Corpus.

The JSON is used exactly as distributed: {"dataset": ..., "images": [{"filename", "filepath"?, "split",
"imgid", "sentences": [{"raw", "tokens", ...}, ...], "cocoid"?, ...}, ...]}. Splits: train, val, test and
restval (mapped to train). This yields the standard Flickr30K 1K-image and COCO 5K-image test splits.

Feature row order (the contract for precomputed .npy files):
  image features: row i <-> images[i] of the JSON, every split included, in file order.
  text features:  one row per sentence, images in file order and each image's sentences in order,
                  i.e. row k <-> the k-th element of [s for im in images for s in im["sentences"]].

Image ids: str(cocoid) when present (the COCO image id, as TFDS `coco_captions` also uses), else the
filename without extension (the Flickr photo id for Flickr30K).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gin

from avg_jax.data.corpus import Corpus, CorpusError, ImageRecord
from avg_jax.data.sources import (
    KARPATHY_SPLITS,
    BadRecords,
    CaptionedImages,
    load_caption_rows,
    load_feature_rows,
)
from avg_jax.json_io import read_json

TEXT_FIELDS = ("raw", "tokens")


@gin.configurable(denylist=["json_path", "image_features", "text_features", "skip_bad_records"])
def load_karpathy_json(
    json_path: str | Path,
    image_features: str | Path | None = None,
    text_features: str | Path | None = None,
    image_root: str | Path | None = None,
    text_field: str = "raw",
    restval_split: str = "train",
    normalize: bool = True,
    skip_bad_records: bool = False,
) -> Corpus:
    """Read a Karpathy-split JSON and its feature files (rows in the documented order) into a Corpus.

    `text_field` "raw" keeps the original caption; "tokens" joins Karpathy's lower-cased tokens. Without
    `image_features` the corpus gets zero-width features for `avg-jax data extract` to fill in.
    """
    if text_field not in TEXT_FIELDS:
        raise ValueError(f"text_field must be one of {TEXT_FIELDS}, got {text_field!r}")
    splits = {**KARPATHY_SPLITS, "restval": restval_split}
    path = Path(json_path)
    data = read_json(path, "Karpathy JSON", CorpusError, expect=None)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CorpusError(f"{path}: expected an object with an 'images' list (Karpathy format)")
    records = data["images"]
    sentence_counts = [_sentence_count(r) for r in records]
    image_rows = load_feature_rows(image_features, len(records), f"{path} 'images'")
    text_rows = load_caption_rows(text_features, sentence_counts, f"{path} sentences",
                                  lambda i: f"{path} images[{i}]: field 'sentences' is not a list")

    kept = CaptionedImages(BadRecords(f"karpathy {path.name}", skip_bad_records), image_rows, text_rows)
    seen: dict[str, int] = {}  # image id -> index of its first record
    first_text_row = 0
    for i, record in enumerate(records):
        where = f"{path} images[{i}]"
        text_row, first_text_row = first_text_row, first_text_row + (sentence_counts[i] or 0)
        image = kept.add_image(i, where, _image_record, record, where, splits, seen)
        if image is None:
            continue
        seen[image.id] = i
        for k, sentence in enumerate(record["sentences"]):
            s_where = f"{where}.sentences[{k}]"
            kept.add_caption(image, text_row + k, f"sentence {s_where}", _sentence_text, sentence, s_where, text_field)

    metadata: dict[str, Any] = {
        "source": "karpathy_json", "dataset": data.get("dataset"), "json": str(path.resolve()),
        "image_features_file": None if image_features is None else str(Path(image_features).resolve()),
        "text_features_file": None if text_features is None else str(Path(text_features).resolve()),
        "text_field": text_field, "restval_split": restval_split, "features_normalized": normalize,
        "row_order": "image rows: JSON images order; text rows: JSON sentence order",
    }
    if image_root is not None:
        metadata["image_root"] = str(Path(image_root).resolve())
    return kept.corpus(str(data.get("dataset") or path.stem), metadata, normalize, str(path))


def _sentence_count(record: Any) -> int | None:
    sentences = record.get("sentences") if isinstance(record, dict) else None
    return len(sentences) if isinstance(sentences, list) else None


def _image_record(record: Any, where: str, splits: dict[str, str], seen: dict[str, int]) -> ImageRecord:
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected an object, got {type(record).__name__}")
    filename = record.get("filename")
    if not isinstance(filename, str) or not filename.strip():
        raise CorpusError(f"{where}: field 'filename' must be a non-empty string, got {filename!r}")
    split = record.get("split")
    if split not in splits:
        raise CorpusError(f"{where}: field 'split': unknown split {split!r}; expected one of {sorted(splits)}")
    if not isinstance(record.get("sentences"), list):
        raise CorpusError(f"{where}: field 'sentences' must be a list, got {record.get('sentences')!r}")
    cocoid = record.get("cocoid")
    if cocoid is not None and (isinstance(cocoid, bool) or not isinstance(cocoid, int | str)):
        raise CorpusError(f"{where}: field 'cocoid' must be an integer, got {cocoid!r}")
    image_id = str(cocoid) if cocoid is not None else Path(filename).stem
    filepath = record.get("filepath")
    rel = f"{filepath}/{filename}" if isinstance(filepath, str) and filepath else filename
    if image_id in seen:
        raise CorpusError(f"{where}: duplicate image id {image_id!r} (first at images[{seen[image_id]}])")
    return ImageRecord(id=image_id, split=splits[split], path=rel)


def _sentence_text(sentence: Any, where: str, text_field: str) -> str:
    if not isinstance(sentence, dict):
        raise CorpusError(f"{where}: expected an object, got {type(sentence).__name__}")
    value = sentence.get(text_field)
    if text_field == "tokens":
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            raise CorpusError(f"{where}: field 'tokens' must be a list of strings, got {value!r}")
        value = " ".join(value)
    if not isinstance(value, str):
        raise CorpusError(f"{where}: field {text_field!r} must be a string, got {value!r}")
    if not value.strip():
        raise CorpusError(f"{where}: field {text_field!r} is empty or whitespace-only: {value!r}")
    return value.strip()
