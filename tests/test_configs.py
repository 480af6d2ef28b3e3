"""Every gin file parses against the real configurables, every experiment runs a few steps on a tiny corpus,
and `avg-jax sweep` lays metrics out like the paper's tables."""

import json
import logging
from pathlib import Path

import gin
import pytest

from avg_jax import cli, config, sweep

GIN_DIR = config.GIN_CONFIG_DIR
ALL_GIN = sorted(str(p.relative_to(GIN_DIR)) for p in GIN_DIR.rglob("*.gin"))
EXPERIMENTS = sorted(f for f in ALL_GIN if f.startswith("experiments/"))
# Modules whose configurables the building blocks bind without importing them themselves.
BASE_MODULES = ("avg_jax.tokenizer.pipeline", "avg_jax.t5.configs", "avg_jax.distributed", "avg_jax.partitioning",
                "avg_jax.data.synthetic", "avg_jax.training.optimizer", "avg_jax.demo")


@pytest.mark.parametrize("path", ALL_GIN)
def test_every_gin_file_parses(path):
    for module in BASE_MODULES:
        __import__(module)
    config.parse_gin([path])  # unknown configurables, parameters, macros or includes raise
    gin.clear_config()


def test_parsing_an_experiment_logs_no_error_and_keeps_cwd_includes(tmp_path, monkeypatch, caplog):
    """Includes found under gin_configs/ (not the cwd) log nothing, even from a working directory holding a
    `data/` folder on sys.path (gin's package-resource reader crashed there), and cwd files still win."""
    for module in BASE_MODULES:
        __import__(module)
    (tmp_path / "data" / "flickr30k").mkdir(parents=True)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "t5_tiny.gin").write_text("T5Config.d_model = 24\n")  # shadows gin_configs/'s
    (tmp_path / "mine.gin").write_text("include 'models/t5_tiny.gin'\ninclude 'mesh/cpu.gin'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.DEBUG):
        config.parse_gin(["experiments/avg/flickr30k_table3_full.gin"])
        config.parse_gin(["mine.gin"])
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert gin.get_bindings("T5Config")["d_model"] == 24
    (tmp_path / "bad.gin").write_text("include 'models/t5_nonexistent.gin'\n")
    with pytest.raises(IOError, match=r"models/t5_nonexistent\.gin"):
        config.parse_gin(["bad.gin"])
    assert len(gin.config._LOCATION_PREFIXES) == len(set(gin.config._LOCATION_PREFIXES))  # no growth per call
    gin.clear_config()


def test_registry_covers_every_experiment_and_labels_are_distinct():
    assert sweep.experiment_files() == EXPERIMENTS  # no experiment file outside a table
    assert sweep.missing_experiment_files() == []  # no table row without its file
    for table in sweep.TABLES.values():
        slugs = [sweep._slug(r.label) for r in table.rows]
        assert len(set(slugs)) == len(slugs), table.name
        assert table.dataset in sweep.DATASETS


def _q(name):
    """A bound value with macros resolved."""
    if name.startswith("%"):
        return gin.query_parameter(name)
    configurable, param = name.rsplit(".", 1)
    return gin.get_bindings(configurable)[param]


def test_experiments_bind_the_papers_settings():
    for module in BASE_MODULES:
        __import__(module)
    config.parse_gin(["experiments/avg/flickr30k_main.gin"])
    assert _q("%CORPUS_DIR") == "data/flickr30k"
    assert (_q("RQTokenizerConfig.codebook_size"), _q("RQTokenizerConfig.num_levels")) == (1024, 4)
    assert _q("TokenizerLossWeights.align") > 0 and _q("train_tokenizer.learning_rate") == 1e-4
    assert (_q("T5Config.d_model"), _q("T5Config.num_encoder_layers"), _q("T5Config.d_ff")) == (768, 12, 3072)
    assert _q("RetrievalLossConfig.discriminative_weight") == 0.5
    assert _q("initial_t5_params.voken_embedding_init") == "codebook"
    assert _q("RetrievalLossConfig.generative_reduction") == "mean"
    assert _q("TrainMixture.pseudo_query_source") == "nearest_captions"
    assert _q("TrainMixture.memorize_splits") == ("train", "val", "test")
    assert _q("staged_learning_rate.values") == [1e-3, 1e-4]
    start = _q("RetrievalLossConfig.discriminative_start_step")
    assert _q("staged_learning_rate.boundaries") == [start] and 0 < start < _q("train_loop.num_steps")
    assert _q("train_retrieval.train_batch_size") == 512 and _q("train_retrieval.eval_beam_size") == 30
    expected = {
        "experiments/avg/flickr30k_table3_no_alignment.gin": {"TokenizerLossWeights.align": 0.0},
        "experiments/avg/flickr30k_table3_no_discriminative.gin": {"RetrievalLossConfig.discriminative_weight": 0.0},
        "experiments/avg/flickr30k_table3_no_voken_init.gin": {"initial_t5_params.voken_embedding_init": "random"},
        "experiments/avg/flickr30k_table4_n256.gin": {"RQTokenizerConfig.codebook_size": 256,
                                                      "train_retrieval.eval_beam_size": 10},
        "experiments/avg/flickr30k_table5_m10.gin": {"RQTokenizerConfig.num_levels": 10},
        "experiments/avg/flickr30k_table6_t5_xl.gin": {"T5Config.d_ff": 16384, "T5Config.num_heads": 32},
        "experiments/avg/flickr30k_table7_beam50.gin": {"train_retrieval.eval_beam_size": 50},
        "experiments/avg/coco_main.gin": {"%CORPUS_DIR": "data/coco", "RQTokenizerConfig.codebook_size": 1024,
                                          "tokenize_corpus.pseudo_pairs_per_image": 5,
                                          "TrainMixture.pseudo_query_source": "nearest_captions",
                                          "TrainMixture.pseudo_query_rate": 1.0},
        "experiments/avg/emoji_main.gin": {"initial_t5_params.voken_embedding_init": "codebook",
                                           "%GENERATIVE_STEPS": 12000, "%TRAIN_STEPS": 13000,
                                           "TrainMixture.pseudo_query_source": "nearest_captions",
                                           "TrainMixture.pseudo_query_rate": 1.0,
                                           "TrainMixture.pseudo_queries_per_image": 5,
                                           "tokenize_corpus.pseudo_pairs_per_image": 5,
                                           "train_retrieval.discriminative_images": "indexed",
                                           "RetrievalLossConfig.max_relevant": 64,
                                           "RetrievalLossConfig.generative_reduction": "mean",
                                           "RetrievalLossConfig.discriminative_weight": 0.5,
                                           "BeamSearchOptions.score_forced_steps": False,
                                           "TokenizerLossWeights.align": 1.0},
        "experiments/avg/emoji_conditioned_n512.gin": {"RQTokenizerConfig.codebook_size": 512,
                                                       "RQTokenizerConfig.num_levels": 4,
                                                       "QueryConditioning.enabled": True},
        "experiments/avg/emoji_n1024.gin": {"RQTokenizerConfig.codebook_size": 1024,
                                            "initial_t5_params.voken_embedding_init": "codebook",
                                            "RetrievalLossConfig.discriminative_weight": 0.5},
        "experiments/avg/emoji_n1024_m2.gin": {"RQTokenizerConfig.codebook_size": 1024,
                                               "RQTokenizerConfig.num_levels": 2,
                                               "RetrievalLossConfig.discriminative_weight": 0.5},
        "experiments/avg/emoji_conditioned_n1024.gin": {"RQTokenizerConfig.codebook_size": 1024,
                                                        "QueryConditioning.enabled": True},
        "experiments/avg/emoji_conditioned_n1024_prior.gin": {"RQTokenizerConfig.codebook_size": 1024,
                                                              "QueryConditioning.enabled": True,
                                                              "train_retrieval.eval_rerank_weight": 4.0},
        "experiments/avg/emoji_conditioned_n512_prior.gin": {"RQTokenizerConfig.codebook_size": 512,
                                                             "QueryConditioning.enabled": True,
                                                             "train_retrieval.eval_rerank_weight": 4.0},
        "experiments/avg/emoji_random_voken.gin": {"initial_t5_params.voken_embedding_init": "random",
                                                   "TrainMixture.pseudo_query_rate": 1.0},
        "experiments/avg/emoji_no_alignment.gin": {"TokenizerLossWeights.align": 0.0,
                                                   "RetrievalLossConfig.discriminative_weight": 0.5},
        "experiments/avg/emoji_no_dis.gin": {"RetrievalLossConfig.discriminative_weight": 0.0,
                                             "TrainMixture.pseudo_query_rate": 1.0},
        "experiments/avg/emoji_no_indexing.gin": {"TrainMixture.pseudo_query_rate": 0.0,
                                                  "tokenize_corpus.pseudo_pairs_per_image": 0,
                                                  "RetrievalLossConfig.discriminative_weight": 0.5},
        "experiments/avg/emoji_prefix_align.gin": {"TokenizerLossWeights.prefix_align": 4.0,
                                                   "TokenizerLossWeights.align": 1.0},
        "experiments/avg/emoji_conditioned.gin": {"QueryConditioning.enabled": True,
                                                  "QueryConditioning.max_alpha": 0.5,
                                                  "TrainMixture.pseudo_query_rate": 1.0},
        "experiments/avg/emoji_conditioned_text_dropout_prior.gin": {"QueryConditioning.enabled": True,
                                                                     "QueryConditioning.text_dropout": 0.3,
                                                                     "train_retrieval.eval_rerank_weight": 4.0},
        "train/avg_synthetic.gin": {"initial_t5_params.voken_embedding_init": "codebook"},
        "demo.gin": {"initial_t5_params.voken_embedding_init": "codebook",
                     "RetrievalLossConfig.generative_reduction": "mean",
                     "TrainMixture.pseudo_query_source": "nearest_captions"},
        "experiments/grace/coco_structured.gin": {"tokenize_corpus.scheme": "grace_structured",
                                                  "TrainMixture.memorize_mode": "sequential",
                                                  "T5Config.num_image_tokens": 1, "%CORPUS_DIR": "data/coco"},
        "experiments/grace/flickr30k_string_no_memorize.gin": {"T5Config.num_image_tokens": 0,
                                                               "TrainMixture.memorize_rate": 0.0},
        "experiments/grace/flickr30k_semantic_no_constrained.gin": {"train_retrieval.eval_constrained": False,
                                                                    "tokenize_corpus.scheme": "grace_semantic",
                                                                    "TrainMixture.memorize_mode": "sequential"},
    }
    for path, bindings in expected.items():
        config.parse_gin([path])
        assert {k: _q(k) for k in bindings} == bindings, path
    gin.clear_config()


def test_staged_learning_rate_matches_a_plain_piecewise_constant():
    from avg_jax.training.optimizer import staged_learning_rate

    values, boundaries = [1e-3, 1e-4, 3e-5], [3, 7]
    schedule = staged_learning_rate(values, boundaries)
    expected = [values[sum(step >= b for b in boundaries)] for step in range(10)]
    assert [float(schedule(step)) for step in range(10)] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="3 values need 2 boundaries"):
        staged_learning_rate(values, [3])
    with pytest.raises(ValueError, match="positive and increasing"):
        staged_learning_rate(values, [7, 3])


# ------------------------------------------------------------------------------------------ aggregation

def _metrics_json(row_dir: Path, r1, r5, r10, corpus_name="flickr30k", synthetic=False):
    row_dir.mkdir(parents=True)
    scores = {"recall@1": r1, "recall@5": r5, "recall@10": r10, "mrr@10": 0.5, "empty_rate": 0.0,
              "identifier_recall@10": r10 + 0.01, "collision_rate": 0.0125}
    (row_dir / "metrics.json").write_text(json.dumps({"corpus": "/x", "corpus_name": corpus_name,
                                                      "synthetic": synthetic, "split": "test",
                                                      "systems": {"row": scores}}))


def test_aggregate_lays_out_the_papers_table(tmp_path):
    table = sweep.TABLES["avg_table4"]
    root = tmp_path / "avg_table4"
    _metrics_json(root / "256", 0.5, 0.75, 0.875)
    _metrics_json(root / "1_024", 0.625, 0.8125, 0.9)
    (root / "1_024" / "row.json").write_text(json.dumps({"wall_s": 812.4}))
    (root / "2_048").mkdir()
    (root / "2_048" / "error.txt").write_text("Traceback ...\nValueError: kmeans: 2048 centroids > 1000 rows\n")
    markdown, data = sweep.aggregate(table, tmp_path)
    assert markdown.splitlines() == [
        "## AVG Table 4: performance versus the codebook size N on Flickr30K",
        "",
        "Ours on corpus `flickr30k`, split `test`, image-level recall in %.",
        "",
        "| Codebook Size | R@1 | R@5 | R@10 | MRR@10 | id R@10 | collisions | q/s | time (s) | paper R@1 | paper R@5 "
        "| paper R@10 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        "| 256 | 50.0 | 75.0 | 87.5 | 50.0 | 88.5 | 1.25 | - | - | 60.8 | 82 | 84.8 |",
        "| 512 | not run |  |  |  |  |  |  |  | 61.1 | 82.8 | 86.1 |",
        "| 1,024 | 62.5 | 81.2 | 90.0 | 50.0 | 91.0 | 1.25 | - | 812 | 62.3 | 83.5 | 86.6 |",
        "| 2,048 | failed |  |  |  |  |  |  |  | 61.2 | 83 | 86 |",
        "",
        "- 2,048: ValueError: kmeans: 2048 centroids > 1000 rows",
    ]
    assert [r["status"] for r in data["rows"]] == ["done", "not run", "done", "failed"]
    assert data["rows"][0]["paper"] == {"recall@1": 60.8, "recall@5": 82.0, "recall@10": 84.8}
    assert cli.main(["sweep", "--table", "avg_table4", "--out", str(tmp_path), "--aggregate_only"]) == 0
    assert (root / "table.md").read_text() == markdown
    assert json.loads((root / "table.json").read_text())["rows"][3]["error"].startswith("ValueError: kmeans")


def test_aggregate_hides_paper_numbers_on_other_corpora_and_rejects_mixed_ones(tmp_path):
    table = sweep.TABLES["avg_table7"]
    _metrics_json(tmp_path / "avg_table7" / "1", 0.25, 0.25, 0.25, corpus_name="synthetic", synthetic=True)
    markdown, data = sweep.aggregate(table, tmp_path)
    lines = markdown.splitlines()
    assert lines[2] == "Ours on corpus `synthetic` (SYNTHETIC), split `test`, image-level recall in %."
    assert lines[4] == "| Beam Size | R@1 | R@5 | R@10 | MRR@10 | id R@10 | collisions | q/s | time (s) |"
    assert lines[6] == "| 1 | 25.0 | 25.0 | 25.0 | 50.0 | 26.0 | 1.25 | - | - |"
    assert "- Paper numbers (flickr30k) are not shown: this corpus is not that dataset." in lines
    assert not data["paper_shown"]
    _metrics_json(tmp_path / "avg_table7" / "5", 0.5, 0.5, 0.5, corpus_name="emoji")
    with pytest.raises(ValueError, match="different corpora"):
        sweep.aggregate(table, tmp_path)


def test_aggregate_adds_the_invalid_rate_of_free_generation(tmp_path):
    table = sweep.TABLES["grace_table2"]
    assert [r.label for r in table.rows[:3]] == ["Numeric Id", "Numeric Id w/o learning to memorize",
                                                 "Numeric Id w/o constrained generation"]
    assert table.rows[2].paper == (7.72, 16.7, 21.1) and table.rows[11].paper == (10.2, 22.3, 29.3)
    _metrics_json(tmp_path / "grace_table2" / "numeric_id", 0.5, 0.75, 0.875)
    free = tmp_path / "grace_table2" / "numeric_id_w_o_constrained_generation"
    _metrics_json(free, 0.25, 0.5, 0.625)
    metrics = json.loads((free / "metrics.json").read_text())
    metrics["systems"]["row"].update(invalid_rate=0.375, out_of_split_rate=0.25)
    (free / "metrics.json").write_text(json.dumps(metrics))
    lines = sweep.aggregate(table, tmp_path)[0].splitlines()
    assert lines[4] == ("| Identifier | R@1 | R@5 | R@10 | MRR@10 | id R@10 | collisions | invalid | q/s | time (s) "
                        "| paper R@1 | paper R@5 | paper R@10 |")
    assert lines[6] == "| Numeric Id | 50.0 | 75.0 | 87.5 | 50.0 | 88.5 | 1.25 | - | - | - | 22.5 | 28.9 | 29.4 |"
    assert lines[7] == ("| Numeric Id w/o learning to memorize | not run |  |  |  |  |  |  |  |  | 18.2 | 24.3 | "
                        "24.9 |")
    assert lines[8] == ("| Numeric Id w/o constrained generation | 25.0 | 50.0 | 62.5 | 50.0 | 63.5 | 1.25 | 37.5 "
                        "| - | - | 7.72 | 16.7 | 21.1 |")


def test_aggregate_adds_the_train_fit_column(tmp_path):
    table = sweep.TABLES["avg_emoji"]
    avg = tmp_path / "avg_emoji" / "avg"
    _metrics_json(avg, 0.25, 0.5, 0.625, corpus_name="emoji")
    metrics = json.loads((avg / "metrics.json").read_text())
    metrics["systems"]["row"]["fit/recall@10"] = 0.875
    (avg / "metrics.json").write_text(json.dumps(metrics))
    _metrics_json(tmp_path / "avg_emoji" / "irgen", 0.125, 0.25, 0.5, corpus_name="emoji")
    lines = sweep.aggregate(table, tmp_path)[0].splitlines()
    assert lines[4] == ("| Method | R@1 | R@5 | R@10 | MRR@10 | id R@10 | collisions | train R@10 | q/s | time (s) "
                        "| paper R@1 | paper R@5 | paper R@10 |")
    assert "| AVG | 25.0 | 50.0 | 62.5 | 50.0 | 63.5 | 1.25 | 87.5 | - | - | - | - | - |" in lines
    assert "| IRGen | 12.5 | 25.0 | 50.0 | 50.0 | 51.0 | 1.25 | - | - | - | - | - | - |" in lines
    assert any(line.startswith("- train R@10: the generator's R@10 on evenly spaced TRAIN queries") for line in lines)
    assert not any("first voken" in line for line in lines)
    metrics["systems"]["row"]["identifier_prefix1_recall@10"] = 0.75  # rows scored with their identifiers
    (avg / "metrics.json").write_text(json.dumps(metrics))
    lines = sweep.aggregate(table, tmp_path)[0].splitlines()
    assert "| train R@10 | first voken R@10 | q/s |" in lines[4]
    assert "| AVG | 25.0 | 50.0 | 62.5 | 50.0 | 63.5 | 1.25 | 87.5 | 75.0 | - | - | - | - | - |" in lines
    assert "| IRGen | 12.5 | 25.0 | 50.0 | 50.0 | 51.0 | 1.25 | - | - | - | - | - | - | - |" in lines


def test_sweep_cli_lists_and_rejects_unknown_tables(capsys):
    assert cli.main(["sweep", "--list"]) == 0
    out = capsys.readouterr().out
    assert "avg_table3:" in out and "experiments/avg/flickr30k_table3_no_alignment.gin" in out
    assert cli.main(["sweep", "--table", "avg_table99"]) == 2
    assert "--table must be one of" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ running

@pytest.fixture(scope="module")
def corpus_dir(tiny_corpus, tmp_path_factory):
    return tiny_corpus.save(tmp_path_factory.mktemp("corpus") / "tiny")


@pytest.fixture(scope="module")
def shared_out(tmp_path_factory):
    """One sweep output directory for every run here: with testing/tiny.gin many rows reduce to the same
    tokenizer / training config, and the sweep's stage sharing then runs each only once."""
    return tmp_path_factory.mktemp("sweeps")


def test_tokenize_takes_the_corpus_from_the_data_config(corpus_dir, tmp_path, capsys):
    small = ["RQTokenizerConfig.code_dim = 8", "RQTokenizerConfig.codebook_size = 8",
             "RQTokenizerConfig.num_levels = 2", "train_tokenizer.steps = 2", "train_tokenizer.batch_size = 48",
             "train_tokenizer.contrastive_steps = 2",
             "tokenize_corpus.sentencepiece_vocab_size = 300"]
    argv = ["tokenize", "--out", str(tmp_path / "ids"), "--gin_file", "data/synthetic.gin", "--gin_file",
            "tokenizer/avg.gin", "--gin_param", f"CORPUS_DIR = '{corpus_dir}'"]
    assert cli.main(argv + [a for p in small for a in ("--gin_param", p)]) == 0
    assert json.loads((tmp_path / "ids" / "identifiers.json").read_text())["metadata"]["corpus"] == str(
        Path(corpus_dir).resolve())
    assert cli.main(["tokenize", "--out", str(tmp_path / "x"), "--gin_file", "tokenizer/avg.gin"]) == 2
    assert "--corpus not given and no gin macro CORPUS_DIR is bound" in capsys.readouterr().err


def test_dry_run_shows_shared_stages(corpus_dir, tmp_path, capsys):
    out = tmp_path / "sweeps"
    assert cli.main(["sweep", "--table", "avg_table3", "--corpus", str(corpus_dir), "--out", str(out),
                     "--dry_run"]) == 0
    text = capsys.readouterr().out
    ids = [line.split()[1] for line in text.splitlines() if line.strip().startswith("identifiers:")]
    runs = [line.split()[2] for line in text.splitlines() if line.strip().startswith("run dir:")]
    # Only w/o alignment has its own tokenizer; four distinct training runs.
    assert ids[0] == ids[2] == ids[3] != ids[1] and len(set(runs)) == 4
    assert not out.exists()  # a dry run writes nothing
    assert cli.main(["sweep", "--table", "avg_table7", "--corpus", str(corpus_dir), "--out", str(out),
                     "--dry_run"]) == 0
    text = capsys.readouterr().out
    runs = {line.split()[2] for line in text.splitlines() if line.strip().startswith("run dir:")}
    assert len(runs) == 1  # beam size is evaluation only: Table 7 trains once
    assert cli.main(["sweep", "--table", "grace_beam", "--corpus", str(corpus_dir), "--out", str(out),
                     "--dry_run"]) == 0
    text = capsys.readouterr().out
    runs = [line.split()[2] for line in text.splitlines() if line.strip().startswith("run dir:")]
    assert len(runs) == 4 * len(sweep.GRACE_BEAMS) and len(set(runs)) == 4  # one training run per scheme
    assert "'train_retrieval.eval_beam_size = 50'" in text
    assert cli.main(["sweep", "--table", "grace_table2", "--corpus", str(corpus_dir), "--out", str(out),
                     "--dry_run"]) == 0
    runs = [line.split()[2] for line in capsys.readouterr().out.splitlines()
            if line.strip().startswith("run dir:")]
    # Per scheme: the model, w/o memorize (its own training), w/o constrained generation (the model's run).
    assert len(runs) == 12 and all(runs[i] == runs[i + 2] != runs[i + 1] for i in range(0, 12, 3))
    assert cli.main(["sweep", "--table", "avg_emoji", "--corpus", str(corpus_dir), "--out", str(out),
                     "--dry_run"]) == 0
    text = capsys.readouterr().out
    labels = [line.split(" / ", 1)[1].rsplit(" (", 1)[0] for line in text.splitlines() if line.startswith("[")]
    run_of = dict(zip(labels, [line.split()[2] for line in text.splitlines()
                               if line.strip().startswith("run dir:")], strict=True))
    # The fusion rows are evaluation-only: they reuse their generator's run.
    assert (run_of["AVG"] == run_of["AVG + rerank"] == run_of["AVG + voken prior"]
            == run_of["AVG + voken prior + rerank"] != run_of["AVG + query conditioning"]
            == run_of["AVG + query conditioning + voken prior + rerank"])
    assert run_of["AVG + hierarchical alignment"] == run_of["AVG + hierarchical alignment + voken prior + rerank"]
    assert (run_of["AVG + query conditioning + text dropout"]
            == run_of["AVG + query conditioning + text dropout + voken prior + rerank"]
            != run_of["AVG + query conditioning"])
    assert run_of["AVG + dense distillation"] == run_of["AVG + dense distillation + voken prior + rerank"]
    assert (run_of["AVG + query conditioning, codebook N = 512"]
            == run_of["AVG + query conditioning, codebook N = 512 + voken prior + rerank"]
            != run_of["AVG + query conditioning"])
    m2 = "AVG + query conditioning, codebook N = 1,024, M = 2"
    assert (run_of[m2] == run_of[m2 + " + voken prior"] == run_of[m2 + " + voken prior + rerank"]
            != run_of["AVG + query conditioning, codebook N = 1,024"])
    assert len({run_of[label] for label in labels if "no T5" not in label}) == 18  # IRGen, AVG and 16 variants


# By default one experiment per table runs (flickr30k_table3_full is the AVG row of Tables 3-7; Table 7 also
# runs whole in the sweep test below); under testing/tiny.gin the AVG ones share one tokenizer and one
# training run. The rest, each a separate tokenizer or training run, are marked slow.
DEFAULT_RUNS = {"experiments/avg/flickr30k_table3_full.gin", "experiments/avg/flickr30k_table4_n256.gin",
                "experiments/avg/flickr30k_table6_t5_small.gin", "experiments/avg/coco_main.gin",
                "experiments/grace/flickr30k_structured.gin", "experiments/grace/flickr30k_semantic_no_memorize.gin",
                "experiments/grace/flickr30k_structured_no_constrained.gin"}  # re-evaluates structured's run


@pytest.mark.parametrize("path", [pytest.param(p, marks=() if p in DEFAULT_RUNS else pytest.mark.slow)
                                  for p in EXPERIMENTS])
def test_every_experiment_runs_a_few_steps(path, corpus_dir, shared_out):
    table = next(t for t in sweep.TABLES.values() if any(path in r.gin_files for r in t.rows))
    row = next(r for r in table.rows if path in r.gin_files)
    plan = sweep.parse_row(table, row, shared_out, str(corpus_dir), ["testing/tiny.gin"])
    beam = gin.query_parameter("train_retrieval.eval_beam_size")
    scores = sweep.run_row(plan)
    metrics = json.loads((plan.row_dir / "metrics.json").read_text())
    assert metrics["split"] == "test" and set(metrics["systems"]) == {row.label}
    recalls = [scores[f"recall@{k}"] for k in (1, 5, 10) if k <= beam]  # K > beam: inapplicable, absent
    free = not gin.get_bindings("train_retrieval").get("eval_constrained", True)  # w/o constrained generation
    assert ("invalid_rate" in scores) == ("out_of_split_rate" in scores) == free
    if free:
        assert 0.0 <= scores["invalid_rate"] + scores["out_of_split_rate"] <= 1.0
        ranked = [json.loads(line) for line in (plan.row_dir / "ranked_test.jsonl").read_text().splitlines()]
        generated = [tuple(g) for r in ranked for g in r["generated"]]
        assert len(generated) == len(ranked) * beam
        assert all(tuple(i) in map(tuple, r["generated"]) for r in ranked for i in r["identifiers"])
    assert [k for k in (1, 5, 10) if f"recall@{k}" in scores] == [k for k in (1, 5, 10) if k <= beam]
    assert 0.0 <= recalls[0] and recalls == sorted(recalls) and recalls[-1] <= 1.0
    assert "train_loop.num_steps = %TRAIN_STEPS" in (plan.row_dir / "operative_config.gin").read_text()


def test_sweep_end_to_end_table7_trains_once(corpus_dir, shared_out, capsys):
    out = shared_out
    code = cli.main(["sweep", "--table", "avg_table7", "--corpus", str(corpus_dir), "--out", str(out),
                     "--gin_file", "testing/tiny.gin"])
    text = capsys.readouterr().out
    markdown = (out / "avg_table7" / "table.md").read_text()
    assert markdown in text and "(SYNTHETIC)" in markdown
    rows = json.loads((out / "avg_table7" / "table.json").read_text())["rows"]
    done = [r["label"] for r in rows if r["status"] == "done"]
    assert done == ["1", "5", "10", "20", "30", "40", "50"] and code == 0
    records = [json.loads((out / "avg_table7" / sweep._slug(label) / "row.json").read_text()) for label in done]
    assert len({r["run_dir"] for r in records}) == 1 and len({r["identifiers"] for r in records}) == 1
    # Beams 1 and 5 return 1 and 5 identifiers: R@K above the beam is inapplicable, "-" as in the paper.
    beam1, beam5, beam10 = (json.loads((out / "avg_table7" / b / "metrics.json").read_text())["systems"][b]
                            for b in ("1", "5", "10"))
    # train/avg.gin's fit_queries: the train queries' fit at the same cutoffs, under fit/.
    assert {k for k in beam1 if "@" in k} == {"recall@1", "identifier_recall@1", "fit/recall@1"}
    assert {k for k in beam5 if "@" in k} == {"recall@1", "recall@5", "identifier_recall@1", "identifier_recall@5",
                                              "fit/recall@1", "fit/recall@5"}
    assert {"recall@10", "mrr@10", "identifier_recall@10"} <= set(beam10)
    # beam 10: the first-voken recall@10 (depth 1 of the identifier prefix recall) is scored, beams 1 and 5 not;
    # a ranking that reaches a relevant identifier also reaches its first voken
    assert beam10["identifier_recall@10"] <= beam10["identifier_prefix1_recall@10"] <= 1.0
    assert "first voken R@10" in markdown
    cells = {line.split(" | ")[0][2:]: line.split(" | ")[1:4] for line in markdown.splitlines()
             if line.startswith("| ") and line[2].isdigit()}
    assert cells["1"][1:] == ["-", "-"] and cells["5"][2] == "-" and "-" not in cells["5"][:2]
    assert "-" not in cells["10"] and "are inapplicable" in markdown
    # A second sweep finds every finished row done and rebuilds the same table.
    assert cli.main(["sweep", "--table", "avg_table7", "--corpus", str(corpus_dir), "--out", str(out),
                     "--gin_file", "testing/tiny.gin"]) == code
    assert "done already" in capsys.readouterr().out


def test_sweep_stops_when_a_row_is_preempted(corpus_dir, shared_out, monkeypatch):
    """SIGTERM during a row's training ends the sweep: the next row (sharing the run) must not resume it."""
    from avg_jax.training import retrieval

    calls = []

    def preempted(corpus, identifiers, run_dir):
        calls.append(run_dir)
        return {"preempted": True, "step": 3}

    monkeypatch.setattr(retrieval, "train_retrieval", preempted)
    main = "experiments/avg/emoji_main.gin"
    table = sweep.SweepTable("emoji_preempt", "preempted rows", "Method", "emoji", (
        sweep.SweepRow("AVG", (main,)), sweep.SweepRow("AVG + rerank", ("experiments/avg/emoji_rerank.gin",))))
    monkeypatch.setitem(sweep.TABLES, table.name, table)
    out = shared_out / "preempt"
    with pytest.raises(sweep.SweepPreempted, match="SIGTERM"):
        cli.main(["sweep", "--table", table.name, "--corpus", str(corpus_dir), "--out", str(out),
                  "--gin_file", "testing/tiny.gin"])
    assert len(calls) == 1  # the second row, sharing the run, never started
    assert (out / table.name / sweep.TABLE_MD).exists()


def test_sweep_tokenizer_only_rows_and_a_missing_gin_file(corpus_dir, shared_out, monkeypatch, capsys):
    """Dense and ceiling rows run the tokenizer only (one shared table, no T5 run); a row whose gin file does
    not exist is reported as that row's error while the others run; row.json records the wall seconds."""
    main = "experiments/avg/emoji_main.gin"
    table = sweep.SweepTable("emoji_tok", "tokenizer-only rows", "Method", "emoji", (
        sweep.SweepRow("Dense", (main,), kind="dense"),
        sweep.SweepRow("Ceiling", (main,), kind="ceiling"),
        sweep.SweepRow("Ceiling codes", (main,), kind="ceiling_codes"),
        sweep.SweepRow("Missing", ("experiments/avg/emoji_does_not_exist.gin",))))
    monkeypatch.setitem(sweep.TABLES, table.name, table)
    with pytest.raises(ValueError, match="kind must be one of"):
        sweep.SweepRow("x", (main,), kind="nope")
    out = shared_out / "tok_only"
    assert cli.main(["sweep", "--table", table.name, "--corpus", str(corpus_dir), "--out", str(out),
                     "--gin_file", "testing/tiny.gin"]) == 1  # one failed row
    root = out / table.name
    records = {d: json.loads((root / d / "row.json").read_text()) for d in ("dense", "ceiling", "ceiling_codes")}
    assert {r["kind"] for r in records.values()} == {"dense", "ceiling", "ceiling_codes"}
    assert all(r["wall_s"] > 0 for r in records.values())
    assert len({r["identifiers"] for r in records.values()}) == 1 and not (out / "runs").exists()
    for d in records:
        system = json.loads((root / d / "metrics.json").read_text())["systems"]
        (m,) = system.values()
        assert 0 <= m["recall@1"] <= m["recall@10"] <= 1 and m["queries_per_s"] > 0
    assert "emoji_does_not_exist.gin" in (root / "missing" / "error.txt").read_text()
    markdown = (root / "table.md").read_text()
    assert "| Missing | failed |" in markdown and "- Missing: FileNotFoundError: gin file not found" in markdown
    assert "q/s | time (s) |" in markdown
    capsys.readouterr()
    assert cli.main(["sweep", "--table", table.name, "--corpus", str(corpus_dir), "--out", str(out),
                     "--dry_run"]) == 0  # a dry run names the missing file and goes on
    assert "Missing: FAILED to parse its config" in capsys.readouterr().out
