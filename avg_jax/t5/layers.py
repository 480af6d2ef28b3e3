"""T5 building blocks in flax.linen: RMS norm, embedding, relative position buckets, attention, MLP.

Every parameter is created through `nn.with_logical_partitioning` and every large activation passes
`nn.with_logical_constraint`, so the axis names below (t5x convention) decide the sharding through the
rules of `avg_jax.partitioning`; without rules in scope the constraints are no-ops.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avg_jax.t5.configs import T5Config

# Added to attention logits of masked keys: finite, so a fully masked row gives uniform weights, never NaN.
MASK_VALUE = -1e10

Array = jax.Array


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> np.ndarray:
    """Bucket of each key-minus-query offset (T5 / Mesh TF scheme), computed on the host in float32.

    Half the buckets (per direction when bidirectional) are exact offsets, the rest grow logarithmically
    up to `max_distance`; decoders only see non-positive offsets.
    """
    rel = np.asarray(relative_position, dtype=np.int64)
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(np.int64) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    # float32 arithmetic in the same order as the reference implementations, so boundary offsets agree
    scaled = (np.log(np.maximum(rel, 1).astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact))
    large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
    return buckets + np.where(is_small, rel, large)


def logical_param(module: nn.Module, name: str, init, shape: tuple[int, ...], axes: tuple[str, ...]) -> Array:
    """A float32 parameter annotated with its logical axis names."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def normal_init(std: float):
    """Zero-mean normal initialiser (T5's Mesh TF initialisation uses fan-in-scaled normals)."""
    return nn.initializers.normal(stddev=std)


class RMSNorm(nn.Module):
    """T5 layer norm: scale only, no mean subtraction, no bias; statistics in float32."""

    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = logical_param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return (x32 * scale).astype(self.dtype)


class Embed(nn.Module):
    """Token embedding table [vocab, embed]; `attend` reuses it as the (tied) output projection."""

    num_embeddings: int
    features: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embedding = logical_param(self, "embedding", normal_init(1.0), (self.num_embeddings, self.features),
                                ("vocab", "embed"))

    def __call__(self, ids: Array) -> Array:
        # [batch, length] -> [batch, length, embed]
        x = jnp.take(self.embedding, ids, axis=0).astype(self.dtype)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))

    def attend(self, x: Array) -> Array:
        # [batch, length, embed] -> [batch, length, vocab]
        logits = mixed_einsum("bld,vd->blv", x.astype(self.dtype), self.embedding, jnp.float32)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


class RelativePositionBias(nn.Module):
    """Learned per-head scalar bias for each relative-position bucket."""

    num_heads: int
    num_buckets: int
    max_distance: int
    bidirectional: bool
    init_std: float

    @nn.compact
    def __call__(self, buckets: Array) -> Array:
        # buckets [q, k] int -> bias [1, heads, q, k] float32
        table = logical_param(self, "rel_embedding", normal_init(self.init_std), (self.num_heads, self.num_buckets),
                       ("heads", "relpos_buckets"))
        return jnp.take(table, buckets, axis=1)[None]

    def full(self, q_len: int, k_len: int) -> Array:
        """Bias of queries 0..q_len-1 against keys 0..k_len-1."""
        rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
        return self(jnp.asarray(self.buckets(rel), jnp.int32))

    def row(self, query_position: Array, k_len: int) -> Array:
        """Bias [1, heads, 1, k_len] of one (traced) query position, for incremental decoding."""
        offsets = np.arange(-(k_len - 1), k_len)  # every key-minus-query offset that can occur
        table = jnp.asarray(self.buckets(offsets), jnp.int32)
        rel = jnp.arange(k_len) - query_position + (k_len - 1)
        return self(jnp.take(table, rel)[None, :])

    def buckets(self, rel: np.ndarray) -> np.ndarray:
        return relative_position_bucket(rel, self.bidirectional, self.num_buckets, self.max_distance)


def mixed_einsum(spec: str, x: Array, w: Array, out_dtype: jnp.dtype | None = None) -> Array:
    """einsum of `x` and `w` (cast to x's dtype) accumulated in float32, returned in `out_dtype` (default x's).

    TPUs and GPUs accumulate low-precision products in float32 anyway; XLA:CPU takes its bf16 matrix-unit
    path (AMX) only for a float32 result, ~6x faster than a bf16 result on the dev machine.
    """
    y = jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    return y.astype(x.dtype if out_dtype is None else out_dtype)


def attention_core(query: Array, key: Array, value: Array, bias: Array, dropout: nn.Dropout,
                   deterministic: bool) -> Array:
    """softmax(q k^T + bias) v with float32 logits; no 1/sqrt(d) scaling (T5 folds it into the init)."""
    # query [batch, heads, q, kv], key/value [batch, heads, k, kv], bias broadcastable to [batch, heads, q, k]
    logits = mixed_einsum("bhqd,bhkd->bhqk", query, key, jnp.float32)
    weights = jax.nn.softmax(logits + bias, axis=-1).astype(value.dtype)
    weights = dropout(weights, deterministic=deterministic)
    return mixed_einsum("bhqk,bhkd->bhqd", weights, value)


class Attention(nn.Module):
    """Multi-head attention with T5 projections; self-attention may own the relative position bias.

    kinds: 'encoder' (bidirectional self), 'decoder' (causal self, with a key/value cache when
    decode=True) and 'cross' (decoder over encoder outputs; decode=True caches the projected encoder
    keys/values once, so incremental steps only project the new token).
    """

    config: T5Config
    kind: str
    has_relative_bias: bool = False

    @nn.compact
    def __call__(self, x: Array, kv_inputs: Array | None, mask_bias: Array | None,
                 position_bias: Array | None, deterministic: bool, decode: bool = False,
                 init_cache: bool = False) -> tuple[Array, Array | None]:
        """Returns (output [batch, q, embed], the position bias used, for the next layers to share).

        mask_bias: additive [batch|1, 1, q|1, k] (0 or MASK_VALUE); ignored for 'decoder' with decode=True,
        which masks keys past the cache index itself. init_cache=True only creates the cache.
        """
        cfg = self.config
        h, dk, d = cfg.num_heads, cfg.d_kv, cfg.d_model
        axes = ("embed", "heads", "kv")
        q_kernel = logical_param(self, "query", normal_init((d * dk) ** -0.5), (d, h, dk), axes)
        k_kernel = logical_param(self, "key", normal_init(d ** -0.5), (d, h, dk), axes)
        v_kernel = logical_param(self, "value", normal_init(d ** -0.5), (d, h, dk), axes)
        o_kernel = logical_param(self, "out", normal_init((h * dk) ** -0.5), (h, dk, d), ("heads", "kv", "embed"))
        relpos = None
        if self.has_relative_bias:
            relpos = RelativePositionBias(h, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance,
                                          bidirectional=self.kind == "encoder", init_std=d ** -0.5,
                                          name="relpos_bias")

        if self.kind == "cross":
            key, value = self._cross_key_value(kv_inputs, k_kernel, v_kernel, decode)
        elif self.kind == "decoder" and decode:
            key, value, mask_bias, position_bias = self._decode_step(x, k_kernel, v_kernel, relpos, position_bias,
                                                                     init_cache)
        else:
            key, value = _project(x, k_kernel), _project(x, v_kernel)
        if init_cache:
            return jnp.zeros_like(x), position_bias
        query = _project(x, q_kernel)
        if position_bias is None and relpos is not None:
            position_bias = relpos.full(query.shape[2], key.shape[2])
        bias = jnp.zeros((), jnp.float32)
        if position_bias is not None:
            bias = bias + position_bias
        if mask_bias is not None:
            bias = bias + mask_bias
        y = attention_core(query, key, value, bias, nn.Dropout(cfg.dropout_rate), deterministic)
        y = nn.with_logical_constraint(y, ("batch", "heads", "length", "kv"))  # [batch, heads, q, kv]
        out = mixed_einsum("bhqk,hkd->bqd", y, o_kernel)
        return nn.with_logical_constraint(out, ("batch", "length", "embed")), position_bias

    def _cross_key_value(self, encoded: Array | None, k_kernel: Array, v_kernel: Array,
                         decode: bool) -> tuple[Array, Array]:
        if not decode:
            return _project(encoded, k_kernel), _project(encoded, v_kernel)
        if not self.has_variable("cache", "cached_cross_key"):
            if encoded is None:
                raise ValueError("the decode cache is empty: initialise it (T5.init_cache) with the encoder outputs")
            key, value = _project(encoded, k_kernel), _project(encoded, v_kernel)
            self.variable("cache", "cached_cross_key", lambda: key)
            self.variable("cache", "cached_cross_value", lambda: value)
            return key, value
        return self.get_variable("cache", "cached_cross_key"), self.get_variable("cache", "cached_cross_value")

    def _decode_step(self, x: Array, k_kernel: Array, v_kernel: Array, relpos: RelativePositionBias | None,
                     position_bias: Array | None, init_cache: bool):
        """Append this token's key/value at `cache_index`; attend over positions <= cache_index."""
        batch, length, _ = x.shape
        h, dk, dtype = self.config.num_heads, self.config.d_kv, x.dtype
        exists = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, (batch, h, length, dk), dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, (batch, h, length, dk), dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if not exists:  # creation call: the input's length fixes the cache length; nothing is appended
            if init_cache:
                return None, None, None, position_bias
            causal = np.tril(np.ones((length, length), bool))
            mask_bias = jnp.where(causal, 0.0, MASK_VALUE)[None, None]
            return _project(x, k_kernel), _project(x, v_kernel), mask_bias, position_bias
        if length != 1:
            raise ValueError(f"decode=True takes one token per step, got decoder_input_ids of length {length}")
        cache_batch, _, max_length, _ = cached_key.value.shape
        if batch != cache_batch:
            raise ValueError(f"decode step batch {batch} does not match the cache batch {cache_batch}")
        index = cache_index.value
        key = jax.lax.dynamic_update_slice(cached_key.value, _project(x, k_kernel), (0, 0, index, 0))
        value = jax.lax.dynamic_update_slice(cached_value.value, _project(x, v_kernel), (0, 0, index, 0))
        cached_key.value, cached_value.value, cache_index.value = key, value, index + 1
        mask_bias = jnp.where(jnp.arange(max_length) <= index, 0.0, MASK_VALUE)[None, None, None, :]
        if position_bias is None and relpos is not None:
            position_bias = relpos.row(index, max_length)
        return key, value, mask_bias, position_bias


def _project(x: Array, kernel: Array) -> Array:
    # [batch, length, embed] x [embed, heads, kv] -> [batch, heads, length, kv]
    y = mixed_einsum("bld,dhk->bhlk", x, kernel)
    return nn.with_logical_constraint(y, ("batch", "heads", "length", "kv"))


class MLP(nn.Module):
    """T5 feed-forward: ReLU (v1.0) or gated tanh-GELU (v1.1), dropout on the hidden units."""

    config: T5Config

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        cfg = self.config
        d, f = cfg.d_model, cfg.d_ff
        if cfg.gated:
            wi_0 = logical_param(self, "wi_0", normal_init(d ** -0.5), (d, f), ("embed", "mlp"))
            wi_1 = logical_param(self, "wi_1", normal_init(d ** -0.5), (d, f), ("embed", "mlp"))
            hidden = (jax.nn.gelu(mixed_einsum("bld,df->blf", x, wi_0), approximate=True)
                      * mixed_einsum("bld,df->blf", x, wi_1))
        else:
            wi = logical_param(self, "wi", normal_init(d ** -0.5), (d, f), ("embed", "mlp"))
            hidden = jax.nn.relu(mixed_einsum("bld,df->blf", x, wi))
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        hidden = nn.Dropout(cfg.dropout_rate)(hidden, deterministic=deterministic)
        wo = logical_param(self, "wo", normal_init(f ** -0.5), (f, d), ("mlp", "embed"))
        return nn.with_logical_constraint(mixed_einsum("blf,fd->bld", hidden, wo), ("batch", "length", "embed"))
