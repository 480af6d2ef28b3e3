"""Queries/s measurements shared by the demo and benchmarks/efficiency.py: a median-of-repeats timer, random
identifier tries and unit vectors, dense exact search q/s (`dense.JaxExactIndex`) and constrained generative
decode q/s (a T5 encoder + trie-constrained beam search) against image-set size."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from avg_jax.data.corpus import normalize_rows
from avg_jax.decoding.trie import Trie, build_trie
from avg_jax.evaluation.dense import JaxExactIndex
from avg_jax.retrieval.model import RetrievalModel

TIMING = "median wall time per batch after one warm-up batch; q/s = batch / median"


def median_seconds(fn: Callable[[int], Any], min_repeats: int, min_seconds: float = 0.0) -> tuple[float, int]:
    """Median wall time of fn(i) (waited on with `jax.block_until_ready`) over at least `min_repeats` calls and
    `min_seconds` in total, after one warm-up (compilation) call fn(-1); returns (median, calls timed)."""
    jax.block_until_ready(fn(-1))
    times: list[float] = []
    while len(times) < min_repeats or sum(times) < min_seconds:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(len(times)))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


def random_unit_rows(rng: np.random.Generator, n: int, dim: int, chunk: int = 100_000) -> np.ndarray:
    """[n, dim] float32 random unit vectors, drawn `chunk` rows at a time (1M x 768 is 3 GB)."""
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        out[start:start + chunk] = normalize_rows(rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32))
    return out


def random_identifier_trie(n: int, levels: int, codebook_size: int, text_vocab_size: int, seed: int) -> Trie:
    """A trie of `n` distinct random fixed-length voken identifiers [n, levels] (model ids `text_vocab_size + code`)."""
    if n > codebook_size ** levels:
        raise ValueError(f"{n} distinct identifiers need codebook_size ** levels >= n, got {codebook_size} ** "
                         f"{levels}")
    flat = np.random.default_rng([seed, n]).choice(codebook_size ** levels, size=n, replace=False)
    codes = np.stack(np.unravel_index(flat, (codebook_size,) * levels), axis=1)  # [n, levels]
    tokens = (text_vocab_size + codes).astype(np.int32)
    return build_trie(tokens=tokens, lengths=np.full(n, levels, np.int32), fixed_length=True)


def dense_search_qps(images: np.ndarray, queries: Sequence[np.ndarray], k: int, min_repeats: int,
                     min_seconds: float = 0.0, dtype: str = "float32") -> tuple[float, int]:
    """Search-only q/s (and calls timed) of exact inner-product search (jit matmul + top_k) over `images`,
    cycling through the equal-size query batches `queries`."""
    batch = queries[0].shape[0]
    index = JaxExactIndex(images, dtype=dtype)
    sec, reps = median_seconds(lambda i: index.search(queries[i % len(queries)], k, batch_size=batch),
                               min_repeats, min_seconds)
    return batch / sec, reps


def generative_qps(model: RetrievalModel, params: Any, text_vocab_size: int, sizes: Sequence[int], levels: int,
                   codebook_size: int, batch: int, beam: int, query_tokens: int, repeats: int, seed: int,
                   ) -> tuple[dict[int, float], dict[str, dict[str, float]]]:
    """q/s of the retrieval model's encoder + constrained beam search (`model.search_fn`, weights `params`) over
    a random identifier trie of each size (one compiled search, the tries are inputs), batch `batch` of
    `query_tokens`-token random queries; with per-size details (calls timed, trie build seconds, trie bytes per
    identifier). A query-conditioned model also gets random unit prefix vectors (its aligned query vectors; the
    text head that makes them from a query's feature, one small matmul, is left out)."""
    rng = np.random.default_rng([seed, 11])
    inputs = [jnp.asarray(rng.integers(3, text_vocab_size, (batch, query_tokens)), jnp.int32) for _ in range(4)]
    prefix = (jnp.asarray(random_unit_rows(rng, batch, model.config.image_feature_dim)) if model.conditioned
              else None)
    qps, details = {}, {}
    for n in sizes:
        t0 = time.perf_counter()
        trie = random_identifier_trie(int(n), levels, codebook_size, text_vocab_size, seed)
        build_s = time.perf_counter() - t0
        search = model.search_fn(beam)
        sec, reps = median_seconds(lambda i, s=search, t=trie: s(params, t.tables, inputs[i % len(inputs)], prefix),
                                   repeats)
        qps[int(n)] = batch / sec
        details[str(n)] = {"repeats": reps, "trie_build_s": round(build_s, 2),
                           "bytes_per_identifier": round(trie.bytes_per_identifier(), 1)}
    return qps, details
