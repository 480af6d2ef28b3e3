"""`avg-jax tokenize` end to end on the tiny corpus: every scheme's table round-trips through disk."""

import json

import numpy as np
import pytest

from avg_jax import cli
from avg_jax.data.vocab import Vocabulary
from avg_jax.identifiers.table import IdentifierTable
from avg_jax.tokenizer.train import load_tokenizer

SMALL_RQ = ["RQTokenizerConfig.code_dim = 16", "RQTokenizerConfig.codebook_size = 16",
            "RQTokenizerConfig.num_levels = 2", "RQTokenizerConfig.decoder_hidden_dim = 32",
            "train_tokenizer.steps = 20", "train_tokenizer.batch_size = 48", "train_tokenizer.contrastive_steps = 10",
            "train_tokenizer.log_every = 10", "tokenize_corpus.sentencepiece_vocab_size = 300"]


@pytest.fixture(scope="module")
def corpus_dir(tiny_corpus, tmp_path_factory):
    return tiny_corpus.save(tmp_path_factory.mktemp("corpus") / "tiny")


def _tokenize(corpus_dir, out, gin_file, params):
    argv = ["tokenize", "--corpus", str(corpus_dir), "--out", str(out), "--gin_file", gin_file]
    for p in params:
        argv += ["--gin_param", p]
    assert cli.main(argv) == 0
    return IdentifierTable.load(out), json.loads((out / "stats.json").read_text())


def test_rq_scheme_writes_everything(corpus_dir, tiny_corpus, tmp_path):
    out = tmp_path / "rq"
    table, stats = _tokenize(corpus_dir, out, "tokenizer/avg.gin", SMALL_RQ)
    assert table.image_ids == [im.id for im in tiny_corpus.images]  # train + val + test
    assert table.fixed_length and len(table.groups()) == table.num_images  # 'suffix': all unique
    vocab = Vocabulary(table.metadata["sentencepiece_model"])
    assert table.text_vocab_size == vocab.text_size and (out / "spm.model").exists()
    assert table.num_new_tokens == 16 + table.metadata["num_suffix_tokens"]
    vokens = table.tokens[:, :2] - table.text_vocab_size
    assert ((0 <= vokens) & (vokens < 16)).all()
    books = np.load(out / "codebook.npy")
    assert books.shape == (1, 16, 16)
    tok = load_tokenizer(out)
    np.testing.assert_array_equal(tok.params["codebooks"], books)
    assert {"errors", "codebook_usage", "collisions_before_policy", "caption_neighbour_prefix_sharing"} <= set(stats)
    assert stats["errors"]["test"]["num_images"] == 60
    assert "TokenizerLossWeights.align = 1.0" in (out / "operative_config.gin").read_text()


def test_rq_share_policy_and_per_level_codebooks(corpus_dir, tmp_path):
    table, _ = _tokenize(corpus_dir, tmp_path / "irgen", "tokenizer/irgen.gin",
                         [*SMALL_RQ, "RQTokenizerConfig.shared_codebook = False",
                          "tokenize_corpus.collision_policy = 'share'"])
    assert table.max_len == 2 and table.num_new_tokens == 32
    level2 = table.tokens[:, 1] - table.text_vocab_size
    assert ((16 <= level2) & (level2 < 32)).all()
    groups = table.groups()
    colliding = sum(len(v) for v in groups.values() if len(v) > 1)
    assert table.metadata["collisions_before_policy"]["num_colliding_images"] == colliding


@pytest.mark.parametrize("scheme", ["numeric", "string", "semantic", "structured", "atomic"])
def test_grace_schemes_round_trip(scheme, corpus_dir, tiny_corpus, tmp_path):
    params = ["tokenize_corpus.sentencepiece_vocab_size = 300", "train_tokenizer.contrastive_steps = 10",
              "train_tokenizer.batch_size = 48", "grace_structured_identifiers.k = 4",
              "grace_structured_identifiers.c = 20"]
    table, stats = _tokenize(corpus_dir, tmp_path / scheme, f"tokenizer/grace_{scheme}.gin", params)
    assert table.scheme == f"grace_{scheme}" and table.num_images == tiny_corpus.num_images
    assert len(table.groups()) == table.num_images
    assert stats["unique_identifiers"] == table.num_images


def test_bad_scheme_is_one_clean_error(corpus_dir, tmp_path, capsys):
    argv = ["tokenize", "--corpus", str(corpus_dir), "--out", str(tmp_path / "x"),
            "--gin_param", "tokenize_corpus.scheme = 'vq'"]
    assert cli.main(argv) == 2
    assert "tokenize_corpus.scheme must be one of" in capsys.readouterr().err
