"""Weighted k-means (k-means++ seeding + Lloyd steps) in JAX, for codebook init and structured identifiers.

Rows with weight 0 are padding: callers pad their data to a few bucket sizes so one compiled program
serves many calls (hierarchical k-means calls it on clusters of every size).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from avg_jax.tokenizer.quantizer import nearest_code, squared_distances


@functools.partial(jax.jit, static_argnames=("k", "num_iters"))
def kmeans(x: jax.Array, weights: jax.Array, key: jax.Array, k: int, num_iters: int = 25,
           ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Cluster x [n, dim] (row weights [n]) into k centroids.

    Returns centroids [k, dim], assignment [n] int32 and the weighted inertia Σ w·||x − c||².
    Empty clusters keep their previous centroid.
    """
    x = x.astype(jnp.float32)
    w = weights.astype(jnp.float32)
    centroids = _kmeans_plus_plus(x, w, key, k)

    def lloyd(_, c):
        idx, _ = nearest_code(x, c)
        sums = jax.ops.segment_sum(x * w[:, None], idx, num_segments=k)  # [k, dim]
        counts = jax.ops.segment_sum(w, idx, num_segments=k)  # [k]
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1e-12)[:, None], c)

    centroids = jax.lax.fori_loop(0, num_iters, lloyd, centroids)
    idx, dist = nearest_code(x, centroids)
    return centroids, idx, jnp.sum(w * dist)


def _kmeans_plus_plus(x: jax.Array, w: jax.Array, key: jax.Array, k: int) -> jax.Array:
    """k-means++ seeding: each new centroid is drawn with probability ∝ w·D² to the chosen ones."""
    n = x.shape[0]
    keys = jax.random.split(key, k)
    first = jax.random.choice(keys[0], n, p=w / jnp.sum(w))
    centroids = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])
    min_d = squared_distances(x, x[first][None])[:, 0]  # [n]

    def step(j, carry):
        c, d = carry
        p = w * d
        total = jnp.sum(p)
        # Fewer distinct points than k: fall back to weight-proportional draws (duplicates allowed).
        p = jnp.where(total > 0, p / jnp.maximum(total, 1e-30), w / jnp.sum(w))
        pick = jax.random.choice(keys[j], n, p=p)
        c = c.at[j].set(x[pick])
        return c, jnp.minimum(d, squared_distances(x, x[pick][None])[:, 0])

    centroids, _ = jax.lax.fori_loop(1, k, step, (centroids, min_d))
    return centroids


def bucket_size(n: int, minimum: int = 64) -> int:
    """Next power of two >= n (at least `minimum`): the padded size that shares one compiled program."""
    return max(minimum, 1 << max(0, int(n - 1).bit_length()))


def kmeans_numpy(x: np.ndarray, k: int, seed: int, num_iters: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Host convenience: pad x [n, dim] to a bucket, run `kmeans`, return (centroids, assignment [n])."""
    n = x.shape[0]
    if n == 0:
        raise ValueError("kmeans: no points")
    size = bucket_size(n)
    padded = np.zeros((size, x.shape[1]), np.float32)
    padded[:n] = x
    weights = (np.arange(size) < n).astype(np.float32)
    centroids, idx, _ = kmeans(jnp.asarray(padded), jnp.asarray(weights), jax.random.PRNGKey(seed), k=k,
                               num_iters=num_iters)
    return np.asarray(centroids), np.asarray(idx)[:n]
