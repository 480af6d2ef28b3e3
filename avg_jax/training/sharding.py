"""Logical-axis shardings for the trainer (t5x convention: logical names -> mesh axes by a rules table).

TEMPORARY: replaced by `avg_jax.partitioning` (the T5 helper's rules tables) as soon as it is on main.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalRules = tuple[tuple[str, str | None], ...]

# batch -> data; wide dimensions (vocab, mlp, heads) -> model; everything else replicated.
MODEL_PARALLEL_RULES: LogicalRules = (
    ("batch", "data"), ("vocab", "model"), ("mlp", "model"), ("heads", "model"), ("joined_kv", "model"),
    ("embed", None), ("kv", None), ("length", None), ("relpos_buckets", None), ("image_features", None),
    ("image_tokens", None),
)


def logical_axis_rules() -> LogicalRules:
    return MODEL_PARALLEL_RULES


def boxed_shardings(boxed_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, str | None]]) -> Any:
    """NamedShardings for a pytree of `nn.LogicallyPartitioned`-boxed (abstract) values."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over 'data', the rest replicated."""
    return NamedSharding(mesh, PartitionSpec("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
