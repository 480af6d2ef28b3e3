"""Mesh and logical-axis sharding for the trainer (t5x convention: logical names -> mesh axes by rules).

Parameters carry logical axis names (flax `nn.with_logical_partitioning`); a rules table maps each
logical name to a mesh axis ('data' or 'model') or None. Changing the rules in gin moves the same model
between data parallelism and model parallelism without touching code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "model")

# batch -> data; wide dimensions (vocab, mlp, heads) -> model; everything else replicated.
DEFAULT_LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("embed", None),
    ("length", None),
    ("relpos_buckets", None),
    ("abspos_buckets", None),
    ("joined_kv", "model"),
)


@gin.configurable
def make_mesh(mesh_shape: Sequence[int] = (-1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'model') mesh over all devices; one -1 entry takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(mesh_shape)
    if len(shape) != 2:
        raise ValueError(f"mesh_shape must have 2 entries (data, model), got {tuple(mesh_shape)}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh_shape {tuple(mesh_shape)}: entries must be positive, at most one -1")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        if len(devices) % known:
            raise ValueError(f"mesh_shape {tuple(mesh_shape)} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh_shape {tuple(shape)} needs {int(np.prod(shape))} devices, found {len(devices)}")
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=auto, devices=devices)


@gin.configurable
def logical_axis_rules(rules: Sequence[tuple[str, str | None]] = DEFAULT_LOGICAL_AXIS_RULES
                       ) -> tuple[tuple[str, str | None], ...]:
    """The rules table in use (bind `logical_axis_rules.rules` in gin to change it)."""
    return tuple((str(name), axis) for name, axis in rules)


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules: Sequence[tuple[str, str | None]]) -> Any:
    """NamedShardings for a pytree of (possibly `LogicallyPartitioned`-boxed) abstract values."""
    specs = nn.get_partition_spec(abstract_boxed)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over 'data', the rest replicated."""
    return NamedSharding(mesh, PartitionSpec("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
