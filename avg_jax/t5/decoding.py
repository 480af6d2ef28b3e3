"""Incremental T5 decoding (one token per step, KV-cached) and the T5 trie-constrained beam search.

This is the T5's only incremental decoder. `decoder_step` is the decoder of `avg_jax.t5.model.T5` for one
new token per row, built from the same layer functions of `avg_jax.t5.layers` that the training forward
pass calls (`embed`, `rms_norm`, `project`, `attention_core`, `attention_output`, `feed_forward`,
`position_bias_row`, `output_logits`), applied to the parameter tree re-laid by `decode_weights`; it is
tested equal to teacher-forced `T5.__call__` step by step and to HuggingFace. Laid out for beam search
(rows = batch * j, j beams per query, beam-minor):
  * the projected encoder keys/values are the same for every beam of a query, so they are computed once
    per query `[batch, heads, length, kv]` (`cross_attention_inputs`) and broadcast over the beams, never
    tiled or reordered: the j beams of a query are the j query positions of its cross-attention;
  * the self-attention query/key/value projections are one `[d, heads, 3 * kv]` matmul (`decode_weights`);
  * the self-attention cache is, per layer, `{'key', 'value'}` `[rows, heads, max_length, kv]` in the
    compute dtype (`init_self_cache`), row-major so the beam search reorders it with gathers;
  * the first step runs on `batch` rows (see `avg_jax.decoding.beam_search`).
The layer functions carry the t5x logical sharding constraints (`batch`, `length`, `embed`, `heads`, `kv`,
`mlp`, `vocab`), so under `avg_jax.partitioning.sharding_context` the step is sharded like training.

`t5_beam_search` drives `avg_jax.decoding.beam_search.beam_search` with this step. Its output head returns
only the vocabulary window the identifiers live in (`avg_jax.decoding.trie.identifier_window`: the
new-token block for voken identifiers) plus, for HuggingFace-compatible full-vocabulary scores ('vocab'),
the log-sum-exp of all logits (optionally `head_chunk_size` columns at a time, never holding
`[rows, vocab]`). With score_normalization 'window' (voken-only softmax) or 'allowed' only the window's
columns are computed.
"""

from __future__ import annotations

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from avg_jax.decoding import trie as trie_lib
from avg_jax.decoding.beam_search import BeamSearchOptions, BeamSearchResult, StepLogits, beam_search
from avg_jax.t5.configs import T5Config
from avg_jax.t5.layers import (
    MASK_VALUE,
    attention_core,
    attention_output,
    embed,
    feed_forward,
    output_logits,
    position_bias_row,
    project,
    rms_norm,
)
from avg_jax.t5.model import T5, encoder_input_mask, scale_head_input

Array = jax.Array
_CACHE_AXES = ("batch", "heads", "length", "kv")


def decode_weights(params: dict, config: T5Config) -> dict:
    """The decoder parameters of `params` re-laid for one-token steps, matrices cast to the compute dtype.

    Per layer: fused self-attention projection `qkv [d, heads, 3 * kv]` (query, key, value per head),
    output kernels `[heads, kv, d]`, cross-attention kernels `[d, heads, kv]`, the MLP dict and the three
    norm scales (float32); plus the embedding, the relative position table and the final norm scale.
    """
    dtype = config.compute_dtype
    layers = []
    for i in range(config.num_decoder_layers):
        p = params["decoder"][f"layers_{i}"]
        sa, ca = p["self_attention"], p["encoder_decoder_attention"]
        qkv = jnp.stack([sa["query"], sa["key"], sa["value"]], axis=2)  # [d, heads, 3, kv]
        layers.append({
            "self_norm": p["pre_self_attention_layer_norm"]["scale"],
            "qkv": qkv.reshape(*qkv.shape[:2], -1).astype(dtype), "self_out": sa["out"].astype(dtype),
            "cross_norm": p["pre_cross_attention_layer_norm"]["scale"],
            **{f"cross_{n}": ca[n].astype(dtype) for n in ("query", "key", "value", "out")},
            "mlp_norm": p["pre_mlp_layer_norm"]["scale"],
            "mlp": {n: w.astype(dtype) for n, w in p["mlp"].items()}})
    return {"embedding": params["token_embedder"]["embedding"].astype(dtype), "layers": layers,
            "relpos": params["decoder"]["layers_0"]["self_attention"]["relpos_bias"]["rel_embedding"],
            "final_norm": params["decoder"]["decoder_norm"]["scale"]}


def cross_attention_inputs(weights: dict, encoded: Array) -> list[tuple[Array, Array]]:
    """Per decoder layer, the encoder keys and values `[batch, heads, length, kv]` of `encoded [batch, length, d]`."""
    encoded = encoded.astype(weights["embedding"].dtype)
    return [(project(encoded, w["cross_key"]), project(encoded, w["cross_value"])) for w in weights["layers"]]


def init_self_cache(config: T5Config, rows: int, max_length: int) -> list[dict]:
    """Per decoder layer, zero self-attention keys/values `[rows, heads, max_length, kv]`."""
    shape = (rows, config.num_heads, max_length, config.d_kv)
    return [{"key": jnp.zeros(shape, config.compute_dtype), "value": jnp.zeros(shape, config.compute_dtype)}
            for _ in range(config.num_decoder_layers)]


def decoder_step(weights: dict, config: T5Config, cache: list[dict], tokens: Array, index: Array,
                 cross: list[tuple[Array, Array]], cross_bias: Array) -> tuple[Array, list[dict]]:
    """One decoder step for `tokens [rows]` at position `index` -> (final-norm hidden [rows, d], new cache).

    Rows are `batch * j` (j beams per query, beam-minor); `cache` from `init_self_cache`, `cross` from
    `cross_attention_inputs`; `cross_bias [batch, length]` is 0 for encoder tokens and MASK_VALUE for padding.
    """
    rows, batch = tokens.shape[0], cross_bias.shape[0]
    dtype, eps = config.compute_dtype, config.layer_norm_epsilon
    max_length = cache[0]["key"].shape[2]
    self_bias = (position_bias_row(weights["relpos"], index, max_length, False, config.relative_attention_num_buckets,
                                   config.relative_attention_max_distance)
                 + jnp.where(jnp.arange(max_length) <= index, 0.0, MASK_VALUE))  # [1, heads, 1, max_length]
    cross_bias = cross_bias[:, None, None, :]  # [batch, 1, 1, length]
    x = embed(weights["embedding"], tokens[:, None], dtype)  # [rows, 1, d]
    new_cache = []
    for w, layer_cache, (cross_key, cross_value) in zip(weights["layers"], cache, cross, strict=True):
        y = rms_norm(x, w["self_norm"], eps, dtype)
        query, key, value = jnp.split(project(y, w["qkv"]), 3, axis=-1)  # each [rows, heads, 1, kv]
        keys, values = (nn.with_logical_constraint(jax.lax.dynamic_update_slice(c, new, (0, 0, index, 0)), _CACHE_AXES)
                        for c, new in ((layer_cache["key"], key), (layer_cache["value"], value)))
        x = x + attention_output(attention_core(query, keys, values, self_bias), w["self_out"])
        y = rms_norm(x, w["cross_norm"], eps, dtype).reshape(batch, rows // batch, -1)  # beams as query positions
        y = attention_core(project(y, w["cross_query"]), cross_key, cross_value, cross_bias)  # [batch, heads, j, kv]
        x = x + attention_output(y, w["cross_out"]).reshape(x.shape)
        x = x + feed_forward(rms_norm(x, w["mlp_norm"], eps, dtype), w["mlp"])
        new_cache.append({"key": keys, "value": values})
    return rms_norm(x, weights["final_norm"], eps, dtype)[:, 0], new_cache


def head_matrix(params: dict, config: T5Config) -> Array:
    """The output projection as `[vocab, d_model]` rows (tied embedding or transposed `lm_head`)."""
    if config.tie_word_embeddings:
        return params["token_embedder"]["embedding"]
    return params["lm_head"].T


def chunked_logsumexp(x: Array, rows: Array, chunk: int) -> Array:
    """log-sum-exp over all `rows [vocab, d]` of the logits of `x [n, d]`, `chunk` columns at a time -> [n]."""
    vocab, d = rows.shape
    num_chunks = -(-vocab // chunk)
    padded = jnp.pad(rows, ((0, num_chunks * chunk - vocab), (0, 0))).reshape(num_chunks, chunk, d)
    pad_bias = jnp.where(jnp.arange(num_chunks * chunk) < vocab, 0.0, -jnp.inf).reshape(num_chunks, chunk)

    def step(carry, inputs):
        m, s = carry  # running max and sum of exp(logit - max), [n]
        w, bias = inputs
        logits = output_logits(x, w) + bias
        m_new = jnp.maximum(m, logits.max(-1))
        s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[:, None]).sum(-1)
        return (m_new, s), None

    init = (jnp.full(x.shape[:1], -jnp.inf, jnp.float32), jnp.zeros(x.shape[:1], jnp.float32))
    (m, s), _ = jax.lax.scan(step, init, (padded, pad_bias))
    return m + jnp.log(s)


@gin.configurable(denylist=["params", "config", "input_ids", "tables", "options", "window", "max_length",
                            "eos_id", "prefix_features", "token_bias"])
def t5_beam_search(params: dict, config: T5Config, input_ids: jax.Array, tables: trie_lib.TrieTables | None, *,
                   options: BeamSearchOptions, window: tuple[int, int] | None = None,
                   max_length: int | None = None, eos_id: int | None = None,
                   head_chunk_size: int = 2048, prefix_features: jax.Array | None = None,
                   token_bias: jax.Array | None = None) -> BeamSearchResult:
    """Constrained beam search of T5 for `input_ids [batch, length]` (pure; jit with static config/options).

    `window` = (first column, size) of the vocabulary the identifiers live in (`trie.identifier_window`);
    None = the whole vocabulary. `tables=None` decodes unconstrained for up to `max_length` steps (free
    generation; `eos_id` ends a beam, see `beam_search`).
    `head_chunk_size` > 0 computes the full-vocabulary log-normaliser that many columns at a time (on CPU
    about 1.4x faster than materialising `[rows, vocab]` logits for T5-small); 0 = one matmul.
    `prefix_features` [batch, image_feature_dim]: the encoder's soft-token prefix (`T5Config.num_image_tokens`
    tokens through its image projection, e.g. a query-conditioning vector); None = no prefix.
    `token_bias` [batch, window size]: a per-query score added to every step's candidates (`beam_search`).
    """
    batch, beam = input_ids.shape[0], options.beam_size
    max_length = tables.max_length if tables is not None else max_length
    if max_length is None:
        raise ValueError("t5_beam_search: unconstrained search needs max_length")
    start, size = (0, config.vocab_size) if window is None else window
    full_window = (start, size) == (0, config.vocab_size)
    norm = options.score_normalization

    encoded = T5(config).apply({"params": params}, input_ids, prefix_features,
                               method=T5.encode)  # [batch, prefix + length, d]
    prefix = config.num_image_tokens if prefix_features is not None else 0
    cross_bias = jnp.where(encoder_input_mask(input_ids, prefix), 0.0, MASK_VALUE)  # [batch, prefix + length]
    weights = decode_weights(params, config)
    cross = cross_attention_inputs(weights, encoded)
    head = head_matrix(params, config).astype(config.compute_dtype)  # [vocab, d]
    head_window = head if full_window else jax.lax.dynamic_slice_in_dim(head, start, size)

    def tokens_to_logits(state):
        hidden, cache = decoder_step(weights, config, state.cache, state.cur_token, state.cur_index, cross,
                                     cross_bias)
        x = scale_head_input(hidden, config)  # [rows, d]
        if norm == "vocab" and not full_window and not head_chunk_size:  # one matmul: slice + normaliser
            logits = output_logits(x, head)  # [rows, vocab]
            return StepLogits(logits[:, start:start + size], jax.nn.logsumexp(logits, axis=-1)), cache
        logits = output_logits(x, head_window)  # [rows, size]
        normalizer = None
        if norm == "vocab" and not full_window:
            normalizer = chunked_logsumexp(x, head, head_chunk_size)
        return StepLogits(logits, normalizer), cache

    first_rows = batch if options.share_first_step else batch * beam
    return beam_search(tokens_to_logits, tables, init_self_cache(config, first_rows, max_length),
                       batch_size=batch, options=options, column_offset=start, max_length=max_length,
                       eos_id=eos_id, token_bias=token_bias)
