"""`avg-jax demo` end to end at the reduced CI size (gin_configs/demo_ci.gin)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avg_jax import cli, demo
from avg_jax.data.corpus import Corpus
from avg_jax.evaluation import ceiling
from avg_jax.tokenizer.train import load_tokenizer


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert cli.main(["demo", "--out", str(out), "--gin_file", "demo_ci.gin"]) == 0
    return out


def _first_rank(ranked, relevant):
    return next((p for p, i in enumerate(ranked, start=1) if i in relevant), 0)


def test_demo_writes_every_output(demo_out):
    for name in [demo.REPORT_FILE, demo.METRICS_FILE, *demo.PLOTS.values()]:
        assert (demo_out / name).is_file(), name
    for stage in ("data", "tokenizer", "t5", "demo"):
        text = (demo_out / demo.CONFIG_DIR / f"{stage}.gin").read_text()
        assert "make_synthetic_corpus.num_images = 300" in text, stage
    assert "train_loop.num_steps = 20" in (demo_out / demo.CONFIG_DIR / "t5.gin").read_text()
    assert "run_demo.efficiency_sizes = (40, 200)" in (demo_out / demo.CONFIG_DIR / "demo.gin").read_text()
    for name in demo.PLOTS.values():
        with Image.open(demo_out / name) as im:
            im.verify()
        with Image.open(demo_out / name) as im:
            assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 300
    report = (demo_out / demo.REPORT_FILE).read_text()
    assert "SYNTHETIC" in report and "| ceiling, no T5" in report
    for name in demo.PLOTS.values():
        assert f"({name})" in report


def test_demo_metrics(demo_out):
    m = json.loads((demo_out / demo.METRICS_FILE).read_text())
    assert {"corpus", "identifiers", "t5", "avg", "dense", "chance", "beam_sweep", "examples", "efficiency",
            "wall_seconds"} <= set(m)
    ks = (1, 5, 10)
    for system in ("avg", "dense", "ceiling", "chance"):
        for key in [f"recall@{k}" for k in ks] + ["mrr@10"]:
            assert 0.0 <= m[system][key] <= 1.0, (system, key)
    for key in [f"identifier_recall@{k}" for k in ks] + ["collision_rate", "empty_rate"]:
        assert 0.0 <= m["avg"][key] <= 1.0, key
    for k in ks:  # recall is monotone in K
        assert m["avg"]["recall@1"] <= m["avg"][f"recall@{k}"] <= m["avg"]["recall@10"]
    assert m["corpus"]["num_test_queries"] == m["avg"]["num_queries"] == m["dense"]["num_queries"] == 80
    for beam in m["beam_sweep"]["beam_sizes"]:
        per_beam = m["beam_sweep"]["per_beam"][str(beam)]
        assert all(0.0 <= per_beam[f"recall@{k}"] <= 1.0 for k in ks if k <= beam)
        assert not any(f"recall@{k}" in per_beam for k in ks if k > beam)  # inapplicable: the paper's "-"
    eff = m["efficiency"]
    assert eff["sizes"] == [40, 200]
    assert all(eff[s][str(n)] > 0 for s in ("generative_qps", "dense_search_qps") for n in eff["sizes"])
    assert len(m["examples"]) == 2 and all(len(ex["avg"]) == 5 and len(ex["dense"]) == 5 for ex in m["examples"])
    # The no-T5 ceiling row is the tokenizer's (evaluation.ceiling, checked against numpy in test_ceiling.py).
    expected, _ = ceiling.ceiling_diagnostic(Corpus.load(demo_out / "corpus"),
                                             load_tokenizer(demo_out / "identifiers"), "test")
    assert m["ceiling"] == pytest.approx(expected)


def test_demo_avg_metrics_match_brute_force(demo_out):
    """metrics.json's AVG image-level recall equals a recount over the trainer's ranked outputs, and the beam
    sweep at the trainer's evaluation beam (10) reproduces them through the demo's own decode path."""
    m = json.loads((demo_out / demo.METRICS_FILE).read_text())
    corpus = Corpus.load(demo_out / "corpus")
    lines = [json.loads(x) for x in (demo_out / "t5_run" / "ranked_test.jsonl").read_text().splitlines()]
    ranks = np.array([_first_rank(x["image_ids"], set(corpus.queries[x["query_row"]].image_ids)) for x in lines])
    for k in (1, 5, 10):
        expected = np.mean((ranks >= 1) & (ranks <= k))
        assert m["avg"][f"recall@{k}"] == pytest.approx(expected)
        assert m["beam_sweep"]["per_beam"]["10"][f"recall@{k}"] == pytest.approx(expected)
    # demo.gin's fused evaluation (voken prior + rerank): its row recounts over the trainer's fused ranking
    fused = [json.loads(x) for x in (demo_out / "t5_run" / "ranked_test_rerank.jsonl").read_text().splitlines()]
    ranks = np.array([_first_rank(x["image_ids"], set(corpus.queries[x["query_row"]].image_ids)) for x in fused])
    assert (m["avg_fused"]["prior_weight"], m["avg_fused"]["rerank_weight"]) == (1.0, 4.0)
    for k in (1, 5, 10):
        assert m["avg_fused"][f"recall@{k}"] == pytest.approx(np.mean((ranks >= 1) & (ranks <= k)))
    assert "AVG + voken prior 1 + rerank 4" in (demo_out / demo.REPORT_FILE).read_text()


def test_demo_retrieval_checkpoint_serves_the_test_images(demo_out, capsys):
    """The exported checkpoint answers `avg-jax retrieve` with test images only."""
    corpus = Corpus.load(demo_out / "corpus")
    test_ids = {corpus.images[i].id for i in corpus.image_rows("test")}
    capsys.readouterr()
    assert cli.main(["retrieve", "--checkpoint", str(demo_out / demo.RETRIEVAL_CHECKPOINT), "--query",
                     corpus.queries[int(corpus.query_rows("test")[0])].text, "--k", "5"]) == 0
    printed = capsys.readouterr().out
    ranked = [i for i in test_ids if i in printed]
    assert len(ranked) == 5, printed


@pytest.mark.slow  # a second demo run (~1 minute on 2 cores); the default run is near its 15-minute budget
def test_demo_with_query_conditioning(tmp_path):
    """A query-conditioned model (QueryConditioning, issue 13 item 8) goes through every demo stage: the beam
    sweep and the efficiency stage feed it prefix vectors, and the sweep at the trainer's beam (10) reproduces
    the trainer's own ranking, recounted here."""
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--gin_file", "demo_ci.gin",
                     "--gin_param", "QueryConditioning.enabled = True"]) == 0
    m = json.loads((out / demo.METRICS_FILE).read_text())
    assert "QueryConditioning.enabled = True" in (out / demo.CONFIG_DIR / "t5.gin").read_text()
    corpus = Corpus.load(out / "corpus")
    lines = [json.loads(x) for x in (out / "t5_run" / "ranked_test.jsonl").read_text().splitlines()]
    ranks = np.array([_first_rank(x["image_ids"], set(corpus.queries[x["query_row"]].image_ids)) for x in lines])
    for k in (1, 5, 10):
        assert m["beam_sweep"]["per_beam"]["10"][f"recall@{k}"] == pytest.approx(np.mean((ranks >= 1) & (ranks <= k)))
    assert all(m["efficiency"]["generative_qps"][str(n)] > 0 for n in m["efficiency"]["sizes"])
