"""The no-T5 diagnostic ceilings (avg_jax.evaluation.ceiling) against a numpy brute force on a tiny tokenizer."""

import json

import numpy as np
import pytest

from avg_jax.evaluation import ceiling, metrics
from avg_jax.tokenizer.model import RQTokenizerConfig, init_params
from avg_jax.tokenizer.train import TrainedTokenizer, load_tokenizer, save_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_corpus, tmp_path_factory):
    config = RQTokenizerConfig(code_dim=8, codebook_size=3, num_levels=3, decoder_hidden_dim=8)
    params = init_params(config, tiny_corpus.image_features.shape[1], tiny_corpus.text_features.shape[1], seed=3)
    tok = TrainedTokenizer(config, params, tiny_corpus.image_features.shape[1], tiny_corpus.text_features.shape[1])
    return save_tokenizer(tok, tmp_path_factory.mktemp("tok")), params, config


def _numpy_tokenizer(params, config, text, image):
    def head(p, x):
        y = x @ np.asarray(p["out"]["kernel"]) + np.asarray(p["out"]["bias"])
        return y / np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), 1e-12)

    def rq(z):
        book = np.asarray(params["codebooks"][0], np.float64)
        r, codes = z.astype(np.float64), []
        for _ in range(config.num_levels):
            idx = np.argmin(((r[:, None, :] - book[None]) ** 2).sum(-1), axis=1)
            codes.append(idx)
            r = r - book[idx]
        return np.stack(codes, 1), z - r

    v_t = head(params["text_head"], text.astype(np.float64))
    codes_i, z_q = rq(head(params["image_head"], image.astype(np.float64)))
    codes_t, _ = rq(v_t)
    return v_t, codes_t, codes_i, z_q


def test_ceilings_match_numpy_brute_force(tiny_corpus, tokenizer_dir):
    path, params, config = tokenizer_dir
    image_rows, query_rows = tiny_corpus.image_rows("test"), tiny_corpus.query_rows("test")
    image_ids = [tiny_corpus.images[i].id for i in image_rows]
    relevant = [tiny_corpus.queries[j].image_ids for j in query_rows]
    v_t, codes_t, codes_i, z_q = _numpy_tokenizer(params, config, tiny_corpus.text_features[query_rows],
                                                  tiny_corpus.image_features[image_rows])
    score = v_t @ z_q.T
    prefix = np.zeros(score.shape, np.int64)
    for q in range(len(query_rows)):
        for i in range(len(image_rows)):
            n = 0
            while n < config.num_levels and codes_t[q, n] == codes_i[i, n]:
                n += 1
            prefix[q, i] = n
    assert 0 < prefix.max() and prefix.min() < config.num_levels  # the prefix key actually orders something
    keys = {"ceiling": lambda q, i: (round(score[q, i], 5),),
            "ceiling_codes": lambda q, i: (prefix[q, i], round(score[q, i], 5))}
    row_of = {image: i for i, image in enumerate(image_ids)}
    for mode in ceiling.MODES:
        got_metrics, got = ceiling.ceiling_diagnostic(tiny_corpus, load_tokenizer(path), "test", mode)
        assert len(got) == len(query_rows) and all(len(r) == 10 for r in got)
        for q, ranked in enumerate(got):
            # Same keys as the brute force's top 10, in order (images with equal codes tie: any order).
            want = sorted((keys[mode](q, i) for i in range(len(image_ids))), reverse=True)[:10]
            np.testing.assert_allclose([keys[mode](q, row_of[image]) for image in ranked], want, atol=2e-5,
                                       err_msg=f"{mode} query {q}")
        assert got_metrics == metrics.evaluate_images(got, relevant)


def test_shared_prefix_lengths_and_errors(tiny_corpus, tokenizer_dir):
    q = np.array([[1, 2, 3], [0, 0, 0]])
    i = np.array([[1, 2, 0], [1, 0, 3], [0, 0, 0], [2, 2, 3]])
    np.testing.assert_array_equal(ceiling.shared_prefix_lengths(q, i), [[2, 1, 0, 0], [0, 0, 3, 0]])
    with pytest.raises(ValueError, match="ceiling mode"):
        ceiling.ceiling_diagnostic(tiny_corpus, load_tokenizer(tokenizer_dir[0]), "test", "nope")


def test_eval_ceiling_cli_writes_the_rankings_eval_scores(tiny_corpus, tokenizer_dir, tmp_path, capsys):
    from avg_jax import cli

    corpus_dir = str(tiny_corpus.save(tmp_path / "c"))
    out = tmp_path / "ceil"
    assert cli.main(["eval-ceiling", "--corpus", corpus_dir, "--tokenizer", str(tokenizer_dir[0]), "--out",
                     str(out)]) == 0
    systems = json.loads((out / "metrics.json").read_text())["systems"]
    assert set(systems) == set(ceiling.MODES)
    for mode in ceiling.MODES:
        expected, ranked = ceiling.ceiling_diagnostic(tiny_corpus, load_tokenizer(tokenizer_dir[0]), "test", mode)
        lines = [json.loads(x) for x in (out / f"ranked_{mode}.jsonl").read_text().splitlines()]
        assert [r["query_row"] for r in lines] == list(tiny_corpus.query_rows("test"))
        assert [r["image_ids"] for r in lines] == ranked
        # The written ranking scored by `avg-jax eval` gives the metrics the command reported.
        assert cli.main(["eval", "--corpus", corpus_dir, "--ranked", f"{mode}={out / f'ranked_{mode}.jsonl'}",
                         "--out", str(tmp_path / mode)]) == 0
        scored = json.loads((tmp_path / mode / "metrics.json").read_text())["systems"][mode]
        assert scored == pytest.approx(systems[mode]) and systems[mode] == pytest.approx(expected)
    with pytest.raises(SystemExit):
        cli.main(["eval-ceiling", "--corpus", corpus_dir, "--tokenizer", str(tokenizer_dir[0]), "--mode", "nope",
                  "--out", str(out)])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
