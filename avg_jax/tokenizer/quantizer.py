"""Residual quantization (AVG eq. 2): M greedy nearest-voken steps over one shared or per-level codebooks.

Distances use ||r||² − 2 r·C + ||C||², so a step materialises [batch, N] scores, never [batch, N, dim].
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


class RQCodes(NamedTuple):
    """Result of residual-quantizing a batch."""

    codes: jax.Array  # [batch, M] int32, index into the level's codebook
    residuals: jax.Array  # [batch, M, dim] r_j: the input of step j (r_1 = z)
    partial_sums: jax.Array  # [batch, M, dim] ẑ^(d) = Σ_{j<=d} voken_j
    errors: jax.Array  # [batch, M] ||r_j − voken_j||², the squared residual left after step j


def squared_distances(r: jax.Array, codebook: jax.Array, codebook_sq: jax.Array | None = None) -> jax.Array:
    """||r_b − C_n||² for all pairs: [batch, dim] x [N, dim] -> [batch, N]."""
    if codebook_sq is None:
        codebook_sq = jnp.sum(codebook * codebook, axis=-1)
    r_sq = jnp.sum(r * r, axis=-1, keepdims=True)  # [batch, 1]
    scores = jnp.dot(r, codebook.T, precision=jax.lax.Precision.HIGHEST)  # [batch, N]
    return jnp.maximum(r_sq - 2.0 * scores + codebook_sq[None, :], 0.0)


def nearest_code(r: jax.Array, codebook: jax.Array, codebook_sq: jax.Array | None = None,
                 ) -> tuple[jax.Array, jax.Array]:
    """Index [batch] and squared distance [batch] of each row's nearest codebook entry."""
    d = squared_distances(r, codebook, codebook_sq)
    idx = jnp.argmin(d, axis=-1).astype(jnp.int32)
    return idx, jnp.take_along_axis(d, idx[:, None], axis=-1)[:, 0]


def codebook_for_level(codebooks: jax.Array, level: int) -> jax.Array:
    """codebooks is [1, N, dim] (shared: every level uses it) or [M, N, dim] (one per level)."""
    return codebooks[0] if codebooks.shape[0] == 1 else codebooks[level]


def rq_encode(z: jax.Array, codebooks: jax.Array, num_levels: int) -> RQCodes:
    """Greedy residual quantization of z [batch, dim] in `num_levels` steps (eq. 2)."""
    if codebooks.shape[0] not in (1, num_levels):
        raise ValueError(f"codebooks has {codebooks.shape[0]} codebooks; expected 1 (shared) or {num_levels}")
    sq = jnp.sum(codebooks * codebooks, axis=-1)  # [C, N]
    r = z
    partial = jnp.zeros_like(z)
    codes, residuals, partials, errors = [], [], [], []
    for level in range(num_levels):  # M is small and static: unrolled
        book = codebook_for_level(codebooks, level)
        idx, _ = nearest_code(jax.lax.stop_gradient(r), jax.lax.stop_gradient(book),
                              codebook_for_level(jax.lax.stop_gradient(sq), level))
        voken = jnp.take(book, idx, axis=0)  # [batch, dim], differentiable w.r.t. the codebook
        residuals.append(r)
        partial = partial + voken
        partials.append(partial)
        r = r - voken
        errors.append(jnp.sum(jax.lax.stop_gradient(r) ** 2, axis=-1))
        codes.append(idx)
    return RQCodes(codes=jnp.stack(codes, axis=1), residuals=jnp.stack(residuals, axis=1),
                   partial_sums=jnp.stack(partials, axis=1), errors=jnp.stack(errors, axis=1))


@functools.partial(jax.jit, static_argnames=("num_levels",))
def rq_encode_codes(z: jax.Array, codebooks: jax.Array, num_levels: int) -> tuple[jax.Array, jax.Array]:
    """Inference-only encoding: codes [batch, M] and the quantized vector ẑ^(M) [batch, dim]."""
    sq = jnp.sum(codebooks * codebooks, axis=-1)
    r = z
    codes = []
    for level in range(num_levels):
        book = codebook_for_level(codebooks, level)
        idx, _ = nearest_code(r, book, codebook_for_level(sq, level))
        r = r - jnp.take(book, idx, axis=0)
        codes.append(idx)
    return jnp.stack(codes, axis=1), z - r
