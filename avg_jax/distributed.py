"""Multi-process start-up: join the jax.distributed cluster (`initialize_distributed`) and check it (`launch_check`).

Trainer and other multi-host entry points: call `initialize_distributed()` first, unconditionally, before
the first JAX computation (it must precede anything that touches a backend, even `jax.devices()`), then
build the mesh with `avg_jax.partitioning.make_device_mesh()`. gin decides whether the run is multi-process:
the binding `initialize_distributed.enabled = True` (added by tpu_scripts/launch.sh) joins the cluster; so does
a configured coordinator address or process count (gin or environment); otherwise the call only reports the
single process. On a Cloud TPU slice `jax.distributed.initialize()` finds the coordinator, process
count and process id from the TPU metadata, so nothing needs to be set. Elsewhere (the localhost simulation
`tpu_scripts/launch.sh --local_workers N`, a CPU/GPU cluster) they come from gin or from the environment
variables `JAX_COORDINATOR_ADDRESS` (also read by JAX itself), `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`.

`launch_check` is what `avg-jax launch-check` (avg_jax/commands.py) runs before training: it joins the cluster,
builds the mesh and checks a sharded reduction over data that every process holds only a part of.
"""

from __future__ import annotations

import dataclasses
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from avg_jax.partitioning import MESH_AXES, make_device_mesh

ENV_COORDINATOR_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class ClusterInfo:
    """Where this process sits in the cluster (what every entry point logs first)."""

    process_id: int
    num_processes: int
    local_device_count: int
    device_count: int
    platform: str
    device_kind: str


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def cluster_info() -> ClusterInfo:
    """The current process's view of the cluster (initialises the backend)."""
    devices = jax.local_devices()
    return ClusterInfo(process_id=jax.process_index(), num_processes=jax.process_count(),
                       local_device_count=len(devices), device_count=jax.device_count(),
                       platform=devices[0].platform, device_kind=devices[0].device_kind)


@gin.configurable
def initialize_distributed(enabled: bool | None = None, coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           cpu_collectives: str | None = "gloo", initialization_timeout: int = 300) -> ClusterInfo:
    """Join the multi-process JAX cluster if so configured (once; later calls only report); call it first.

    `enabled`: True joins (on Cloud TPU nothing else needs setting), False never does, None (default) joins
    when a coordinator address or a process count is configured. Arguments left as None are read
    from the environment (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`), then
    auto-detected by JAX (Cloud TPU metadata, SLURM, Open MPI); num_processes=1 runs alone without a
    coordinator. `cpu_collectives` selects the cross-process collectives of the CPU backend ('gloo' for the
    localhost simulation).
    """
    if enabled is False or jax.distributed.is_initialized():
        return cluster_info()
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR_ADDRESS) or None
    num_processes = _env_int(ENV_NUM_PROCESSES) if num_processes is None else num_processes
    process_id = _env_int(ENV_PROCESS_ID) if process_id is None else process_id
    if enabled is None and coordinator_address is None and num_processes is None:
        return cluster_info()
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"initialize_distributed: num_processes={num_processes} must be >= 1")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"initialize_distributed: process_id={process_id} is outside [0, {num_processes})")
    if num_processes == 1:  # a single process forms no cluster
        return cluster_info()
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=initialization_timeout)
    except ValueError as e:  # JAX found no cluster environment to fill in what is missing
        raise ValueError(f"initialize_distributed: {e} (not on a Cloud TPU slice: set {ENV_COORDINATOR_ADDRESS}, "
                         f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}, or bind them in gin)") from None
    return cluster_info()


@gin.configurable
def launch_check(rows_per_device: int = 4, columns: int = 3) -> dict:
    """Join the cluster, build the mesh, and sum a [rows, columns] array sharded row-wise over every device.

    Every process materialises only the rows of its own devices; the jitted sum needs all of them, so it
    agrees with the numpy sum of the full array only if the processes really exchanged data. The per-process
    partial sums are all-gathered on the host as a second, independent check.
    """
    info = initialize_distributed(enabled=True)
    mesh = make_device_mesh()
    full = np.arange(mesh.size * rows_per_device * columns, dtype=np.int64).reshape(-1, columns) % 1009
    full = full.astype(np.int32)  # [rows, columns]
    sharding = NamedSharding(mesh, P(MESH_AXES))  # rows over data x model: no replica
    x = jax.make_array_from_callback(full.shape, sharding, lambda index: full[index])
    total = jax.jit(lambda a: jnp.sum(a, axis=0), out_shardings=NamedSharding(mesh, P()))(x)  # [columns]
    total = np.asarray(total.addressable_data(0))
    local = sum(np.asarray(shard.data).sum(axis=0) for shard in x.addressable_shards)  # [columns]
    gathered = np.asarray(multihost_utils.process_allgather(local))  # [num_processes, columns]
    expected = full.sum(axis=0)
    return {
        **dataclasses.asdict(info),
        "mesh": dict(zip(mesh.axis_names, mesh.devices.shape, strict=True)),
        "sharded_sum": total.tolist(),
        "local_partial_sum": local.tolist(),
        "gathered_partial_sums_total": gathered.sum(axis=0).tolist(),
        "expected_sum": expected.tolist(),
        "ok": bool(np.array_equal(total, expected) and np.array_equal(gathered.sum(axis=0), expected)),
    }
