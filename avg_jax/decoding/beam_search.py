"""Trie-constrained beam search as one pure, jit-able function over a `tokens_to_logits` callback.

Model-agnostic: the search knows tries (`avg_jax.decoding.trie`) and a callback, never a model. The T5
package drives it from its own decoding module (`t5_beam_search`), with its incremental decoder step as
the callback; `trie.identifier_window` says which vocabulary columns such a callback must return.

Every step gathers each beam's `max_fanout` trie children (`trie.children`), scores only those
columns and ranks `beam * max_fanout` candidates: no `[rows, vocab]` mask is ever built. Beams that
reached a leaf (an identifier ending with EOS) are finished and carry over unchanged; beams without a
valid continuation sit in the trie's sink with score -inf, so a beam wider than the trie pads with -inf
and never repeats or invents an identifier. All shapes are static, control flow is `lax`, the trie
tables are traced inputs.

Callback contract (t5x style): `tokens_to_logits(DecodingState) -> (out, new_cache)` where `out` is
either logits `[rows, columns]` or a `StepLogits(logits, log_normalizer)`; column `j` is vocabulary id
`column_offset + j`, so a model may return only the identifier-token columns plus, for full-vocabulary
scores, the log-sum-exp over its whole vocabulary. Cache leaves with a leading dimension of `rows` are
per beam row and are reordered by gathers; other leaves (e.g. a scalar `cache_index`) are left alone.
The first step sees `batch` rows (the decoder start token is the same for every beam, so it is computed
once per query and its cache tiled to `batch * beam` rows), later steps `batch * beam` rows.

Scores (`score_normalization`):
  'vocab'   sum of token log-probabilities under the full-vocabulary softmax (HuggingFace `generate`).
  'window'  softmax over the returned columns only (e.g. a head restricted to the voken rows).
  'allowed' softmax over the tokens the trie allows at each step (renormalised constrained scores).
`score_forced_steps=False` (constrained search only): a step where the trie allows exactly one token adds 0
to the score instead of that token's log-probability, so a forced token (e.g. the only collision suffix of an
identifier body) cannot penalise an identifier; True (default) scores every step as above.

`token_bias [batch, columns]` (optional): a per-query score added to every candidate token of every step
(shallow fusion of a per-query prior over the returned columns, e.g. the aligned-voken prior of
`retrieval.model.Reranker.voken_bias`): an
identifier's score is its log-probability under the chosen normalisation plus the sum of its tokens' biases.
The bias is added on forced steps too (it is not a probability the model spreads over one child); a finished
beam's carry-over adds nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import gin
import jax
import jax.numpy as jnp

from avg_jax.data.vocab import PAD_ID
from avg_jax.decoding import trie as trie_lib

SCORE_NORMALIZATIONS = ("vocab", "window", "allowed")
NEG_INF = float("-inf")


class DecodingState(NamedTuple):
    """What the callback sees at one step."""

    cur_index: jax.Array  # [] int32: decoder position of `cur_token` (0 holds the decoder start token)
    cur_token: jax.Array  # [rows] int32
    cache: Any


class StepLogits(NamedTuple):
    """Logits of a window of vocabulary columns plus, optionally, the full-vocabulary log-normaliser."""

    logits: jax.Array  # [rows, columns]
    log_normalizer: jax.Array | None = None  # [rows]; None = log-sum-exp of `logits`


class BeamSearchResult(NamedTuple):
    """Best-first beams of every query; invalid slots (beam wider than the trie) have score -inf."""

    tokens: jax.Array  # [batch, beam, max_length] int32, PAD after an identifier's end
    scores: jax.Array  # [batch, beam] float32, non-increasing along beam
    groups: jax.Array  # [batch, beam] int32 trie group (identifier) index, -1 = no result


TokensToLogits = Callable[[DecodingState], tuple[Any, Any]]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class BeamSearchOptions:
    """Static beam-search settings (gin: `BeamSearchOptions.beam_size = 20` ...)."""

    beam_size: int = 20
    score_normalization: str = "vocab"
    share_first_step: bool = True
    score_forced_steps: bool = True  # False: a trie step with exactly one allowed child adds 0 (module doc)

    def __post_init__(self):
        if self.beam_size < 1:
            raise ValueError(f"BeamSearchOptions.beam_size must be >= 1, got {self.beam_size}")
        if self.score_normalization not in SCORE_NORMALIZATIONS:
            raise ValueError(f"BeamSearchOptions.score_normalization={self.score_normalization!r}, "
                             f"expected one of {SCORE_NORMALIZATIONS}")


def _logits_and_normalizer(out: Any, score_normalization: str) -> tuple[jax.Array, jax.Array]:
    """float32 logits `[rows, columns]` and the log-normaliser `[rows]` for 'vocab'/'window' scores."""
    logits, log_normalizer = out if isinstance(out, StepLogits) else (out, None)
    logits = logits.astype(jnp.float32)
    if score_normalization == "window" or log_normalizer is None:
        return logits, jax.nn.logsumexp(logits, axis=-1)
    return logits, log_normalizer.astype(jnp.float32)


def candidate_log_probs(out: Any, tokens: jax.Array, valid: jax.Array, column_offset: int,
                        score_normalization: str, score_forced_steps: bool = True) -> jax.Array:
    """Log-probabilities `[rows, F]` of candidate `tokens [rows, F]` (-inf where not `valid`); with
    `score_forced_steps=False` rows with exactly one valid candidate score it 0."""
    logits, lse = _logits_and_normalizer(out, score_normalization)
    columns = jnp.clip(tokens - column_offset, 0, logits.shape[-1] - 1)
    picked = jnp.take_along_axis(logits, columns, axis=-1)  # [rows, F]
    if score_normalization == "allowed":
        lse = jax.nn.logsumexp(jnp.where(valid, picked, NEG_INF), axis=-1)
        lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    logp = picked - lse[:, None]
    if not score_forced_steps:
        logp = jnp.where((valid.sum(axis=-1) == 1)[:, None], 0.0, logp)
    return jnp.where(valid, logp, NEG_INF)


def unconstrained_candidates(out: Any, beam: int, column_offset: int, score_normalization: str,
                             bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Each row's best `beam` tokens over all returned columns: (scores, tokens), each [rows, beam]; a score
    is the token's log-probability plus its `bias [rows, columns]` (if any)."""
    logits, lse = _logits_and_normalizer(out, score_normalization)
    logp = logits - lse[:, None]
    logp, columns = jax.lax.top_k(logp if bias is None else logp + bias, min(beam, logits.shape[-1]))
    return logp, columns + column_offset


def _add_bias(logp: jax.Array, bias: jax.Array | None, tokens: jax.Array, column_offset: int) -> jax.Array:
    """Candidate scores `logp [rows, F]` plus the `bias [rows, columns]` of their `tokens [rows, F]`."""
    if bias is None:
        return logp
    columns = jnp.clip(tokens - column_offset, 0, bias.shape[-1] - 1)
    return logp + jnp.take_along_axis(bias, columns, axis=-1)


def _finished(tokens: jax.Array, eos_id: int | None) -> jax.Array:
    """Unconstrained search state of beams that just emitted `tokens`: 1 = finished (EOS), 0 = running."""
    if eos_id is None:
        return jnp.zeros_like(tokens)
    return (tokens == eos_id).astype(jnp.int32)


def _reorder_cache(cache: Any, rows: int, index: jax.Array) -> Any:
    """Gather per-row cache leaves (leading dim `rows`) along axis 0."""
    return jax.tree.map(lambda x: x[index] if x.ndim >= 1 and x.shape[0] == rows else x, cache)


def _tile_cache(cache: Any, batch: int, beam: int) -> Any:
    """Repeat per-query cache leaves (leading dim `batch`) to `batch * beam` rows, beam-minor."""
    return jax.tree.map(lambda x: jnp.repeat(x, beam, axis=0) if x.ndim >= 1 and x.shape[0] == batch else x,
                        cache)


def _top_beams(totals: jax.Array, beam: int) -> tuple[jax.Array, jax.Array]:
    """Top `beam` of `totals [batch, beam_in, F]`: (scores [batch, beam], flat index into beam_in * F)."""
    batch, beam_in, width = totals.shape
    if width > beam:  # exact two-stage top-k: no row contributes more than `beam` winners
        row_scores, row_index = jax.lax.top_k(totals, beam)  # [batch, beam_in, beam]
        scores, pick = jax.lax.top_k(row_scores.reshape(batch, beam_in * beam), beam)
        flat = jnp.take_along_axis(row_index.reshape(batch, -1), pick, axis=1) + (pick // beam) * width
        return scores, flat
    flat_totals = totals.reshape(batch, beam_in * width)
    if beam_in * width < beam:
        flat_totals = jnp.pad(flat_totals, ((0, 0), (0, beam - beam_in * width)), constant_values=NEG_INF)
    scores, flat = jax.lax.top_k(flat_totals, beam)
    return scores, jnp.minimum(flat, beam_in * width - 1)


def beam_search(tokens_to_logits: TokensToLogits, tables: trie_lib.TrieTables | None, cache: Any, *,
                batch_size: int, options: BeamSearchOptions, column_offset: int = 0,
                max_length: int | None = None, eos_id: int | None = None,
                token_bias: jax.Array | None = None) -> BeamSearchResult:
    """Top `beam_size` identifiers per query, best first (`token_bias [batch, columns]`: module docstring).

    `cache` has `batch_size` rows when `options.share_first_step` (the default), else `batch * beam`
    rows (beam-minor). `tables=None` runs the same search unconstrained over the returned columns for up
    to `max_length` steps: free generation. With `eos_id` a beam that emits it is finished and carries over
    unchanged (PAD after it, as a trie leaf does), so variable-length sequences compete by their full
    scores; with None EOS is not special (every beam runs `max_length` steps: the constraint-cost baseline).
    """
    beam, norm, forced = options.beam_size, options.score_normalization, options.score_forced_steps
    batch, rows = batch_size, batch_size * options.beam_size
    if tables is None:
        if max_length is None:
            raise ValueError("beam_search: unconstrained search (tables=None) needs max_length")
        if norm == "allowed":
            raise ValueError("beam_search: score_normalization='allowed' needs trie tables")
    else:
        if eos_id is not None:
            raise ValueError("beam_search: eos_id is for unconstrained search; the trie ends identifiers itself")
        max_length = tables.max_length if max_length is None else max_length
        if max_length != tables.max_length:
            raise ValueError(f"beam_search: max_length={max_length} but the trie's identifiers have "
                             f"{tables.max_length} tokens")

    if token_bias is not None and token_bias.shape[0] != batch:
        raise ValueError(f"beam_search: token_bias has {token_bias.shape[0]} rows for a batch of {batch}")
    row_bias = None if token_bias is None else jnp.repeat(token_bias.astype(jnp.float32), beam, axis=0)
    query_bias = None if token_bias is None else token_bias.astype(jnp.float32)

    # Step 0: the decoder start token, identical for all beams of a query.
    first_rows = batch if options.share_first_step else rows
    out, cache = tokens_to_logits(DecodingState(jnp.zeros((), jnp.int32), jnp.full((first_rows,), PAD_ID,
                                                                                  jnp.int32), cache))
    if not options.share_first_step:  # keep beam 0 of each query
        out = jax.tree.map(lambda x: x.reshape(batch, beam, *x.shape[1:])[:, 0], out)
    if tables is None:  # state: 1 = finished (emitted eos_id), else 0
        logp0, tok0 = unconstrained_candidates(out, beam, column_offset, norm, query_bias)
        state0 = _finished(tok0, eos_id)
    else:
        tok0, state0, valid0 = trie_lib.children(tables, jnp.zeros((batch,), jnp.int32), width=tables.root_fanout)
        logp0 = _add_bias(candidate_log_probs(out, tok0, valid0, column_offset, norm, forced), query_bias, tok0,
                          column_offset)  # [batch, root_fanout]
    scores, flat = _top_beams(logp0[:, None, :], beam)  # [batch, beam]
    states = jnp.take_along_axis(state0, flat, axis=1)
    first = jnp.take_along_axis(tok0, flat, axis=1)
    if tables is not None:
        states = jnp.where(jnp.isneginf(scores), tables.sink, states)
    seq = jnp.zeros((batch, beam, max_length), jnp.int32).at[:, :, 0].set(first)
    if options.share_first_step:
        cache = _tile_cache(cache, batch, beam)

    def alive(states):
        if tables is None:
            return jnp.any(states == 0)
        return jnp.any(trie_lib.num_children(tables, states) > 0)

    def cond(carry):
        t, _, states, _, _ = carry
        return (t < max_length) & alive(states)

    def body(carry):
        t, scores, states, seq, cache = carry
        cur = jnp.take_along_axis(seq, jnp.full((batch, beam, 1), t - 1), axis=2).reshape(rows)
        out, cache = tokens_to_logits(DecodingState(t, cur, cache))
        flat_states = states.reshape(rows)
        if tables is None:
            logp, tokens = unconstrained_candidates(out, beam, column_offset, norm, row_bias)
            next_states = _finished(tokens, eos_id)
            # A finished beam has one candidate: itself, unchanged, emitting PAD.
            done = (flat_states == 1)[:, None]
            stay = done & (jnp.arange(logp.shape[1]) == 0)
            logp = jnp.where(stay, 0.0, jnp.where(done, NEG_INF, logp))
            tokens = jnp.where(stay, PAD_ID, tokens)
            next_states = jnp.where(done, 1, next_states)
        else:
            tokens, next_states, valid = trie_lib.children(tables, flat_states)
            logp = _add_bias(candidate_log_probs(out, tokens, valid, column_offset, norm, forced), row_bias, tokens,
                             column_offset)  # [rows, F]
            # A finished beam (at a leaf) has one candidate: itself, unchanged, emitting PAD.
            stay = (tables.node_group[flat_states] >= 0)[:, None] & (jnp.arange(logp.shape[1]) == 0)
            logp = jnp.where(stay, 0.0, logp)
            tokens = jnp.where(stay, PAD_ID, tokens)
            next_states = jnp.where(stay, flat_states[:, None], next_states)
        width = logp.shape[1]
        totals = scores[:, :, None] + logp.reshape(batch, beam, width)
        new_scores, flat = _top_beams(totals, beam)  # [batch, beam]
        parent = flat // width
        new_states = jnp.take_along_axis(next_states.reshape(batch, beam * width), flat, axis=1)
        new_tokens = jnp.take_along_axis(tokens.reshape(batch, beam * width), flat, axis=1)
        if tables is not None:
            new_states = jnp.where(jnp.isneginf(new_scores), tables.sink, new_states)
        seq = jnp.take_along_axis(seq, parent[:, :, None], axis=1).at[:, :, t].set(new_tokens)
        row_index = (jnp.arange(batch)[:, None] * beam + parent).reshape(rows)
        return t + 1, new_scores, new_states, seq, _reorder_cache(cache, rows, row_index)

    carry = (jnp.ones((), jnp.int32), scores, states, seq, cache)
    _, scores, states, seq, _ = jax.lax.while_loop(cond, body, carry)
    if tables is None:
        return BeamSearchResult(seq, scores, jnp.full((batch, beam), -1, jnp.int32))
    groups = tables.node_group[states]
    ok = groups >= 0
    return BeamSearchResult(jnp.where(ok[:, :, None], seq, PAD_ID), jnp.where(ok, scores, NEG_INF),
                            jnp.where(ok, groups, -1))
