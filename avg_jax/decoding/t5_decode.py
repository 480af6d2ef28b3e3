"""T5 decoding for the constrained beam search: encode once, then KV-cached one-token decoder steps.

`decoder_step` is `T5.decode(..., decode=True)` re-laid for beam search (tested equal to it and to HF):
  * the projected encoder keys/values are the same for every beam of a query, so they are computed once
    per query `[batch, heads, length, kv]` and broadcast over the beams, never tiled or reordered;
  * the self-attention query/key/value projections are one `[d, 3 * heads * kv]` matmul;
  * the first step runs on `batch` rows (see beam_search.py).
The output head returns only the vocabulary window the identifiers live in (the new-token block for
voken identifiers) plus, for HuggingFace-compatible full-vocabulary scores ('vocab'), the log-sum-exp of
all logits (optionally `head_chunk_size` columns at a time, never holding `[rows, vocab]`). With
score_normalization 'window' (voken-only softmax) or 'allowed' only the window's columns are computed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from avg_jax.decoding import trie as trie_lib
from avg_jax.decoding.beam_search import BeamSearchOptions, BeamSearchResult, StepLogits, beam_search
from avg_jax.t5.configs import T5Config
from avg_jax.t5.layers import MASK_VALUE, mixed_einsum, relative_position_bucket
from avg_jax.t5.model import T5, encoder_input_mask


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
        logits = mixed_einsum("nd,cd->nc", x, w, jnp.float32) + bias
        m_new = jnp.maximum(m, logits.max(-1))
        s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[:, None]).sum(-1)
        return (m_new, s), None

    init = (jnp.full(x.shape[:1], -jnp.inf, jnp.float32), jnp.zeros(x.shape[:1], jnp.float32))
    (m, s), _ = jax.lax.scan(step, init, (padded, pad_bias))
    return m + jnp.log(s)


def _rms_norm(x: jax.Array, scale: jax.Array, epsilon: float) -> jax.Array:
    """T5 layer norm (as `avg_jax.t5.layers.RMSNorm`): statistics in float32, no mean, no bias."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + epsilon)
    return (x32 * scale).astype(x.dtype)


def decode_weights(params: dict, config: T5Config) -> dict:
    """Decoder parameters re-laid for one-token steps (fused self-attention projection), compute dtype."""
    dtype, d = config.compute_dtype, config.d_model
    hd = config.num_heads * config.d_kv
    layers = []
    for i in range(config.num_decoder_layers):
        p = params["decoder"][f"layers_{i}"]
        sa, ca = p["self_attention"], p["encoder_decoder_attention"]
        qkv = jnp.concatenate([sa[n].reshape(d, hd) for n in ("query", "key", "value")], axis=1)
        layers.append({
            "self_norm": p["pre_self_attention_layer_norm"]["scale"], "qkv": qkv.astype(dtype),
            "self_out": sa["out"].reshape(hd, d).astype(dtype),
            "cross_norm": p["pre_cross_attention_layer_norm"]["scale"],
            "cross_query": ca["query"].reshape(d, hd).astype(dtype),
            "cross_key": ca["key"].astype(dtype), "cross_value": ca["value"].astype(dtype),
            "cross_out": ca["out"].reshape(hd, d).astype(dtype),
            "mlp_norm": p["pre_mlp_layer_norm"]["scale"],
            "mlp": {n: w.astype(dtype) for n, w in p["mlp"].items()}})
    return {"embedding": params["token_embedder"]["embedding"].astype(dtype), "layers": layers,
            "relpos": params["decoder"]["layers_0"]["self_attention"]["relpos_bias"]["rel_embedding"],
            "final_norm": params["decoder"]["decoder_norm"]["scale"]}


def cross_attention_inputs(weights: dict, encoded: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    """Per decoder layer, the encoder keys and values `[batch, heads, length, kv]` (once per query)."""
    encoded = encoded.astype(weights["embedding"].dtype)
    return [(mixed_einsum("bld,dhk->bhlk", encoded, w["cross_key"]),
             mixed_einsum("bld,dhk->bhlk", encoded, w["cross_value"])) for w in weights["layers"]]


def init_self_cache(config: T5Config, rows: int, max_length: int) -> list[dict]:
    """Per decoder layer, zero self-attention keys/values `[rows, max_length, heads, kv]`."""
    shape = (rows, max_length, config.num_heads, config.d_kv)
    return [{"key": jnp.zeros(shape, config.compute_dtype), "value": jnp.zeros(shape, config.compute_dtype)}
            for _ in range(config.num_decoder_layers)]


def decoder_step(weights: dict, config: T5Config, cache: list[dict], tokens: jax.Array, index: jax.Array,
                 cross: list[tuple[jax.Array, jax.Array]], cross_bias: jax.Array) -> tuple[jax.Array, list[dict]]:
    """One decoder step for `tokens [rows]` at position `index` -> (final-norm hidden [rows, d], cache).

    Rows are `batch * j` (j beams per query, beam-minor); `cross_bias [batch, length]` is 0 for encoder
    tokens and MASK_VALUE for padding.
    """
    rows, batch = tokens.shape[0], cross_bias.shape[0]
    h, dk = config.num_heads, config.d_kv
    max_length = cache[0]["key"].shape[1]
    offsets = np.arange(-(max_length - 1), max_length)  # every key-minus-query offset
    buckets = jnp.asarray(relative_position_bucket(offsets, False, config.relative_attention_num_buckets,
                                                   config.relative_attention_max_distance), jnp.int32)
    key_position = jnp.arange(max_length)
    self_bias = (jnp.take(weights["relpos"], jnp.take(buckets, key_position - index + max_length - 1), axis=1)
                 + jnp.where(key_position <= index, 0.0, MASK_VALUE)[None, :])  # [heads, max_length]
    x = jnp.take(weights["embedding"], tokens, axis=0)  # [rows, d]
    eps = config.layer_norm_epsilon
    new_cache = []
    for w, layer_cache, (cross_key, cross_value) in zip(weights["layers"], cache, cross, strict=True):
        y = _rms_norm(x, w["self_norm"], eps)
        qkv = mixed_einsum("nd,df->nf", y, w["qkv"]).reshape(rows, 1, 3, h, dk)
        q, k, v = jnp.split(qkv, 3, axis=2)  # each [rows, 1, 1, h, kv]
        keys = jax.lax.dynamic_update_slice(layer_cache["key"], k[:, :, 0], (0, index, 0, 0))  # [rows, T, h, kv]
        values = jax.lax.dynamic_update_slice(layer_cache["value"], v[:, :, 0], (0, index, 0, 0))
        logits = mixed_einsum("nhd,nthd->nht", q[:, 0, 0], keys, jnp.float32) + self_bias
        attended = mixed_einsum("nht,nthd->nhd", jax.nn.softmax(logits, -1).astype(values.dtype), values)
        x = x + mixed_einsum("nf,fd->nd", attended.reshape(rows, h * dk), w["self_out"])
        y = _rms_norm(x, w["cross_norm"], eps)
        q = mixed_einsum("nd,df->nf", y, w["cross_query"]).reshape(batch, rows // batch, h, dk)
        logits = mixed_einsum("bjhd,bhld->bjhl", q, cross_key, jnp.float32) + cross_bias[:, None, None, :]
        attended = mixed_einsum("bjhl,bhld->bjhd", jax.nn.softmax(logits, -1).astype(cross_value.dtype),
                                cross_value)
        x = x + mixed_einsum("nf,fd->nd", attended.reshape(rows, h * dk), w["cross_out"])
        y = _rms_norm(x, w["mlp_norm"], eps)
        mlp = w["mlp"]
        if config.gated:
            hidden = (jax.nn.gelu(mixed_einsum("nd,df->nf", y, mlp["wi_0"]), approximate=True)
                      * mixed_einsum("nd,df->nf", y, mlp["wi_1"]))
        else:
            hidden = jax.nn.relu(mixed_einsum("nd,df->nf", y, mlp["wi"]))
        x = x + mixed_einsum("nf,fd->nd", hidden, mlp["wo"])
        new_cache.append({"key": keys, "value": values})
    return _rms_norm(x, weights["final_norm"], eps), new_cache


@gin.configurable(denylist=["params", "config", "input_ids", "tables", "options", "window", "max_length",
                            "eos_id"])
def t5_beam_search(params: dict, config: T5Config, input_ids: jax.Array, tables: trie_lib.TrieTables | None, *,
                   options: BeamSearchOptions, window: tuple[int, int] | None = None,
                   max_length: int | None = None, eos_id: int | None = None,
                   head_chunk_size: int = 2048) -> BeamSearchResult:
    """Constrained beam search of T5 for `input_ids [batch, length]` (pure; jit with static config/options).

    `window` = (first column, size) of the vocabulary the identifiers live in (`identifier_window`);
    None = the whole vocabulary. `tables=None` decodes unconstrained for up to `max_length` steps (free
    generation; `eos_id` ends a beam, see `beam_search`).
    `head_chunk_size` > 0 computes the full-vocabulary log-normaliser that many columns at a time (on CPU
    about 1.4x faster than materialising `[rows, vocab]` logits for T5-small); 0 = one matmul.
    """
    batch, beam = input_ids.shape[0], options.beam_size
    max_length = tables.max_length if tables is not None else max_length
    if max_length is None:
        raise ValueError("t5_beam_search: unconstrained search needs max_length")
    start, size = (0, config.vocab_size) if window is None else window
    full_window = (start, size) == (0, config.vocab_size)
    norm = options.score_normalization

    encoded = T5(config).apply({"params": params}, input_ids, method=T5.encode)  # [batch, length, d]
    cross_bias = jnp.where(encoder_input_mask(input_ids), 0.0, MASK_VALUE)  # [batch, length]
    weights = decode_weights(params, config)
    cross = cross_attention_inputs(weights, encoded)
    head = head_matrix(params, config).astype(config.compute_dtype)  # [vocab, d]
    head_window = head if full_window else jax.lax.dynamic_slice_in_dim(head, start, size)
    scale = config.d_model ** -0.5 if config.scale_logits else 1.0

    def tokens_to_logits(state):
        hidden, cache = decoder_step(weights, config, state.cache, state.cur_token, state.cur_index, cross,
                                     cross_bias)
        x = hidden * jnp.asarray(scale, hidden.dtype)  # [rows, d]
        if norm == "vocab" and not full_window and not head_chunk_size:  # one matmul: slice + normaliser
            logits = mixed_einsum("nd,vd->nv", x, head, jnp.float32)  # [rows, vocab]
            return StepLogits(logits[:, start:start + size], jax.nn.logsumexp(logits, axis=-1)), cache
        logits = mixed_einsum("nd,vd->nv", x, head_window, jnp.float32)  # [rows, size]
        normalizer = None
        if norm == "vocab" and not full_window:
            normalizer = chunked_logsumexp(x, head, head_chunk_size)
        return StepLogits(logits, normalizer), cache

    first_rows = batch if options.share_first_step else batch * beam
    return beam_search(tokens_to_logits, tables, init_self_cache(config, first_rows, max_length),
                       batch_size=batch, options=options, column_offset=start, max_length=max_length,
                       eos_id=eos_id)


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
