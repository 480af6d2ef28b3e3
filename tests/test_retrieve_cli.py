"""`avg-jax retrieve` on a tiny checkpoint, against brute-force teacher-forced scoring of every identifier."""

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_table import NUM_NEW, M, tiny_vocab_and_table

from avg_jax import cli
from avg_jax.data.vocab import Vocabulary, pad_vocab_size
from avg_jax.retrieval.model import RetrievalModel
from avg_jax.t5.configs import named_t5_config
from avg_jax.t5.model import T5, init_params

QUERIES = ["a red car on a street", "two dogs playing", "a bowl of fruit"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(dir, table, params, config, vocab): random tiny T5, 12 images, two of them sharing an identifier."""
    root = tmp_path_factory.mktemp("retrieval")
    spm, text_size, table = tiny_vocab_and_table(root)
    config = named_t5_config("tiny", vocab_size=pad_vocab_size(text_size + NUM_NEW))
    params = jax.device_get(init_params(config, jax.random.key(0)))
    model = RetrievalModel(config, Vocabulary(spm, num_new=NUM_NEW), window=(text_size, config.vocab_size - text_size),
                           input_length=32, target_length=M)
    model.save_checkpoint(root / "ckpt", params, table)
    return root / "ckpt", table, params, config, Vocabulary(spm, num_new=NUM_NEW)


@functools.partial(jax.jit, static_argnums=0)
def _teacher_forced(config, params, ids, decoder_in, targets):
    logp = jax.nn.log_softmax(T5(config).apply({"params": params}, ids, decoder_in), -1)
    return jnp.take_along_axis(logp, targets[..., None], -1)[..., 0].sum(-1)


def brute_force(text, table, params, config, vocab, k):
    """Every distinct identifier scored by teacher forcing (full softmax), images expanded in table order."""
    groups = table.groups()
    idents = list(groups)
    targets = jnp.asarray(idents, jnp.int32)
    decoder_in = jnp.concatenate([jnp.zeros((len(idents), 1), jnp.int32), targets[:, :-1]], axis=1)
    ids = jnp.asarray([vocab.encode(text)] * len(idents), jnp.int32)
    scores = np.asarray(_teacher_forced(config, params, ids, decoder_in, targets))
    ranked = []
    for j in np.argsort(-scores, kind="stable"):
        ranked.extend((image, float(scores[j])) for image in groups[idents[j]])
    return ranked[:k]


def test_single_query_matches_brute_force(checkpoint, capsys):
    ckpt, table, params, config, vocab = checkpoint
    assert cli.main(["retrieve", "--checkpoint", str(ckpt), "--query", QUERIES[0], "--k", "7",
                     "--gin_param", "BeamSearchOptions.beam_size = 16"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    expected = brute_force(QUERIES[0], table, params, config, vocab, 7)
    assert [int(r) for r, _, _ in lines] == list(range(1, 8))
    assert [i for _, i, _ in lines] == [i for i, _ in expected]
    np.testing.assert_allclose([float(s) for _, _, s in lines], [s for _, s in expected], atol=1e-5)


def test_batch_mode_writes_eval_jsonl(checkpoint, tmp_path):
    ckpt, table, params, config, vocab = checkpoint
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"query_row": i, "text": t}) + "\n" for i, t in enumerate(QUERIES)))
    out = tmp_path / "run" / "ranked.jsonl"
    assert cli.main(["retrieve", "--checkpoint", str(ckpt), "--queries", str(queries), "--k", "12",
                     "--out", str(out), "--batch_size", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["query_row"] for r in rows] == [0, 1, 2] and [r["text"] for r in rows] == QUERIES
    for r in rows:  # beam 20 > 11 identifiers: the exhaustive ranking of all 12 images
        expected = brute_force(r["text"], table, params, config, vocab, 12)
        assert r["image_ids"] == [i for i, _ in expected]
        np.testing.assert_allclose(r["scores"], [s for _, s in expected], atol=1e-5)
        assert len(r["identifiers"]) == 11 and all(len(i) == M for i in r["identifiers"])
        assert r["image_ids"].index("img5") == r["image_ids"].index("img4") + 1  # shared: table order
    assert (out.parent / "operative_config.gin").exists()
    plain = tmp_path / "q.txt"
    plain.write_text("\n".join(QUERIES) + "\n")
    out2 = tmp_path / "run2" / "ranked.jsonl"
    assert cli.main(["retrieve", "--checkpoint", str(ckpt), "--queries", str(plain), "--k", "12",
                     "--out", str(out2)]) == 0
    assert [json.loads(line)["image_ids"] for line in out2.read_text().splitlines()] == [r["image_ids"]
                                                                                           for r in rows]


def test_errors_name_the_problem(checkpoint, tmp_path, capsys):
    ckpt = checkpoint[0]
    assert cli.main(["retrieve", "--checkpoint", str(tmp_path / "nope"), "--query", "x"]) == 2
    assert "retrieval checkpoint directory not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"query": "no text field"}\n')
    assert cli.main(["retrieve", "--checkpoint", str(ckpt), "--queries", str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert cli.main(["retrieve", "--checkpoint", str(ckpt), "--query", "  "]) == 2
    assert "empty query" in capsys.readouterr().err


def test_rerank_with_query_features(checkpoint, tmp_path, capsys):
    """--query_features: the beam's images reordered by generative score + weight * cosine / temperature with
    the checkpoint's heads.npz towers (numpy brute force); clear errors on rows, dims and missing heads."""
    import shutil

    from avg_jax.retrieval.model import RerankConfig, TextHead, save_heads

    ckpt, table = checkpoint[0], checkpoint[1]
    rng = np.random.default_rng(3)
    head = {"hidden": {"kernel": rng.normal(size=(5, 6)), "bias": rng.normal(size=6)},
            "out": {"kernel": rng.normal(size=(6, 4)), "bias": rng.normal(size=4)}}
    images = rng.normal(size=(12, 4)).astype(np.float32)
    features = rng.normal(size=(len(QUERIES), 5)).astype(np.float32)
    np.save(tmp_path / "features.npy", features)
    (tmp_path / "q.txt").write_text("\n".join(QUERIES) + "\n")
    bare = tmp_path / "bare"
    shutil.copytree(ckpt, bare)
    assert cli.main(["retrieve", "--checkpoint", str(bare), "--queries", str(tmp_path / "q.txt"), "--query_features",
                  str(tmp_path / "features.npy")]) == 2
    assert re.search("heads.npz", capsys.readouterr().err)
    rerank_ckpt = tmp_path / "ckpt"
    shutil.copytree(ckpt, rerank_ckpt)
    save_heads(rerank_ckpt, table.image_ids, images, TextHead.arrays(head, True), RerankConfig(0.0, 1.0))
    base = ["retrieve", "--checkpoint", str(rerank_ckpt), "--queries", str(tmp_path / "q.txt"), "--k", "12",
            "--beam_size", "12"]
    assert cli.main([*base, "--out", str(tmp_path / "plain.jsonl")]) == 0
    assert cli.main([*base, "--out", str(tmp_path / "fused.jsonl"), "--query_features", str(tmp_path / "features.npy"),
                     "--rerank_weight", "2.0", "--rerank_temperature", "0.5"]) == 0
    plain = [json.loads(line) for line in (tmp_path / "plain.jsonl").read_text().splitlines()]
    fused = [json.loads(line) for line in (tmp_path / "fused.jsonl").read_text().splitlines()]

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    hidden = np.asarray(jax.nn.gelu(features @ head["hidden"]["kernel"] + head["hidden"]["bias"]))
    queries = unit(hidden @ head["out"]["kernel"] + head["out"]["bias"])
    image_vec = dict(zip(table.image_ids, unit(images), strict=True))
    for q, (p, f) in enumerate(zip(plain, fused, strict=True)):
        want = sorted(zip(p["image_ids"], p["scores"], strict=True),
                      key=lambda x: -(x[1] + 4.0 * float(image_vec[x[0]] @ queries[q])))
        assert f["image_ids"] == [i for i, _ in want]
        assert f["identifiers"] == p["identifiers"]
    np.save(tmp_path / "short.npy", features[:2])
    assert cli.main([*base, "--query_features", str(tmp_path / "short.npy"), "--rerank_weight", "1"]) == 2
    assert re.search(r"one row per query", capsys.readouterr().err)
    np.save(tmp_path / "wide.npy", np.ones((3, 7), np.float32))
    assert cli.main([*base, "--query_features", str(tmp_path / "wide.npy"), "--rerank_weight", "1"]) == 2
    assert re.search("text head expects 5", capsys.readouterr().err)
    assert cli.main([*base, "--query_features", str(tmp_path / "features.npy")]) == 2
    assert re.search("rerank and prior weights are 0", capsys.readouterr().err)
    assert cli.main([*base, "--rerank_weight", "1"]) == 2
    assert re.search("need --query_features", capsys.readouterr().err)
    assert cli.main([*base, "--prior_weight", "1"]) == 2
    assert re.search("need --query_features", capsys.readouterr().err)
    # heads.npz saved without voken vectors: the prior is refused by name
    assert cli.main([*base, "--query_features", str(tmp_path / "features.npy"), "--prior_weight", "1"]) == 2
    assert re.search("no voken_vectors", capsys.readouterr().err)
