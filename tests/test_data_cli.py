"""`avg-jax data convert-*`: corpus directory + operative gin config, clean errors, skip reporting."""

import json
from pathlib import Path

import numpy as np

from avg_jax import cli
from avg_jax.data.corpus import Corpus

COCO = Path(__file__).parent / "fixtures" / "dataset_coco_mini.json"


def test_convert_karpathy_writes_corpus_and_operative_config(tmp_path, capsys):
    img = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    np.save(tmp_path / "img.npy", img)
    out = tmp_path / "coco"
    rc = cli.main(["data", "convert-karpathy", "--json", str(COCO), "--image_features", str(tmp_path / "img.npy"),
                   "--out", str(out), "--gin_param", "load_karpathy_json.normalize = False"])
    assert rc == 0
    c = Corpus.load(out)
    np.testing.assert_array_equal(c.image_features, img)
    assert c.num_queries == 26 and c.text_features is None
    assert "load_karpathy_json.normalize = False" in (out / "operative_config.gin").read_text()
    assert "wrote corpus 'coco'" in capsys.readouterr().out
    assert cli.main(["data", "inspect", str(out)]) == 0


def test_convert_reports_bad_source_cleanly_and_skips_on_request(tmp_path, capsys):
    data = json.loads(COCO.read_text())
    data["images"][2]["split"] = "holdout"
    bad = tmp_path / "dataset_coco.json"
    bad.write_text(json.dumps(data))
    assert cli.main(["data", "convert-karpathy", "--json", str(bad), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert f"{bad} images[2]: field 'split': unknown split 'holdout'" in err and "Traceback" not in err
    assert cli.main(["data", "convert-karpathy", "--json", str(bad), "--out", str(tmp_path / "b"),
                     "--skip_bad_records"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 bad record(s)" in out and "no image features yet" in out
    c = Corpus.load(tmp_path / "b")
    assert c.num_images == 4 and c.metadata["skipped_records"] == 1
    assert cli.main(["data", "inspect", str(tmp_path / "b")]) == 0
    assert "no image features yet" in capsys.readouterr().out


def test_convert_jsonl_with_one_shot_extraction(tmp_path):
    from PIL import Image

    root = tmp_path / "pics"
    root.mkdir()
    lines = []
    for i in range(3):
        Image.new("RGB", (8 + i, 8), (40 * i, 10, 200)).save(root / f"{i}.png")
        lines.append({"image": f"{i}.png", "split": "train", "captions": [f"picture number {i}", "a picture"]})
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "mine"
    assert cli.main(["data", "convert-jsonl", "--records", str(tmp_path / "r.jsonl"), "--image_root", str(root),
                     "--out", str(out), "--extractor", "thumbnail", "--no_progress"]) == 0
    c = Corpus.load(out)
    assert c.image_features.shape == (3, 16 * 16 * 3) and c.text_features.shape == (6, 512)
    assert c.metadata["image_features_from"]["extractor"] == "thumbnail"
    assert (out / "operative_config.gin").exists()
