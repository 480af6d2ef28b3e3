"""Feature extraction for a corpus: pluggable extractors, batched, with a progress bar.

An extractor maps a batch of PIL images and/or a batch of strings to feature rows. The driver reads the
corpus' image files (relative paths resolve against `metadata["image_root"]`, else the corpus directory),
runs the extractor in batches and writes L2-normalised float32 rows in corpus order.

Extractors:
  hf-clip    a HuggingFace CLIP checkpoint from a LOCAL directory through transformers (PyTorch); image
             rows = projected image embeddings, text rows = projected text embeddings (texts longer than
             the model's context are truncated, as CLIP was trained). The AVG authors used
             openai/clip-vit-large-patch14-336.
  thumbnail  a deterministic model-free fallback: images -> mean-centred RGB thumbnail pixels, texts ->
             signed feature hashing of lower-cased words. Real features of the real data, but image and
             text rows do not share a space; for plumbing runs and when no checkpoint is available.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import gin
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from avg_jax.data.corpus import IMAGES_FILE, Corpus, CorpusError, normalize_rows


class FeatureExtractor(Protocol):
    """What `extract_corpus_features` needs from an extractor."""

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:  # [batch, image_dim]
        ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:  # [batch, text_dim]
        ...

    def describe(self) -> dict[str, Any]:  # recorded in the corpus metadata
        ...


EXTRACTORS: dict[str, Callable[..., FeatureExtractor]] = {}


def register_extractor(name: str) -> Callable:
    """Class decorator adding an extractor under `name` (the `--extractor` value)."""

    def add(cls):
        EXTRACTORS[name] = cls
        return cls

    return add


def make_extractor(name: str, **options: Any) -> FeatureExtractor:
    """Build extractor `name`; an option it does not take (e.g. a model path for `thumbnail`) is an error."""
    if name not in EXTRACTORS:
        raise ValueError(f"unknown extractor {name!r}; available: {sorted(EXTRACTORS)}")
    accepted = inspect.signature(EXTRACTORS[name]).parameters
    unused = sorted(k for k in options if k not in accepted)
    if unused:
        raise ValueError(f"extractor {name!r} takes no option(s) {unused}; it accepts {sorted(accepted)}")
    return EXTRACTORS[name](**options)


@register_extractor("hf-clip")
@gin.configurable(denylist=["model_path"])
class HFClipExtractor:
    """A local HuggingFace CLIP checkpoint (config, weights, processor files) run through transformers."""

    def __init__(self, model_path: str | Path, device: str = "cpu"):
        import torch
        import transformers

        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no HuggingFace checkpoint at {path} (config.json missing); hub names are not "
                                    f"downloaded here: fetch the checkpoint first and pass its directory")
        self._torch = torch
        self.path, self.device = path, device
        self.model = transformers.CLIPModel.from_pretrained(path, local_files_only=True).eval().to(device)
        self.processor = transformers.CLIPProcessor.from_pretrained(path, local_files_only=True)
        self.max_length = self.model.config.text_config.max_position_embeddings

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        with self._torch.inference_mode():
            out = self.model.get_image_features(pixel_values=pixels).pooler_output  # [batch, projection_dim]
        return out.float().cpu().numpy()

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self.processor.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                          return_tensors="pt").to(self.device)
        with self._torch.inference_mode():
            out = self.model.get_text_features(input_ids=tokens["input_ids"],
                                               attention_mask=tokens["attention_mask"]).pooler_output
        return out.float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {"extractor": "hf-clip", "model_path": str(self.path.resolve()),
                "model_type": self.model.config.model_type, "projection_dim": self.model.config.projection_dim}


@register_extractor("thumbnail")
@gin.configurable
class ThumbnailExtractor:
    """Model-free fallback: RGB thumbnails for images, signed hashed bag of words for texts."""

    def __init__(self, image_size: int = 16, text_dim: int = 512):
        self.image_size, self.text_dim = image_size, text_dim

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        size = (self.image_size, self.image_size)
        x = np.stack([np.asarray(im.convert("RGB").resize(size, Image.Resampling.BILINEAR), np.float32) / 255.0
                      for im in images]).reshape(len(images), -1)  # [batch, size * size * 3]
        return x - x.mean(axis=1, keepdims=True)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.text_dim), np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                h = zlib.crc32(word.encode())
                out[i, h % self.text_dim] += 1.0 if (h >> 31) & 1 else -1.0
        return out

    def describe(self) -> dict[str, Any]:
        return {"extractor": "thumbnail", "image_size": self.image_size, "text_dim": self.text_dim,
                "note": "model-free fallback: image and text rows do not share an embedding space"}


def image_file(corpus: Corpus, corpus_dir: str | Path | None, row: int) -> Path:
    """Where image `row` lives: absolute paths as given, relative ones under image_root / the corpus dir."""
    image = corpus.images[row]
    if not image.path:
        raise CorpusError(f"{corpus_dir}/{IMAGES_FILE} line {row + 1}: image {image.id!r} has no 'path', so its "
                          f"features cannot be extracted")
    path = Path(image.path)
    if path.is_absolute():
        return path
    root = corpus.metadata.get("image_root") or corpus_dir
    if root is None:
        raise CorpusError(f"image {image.id!r}: relative path {image.path!r} but no image_root or corpus dir")
    return Path(root) / path


def _open_image(path: Path, image_id: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise CorpusError(f"{path}: image file of image {image_id!r} does not exist") from None
    except OSError as e:
        raise CorpusError(f"{path}: cannot read image {image_id!r} ({e})") from None


def _batched_rows(fn: Callable[[list[int]], np.ndarray], n: int, batch_size: int, what: str,
                  progress: bool) -> np.ndarray:
    rows = []
    with tqdm(total=n, desc=what, unit=what.rstrip("s"), disable=not progress) as bar:
        for start in range(0, n, batch_size):
            idx = list(range(start, min(n, start + batch_size)))
            x = np.asarray(fn(idx), np.float32)
            if x.ndim != 2 or x.shape[0] != len(idx) or not np.isfinite(x).all():
                raise ValueError(f"extractor returned bad {what} features for rows {idx[0]}..{idx[-1]}: "
                                 f"shape {x.shape}, finite={bool(np.isfinite(x).all())}")
            rows.append(x)
            bar.update(len(idx))
    return normalize_rows(np.concatenate(rows)) if rows else np.zeros((0, 0), np.float32)


def extract_corpus_features(
    corpus: Corpus,
    extractor: FeatureExtractor,
    corpus_dir: str | Path | None = None,
    images: bool = True,
    texts: bool = True,
    batch_size: int = 64,
    load_threads: int = 4,
    progress: bool = True,
) -> Corpus:
    """A copy of `corpus` whose image and/or text features are the extractor's, L2-normalised float32."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    image_features, text_features = corpus.image_features, corpus.text_features
    metadata = dict(corpus.metadata)
    if images:
        files = [image_file(corpus, corpus_dir, i) for i in range(corpus.num_images)]
        with concurrent.futures.ThreadPoolExecutor(load_threads) as pool:

            def embed(idx: list[int]) -> np.ndarray:
                pics = list(pool.map(lambda i: _open_image(files[i], corpus.images[i].id), idx))
                return extractor.embed_images(pics)

            image_features = _batched_rows(embed, corpus.num_images, batch_size, "images", progress)
        if any(not Path(im.path).is_absolute() for im in corpus.images):
            metadata["image_root"] = str(Path(metadata.get("image_root") or corpus_dir).resolve())
        metadata["image_features_from"] = {**extractor.describe(), "normalized": True}
    if texts:
        text_features = _batched_rows(lambda idx: extractor.embed_texts([corpus.queries[j].text for j in idx]),
                                      corpus.num_queries, batch_size, "texts", progress)
        metadata["text_features_from"] = {**extractor.describe(), "normalized": True}
    out = Corpus(name=corpus.name, images=corpus.images, image_features=image_features, queries=corpus.queries,
                 text_features=text_features, synthetic=corpus.synthetic, metadata=metadata)
    out.validate(str(corpus_dir or "<extracted>"))
    return out
