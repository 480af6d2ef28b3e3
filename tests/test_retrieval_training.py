"""The retrieval task on a tiny T5: the batched discriminative loss equals a per-candidate brute force,
gradients flow only through the teacher-forced scores, and `avg-jax train` runs end to end (resume,
evaluation outputs, GRACE memorize stages)."""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from hlo_collectives import racing_collectives
from tiny_table import instruction_batch

from avg_jax import cli, partitioning
from avg_jax.data.corpus import Corpus
from avg_jax.data.pipeline import corpus_examples, make_batch_iterator
from avg_jax.data.vocab import Vocabulary, train_sentencepiece
from avg_jax.decoding.trie import build_trie
from avg_jax.evaluation.ranked import read_ranked_jsonl
from avg_jax.identifiers.table import IdentifierTable, make_identifier_table
from avg_jax.retrieval.model import (
    DISTILL_IMAGES,
    DISTILL_TOKENS,
    PRIOR_VECTORS,
    TRAIN_TRIE,
    RetrievalLossConfig,
    RetrievalModel,
    Retriever,
    model_window,
    shift_right,
    table_vocabulary,
)
from avg_jax.t5.configs import named_t5_config
from avg_jax.t5.model import T5
from avg_jax.training import trainer
from avg_jax.training.examples import (
    AlignedCorpus,
    SequentialIterator,
    TrainMixture,
    build_mixture,
    condition_examples,
    prior_examples,
)

CODEBOOK, LEVELS = 12, 2


@pytest.fixture(scope="module")
def setup(tiny_corpus, tmp_path_factory):
    """The tiny corpus on disk with a SentencePiece model and a random 2-voken (+ suffix) identifier table."""
    root = tmp_path_factory.mktemp("retrieval")
    corpus_dir = tiny_corpus.save(root / "corpus")
    spm = train_sentencepiece([tiny_corpus.queries[j].text for j in tiny_corpus.query_rows("train")],
                              root / "table" / "spm", vocab_size=120)
    text_vocab = Vocabulary(spm)
    codes = np.random.default_rng(0).integers(0, CODEBOOK, (tiny_corpus.num_images, LEVELS))
    table = make_identifier_table([im.id for im in tiny_corpus.images], text_vocab.text_size + codes,
                                  np.full(tiny_corpus.num_images, LEVELS), scheme="rq", num_scheme_tokens=CODEBOOK,
                                  text_vocab_size=text_vocab.text_size, variable_length=False,
                                  metadata={"sentencepiece_model": str(spm), "num_extra_ids": 0,
                                            "codebook_file": "codebook.npy"})
    table_dir = table.save(root / "table")
    np.save(table_dir / "codebook.npy", np.random.default_rng(1).standard_normal((1, CODEBOOK, 32), np.float32))
    vocab = text_vocab.with_new_tokens(table.num_new_tokens)
    return {"corpus_dir": corpus_dir, "table_dir": table_dir, "corpus": tiny_corpus, "table": table,
            "vocab": vocab}


def _task_and_batch(setup, beam=4, batch_size=3, **loss):
    corpus, table, vocab = setup["corpus"], setup["table"], setup["vocab"]
    trie = build_trie(table.subset([corpus.images[i].id for i in corpus.image_rows("train")]))
    config = named_t5_config("tiny", vocab_size=vocab.size)
    task = RetrievalModel(config, vocab, window=model_window(table, vocab.size), input_length=24,
                          target_length=table.max_len,
                          loss=RetrievalLossConfig(discriminative_weight=0.7, beam_size=beam, **loss))
    rows = table.index()
    examples = corpus_examples(corpus, "train", vocab.encode, lambda i: table.identifier(rows[i]))
    batch = next(make_batch_iterator(examples, batch_size, 0, {"inputs": 24, "targets": table.max_len},
                                     truncate=True))
    params = nn.unbox(task.init_params(jax.random.key(3)))
    return task, {k: jnp.asarray(v) for k, v in batch.items()}, params, {TRAIN_TRIE: trie.tables}


@pytest.mark.skipif(jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
def test_compiled_data_parallel_step_holds_no_collective_racing_control_flow(setup):
    """The retrieval step (beam search under lax.cond, its while loop) as `train_loop` compiles it on 8
    devices: every collective inside control flow is data-ordered with the others (XLA:CPU runs unordered ones
    concurrently and can deadlock; see tests/hlo_collectives.py)."""
    task, batch, _, constants = _task_and_batch(setup, batch_size=8)
    mesh = partitioning.make_device_mesh(-1, 1, jax.devices()[:8])
    rules = partitioning.logical_axis_rules()
    tx = optax.adam(1e-3)
    with partitioning.sharding_context(mesh, rules):
        abstract, shardings = trainer.abstract_train_state(task, tx, mesh, rules)
        step = trainer.jit_train_step(task, tx, optax.constant_schedule(1e-3), 0, mesh, rules, shardings)
        text = step.lower(abstract, batch, constants).compile().as_text()
    assert "all-reduce" in text and "conditional" in text
    assert racing_collectives(text) == []


def test_replace_changes_only_the_named_fields(setup):
    task, *_ = _task_and_batch(setup, beam=3, max_relevant=2)
    task = task.replace(retrieve_instruction="retrieve:", score_normalization="allowed", share_first_step=False,
                        score_forced_steps=False, max_alpha=0.25)
    other = task.replace(input_length=7)
    assert other.input_length == 7 and task.input_length == 24
    for name in ("config", "vocab", "window", "target_length", "retrieve_instruction", "score_normalization",
                 "share_first_step", "score_forced_steps", "loss_config", "query_head", "max_alpha"):
        assert getattr(other, name) == getattr(task, name), name
    assert (other.retrieve_instruction, other.score_normalization, other.share_first_step,
            other.score_forced_steps, other.max_alpha, other.loss_config.max_relevant) == ("retrieve:", "allowed",
                                                                                          False, False, 0.25, 2)
    with pytest.raises(TypeError):
        task.replace(beam=5)


def _np_score(logits: np.ndarray, tokens: np.ndarray, probabilities: bool = False) -> float:
    """Sum over the non-PAD tokens of log p(token) (or of p(token) with `probabilities`), float64 numpy."""
    logits = logits.astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    per_token = np.exp(logp) if probabilities else logp
    return float(sum(per_token[t, tok] for t, tok in enumerate(tokens) if tok != 0))


@pytest.mark.parametrize("relevant,reduction,prior,found_only,score", [(False, "sum", False, False, "log_prob"),
                                                                       (True, "sum", False, False, "log_prob"),
                                                                       (True, "mean", False, False, "log_prob"),
                                                                       (True, "mean", True, False, "log_prob"),
                                                                       (True, "mean", False, True, "log_prob"),
                                                                       (True, "mean", False, False, "prob")])
def test_discriminative_loss_brute_force_and_gradient_path(setup, relevant, reduction, prior, found_only, score):
    """(1) The batched [batch * b, T] pass with injection, duplicate masking and (with `relevant`) the query's
    other relevant identifiers masked out of the softmax equals a per-candidate brute force, with L_gen
    summed or averaged over tokens, and (with `prior`, L_dis over fused scores) each candidate's listwise score
    plus its tokens' voken-prior biases, the candidates drawn by the search with that prior; (2) the gradient
    equals that of the same loss with the beam-search candidates fed in as constants, i.e. it flows only
    through the teacher-forced scores, never through the search or the prior. `found_only`: L_dis averaged over
    the rows whose positive the beam found (the rows with an injected positive left out). `score` 'prob': the
    listwise scores are the candidates' summed token probabilities (§3.2's wording), L_gen stays log-probability."""
    task, batch, params, constants = _task_and_batch(setup, generative_reduction=reduction,
                                                     max_relevant=3 if relevant else 0,
                                                     prior_weight=0.5 if prior else 0.0, prior_temperature=0.25,
                                                     discriminative_found_only=found_only,
                                                     discriminative_score=score)
    rng, step = jax.random.key(11), jnp.int32(5)
    if found_only:  # the first query's positive becomes its top beam candidate, so the beam finds one of them
        c0, _ = jax.jit(task.candidates)(params, batch["inputs"], constants[TRAIN_TRIE])
        batch = {**batch, "targets": batch["targets"].at[0].set(c0[0, 0])}
    start, size = task.window
    bias = np.zeros((batch["inputs"].shape[0], size))
    if prior:
        draw_rng = np.random.default_rng(4)
        vectors = draw_rng.standard_normal((size, 8)).astype(np.float32)
        vectors[CODEBOOK:] = 0  # collision-suffix columns have no voken vector
        queries = draw_rng.standard_normal((batch["inputs"].shape[0], 8)).astype(np.float32)
        batch = {**batch, "prior_query": jnp.asarray(queries)}
        constants = {**constants, PRIOR_VECTORS: jnp.asarray(vectors)}
        bias = 0.5 / 0.25 * queries.astype(np.float64) @ vectors.T.astype(np.float64)
        plain, _ = jax.jit(task.candidates)(params, batch["inputs"], constants[TRAIN_TRIE])
        fused, _ = jax.jit(task.candidates)(params, batch["inputs"], constants[TRAIN_TRIE], None,
                                            jnp.asarray(bias, jnp.float32))
        assert not np.array_equal(np.asarray(plain), np.asarray(fused))  # the prior changes the candidates
    other = {}
    if relevant:  # other relevant identifiers: two beam candidates (one of them may be the positive) and a miss
        c0, _ = jax.jit(task.candidates)(params, batch["inputs"], constants[TRAIN_TRIE])
        c0 = np.asarray(c0)
        rel = np.stack([c0[:, 1], c0[:, 0], np.full_like(c0[:, 0], 7)], axis=1)  # [b, 3, T]
        rel_valid = np.array([[True, True, False]] * rel.shape[0])
        rel_valid[0, 1] = False  # a masked-off slot is ignored
        batch = {**batch, "relevant": jnp.asarray(rel, jnp.int32), "relevant_valid": jnp.asarray(rel_valid)}
        other = {q: {tuple(r) for r, v in zip(rel[q], rel_valid[q], strict=True) if v} for q in range(rel.shape[0])}
    (total, metrics), grad = jax.jit(jax.value_and_grad(lambda p: task.loss(p, batch, rng, step, constants),
                                                        has_aux=True))(params)
    cands, valid = jax.jit(task.candidates)(params, batch["inputs"], constants[TRAIN_TRIE], None,
                                            jnp.asarray(bias, jnp.float32) if prior else None)

    fixed = task.replace()
    fixed.candidates = lambda params, input_ids, tables, prefix_features=None, token_bias=None: (cands, valid)
    grad_fixed = jax.jit(jax.grad(lambda p: fixed.loss(p, batch, rng, step, constants)[0]))(params)
    for g, h in zip(jax.tree.leaves(grad), jax.tree.leaves(grad_fixed), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-6, atol=1e-9)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad)) > 0

    cands, valid = np.asarray(cands), np.asarray(valid)
    draw = np.asarray(jax.random.uniform(jax.random.fold_in(rng, 2), valid.shape))
    model = T5(task.config)
    forward = jax.jit(lambda p, x, y: model.apply({"params": p}, x, shift_right(y)))
    gen, dis, found_any = [], [], []
    for q in range(cands.shape[0]):
        positive = np.asarray(batch["targets"][q])
        slots = list(cands[q])
        ok = list(valid[q])
        found = [j for j in range(len(slots)) if ok[j] and np.array_equal(slots[j], positive)]
        found_any.append(bool(found))
        if found:
            p = found[0]
        else:
            pool = [j for j in range(len(slots)) if not ok[j]] or list(range(len(slots)))
            p = max(pool, key=lambda j: draw[q, j])
            slots[p], ok[p] = positive, True
        scores, log_probs, keep, seen = [], [], [], set()
        for j, cand in enumerate(slots):  # one teacher-forced forward pass per candidate
            logits = forward(params, batch["inputs"][q:q + 1], jnp.asarray(cand)[None])
            log_probs.append(_np_score(np.asarray(logits[0]), cand))
            listwise = _np_score(np.asarray(logits[0]), cand, probabilities=score == "prob")
            scores.append(listwise + sum(bias[q, t - start] for t in cand if t))
            keep.append(ok[j] and tuple(cand) not in seen and (j == p or tuple(cand) not in other.get(q, ())))
            if ok[j]:
                seen.add(tuple(cand))
        kept = np.array([s for s, k in zip(scores, keep, strict=True) if k])
        dis.append(np.log(np.exp(kept - kept.max()).sum()) + kept.max() - scores[p])
        gen.append(-log_probs[p] / (np.count_nonzero(positive) if reduction == "mean" else 1))
    np.testing.assert_allclose(float(metrics["gen_loss"]), np.mean(gen), rtol=1e-4)
    rows = np.array(found_any) if found_only else np.ones(len(dis), bool)
    dis_mean = np.mean(np.array(dis)[rows])
    np.testing.assert_allclose(float(metrics["dis_loss"]), dis_mean, rtol=1e-4)
    np.testing.assert_allclose(float(total), np.mean(gen) + 0.7 * dis_mean, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["positive_in_beam"]), np.mean(found_any))
    if found_only:  # some rows had their positive injected and some not, so the choice mattered
        assert 0 < rows.sum() < rows.size
    if relevant and not prior and not found_only:  # the masking changed something
        plain = task.replace(loss=dataclasses.replace(task.loss_config, max_relevant=0))
        assert not np.isclose(float(plain.loss(params, batch, rng, step, constants)[1]["dis_loss"]),
                              float(metrics["dis_loss"]))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_distillation_loss_brute_force(setup, reduction):
    """Dense-to-generative distillation (`distill_weight`): the loss term equals a float64 numpy brute force that
    enumerates, for every row and target position, the images agreeing with the target's prefix (PAD-ended and
    out-of-window tokens included in the image set, adding nothing), sums their dense softmax probabilities per
    next token, and takes the cross-entropy with the generator's teacher-forced next-token distribution; it is
    added with its weight in both loss branches (L_gen only and with L_dis), and changes nothing when off."""
    w, temperature = 0.6, 0.3
    task, batch, params, constants = _task_and_batch(setup, generative_reduction=reduction,
                                                     discriminative_start_step=10, distill_weight=w,
                                                     distill_temperature=temperature)
    start, size = task.window
    table = setup["table"]
    tokens = table.tokens.copy()
    tokens[1, 1] = 0  # a shorter identifier: nothing to add at its PAD position
    tokens[2, 0] = 1  # a token outside the identifier window (the teacher's columns)
    tokens = np.concatenate([tokens, np.asarray(batch["targets"])[:1]])  # the first target twice: shared mass
    draw = np.random.default_rng(7)
    images = draw.standard_normal((tokens.shape[0], 8)).astype(np.float32)
    queries = draw.standard_normal((batch["inputs"].shape[0], 8)).astype(np.float32)
    batch = {**batch, "prior_query": jnp.asarray(queries)}
    constants = {**constants, DISTILL_IMAGES: jnp.asarray(images), DISTILL_TOKENS: jnp.asarray(tokens, jnp.int32)}

    model = T5(task.config)
    forward = jax.jit(lambda p, x, y: model.apply({"params": p}, x, shift_right(y)))
    targets = np.asarray(batch["targets"])
    scores = queries.astype(np.float64) @ images.T.astype(np.float64) / temperature
    probs = np.exp(scores - scores.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    want = []
    for q in range(targets.shape[0]):
        logits = np.asarray(forward(params, batch["inputs"][q:q + 1], jnp.asarray(targets[q:q + 1]))[0], np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        ce, positions = 0.0, 0
        for t, token in enumerate(targets[q]):
            if token == 0:
                continue
            teacher = {}
            for i, ident in enumerate(tokens):
                if list(ident[:t]) == list(targets[q, :t]) and ident[t] != 0 and start <= ident[t] < start + size:
                    teacher[int(ident[t])] = teacher.get(int(ident[t]), 0.0) + probs[q, i]
            mass = sum(teacher.values())
            ce -= sum(p / mass * logp[t, c] for c, p in teacher.items())
            positions += 1
        want.append(ce / positions if reduction == "mean" else ce)
    off = task.replace(loss=dataclasses.replace(task.loss_config, distill_weight=0.0))
    rng = jax.random.key(5)
    for step in (5, 20):  # L_gen only; L_gen + λ·L_dis (the positive's logits)
        total, metrics = jax.jit(lambda p, s: task.loss(p, batch, rng, s, constants))(params, jnp.int32(step))
        base, base_metrics = jax.jit(lambda p, s: off.loss(p, batch, rng, s, constants))(params, jnp.int32(step))
        np.testing.assert_allclose(float(metrics["distill_loss"]), np.mean(want), rtol=1e-4)
        np.testing.assert_allclose(float(total) - float(base), w * np.mean(want), rtol=1e-3)
        assert "distill_loss" not in base_metrics
    with pytest.raises(ValueError, match="distill_weight > 0 needs the batch's 'prior_query'"):
        task.loss(params, {k: v for k, v in batch.items() if k != "prior_query"}, rng, jnp.int32(5), constants)
    with pytest.raises(ValueError, match="distill_temperature > 0"):
        RetrievalLossConfig(distill_weight=1.0, distill_temperature=0.0)


def test_input_token_dropout_drops_only_query_text_pieces(setup):
    """`input_token_dropout`: checked position by position against the batch it was given (numpy): only query
    text pieces of query and pseudo-query rows become PAD, never the EOS, the instruction prefix, a memorize
    row or a row's last piece; the rate over many draws is p; and the loss is the p = 0 loss of the dropped
    batch (the same draw), so training sees exactly those inputs."""
    task, batch, params, constants = _task_and_batch(setup, batch_size=3)
    p, instruction = 0.3, "find the image:"
    task = task.replace(retrieve_instruction=instruction)
    task = task.replace(loss=dataclasses.replace(task.loss_config, input_token_dropout=p))
    texts = ["a dog runs on the green grass by a red house", "cat", "two birds", "an image to memorize"]
    # query, query, pseudo-query, memorize
    inputs, query_row, text = instruction_batch(task.vocab, instruction, texts, [5, 6, -2, -1])
    batch = {"inputs": jnp.asarray(inputs), "query_row": jnp.asarray(query_row)}
    assert text[0].sum() >= 8 and text[1].sum() >= 1 and text[3].sum() == 0

    drop = jax.jit(task.drop_input_tokens)
    dropped = np.stack([np.asarray(drop(batch, jax.random.key(s))["inputs"]) for s in range(400)])
    changed = dropped != inputs[None]
    assert (dropped[changed] == 0).all()  # dropped pieces become PAD
    assert not (changed & ~text[None]).any()  # never the EOS, PAD, instruction or a memorize row
    assert ((dropped != 0) & text[None]).any(axis=2)[:, :3].all()  # every row keeps a text piece
    rate = changed[:, 0][:, text[0]].mean()  # the long query: the last-piece rule almost never acts
    assert abs(rate - p) < 4 * np.sqrt(p * (1 - p) / (400 * text[0].sum())), rate
    if text[1].sum() == 1:
        assert not changed[:, 1].any()  # a one-piece query is kept whole

    rng, step = jax.random.key(2), jnp.int32(0)
    _, train_batch, params, constants = _task_and_batch(setup, batch_size=3)
    train_batch = {**train_batch, "query_row": jnp.zeros(3, jnp.int32)}
    got, _ = jax.jit(lambda b: task.loss(params, b, rng, step, constants))(train_batch)
    plain = task.replace(loss=dataclasses.replace(task.loss_config, input_token_dropout=0.0))
    seen = task.drop_input_tokens(train_batch, jax.random.fold_in(rng, 4))
    assert not np.array_equal(np.asarray(seen["inputs"]), np.asarray(train_batch["inputs"]))
    want, _ = jax.jit(lambda b: plain.loss(params, b, rng, step, constants))(seen)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    with pytest.raises(ValueError, match="input_token_dropout"):
        RetrievalLossConfig(input_token_dropout=1.0)


def test_lambda_schedule():
    cfg = RetrievalLossConfig(discriminative_weight=0.5, discriminative_start_step=10, discriminative_warmup_steps=4)
    got = [float(cfg.weight_at(jnp.int32(s))) for s in (0, 9, 10, 11, 13, 20)]
    np.testing.assert_allclose(got, [0, 0, 0.125, 0.25, 0.5, 0.5])


def test_sequential_iterator_state_round_trip(setup):
    corpus, table, vocab = setup["corpus"], setup["table"], setup["vocab"]
    mixture = TrainMixture(memorize_mode="sequential", memorize_steps=3, memorize_rate=0.0)
    memorize, stream = build_mixture(corpus, table, vocab, vocab.encode, mixture, image_dim=64, seed=0)
    assert len(memorize) == corpus.num_images and all(ex["has_image"] for ex in memorize)
    assert len(stream) == len(corpus.query_rows("train")) and not any(ex["has_image"] for ex in stream)
    lengths = {"inputs": 24, "targets": table.max_len}

    def make():
        return SequentialIterator(make_batch_iterator(memorize, 4, 1, lengths, truncate=True),
                                  make_batch_iterator(stream, 4, 0, lengths, truncate=True), 3)

    it = make()
    for _ in range(2):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]  # one memorize batch, then two retrieval batches
    assert expected[0]["has_image"].all() and not expected[1]["has_image"].any()
    again = make()
    again.set_state(json.dumps(state).encode())  # as grain's orbax handler passes it back
    for want in expected:
        got = next(again)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def _train(setup, run_dir, *params: str) -> int:
    gin_params = ["T5Config.vocab_size = 256", "T5Config.d_model = 32", "T5Config.num_heads = 2",
                  "T5Config.d_kv = 16", "T5Config.d_ff = 64", "T5Config.num_encoder_layers = 1",
                  "T5Config.num_decoder_layers = 1", "T5Config.dropout_rate = 0.0",
                  "train_retrieval.train_batch_size = 8", "train_retrieval.eval_max_queries = 12",
                  "train_retrieval.eval_batch_size = 64", "train_loop.progress_bar = False",
                  "train_loop.tensorboard = False", "train_loop.log_every = 1", *params]
    argv = ["train", "--corpus", str(setup["corpus_dir"]), "--identifiers", str(setup["table_dir"]),
            "--run_dir", str(run_dir)]
    for p in gin_params:
        argv += ["--gin_param", p]
    try:
        return cli.main(argv)
    finally:
        gin.clear_config()


def test_train_cli_end_to_end_with_discriminative_stage_and_resume(setup, tmp_path, capsys):
    params = ("train_loop.checkpoint_every = 3", "train_loop.eval_every = 3",
              "RetrievalLossConfig.discriminative_weight = 0.5", "RetrievalLossConfig.discriminative_start_step = 3",
              "RetrievalLossConfig.beam_size = 4")
    assert _train(setup, tmp_path, "train_loop.num_steps = 5", *params) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = {r["step"]: r for r in rows if "loss" in r}
    assert sorted(train_rows) == [1, 2, 3, 4, 5]
    assert train_rows[3]["dis_weight"] == 0 and train_rows[3]["dis_loss"] == 0  # λ(step 2) = 0
    assert train_rows[4]["dis_weight"] == 0.5 and train_rows[4]["dis_loss"] > 0
    assert any("eval/recall@10" in r for r in rows)
    final = json.loads((tmp_path / "eval_test.json").read_text())
    assert final["num_queries"] == len(setup["corpus"].query_rows("test")) and 0 <= final["recall@10"] <= 1
    assert [r["eval/num_queries"] for r in rows if "eval/num_queries" in r] == [12, 12]  # steps 3 and 5
    corpus = Corpus.load(setup["corpus_dir"])
    ranked = read_ranked_jsonl(tmp_path / "ranked_test.jsonl", corpus, "test")
    test_images = {corpus.images[i].id for i in corpus.image_rows("test")}
    assert all(len(r) == 10 and set(r) <= test_images for r in ranked.image_ids)
    retriever = Retriever.load(tmp_path / "retrieval", beam_size=10)  # avg-jax retrieve
    lines = [json.loads(line) for line in (tmp_path / "ranked_test.jsonl").read_text().splitlines()[:4]]
    for line, got in zip(lines, retriever.retrieve([line["text"] for line in lines], k=10), strict=True):
        assert got.image_ids == line["image_ids"]
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["t5_config"]["vocab_size"] == setup["vocab"].size
    assert run["target_length"] == setup["table"].max_len == LEVELS + 1  # random codes collide: + suffix
    capsys.readouterr()
    assert _train(setup, tmp_path, "train_loop.num_steps = 7", *params) == 0
    assert "resumed from checkpoint step 5" in capsys.readouterr().out


def test_train_cli_grace_memorize_then_retrieve_with_pseudo_queries(setup, tmp_path):
    assert _train(setup, tmp_path, "train_loop.num_steps = 4", "train_loop.checkpoint_every = 4",
                  "T5Config.num_image_tokens = 2", "TrainMixture.memorize_mode = 'sequential'",
                  "TrainMixture.memorize_steps = 2", "TrainMixture.memorize_rate = 0.5",
                  "TrainMixture.pseudo_query_rate = 1.0", "train_retrieval.eval_split = None") == 0
    run = json.loads((tmp_path / "run.json").read_text())
    corpus = setup["corpus"]
    non_train = corpus.num_images - len(corpus.image_rows("train"))
    assert run["memorize_stage_examples"] == corpus.num_images
    assert run["train_examples"] > len(corpus.query_rows("train")) + non_train  # + memorize half + pseudo
    assert run["t5_config"]["image_feature_dim"] == corpus.image_features.shape[1]


def test_grace_instruction_ranks_identically_through_retrieve_and_the_evaluator(setup, tmp_path, capsys):
    """A GRACE model (image prefix, memorize rows, a retrieve instruction) exported by the trainer ranks every
    test query the same through `avg-jax retrieve` as through the trainer's evaluator (ranked_test.jsonl): the
    checkpoint carries the instruction and input length, and both go through one RetrievalModel."""
    instruction = "find the image identifier for"
    assert _train(setup, tmp_path, "train_loop.num_steps = 6", "train_loop.checkpoint_every = 6",
                  "T5Config.num_image_tokens = 2", "TrainMixture.memorize_rate = 1.0",
                  f"TrainMixture.retrieve_instruction = '{instruction}'", "train_retrieval.eval_beam_size = 10") == 0
    spec = json.loads((tmp_path / "retrieval" / "retrieval_model.json").read_text())
    assert spec["retrieve_instruction"] == instruction
    expected = [json.loads(line) for line in (tmp_path / "ranked_test.jsonl").read_text().splitlines()]
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"text": r["text"], "query_row": r["query_row"]}) + "\n"
                               for r in expected))
    out = tmp_path / "retrieved.jsonl"
    assert cli.main(["retrieve", "--checkpoint", str(tmp_path / "retrieval"), "--queries", str(queries),
                     "--k", "10", "--beam_size", "10", "--out", str(out)]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(got) == len(expected) == len(setup["corpus"].query_rows("test"))
    for want, have in zip(expected, got, strict=True):
        assert have["query_row"] == want["query_row"]
        assert have["image_ids"] == want["image_ids"][:10]
        assert have["identifiers"] == want["identifiers"]
    # Without the instruction the same model ranks differently for at least one query (the bug this guards).
    bare = RetrievalModel.load_checkpoint(tmp_path / "retrieval")[0].replace(retrieve_instruction="")
    assert bare.encode_queries([expected[0]["text"]]).tolist() != \
        Retriever.load(tmp_path / "retrieval").model.encode_queries([expected[0]["text"]]).tolist()


def test_query_validation(setup, capsys):
    """An empty or whitespace-only query is an error naming it; cut queries are reported once per call and
    keep their EOS (the one truncation rule, as in training)."""
    vocab, table = setup["vocab"], setup["table"]
    config = named_t5_config("tiny", vocab_size=vocab.size)
    model = RetrievalModel(config, vocab, window=model_window(table, vocab.size), input_length=6,
                           target_length=table.max_len)
    for bad in ("", "   \t"):
        with pytest.raises(ValueError, match="query 1: empty query"):
            model.encode_queries(["a red circle", bad])
    long_text = " ".join(["red circle"] * 10)
    ids = model.encode_queries([long_text, "red", long_text])
    err = capsys.readouterr().err
    assert err.count("longer than the model's input length 6") == 1 and "2 of 3" in err
    full = vocab.encode(long_text)
    assert ids[0].tolist() == [*full[:5], 1] and ids[1].tolist()[:len(vocab.encode("red"))] == vocab.encode("red")


def test_input_length_comes_from_the_training_inputs_only(setup, tmp_path, capsys):
    """With no `train_retrieval.input_length`, a test query longer than every training input neither lengthens
    the model's input (no held-out query sets a model setting) nor goes unreported: it is cut and counted."""
    corpus = setup["corpus"]
    train_texts = [corpus.queries[j].text for j in corpus.query_rows("train")]
    long_row = int(corpus.query_rows("test")[0])
    long_text = " ".join(train_texts[:12])
    queries = [dataclasses.replace(q, text=long_text) if j == long_row else q for j, q in enumerate(corpus.queries)]
    long_dir = dataclasses.replace(corpus, queries=queries).save(tmp_path / "corpus")
    vocab = setup["vocab"]
    longest_train = max(len(vocab.encode(t)) + 1 for t in train_texts)  # + EOS
    assert len(vocab.encode(long_text)) > -(-longest_train // 8) * 8  # longer than a length from training
    params = ["train_loop.num_steps = 1", "train_loop.checkpoint_every = 1", "train_loop.eval_every = 1",
              "train_retrieval.eval_max_queries = None"]
    assert _train({**setup, "corpus_dir": long_dir}, tmp_path / "run", *params) == 0
    spec = json.loads((tmp_path / "run" / "retrieval" / "retrieval_model.json").read_text())
    assert spec["input_length"] == -(-longest_train // 8) * 8
    n_test = len(corpus.query_rows("test"))
    assert f"1 of {n_test} test query texts are longer than the model's input length" in capsys.readouterr().err


def test_train_cli_rejects_memorize_without_image_prefix(setup, tmp_path, capsys):
    assert _train(setup, tmp_path, "train_loop.num_steps = 1", "TrainMixture.memorize_rate = 1.0") == 2
    assert "T5Config.num_image_tokens" in capsys.readouterr().err


def test_identifier_table_vocabulary_mismatch_is_reported(setup, tmp_path):
    from avg_jax.training.retrieval import load_vocabulary

    table = IdentifierTable.load(setup["table_dir"])
    table.text_vocab_size += 1
    with pytest.raises(ValueError, match="text_vocab_size is"):
        load_vocabulary(table, setup["table_dir"])


def test_voken_embedding_init_from_codebook_and_pretrained_t5(setup, tmp_path):
    """'codebook': voken rows are the tokenizer's codebook vectors (d_code = d_model: same directions), suffix
    rows zero, text rows from the given HuggingFace checkpoint; the run starts from exactly these weights."""
    from avg_jax.t5.hf_io import save_hf_t5
    from avg_jax.t5.model import init_params
    from avg_jax.training.retrieval import initial_t5_params

    vocab, table = setup["vocab"], setup["table"]
    text_config = named_t5_config("tiny", vocab_size=vocab.text_size, d_model=32)
    text_params = init_params(text_config, jax.random.key(7))
    save_hf_t5(text_params, text_config, tmp_path / "hf")
    params, config = initial_t5_params(named_t5_config("tiny", vocab_size=vocab.size, d_model=32), vocab, table,
                                       setup["table_dir"], voken_embedding_init="codebook",
                                       pretrained_t5=str(tmp_path / "hf"))
    emb = np.asarray(params["token_embedder"]["embedding"])  # [vocab.size, 32]
    np.testing.assert_allclose(emb[: vocab.text_size], np.asarray(text_params["token_embedder"]["embedding"]),
                               rtol=1e-6)
    codebook = np.load(setup["table_dir"] / "codebook.npy")[0]
    vokens = emb[vocab.text_size: vocab.text_size + CODEBOOK]
    cos = np.sum(vokens * codebook, 1) / np.linalg.norm(vokens, axis=1) / np.linalg.norm(codebook, axis=1)
    np.testing.assert_allclose(cos, 1.0, rtol=1e-5)
    np.testing.assert_array_equal(emb[vocab.text_size + CODEBOOK:], 0.0)  # suffix tokens, vocabulary padding
    assert config.vocab_size == vocab.size
    assert _train(setup, tmp_path / "run", "train_loop.num_steps = 1", "train_retrieval.eval_split = None",
                  "T5Config.d_model = 32", "initial_t5_params.voken_embedding_init = 'codebook'",
                  f"initial_t5_params.pretrained_t5 = '{tmp_path / 'hf'}'", "make_optimizer.name = 'sgd'",
                  "learning_rate_schedule.peak_value = 0.0") == 0
    with ocp.CheckpointManager(tmp_path / "run" / "checkpoints") as manager:  # lr 0: still the initial weights
        state = manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    np.testing.assert_array_equal(np.asarray(state["params"]["token_embedder"]["embedding"]), emb)


def _nonsense_corpus(corpus: Corpus) -> tuple[Corpus, list[str]]:
    """`corpus` with every val/test query text replaced by a unique nonsense word."""
    words, queries = [], []
    for j, q in enumerate(corpus.queries):
        if q.split != "train":
            word = f"zqxvw{j:04d}blorf"
            words.append(word)
            q = dataclasses.replace(q, text=word)
        queries.append(q)
    return dataclasses.replace(corpus, queries=queries), words


def test_evaluation_captions_never_reach_any_training_input(tiny_corpus, tmp_path):
    """Val/test captions (unique nonsense words) appear nowhere in what is trained: the SentencePiece model and
    the tokenizer's captions (TRAIN rows only), the T5's examples (queries, memorize rows and pseudo-queries
    of both sources, decoded with the vocabulary) and the pseudo-queries' texts; pseudo-queries cover every
    val/test image."""
    from avg_jax import config
    from avg_jax.evaluation.dense import tokenizer_head_projections
    from avg_jax.tokenizer.pipeline import tokenize_corpus
    from avg_jax.tokenizer.train import TokenizerData

    corpus, words = _nonsense_corpus(tiny_corpus)
    corpus_dir = corpus.save(tmp_path / "corpus")
    config.parse_gin(["tokenizer/avg.gin"], [
        "RQTokenizerConfig.code_dim = 16", "RQTokenizerConfig.codebook_size = 16", "RQTokenizerConfig.num_levels = 2",
        "RQTokenizerConfig.decoder_hidden_dim = 32", "train_tokenizer.steps = 10", "train_tokenizer.batch_size = 48",
        "train_tokenizer.contrastive_steps = 5", "tokenize_corpus.sentencepiece_vocab_size = 300",
        "tokenize_corpus.suffix_scope = 'split'", "tokenize_corpus.pseudo_pairs_per_image = 2"])
    try:
        table, _ = tokenize_corpus(str(corpus_dir), str(tmp_path / "ids"))
    finally:
        gin.clear_config()
    corpus = Corpus.load(corpus_dir)
    train_rows = set(corpus.query_rows("train").tolist())
    data = TokenizerData.from_corpus(corpus, "train")
    assert set(data.caption_rows[data.caption_rows >= 0].tolist()) <= train_rows
    data = TokenizerData.from_corpus(corpus, "train", ("val", "test"), 2)  # pseudo-pairs (as tokenized above)
    assert data.num_images == corpus.num_images and (data.caption_rows[:, 0] >= 0).all()
    assert set(data.caption_rows[data.caption_rows >= 0].tolist()) <= train_rows
    vocab = table_vocabulary(table, table.metadata["sentencepiece_model"])
    pieces = {vocab.decode([i]) for i in range(vocab.text_size)}
    assert not any(w[:6] in p for w in words for p in pieces if len(p) >= 6)
    for split in ("val", "test"):  # suffix ranks within the split: identifiers unique within it
        ids = [corpus.images[i].id for i in corpus.image_rows(split)]
        assert len(table.subset(ids).groups()) == len(ids)

    config_ = named_t5_config("tiny", vocab_size=vocab.size).replace(num_image_tokens=1, image_feature_dim=64)
    model = RetrievalModel(config_, vocab, window=model_window(table, vocab.size), input_length=64,
                           target_length=table.max_len)
    text_head, image_head = tokenizer_head_projections(str(tmp_path / "ids"))
    aligned = AlignedCorpus.project(corpus, text_head, image_head)
    held_out = np.array(sorted(set(range(len(corpus.queries))) - train_rows))
    assert held_out.size and np.isnan(aligned.text[held_out]).all()  # held-out captions never projected
    rows = np.array(sorted(train_rows))
    np.testing.assert_allclose(aligned.text[rows], text_head(corpus.text_features[rows]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=f"query row {held_out[0]} is not a TRAIN query"):
        condition_examples([{"query_row": held_out[0], "image_row": 0}], aligned)
    indexed = {int(i) for s in ("val", "test") for i in corpus.image_rows(s)}
    for source in ("nearest_captions", "nearest_image"):
        mixture = TrainMixture(memorize_rate=1.0, pseudo_query_rate=1.0, pseudo_queries_per_image=3,
                               pseudo_query_source=source)
        _, stream = build_mixture(corpus, table, vocab, model.tokenize, mixture, 64, 0, aligned, max_relevant=4)
        texts = [vocab.decode([int(t) for t in ex["inputs"]]) for ex in stream]
        assert not any(w in t for w in words for t in texts), source
        pseudo = [ex for ex in stream if int(ex["query_row"]) == -2]
        assert {int(ex["image_row"]) for ex in pseudo} == indexed  # every val/test image is indexed
        assert all(int(ex["query_row"]) in train_rows for ex in stream if int(ex["query_row"]) >= 0)
        train_texts = {corpus.queries[j].text for j in train_rows}
        assert {vocab.decode([int(t) for t in ex["inputs"]]) for ex in pseudo} <= train_texts
        assert all(ex["relevant"].shape == (4, table.max_len) for ex in stream)


def test_train_with_the_full_avg_recipe(setup, tmp_path):
    """Pseudo-queries for val/test images, memorize rows (image prefix) with codebook voken embeddings, L_dis over
    every indexed image with other relevant images masked, per-token L_gen and unscored forced steps train and
    export (the recipe's switches work together); the checkpoint keeps `score_forced_steps`."""
    params = ("train_loop.num_steps = 3", "RetrievalLossConfig.discriminative_weight = 0.5",
              "RetrievalLossConfig.discriminative_start_step = 1", "RetrievalLossConfig.beam_size = 4",
              "RetrievalLossConfig.max_relevant = 4", "RetrievalLossConfig.generative_reduction = 'mean'",
              "TrainMixture.pseudo_query_rate = 1.0", "TrainMixture.pseudo_queries_per_image = 2",
              "TrainMixture.memorize_rate = 1.0", "T5Config.num_image_tokens = 1",
              "initial_t5_params.voken_embedding_init = 'codebook'", "BeamSearchOptions.score_forced_steps = False")
    assert _train(setup, tmp_path, *params) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("dis_loss", 0) > 0 for r in rows)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["score_forced_steps"] is False and run["train_examples"] > 0
    model, _, _ = RetrievalModel.load_checkpoint(tmp_path / "retrieval")
    assert model.score_forced_steps is False


def _table_with_tokenizer(setup, tmp_path):
    """A copy of the identifier table directory holding a random tiny tokenizer (its heads: the dense towers)."""
    import shutil

    from avg_jax.tokenizer.model import RQTokenizerConfig
    from avg_jax.tokenizer.model import init_params as init_tokenizer
    from avg_jax.tokenizer.train import TrainedTokenizer, save_tokenizer

    corpus = setup["corpus"]
    table_dir = shutil.copytree(setup["table_dir"], tmp_path / "table")
    dims = corpus.image_features.shape[1], corpus.text_features.shape[1]
    config = RQTokenizerConfig(code_dim=8, codebook_size=CODEBOOK, num_levels=LEVELS, decoder_hidden_dim=8)
    save_tokenizer(TrainedTokenizer(config, init_tokenizer(config, *dims, seed=0), *dims), table_dir)
    return table_dir


def test_train_with_rerank_reports_both_rankings(setup, tmp_path):
    """train_retrieval.eval_rerank_weight > 0: the towers are the tokenizer heads of the identifiers dir; the
    final evaluation keeps the generative metrics and adds rerank/ ones, both throughputs and the reranked file."""
    corpus = setup["corpus"]
    table_dir = _table_with_tokenizer(setup, tmp_path)
    run = tmp_path / "run"
    assert _train({**setup, "table_dir": table_dir}, run, "train_loop.num_steps = 2",
                  "train_retrieval.eval_rerank_weight = 1.0", "train_retrieval.eval_rerank_temperature = 0.1",
                  "train_retrieval.eval_prior_weight = 0.5") == 0
    final = json.loads((run / "eval_test.json").read_text())
    assert final["prior_weight"] == 0.5
    assert {"recall@10", "rerank/recall@10", "queries_per_s", "rerank/queries_per_s"} <= set(final)
    assert final["rerank_ranked"] == str(run / "ranked_test_rerank.jsonl")
    plain = (run / "ranked_test.jsonl").read_text().splitlines()
    reranked = (run / "ranked_test_rerank.jsonl").read_text().splitlines()
    assert len(plain) == len(reranked) == len(corpus.query_rows("test"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/rerank/recall@10" in r for r in rows)
    # The exported checkpoint's heads.npz reranks through `avg-jax retrieve` exactly as the evaluator did.
    from avg_jax.retrieval.model import load_reranker

    reranker = load_reranker(run / "retrieval")
    assert (reranker.config.weight, reranker.config.temperature, reranker.config.prior_weight) == (1.0, 0.1, 0.5)
    retriever = Retriever.load(run / "retrieval", beam_size=10, reranker=reranker)
    lines = [json.loads(line) for line in reranked[:4]]
    features = corpus.text_features[[line["query_row"] for line in lines]]
    got = retriever.retrieve([line["text"] for line in lines], k=10, query_features=features)
    assert [g.image_ids for g in got] == [line["image_ids"][:10] for line in lines]


def test_prior_examples_carry_the_query_or_donor_caption_vector(setup):
    corpus, table, vocab = setup["corpus"], setup["table"], setup["vocab"]
    aligned = np.random.default_rng(2).standard_normal((len(corpus.queries), 5)).astype(np.float32)
    mixture = TrainMixture(memorize_rate=1.0, pseudo_query_rate=1.0, pseudo_queries_per_image=2,
                           pseudo_query_source="nearest_image")
    _, stream = build_mixture(corpus, table, vocab, vocab.encode, mixture, 64, 0, text_rows=True)
    out = prior_examples(stream, aligned)
    kinds = set()
    for ex, got in zip(stream, out, strict=True):
        q = int(ex["query_row"])
        kinds.add(q if q < 0 else 0)
        want = aligned[q] if q >= 0 else aligned[int(ex["text_row"])] if q == -2 else np.zeros(5, np.float32)
        np.testing.assert_array_equal(got["prior_query"], want)
        if q == -2:  # the donor caption is a TRAIN caption of the same text as the pseudo-query's input
            assert corpus.queries[int(ex["text_row"])].split == "train"
            assert vocab.decode([int(t) for t in ex["inputs"]]) == corpus.queries[int(ex["text_row"])].text
    assert kinds == {0, -1, -2}  # query, memorize and pseudo-query rows all checked
    pseudo = next(ex for ex in stream if int(ex["query_row"]) == -2)
    with pytest.raises(ValueError, match="text_row"):
        prior_examples([{k: v for k, v in pseudo.items() if k != "text_row"}], aligned)


def test_fit_queries_report_how_the_generator_ranks_its_training_queries(setup, tmp_path):
    """train_retrieval.fit_queries: every evaluation also ranks evenly spaced TRAIN queries over the TRAIN images
    (`fit/` metrics, periodic and final); the final ranked file holds those queries and the exported model's
    rankings over the train images (`Retriever`), and the final metrics are their numpy recall."""
    from avg_jax.retrieval.model import RetrievalModel, Retriever
    from avg_jax.training.evaluator import RetrievalEvaluator

    corpus, table = setup["corpus"], setup["table"]
    run = tmp_path / "run"
    assert _train(setup, run, "train_loop.num_steps = 3", "train_loop.eval_every = 2",
                  "train_retrieval.fit_queries = 7") == 0
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval/fit/recall@10" in r]
    assert [r["step"] for r in evals] == [2, 3] and all("eval/recall@10" in r for r in evals)
    final = json.loads((run / "eval_test.json").read_text())
    train_rows = corpus.query_rows("train")
    rows = train_rows[np.linspace(0, len(train_rows) - 1, 7).astype(int)]
    model, params, _ = RetrievalModel.load_checkpoint(run / "retrieval")
    train_ids = [corpus.images[i].id for i in corpus.image_rows("train")]
    got = Retriever(model, params, table.subset(train_ids), beam_size=10).retrieve(
        [corpus.queries[j].text for j in rows], k=10)
    ranked = [json.loads(line) for line in (run / "ranked_train_fit.jsonl").read_text().splitlines()]
    assert [r["query_row"] for r in ranked] == rows.tolist()
    assert [r["image_ids"][:10] for r in ranked] == [g.image_ids for g in got]
    for k in (1, 5, 10):
        hits = [bool(set(g.image_ids[:k]) & set(corpus.queries[j].image_ids)) for g, j in zip(got, rows, strict=True)]
        assert final[f"fit/recall@{k}"] == pytest.approx(np.mean(hits))
    with pytest.raises(ValueError, match="query_rows must be 'train' queries"):
        RetrievalEvaluator(model, corpus, table, "train", query_rows=corpus.query_rows("test"))
    # the periodic evaluation (eval_max_queries = 12 in _train) ranks 12 EVENLY SPACED test queries, not the
    # first 12: its last entry (step 3, the exported parameters) is their recall over the test images
    test_rows = corpus.query_rows("test")
    periodic = test_rows[np.arange(12) * (len(test_rows) - 1) // 11]
    assert periodic[0] == test_rows[0] and periodic[-1] == test_rows[-1] and len(set(periodic.tolist())) == 12
    test_ids = [corpus.images[i].id for i in corpus.image_rows("test")]
    got = Retriever(model, params, table.subset(test_ids), beam_size=10).retrieve(
        [corpus.queries[j].text for j in periodic], k=10)
    for k in (1, 5, 10):
        hits = [bool(set(g.image_ids[:k]) & set(corpus.queries[j].image_ids))
                for g, j in zip(got, periodic, strict=True)]
        assert evals[-1][f"eval/recall@{k}"] == pytest.approx(np.mean(hits))


def test_evenly_spaced_rows():
    from avg_jax.training.retrieval import evenly_spaced

    rows = np.arange(100, 110)
    np.testing.assert_array_equal(evenly_spaced(rows, 4), [100, 103, 106, 109])
    np.testing.assert_array_equal(evenly_spaced(rows, 1), [100])
    np.testing.assert_array_equal(evenly_spaced(rows, 50), rows)
    with pytest.raises(ValueError, match="n must be >= 1"):
        evenly_spaced(rows, 0)


def test_condition_examples_prefix_the_query_donor_caption_or_image_vector(setup):
    """Query conditioning's prefix per row kind (numpy reference): a query row its query's aligned text vector with
    the target image's vector as interpolation target, a pseudo-query row its donor TRAIN caption's vector, a
    memorize row its image's vector (both as their own target); every row is marked as having a prefix."""
    corpus, table, vocab = setup["corpus"], setup["table"], setup["vocab"]
    rng = np.random.default_rng(3)
    aligned = AlignedCorpus(rng.standard_normal((len(corpus.queries), 5)).astype(np.float32),
                            rng.standard_normal((corpus.num_images, 5)).astype(np.float32))
    mixture = TrainMixture(memorize_rate=1.0, pseudo_query_rate=1.0, pseudo_queries_per_image=2,
                           pseudo_query_source="nearest_image")
    _, stream = build_mixture(corpus, table, vocab, vocab.encode, mixture, 64, 0, text_rows=True)
    kinds = set()
    for ex, got in zip(stream, condition_examples(stream, aligned), strict=True):
        q, image = int(ex["query_row"]), aligned.image[int(ex["image_row"])]
        kinds.add(q if q < 0 else 0)
        prefix = aligned.text[q] if q >= 0 else aligned.text[int(ex["text_row"])] if q == -2 else image
        np.testing.assert_array_equal(got["image_features"], prefix)
        np.testing.assert_array_equal(got["target_features"], image if q >= 0 else prefix)
        assert bool(got["has_image"])
    assert kinds == {0, -1, -2}
    with pytest.raises(ValueError, match="QueryConditioning needs the corpus' text features"):
        condition_examples(stream, AlignedCorpus(None, aligned.image))


def test_train_with_discriminative_loss_over_fused_scores(setup, tmp_path, capsys):
    """RetrievalLossConfig.prior_weight > 0 trains (L_dis over generator + voken-prior scores, candidates from the
    fused search) from the identifiers' tokenizer; without a tokenizer it is a clear error."""
    table_dir = _table_with_tokenizer(setup, tmp_path)
    params = ("train_loop.num_steps = 2", "RetrievalLossConfig.discriminative_weight = 0.5",
              "RetrievalLossConfig.beam_size = 4", "RetrievalLossConfig.prior_weight = 1.0",
              "RetrievalLossConfig.prior_temperature = 0.5", "TrainMixture.pseudo_query_rate = 1.0",
              "TrainMixture.pseudo_queries_per_image = 2", "train_retrieval.eval_prior_weight = 1.0",
              "train_retrieval.eval_rerank_temperature = 0.5")
    assert _train({**setup, "table_dir": table_dir}, tmp_path / "run", *params) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["dis_loss"] > 0 for r in rows if "loss" in r)
    assert "rerank/recall@10" in json.loads((tmp_path / "run" / "eval_test.json").read_text())
    capsys.readouterr()
    assert _train(setup, tmp_path / "bare", *params) == 2
    assert "tokenizer_config.json" in capsys.readouterr().err


def test_train_with_distillation(setup, tmp_path, capsys):
    """RetrievalLossConfig.distill_weight > 0 trains from the identifiers' tokenizer (its heads are the teacher,
    over every indexed image); without a tokenizer it is a clear error."""
    table_dir = _table_with_tokenizer(setup, tmp_path)
    params = ("train_loop.num_steps = 2", "RetrievalLossConfig.distill_weight = 1.0",
              "TrainMixture.pseudo_query_rate = 1.0", "TrainMixture.pseudo_queries_per_image = 2")
    assert _train({**setup, "table_dir": table_dir}, tmp_path / "run", *params) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["distill_loss"] > 0 for r in rows if "loss" in r] == [True, True]
    capsys.readouterr()
    assert _train(setup, tmp_path / "bare", *params) == 2
    assert "tokenizer_config.json" in capsys.readouterr().err


def test_voken_prior_adds_the_aligned_voken_scores_to_every_identifier(setup, tmp_path):
    """The aligned-voken prior in `RetrievalModel.rank`: with a beam over every test identifier, each
    identifier's search score minus its pure generative score is prior_weight / temperature * <t, Σ c_voken>,
    t the tokenizer text head's (numpy) output for the query feature and c the codebook rows of its tokens;
    a zero rerank weight leaves the searched order as it is."""
    from avg_jax.retrieval.model import RerankConfig, SearchIndex
    from avg_jax.t5.model import init_params
    from avg_jax.tokenizer.train import load_tokenizer
    from avg_jax.training.retrieval import TokenizerTowers

    corpus, table, vocab = setup["corpus"], setup["table"], setup["vocab"]
    table_dir = _table_with_tokenizer(setup, tmp_path)
    test_ids = [corpus.images[i].id for i in corpus.image_rows("test")]
    index = SearchIndex.from_table(table.subset(test_ids))
    beam = len(index.groups)
    config = named_t5_config("tiny", vocab_size=vocab.size)
    model = RetrievalModel(config, vocab, window=model_window(table, vocab.size), input_length=24,
                           target_length=table.max_len)
    params = init_params(config, jax.random.key(5))
    rows = corpus.query_rows("test")[:6]
    inputs = model.encode_queries([corpus.queries[j].text for j in rows])
    features = corpus.text_features[rows]
    reranker = TokenizerTowers.load(corpus, table, str(table_dir)).reranker(RerankConfig(0.0, 0.5, prior_weight=0.7),
                                                                          test_ids)
    plain = model.rank(params, inputs, index, beam_size=beam)
    fused = model.rank(params, inputs, index, beam_size=beam, rerank=reranker, query_features=features)
    head = load_tokenizer(table_dir).params["text_head"]
    assert set(head) == {"out"}  # a linear head: the reference below is exact
    t = features.astype(np.float64) @ np.asarray(head["out"]["kernel"]) + np.asarray(head["out"]["bias"])
    t /= np.linalg.norm(t, axis=-1, keepdims=True)
    codebook = np.load(table_dir / "codebook.npy")[0].astype(np.float64)
    for q in range(len(rows)):
        gen = dict(zip(plain.identifiers[q], plain.identifier_scores[q], strict=True))
        got = dict(zip(fused.identifiers[q], fused.identifier_scores[q], strict=True))
        assert set(got) == set(gen) == set(index.groups)
        for ident, score in got.items():
            codes = [tok - table.text_vocab_size for tok in ident]
            z = codebook[[c for c in codes if c < len(codebook)]].sum(0)  # collision suffixes have no vector
            assert score - gen[ident] == pytest.approx(0.7 / 0.5 * t[q] @ z, abs=1e-4)
        searched = [image for ident in fused.identifiers[q] for image in index.groups[ident]]
        assert fused.images[q] == searched  # weight 0: no rerank after the search
    assert plain.images != fused.images  # the prior changed some ranking
    assert any(len(ident) > LEVELS for ident in index.groups)  # suffix tokens were covered (zero prior)
    with pytest.raises(ValueError, match="needs the queries' features"):
        model.rank(params, inputs, index, beam_size=beam, rerank=reranker)
    with pytest.raises(ValueError, match="identifier window"):
        reranker.voken_bias(features, (model.window[0] + 1, model.window[1]))


def test_train_query_conditioning_checkpoint_ranks_like_evaluator(setup, tmp_path):
    """QueryConditioning on (+ interpolation, L_dis and pseudo-queries): the prefix is the tokenizer text head's
    aligned vector of the query feature; the exported checkpoint keeps the prefix projection and the text head,
    and `Retriever.retrieve(texts, query_features=...)` ranks exactly as the evaluator's ranked file."""
    from avg_jax.retrieval.model import CONDITIONING_FILE

    corpus = setup["corpus"]
    table_dir = _table_with_tokenizer(setup, tmp_path)
    run = tmp_path / "run"
    assert _train({**setup, "table_dir": table_dir}, run, "train_loop.num_steps = 2",
                  "QueryConditioning.enabled = True", "QueryConditioning.num_prefix_tokens = 2",
                  "QueryConditioning.max_alpha = 0.5", "RetrievalLossConfig.discriminative_weight = 0.5",
                  "RetrievalLossConfig.beam_size = 3", "TrainMixture.pseudo_query_rate = 1.0") == 0
    t5 = json.loads((run / "run.json").read_text())["t5_config"]
    assert t5["num_image_tokens"] == 2 and t5["image_feature_dim"] == 8
    assert (run / "retrieval" / CONDITIONING_FILE).exists()
    lines = [json.loads(line) for line in (run / "ranked_test.jsonl").read_text().splitlines()]
    assert len(lines) == len(corpus.query_rows("test"))
    retriever = Retriever.load(run / "retrieval", beam_size=10)
    assert retriever.model.conditioned
    features = corpus.text_features[[line["query_row"] for line in lines]]
    got = retriever.retrieve([line["text"] for line in lines], k=10, query_features=features)
    assert [g.image_ids for g in got] == [line["image_ids"][:10] for line in lines]
    with pytest.raises(ValueError, match="query-conditioned"):
        retriever.retrieve([lines[0]["text"]], k=10)


def test_fusion_selection_chooses_the_weights_on_val_and_applies_them_to_test(setup, tmp_path):
    """FusionSelection.split = 'val': every (prior, rerank) pair of the grid is scored on the val queries over
    the val images; each grid point must equal a direct fused search with that pair (model.rank with the full
    RerankConfig, not the one-search-per-prior shortcut) scored by a plain-python R@K / MRR@10; the best pair by
    the metric (first in grid order on ties) fuses the test evaluation and is stored in heads.npz."""
    from avg_jax.retrieval.model import RerankConfig, SearchIndex, load_reranker
    from avg_jax.training.retrieval import TokenizerTowers

    corpus, table = setup["corpus"], setup["table"]
    table_dir = _table_with_tokenizer(setup, tmp_path)
    run = tmp_path / "run"
    priors, weights = (0.0, 1.0), (0.0, 2.0, 50.0)
    assert _train({**setup, "table_dir": table_dir}, run, "train_loop.num_steps = 3",
                  "TrainMixture.pseudo_query_rate = 1.0", "train_retrieval.eval_rerank_temperature = 0.1",
                  "train_retrieval.eval_rerank_weight = 1.0", "FusionSelection.split = 'val'",
                  f"FusionSelection.prior_weights = {priors}", f"FusionSelection.rerank_weights = {weights}",
                  "FusionSelection.metric = 'mrr@10'") == 0
    chosen = json.loads((run / "fusion_val.json").read_text())
    grid = chosen["grid"]
    assert [(g["prior_weight"], g["rerank_weight"]) for g in grid] == [(p, w) for p in priors for w in weights]
    val_rows = corpus.query_rows("val")
    assert chosen["queries"] == len(val_rows)

    model, params, _ = RetrievalModel.load_checkpoint(run / "retrieval")
    val_ids = [corpus.images[i].id for i in corpus.image_rows("val")]
    index = SearchIndex.from_table(table.subset(val_ids))
    towers = TokenizerTowers.load(corpus, table, str(table_dir))
    inputs = model.encode_queries([corpus.queries[j].text for j in val_rows])
    relevant = [set(corpus.queries[j].image_ids) for j in val_rows]
    features = corpus.text_features[val_rows]

    def reference(prior, weight):
        ranked = model.rank(params, inputs, index, beam_size=10, batch_size=64, query_features=features,
                            rerank=towers.reranker(RerankConfig(weight, 0.1, prior), val_ids)).images
        first = [next((r for r, image in enumerate(images[:10]) if image in rel), None)
                 for images, rel in zip(ranked, relevant, strict=True)]
        return {"mrr@10": np.mean([0.0 if f is None else 1.0 / (f + 1) for f in first]),
                "recall@1": np.mean([f is not None and f < 1 for f in first]),
                "recall@10": np.mean([f is not None for f in first])}

    for point in grid:
        want = reference(point["prior_weight"], point["rerank_weight"])
        for key, value in want.items():
            assert point[key] == pytest.approx(value, abs=1e-9), (point, key)
    assert len({round(g["mrr@10"], 9) for g in grid}) > 1  # the weights changed the val ranking
    best = max(grid, key=lambda g: g["mrr@10"])  # max returns the first maximum: grid order breaks ties
    assert (chosen["prior_weight"], chosen["rerank_weight"]) == (best["prior_weight"], best["rerank_weight"])
    final = json.loads((run / "eval_test.json").read_text())
    assert final["fusion_selection"]["rerank_weight"] == best["rerank_weight"]
    if best["prior_weight"] or best["rerank_weight"]:  # the test evaluation fused with the chosen pair
        assert (final["prior_weight"], final["rerank_weight"]) == (best["prior_weight"], best["rerank_weight"])
        stored = load_reranker(run / "retrieval").config
        assert (stored.prior_weight, stored.weight, stored.temperature) == (best["prior_weight"],
                                                                            best["rerank_weight"], 0.1)


@pytest.mark.parametrize("params, match", [
    (("FusionSelection.split = 'test'",), "held-out queries"),
    (("FusionSelection.split = 'val'",), "not trained to emit"),
])
def test_fusion_selection_rejects_a_split_it_cannot_choose_on(setup, tmp_path, capsys, params, match):
    table_dir = _table_with_tokenizer(setup, tmp_path)
    assert _train({**setup, "table_dir": table_dir}, tmp_path / "run", "train_loop.num_steps = 1", *params) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training


def test_fusion_selection_if_available_keeps_the_fixed_weights_without_val_queries(setup, tmp_path, capsys):
    """A corpus with no val queries: FusionSelection.split = 'val' is an error, unless if_available, which keeps
    the fixed eval weights (in eval_test.json and heads.npz) and records that nothing was chosen."""
    from avg_jax.retrieval.model import load_reranker

    corpus = setup["corpus"]
    keep = [j for j, q in enumerate(corpus.queries) if q.split != "val"]
    no_val = dataclasses.replace(corpus, queries=[corpus.queries[j] for j in keep],
                                 text_features=corpus.text_features[keep])
    plan = {**setup, "corpus_dir": no_val.save(tmp_path / "corpus"),
            "table_dir": _table_with_tokenizer(setup, tmp_path)}
    params = ("train_loop.num_steps = 1", "TrainMixture.pseudo_query_rate = 1.0", "FusionSelection.split = 'val'",
              "train_retrieval.eval_rerank_weight = 3.0", "train_retrieval.eval_rerank_temperature = 0.1")
    assert _train(plan, tmp_path / "strict", *params) == 2
    assert "has no 'val' queries" in capsys.readouterr().err
    run = tmp_path / "run"
    assert _train(plan, run, *params, "FusionSelection.if_available = True") == 0
    final = json.loads((run / "eval_test.json").read_text())
    assert final["fusion_selection"] == {"split": "val", "skipped": "no 'val' queries"}
    assert (final["rerank_weight"], final["prior_weight"]) == (3.0, 0.0)
    assert load_reranker(run / "retrieval").config.weight == 3.0
    assert not (run / "fusion_val.json").exists()
