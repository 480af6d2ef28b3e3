"""Karpathy-split JSON loader on hand-written fixtures in the distributed files' structure."""

import json
from pathlib import Path

import numpy as np
import pytest

from avg_jax.data.corpus import Corpus, CorpusError
from avg_jax.data.karpathy import load_karpathy_json

FIXTURES = Path(__file__).parent / "fixtures"
FLICKR = FIXTURES / "dataset_flickr30k_mini.json"
COCO = FIXTURES / "dataset_coco_mini.json"


def _features(tmp_path, json_path, image_dim=8, text_dim=4, seed=0):
    """Random features in the documented row order, computed from the raw JSON (the reference)."""
    data = json.loads(Path(json_path).read_text())
    n_sent = sum(len(im["sentences"]) for im in data["images"])
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((len(data["images"]), image_dim)).astype(np.float32)
    txt = rng.standard_normal((n_sent, text_dim)).astype(np.float32)
    np.save(tmp_path / "img.npy", img)
    np.save(tmp_path / "txt.npy", txt)
    return data, img, txt


def test_flickr_rows_ids_and_splits_follow_the_json(tmp_path):
    data, img, txt = _features(tmp_path, FLICKR)
    c = load_karpathy_json(FLICKR, tmp_path / "img.npy", tmp_path / "txt.npy", normalize=False)
    assert c.name == "flickr30k" and not c.synthetic
    assert [im.id for im in c.images] == [im["filename"][:-4] for im in data["images"]]
    assert [im.split for im in c.images] == [im["split"] for im in data["images"]]
    assert [im.path for im in c.images] == [im["filename"] for im in data["images"]]
    expected = [(s["raw"], im["split"], (im["filename"][:-4],)) for im in data["images"] for s in im["sentences"]]
    assert [(q.text, q.split, q.image_ids) for q in c.queries] == expected
    np.testing.assert_array_equal(c.image_features, img)
    np.testing.assert_array_equal(c.text_features, txt)
    assert c.image_rows("test").tolist() == [3, 4] and c.query_rows("test").size == 10
    back = Corpus.load(c.save(tmp_path / "corpus"))
    assert back.images == c.images and back.queries == c.queries
    np.testing.assert_array_equal(back.image_features, img)


def test_coco_restval_goes_to_train_ids_are_cocoids_and_features_normalised(tmp_path):
    data, img, txt = _features(tmp_path, COCO)
    c = load_karpathy_json(COCO, tmp_path / "img.npy", tmp_path / "txt.npy", image_root=tmp_path)
    assert [im.id for im in c.images] == [str(im["cocoid"]) for im in data["images"]]
    assert [im.split for im in c.images] == ["test", "train", "train", "val", "train"]
    assert c.images[0].path == "val2014/COCO_val2014_000000391895.jpg"
    assert c.metadata["image_root"] == str(tmp_path.resolve())
    np.testing.assert_allclose(c.image_features, img / np.linalg.norm(img, axis=1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(c.text_features, txt / np.linalg.norm(txt, axis=1, keepdims=True), rtol=1e-6)
    assert c.num_queries == 26 and c.image_features.dtype == np.float32


def test_restval_can_be_kept_out_of_training_and_tokens_field(tmp_path):
    c = load_karpathy_json(COCO, restval_split="val", text_field="tokens")
    assert [im.split for im in c.images] == ["test", "val", "train", "val", "val"]
    assert c.queries[0].text == "a man with a red helmet on a small moped on a dirt road"
    assert c.image_features.shape == (5, 0) and c.text_features is None  # extract fills these in


def test_standard_test_split_sizes_from_a_generated_file(tmp_path):
    """A file in the distributed structure with Flickr30K's 1K test images yields exactly that split."""
    split_sizes = {"train": 40, "val": 20, "test": 1000}
    images, n = [], 0
    for split, count in split_sizes.items():
        for _ in range(count):
            images.append({"filename": f"{n}.jpg", "imgid": n, "split": split, "sentids": list(range(5 * n, 5 * n + 5)),
                           "sentences": [{"raw": f"caption {k} of {n}", "tokens": ["caption"]} for k in range(5)]})
            n += 1
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    c = load_karpathy_json(path)
    assert c.image_rows("test").size == 1000 and c.query_rows("test").size == 5000
    assert c.image_rows("train").size == 40 and c.image_rows("val").size == 20


def _mutated(tmp_path, mutate):
    data = json.loads(COCO.read_text())
    mutate(data)
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["images"][1].update(split="dev"), r"images\[1\]: field 'split': unknown split 'dev'"),
    (lambda d: d["images"][2].pop("filename"), r"images\[2\]: field 'filename' must be a non-empty string"),
    (lambda d: d["images"][0]["sentences"][3].update(raw="   "),
     r"images\[0\].sentences\[3\]: field 'raw' is empty or whitespace-only"),
    (lambda d: d["images"][0]["sentences"][1].pop("raw"), r"images\[0\].sentences\[1\]: field 'raw' must be a string"),
    (lambda d: d["images"][4].update(cocoid=391895),
     r"images\[4\]: duplicate image id '391895' \(first at images\[0\]\)"),
    (lambda d: d["images"][3].update(sentences="a dog"), r"images\[3\]: field 'sentences' is not a list"),
    (lambda d: d.pop("images"), "expected an object with an 'images' list"),
])
def test_bad_json_records_name_file_field_and_value(tmp_path, mutate, message):
    _features(tmp_path, COCO)
    path = _mutated(tmp_path, mutate)
    with pytest.raises(CorpusError, match=message) as err:
        load_karpathy_json(path, tmp_path / "img.npy", tmp_path / "txt.npy")
    assert str(path) in str(err.value)


@pytest.mark.parametrize("which, array, message", [
    ("img", np.zeros((4, 8), np.float32), r"img.npy: has 4 rows but .* 'images' has 5 records"),
    ("txt", np.zeros((27, 4), np.float32), r"txt.npy: has 27 rows but .* sentences has 26 records"),
    ("img", np.zeros((5, 8), np.int64), "img.npy: features must be floating point, got dtype int64"),
    ("txt", np.zeros((26,), np.float32), "txt.npy: features must be a 2-D array"),
    ("img", np.array([[1.0] * 8] * 2 + [[np.nan] * 8] + [[1.0] * 8] * 2, np.float32),
     r"img.npy row 2: NaN/inf in the feature row of image '318556'"),
    ("txt", np.array([[1.0] * 4] * 7 + [[np.inf] * 4] + [[1.0] * 4] * 18, np.float32),
     r"txt.npy row 7: NaN/inf in the feature row of sentence .*images\[1\].sentences\[2\]"),
])
def test_bad_feature_files(tmp_path, which, array, message):
    _features(tmp_path, COCO)
    np.save(tmp_path / f"{which}.npy", array)
    with pytest.raises(CorpusError, match=message):
        load_karpathy_json(COCO, tmp_path / "img.npy", tmp_path / "txt.npy")


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="Karpathy JSON not found"):
        load_karpathy_json(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match=r"feature file missing: .*absent\.npy"):
        load_karpathy_json(COCO, tmp_path / "absent.npy")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(CorpusError, match=r"broken\.json: not valid JSON"):
        load_karpathy_json(tmp_path / "broken.json")


def test_skip_bad_records_reports_and_keeps_rows_aligned(tmp_path, capsys):
    data, img, txt = _features(tmp_path, COCO)
    bad_img = img.copy()
    bad_img[3] = np.nan  # image 3 (val) is dropped with its 5 sentences
    np.save(tmp_path / "img.npy", bad_img)

    def mutate(d):
        d["images"][1]["split"] = "dev"  # dropped with its 5 sentences
        d["images"][2]["sentences"][0]["raw"] = ""  # only this sentence dropped

    path = _mutated(tmp_path, mutate)
    c = load_karpathy_json(path, tmp_path / "img.npy", tmp_path / "txt.npy", normalize=False, skip_bad_records=True)
    assert [im.id for im in c.images] == ["391895", "318556", "60623"]
    np.testing.assert_array_equal(c.image_features, img[[0, 2, 4]])
    kept_rows = [0, 1, 2, 3, 4, *range(11, 16), *range(21, 26)]  # image 2 has 6 sentences: rows 10-15
    np.testing.assert_array_equal(c.text_features, txt[kept_rows])
    assert [q.text for q in c.queries][5] == data["images"][2]["sentences"][1]["raw"]
    assert c.metadata["skipped_records"] == 3
    out = capsys.readouterr().out
    assert "skipped 3 bad record(s)" in out and "unknown split 'dev'" in out and "row 3: NaN/inf" in out

