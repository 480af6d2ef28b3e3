"""orbax checkpoints of a training run: train state + data-iterator state + operative gin config.

Saves are asynchronous (the arrays are copied to host before `save` returns, so the train step may
donate its buffers at once). Restoring walks the committed steps newest first: a step that cannot be
read (corrupted or half-written files) is reported by step number, moved aside to
`<run>/corrupt_checkpoints/` and the previous one is used. If no step can be read, restoring raises
instead of silently starting over (the usual cause is a changed model config, not corruption).
A run directory is trained by one process at a time, and not after it was moved away (`run_dir_lock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import grain.checkpoint
import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

CORRUPT_DIR = "corrupt_checkpoints"
LOCK_FILE = "train.lock"


class CheckpointError(RuntimeError):
    """No checkpoint of the run could be restored."""


class RunDirBusyError(RuntimeError):
    """Another process is training the same run directory."""


class RunDirMovedError(RuntimeError):
    """The run directory was moved or replaced while this process trained it."""


@contextlib.contextmanager
def run_dir_lock(run_dir: epath.Path) -> Iterator[Callable[[], None]]:
    """This process's exclusive hold on a LOCAL run directory while it trains it (process 0 of a multi-host job).

    Two trainings of one run dir (e.g. two sweeps started over one output directory, both resuming the same run)
    would interleave their checkpoints and metrics. The hold is an advisory `flock` on RUN_DIR/train.lock, which
    the kernel drops when the process ends, however it ends (kill -9 included): a lock is never stale. A second
    process gets `RunDirBusyError` naming the directory and the holder's pid. gs:// run dirs are not locked.
    Yields a check for the trainer to call before it writes: `RunDirMovedError` once RUN_DIR/train.lock is no
    longer the file this process locked, i.e. the directory was moved away or replaced while it trained (the
    lock moves with the old directory, and a process started on the new one would get a lock of its own).
    """
    path = os.fspath(run_dir)
    if "://" in path or jax.process_index() != 0:
        yield lambda: None
        return
    os.makedirs(path, exist_ok=True)
    lock_path = os.path.join(path, LOCK_FILE)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)

    def still_held() -> None:
        held = os.fstat(fd)
        try:
            now = os.stat(lock_path)
        except FileNotFoundError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
            raise RunDirMovedError(f"{path} is no longer the run directory this process locked ({LOCK_FILE} was "
                                   "moved or replaced while it trained): stopped without writing into it; the "
                                   "moved directory keeps this run's last checkpoint")

    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirBusyError(f"{path} is being trained by another process (pid {holder}, {LOCK_FILE}): wait "
                                  "for it or stop it; a rerun then resumes from the run's last checkpoint") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield still_held
    finally:
        os.close(fd)  # drops the lock


class _FrozenIteratorState:
    """The data-iterator state captured at save time (an async save may finish after the loop moved on)."""

    def __init__(self, iterator: Any):
        state = iterator.get_state()
        self._state = state if isinstance(state, bytes) else json.dumps(state, indent=1).encode()

    def get_state(self) -> bytes:
        return self._state


class Checkpointer:
    """Keep-last-k, every-n-steps checkpoints of one run directory, with corruption fallback on restore."""

    def __init__(self, directory: str | epath.PathLike, save_every: int, keep: int = 3, async_save: bool = True):
        if save_every <= 0:
            raise ValueError(f"checkpoint save_every must be > 0, got {save_every}")
        if keep <= 0:
            raise ValueError(f"checkpoint keep must be > 0, got {keep}")
        self.directory = epath.Path(directory)
        if not str(directory).startswith(("gs://", "s3://")):
            self.directory = self.directory.absolute()
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """Every `save_every` steps (orbax's own policy would also save the first step of a run)."""
        return step % self.save_every == 0

    def save(self, step: int, state: Any, data_iterator: Any, config_text: str, force: bool = False) -> bool:
        """Start saving `state` at `step` if it is a save step (or `force`); returns whether it saves."""
        if not force and not self.should_save(step):
            return False
        if step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(_FrozenIteratorState(data_iterator)),
            config=ocp.args.JsonSave({"operative_config": config_text, "step": int(step)}),
        )
        return bool(self._manager.save(step, args=args, force=True))

    def restore_latest(self, abstract_state: Any, data_iterator: Any) -> tuple[Any, int] | None:
        """Restore the newest readable step into `abstract_state`'s shardings and `data_iterator`.

        Returns (state, step), or None when the run has no checkpoint yet.
        """
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            return None
        initial_data_state = data_iterator.get_state()
        failures: list[tuple[int, str]] = []
        for step in steps:
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=grain.checkpoint.CheckpointRestore(data_iterator),
                    config=ocp.args.JsonRestore(),
                ))
                saved_step = int(restored.config["step"])
                if saved_step != step:
                    raise ValueError(f"config item records step {saved_step}")
            except Exception as e:  # any unreadable file: try the previous step
                failures.append((step, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"))
                continue
            for bad, why in failures:
                log.warning("checkpoint step %d in %s is unreadable (%s); falling back to step %d and moving "
                            "it to %s", bad, self.directory, why, step, self.directory.parent / CORRUPT_DIR)
            self._quarantine([bad for bad, _ in failures])
            return restored.state, step
        data_iterator.set_state(initial_data_state)
        detail = "; ".join(f"step {s}: {why}" for s, why in failures)
        raise CheckpointError(f"no checkpoint in {self.directory} could be restored ({detail}). If the model or "
                              "optimizer config changed, start a new run directory.")

    def _quarantine(self, steps: list[int]) -> None:
        """Move unreadable step directories out of orbax's view so the run can save those steps again."""
        if not steps:
            return
        if jax.process_index() == 0:
            dest = self.directory.parent / CORRUPT_DIR
            dest.mkdir(parents=True, exist_ok=True)
            for step in steps:
                (self.directory / str(step)).rename(dest / f"{step}-{int(time.time())}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("avg_jax_checkpoint_quarantine")
        self._manager.reload()

    def wait(self) -> None:
        """Block until pending async saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
