"""Query conditioning (`QueryConditioning`): a query's aligned text vector (the text head of its feature) as the
encoder's soft prefix. The conditioned model's trie-constrained beam search, through a saved and reloaded
retrieval checkpoint, ranks exactly as brute-force teacher-forced scoring of every identifier with the same
prefix through the flax `T5.__call__`; `avg-jax retrieve` needs the features."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_table import NUM_NEW, M, instruction_batch, tiny_vocab_and_table

from avg_jax import cli
from avg_jax.data.vocab import Vocabulary, pad_vocab_size
from avg_jax.retrieval.model import CONDITIONING_FILE, QueryConditioning, RetrievalModel, Retriever, TextHead
from avg_jax.t5.configs import named_t5_config
from avg_jax.t5.model import T5, init_params

TEXT_DIM, ALIGNED, PREFIX = 6, 5, 2
QUERIES = ["a red car on a street", "two dogs playing", "a bowl of fruit"]


@pytest.fixture(scope="module")
def conditioned(tmp_path_factory):
    """(checkpoint dir, table, params, config, vocab, text head, query features): a random tiny conditioned T5."""
    root = tmp_path_factory.mktemp("conditioned")
    spm, text_size, table = tiny_vocab_and_table(root)
    rng = np.random.default_rng(0)
    config = named_t5_config("tiny", vocab_size=pad_vocab_size(text_size + NUM_NEW)).replace(
        num_image_tokens=PREFIX, image_feature_dim=ALIGNED)
    params = jax.device_get(init_params(config, jax.random.key(0)))
    head = TextHead(TextHead.arrays({"out": {"kernel": rng.standard_normal((TEXT_DIM, ALIGNED)),
                                             "bias": rng.standard_normal(ALIGNED)}}, True))
    vocab = Vocabulary(spm, num_new=NUM_NEW)
    model = RetrievalModel(config, vocab, window=(text_size, config.vocab_size - text_size), input_length=32,
                           target_length=M, query_head=head)
    model.save_checkpoint(root / "ckpt", params, table)
    features = rng.standard_normal((len(QUERIES), TEXT_DIM)).astype(np.float32)
    return root / "ckpt", table, params, config, vocab, head, features


@functools.partial(jax.jit, static_argnums=0)
def _teacher_forced(config, params, ids, decoder_in, targets, prefix):
    logp = jax.nn.log_softmax(T5(config).apply({"params": params}, ids, decoder_in, prefix), -1)
    return jnp.take_along_axis(logp, targets[..., None], -1)[..., 0].sum(-1)


def brute_force(text, prefix, table, params, config, vocab, k):
    """Every distinct identifier scored by teacher forcing with the prefix vector, images in table order."""
    groups = table.groups()
    idents = list(groups)
    targets = jnp.asarray(idents, jnp.int32)
    decoder_in = jnp.concatenate([jnp.zeros((len(idents), 1), jnp.int32), targets[:, :-1]], axis=1)
    ids = jnp.asarray([vocab.encode(text)] * len(idents), jnp.int32)
    prefixes = jnp.asarray(np.repeat(prefix[None], len(idents), 0))
    scores = np.asarray(_teacher_forced(config, params, ids, decoder_in, targets, prefixes))
    ranked = []
    for j in np.argsort(-scores, kind="stable"):
        ranked.extend((image, float(scores[j])) for image in groups[idents[j]])
    return ranked[:k]


def test_conditioned_checkpoint_beam_search_matches_brute_force(conditioned):
    ckpt, table, params, config, vocab, head, features = conditioned
    assert (ckpt / CONDITIONING_FILE).exists()
    retriever = Retriever.load(ckpt, beam_size=16)
    assert retriever.model.conditioned and retriever.model.config.num_image_tokens == PREFIX
    got = retriever.retrieve(QUERIES, k=7, query_features=features)
    aligned = head(features)
    differs = False
    for q, text in enumerate(QUERIES):
        expected = brute_force(text, aligned[q], table, params, config, vocab, 7)
        assert got[q].image_ids == [i for i, _ in expected]
        np.testing.assert_allclose(got[q].scores, [s for _, s in expected], atol=1e-5)
        # the prefix matters: another query's vector gives other scores
        other = brute_force(text, aligned[(q + 1) % len(QUERIES)], table, params, config, vocab, 7)
        differs |= not np.allclose([s for _, s in other], [s for _, s in expected], atol=1e-4)
    assert differs
    with pytest.raises(ValueError, match="query-conditioned"):
        retriever.retrieve(QUERIES, k=7)
    with pytest.raises(ValueError, match="text head expects"):
        retriever.retrieve(QUERIES, k=7, query_features=features[:, :4])


def test_retrieve_cli_conditioned(conditioned, tmp_path, capsys):
    ckpt, table, params, config, vocab, head, features = conditioned
    path = tmp_path / "q.npy"
    np.save(path, features[:1])
    assert cli.main(["retrieve", "--checkpoint", str(ckpt), "--query", QUERIES[0], "--k", "5",
                     "--query_features", str(path), "--gin_param", "BeamSearchOptions.beam_size = 16"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    expected = brute_force(QUERIES[0], head(features[:1])[0], table, params, config, vocab, 5)
    assert [i for _, i, _ in lines] == [i for i, _ in expected]
    assert cli.main(["retrieve", "--checkpoint", str(ckpt), "--query", QUERIES[0]]) != 0
    assert "query-conditioned model: pass --query_features" in capsys.readouterr().err


def test_interpolation_moves_only_query_rows_towards_the_target(conditioned):
    _, table, _, config, vocab, head, _ = conditioned
    start = table.text_vocab_size
    model = RetrievalModel(config, vocab, window=(start, config.vocab_size - start), input_length=8, target_length=M,
                           query_head=head, max_alpha=0.5)
    rng = np.random.default_rng(1)
    q, v = rng.standard_normal((2, 6, ALIGNED)).astype(np.float32)
    batch = {"image_features": jnp.asarray(q), "target_features": jnp.asarray(v),
             "query_row": jnp.asarray([0, 3, -1, -2, 7, 1])}
    out = np.asarray(model.interpolate(batch, jax.random.key(0))["image_features"])
    alpha = ((out - q) / (v - q)).mean(-1)
    np.testing.assert_allclose(out, q + alpha[:, None] * (v - q), atol=1e-5)  # on the segment q -> v
    assert np.all(alpha[[0, 1, 4, 5]] > 0) and np.all(alpha <= 0.5) and np.all(alpha[[2, 3]] == 0)
    assert model.interpolate(batch, None) is batch  # evaluation: no interpolation
    assert model.replace(max_alpha=0.0).interpolate(batch, jax.random.key(0)) is batch


def test_text_dropout_drops_whole_query_texts(conditioned):
    """`QueryConditioning.text_dropout`: checked row by row against the batch it was given (numpy): a query or
    pseudo-query row keeps its input or loses every query text piece (to PAD) at once, never the instruction
    prefix, the EOS or a memorize row, at rate p per row; with piece dropout on too, a dropped row is still
    all PAD; only a conditioned model takes it."""
    _, table, _, config, vocab, head, _ = conditioned
    start, p, instruction = table.text_vocab_size, 0.4, "find the image:"
    model = RetrievalModel(config, vocab, window=(start, config.vocab_size - start), input_length=32,
                           target_length=M, retrieve_instruction=instruction, query_head=head, text_dropout=p)
    texts = ["a dog runs on the green grass", "cat", "two birds", "an image to memorize"]
    # query, query, pseudo-query, memorize
    inputs, query_row, text = instruction_batch(vocab, instruction, texts, [5, 6, -2, -1])
    batch = {"inputs": jnp.asarray(inputs), "query_row": jnp.asarray(query_row)}
    assert text[:3].sum(axis=1).min() >= 1 and text[3].sum() == 0

    draws = 400
    for piece_p in (0.0, 0.3):
        m = model.replace(loss=dataclasses.replace(model.loss_config, input_token_dropout=piece_p))
        drop = jax.jit(m.drop_input_tokens)
        dropped = np.stack([np.asarray(drop(batch, jax.random.key(s))["inputs"]) for s in range(draws)])
        changed = dropped != inputs[None]
        assert (dropped[changed] == 0).all() and not (changed & ~text[None]).any()
        whole = (changed == text[None]).all(axis=2)  # [draws, rows]: every text piece of the row dropped
        if piece_p == 0:
            assert (whole | ~changed.any(axis=2)).all()  # all or nothing
        rate = whole[:, :3].mean()
        assert abs(rate - p) < 4 * np.sqrt(p * (1 - p) / (3 * draws)), rate  # piece dropout keeps a piece
    with pytest.raises(ValueError, match="text_dropout"):
        QueryConditioning(text_dropout=1.0)
    with pytest.raises(ValueError, match="query-conditioned"):
        model.replace(query_head=None)
