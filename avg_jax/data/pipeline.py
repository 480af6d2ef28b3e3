"""grain input pipelines: fixed-shape padded batches, sharded by process, deterministic, checkpointable.

The global example stream is epoch after epoch of a seeded permutation of the examples:
  position g = epoch * N + p  ->  example perm_epoch[p],  perm_epoch = default_rng([seed, epoch]).permutation(N)
and shard k of S reads positions k, k + S, k + 2S, ...  Within one epoch the shards are therefore
disjoint and together cover every example; all shards yield the same number of batches.

The iterator is a `grain.DatasetIterator`: `it.get_state()` is a small JSON-able dict, `it.set_state(s)`
resumes mid-epoch with exactly the batches an uninterrupted iterator would yield. With orbax, save it
through `grain.checkpoint.CheckpointSave(it)` / restore with `grain.checkpoint.CheckpointRestore(it)`.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from avg_jax.data.corpus import Corpus
from avg_jax.data.vocab import PAD_ID

Example = dict[str, Any]
VALID_KEY = "valid"  # bool [batch]: False on padding rows (only when drop_remainder=False)


def corpus_examples(
    corpus: Corpus,
    split: str,
    tokenize: Callable[[str], Sequence[int]],
    targets: Callable[[str], Sequence[int]] | None = None,
) -> list[Example]:
    """One example per (query, relevant image) pair of `split`, in query order then image order.

    Each example: "inputs" int32 [len] = tokenize(query text), "query_row" and "image_row" (rows in the
    corpus) and, with `targets`, "targets" int32 [len] = targets(image id) (e.g. identifier tokens).
    """
    index = corpus.image_index()
    examples = []
    for j in corpus.query_rows(split):
        query = corpus.queries[j]
        inputs = np.asarray(tokenize(query.text), np.int32)
        for image_id in query.image_ids:
            ex = {"inputs": inputs, "query_row": np.int32(j), "image_row": np.int32(index[image_id])}
            if targets is not None:
                ex["targets"] = np.asarray(targets(image_id), np.int32)
            examples.append(ex)
    return examples


def make_batch_iterator(
    examples: Sequence[Example],
    batch_size: int,
    seed: int,
    seq_lengths: Mapping[str, int],
    *,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_epochs: int | None = None,
    shuffle: bool = True,
    drop_remainder: bool = True,
    truncate: bool = False,
    read_threads: int = 1,
    prefetch_batches: int = 4,
) -> grain.DatasetIterator:
    """A checkpointable iterator of fixed-shape batches for this process's shard of `examples`.

    Keys in `seq_lengths` hold 1-D token sequences, padded with PAD (0) to that length ([batch, length]
    int32); longer ones are an error unless `truncate`. Other keys must have one fixed shape and are
    stacked ([batch, ...]). `num_epochs=None` repeats forever. With `drop_remainder=False` the last batch
    is filled with all-zero rows whose "valid" entry is False (every batch carries "valid").
    Shards default to `jax.process_index()` of `jax.process_count()`.
    """
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, shard_count={shard_count})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    padding = _check_examples(examples, seq_lengths, truncate)
    n = len(examples)
    if num_epochs is None:
        per_shard = sys.maxsize // (2 * shard_count)  # effectively endless; grain datasets need a length
    elif drop_remainder:
        per_shard = n * num_epochs // shard_count
    else:
        per_shard = -(-n * num_epochs // shard_count)
    if drop_remainder and per_shard < batch_size:
        raise ValueError(f"{n} examples x {num_epochs} epoch(s) over {shard_count} shard(s) give {per_shard} per "
                         f"shard, fewer than batch_size {batch_size}: drop_remainder would yield no batch")
    order = _EpochOrder(n, seed, shuffle)
    total = None if num_epochs is None else n * num_epochs

    def element(j: int) -> Example:
        g = j * shard_count + shard_index
        if total is not None and g >= total:
            return padding
        return _pad_example(examples[order(g)], seq_lengths)

    ds = (grain.MapDataset.range(per_shard)
          .map(element)
          .batch(batch_size, drop_remainder=drop_remainder, batch_fn=lambda rows: _stack(rows, batch_size, padding)))
    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches)
    return iter(ds.to_iter_dataset(read))


class _EpochOrder:
    """Global stream position -> example index; caches the permutations of the two latest epochs."""

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __call__(self, g: int) -> int:
        epoch, p = divmod(g, self.n)
        if not self.shuffle:
            return p
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
                self._perms = {e: v for e, v in self._perms.items() if e >= epoch - 1}
                self._perms[epoch] = perm
        return int(perm[p])


def _check_examples(examples: Sequence[Example], seq_lengths: Mapping[str, int], truncate: bool) -> Example:
    """Validate every example up front (errors name the example index and field); return a padding row."""
    if not examples:
        raise ValueError("make_batch_iterator: no examples")
    keys = set(examples[0])
    if VALID_KEY in keys:
        raise ValueError(f"examples may not use the reserved key {VALID_KEY!r}")
    missing = set(seq_lengths) - keys
    if missing:
        raise ValueError(f"seq_lengths names {sorted(missing)}, absent from example 0 (keys {sorted(keys)})")
    shapes = {k: np.shape(v) for k, v in examples[0].items() if k not in seq_lengths}
    for i, ex in enumerate(examples):
        if set(ex) != keys:
            raise ValueError(f"example {i}: keys {sorted(ex)} differ from example 0's {sorted(keys)}")
        for k, length in seq_lengths.items():
            v = np.asarray(ex[k])
            if v.ndim != 1 or not np.issubdtype(v.dtype, np.integer):
                raise ValueError(f"example {i}: field {k!r} must be a 1-D integer sequence, got {v.dtype} {v.shape}")
            if v.size > length and not truncate:
                raise ValueError(f"example {i}: field {k!r} has {v.size} tokens > seq_lengths[{k!r}] = {length} "
                                 f"(raise the length or pass truncate=True)")
        for k, shape in shapes.items():
            if np.shape(ex[k]) != shape:
                raise ValueError(f"example {i}: field {k!r} has shape {np.shape(ex[k])}, example 0 has {shape}")
    row = _pad_example(examples[0], seq_lengths)
    return {k: np.zeros_like(v) for k, v in row.items()}


def _pad_example(ex: Example, seq_lengths: Mapping[str, int]) -> Example:
    """Sequences cut (checked earlier unless truncating) and padded to their length; a True "valid"."""
    out = {}
    for k, v in ex.items():
        if k in seq_lengths:
            tokens = np.asarray(v, np.int32)[: seq_lengths[k]]
            row = np.full(seq_lengths[k], PAD_ID, np.int32)
            row[: tokens.size] = tokens
            out[k] = row
        else:
            out[k] = np.asarray(v)
    out[VALID_KEY] = np.bool_(True)
    return out


def _stack(rows: Sequence[Example], batch_size: int, padding: Example) -> dict[str, np.ndarray]:
    """Stack examples into [batch, ...] arrays, filling a short final batch with padding rows."""
    rows = [*rows, *[padding] * (batch_size - len(rows))]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
