"""GRACE's "w/o constrained generation" evaluation on a random tiny T5: the free beam search equals a numpy
beam search over teacher-forced full-vocabulary log-probabilities, generated sequences map to images only when
they are exactly an identifier of the evaluated split, and invalid / out-of-split generations are counted."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from avg_jax.data.vocab import EOS_ID, PAD_ID
from avg_jax.identifiers.table import IdentifierTable
from avg_jax.retrieval.model import RetrievalModel, model_window
from avg_jax.t5.configs import named_t5_config
from avg_jax.t5.model import T5, init_params
from avg_jax.training.evaluator import RetrievalEvaluator

BEAM, NUM_QUERIES, INPUT_LENGTH = 8, 10, 64


@pytest.fixture(scope="module")
def model(tiny_vocab):
    config = named_t5_config("tiny", vocab_size=tiny_vocab.size)
    return tiny_vocab, config, init_params(config, jax.random.key(1))


def reference_free_beams(params, config, input_ids, length):
    """Per query, [(sequence, score)] best first: a plain beam search in float64 numpy where each step scores
    every vocabulary token of every live hypothesis by teacher forcing the whole prefix through T5, and an
    EOS-ended hypothesis carries over unchanged."""
    out = []
    for row in input_ids:
        hyps = [((), 0.0)]
        for t in range(length):
            done = [h for h in hyps if h[0] and h[0][-1] == EOS_ID]
            live = [h for h in hyps if not (h[0] and h[0][-1] == EOS_ID)]
            candidates = list(done)
            if live:
                decoder_inputs = np.zeros((len(live), t + 1), np.int32)  # shifted right: start token PAD
                decoder_inputs[:, 1:] = [p for p, _ in live]
                logits = np.asarray(T5(config).apply({"params": params}, np.repeat(row[None], len(live), 0),
                                                     decoder_inputs), np.float64)[:, t]
                logp = logits - logits.max(-1, keepdims=True)
                logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
                for (prefix, score), lp in zip(live, logp, strict=True):
                    candidates += [((*prefix, v), score + lp[v]) for v in range(config.vocab_size)]
            order = np.argsort([-s for _, s in candidates], kind="stable")[:BEAM]  # numpy top-k
            hyps = [candidates[i] for i in order]
        out.append(hyps)
    return out


def _table_from_generations(corpus, reference, fixed_length, text_vocab_size):
    """An identifier table whose identifiers include generated sequences of three kinds: of a test image
    (the query's own relevant image where free, so hits exist), of a train image (out of split), and none
    (left out: invalid). Every other image gets an identifier nothing generated."""
    generated = {s for hyps in reference for s, _ in hyps}
    def text(token):  # a text-vocabulary token other than PAD/EOS (ids >= text size are padding rows)
        return token not in (PAD_ID, EOS_ID) and token < text_vocab_size

    shaped = (lambda s: len(s) == 2 and text(s[0]) and text(s[1])) if fixed_length else (
        lambda s: len(s) == 2 and text(s[0]) and s[1] == EOS_ID)
    test_ids = [corpus.images[i].id for i in corpus.image_rows("test")]
    train_ids = [corpus.images[i].id for i in corpus.image_rows("train")]
    assigned: dict[str, tuple[int, ...]] = {}
    roles = {"test": set(), "train": set(), "left out": set()}
    for q, hyps in enumerate(reference):
        for seq, _ in (s for s in hyps if shaped(s[0])):
            if any(seq in v for v in roles.values()):
                continue
            role = ("test", "train", "left out")[sum(map(len, roles.values())) % 3]  # rotate over new sequences
            if role == "test":
                own = [i for i in corpus.queries[corpus.query_rows("test")[q]].image_ids if i not in assigned]
                image = (own or [i for i in test_ids if i not in assigned])[0]
            elif role == "train":
                image = next(i for i in train_ids if i not in assigned)
            if role != "left out":
                assigned[image] = seq
            roles[role].add(seq)
    if fixed_length:
        fillers = iter((a, b) for a in range(3, text_vocab_size) for b in range(3, text_vocab_size)
                       if (a, b) not in generated)
        filler = lambda: next(fillers)  # noqa: E731
    else:  # 2-token identifiers with EOS are few: the rest share one (policy 'share')
        shared = next((x, EOS_ID) for x in range(3, text_vocab_size) if (x, EOS_ID) not in generated)
        filler = lambda: shared  # noqa: E731
    image_ids = [im.id for im in corpus.images]
    tokens = np.array([assigned[i] if i in assigned else filler() for i in image_ids], np.int32)
    table = IdentifierTable(image_ids=image_ids, tokens=tokens, lengths=np.full(len(image_ids), 2, np.int32),
                            scheme="grace_numeric" if fixed_length else "grace_string", num_new_tokens=0,
                            text_vocab_size=text_vocab_size, fixed_length=fixed_length)
    return table, assigned, roles


@pytest.mark.parametrize("fixed_length", [True, False], ids=["fixed", "eos"])
def test_free_generation_matches_reference_and_counts_invalid(tiny_corpus, model, fixed_length):
    vocab, config, params = model
    if not fixed_length:  # EOS's (tied) embedding row x3 makes EOS likely: (x, EOS) identifiers get generated
        embedding = params["token_embedder"]["embedding"]
        params = {**params, "token_embedder": {"embedding": embedding.at[EOS_ID].multiply(3.0)}}
    corpus = tiny_corpus
    rows = corpus.query_rows("test")[:NUM_QUERIES]
    inputs = np.zeros((len(rows), INPUT_LENGTH), np.int32)
    for i, j in enumerate(rows):
        ids = vocab.encode(corpus.queries[j].text)
        ids = ids if len(ids) <= INPUT_LENGTH else [*ids[:INPUT_LENGTH - 1], EOS_ID]  # cut, EOS kept
        inputs[i, :len(ids)] = ids
    reference = reference_free_beams(params, config, inputs, length=2)
    table, assigned, roles = _table_from_generations(corpus, reference, fixed_length, vocab.text_size)
    assert all(roles.values()), roles  # every kind occurs, so the accounting below is not vacuous

    retrieval_model = RetrievalModel(config, vocab, window=model_window(table, config.vocab_size),
                                     input_length=INPUT_LENGTH, target_length=table.max_len)
    evaluator = RetrievalEvaluator(retrieval_model, corpus, table, "test", beam_size=BEAM, batch_size=4,
                                   constrained=False)
    np.testing.assert_array_equal(evaluator.inputs[:NUM_QUERIES], inputs)
    rankings = evaluator.rankings(params, NUM_QUERIES)

    image_of = {}  # identifier -> test images carrying it, table order (brute force over the assignment)
    for image_id, seq in zip(table.image_ids, map(tuple, table.tokens.tolist()), strict=True):
        if image_id in {corpus.images[i].id for i in corpus.image_rows("test")}:
            image_of.setdefault(seq, []).append(image_id)
    counts = {"invalid": 0, "out": 0, "total": 0}
    for q, hyps in enumerate(reference):
        assert rankings.generated[q] == [s for s, _ in hyps], q
        valid = [s for s, _ in hyps if s in image_of]
        assert rankings.identifiers[q] == valid
        assert rankings.images[q] == [i for s in valid for i in image_of[s]]
        for s, _ in hyps:
            counts["total"] += 1
            counts["invalid"] += s not in image_of and s not in set(assigned.values())
            counts["out"] += s not in image_of and s in set(assigned.values())
    metrics = evaluator.score(rankings)
    assert metrics["invalid_rate"] == pytest.approx(counts["invalid"] / counts["total"])
    assert metrics["out_of_split_rate"] == pytest.approx(counts["out"] / counts["total"])
    assert 0 < metrics["invalid_rate"] < 1 and 0 < metrics["out_of_split_rate"] < 1
    hits = [bool(set(rankings.images[q][:1]) & set(corpus.queries[j].image_ids)) for q, j in enumerate(rows)]
    assert metrics["recall@1"] == pytest.approx(np.mean(hits)) and any(hits)
    assert "recall@10" not in metrics  # beam 8 < 10: inapplicable
