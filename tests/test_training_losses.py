"""AVG losses (eqs. 7-9) against plain numpy/Python references on fixed logits and random candidate lists."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from avg_jax.training import losses


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _np_sequence_score(logits: np.ndarray, target: list[int]) -> float:
    """Sum over non-PAD positions of log softmax(logits[t])[target[t]], one sequence, by a Python loop."""
    logp = _np_log_softmax(logits)
    return float(sum(logp[t, tok] for t, tok in enumerate(target) if tok != 0))


def _np_discriminative(logits, candidates, valid, positive, draw):
    """Reference of the listwise loss with positive injection and duplicate masking, one query at a time.

    logits [b, k, L, V] are the teacher-forced logits of the candidates AFTER injection (fixed inputs).
    `draw` [b, k] are the random numbers of the seeded draw that picks the slot to replace.
    """
    out, positions, found_all = [], [], []
    for q in range(len(candidates)):
        cands = [tuple(int(t) for t in c) for c in candidates[q]]
        ok = [bool(v) for v in valid[q]]
        pos = tuple(int(t) for t in positive[q])
        found = [j for j in range(len(cands)) if ok[j] and cands[j] == pos]
        if found:
            p = found[0]
        else:
            invalid = [j for j in range(len(cands)) if not ok[j]]
            pool = invalid if invalid else list(range(len(cands)))
            p = max(pool, key=lambda j: draw[q][j])
            cands[p], ok[p] = pos, True
        seen, keep = set(), []
        for j, c in enumerate(cands):
            keep.append(ok[j] and c not in seen)
            if ok[j]:
                seen.add(c)
        scores = [_np_sequence_score(logits[q, j], list(cands[j])) for j in range(len(cands))]
        kept = np.array([s for s, k in zip(scores, keep, strict=True) if k])
        lse = np.log(np.exp(kept - kept.max()).sum()) + kept.max()
        out.append(lse - scores[p])
        positions.append(p)
        found_all.append(bool(found))
    return np.array(out), np.array(positions), np.array(found_all)


def _jax_discriminative(logits, candidates, valid, positive, rng):
    out = _jax_discriminative_arrays(*(jnp.asarray(x) for x in (logits, candidates, valid, positive)), rng)
    return tuple(np.asarray(x) for x in out)


_jitted_discriminative = jax.jit(lambda *a: _jax_discriminative_arrays(*a))


def _jax_discriminative_arrays(logits, candidates, valid, positive, rng):
    cands, p, ok, found = losses.inject_positive(candidates, valid, positive, rng)
    keep = losses.duplicate_free(cands, ok)
    return losses.listwise_loss(losses.sequence_scores(logits, cands), p, keep), p, found, cands


def test_discriminative_loss_fixed_example_with_injection_and_duplicates():
    """Query 0: positive found at slot 2 and a duplicate at slot 3. Query 1: positive missing, an invalid
    slot (beam wider than the trie) is replaced. Query 2: positive missing, all valid: a random slot."""
    V, L = 11, 3
    candidates = np.array([
        [[5, 6, 7], [5, 6, 8], [9, 9, 9], [5, 6, 8]],
        [[5, 6, 7], [5, 6, 8], [0, 0, 0], [0, 0, 0]],
        [[5, 6, 7], [5, 6, 8], [9, 9, 9], [9, 8, 7]],
    ], np.int32)
    valid = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]], bool)
    positive = np.array([[9, 9, 9], [7, 7, 7], [7, 7, 7]], np.int32)
    logits = np.random.default_rng(0).standard_normal((3, 4, L, V)).astype(np.float32) * 3
    rng = jax.random.key(42)
    draw = np.asarray(jax.random.uniform(rng, valid.shape))
    got, p, found, cands = _jax_discriminative(logits, candidates, valid, positive, rng)
    want, want_p, want_found = _np_discriminative(logits, candidates, valid, positive, draw)
    np.testing.assert_array_equal(want_found, [True, False, False])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_array_equal(p, want_p)
    np.testing.assert_array_equal(found, [True, False, False])
    assert p[0] == 2 and p[1] in (2, 3)
    np.testing.assert_array_equal(cands[1, p[1]], [7, 7, 7])
    np.testing.assert_array_equal(cands[0], candidates[0])  # nothing replaced where the positive was found


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), tokens=st.integers(1, 3), p_valid=st.floats(0.0, 1.0))
def test_discriminative_loss_matches_reference_on_random_candidates(seed, tokens, p_valid):
    """Few distinct tokens -> frequent duplicates and frequent positive hits; PAD tails; invalid slots.
    Shapes are fixed (one compile); variety comes from contents, validity and identifier lengths."""
    rng = np.random.default_rng(seed)
    b, k, length, V = 3, 5, 4, 8
    candidates = rng.integers(1, tokens + 1, size=(b, k, length)).astype(np.int32)
    cut = rng.integers(1, length + 1, size=(b, k))
    candidates[np.arange(length)[None, None, :] >= cut[..., None]] = 0  # PAD after each identifier
    valid = rng.random((b, k)) < p_valid
    positive = rng.integers(1, tokens + 1, size=(b, length)).astype(np.int32)
    logits = rng.standard_normal((b, k, length, V)).astype(np.float32)
    key = jax.random.key(seed)
    got, p, found, _ = (np.asarray(x) for x in _jitted_discriminative(logits, candidates, valid, positive, key))
    want, want_p, want_found = _np_discriminative(logits, candidates, valid, positive,
                                                  np.asarray(jax.random.uniform(key, valid.shape)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(p, want_p)
    np.testing.assert_array_equal(found, want_found)
    assert np.all(got >= -1e-6)  # a probability's negative log


def test_generative_loss_matches_numpy_with_padding_and_z_loss():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((4, 5, 9)).astype(np.float32) * 2
    targets = np.array([[3, 4, 5, 1, 0], [2, 2, 0, 0, 0], [8, 7, 6, 5, 4], [1, 0, 0, 0, 0]], np.int32)
    weights = np.array([1.0, 1.0, 1.0, 0.0], np.float32)  # the last row is batch padding
    z = 1e-2
    loss, metrics = losses.generative_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), z)
    nll, zz = [], []
    for i in range(3):
        nll.append(-_np_sequence_score(logits[i], list(targets[i])))
        lse = np.log(np.exp(logits[i].astype(np.float64)).sum(-1))
        zz.append(z * sum(lse[t] ** 2 for t in range(5) if targets[i, t] != 0))
    np.testing.assert_allclose(float(metrics["gen_loss"]), np.mean(nll), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["z_loss"]), np.mean(zz), rtol=1e-5)
    np.testing.assert_allclose(float(loss), np.mean(nll) + np.mean(zz), rtol=1e-5)
