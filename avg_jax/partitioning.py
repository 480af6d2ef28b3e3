"""Logical-axis sharding in the t5x convention: rules tables, a ('data', 'model') mesh, NamedShardings.

Models name every parameter and activation axis logically (`batch`, `length`, `embed`, `mlp`, `heads`,
`kv`, `joined_kv`, `vocab`, `relpos_buckets`, ...); a rules table maps each name to a mesh axis or None
(replicated). Switching from data parallelism on CPU to model parallelism on a TPU pod is a change of
rules (gin: `logical_axis_rules.name = 'model_parallel'`) and mesh shape, not of model code.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "model")

LogicalRules = tuple[tuple[str, str | None], ...]

# Logical names that every table replicates (sequence positions, per-head dims, small tables).
_REPLICATED: LogicalRules = tuple((n, None) for n in ("length", "kv", "relpos_buckets", "image_features",
                                                       "image_tokens"))

RULES: dict[str, LogicalRules] = {
    # pure data parallelism: only the batch is split; every parameter is replicated
    "data_parallel": (("batch", "data"), ("vocab", None), ("mlp", None), ("heads", None), ("joined_kv", None),
                      ("embed", None), *_REPLICATED),
    # t5x standard: batch over 'data', the wide parameter axes (vocab, mlp, heads) over 'model'
    "model_parallel": (("batch", "data"), ("vocab", "model"), ("mlp", "model"), ("heads", "model"),
                       ("joined_kv", "model"), ("embed", None), *_REPLICATED),
    # model_parallel plus parameters' embed axis over 'data' (ZeRO-3 style); activations keep batch on 'data'
    # because an axis already used by 'batch' is not reused for 'embed' in the same array
    "fsdp": (("batch", "data"), ("vocab", "model"), ("mlp", "model"), ("heads", "model"), ("joined_kv", "model"),
             ("embed", "data"), *_REPLICATED),
}


@gin.configurable
def logical_axis_rules(name: str = "model_parallel", overrides: Sequence[tuple[str, str | None]] = ()) -> LogicalRules:
    """The rules table `name`; `overrides` (logical name, mesh axis or None) take precedence."""
    if name not in RULES:
        raise ValueError(f"unknown logical_axis_rules name {name!r}; expected one of {sorted(RULES)}")
    rules = tuple((str(k), v) for k, v in overrides) + RULES[name]
    for logical, mesh_axis in rules:
        if mesh_axis is not None and mesh_axis not in MESH_AXES:
            raise ValueError(f"logical_axis_rules: {logical!r} maps to unknown mesh axis {mesh_axis!r}; "
                             f"mesh axes are {MESH_AXES}")
    return rules


@gin.configurable
def make_device_mesh(data_parallelism: int = -1, model_parallelism: int = 1,
                     devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ('data', 'model') mesh over `devices` (default: all); -1 on one axis takes what the other leaves.

    The one mesh builder: the trainer (gin-configured shape), the tokenizer (a device subset, data only) and
    dense search (every device on one axis) all call it.

    Uses `jax.make_mesh`, which orders TPU devices along the physical torus, so a `model` axis of up to the
    chips of one host stays on the fastest links. Axis types are Auto (pjit-style NamedSharding semantics).
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_device_mesh: no devices given")
    sizes = {"data_parallelism": data_parallelism, "model_parallelism": model_parallelism}
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ValueError(f"make_device_mesh: {name}={size} must be a positive integer or -1")
    if data_parallelism == -1 and model_parallelism == -1:
        raise ValueError("make_device_mesh: only one of data_parallelism / model_parallelism may be -1")
    known = math.prod(s for s in sizes.values() if s != -1)
    if len(devices) % known:
        raise ValueError(f"make_device_mesh: data_parallelism={data_parallelism} x model_parallelism="
                         f"{model_parallelism} does not divide the {len(devices)} devices")
    shape = tuple(len(devices) // known if s == -1 else s for s in sizes.values())
    if math.prod(shape) != len(devices):
        raise ValueError(f"make_device_mesh: mesh {dict(zip(MESH_AXES, shape, strict=True))} uses "
                         f"{math.prod(shape)} devices but there are {len(devices)} (no device may be left idle)")
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: LogicalRules) -> Iterator[None]:
    """Scope in which the models' `nn.with_logical_constraint` calls become real sharding constraints."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def logical_shardings(logical_specs: Any, mesh: Mesh, rules: LogicalRules) -> Any:
    """Pytree of logical PartitionSpecs (e.g. `avg_jax.t5.param_logical_axes`) -> NamedShardings."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def boxed_shardings(boxed_tree: Any, mesh: Mesh, rules: LogicalRules) -> Any:
    """Shardings for a tree of `nn.LogicallyPartitioned` values (e.g. `jax.eval_shape(model.init, ...)`)."""
    return logical_shardings(nn.get_partition_spec(boxed_tree), mesh, rules)


def batch_sharding(mesh: Mesh, rules: LogicalRules, ndim: int) -> NamedSharding:
    """Sharding of a [batch, ...] input array: logical ('batch', None, ...)."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_divisible(tree: Any, shardings: Any) -> None:
    """Raise (naming the leaf) if an array dim is not divisible by the mesh axes it is sharded over."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    flat_shardings = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sharding in zip(flat, flat_shardings, strict=True):
        for dim, axes in zip(np.shape(leaf), sharding.spec, strict=False):
            if axes is None:
                continue
            size = math.prod(sharding.mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
            if dim % size:
                raise ValueError(f"{jax.tree_util.keystr(path)}: dim {dim} is not divisible by mesh axes {axes} "
                                 f"(size {size})")
