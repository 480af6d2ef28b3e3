"""The identifier table: for every image, the sequence of MODEL vocabulary ids that identifies it.

Token ids follow avg_jax/data/vocab.py: ids below `text_vocab_size` are text pieces, ids in
[text_vocab_size, text_vocab_size + num_new_tokens) are new tokens (vokens, cluster tokens, atomic ids,
disambiguation suffixes; each scheme documents its layout in `metadata`). Fixed-length identifiers (voken
schemes, numeric) carry no EOS; variable-length ones end with EOS_ID, counted in `lengths`.

On disk a table is a directory:
  identifiers.json   format, scheme, vocabulary fields, metadata, image ids (row i <-> tokens[i])
  tokens.npy         int32 [num_images, max_len], PAD (0) after each identifier
  lengths.npy        int32 [num_images]

Collision policies (when several images would get the same identifier):
  'suffix'  every identifier gets one extra disambiguation token: images sharing a body are ranked by
            `order_key` (e.g. distance to their code, ascending) and rank r gets token
            `suffix_start + r`, a new token placed after the scheme's own new tokens. The suffix is
            appended to ALL identifiers of the table (rank 0 for unique bodies) so fixed-length tables
            stay fixed-length; when nothing collides no suffix is added. With a `suffix_scope` (e.g. each
            image's split) ranks are counted within (body, scope): the first image of a scope gets rank 0 even
            when another scope's image shares its body, so a test image is not given a suffix the model never
            learned to emit first because a training image took rank 0; identifiers are then unique within a
            scope but may repeat across scopes (the table's `groups()` lists the images behind each).
  'share'   identifiers are left as they are; `IdentifierTable.groups()` lists the images behind each.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from avg_jax.data.vocab import EOS_ID, PAD_ID
from avg_jax.json_io import read_json, write_json

FORMAT = "avg_jax.identifiers/1"
META_FILE = "identifiers.json"
TOKENS_FILE = "tokens.npy"
LENGTHS_FILE = "lengths.npy"
COLLISION_POLICIES = ("suffix", "share")


class IdentifierTableError(ValueError):
    """A malformed identifier table; the message names the file or field and the offending value."""


@dataclasses.dataclass
class IdentifierTable:
    """Image id -> identifier token ids (model vocabulary ids), one row per image."""

    image_ids: list[str]
    tokens: np.ndarray  # [num_images, max_len] int32, PAD after the identifier
    lengths: np.ndarray  # [num_images] int32
    scheme: str
    num_new_tokens: int
    text_vocab_size: int
    fixed_length: bool
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image_ids = list(self.image_ids)
        self.tokens = np.asarray(self.tokens)
        self.lengths = np.asarray(self.lengths)
        self.validate()

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def max_len(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def vocab_size(self) -> int:
        """Unpadded model vocabulary the identifiers live in (text ids + new tokens)."""
        return self.text_vocab_size + self.num_new_tokens

    def validate(self, source: str = "<in memory>") -> None:
        """Raise IdentifierTableError on any inconsistency (nothing is repaired)."""
        t, n = self.tokens, self.lengths
        if t.ndim != 2 or t.dtype != np.int32:
            raise IdentifierTableError(f"{source}: field 'tokens' must be int32 [num_images, max_len], "
                                       f"got {t.dtype} {t.shape}")
        if n.shape != (t.shape[0],) or n.dtype != np.int32:
            raise IdentifierTableError(f"{source}: field 'lengths' must be int32 [{t.shape[0]}], got {n.dtype} "
                                       f"{n.shape}")
        if len(self.image_ids) != t.shape[0]:
            raise IdentifierTableError(f"{source}: {len(self.image_ids)} image ids but {t.shape[0]} token rows")
        if len(set(self.image_ids)) != len(self.image_ids):
            dup = next(i for i in self.image_ids if self.image_ids.count(i) > 1)
            raise IdentifierTableError(f"{source}: field 'image_ids': duplicate image id {dup!r}")
        if self.num_new_tokens < 0 or self.text_vocab_size <= EOS_ID:
            raise IdentifierTableError(f"{source}: bad vocabulary fields num_new_tokens={self.num_new_tokens} "
                                       f"text_vocab_size={self.text_vocab_size}")
        if t.shape[0] == 0:
            return
        bad = np.flatnonzero((n < 1) | (n > t.shape[1]))
        if bad.size:
            raise IdentifierTableError(f"{source}: field 'lengths': row {bad[0]} has length {n[bad[0]]}, "
                                       f"expected 1..{t.shape[1]}")
        inside = np.arange(t.shape[1])[None, :] < n[:, None]  # [num_images, max_len]
        checks = [
            (inside & (t == PAD_ID), "PAD (0) inside an identifier"),
            (~inside & (t != PAD_ID), "non-PAD token after the identifier's length"),
            (inside & ((t < 0) | (t >= self.vocab_size)), f"token id outside [0, {self.vocab_size})"),
        ]
        if self.fixed_length:
            checks.append((inside & (t == EOS_ID), "EOS in a fixed-length identifier"))
            if (n != t.shape[1]).any():
                row = int(np.flatnonzero(n != t.shape[1])[0])
                raise IdentifierTableError(f"{source}: fixed-length table but row {row} ({self.image_ids[row]!r}) "
                                           f"has length {n[row]} != max_len {t.shape[1]}")
        else:
            last = np.arange(t.shape[1])[None, :] == (n - 1)[:, None]
            checks.append((last & (t != EOS_ID), "variable-length identifier not ended by EOS (1)"))
            checks.append((inside & ~last & (t == EOS_ID), "EOS before the end of an identifier"))
        for mask, what in checks:
            if mask.any():
                row, col = (int(v[0]) for v in np.nonzero(mask))
                raise IdentifierTableError(f"{source}: field 'tokens': {what} at row {row} "
                                           f"({self.image_ids[row]!r}) position {col}: {t[row].tolist()}")

    def identifier(self, row: int) -> tuple[int, ...]:
        return tuple(int(v) for v in self.tokens[row, : self.lengths[row]])

    def identifiers(self) -> list[tuple[int, ...]]:
        return [self.identifier(i) for i in range(self.num_images)]

    def index(self) -> dict[str, int]:
        """Image id -> row."""
        return {image_id: i for i, image_id in enumerate(self.image_ids)}

    def groups(self) -> dict[tuple[int, ...], list[str]]:
        """Identifier -> the image ids that carry it, both in table order (singletons included)."""
        out: dict[tuple[int, ...], list[str]] = {}
        for i, image_id in enumerate(self.image_ids):
            out.setdefault(self.identifier(i), []).append(image_id)
        return out

    def subset(self, image_ids: Sequence[str]) -> IdentifierTable:
        """The rows of `image_ids` in the given order (e.g. the test images for a test trie)."""
        index = self.index()
        missing = [i for i in image_ids if i not in index]
        if missing:
            raise KeyError(f"{len(missing)} image id(s) not in the identifier table, first {missing[:5]}")
        rows = np.array([index[i] for i in image_ids], dtype=np.int64)
        lengths = self.lengths[rows]
        width = int(lengths.max()) if rows.size else self.max_len
        return dataclasses.replace(self, image_ids=list(image_ids), tokens=self.tokens[rows, :width].copy(),
                                   lengths=lengths.copy(), metadata=dict(self.metadata))

    def save(self, out_dir: str | Path) -> Path:
        self.validate()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / TOKENS_FILE, self.tokens)
        np.save(out / LENGTHS_FILE, self.lengths)
        meta = {"format": FORMAT, "scheme": self.scheme, "num_new_tokens": int(self.num_new_tokens),
                "text_vocab_size": int(self.text_vocab_size), "fixed_length": bool(self.fixed_length),
                "num_images": self.num_images, "max_len": self.max_len, "metadata": self.metadata,
                "image_ids": self.image_ids}
        write_json(out / META_FILE, meta, indent=1)
        return out

    @classmethod
    def load(cls, table_dir: str | Path) -> IdentifierTable:
        root = Path(table_dir)
        for name in (META_FILE, TOKENS_FILE, LENGTHS_FILE):
            if not (root / name).exists():
                raise FileNotFoundError(f"identifier table file missing: {root / name}")
        meta = read_json(root / META_FILE, "identifier table file", IdentifierTableError, expect=None)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise IdentifierTableError(f"{root / META_FILE}: field 'format' is {got!r}, expected {FORMAT!r}")
        fields = {}
        for name, kind in (("scheme", str), ("num_new_tokens", int), ("text_vocab_size", int),
                           ("fixed_length", bool), ("image_ids", list), ("metadata", dict)):
            if not isinstance(meta.get(name), kind):
                raise IdentifierTableError(f"{root / META_FILE}: field {name!r} must be {kind.__name__}, "
                                           f"got {meta.get(name)!r:.80}")
            fields[name] = meta[name]
        arrays = {}
        for name in (TOKENS_FILE, LENGTHS_FILE):
            try:
                arrays[name] = np.load(root / name, allow_pickle=False)
            except ValueError as e:
                raise IdentifierTableError(f"{root / name}: not a plain numeric .npy array ({e})") from None
        table = object.__new__(cls)  # fields set directly so validation errors name the directory
        table.image_ids = list(fields["image_ids"])
        table.tokens, table.lengths = arrays[TOKENS_FILE], arrays[LENGTHS_FILE]
        table.scheme, table.num_new_tokens = fields["scheme"], fields["num_new_tokens"]
        table.text_vocab_size, table.fixed_length = fields["text_vocab_size"], fields["fixed_length"]
        table.metadata = fields["metadata"]
        table.validate(str(root))
        return table


def codebook_rows(table: IdentifierTable, table_dir: str | Path) -> np.ndarray:
    """[num_new_tokens, code_dim] embedding seeds of the table's new tokens: the tokenizer's voken vectors in
    token order (per-level codebooks flattened level-major), zero rows for disambiguation suffix tokens."""
    name = table.metadata.get("codebook_file")
    if not name:
        raise ValueError(f"{table_dir}: voken_embedding_init='codebook' needs a voken table with a codebook "
                         f"(scheme {table.scheme!r} has none)")
    path = Path(table_dir) / name
    if not path.exists():
        raise FileNotFoundError(f"codebook file missing: {path}")
    codebook = np.load(path, allow_pickle=False)  # [C, N, code_dim]
    vokens = codebook.reshape(-1, codebook.shape[-1]).astype(np.float32)
    if vokens.shape[0] > table.num_new_tokens:
        raise ValueError(f"{path}: {vokens.shape[0]} voken vectors but the table has {table.num_new_tokens} new "
                         "tokens")
    return np.concatenate([vokens, np.zeros((table.num_new_tokens - vokens.shape[0], vokens.shape[1]),
                                            np.float32)])


def table_voken_vectors(table: IdentifierTable, table_dir: str | Path) -> np.ndarray | None:
    """`codebook_rows` of a table that has a codebook file, else None (schemes without vokens)."""
    return codebook_rows(table, table_dir) if table.metadata.get("codebook_file") else None


def group_rows(bodies: np.ndarray) -> np.ndarray:
    """Group index per row of a PAD-padded [n, L] id array: rows with equal ids share a group."""
    if bodies.shape[0] == 0:
        return np.zeros((0,), np.int64)
    _, inverse = np.unique(bodies, axis=0, return_inverse=True)
    return inverse.reshape(-1)


def collision_stats(bodies: np.ndarray) -> dict[str, float | int]:
    """Collision rate (fraction of images whose identifier is shared with another image) and group sizes."""
    group = group_rows(bodies)
    sizes = np.bincount(group) if group.size else np.zeros((0,), np.int64)
    colliding = sizes[group] > 1 if group.size else np.zeros((0,), bool)
    return {"num_images": int(bodies.shape[0]), "num_identifiers": int(sizes.size),
            "collision_rate": float(colliding.mean()) if group.size else 0.0,
            "num_colliding_images": int(colliding.sum()), "num_colliding_groups": int((sizes > 1).sum()),
            "max_group_size": int(sizes.max()) if sizes.size else 0}


def position_usage_stats(tokens: np.ndarray, lengths: np.ndarray) -> list[dict[str, float | int]]:
    """Per identifier position: distinct tokens used and the perplexity exp(H) of their distribution."""
    out = []
    for pos in range(tokens.shape[1]):
        col = tokens[lengths > pos, pos]
        if col.size == 0:
            break
        _, counts = np.unique(col, return_counts=True)
        p = counts / counts.sum()
        out.append({"position": pos, "num_images": int(col.size), "distinct_tokens": int(counts.size),
                    "perplexity": float(np.exp(-(p * np.log(p)).sum()))})
    return out


def make_identifier_table(
    image_ids: Sequence[str],
    bodies: np.ndarray,
    body_lengths: np.ndarray,
    *,
    scheme: str,
    num_scheme_tokens: int,
    text_vocab_size: int,
    variable_length: bool,
    collision_policy: str = "suffix",
    order_key: np.ndarray | None = None,
    suffix_scope: Sequence[str] | np.ndarray | None = None,
    metadata: dict[str, Any] | None = None,
) -> IdentifierTable:
    """Build a table from identifier bodies ([n, L] PAD-padded ids, no EOS) and apply the collision policy.

    `num_scheme_tokens` new tokens are used by the bodies; suffix tokens (policy 'suffix') follow them at
    ids [text_vocab_size + num_scheme_tokens, ... + num_suffix_tokens). `order_key` ([n], smaller first)
    orders images inside a colliding group; ties and the default fall back to table order. `suffix_scope`
    ([n] labels, e.g. split names; None = one scope): suffix ranks are counted within each (body, scope).
    """
    if collision_policy not in COLLISION_POLICIES:
        raise ValueError(f"collision_policy must be one of {list(COLLISION_POLICIES)}, got {collision_policy!r}")
    bodies = np.asarray(bodies, np.int32)
    body_lengths = np.asarray(body_lengths, np.int32)
    n = bodies.shape[0]
    if body_lengths.shape != (n,):
        raise ValueError(f"body_lengths must have shape ({n},), got {body_lengths.shape}")
    before = collision_stats(bodies)
    group = group_rows(bodies)
    suffix_start = text_vocab_size + num_scheme_tokens
    num_suffix = 0
    if collision_policy == "suffix" and before["num_colliding_images"] > 0:
        key = np.zeros((n,), np.float64) if order_key is None else np.asarray(order_key, np.float64)
        if key.shape != (n,):
            raise ValueError(f"order_key must have shape ({n},), got {key.shape}")
        if suffix_scope is not None:
            scope = np.asarray(suffix_scope)
            if scope.shape != (n,):
                raise ValueError(f"suffix_scope must have shape ({n},), got {scope.shape}")
            group = group_rows(np.stack([group, np.unique(scope, return_inverse=True)[1].reshape(-1)], axis=1))
        order = np.lexsort((np.arange(n), key, group))  # by group, then key, then table order
        first = np.r_[0, np.flatnonzero(np.diff(group[order])) + 1]  # start of each group in `order`
        starts = np.repeat(first, np.diff(np.r_[first, n]))
        rank = np.empty((n,), np.int64)
        rank[order] = np.arange(n) - starts
        num_suffix = int(rank.max()) + 1
        bodies = _append_column(bodies, body_lengths, suffix_start + rank)
        body_lengths = body_lengths + 1
    lengths = body_lengths
    if variable_length:
        bodies = _append_column(bodies, body_lengths, np.full((n,), EOS_ID))
        lengths = body_lengths + 1
    width = int(lengths.max()) if n else 1
    meta = {**(metadata or {}), "collision_policy": collision_policy, "collisions_before_policy": before,
            "num_scheme_tokens": int(num_scheme_tokens), "num_suffix_tokens": num_suffix,
            "suffix_scope": "all" if suffix_scope is None else "scoped",
            "suffix_token_range": [suffix_start, suffix_start + num_suffix]}
    return IdentifierTable(image_ids=list(image_ids), tokens=bodies[:, :width].astype(np.int32),
                           lengths=lengths.astype(np.int32), scheme=scheme,
                           num_new_tokens=int(num_scheme_tokens + num_suffix), text_vocab_size=int(text_vocab_size),
                           fixed_length=not variable_length, metadata=meta)


def _append_column(bodies: np.ndarray, lengths: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Write values[i] at position lengths[i] of row i, widening the array when needed."""
    n, width = bodies.shape
    need = int(lengths.max()) + 1 if n else width
    out = np.zeros((n, max(width, need)), np.int32)
    out[:, :width] = bodies
    out[np.arange(n), lengths] = values
    return out
