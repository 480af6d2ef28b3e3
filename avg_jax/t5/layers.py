"""T5 building blocks: the layer math as plain functions, and the flax.linen modules that own the parameters.

The functions (`embed`, `rms_norm`, `project`, `attention_core`, `attention_output`, `feed_forward`,
`relative_position_bias`, `position_bias_row`, `output_logits`) take parameter arrays as arguments. The
modules below create the parameters and call them for the training forward pass (`avg_jax.t5.model`); the
incremental decoder (`avg_jax.t5.decoding`) calls the same functions on the parameter dict, so both paths
share one implementation of every layer.

Every parameter is created through `nn.with_logical_partitioning` and every large activation passes
`nn.with_logical_constraint` inside the functions, so the axis names below (t5x convention) decide the
sharding through the rules of `avg_jax.partitioning`, inside and outside modules; without rules in scope
the constraints are no-ops.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avg_jax.t5.configs import T5Config

# Added to attention logits of masked keys: finite, so a fully masked row gives uniform weights, never NaN.
MASK_VALUE = -1e10

Array = jax.Array
Dropout = Callable[[Array], Array]


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


def mixed_einsum(spec: str, x: Array, w: Array, out_dtype: jnp.dtype | None = None) -> Array:
    """einsum of `x` and `w` (cast to x's dtype) accumulated in float32, returned in `out_dtype` (default x's).

    TPUs and GPUs accumulate low-precision products in float32 anyway; XLA:CPU takes its bf16 matrix-unit
    path (AMX) only for a float32 result, ~6x faster than a bf16 result on the dev machine.
    """
    y = jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    return y.astype(x.dtype if out_dtype is None else out_dtype)


def _rows_axes(ndim: int, last: str) -> tuple[str, ...]:
    # logical names of a [batch, (length,)* last] activation
    return ("batch",) + ("length",) * (ndim - 2) + (last,)


def embed(table: Array, ids: Array, dtype: jnp.dtype) -> Array:
    """Token embeddings: `ids [batch, ...]` into `table [vocab, embed]` -> `[batch, ..., embed]` in `dtype`."""
    x = jnp.take(table, ids, axis=0).astype(dtype)
    return nn.with_logical_constraint(x, _rows_axes(x.ndim, "embed"))


def rms_norm(x: Array, scale: Array, epsilon: float, dtype: jnp.dtype) -> Array:
    """T5 layer norm of `x [..., embed]` by `scale [embed]`: no mean subtraction, no bias; statistics in float32."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + epsilon)
    return (x32 * scale).astype(dtype)


def project(x: Array, kernel: Array) -> Array:
    """Attention projection: `x [batch, length, embed]` x `kernel [embed, heads, kv]` -> `[batch, heads, length,
    kv]`.

    A fused kernel `[embed, heads, n * kv]` projects n outputs per head at once (split the last axis).
    """
    y = mixed_einsum("bld,dhk->blhk", x, kernel)
    # one position (an incremental step) is a free reshape: a transpose would make XLA transpose the kernel
    y = y.reshape(y.shape[0], y.shape[2], 1, y.shape[3]) if y.shape[1] == 1 else jnp.swapaxes(y, 1, 2)
    return nn.with_logical_constraint(y, ("batch", "heads", "length", "kv"))


def attention_core(query: Array, key: Array, value: Array, bias: Array, dropout: Dropout | None = None) -> Array:
    """softmax(q k^T + bias) v with float32 logits; no 1/sqrt(d) scaling (T5 folds it into the init).

    query [batch, heads, q, kv], key/value [batch, heads, k, kv], bias broadcastable to [batch, heads, q, k]
    -> [batch, heads, q, kv]. `dropout` (if any) applies to the attention weights.
    """
    logits = mixed_einsum("bhqd,bhkd->bhqk", query, key, jnp.float32)
    weights = jax.nn.softmax(logits + bias, axis=-1).astype(value.dtype)
    if dropout is not None:
        weights = dropout(weights)
    y = mixed_einsum("bhqk,bhkd->bhqd", weights, value)
    return nn.with_logical_constraint(y, ("batch", "heads", "length", "kv"))


def attention_output(y: Array, kernel: Array) -> Array:
    """Merge heads: `y [batch, heads, q, kv]` x `kernel [heads, kv, embed]` -> `[batch, q, embed]`."""
    out = mixed_einsum("bhqk,hkd->bqd", y, kernel)
    return nn.with_logical_constraint(out, ("batch", "length", "embed"))


def feed_forward(x: Array, weights: dict, dropout: Dropout | None = None) -> Array:
    """T5 MLP of `x [batch, ..., embed]` -> `[batch, ..., embed]`.

    weights: {'wi', 'wo'} (ReLU, v1.0) or {'wi_0', 'wi_1', 'wo'} (gated tanh-GELU, v1.1); `wi*` [embed, mlp],
    `wo` [mlp, embed]. `dropout` (if any) applies to the hidden units.
    """
    if "wi_0" in weights:
        hidden = (jax.nn.gelu(mixed_einsum("...d,df->...f", x, weights["wi_0"]), approximate=True)
                  * mixed_einsum("...d,df->...f", x, weights["wi_1"]))
    else:
        hidden = jax.nn.relu(mixed_einsum("...d,df->...f", x, weights["wi"]))
    hidden = nn.with_logical_constraint(hidden, _rows_axes(hidden.ndim, "mlp"))
    if dropout is not None:
        hidden = dropout(hidden)
    out = mixed_einsum("...f,fd->...d", hidden, weights["wo"])
    return nn.with_logical_constraint(out, _rows_axes(out.ndim, "embed"))


def relative_position_bias(table: Array, buckets: Array) -> Array:
    """`table [heads, num_buckets]` at `buckets [q, k]` (int) -> float32 bias `[1, heads, q, k]`."""
    return jnp.take(table, buckets, axis=1)[None]


def position_bias_row(table: Array, query_position: Array, k_len: int, bidirectional: bool, num_buckets: int,
                      max_distance: int) -> Array:
    """Bias `[1, heads, 1, k_len]` of one (traced) query position against keys 0..k_len-1 (incremental decoding)."""
    offsets = np.arange(-(k_len - 1), k_len)  # every key-minus-query offset that can occur
    buckets = jnp.asarray(relative_position_bucket(offsets, bidirectional, num_buckets, max_distance), jnp.int32)
    rel = jnp.arange(k_len) - query_position + (k_len - 1)
    return relative_position_bias(table, jnp.take(buckets, rel)[None, :])


def output_logits(x: Array, rows: Array) -> Array:
    """Output head: `x [batch, ..., embed]` against `rows [vocab, embed]` -> float32 `[batch, ..., vocab]`."""
    logits = mixed_einsum("...d,vd->...v", x, rows, jnp.float32)
    return nn.with_logical_constraint(logits, _rows_axes(logits.ndim, "vocab"))


def logical_param(module: nn.Module, name: str, init, shape: tuple[int, ...], axes: tuple[str, ...]) -> Array:
    """A float32 parameter annotated with its logical axis names."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def normal_init(std: float):
    """Zero-mean normal initialiser (T5's Mesh TF initialisation uses fan-in-scaled normals)."""
    return nn.initializers.normal(stddev=std)


def _dropout(rate: float, deterministic: bool) -> Dropout | None:
    # created inside the calling module's compact method, so it draws from that module's 'dropout' rng
    return None if deterministic or rate == 0.0 else functools.partial(nn.Dropout(rate), deterministic=False)


class RMSNorm(nn.Module):
    """T5 layer norm (`rms_norm`) with its `scale` parameter."""

    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = logical_param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
        return rms_norm(x, scale, self.epsilon, self.dtype)


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
        return embed(self.embedding, ids, self.dtype)

    def attend(self, x: Array) -> Array:
        # [batch, length, embed] -> [batch, length, vocab] float32
        return output_logits(x.astype(self.dtype), self.embedding)


class RelativePositionBias(nn.Module):
    """Learned per-head scalar bias for each relative-position bucket (`rel_embedding [heads, buckets]`)."""

    num_heads: int
    num_buckets: int
    max_distance: int
    bidirectional: bool
    init_std: float

    @nn.compact
    def __call__(self, q_len: int, k_len: int) -> Array:
        """Bias [1, heads, q_len, k_len] of queries 0..q_len-1 against keys 0..k_len-1."""
        table = logical_param(self, "rel_embedding", normal_init(self.init_std), (self.num_heads, self.num_buckets),
                              ("heads", "relpos_buckets"))
        rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
        buckets = relative_position_bucket(rel, self.bidirectional, self.num_buckets, self.max_distance)
        return relative_position_bias(table, jnp.asarray(buckets, jnp.int32))


class Attention(nn.Module):
    """Multi-head attention with T5 projections; self-attention may own the relative position bias.

    kinds: 'encoder' (bidirectional self), 'decoder' (causal self, the mask comes with `mask_bias`) and
    'cross' (decoder queries over the encoder outputs `kv_inputs`).
    """

    config: T5Config
    kind: str
    has_relative_bias: bool = False

    @nn.compact
    def __call__(self, x: Array, kv_inputs: Array | None, mask_bias: Array | None,
                 position_bias: Array | None, deterministic: bool) -> tuple[Array, Array | None]:
        """Returns (output [batch, q, embed], the position bias used, for the next layers to share).

        mask_bias: additive [batch|1, 1, q|1, k] (0 or MASK_VALUE).
        """
        cfg = self.config
        h, dk, d = cfg.num_heads, cfg.d_kv, cfg.d_model
        axes = ("embed", "heads", "kv")
        q_kernel = logical_param(self, "query", normal_init((d * dk) ** -0.5), (d, h, dk), axes)
        k_kernel = logical_param(self, "key", normal_init(d ** -0.5), (d, h, dk), axes)
        v_kernel = logical_param(self, "value", normal_init(d ** -0.5), (d, h, dk), axes)
        o_kernel = logical_param(self, "out", normal_init((h * dk) ** -0.5), (h, dk, d), ("heads", "kv", "embed"))
        kv_inputs = kv_inputs if self.kind == "cross" else x
        query, key, value = project(x, q_kernel), project(kv_inputs, k_kernel), project(kv_inputs, v_kernel)
        if position_bias is None and self.has_relative_bias:
            relpos = RelativePositionBias(h, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance,
                                          bidirectional=self.kind == "encoder", init_std=d ** -0.5,
                                          name="relpos_bias")
            position_bias = relpos(query.shape[2], key.shape[2])
        bias = jnp.zeros((), jnp.float32)
        if position_bias is not None:
            bias = bias + position_bias
        if mask_bias is not None:
            bias = bias + mask_bias
        y = attention_core(query, key, value, bias, _dropout(cfg.dropout_rate, deterministic))
        return attention_output(y, o_kernel), position_bias


class MLP(nn.Module):
    """T5 feed-forward (`feed_forward`): ReLU (v1.0) or gated tanh-GELU (v1.1), dropout on the hidden units."""

    config: T5Config

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        cfg = self.config
        d, f = cfg.d_model, cfg.d_ff
        names = ("wi_0", "wi_1") if cfg.gated else ("wi",)
        weights = {n: logical_param(self, n, normal_init(d ** -0.5), (d, f), ("embed", "mlp")) for n in names}
        weights["wo"] = logical_param(self, "wo", normal_init(f ** -0.5), (f, d), ("mlp", "embed"))
        return feed_forward(x, weights, _dropout(cfg.dropout_rate, deterministic))
