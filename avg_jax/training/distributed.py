"""Multi-process JAX setup: `jax.distributed.initialize` when configured (TPU pods, multi-GPU, CPU+gloo)."""

from __future__ import annotations

import gin
import jax


@gin.configurable
def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, cpu_collectives: str = "gloo") -> bool:
    """Join the multi-process job when `coordinator_address` is set ('auto': detect it on TPU/SLURM/...).

    Must run before anything touches a JAX device. Returns whether a distributed runtime was started.
    """
    if coordinator_address is None:
        return False
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if coordinator_address == "auto":
        jax.distributed.initialize()
    else:
        if num_processes is None or process_id is None:
            raise ValueError("initialize_distributed: coordinator_address "
                             f"{coordinator_address!r} needs num_processes and process_id")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    return True
