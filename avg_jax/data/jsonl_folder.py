"""Users' own data: a JSONL file (one line per image) + a folder of image files -> Corpus.

Each line: {"image": "path/relative/to/image_root.jpg", "split": "train"|"val"|"test",
            "captions": ["...", ...] (or "caption": "..." for one), "id": "..." (optional)}.
The id defaults to the image path without its extension. An image may have no captions
("captions": []): it is then only a retrieval candidate.

Feature row order (the contract for precomputed .npy files):
  image features: row i <-> line i + 1 of the JSONL.
  text features:  one row per caption, lines in order and each line's captions in order.
Without image features the corpus gets zero-width features for `avg-jax data extract` to fill in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gin

from avg_jax.data.corpus import SPLITS, Corpus, CorpusError, ImageRecord
from avg_jax.data.sources import BadRecords, CaptionedImages, load_caption_rows, load_feature_rows
from avg_jax.json_io import read_jsonl


@gin.configurable(denylist=["records_path", "image_root", "image_features", "text_features", "skip_bad_records"])
def load_jsonl_folder(
    records_path: str | Path,
    image_root: str | Path,
    image_features: str | Path | None = None,
    text_features: str | Path | None = None,
    name: str | None = None,
    check_images_exist: bool = True,
    normalize: bool = True,
    skip_bad_records: bool = False,
) -> Corpus:
    """Read the JSONL records and their feature files (rows in the documented order) into a Corpus."""
    path, root = Path(records_path), Path(image_root)
    if not path.exists():
        raise FileNotFoundError(f"records file not found: {path}")
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    lines = list(read_jsonl(path, CorpusError))  # malformed JSON lines are fatal: their captions cannot be counted
    counts = [_caption_count(obj) for _, obj in lines]
    image_rows = load_feature_rows(image_features, len(lines), str(path))
    text_rows = load_caption_rows(text_features, counts, f"{path} captions",
                                  lambda i: f"{path} line {lines[i][0]}: captions are not a string or list of strings")

    kept = CaptionedImages(BadRecords(f"jsonl {path.name}", skip_bad_records), image_rows, text_rows)
    seen: dict[str, int] = {}  # image id -> line of its first record
    first_text_row = 0
    for i, (n, obj) in enumerate(lines):
        where = f"{path} line {n}"
        text_row, first_text_row = first_text_row, first_text_row + (counts[i] or 0)
        image = kept.add_image(i, where, _image_record, obj, where, seen, root if check_images_exist else None)
        if image is None:
            continue
        seen[image.id] = n
        for k, text in enumerate(_captions(obj)):
            kept.add_caption(image, text_row + k, f"caption {k} on {where}",
                             _caption_text, text, f"{where}: caption {k}")

    metadata: dict[str, Any] = {
        "source": "jsonl_folder", "records": str(path.resolve()), "image_root": str(root.resolve()),
        "image_features_file": None if image_features is None else str(Path(image_features).resolve()),
        "text_features_file": None if text_features is None else str(Path(text_features).resolve()),
        "features_normalized": normalize,
        "row_order": "image rows: JSONL line order; text rows: captions in line order",
    }
    return kept.corpus(name or path.stem, metadata, normalize, str(path))


def _captions(obj: dict) -> Any:
    return [obj["caption"]] if "caption" in obj and "captions" not in obj else obj.get("captions")


def _caption_count(obj: dict) -> int | None:
    """Number of captions on a line, None when it cannot be told (then text rows cannot be aligned)."""
    if "caption" in obj and "captions" in obj:
        return None
    captions = _captions(obj)
    ok = isinstance(captions, list) and all(isinstance(c, str) for c in captions)
    return len(captions) if ok else None


def _image_record(obj: dict, where: str, seen: dict[str, int], root: Path | None) -> ImageRecord:
    """The image of a JSONL line, with its captions checked; `root` (when given) must hold its file."""
    image = obj.get("image")
    if not isinstance(image, str) or not image.strip():
        raise CorpusError(f"{where}: field 'image' must be a non-empty relative path, got {image!r}")
    if Path(image).is_absolute() or ".." in Path(image).parts:
        raise CorpusError(f"{where}: field 'image' must be relative to the image folder, got {image!r}")
    split = obj.get("split")
    if split not in SPLITS:
        raise CorpusError(f"{where}: field 'split': unknown split {split!r}; expected one of {list(SPLITS)}")
    if "caption" in obj and "captions" in obj:
        raise CorpusError(f"{where}: give either 'caption' or 'captions', not both")
    if "caption" not in obj and "captions" not in obj:
        raise CorpusError(f"{where}: missing field 'captions' (or 'caption'); use [] for an image without captions")
    if _caption_count(obj) is None:
        field = "caption" if "caption" in obj else "captions"
        raise CorpusError(f"{where}: field {field!r} must be a string / list of strings, got {obj[field]!r}")
    image_id = obj.get("id", str(Path(image).with_suffix("").as_posix()))
    if not isinstance(image_id, str) or not image_id.strip():
        raise CorpusError(f"{where}: field 'id' must be a non-empty string, got {image_id!r}")
    if image_id in seen:
        raise CorpusError(f"{where}: field 'id': duplicate image id {image_id!r} (first on line {seen[image_id]})")
    rel = Path(image).as_posix()
    if root is not None and not (root / rel).is_file():
        raise CorpusError(f"{where}: field 'image': file {root / rel} does not exist")
    return ImageRecord(id=image_id, split=split, path=rel)


def _caption_text(text: str, what: str) -> str:
    if not text.strip():
        raise CorpusError(f"{what} is empty or whitespace-only: {text!r}")
    return text.strip()
