"""The training loop: mesh-sharded jitted steps, orbax checkpoints with automatic resume, preemption safety.

Model-agnostic: a `TrainTask` supplies parameter init (with logical axis names) and a loss; the loop
supplies sharding, the optimizer, gradient accumulation, compute dtype, deterministic RNG from
(seed, step), checkpoints (train state + data-iterator state + operative gin config), metrics, periodic
evaluation, NaN/inf detection and a final checkpoint on SIGTERM.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from avg_jax import config, partitioning
from avg_jax.training.checkpointing import Checkpointer, run_dir_lock
from avg_jax.training.metrics import MetricWriter
from avg_jax.training.optimizer import make_optimizer

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
COMPUTE_DTYPES = ("float32", "bfloat16")
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: the run stopped early and can be resumed

Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]


class TrainTask(Protocol):
    """What the loop trains: parameters (boxed with logical axis names) and a scalar loss."""

    def init_params(self, rng: jax.Array) -> Any:
        """Parameters, possibly `nn.LogicallyPartitioned`-boxed so they can be sharded by the rules."""

    def loss(self, params: Any, batch: Batch, rng: jax.Array, step: jax.Array, constants: Any
             ) -> tuple[jax.Array, Metrics]:
        """(mean loss over the batch, scalar metrics); `step` is the number of updates done so far;
        `constants` are the loop's per-run arrays (e.g. trie tables), jit inputs of every step."""

    # Optional: `post_update(params, batch, rng, step, constants) -> (params, metrics)`, applied inside the
    # jitted step to the parameters after the optimizer update of step `step` (e.g. codebook re-seeding,
    # non-trained statistics kept in the parameters); its scalar metrics join the step's.


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32, updates applied so far
    params: Any
    opt_state: Any


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN/inf; the message names the step and the last good checkpoint."""


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    step: int
    preempted: bool
    metrics: dict[str, float]


def step_rng(seed: int, step: jax.Array) -> jax.Array:
    """The RNG of one training step: a pure function of (seed, step), so a resumed run replays it exactly."""
    return jax.random.fold_in(jax.random.key(seed), step)


def cast_floating(tree: Any, dtype: jnp.dtype) -> Any:
    """Cast floating-point leaves to `dtype` (the compute copy of float32 master parameters)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_train_step(task: TrainTask, tx: optax.GradientTransformation, schedule: optax.Schedule, seed: int,
                    batch_sharding: NamedSharding, accum_steps: int = 1, compute_dtype: str = "float32"
                    ) -> Callable[[TrainState, Batch, Any], tuple[TrainState, Metrics]]:
    """One optimizer update from one global batch ([accum_steps * micro, ...] rows), as a pure function."""
    dtype = jnp.dtype(compute_dtype)

    def loss_fn(params, batch, rng, step, constants):
        params = cast_floating(params, dtype) if dtype != jnp.float32 else params
        return task.loss(params, batch, rng, step, constants)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    micro_sharding = NamedSharding(batch_sharding.mesh, PartitionSpec(None, batch_sharding.spec[0]))

    def split_micro(x):  # [accum * micro, ...] -> [accum, micro, ...]; row r goes to micro-batch r % accum
        x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, micro_sharding)

    def train_step(state: TrainState, batch: Batch, constants: Any) -> tuple[TrainState, Metrics]:
        rng = step_rng(seed, state.step)
        if accum_steps == 1:
            (loss, aux), grads = grad_fn(state.params, batch, rng, state.step, constants)
        else:
            def body(carry, xs):
                i, micro = xs
                out = grad_fn(state.params, micro, jax.random.fold_in(rng, i), state.step, constants)
                return jax.tree.map(jnp.add, carry, out), None

            micro_batches = jax.tree.map(split_micro, batch)
            first = jax.tree.map(lambda x: x[0], micro_batches)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 jax.eval_shape(grad_fn, state.params, first, rng, state.step, constants))
            ((loss, aux), grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro_batches))
            loss, aux, grads = jax.tree.map(lambda x: x / accum_steps, (loss, aux, grads))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, **aux, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": jnp.asarray(schedule(state.step), jnp.float32)}
        if hasattr(task, "post_update"):
            params, extra = task.post_update(params, batch, rng, state.step, constants)
            metrics |= extra
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def jit_train_step(task: TrainTask, tx: optax.GradientTransformation, schedule: optax.Schedule, seed: int,
                   mesh: Mesh, rules: partitioning.LogicalRules, shardings: TrainState, accum_steps: int = 1,
                   compute_dtype: str = "float32") -> Any:
    """`make_train_step` jit-compiled as `train_loop` runs it: (state, global batch, constants) -> (state,
    metrics), the state donated; `shardings` as from `abstract_train_state`."""
    batch_sharding = _batch_sharding(mesh, rules)
    return jax.jit(make_train_step(task, tx, schedule, seed, batch_sharding, accum_steps, compute_dtype),
                   in_shardings=(shardings, batch_sharding, partitioning.replicated(mesh)),
                   out_shardings=(shardings, partitioning.replicated(mesh)), donate_argnums=0)


def abstract_train_state(task: TrainTask, tx: optax.GradientTransformation, mesh: Mesh,
                         rules: tuple[tuple[str, str | None], ...]) -> tuple[TrainState, TrainState]:
    """The train state's shapes with their shardings (the restore target) and those shardings alone."""
    rng = jax.random.key(0)  # shapes only
    param_shardings = partitioning.boxed_shardings(jax.eval_shape(task.init_params, rng), mesh, rules)
    abstract_params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                   jax.eval_shape(lambda r: nn.unbox(task.init_params(r)), rng), param_shardings)
    opt_shardings = jax.jit(tx.init).lower(abstract_params).compile().output_shardings
    abstract_opt = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                jax.eval_shape(tx.init, abstract_params), opt_shardings)
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=partitioning.replicated(mesh))
    abstract = TrainState(step=step, params=abstract_params, opt_state=abstract_opt)
    return abstract, state_shardings(abstract)


def state_shardings(abstract: Any) -> Any:
    return jax.tree.map(lambda s: s.sharding, abstract)


class PreemptionWatcher:
    """SIGTERM -> checkpoint and stop. Multi-process runs use JAX's preemption sync point so that every
    process stops at the same step; a single process installs its own SIGTERM handler."""

    def __init__(self):
        self._requested = False
        self._previous = None
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self._requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._requested

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def _batch_sharding(mesh: Mesh, rules: partitioning.LogicalRules) -> NamedSharding:
    """Leading axis by the 'batch' rule, trailing axes replicated (any rank)."""
    return partitioning.batch_sharding(mesh, rules, ndim=1)


def _global_batch(local: Batch, batch_sharding: NamedSharding) -> Batch:
    """Assemble the global batch from this process's rows (rows of process p come p-th along 'data')."""
    return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v)) for k, v in local.items()}


def _check_batch(batch: Batch, mesh: Mesh, accum_steps: int) -> None:
    sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in batch.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(f"train batch: every field needs the same leading batch size, got {sizes}")
    rows = next(iter(sizes.values())) * jax.process_count()
    need = mesh.shape["data"] * accum_steps
    if rows % need:
        raise ValueError(f"global batch size {rows} must be divisible by data-axis size {mesh.shape['data']} "
                         f"x accum_steps {accum_steps} = {need}")


@gin.configurable(denylist=["task", "train_iterator", "run_dir", "evaluate", "constants", "initial_params", "mesh",
                            "optimizer"])
def train_loop(
    task: TrainTask,
    train_iterator: Iterator[Batch],
    run_dir: str | epath.PathLike,
    num_steps: int = gin.REQUIRED,
    seed: int = 0,
    accum_steps: int = 1,
    compute_dtype: str = "float32",
    checkpoint_every: int = 100,
    keep_checkpoints: int = 3,
    async_checkpoints: bool = True,
    log_every: int = 10,
    eval_every: int = 0,
    progress_bar: bool = True,
    tensorboard: bool = True,
    evaluate: Callable[[Any, int], Mapping[str, float]] | None = None,
    constants: Any = None,
    initial_params: Any = None,
    mesh: Mesh | None = None,
    optimizer: tuple[optax.GradientTransformation, optax.Schedule] | None = None,
) -> TrainResult:
    """Train `task` on batches of `train_iterator` (this process's rows) for `num_steps` updates.

    Resumes automatically from the newest readable checkpoint in `run_dir/checkpoints`; a run dir that another
    process is training raises `RunDirBusyError` (`run_dir_lock`). The iterator must
    support `get_state`/`set_state` (grain) so a resumed run sees exactly the batches it would have seen.
    A fresh run starts from `initial_params` (host arrays, e.g. an imported checkpoint, or a zero-argument
    callable returning them, called only when there is no checkpoint to resume) when given, else from
    `task.init_params(key(seed))`. `mesh` and `optimizer` (transformation, schedule) default to the gin-configured
    `make_device_mesh()` and `make_optimizer()`.
    """
    if num_steps <= 0:
        raise ValueError(f"train_loop.num_steps must be > 0, got {num_steps}")
    if accum_steps <= 0:
        raise ValueError(f"train_loop.accum_steps must be > 0, got {accum_steps}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"train_loop.compute_dtype: {compute_dtype!r} not one of {COMPUTE_DTYPES}")
    run_dir = epath.Path(run_dir)  # local or gs://
    mesh = partitioning.make_device_mesh() if mesh is None else mesh
    rules = partitioning.logical_axis_rules()
    tx, schedule = make_optimizer() if optimizer is None else optimizer
    with run_dir_lock(run_dir) as still_held:  # before the Checkpointer opens (orbax: creates, cleans up) it
        ckpt = Checkpointer(run_dir / CHECKPOINT_DIR, save_every=checkpoint_every, keep=keep_checkpoints,
                            async_save=async_checkpoints)
        with partitioning.sharding_context(mesh, rules):
            abstract, shardings = abstract_train_state(task, tx, mesh, rules)
            restored = ckpt.restore_latest(abstract, train_iterator)
            if restored is None and initial_params is not None:
                if callable(initial_params):
                    initial_params = initial_params()
                params = jax.device_put(_check_like(initial_params, abstract.params), shardings.params)
                opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
                state = TrainState(jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params, opt_state)
                start = 0
            elif restored is None:
                init = jax.jit(lambda rng: _fresh_state(task, tx, rng), out_shardings=shardings)
                state, start = init(jax.random.key(seed)), 0
            else:
                state, start = restored
            step_fn = jit_train_step(task, tx, schedule, seed, mesh, rules, shardings, accum_steps, compute_dtype)
            constants = jax.device_put(constants, partitioning.replicated(mesh))
            config_text = gin.operative_config_str()
            if jax.process_index() == 0:
                config.write_operative_config(run_dir)
            writer = MetricWriter(run_dir, num_steps, start_step=start, progress_bar=progress_bar,
                                  tensorboard=tensorboard)
            if restored is not None:
                writer.print(f"resumed from checkpoint step {start} in {ckpt.directory}")
            watcher = PreemptionWatcher()
            try:
                return _run(state, start, num_steps, step_fn, constants, train_iterator, mesh, rules, accum_steps,
                            ckpt, writer, watcher, config_text, log_every, eval_every, evaluate, still_held)
            finally:
                watcher.close()
                writer.close()
                ckpt.close()


def _check_like(params: Any, abstract: Any) -> Any:
    """`params` if its tree, shapes and dtypes match the task's parameters; else an error naming the leaf."""
    got = jax.tree_util.tree_flatten_with_path(params)[0]
    want = jax.tree_util.tree_flatten_with_path(abstract)[0]
    names, expected = ({jax.tree_util.keystr(p) for p, _ in t} for t in (got, want))
    if names != expected:
        raise ValueError(f"initial_params: parameter names differ from the model's, e.g. "
                         f"{sorted(names ^ expected)[:5]}")
    for (path, x), (_, a) in zip(got, want, strict=True):
        if np.shape(x) != a.shape or np.asarray(x).dtype != a.dtype:
            raise ValueError(f"initial_params{jax.tree_util.keystr(path)}: {np.asarray(x).dtype}{list(np.shape(x))}, "
                             f"the model expects {a.dtype}{list(a.shape)}")
    return params


def _fresh_state(task: TrainTask, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    params = nn.unbox(task.init_params(rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def _run(state, step, num_steps, step_fn, constants, it, mesh, rules, accum_steps, ckpt, writer, watcher,
         config_text, log_every, eval_every, evaluate, still_held) -> TrainResult:
    """The host loop. Metrics of step t are fetched after step t+1 is dispatched (keeps the device busy),
    except before a checkpoint, which is only written once its step's loss is known to be finite. Every write
    into the run directory (a metrics row, a checkpoint) is preceded by `still_held()` (`run_dir_lock`)."""
    batch_sharding = _batch_sharding(mesh, rules)
    # XLA:CPU launches each device's share of a step on a small worker pool and runs a step with collectives
    # only once the device's previous step is done: a step dispatched while the previous one still runs can
    # hold workers the previous one's last participant needs, and its all-reduce never completes (fatal
    # rendezvous timeout, e.g. 8 host devices on 2 cores). CPU devices share the host's cores anyway, so
    # overlapping steps gains nothing there.
    serialize = mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"
    pending: tuple[int, Metrics] | None = None
    window: list[dict[str, float]] = []
    last: dict[str, float] = {}
    tick = time.perf_counter()
    tick_step = step

    def settle():
        nonlocal pending, last, tick, tick_step
        if pending is None:
            return
        s, metrics = pending
        pending = None
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        bad = [k for k in ("loss", "grad_norm") if k in host and not math.isfinite(host[k])]
        if bad:
            ckpt.wait()
            good = ckpt.all_steps()
            where = f"last good checkpoint: step {good[-1]} in {ckpt.directory}" if good else "no checkpoint yet"
            raise NonFiniteLossError(f"non-finite {' and '.join(bad)} ({', '.join(str(host[k]) for k in bad)}) "
                                     f"at training step {s}; stopped ({where})")
        window.append(host)
        last = host
        writer.advance(s, {"loss": host["loss"]})
        if s % log_every == 0 or s == num_steps:
            still_held()
            now = time.perf_counter()
            row = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
            row["steps_per_sec"] = (s - tick_step) / max(now - tick, 1e-9)
            writer.write(s, row)
            window.clear()
            tick, tick_step = now, s

    while step < num_steps:
        if watcher.reached(step):
            settle()
            still_held()
            ckpt.save(step, state, it, config_text, force=True)
            ckpt.wait()
            writer.print(f"SIGTERM: saved checkpoint at step {step} in {ckpt.directory}; stopping")
            return TrainResult(state=state, step=step, preempted=True, metrics=last)
        try:
            local = next(it)
        except StopIteration:
            raise ValueError(f"training data ran out at step {step} of {num_steps}; make the train pipeline "
                             "repeat (num_epochs=None)") from None
        _check_batch(local, mesh, accum_steps)
        state, metrics = step_fn(state, _global_batch(local, batch_sharding), constants)
        if serialize:
            jax.block_until_ready(state)
        step += 1
        settle()
        pending = (step, metrics)
        if step == num_steps or ckpt.should_save(step):
            settle()
            still_held()
            ckpt.save(step, state, it, config_text, force=step == num_steps)
        if evaluate is not None and (step == num_steps or (eval_every and step % eval_every == 0)):
            settle()
            scores = dict(evaluate(state.params, step))
            still_held()
            writer.write(step, scores, prefix="eval/")
            writer.print(f"step {step} eval: " + " ".join(f"{k}={v:.4f}" for k, v in scores.items()))
    settle()
    ckpt.wait()
    return TrainResult(state=state, step=step, preempted=False, metrics=last)
