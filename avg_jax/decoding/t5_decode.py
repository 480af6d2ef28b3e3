"""T5 adapter for the constrained beam search: encode once, then KV-cached one-token decoder steps.

The adapter owns two savings the model cannot see:
  * the projected encoder keys/values (cross-attention cache) are identical for the beams of a query,
    so they are kept out of the cache the beam search reorders: computed once per query and tiled once;
  * the output head. With identifiers made of new tokens (vokens) only the window
    [text_vocab_size, text_vocab_size + num_new_tokens) of the vocabulary can ever be scored, so the
    head returns those columns plus, for HuggingFace-compatible full-vocabulary scores, the log-sum-exp of
    all logits computed chunk by chunk (`head_chunk_size`), never materialising `[rows, vocab]`. With
    score_normalization 'window' or 'allowed' only the window's columns are computed at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gin
import jax
import jax.numpy as jnp
from flax import traverse_util

from avg_jax.decoding import trie as trie_lib
from avg_jax.decoding.beam_search import BeamSearchOptions, BeamSearchResult, StepLogits, beam_search
from avg_jax.t5.configs import T5Config
from avg_jax.t5.model import T5, encoder_input_mask, init_decode_cache

CROSS_CACHE_KEYS = ("cached_cross_key", "cached_cross_value")


def identifier_window(trie: trie_lib.Trie, vocab_size: int, text_vocab_size: int | None = None
                      ) -> tuple[int, int]:
    """(first column, number of columns) the head must return for `trie`'s tokens.

    New-token identifiers: the new-token block [text_vocab_size, vocab_size) (fixed by the vocabulary,
    so swapping the image set keeps the compiled search); anything else: the whole vocabulary.
    """
    lo, hi = trie.token_range
    if hi > vocab_size:
        raise ValueError(f"identifier token {hi - 1} is outside the model vocabulary of {vocab_size}")
    if text_vocab_size is not None and lo >= text_vocab_size:
        return text_vocab_size, vocab_size - text_vocab_size
    return 0, vocab_size


def head_matrix(params: dict, config: T5Config) -> jax.Array:
    """The output projection as `[vocab, d_model]` rows (tied embedding or transposed `lm_head`)."""
    if config.tie_word_embeddings:
        return params["token_embedder"]["embedding"]
    return params["lm_head"].T


def chunked_logsumexp(x: jax.Array, rows: jax.Array, chunk: int) -> jax.Array:
    """log-sum-exp over all `rows [vocab, d]` of `x [n, d] @ rows.T`, `chunk` columns at a time."""
    vocab, d = rows.shape
    num_chunks = -(-vocab // chunk)
    padded = jnp.pad(rows, ((0, num_chunks * chunk - vocab), (0, 0))).reshape(num_chunks, chunk, d)
    pad_bias = jnp.where(jnp.arange(num_chunks * chunk) < vocab, 0.0, -jnp.inf).reshape(num_chunks, chunk)

    def step(carry, inputs):
        m, s = carry  # running max and sum of exp(logit - max), [n]
        w, bias = inputs
        logits = jnp.einsum("nd,cd->nc", x, w.astype(x.dtype), preferred_element_type=jnp.float32) + bias
        m_new = jnp.maximum(m, logits.max(-1))
        s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[:, None]).sum(-1)
        return (m_new, s), None

    init = (jnp.full(x.shape[:1], -jnp.inf, jnp.float32), jnp.zeros(x.shape[:1], jnp.float32))
    (m, s), _ = jax.lax.scan(step, init, (padded, pad_bias))
    return m + jnp.log(s)


def _decoder_hidden(module: T5, token_ids: jax.Array, encoder_mask: jax.Array) -> jax.Array:
    """One cached decoder step: `[rows, 1]` ids -> final-norm hidden states `[rows, 1, d_model]`."""
    return module.decoder(module.token_embedder(token_ids), None, encoder_mask, True, decode=True)


def _split_cross(cache: dict) -> tuple[dict, dict]:
    """(per-row self-attention cache, per-query cross-attention keys/values), both flat dicts."""
    flat = traverse_util.flatten_dict(cache)
    cross = {k: v for k, v in flat.items() if k[-1] in CROSS_CACHE_KEYS}
    return {k: v for k, v in flat.items() if k[-1] not in CROSS_CACHE_KEYS}, cross


@gin.configurable(denylist=["params", "config", "input_ids", "tables", "options", "window", "max_length"])
def t5_beam_search(params: dict, config: T5Config, input_ids: jax.Array, tables: trie_lib.TrieTables | None, *,
                   options: BeamSearchOptions, window: tuple[int, int] | None = None,
                   max_length: int | None = None, head_chunk_size: int = 4096) -> BeamSearchResult:
    """Constrained beam search of T5 for `input_ids [batch, length]` (pure; jit with static config/options).

    `window` = (first column, size) of the vocabulary the identifiers live in (`identifier_window`);
    None = the whole vocabulary. `tables=None` decodes unconstrained for `max_length` steps.
    """
    model = T5(config)
    batch, beam = input_ids.shape[0], options.beam_size
    max_length = tables.max_length if tables is not None else max_length
    if max_length is None:
        raise ValueError("t5_beam_search: unconstrained search needs max_length")
    start, size = (0, config.vocab_size) if window is None else window
    full_window = (start, size) == (0, config.vocab_size)
    norm = options.score_normalization

    encoded = model.apply({"params": params}, input_ids, method=T5.encode)  # [batch, length, d]
    mask = encoder_input_mask(input_ids)  # [batch, length]
    cache = init_decode_cache(model, params, encoded, mask, max_length)
    self_cache, cross = _split_cross(cache)
    per_query = (cross, mask)
    per_row = (jax.tree.map(lambda x: jnp.repeat(x, beam, axis=0), cross), jnp.repeat(mask, beam, axis=0))
    head = head_matrix(params, config)  # [vocab, d]
    head_window = jax.lax.dynamic_slice_in_dim(head, start, size) if not full_window else head
    scale = config.d_model ** -0.5 if config.scale_logits else 1.0

    def tokens_to_logits(state):
        rows = state.cur_token.shape[0]
        cross_kv, cross_mask = per_query if rows == batch else per_row
        variables = {"params": params, "cache": traverse_util.unflatten_dict({**state.cache, **cross_kv})}
        hidden, mutated = model.apply(variables, state.cur_token[:, None], cross_mask, method=_decoder_hidden,
                                      mutable=["cache"])
        x = hidden[:, 0] * jnp.asarray(scale, hidden.dtype)  # [rows, d]
        logits = jnp.einsum("nd,vd->nv", x, head_window.astype(x.dtype), preferred_element_type=jnp.float32)
        normalizer = None
        if norm == "vocab" and not full_window:
            normalizer = chunked_logsumexp(x, head, head_chunk_size)
        new_cache, _ = _split_cross(mutated["cache"])
        return StepLogits(logits, normalizer), new_cache

    if not options.share_first_step:
        self_cache = jax.tree.map(lambda x: jnp.repeat(x, beam, axis=0) if x.ndim else x, self_cache)
    return beam_search(tokens_to_logits, tables, self_cache, batch_size=batch, options=options,
                       column_offset=start, max_length=max_length)


def make_t5_searcher(config: T5Config, options: BeamSearchOptions, window: tuple[int, int] | None = None,
                     max_length: int | None = None, **head_options: Any
                     ) -> Callable[[dict, Any, jax.Array], BeamSearchResult]:
    """`jit(search)(params, tables, input_ids)`: tables and params are inputs, so new image sets reuse it.

    `head_options` (e.g. head_chunk_size) override the gin bindings of `t5_beam_search`.
    """

    def search(params, tables, input_ids):
        return t5_beam_search(params, config, input_ids, tables, options=options, window=window,
                              max_length=max_length, **head_options)

    return jax.jit(search)
