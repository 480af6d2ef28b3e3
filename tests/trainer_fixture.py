"""A tiny model-agnostic training job for the trainer's reliability tests, runnable as a subprocess.

A two-layer MLP regression with dropout, parameters named with logical axes ('embed', 'mlp') so the
'model' mesh axis really splits them, trained by `train_loop` on a grain pipeline (shuffled, repeated,
sharded by process). Writes the final parameters to an .npz so runs can be compared bit for bit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import flax.linen as nn
import gin
import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

IN_DIM, HIDDEN, OUT_DIM, NUM_EXAMPLES = 16, 32, 8, 512


class MLP(nn.Module):
    dropout: float = 0.1

    @nn.compact
    def __call__(self, x, deterministic: bool = False):
        init = nn.initializers.lecun_normal()
        w1 = self.param("w1", nn.with_logical_partitioning(init, ("embed", "mlp")), (IN_DIM, HIDDEN))
        w2 = self.param("w2", nn.with_logical_partitioning(init, ("mlp", "embed")), (HIDDEN, OUT_DIM))
        h = nn.relu(x @ w1.astype(x.dtype))
        h = nn.Dropout(self.dropout, deterministic=deterministic)(h)
        return h @ w2.astype(x.dtype)


class RegressionTask:
    """Mean squared error of the MLP against a fixed random linear target."""

    def __init__(self, dropout: float = 0.1):
        self.model = MLP(dropout)

    def init_params(self, rng):
        return self.model.init(rng, jnp.zeros((1, IN_DIM)), deterministic=True)["params"]

    def loss(self, params, batch, rng, step, constants):
        pred = self.model.apply({"params": params}, batch["x"].astype(jnp.float32), rngs={"dropout": rng})
        loss = jnp.mean((pred.astype(jnp.float32) - batch["y"]) ** 2)
        return loss, {"pred_mean": jnp.mean(pred.astype(jnp.float32))}


def make_iterator(local_batch: int, seed: int, sleep: float, nan_at_step: int | None):
    """Shuffled, repeated batches of this process's share; `nan_at_step` poisons the batch of that step;
    `sleep` seconds before each batch."""
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((NUM_EXAMPLES, IN_DIM)).astype(np.float32)
    y = (x @ rng.standard_normal((IN_DIM, OUT_DIM)).astype(np.float32)) / 4
    source = [{"x": x[i], "y": y[i]} for i in range(NUM_EXAMPLES)]
    ds = grain.MapDataset.source(source)[jax.process_index()::jax.process_count()]
    ds = ds.shuffle(seed=seed).repeat().batch(local_batch, drop_remainder=True)

    def poison(i, b):
        if nan_at_step is not None and i == nan_at_step - 1:  # batch i trains step i + 1
            b = {**b, "x": np.full_like(b["x"], np.nan)}
        return b

    it = iter(ds.map_with_index(poison).to_iter_dataset())
    return SlowIterator(it, sleep) if sleep else it


class SlowIterator:
    """Sleeps in the consumer before each batch (grain's prefetch threads would hide a sleep in a map), so a
    test can interrupt the run at a chosen step. Checkpointable like the grain iterator it wraps."""

    def __init__(self, inner, sleep: float):
        self.inner, self.sleep = inner, sleep

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(self.sleep)
        return next(self.inner)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(json.loads(state) if isinstance(state, bytes) else state)

    def start_prefetch(self):
        self.inner.start_prefetch()


def main(argv=None) -> int:
    from avg_jax.distributed import initialize_distributed
    from avg_jax.training.trainer import PREEMPTED_EXIT_CODE, train_loop

    p = argparse.ArgumentParser()
    p.add_argument("--run_dir", required=True)
    p.add_argument("--out_params", default=None)
    p.add_argument("--global_batch", type=int, default=16)
    p.add_argument("--sleep", type=float, default=0.0, help="seconds per batch, so a test can kill mid-run")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--nan_at_step", type=int, default=None)
    p.add_argument("--gin_param", action="append", default=[])
    args = p.parse_args(argv)
    gin.parse_config(args.gin_param)
    initialize_distributed()  # joins a cluster only with initialize_distributed.enabled = True
    it = make_iterator(args.global_batch // jax.process_count(), seed=7, sleep=args.sleep,
                       nan_at_step=args.nan_at_step)
    result = train_loop(RegressionTask(args.dropout), it, args.run_dir)
    specs = {k: str(v.sharding.spec) for k, v in result.state.params.items()}
    print("RESULT " + json.dumps({"step": result.step, "preempted": result.preempted, "metrics": result.metrics,
                                  "process": jax.process_index(), "param_specs": specs}), flush=True)
    if args.out_params:
        params = multihost_utils.process_allgather(result.state.params, tiled=True)
        np.savez(args.out_params, **{k: np.asarray(v) for k, v in params.items()})
    return PREEMPTED_EXIT_CODE if result.preempted else 0


if __name__ == "__main__":
    sys.exit(main())
