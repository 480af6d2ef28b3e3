"""TFDS coco_captions adapter, offline through tfds.testing.mock_data (random content, real schema)."""

import numpy as np
import pytest
from PIL import Image

from avg_jax.data.corpus import Corpus, CorpusError

tfds = pytest.importorskip("tensorflow_datasets")

from avg_jax.data.extract import ThumbnailExtractor, extract_corpus_features  # noqa: E402
from avg_jax.data.tfds_coco import load_tfds_coco_captions  # noqa: E402


def _reference(split):
    """The mock examples read straight through tfds: the independent reference."""
    ds = tfds.load("coco_captions", split=split, shuffle_files=False)
    return [(str(int(ex["image/id"])), ex["image"], [t.decode() for t in ex["captions"]["text"]])
            for ex in tfds.as_numpy(ds)]


def test_one_split_round_trips_with_lossless_images(tmp_path):
    with tfds.testing.mock_data(num_examples=4):
        ref = _reference("test")
        c = load_tfds_coco_captions(tmp_path / "images", splits={"test": "test"}, image_format="png")
    assert [im.id for im in c.images] == [r[0] for r in ref]
    assert {im.split for im in c.images} == {"test"}
    expected = [(t.strip(), (i,)) for i, _, caps in ref for t in caps]
    assert [(q.text, q.image_ids) for q in c.queries] == expected
    for im, (_, pixels, _) in zip(c.images, ref, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "images" / im.path)), pixels)
    assert c.image_features.shape == (4, 0) and c.metadata["image_root"] == str((tmp_path / "images").resolve())
    back = Corpus.load(c.save(tmp_path / "corpus"))
    assert back.images == c.images and back.queries == c.queries
    # the written image folder is what the extractors read
    feats = extract_corpus_features(back, ThumbnailExtractor(image_size=4, text_dim=32), tmp_path / "corpus",
                                    progress=False)
    assert feats.image_features.shape == (4, 48) and feats.text_features.shape == (len(expected), 32)


def test_duplicate_ids_across_splits_are_named(tmp_path):
    # mock_data serves the same random examples for every split, so the default
    # mapping (train, restval, val, test) repeats every image id
    with tfds.testing.mock_data(num_examples=3), pytest.raises(
            CorpusError, match=r"split 'restval' example 0: field 'image/id': duplicate image id '\d+' "
                               r"\(first in split 'train'\)"):
        load_tfds_coco_captions(tmp_path / "images")


def test_skip_bad_records_keeps_first_copy_and_reports(tmp_path, capsys):
    with tfds.testing.mock_data(num_examples=3):
        ref = _reference("train")
        c = load_tfds_coco_captions(tmp_path / "images", max_images_per_split=2, skip_bad_records=True)
    assert [im.id for im in c.images] == [r[0] for r in ref[:2]]
    assert {im.split for im in c.images} == {"train"}
    assert c.metadata["skipped_records"] == 6  # 2 images x (restval, val, test)
    assert "skipped 6 bad record(s)" in capsys.readouterr().out


def test_unprepared_dataset_and_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="coco_captions is not prepared"):
        load_tfds_coco_captions(tmp_path / "images", data_dir=tmp_path / "tfds")
    with pytest.raises(ValueError, match=r"splits\['restval'\]: unknown corpus split 'extra'"):
        load_tfds_coco_captions(tmp_path / "images", splits={"restval": "extra"})
    with pytest.raises(ValueError, match="image_format must be one of"):
        load_tfds_coco_captions(tmp_path / "images", image_format="gif")


def test_convert_tfds_cli(tmp_path):
    from avg_jax import cli

    with tfds.testing.mock_data(num_examples=2):
        rc = cli.main(["data", "convert-tfds", "--image_dir", str(tmp_path / "images"), "--out", str(tmp_path / "c"),
                       "--gin_param", "load_tfds_coco_captions.splits = {'val': 'val'}"])
    assert rc == 0
    c = Corpus.load(tmp_path / "c")
    assert c.num_images == 2 and {im.split for im in c.images} == {"val"}
    assert "load_tfds_coco_captions.splits" in (tmp_path / "c" / "operative_config.gin").read_text()
