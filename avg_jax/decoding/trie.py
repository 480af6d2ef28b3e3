"""Identifier tries as device arrays: gather-only child lookups for batches of decoding states.

Layout (CSR in breadth-first order). Every trie node except the root is the target of exactly one edge,
and nodes are numbered breadth-first with children of a node in token order, so the child reached
through edge `e` is node `e + 1` and the children of node `n` are the consecutive edges
`first_edge[n] .. first_edge[n + 1] - 1`. Three arrays answer everything the beam search asks:

  first_edge  int32 [node_capacity + 1]  CSR row pointers (padding nodes own empty ranges)
  edge_token  int32 [edge_capacity]      model-vocabulary token of each edge, sorted within a node
  node_group  int32 [node_capacity]      identifier (group) index of a leaf node, -1 elsewhere

That is 12 bytes per node, i.e. at most 12 * length bytes per identifier, against 4 * vocab bytes per
node for a dense `[num_nodes, vocab]` transition table. A dense table is only needed when decoding
masks the full vocabulary; the beam search here never does: it gathers the (static) `max_fanout`
children of every beam (`children`), scores only those, and ranks `beam * max_fanout` candidates.
The root is a single node, so its children are the "dense first level": a plain list of
`root_fanout` tokens scored once per query.

Arrays are padded to capacity buckets (`bucket_size`), and the static fan-outs too, so a new image set
of similar size reuses the compiled decode: tables are jit inputs, never constants. The last padding
node, `sink = node_capacity - 1`, has no children and no group: beams that ran out of valid
continuations (beam wider than the trie) live there with score -inf.

Identifiers that share a token sequence (the 'share' collision policy) form one group whose images are
listed in identifier-table order; groups are numbered in lexicographic token order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from avg_jax.data.vocab import EOS_ID, PAD_ID

MIN_BUCKET = 8


def bucket_size(n: int, mantissa_bits: int = 3) -> int:
    """Smallest m * 2**e >= n with m < 2**(mantissa_bits + 1): capacity buckets at most 12.5 % oversized."""
    n = max(int(n), MIN_BUCKET)
    shift = max(n.bit_length() - (mantissa_bits + 1), 0)
    return -(-n >> shift) << shift


@struct.dataclass
class TrieTables:
    """Device side of a trie: the jit input of constrained decoding (array fields are traced)."""

    first_edge: jax.Array  # [node_capacity + 1] int32
    edge_token: jax.Array  # [edge_capacity] int32
    node_group: jax.Array  # [node_capacity] int32
    max_length: int = struct.field(pytree_node=False)  # decode steps (identifier tokens incl. EOS)
    root_fanout: int = struct.field(pytree_node=False)  # static width of the root's child list
    max_fanout: int = struct.field(pytree_node=False)  # static width of any other node's child list

    @property
    def sink(self) -> int:
        """The childless padding node holding beams without a valid continuation."""
        return self.node_group.shape[0] - 1

    @property
    def nbytes(self) -> int:
        return int(sum(np.dtype(a.dtype).itemsize * a.size for a in (self.first_edge, self.edge_token,
                                                                        self.node_group)))


def children(tables: TrieTables, states: jax.Array, width: int | None = None
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Child tokens, child states and validity of a batch of states, all `[*states.shape, width]`."""
    width = tables.max_fanout if width is None else width
    start = tables.first_edge[states]
    count = tables.first_edge[states + 1] - start
    slot = jnp.arange(width, dtype=jnp.int32)
    edge = start[..., None] + slot  # [..., width]
    valid = slot < count[..., None]
    edge = jnp.where(valid, edge, 0)
    tokens = jnp.where(valid, tables.edge_token[edge], PAD_ID)
    next_states = jnp.where(valid, edge + 1, tables.sink)
    return tokens, next_states, valid


def num_children(tables: TrieTables, states: jax.Array) -> jax.Array:
    return tables.first_edge[states + 1] - tables.first_edge[states]


def next_state(tables: TrieTables, states: jax.Array, tokens: jax.Array) -> jax.Array:
    """State reached from `states` by `tokens` (same shape), or the sink when the token is not allowed.

    A binary search over each node's sorted edge range: ceil(log2(max fan-out)) rounds of gathers.
    """
    states, tokens = jnp.broadcast_arrays(states, tokens)
    lo = tables.first_edge[states]
    hi = tables.first_edge[states + 1]  # search [lo, hi)
    end = hi
    rounds = max(int(max(tables.max_fanout, tables.root_fanout)).bit_length(), 1)
    for _ in range(rounds):
        mid = (lo + hi) // 2
        go_right = (mid < hi) & (tables.edge_token[jnp.minimum(mid, tables.edge_token.shape[0] - 1)] < tokens)
        lo = jnp.where(go_right, mid + 1, lo)
        hi = jnp.where(go_right, hi, mid)
    found = (lo < end) & (tables.edge_token[jnp.minimum(lo, tables.edge_token.shape[0] - 1)] == tokens)
    return jnp.where(found, lo + 1, tables.sink)


def allowed_mask(tables: TrieTables, states: jax.Array, vocab_size: int) -> jax.Array:
    """Boolean `[*states.shape, vocab_size]`: which next tokens each state allows (gathers only)."""
    tokens = jnp.arange(vocab_size, dtype=jnp.int32)
    return next_state(tables, states[..., None], tokens) != tables.sink


@dataclasses.dataclass(frozen=True)
class Trie:
    """A trie over an image set's identifiers: host-side bookkeeping plus the device `tables`."""

    tables: TrieTables
    num_nodes: int
    num_edges: int
    group_tokens: np.ndarray  # [num_groups, max_length] int32, PAD-padded, lexicographic order
    group_lengths: np.ndarray  # [num_groups] int32
    group_start: np.ndarray  # [num_groups + 1] CSR into group_rows
    group_rows: np.ndarray  # [num_identifiers] identifier-table rows of each group, table order within
    image_ids: tuple[str, ...]  # of the identifier-table rows
    fixed_length: bool
    token_range: tuple[int, int]  # [lo, hi): every trie token lies in it

    @property
    def num_groups(self) -> int:
        return len(self.group_lengths)

    @property
    def num_identifiers(self) -> int:
        return len(self.group_rows)

    def bytes_per_identifier(self) -> float:
        """Device table bytes (at capacity) per identifier."""
        return self.tables.nbytes / max(self.num_identifiers, 1)

    def group_image_ids(self, group: int) -> list[str]:
        """Images sharing identifier `group`, in identifier-table order."""
        lo, hi = self.group_start[group], self.group_start[group + 1]
        return [self.image_ids[r] for r in self.group_rows[lo:hi]]

    def ranked_images(self, groups: Sequence[int], scores: Sequence[float], k: int | None = None
                      ) -> list[tuple[str, float]]:
        """Expand ranked identifier groups (-1 = no result) to ranked (image id, score); first k kept."""
        out: list[tuple[str, float]] = []
        for g, s in zip(groups, scores, strict=True):
            if g < 0:
                continue
            out.extend((image, float(s)) for image in self.group_image_ids(int(g)))
            if k is not None and len(out) >= k:
                return out[:k]
        return out


def build_trie(table: Any = None, *, tokens: np.ndarray | None = None, lengths: np.ndarray | None = None,
               image_ids: Sequence[str] | None = None, fixed_length: bool | None = None,
               node_capacity: int | None = None, edge_capacity: int | None = None,
               max_fanout: int | None = None, root_fanout: int | None = None) -> Trie:
    """Build a `Trie` from an `IdentifierTable` (or plain `tokens [n, max_len]`, `lengths [n]` arrays).

    Fixed-length identifiers carry no EOS and all have `max_len` tokens; variable-length ones end with
    EOS (which then occurs nowhere else), so an identifier may be a prefix of another one. Capacities and
    fan-outs default to buckets of the actual sizes; pass larger ones to share one compiled decode.
    """
    if table is not None:
        if tokens is not None or lengths is not None:
            raise ValueError("build_trie: pass either an identifier table or tokens/lengths arrays, not both")
        tokens, lengths, image_ids = table.tokens, table.lengths, table.image_ids
        fixed_length = bool(table.fixed_length) if fixed_length is None else fixed_length
    if tokens is None or lengths is None:
        raise ValueError("build_trie: need an identifier table or both tokens and lengths")
    tokens = np.asarray(tokens)
    lengths = np.asarray(lengths)
    _validate(tokens, lengths, fixed_length)
    tokens = tokens.astype(np.int32)
    lengths = lengths.astype(np.int32)
    n, max_len = tokens.shape
    is_fixed = bool(n == 0 or tokens[np.arange(n), lengths - 1].max(initial=0) != EOS_ID)
    if fixed_length is not None and fixed_length != is_fixed:
        raise ValueError(f"identifier table says fixed_length={fixed_length} but identifiers "
                         f"{'do not ' if is_fixed else ''}end with EOS")
    if image_ids is None:
        image_ids = [str(i) for i in range(n)]
    image_ids = tuple(str(i) for i in image_ids)
    if len(image_ids) != n:
        raise ValueError(f"build_trie: {len(image_ids)} image ids for {n} identifiers")

    # Lexicographic order (PAD=0 sorts before every real token); stable, so ties keep table order.
    order = np.lexsort(tokens.T[::-1]) if n else np.zeros(0, np.int64)
    rows = tokens[order]  # [n, max_len]
    row_len = lengths[order]
    changed = np.zeros(n, bool)
    if n:
        changed[0] = True
    node_of_row = np.zeros(n, np.int64)  # current-depth node of every sorted row (root = 0)
    parents, edge_tokens = [], []
    num_nodes = 1
    leaf_of_row = np.zeros(n, np.int64)
    for depth in range(1, max_len + 1):
        col = rows[:, depth - 1]
        changed = changed.copy()
        changed[1:] |= col[1:] != col[:-1]
        new = changed & (row_len >= depth)
        idx = np.flatnonzero(new)
        parents.append(node_of_row[idx])
        edge_tokens.append(col[idx])
        ids = num_nodes + np.cumsum(new) - 1  # node id of the latest new node at or before each row
        node_of_row = np.where(row_len >= depth, ids, node_of_row)
        ends = row_len == depth
        leaf_of_row[ends] = node_of_row[ends]
        num_nodes += len(idx)
    parent = np.concatenate(parents) if parents else np.zeros(0, np.int64)
    edge_token = np.concatenate(edge_tokens) if edge_tokens else np.zeros(0, np.int32)
    num_edges = num_nodes - 1

    fanout = np.bincount(parent, minlength=num_nodes).astype(np.int64)  # [num_nodes]
    root_width = int(fanout[0]) if num_nodes else 0
    deep_width = int(fanout[1:].max(initial=0))
    node_capacity = _capacity("node_capacity", node_capacity, num_nodes + 1)
    edge_capacity = _capacity("edge_capacity", edge_capacity, num_edges)
    max_fanout = _capacity("max_fanout", max_fanout, deep_width, bucket=_pow2)
    root_fanout = _capacity("root_fanout", root_fanout, root_width, bucket=_pow2)

    first_edge = np.full(node_capacity + 1, num_edges, np.int32)
    first_edge[0] = 0
    first_edge[1:num_nodes + 1] = np.cumsum(fanout)
    edge_token_padded = np.zeros(edge_capacity, np.int32)
    edge_token_padded[:num_edges] = edge_token
    # Groups: distinct identifiers in lexicographic order = leaves in order of first sorted row.
    first_of_group = np.ones(n, bool)
    if n:
        first_of_group[1:] = leaf_of_row[1:] != leaf_of_row[:-1]
    group_of_row = np.cumsum(first_of_group) - 1
    num_groups = int(first_of_group.sum())
    node_group = np.full(node_capacity, -1, np.int32)
    node_group[leaf_of_row[first_of_group]] = np.arange(num_groups, dtype=np.int32)
    group_start = np.zeros(num_groups + 1, np.int64)
    group_start[1:] = np.cumsum(np.bincount(group_of_row, minlength=num_groups))

    tables = TrieTables(first_edge=jnp.asarray(first_edge), edge_token=jnp.asarray(edge_token_padded),
                        node_group=jnp.asarray(node_group), max_length=int(max_len),
                        root_fanout=root_fanout, max_fanout=max_fanout)
    token_range = (int(edge_token.min()), int(edge_token.max()) + 1) if num_edges else (0, 0)
    return Trie(tables=tables, num_nodes=num_nodes, num_edges=num_edges,
                group_tokens=rows[first_of_group], group_lengths=row_len[first_of_group],
                group_start=group_start, group_rows=order.astype(np.int64), image_ids=image_ids,
                fixed_length=is_fixed, token_range=token_range)


def identifier_window(trie: Trie, vocab_size: int, text_vocab_size: int | None = None) -> tuple[int, int]:
    """(first column, number of columns) of the vocabulary a model's output head must return for `trie`'s tokens.

    New-token identifiers: the new-token block [text_vocab_size, vocab_size) (fixed by the vocabulary,
    so swapping the image set keeps the compiled search); anything else: the whole vocabulary.
    """
    lo, hi = trie.token_range
    if hi > vocab_size:
        raise ValueError(f"identifier token {hi - 1} is outside the model vocabulary of {vocab_size}")
    if text_vocab_size is not None and lo >= text_vocab_size:
        return text_vocab_size, vocab_size - text_vocab_size
    return 0, vocab_size


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length() if n > 1 else 1


def _capacity(name: str, given: int | None, needed: int, bucket=bucket_size) -> int:
    if given is None:
        return bucket(needed)
    if given < needed:
        raise ValueError(f"build_trie: {name}={given} is smaller than the {needed} this identifier set needs")
    return int(given)


def _validate(tokens: np.ndarray, lengths: np.ndarray, fixed_length: bool | None) -> None:
    """Clear errors for malformed identifier arrays (shape, padding, PAD/EOS placement)."""
    if tokens.ndim != 2 or lengths.ndim != 1 or lengths.shape[0] != tokens.shape[0]:
        raise ValueError(f"identifiers: expected tokens [n, max_len] and lengths [n], got {tokens.shape} "
                         f"and {lengths.shape}")
    if not (np.issubdtype(tokens.dtype, np.integer) and np.issubdtype(lengths.dtype, np.integer)):
        raise ValueError(f"identifiers: tokens and lengths must be integers, got {tokens.dtype}, {lengths.dtype}")
    n, max_len = tokens.shape
    if n == 0:
        return
    if max_len == 0 or lengths.min() < 1 or lengths.max() > max_len:
        i = int(np.argmax((lengths < 1) | (lengths > max_len)))
        raise ValueError(f"identifier {i}: length {lengths[i]} outside [1, {max_len}]")
    if tokens.min() < 0 or tokens.max() >= np.iinfo(np.int32).max:
        raise ValueError(f"identifiers: token ids must lie in [0, 2**31 - 1), got range "
                         f"[{tokens.min()}, {tokens.max()}]")
    inside = np.arange(max_len)[None, :] < lengths[:, None]
    bad = np.flatnonzero(((tokens == PAD_ID) & inside).any(1) | ((tokens != PAD_ID) & ~inside).any(1))
    if bad.size:
        raise ValueError(f"identifier {bad[0]}: PAD (0) inside the identifier or a non-PAD token after its "
                         f"length {lengths[bad[0]]}: {tokens[bad[0]].tolist()}")
    last = tokens[np.arange(n), lengths - 1]
    eos_inside = ((tokens == EOS_ID) & (np.arange(max_len)[None, :] < (lengths - 1)[:, None])).any(1)
    if eos_inside.any():
        i = int(np.argmax(eos_inside))
        raise ValueError(f"identifier {i}: EOS before its last token: {tokens[i].tolist()}")
    ends_eos = last == EOS_ID
    if ends_eos.any() and not ends_eos.all():
        i = int(np.argmax(~ends_eos))
        raise ValueError(f"identifier {i}: some identifiers end with EOS and this one does not "
                         f"({tokens[i].tolist()}); variable-length identifiers must all end with EOS")
    if not ends_eos.any() and (lengths != max_len).any():
        i = int(np.argmax(lengths != max_len))
        raise ValueError(f"identifier {i}: fixed-length identifiers (no EOS) must all have length {max_len}, "
                         f"got {lengths[i]}")
    if fixed_length and ends_eos.any():
        raise ValueError("identifiers: fixed_length=True but identifiers end with EOS")
