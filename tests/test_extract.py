"""Feature extraction: hf-clip against a direct transformers forward pass, the fallback, the CLI, errors."""

import json

import numpy as np
import pytest
from PIL import Image

from avg_jax import cli
from avg_jax.data.corpus import Corpus, CorpusError
from avg_jax.data.extract import ThumbnailExtractor, extract_corpus_features, make_extractor
from avg_jax.data.jsonl_folder import load_jsonl_folder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CAPTIONS = [["a red square on a white wall"], ["two dogs", "a dog and another dog playing in the park at noon"],
            [], ["a very long caption " + "word " * 60], ["x"]]


def _byte_vocab():
    """CLIP's byte-to-unicode alphabet, each symbol also as a word end: a complete vocabulary without merges."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable + [256 + i for i in range(256 - len(printable))]
    symbols = [chr(c) for c in codes]
    words = [*symbols, *[s + "</w>" for s in symbols], "<|startoftext|>", "<|endoftext|>"]
    return {w: i for i, w in enumerate(words)}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised tiny CLIP with its processor files, saved like a hub checkpoint (no downloads)."""
    d = tmp_path_factory.mktemp("tiny_clip")
    vocab = _byte_vocab()
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 30},
                                                      crop_size={"height": 30, "width": 30})
    transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(d)
    end = vocab["<|endoftext|>"]
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=40, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=end, pad_token_id=end),
        vision_config=dict(image_size=30, patch_size=6, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(d)
    return d


@pytest.fixture()
def image_corpus(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    root.mkdir()
    lines = []
    for i, captions in enumerate(CAPTIONS):
        size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / f"im{i}.png")
        lines.append({"image": f"im{i}.png", "split": "test" if i == 4 else "train", "captions": captions})
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    corpus = load_jsonl_folder(tmp_path / "records.jsonl", root)
    return corpus.save(tmp_path / "corpus")


def test_hf_clip_matches_a_direct_transformers_forward(tiny_clip, image_corpus, tmp_path):
    rc = cli.main(["data", "extract", str(image_corpus), "--extractor", "hf-clip", "--model_path", str(tiny_clip),
                   "--batch_size", "2", "--no_progress"])
    assert rc == 0
    c = Corpus.load(image_corpus)
    assert c.image_features.dtype == np.float32 and c.image_features.shape == (5, 16)
    assert c.text_features.shape == (5, 16)
    # reference: one example at a time through CLIPModel.forward, which returns normalised embeddings
    model = transformers.CLIPModel.from_pretrained(tiny_clip).eval()
    processor = transformers.CLIPProcessor.from_pretrained(tiny_clip)
    for i, im in enumerate(c.images):
        pixels = processor(images=[Image.open(tmp_path / "images" / im.path).convert("RGB")],
                           return_tensors="pt")["pixel_values"]
        text = processor.tokenizer(["anything"], return_tensors="pt")
        with torch.no_grad():
            ref = model(pixel_values=pixels, **text).image_embeds[0].numpy()
        np.testing.assert_allclose(c.image_features[i], ref, atol=2e-5)
    for j, q in enumerate(c.queries):
        text = processor.tokenizer([q.text], truncation=True, max_length=40, return_tensors="pt")
        pixels = torch.zeros(1, 3, 30, 30)
        with torch.no_grad():
            ref = model(pixel_values=pixels, **text).text_embeds[0].numpy()
        np.testing.assert_allclose(c.text_features[j], ref, atol=2e-5)
    assert c.metadata["image_features_from"]["extractor"] == "hf-clip"
    assert (image_corpus / "operative_config.gin").exists()


def test_text_only_extraction_into_another_directory(tiny_clip, image_corpus, tmp_path):
    out = tmp_path / "elsewhere"
    assert cli.main(["data", "extract", str(image_corpus), "--only", "texts", "--out", str(out), "--extractor",
                     "thumbnail", "--no_progress", "--gin_param", "ThumbnailExtractor.text_dim = 64"]) == 0
    c = Corpus.load(out)
    assert c.image_features.shape == (5, 0) and c.text_features.shape == (5, 64)
    np.testing.assert_allclose(np.linalg.norm(c.text_features, axis=1), 1.0, rtol=1e-6)
    assert "ThumbnailExtractor.text_dim = 64" in (out / "operative_config.gin").read_text()


def test_thumbnail_features_follow_their_definition(image_corpus):
    c = Corpus.load(image_corpus)
    feats = extract_corpus_features(c, ThumbnailExtractor(image_size=3, text_dim=8), image_corpus, progress=False)
    pic = np.asarray(Image.open(image_corpus.parent / "images" / "im1.png").resize((3, 3), Image.Resampling.BILINEAR),
                     np.float64).ravel() / 255
    pic -= pic.mean()
    np.testing.assert_allclose(feats.image_features[1], pic / np.linalg.norm(pic), atol=1e-6)
    # "x" alone: one hashed coordinate, +-1
    assert np.count_nonzero(feats.text_features[-1]) == 1 and np.abs(feats.text_features[-1]).max() == 1


def test_extraction_errors_name_the_file(tiny_clip, image_corpus, tmp_path):
    (tmp_path / "images" / "im3.png").unlink()
    c = Corpus.load(image_corpus)
    with pytest.raises(CorpusError, match=r"im3\.png: image file of image 'im3' does not exist"):
        extract_corpus_features(c, ThumbnailExtractor(), image_corpus, progress=False)
    (tmp_path / "images" / "im3.png").write_text("not an image")
    with pytest.raises(CorpusError, match=r"im3\.png: cannot read image 'im3'"):
        extract_corpus_features(c, ThumbnailExtractor(), image_corpus, progress=False)
    with pytest.raises(FileNotFoundError, match="no HuggingFace checkpoint at"):
        make_extractor("hf-clip", model_path=tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"extractor 'thumbnail' takes no option\(s\) \['model_path'\]"):
        make_extractor("thumbnail", model_path=str(tiny_clip))
    with pytest.raises(ValueError, match="unknown extractor 'resnet'"):
        make_extractor("resnet")
