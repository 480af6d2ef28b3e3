"""Constrained beam search against exhaustive teacher forcing and a pygtrie + numpy beam search.

The model is a toy recurrent LM with a cache pytree: a per-row hidden state (reordered by the search)
and a scalar position (must not be reordered), h' = tanh(h A + E[token]), logits = h' W + b[position].
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from trie_cases import identifier_sets, pad_identifiers, reference_children, reference_trie

from avg_jax.data.vocab import EOS_ID, PAD_ID
from avg_jax.decoding import trie as trie_lib
from avg_jax.decoding.beam_search import BeamSearchOptions, StepLogits, beam_search

VOCAB, DIM, POSITIONS = 16, 6, 8


class ToyLM:
    """Numpy parameters, a jax `tokens_to_logits` and a float64 numpy reference step."""

    def __init__(self, seed: int, num_queries: int = 4):
        rng = np.random.default_rng(seed)
        self.a = rng.normal(size=(DIM, DIM)) * 0.6
        self.e = rng.normal(size=(VOCAB, DIM))
        self.w = rng.normal(size=(DIM, VOCAB)) * 1.5
        self.b = rng.normal(size=(POSITIONS, VOCAB))
        self.h0 = rng.normal(size=(num_queries, DIM))

    def initial_cache(self, rows_per_query: int = 1):
        h = np.repeat(self.h0, rows_per_query, axis=0)
        return {"h": jnp.asarray(h, jnp.float32), "index": jnp.zeros((), jnp.int32)}

    def tokens_to_logits(self, state, window=None, full_normalizer=True):
        cache = state.cache
        h = jnp.tanh(cache["h"] @ jnp.asarray(self.a, jnp.float32) + jnp.asarray(self.e, jnp.float32)[state.cur_token])
        logits = h @ jnp.asarray(self.w, jnp.float32) + jnp.asarray(self.b, jnp.float32)[cache["index"]]
        logits = logits + 100.0 * (cache["index"] - state.cur_index)  # wrong scalar cache -> wrong scores
        new_cache = {"h": h, "index": cache["index"] + 1}
        if window is None:
            return logits, new_cache
        lo, hi = window
        lse = jax.nn.logsumexp(logits, axis=-1) if full_normalizer else None
        return StepLogits(logits[:, lo:hi], lse), new_cache

    def step_np(self, h, token, position):
        h = np.tanh(h @ self.a + self.e[token])
        return h, h @ self.w + self.b[position]


def log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def normalized(logits, allowed, norm, window):
    """Reference log-probabilities of `allowed` tokens under a normalisation mode."""
    if norm == "vocab":
        return log_softmax(logits)[allowed]
    if norm == "window":
        lo, hi = window
        return log_softmax(logits[lo:hi])[np.asarray(allowed) - lo]
    return log_softmax(logits[allowed])


def teacher_forced(model, query, identifier, ref, norm="vocab", window=None):
    """Score of one identifier: sum of its token log-probabilities (float64)."""
    h, total, prev = model.h0[query], 0.0, PAD_ID
    for t, token in enumerate(identifier):
        h, logits = model.step_np(h, prev, t)
        allowed = reference_children(ref, identifier[:t]) if norm == "allowed" else [token]
        total += normalized(logits, allowed, norm, window)[allowed.index(token)]
        prev = token
    return total


def reference_beam_search(model, query, ref, beam, max_length, norm="vocab", window=None):
    """A plain beam search over pygtrie children; finished hypotheses carry over unchanged."""
    hyps = [((), 0.0, model.h0[query], False)]
    for t in range(max_length):
        candidates = []
        for prefix, score, h, done in hyps:
            if done:
                candidates.append((prefix, score, h, True))
                continue
            h_new, logits = model.step_np(h, prefix[-1] if prefix else PAD_ID, t)
            kids = reference_children(ref, prefix)
            for token, lp in zip(kids, normalized(logits, kids, norm, window), strict=True):
                new = (*prefix, token)
                candidates.append((new, score + lp, h_new, ref.has_key(new)))
        hyps = sorted(candidates, key=lambda c: -c[1])[:beam]
    return [(prefix, score) for prefix, score, _, _ in hyps]


@functools.cache
def compiled_search(model_seed, beam, norm="vocab", share_first_step=True, window=None, full_normalizer=True,
                    batch=4, score_forced_steps=True):
    model = MODELS[model_seed]
    options = BeamSearchOptions(beam_size=beam, score_normalization=norm, share_first_step=share_first_step,
                                score_forced_steps=score_forced_steps)
    step = functools.partial(model.tokens_to_logits, window=window, full_normalizer=full_normalizer)
    return jax.jit(functools.partial(beam_search, step, batch_size=batch, options=options,
                                     column_offset=0 if window is None else window[0]))


MODELS = {seed: ToyLM(seed) for seed in range(3)}
CAPACITY = {"node_capacity": 256, "edge_capacity": 256, "max_fanout": 16, "root_fanout": 16}


def run_search(identifiers, model_seed=0, beam=4, **kwargs):
    """Our search on all 4 toy queries -> (trie, list per query of [(identifier, score)], raw result)."""
    tokens, lengths = pad_identifiers(identifiers)
    trie = trie_lib.build_trie(tokens=tokens, lengths=lengths, **CAPACITY)
    share = kwargs.get("share_first_step", True)
    cache = MODELS[model_seed].initial_cache(1 if share else beam)
    result = jax.device_get(compiled_search(model_seed, beam, **kwargs)(tables=trie.tables, cache=cache))
    ranked = []
    for q in range(result.scores.shape[0]):
        ranked.append([(tuple(int(x) for x in result.tokens[q, j][:trie.group_lengths[g]]), float(s))
                       for j, (g, s) in enumerate(zip(result.groups[q], result.scores[q], strict=True)) if g >= 0])
    return trie, ranked, result


def check_invariants(trie, result, identifiers, beam):
    """Valid identifiers only, no duplicates, non-increasing scores, -inf padding at the tail."""
    valid_set = set(identifiers)
    for q in range(result.scores.shape[0]):
        groups, scores, tokens = result.groups[q], result.scores[q], result.tokens[q]
        ok = groups >= 0
        assert ok.sum() == min(beam, trie.num_groups)
        assert ok[:ok.sum()].all()  # valid first, padding after
        assert np.isneginf(scores[~ok]).all() and np.isfinite(scores[ok]).all()
        assert (np.diff(scores[ok]) <= 1e-6).all()
        assert len(set(groups[ok].tolist())) == ok.sum()
        for g, row in zip(groups[ok], tokens[ok], strict=True):
            ident = tuple(int(x) for x in row[:trie.group_lengths[g]])
            assert ident in valid_set
            assert (row[trie.group_lengths[g]:] == PAD_ID).all()
        assert (tokens[~ok] == PAD_ID).all()


def exhaustive_ranking(model, query, identifiers, norm="vocab", window=None):
    ref = reference_trie(identifiers)
    scored = [(ident, teacher_forced(model, query, ident, ref, norm, window)) for ident in ref.keys()]
    return sorted(scored, key=lambda x: -x[1])


def assert_same_ranking(ours, expected, atol=1e-5):
    assert [i for i, _ in ours] == [i for i, _ in expected]
    np.testing.assert_allclose([s for _, s in ours], [s for _, s in expected], atol=atol, rtol=0)


FIXED = [(3, 4, 5), (3, 4, 6), (3, 7, 5), (8, 4, 5), (8, 9, 9), (3, 4, 5), (10, 3, 3)]
VARIABLE = [(3, 1), (3, 4, 1), (3, 4, 5, 1), (6, 1), (6, 7, 7, 1), (3, 4, 1), (9, 9, 1)]


@pytest.mark.parametrize("identifiers", [FIXED, VARIABLE], ids=["fixed", "variable"])
@pytest.mark.parametrize("norm", ["vocab", "window", "allowed"])
def test_exhaustive_reference(identifiers, norm):
    """beam >= number of identifiers: the ranking of every identifier scored by teacher forcing."""
    window = (1, 12) if norm == "window" else None
    trie, ranked, result = run_search(identifiers, beam=8, norm=norm, window=window, full_normalizer=False)
    check_invariants(trie, result, identifiers, beam=8)
    for q, ours in enumerate(ranked):
        assert_same_ranking(ours, exhaustive_ranking(MODELS[0], q, identifiers, norm, window))


# Collision-suffix shaped: bodies (3, 4) and (8, 9) are shared (two suffixes), the others have one (forced) suffix.
SUFFIXED = [(3, 4, 10), (3, 4, 11), (3, 7, 10), (8, 4, 10), (8, 9, 10), (8, 9, 11), (5, 3, 10)]


@pytest.mark.parametrize("identifiers", [FIXED, VARIABLE, SUFFIXED], ids=["fixed", "variable", "suffixed"])
@pytest.mark.parametrize("norm", ["vocab", "window"])
def test_unscored_forced_steps_match_exhaustive_enumeration(identifiers, norm):
    """`score_forced_steps=False`: every identifier's score is the teacher-forced sum over the steps where the
    trie allows more than one token (a step with exactly one child adds 0); the search ranks all of them."""
    window = (1, 12) if norm == "window" else None
    trie, ranked, result = run_search(identifiers, beam=8, norm=norm, window=window, full_normalizer=False,
                                      score_forced_steps=False)
    check_invariants(trie, result, identifiers, beam=8)
    ref = reference_trie(identifiers)
    model = MODELS[0]
    for q, ours in enumerate(ranked):
        expected = []
        for ident in ref.keys():
            h, total, prev = model.h0[q], 0.0, PAD_ID
            for t, token in enumerate(ident):
                h, logits = model.step_np(h, prev, t)
                kids = reference_children(ref, ident[:t])
                if len(kids) > 1:
                    total += normalized(logits, [token], norm, window)[0]
                prev = token
            expected.append((ident, total))
        assert_same_ranking(ours, sorted(expected, key=lambda x: -x[1]))
    _, scored, _ = run_search(identifiers, beam=8, norm=norm, window=window, full_normalizer=False)
    if identifiers is SUFFIXED:  # forced suffixes were penalised before
        assert scored != ranked


@pytest.mark.parametrize("identifiers", [FIXED, SUFFIXED], ids=["fixed", "suffixed"])
@pytest.mark.parametrize("forced", [True, False], ids=["scored", "unscored-forced"])
@pytest.mark.parametrize("window", [None, (1, 12)], ids=["full", "window"])
def test_token_bias_is_added_to_every_step_of_exhaustive_enumeration(identifiers, forced, window):
    """`token_bias [batch, columns]`: each identifier's score = teacher-forced log-prob (forced steps 0 when
    unscored) + the sum of its tokens' per-query biases, forced steps included; the search ranks all of them."""
    tokens, lengths = pad_identifiers(identifiers)
    trie = trie_lib.build_trie(tokens=tokens, lengths=lengths, **CAPACITY)
    columns = VOCAB if window is None else window[1] - window[0]
    offset = 0 if window is None else window[0]
    bias = np.random.default_rng(7).normal(size=(4, columns)).astype(np.float32) * 2.0
    search = compiled_search(0, 8, window=window, score_forced_steps=forced)
    result = jax.device_get(search(tables=trie.tables, cache=MODELS[0].initial_cache(),
                                   token_bias=jnp.asarray(bias)))
    ref = reference_trie(identifiers)
    model = MODELS[0]
    for q in range(4):
        ours = [(tuple(int(x) for x in result.tokens[q, j][:trie.group_lengths[g]]), float(s))
                for j, (g, s) in enumerate(zip(result.groups[q], result.scores[q], strict=True)) if g >= 0]
        expected = []
        for ident in ref.keys():
            h, total, prev = model.h0[q], 0.0, PAD_ID
            for t, token in enumerate(ident):
                h, logits = model.step_np(h, prev, t)
                if forced or len(reference_children(ref, ident[:t])) > 1:
                    total += log_softmax(logits)[token]
                total += bias[q, token - offset]
                prev = token
            expected.append((ident, total))
        assert_same_ranking(ours, sorted(expected, key=lambda x: -x[1]), atol=1e-4)
    with pytest.raises(ValueError, match="token_bias has 3 rows"):
        search(tables=trie.tables, cache=MODELS[0].initial_cache(), token_bias=jnp.asarray(bias[:3]))


def test_token_bias_in_free_generation_is_exhaustive():
    """Free generation (EOS ends a beam) with a bias: every possible output, scored by float64 teacher forcing
    plus its tokens' biases (the carried-over PAD of a finished beam adds nothing), best first."""
    model, length, window = MODELS[1], 3, (0, 5)
    every = free_sequences(range(*window), length)
    bias = np.random.default_rng(3).normal(size=(4, 5)).astype(np.float32)
    options = BeamSearchOptions(beam_size=len(every))
    step = functools.partial(model.tokens_to_logits, window=window)
    result = jax.device_get(jax.jit(functools.partial(
        beam_search, step, None, batch_size=4, options=options, max_length=length, eos_id=EOS_ID))(
        cache=model.initial_cache(), token_bias=jnp.asarray(bias)))
    for q in range(4):
        expected = {s: teacher_forced(model, q, s, None, window=window) + sum(bias[q, t] for t in s) for s in every}
        ours = free_ranking(result, q)
        assert sorted(s for s, _ in ours) == sorted(every)
        assert dict(ours) == pytest.approx(expected, abs=1e-4)
        assert [sc for _, sc in ours] == sorted((sc for _, sc in ours), reverse=True)


@pytest.mark.parametrize("identifiers", [FIXED, VARIABLE], ids=["fixed", "variable"])
def test_narrow_beam_matches_reference_beam_search(identifiers):
    for beam in (1, 2, 3):
        _, ranked, _ = run_search(identifiers, beam=beam)
        for q, ours in enumerate(ranked):
            expected = reference_beam_search(MODELS[0], q, reference_trie(identifiers), beam, len(max(identifiers,
                                                                                                   key=len)))
            assert_same_ranking(ours, expected)


def test_first_step_sharing_and_column_window_do_not_change_results():
    _, base, _ = run_search(VARIABLE, beam=3)
    _, unshared, _ = run_search(VARIABLE, beam=3, share_first_step=False)
    _, windowed, _ = run_search(VARIABLE, beam=3, window=(1, 12), full_normalizer=True)
    # Same identifiers in the same order; scores equal up to float32 summation order (one ulp of a score near
    # -20 is 1.9e-6, which XLA's CPU backends reach on some CPUs, e.g. the 2-core AMD EPYC).
    for a, b, c in zip(base, unshared, windowed, strict=True):
        assert_same_ranking(a, b, atol=4e-6)
        assert_same_ranking(a, c, atol=4e-6)


def test_swapping_tries_reuses_the_compiled_search():
    search = compiled_search(1, 5)
    before = search._cache_size()
    for identifiers in (FIXED, [(4, 4, 4), (5, 5, 5)], [(7, 8, 9)] * 3):
        trie, _, result = run_search(identifiers, model_seed=1, beam=5)
        check_invariants(trie, result, identifiers, beam=5)
    assert search._cache_size() == max(before, 1)


def test_unconstrained_search_matches_reference():
    model, beam, length = MODELS[2], 3, 3
    options = BeamSearchOptions(beam_size=beam)
    result = jax.jit(functools.partial(beam_search, model.tokens_to_logits, None, batch_size=4, options=options,
                                       max_length=length))(cache=model.initial_cache())
    every = [(a, b, c) for a in range(VOCAB) for b in range(VOCAB) for c in range(VOCAB)]
    for q in range(4):
        expected = reference_beam_search(model, q, reference_trie(every), beam, length)
        ours = [(tuple(int(x) for x in row), float(s)) for row, s in zip(result.tokens[q], result.scores[q],
                                                                          strict=True)]
        assert_same_ranking(ours, expected)


def free_sequences(alphabet, length):
    """Every sequence free generation can end with: EOS-terminated within `length` tokens (no EOS before), or
    `length` tokens without EOS (PAD is an ordinary token here)."""
    body = [t for t in alphabet if t != EOS_ID]
    out = []
    for n in range(length + 1):
        for prefix in itertools.product(body, repeat=n):
            if n < length:
                out.append((*prefix, EOS_ID))
            elif n == length:
                out.append(prefix)
    return out


def free_ranking(result, q):
    """Our unconstrained beams of query q as (sequence cut after its EOS, score), -inf slots dropped."""
    ours = []
    for row, score in zip(result.tokens[q], result.scores[q], strict=True):
        row = [int(x) for x in row]
        if np.isfinite(score):
            ours.append((tuple(row[:row.index(EOS_ID) + 1] if EOS_ID in row else row), float(score)))
    return ours


@pytest.mark.parametrize("norm", ["vocab", "window"])
def test_unconstrained_with_eos_is_exhaustive_free_generation(norm):
    """Free generation over a 5-token window (PAD, EOS, 3 more) for up to 3 steps: with a beam as wide as the
    number of possible outputs, every one of them comes back, scored by float64 teacher forcing and sorted."""
    model, length, window = MODELS[1], 3, (0, 5)
    every = free_sequences(range(*window), length)  # 1 + 4 + 16 + 64 = 85
    options = BeamSearchOptions(beam_size=len(every), score_normalization=norm)
    step = functools.partial(model.tokens_to_logits, window=window)
    result = jax.device_get(jax.jit(functools.partial(
        beam_search, step, None, batch_size=4, options=options, max_length=length, eos_id=EOS_ID))(
        cache=model.initial_cache()))
    for q in range(4):
        scored = [(s, teacher_forced(model, q, s, None, norm=norm, window=window)) for s in every]
        expected = sorted(scored, key=lambda c: -c[1])
        ours = free_ranking(result, q)
        assert sorted(s for s, _ in ours) == sorted(every)  # each exactly once
        np.testing.assert_allclose([sc for _, sc in ours], [sc for _, sc in expected], atol=1e-4, rtol=0)
        assert dict(ours) == pytest.approx(dict(expected), abs=1e-4)
        for row, (seq, _) in zip(result.tokens[q], ours, strict=True):  # PAD after the EOS
            assert list(row[len(seq):]) == [PAD_ID] * (length - len(seq))


@pytest.mark.parametrize("beam", [1, 3, 7])
def test_unconstrained_with_eos_matches_a_reference_beam_search(beam):
    """A narrow beam equals the plain reference beam search over the trie of all free outputs (finished
    hypotheses carried over), on the full 16-token vocabulary for 4 steps."""
    model, length = MODELS[2], 4
    options = BeamSearchOptions(beam_size=beam)
    result = jax.device_get(jax.jit(functools.partial(
        beam_search, model.tokens_to_logits, None, batch_size=4, options=options, max_length=length,
        eos_id=EOS_ID))(cache=model.initial_cache()))
    ref = reference_trie(free_sequences(range(VOCAB), length))
    for q in range(4):
        assert_same_ranking(free_ranking(result, q), reference_beam_search(model, q, ref, beam, length))


def test_bad_options_raise():
    with pytest.raises(ValueError, match="score_normalization"):
        BeamSearchOptions(score_normalization="softmax")
    with pytest.raises(ValueError, match="beam_size"):
        BeamSearchOptions(beam_size=0)
    with pytest.raises(ValueError, match="eos_id is for unconstrained search"):
        tokens, lengths = pad_identifiers(FIXED)
        tables = trie_lib.build_trie(tokens=tokens, lengths=lengths, **CAPACITY).tables
        beam_search(MODELS[0].tokens_to_logits, tables, MODELS[0].initial_cache(), batch_size=4,
                    options=BeamSearchOptions(), eos_id=EOS_ID)
    with pytest.raises(ValueError, match="needs max_length"):
        beam_search(MODELS[0].tokens_to_logits, None, MODELS[0].initial_cache(), batch_size=4,
                    options=BeamSearchOptions())


@settings(max_examples=30, deadline=None)
@given(identifier_sets(max_tokens=3, max_size=12, max_token=12), st.sampled_from([3, 16]))
def test_random_tries_property(identifiers, beam):
    """Random tries (shared prefixes, prefixes of others, beam > fan-out): invariants + reference."""
    trie, ranked, result = run_search(identifiers, beam=beam)
    check_invariants(trie, result, identifiers, beam)
    ref = reference_trie(identifiers)
    for q, ours in enumerate(ranked):
        assert_same_ranking(ours, reference_beam_search(MODELS[0], q, ref, beam, trie.tables.max_length))
