"""Generic JSONL + image folder source: round trip, row order, bad records."""

import json

import numpy as np
import pytest
from PIL import Image

from avg_jax.data.corpus import Corpus, CorpusError
from avg_jax.data.jsonl_folder import load_jsonl_folder

LINES = [
    {"image": "photos/beach.jpg", "split": "train", "captions": ["a sunny beach", "waves on sand"]},
    {"image": "photos/dog.png", "split": "test", "caption": "a dog on grass", "id": "dog-1"},
    {"image": "cat.jpg", "split": "val", "captions": []},
    {"image": "photos/city.jpg", "split": "train", "captions": ["a city at night", "tall buildings", "lights"]},
]


def _write(tmp_path, lines=LINES, make_images=True):
    root = tmp_path / "images"
    for line in lines:
        if make_images and str(line.get("image")).endswith((".jpg", ".png")) and line["image"][0] != "/":
            (root / line["image"]).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (4, 4), (10, 20, 30)).save(root / line["image"])
    root.mkdir(exist_ok=True)
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path, root


def test_round_trip_with_documented_row_order(tmp_path):
    path, root = _write(tmp_path)
    rng = np.random.default_rng(0)
    img, txt = rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal((6, 3)).astype(np.float32)
    np.save(tmp_path / "img.npy", img)
    np.save(tmp_path / "txt.npy", txt)
    c = load_jsonl_folder(path, root, tmp_path / "img.npy", tmp_path / "txt.npy", normalize=False)
    assert [im.id for im in c.images] == ["photos/beach", "dog-1", "cat", "photos/city"]
    assert [im.split for im in c.images] == ["train", "test", "val", "train"]
    assert [im.path for im in c.images] == [line["image"] for line in LINES]
    expected = [("a sunny beach", "photos/beach"), ("waves on sand", "photos/beach"), ("a dog on grass", "dog-1"),
                ("a city at night", "photos/city"), ("tall buildings", "photos/city"), ("lights", "photos/city")]
    assert [(q.text, q.image_ids[0]) for q in c.queries] == expected
    np.testing.assert_array_equal(c.image_features, img)
    np.testing.assert_array_equal(c.text_features, txt)
    assert c.metadata["image_root"] == str(root.resolve())
    back = Corpus.load(c.save(tmp_path / "corpus"))
    assert back.images == c.images and back.queries == c.queries


def test_without_features_gives_zero_width_rows(tmp_path):
    path, root = _write(tmp_path)
    c = load_jsonl_folder(path, root)
    assert c.image_features.shape == (4, 0) and c.text_features is None


@pytest.mark.parametrize("line, message", [
    ({"image": "a.jpg", "split": "dev", "captions": ["x"]}, "line 5: field 'split': unknown split 'dev'"),
    ({"image": "", "split": "train", "captions": ["x"]}, "line 5: field 'image' must be a non-empty"),
    ({"image": "/etc/a.jpg", "split": "train", "captions": ["x"]}, "line 5: field 'image' must be relative"),
    ({"image": "a.jpg", "split": "train"}, "line 5: missing field 'captions'"),
    ({"image": "a.jpg", "split": "train", "captions": [" "]}, "line 5: caption 0 is empty or whitespace-only"),
    ({"image": "a.jpg", "split": "train", "captions": "x"}, "line 5: field 'captions' must be a string / list"),
    ({"image": "a.jpg", "split": "train", "captions": ["x"], "id": "dog-1"},
     "line 5: field 'id': duplicate image id 'dog-1' \\(first on line 2\\)"),
])
def test_bad_records_name_file_line_field_and_value(tmp_path, line, message):
    path, root = _write(tmp_path, [*LINES, line])
    with pytest.raises(CorpusError, match=message):
        load_jsonl_folder(path, root)


def test_missing_image_file_and_missing_inputs(tmp_path):
    path, root = _write(tmp_path)
    (root / "cat.jpg").unlink()
    with pytest.raises(CorpusError, match=r"line 3: field 'image': file .*cat\.jpg does not exist"):
        load_jsonl_folder(path, root)
    assert load_jsonl_folder(path, root, check_images_exist=False).num_images == 4
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        load_jsonl_folder(path, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="records file not found"):
        load_jsonl_folder(tmp_path / "none.jsonl", root)
    np.save(tmp_path / "img.npy", np.zeros((3, 2), np.float32))
    with pytest.raises(CorpusError, match=r"img\.npy: has 3 rows but .*records\.jsonl has 4 records"):
        load_jsonl_folder(path, root, tmp_path / "img.npy")


def test_uncountable_captions_with_text_features_is_fatal_even_when_skipping(tmp_path):
    path, root = _write(tmp_path, [*LINES[:1], {"image": "x.jpg", "split": "train", "captions": {"a": 1}}])
    np.save(tmp_path / "txt.npy", np.zeros((3, 2), np.float32))
    with pytest.raises(CorpusError, match="line 2: captions are not a string or list of strings"):
        load_jsonl_folder(path, root, text_features=tmp_path / "txt.npy", skip_bad_records=True)


def test_skip_bad_records_keeps_rows_aligned(tmp_path, capsys):
    lines = [LINES[0], {"image": "b.jpg", "split": "nope", "captions": ["p", "q"]}, LINES[3],
             {"image": "d.jpg", "split": "test", "captions": ["", "ok"]}]
    path, root = _write(tmp_path, lines)
    img = np.arange(8, dtype=np.float32).reshape(4, 2) + 1
    txt = np.arange(18, dtype=np.float32).reshape(9, 2) + 1
    np.save(tmp_path / "img.npy", img)
    np.save(tmp_path / "txt.npy", txt)
    c = load_jsonl_folder(path, root, tmp_path / "img.npy", tmp_path / "txt.npy", normalize=False,
                          skip_bad_records=True)
    assert [im.id for im in c.images] == ["photos/beach", "photos/city", "d"]
    np.testing.assert_array_equal(c.image_features, img[[0, 2, 3]])
    np.testing.assert_array_equal(c.text_features, txt[[0, 1, 4, 5, 6, 8]])
    assert [q.text for q in c.queries][-1] == "ok"
    assert c.metadata["skipped_records"] == 2
    out = capsys.readouterr().out
    assert "skipped 2 bad record(s)" in out and "line 2" in out and "line 4: caption 0" in out


def test_all_records_bad_is_an_error_not_an_empty_corpus(tmp_path):
    path, root = _write(tmp_path, [{"image": "a.jpg", "split": "dev", "captions": ["x"]}])
    np.save(tmp_path / "img.npy", np.ones((1, 3), np.float32))
    with pytest.raises(CorpusError, match=r"records\.jsonl: no valid image records \(1 skipped\)"):
        load_jsonl_folder(path, root, tmp_path / "img.npy", skip_bad_records=True)
