"""TFDS `coco_captions` (Karpathy splits of COCO 2014) -> Corpus + an image folder (extra `seqio`).

TFDS splits train / restval / val / test map to corpus splits by `splits` (default: restval -> train,
as in the papers; the test split is the standard COCO 5K test). The dataset must already be prepared
in `data_dir` (`tfds.builder("coco_captions").download_and_prepare()`); nothing is downloaded here.

Row order: images in the order of `splits` (each TFDS split in its stored order, shuffle_files off),
queries = each image's captions in order. Image ids are str(image/id), the COCO image id (as the
Karpathy JSON loader uses). Each decoded image is written to `image_dir/<id>.<image_format>` so the
corpus has real image files; TFDS carries no features, so the corpus gets zero-width features and
`avg-jax data extract` (or `--extractor` on `data convert-tfds`) computes them from those files.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gin
import numpy as np
from PIL import Image

from avg_jax.data.corpus import SPLITS, Corpus, CorpusError, ImageRecord, QueryRecord
from avg_jax.data.sources import KARPATHY_SPLITS, BadRecords, finish_corpus, no_features

DATASET = "coco_captions"
IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG"}


@gin.configurable(denylist=["image_dir", "data_dir", "skip_bad_records"])
def load_tfds_coco_captions(
    image_dir: str | Path,
    data_dir: str | Path | None = None,
    splits: Mapping[str, str] | None = None,
    max_images_per_split: int | None = None,
    image_format: str = "jpg",
    jpeg_quality: int = 95,
    skip_bad_records: bool = False,
) -> Corpus:
    """Read the prepared TFDS dataset split by split, write its images, return the (feature-less) Corpus."""
    import tensorflow_datasets as tfds

    splits = dict(KARPATHY_SPLITS if splits is None else splits)
    for tfds_split, split in splits.items():
        if split not in SPLITS:
            raise ValueError(f"splits[{tfds_split!r}]: unknown corpus split {split!r}; expected one of {list(SPLITS)}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}")
    out_dir = Path(image_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    builder = tfds.builder(DATASET, data_dir=None if data_dir is None else str(data_dir))
    bad = BadRecords(f"tfds {DATASET}", skip_bad_records)
    images: list[ImageRecord] = []
    queries: list[QueryRecord] = []
    seen: dict[str, str] = {}
    for tfds_split, split in splits.items():
        try:
            ds = builder.as_dataset(split=tfds_split, shuffle_files=False)
        except AssertionError as e:  # tfds reports an unprepared dataset this way
            where = data_dir or "the default data_dir"
            raise FileNotFoundError(f"TFDS {DATASET} is not prepared in {where}: {e}") from None
        except ValueError as e:  # unknown split name
            raise ValueError(f"TFDS {DATASET}: bad split {tfds_split!r} ({e})") from None
        if max_images_per_split is not None:
            ds = ds.take(max_images_per_split)
        for n, ex in enumerate(tfds.as_numpy(ds)):
            where = f"TFDS {DATASET} split {tfds_split!r} example {n}"
            try:
                image_id, pixels, captions = _parse_example(ex, where)
                if image_id in seen:
                    raise CorpusError(f"{where}: field 'image/id': duplicate image id {image_id!r} "
                                      f"(first in split {seen[image_id]!r})")
            except CorpusError as e:
                bad.add(e)
                continue
            seen[image_id] = tfds_split
            rel = f"{image_id}.{image_format}"
            _save_image(pixels, out_dir / rel, image_format, jpeg_quality)
            images.append(ImageRecord(id=image_id, split=split, path=rel))
            for k, text in enumerate(captions):
                if not text.strip():
                    bad.add(CorpusError(f"{where}: field 'captions/text'[{k}] is empty or whitespace-only: {text!r}"))
                    continue
                queries.append(QueryRecord(text=text.strip(), split=split, image_ids=(image_id,)))
    metadata: dict[str, Any] = {
        "source": "tfds", "dataset": DATASET, "data_dir": None if data_dir is None else str(data_dir),
        "splits": splits, "max_images_per_split": max_images_per_split, "image_root": str(out_dir.resolve()),
        "row_order": "images: TFDS splits in the order of 'splits', stored order within; queries: captions in order",
    }
    corpus = Corpus(name=DATASET, images=images, image_features=no_features(len(images)), queries=queries,
                    metadata=metadata)
    return finish_corpus(corpus, bad, f"TFDS {DATASET}")


def _parse_example(ex: dict, where: str) -> tuple[str, np.ndarray, list[str]]:
    """(image id, [height, width, 3] uint8 pixels, caption strings) of one TFDS example."""
    image_id = ex.get("image/id")
    if image_id is None or np.ndim(image_id) != 0:
        raise CorpusError(f"{where}: field 'image/id' must be a scalar, got {image_id!r}")
    pixels = ex.get("image")
    if not isinstance(pixels, np.ndarray) or pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8 \
            or 0 in pixels.shape:
        desc = (pixels.dtype, pixels.shape) if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise CorpusError(f"{where}: field 'image' must be a non-empty [height, width, 3] uint8 array, got {desc}")
    raw = ex.get("captions", {}).get("text")
    if raw is None:
        raise CorpusError(f"{where}: missing field 'captions/text'")
    try:
        captions = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in np.asarray(raw).ravel()]
    except UnicodeDecodeError as e:
        raise CorpusError(f"{where}: field 'captions/text' is not UTF-8 ({e})") from None
    return str(int(image_id)), pixels, captions


def _save_image(pixels: np.ndarray, path: Path, image_format: str, jpeg_quality: int) -> None:
    options = {"quality": jpeg_quality} if image_format == "jpg" else {}
    Image.fromarray(pixels).save(path, format=IMAGE_FORMATS[image_format], **options)
