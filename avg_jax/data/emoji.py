"""A real small text-to-image benchmark built from two npm packages: Google's emoji images and their names.

Sources (fetched with `npm pack`, both MIT-licensed):
  emoji-datasource-google  `emoji.json` (name, category, skin-tone variations) + `img/google/64/*.png`
  emojibase-data           `en/data.json` (CLDR label and keyword tags per emoji and per skin tone)
The two are joined on the code points (`unified` / `hexcode`, ignoring the FE0F variation selector).

Images: every emoji and every skin-tone variant with a Google image is its own image (alpha composited on
white, written as RGB PNGs under `images/`). Queries: the name, the label and each tag, lower-cased; a
variant has its own label ("waving hand: dark skin tone") and shares its family's name and tags. A query
text is relevant to every image of its split that carries it. Splits are fixed by a hash of the family
(base emoji + its skin-tone variants), so near-identical siblings never straddle train and test, and a
query of one split only points at images of that split (test images are never training targets).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import gin
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from avg_jax.data.corpus import Corpus, CorpusError, ImageRecord, QueryRecord
from avg_jax.data.pretrained import EfficientNetLite0Extractor, MiniLMExtractor  # also registers both extractors

GOOGLE_PACKAGE = "emoji-datasource-google"
EMOJIBASE_PACKAGE = "emojibase-data"
IMAGE_SUBDIR = "img/google/64"
IMAGES_DIR = "images"
LICENSES = {
    GOOGLE_PACKAGE: "MIT (package: iamcal/emoji-data); the Google/Noto images: Apache-2.0",
    EMOJIBASE_PACKAGE: "MIT (emojibase; labels and tags derived from Unicode CLDR)",
}


@dataclasses.dataclass(frozen=True)
class EmojiImage:
    """One emoji image with its texts; `family` is the base emoji's code points."""

    unified: str
    family: str
    png: Path
    name: str
    label: str
    tags: tuple[str, ...]
    category: str


def _codepoints(hexcode: str) -> str:
    """Canonical join key: upper-case code points without the FE0F variation selector."""
    return "-".join(p for p in hexcode.upper().split("-") if p != "FE0F")


def _text(s: str) -> str:
    return " ".join(s.lower().split())


def _load_json(path: Path) -> object:
    if not path.is_file():
        raise FileNotFoundError(f"emoji package file missing: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}: not valid JSON ({e})") from None


def read_emoji_packages(google_dir: str | Path, emojibase_dir: str | Path) -> tuple[list[EmojiImage], dict]:
    """Join the two unpacked packages (directories holding `package/`) into emoji images, in sort order.

    Returns the images and a report of what was left out and why (nothing is dropped silently)."""
    google = Path(google_dir) / "package"
    base = Path(emojibase_dir) / "package"
    datasource = _load_json(google / "emoji.json")
    labels = _load_json(base / "en" / "data.json")
    if not isinstance(datasource, list) or not isinstance(labels, list):
        raise CorpusError(f"{google / 'emoji.json'} and {base / 'en/data.json'} must each hold a JSON list")
    by_code: dict[str, dict] = {}
    for n, entry in enumerate(labels):
        for item in [entry, *entry.get("skins", [])]:
            if "hexcode" not in item or "label" not in item:
                raise CorpusError(f"{base / 'en/data.json'} entry {n}: missing field 'hexcode' or 'label'")
            by_code[_codepoints(item["hexcode"])] = {**item, "tags": entry.get("tags", [])}
    images, no_image, no_label = [], [], []
    for n, entry in enumerate(sorted(datasource, key=lambda e: e.get("sort_order", 0))):
        for field in ("unified", "name", "image", "category"):
            if not isinstance(entry.get(field), str):
                raise CorpusError(f"{google / 'emoji.json'} entry {n}: field {field!r} missing or not a string")
        variants = [(entry["unified"], entry)]
        variants += [(v["unified"], v) for v in (entry.get("skin_variations") or {}).values()]
        for unified, item in variants:
            png = google / IMAGE_SUBDIR / item["image"]
            if not item.get("has_img_google", False) or not png.is_file():
                no_image.append(unified)
                continue
            info = by_code.get(_codepoints(unified))
            if info is None:
                no_label.append(unified)
                continue
            images.append(EmojiImage(unified=unified.lower(), family=entry["unified"].lower(), png=png,
                                     name=_text(entry["name"]), label=_text(info["label"]),
                                     tags=tuple(_text(t) for t in info["tags"] if t.strip()),
                                     category=entry["category"]))
    report = {"skipped_without_google_image": len(no_image), "skipped_without_emojibase_label": len(no_label),
              "skipped_examples": (no_image + no_label)[:5]}
    return images, report


def family_split(family: str, test_percent: int, val_percent: int) -> str:
    """Fixed split of a family by a hash of its code points (stable when emoji are added)."""
    bucket = zlib.crc32(family.encode()) % 100
    return "test" if bucket < test_percent else "val" if bucket < test_percent + val_percent else "train"


def emoji_texts(image: EmojiImage) -> dict[str, str]:
    """Query text -> kind ('name', 'label' or 'tag'; the first kind wins when texts coincide)."""
    out: dict[str, str] = {}
    for text, kind in [(image.name, "name"), (image.label, "label"), *((t, "tag") for t in image.tags)]:
        out.setdefault(text, kind)
    return out


def composite_png(src: Path, dst: Path) -> None:
    """Alpha-composite an emoji PNG on white and save it as RGB (what image encoders expect)."""
    try:
        with Image.open(src) as im:
            rgba = im.convert("RGBA")
    except OSError as e:
        raise CorpusError(f"{src}: cannot read emoji image ({e})") from None
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    canvas.convert("RGB").save(dst)


@gin.configurable(denylist=["images", "out_dir"])
def build_emoji_corpus(images: Sequence[EmojiImage], out_dir: str | Path, test_percent: int = 20,
                       val_percent: int = 0, progress: bool = True) -> Corpus:
    """Image records (PNGs written to `out_dir/images`) and queries; features are filled in later."""
    if not images:
        raise CorpusError("no emoji images to build a corpus from")
    if not (0 <= test_percent and 0 <= val_percent and test_percent + val_percent < 100):
        raise ValueError(f"test_percent={test_percent}, val_percent={val_percent}: need 0 <= each, sum < 100")
    out = Path(out_dir)
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    records = []
    for im in tqdm(images, desc="emoji images", unit="image", disable=not progress):
        path = f"{IMAGES_DIR}/{im.unified}.png"
        composite_png(im.png, out / path)
        records.append(ImageRecord(id=f"emoji-{im.unified}", split=family_split(im.family, test_percent,
                                                                                 val_percent), path=path))
    # text -> kind and relevant images, per split, in image order.
    per_split: dict[str, dict[str, tuple[str, list[str]]]] = {}
    for im, rec in zip(images, records, strict=True):
        for text, kind in emoji_texts(im).items():
            per_split.setdefault(rec.split, {}).setdefault(text, (kind, []))[1].append(rec.id)
    queries, kinds = [], {}
    for split in ("train", "val", "test"):
        for text, (kind, ids) in per_split.get(split, {}).items():
            queries.append(QueryRecord(text=text, split=split, image_ids=tuple(ids)))
            kinds.setdefault(split, {}).setdefault(kind, 0)
            kinds[split][kind] += 1
    train_texts = {q.text for q in queries if q.split == "train"}
    families = {s: len({im.family for im, r in zip(images, records, strict=True) if r.split == s})
                for s in per_split}
    metadata = {
        "source": "npm packages emoji-datasource-google + emojibase-data", "licenses": LICENSES,
        "families_per_split": families, "query_kinds_per_split": kinds,
        "test_queries_whose_text_is_also_a_train_query": sum(
            q.split == "test" and q.text in train_texts for q in queries),
    }
    return Corpus(name="emoji", images=records, image_features=np.zeros((len(records), 0), np.float32),
                  queries=queries, text_features=None, synthetic=False, metadata=metadata)


@gin.configurable
def npm_package_versions(google: str = "16.0.0", emojibase: str = "17.0.0") -> dict[str, str]:
    """The pinned package versions (the benchmark is fixed by them)."""
    return {GOOGLE_PACKAGE: google, EMOJIBASE_PACKAGE: emojibase}


def fetch_npm_package(name: str, version: str, dest: str | Path) -> Path:
    """`npm pack name@version` into `dest` and unpack it safely to `dest/name` (reused when present)."""
    target = Path(dest) / name
    manifest = target / "package" / "package.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("version") == version:
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError(f"npm not found on PATH: needed to fetch {name}@{version} (or pass --packages_dir "
                                "with the unpacked packages)")
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run([npm, "pack", f"{name}@{version}", "--pack-destination", tmp, "--silent"],
                                capture_output=True, text=True, check=False)
        tarballs = list(Path(tmp).glob("*.tgz"))
        if result.returncode != 0 or len(tarballs) != 1:
            raise FileNotFoundError(f"npm pack {name}@{version} failed (exit {result.returncode}): "
                                    f"{result.stderr.strip()[-500:]}")
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        with tarfile.open(tarballs[0]) as tar:
            tar.extractall(target, filter="data")  # refuses absolute paths, links out of target, devices
    return target


def prepare_emoji_corpus(out_dir: str | Path, packages_dir: str | Path | None = None, batch_size: int = 64,
                         progress: bool = True) -> tuple[Corpus, dict]:
    """Build and save the emoji corpus with its image and text features into `out_dir`; returns it with the
    package report (`read_emoji_packages`). `packages_dir`: the unpacked npm packages (each NAME/package/...);
    None fetches them with `npm pack` into OUT/packages."""
    from avg_jax.data.extract import extract_corpus_features

    out = Path(out_dir)
    packages = Path(packages_dir) if packages_dir else out / "packages"
    if not packages_dir:
        for name, version in npm_package_versions().items():
            print(f"fetching {name}@{version} with npm pack")
            fetch_npm_package(name, version, packages)
    images, report = read_emoji_packages(packages / GOOGLE_PACKAGE, packages / EMOJIBASE_PACKAGE)
    corpus = build_emoji_corpus(images, out, progress=progress)
    corpus.metadata.update(report)
    corpus.metadata["package_versions"] = _package_versions(packages)
    corpus = extract_corpus_features(corpus, EfficientNetLite0Extractor(), out, texts=False,
                                     batch_size=batch_size, progress=progress)
    corpus = extract_corpus_features(corpus, MiniLMExtractor(), out, images=False, batch_size=batch_size,
                                     progress=progress)
    corpus.metadata.pop("image_root")  # image paths stay relative to the corpus directory, wherever it moves
    corpus.metadata["features_aligned"] = False
    corpus.save(out)
    return corpus, report


def _package_versions(packages: Path) -> dict[str, str | None]:
    out = {}
    for name in (GOOGLE_PACKAGE, EMOJIBASE_PACKAGE):
        manifest = packages / name / "package" / "package.json"
        out[name] = json.loads(manifest.read_text()).get("version") if manifest.is_file() else None
    return out
