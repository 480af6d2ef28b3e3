"""Reliability of the training loop: resume after kill -9 / SIGTERM is bit-identical, corrupted checkpoints
fall back, NaN stops with the step named, sharded == unsharded, two jax.distributed processes agree."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import gin
import numpy as np
import pytest
import trainer_fixture
from trainer_fixture import RegressionTask, make_iterator

from avg_jax.training.checkpointing import LOCK_FILE, CheckpointError, RunDirBusyError, RunDirMovedError
from avg_jax.training.trainer import PREEMPTED_EXIT_CODE, NonFiniteLossError, train_loop

FIXTURE = Path(trainer_fixture.__file__)
REPO = FIXTURE.parent.parent


def _env(devices: int = 1) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _fixture_cmd(run_dir: Path, *args: str, params: tuple[str, ...] = ()) -> list[str]:
    cmd = [sys.executable, str(FIXTURE), "--run_dir", str(run_dir), *args]
    for p in params:
        cmd += ["--gin_param", p]
    return cmd


def _run(cmd: list[str], devices: int = 1, timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=_env(devices), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _result(stdout: str) -> dict:
    return json.loads(next(line[7:] for line in stdout.splitlines() if line.startswith("RESULT ")))


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _committed_steps(run_dir: Path) -> list[int]:
    ckpt = run_dir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


STEPS = 30
PREEMPT_PARAMS = (f"train_loop.num_steps={STEPS}", "train_loop.checkpoint_every=5", "train_loop.keep_checkpoints=2",
                  "train_loop.log_every=1", "train_loop.progress_bar=False", "train_loop.tensorboard=False")


def test_kill_and_sigterm_resume_is_bit_identical(tmp_path):
    """kill -9 twice and SIGTERM once at random steps after checkpoints; the final params equal an
    uninterrupted run's bit for bit."""
    _run(_fixture_cmd(tmp_path / "ref", "--out_params", str(tmp_path / "ref.npz"), params=PREEMPT_PARAMS))
    ref = np.load(tmp_path / "ref.npz")
    run_dir = tmp_path / "interrupted"
    rng = random.Random(0)
    resumed_from = []
    # 0.15 s per batch leaves >= 1.5 s between the kill point and the end of the run, even on a loaded machine
    for how, after_checkpoint in (("kill", 5), ("term", 10), ("kill", 20)):
        proc = subprocess.Popen(_fixture_cmd(run_dir, "--sleep", "0.15", params=PREEMPT_PARAMS), env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 200
        before = set(_committed_steps(run_dir))
        while not [s for s in _committed_steps(run_dir) if s >= after_checkpoint and s not in before]:
            assert proc.poll() is None and time.time() < deadline, "run ended before the kill point"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.2))  # a random step after that checkpoint
        proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        if how == "kill":
            assert proc.returncode == -signal.SIGKILL
        else:
            assert proc.returncode == PREEMPTED_EXIT_CODE, out[-3000:]
            stopped = _result(out)
            assert stopped["preempted"] and stopped["step"] < STEPS
            assert stopped["step"] in _committed_steps(run_dir)  # the final checkpoint at the SIGTERM step
        resumed_from += [int(line.split("step ")[1].split()[0]) for line in out.splitlines()
                         if line.startswith("resumed from checkpoint")]
    final = _run(_fixture_cmd(run_dir, "--out_params", str(tmp_path / "resumed.npz"), params=PREEMPT_PARAMS))
    resumed_from.append(int(final.stdout.split("resumed from checkpoint step ")[1].split()[0]))
    assert len(resumed_from) == 3 and resumed_from == sorted(resumed_from) and resumed_from[0] >= 5
    got = np.load(tmp_path / "resumed.npz")
    for k in ref.files:
        np.testing.assert_array_equal(got[k], ref[k])
    losses = _losses(run_dir)  # the metrics file was rewound on every resume: one row per step
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == _losses(tmp_path / "ref")


def _bind(**params) -> None:
    gin.clear_config()
    for k, v in {"num_steps": 20, "checkpoint_every": 5, "keep_checkpoints": 3, "log_every": 5,
                 "progress_bar": False, "tensorboard": False, **params}.items():
        gin.bind_parameter(f"train_loop.{k}", v)


def _train(run_dir: Path, dropout: float = 0.1, nan_at_step: int | None = None, batch: int = 16):
    return train_loop(RegressionTask(dropout), make_iterator(batch, seed=7, sleep=0.0, nan_at_step=nan_at_step),
                      run_dir)


def _params(result) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in result.state.params.items()}


def test_corrupted_and_half_written_checkpoints_fall_back(tmp_path, caplog):
    _bind()
    reference = _params(_train(tmp_path))
    ckpt = tmp_path / "checkpoints"
    assert _committed_steps(tmp_path) == [10, 15, 20]
    for f in (ckpt / "20" / "state").rglob("*"):  # corrupted: array data truncated
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:7])
    (ckpt / "15" / "state" / "manifest.ocdbt").unlink()  # half-written: the array index never got written
    with caplog.at_level(logging.WARNING, logger="avg_jax.training.checkpointing"):
        resumed = _train(tmp_path)
    warnings = [r.getMessage() for r in caplog.records]
    assert any("checkpoint step 20 " in w and "falling back to step 10" in w for w in warnings), warnings
    assert any("checkpoint step 15 " in w for w in warnings), warnings
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "corrupt_checkpoints").iterdir()) == ["15", "20"]
    for k, v in reference.items():  # replayed 10 -> 20 exactly
        np.testing.assert_array_equal(_params(resumed)[k], v)
    assert 20 in _committed_steps(tmp_path)


def test_unrestorable_run_raises_instead_of_starting_over(tmp_path, monkeypatch):
    _bind(num_steps=5)
    _train(tmp_path)
    monkeypatch.setattr(trainer_fixture, "HIDDEN", 2 * trainer_fixture.HIDDEN)  # a changed model config
    _bind(num_steps=10)
    with pytest.raises(CheckpointError, match=r"no checkpoint .* could be restored"):
        _train(tmp_path)
    assert _committed_steps(tmp_path) == [5]  # nothing moved aside


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path):
    _bind()
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* at training step 7; stopped \(last good "
                                                 r"checkpoint: step 5 in "):
        _train(tmp_path, nan_at_step=7)
    assert _committed_steps(tmp_path) == [5]
    _bind(num_steps=5)
    assert _train(tmp_path).step == 5  # the kept checkpoint restores


def test_gradient_accumulation_bf16_and_summaries(tmp_path):
    _bind(num_steps=4, log_every=1, tensorboard=True, progress_bar=True)
    _train(tmp_path / "full", dropout=0.0)
    assert [p.stat().st_size > 0 for p in (tmp_path / "full" / "tb").glob("events.out.tfevents.*")] == [True]
    assert "train_loop.num_steps = 4" in (tmp_path / "full" / "operative_config.gin").read_text()
    _bind(num_steps=4, log_every=1, accum_steps=2)
    _train(tmp_path / "accum", dropout=0.0)
    full, accum = _losses(tmp_path / "full"), _losses(tmp_path / "accum")
    np.testing.assert_allclose([accum[s] for s in range(1, 5)], [full[s] for s in range(1, 5)], rtol=2e-5)
    _bind(num_steps=4, log_every=1, compute_dtype="bfloat16")
    _train(tmp_path / "bf16", dropout=0.0)
    bf16 = _losses(tmp_path / "bf16")
    np.testing.assert_allclose(bf16[1], full[1], rtol=2e-2)
    assert bf16[1] != full[1]


def test_sharded_data4_model2_matches_unsharded(tmp_path):
    params = ("train_loop.num_steps=6", "train_loop.log_every=1", "train_loop.checkpoint_every=100",
              "train_loop.progress_bar=False", "train_loop.tensorboard=False")
    single = _result(_run(_fixture_cmd(tmp_path / "one", params=params), devices=1).stdout)
    sharded = _result(_run(_fixture_cmd(tmp_path / "eight", params=(*params, "make_device_mesh.data_parallelism=4",
                                                                  "make_device_mesh.model_parallelism=2")),
                           devices=8).stdout)
    assert sharded["param_specs"] == {"w1": "P(None, 'model')", "w2": "P('model', None)"}
    assert single["param_specs"] == {"w1": "P(None, 'model')", "w2": "P('model', None)"}
    one, eight = _losses(tmp_path / "one"), _losses(tmp_path / "eight")
    assert sorted(one) == sorted(eight) == list(range(1, 7))
    np.testing.assert_allclose([eight[s] for s in one], [one[s] for s in one], rtol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_jax_distributed_agree(tmp_path):
    port = _free_port()
    procs = []
    for i in range(2):
        params = ("train_loop.num_steps=8", "train_loop.log_every=1", "train_loop.checkpoint_every=4",
                  "train_loop.progress_bar=False", "train_loop.tensorboard=False",
                  "initialize_distributed.enabled=True",
                  f"initialize_distributed.coordinator_address='127.0.0.1:{port}'",
                  "initialize_distributed.num_processes=2", f"initialize_distributed.process_id={i}")
        procs.append(subprocess.Popen(
            _fixture_cmd(tmp_path / "run", "--out_params", str(tmp_path / f"p{i}.npz"),
                         params=params), env=_env(),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    r0, r1 = (_result(o) for o in outs)
    assert (r0["process"], r1["process"]) == (0, 1)
    assert r0["metrics"]["loss"] == r1["metrics"]["loss"] and np.isfinite(r0["metrics"]["loss"])
    p0, p1 = np.load(tmp_path / "p0.npz"), np.load(tmp_path / "p1.npz")
    for k in p0.files:
        np.testing.assert_array_equal(p0[k], p1[k])
    assert sorted(_losses(tmp_path / "run")) == list(range(1, 9))  # one writer: process 0
    data_files = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "8" / "data").glob("*.json"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]  # per-process iterator state


def test_a_run_dir_trains_in_one_process_at_a_time(tmp_path):
    """While another process holds a run dir (here: `run_dir_lock` in a child process), training it stops with an
    error naming the dir and the holder's pid, before opening its checkpoints or metrics; once the holder is
    killed (-9: the kernel drops the lock), the same call trains the run."""
    run_dir = tmp_path / "run"
    _bind(num_steps=10)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom etils import epath\n"
         "from avg_jax.training.checkpointing import run_dir_lock\n"
         "with run_dir_lock(epath.Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(300)",
         str(run_dir)], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusyError, match=f"{run_dir}.*pid {holder.pid}"):
            _train(run_dir)
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()
    assert int(_train(run_dir).state.step) == 10 and _committed_steps(run_dir) == [5, 10]


def test_training_stops_when_its_run_dir_is_moved_away(tmp_path):
    """A run dir moved away mid-training and replaced by another directory at the same path (what a person
    restarting an experiment does): the training process stops at its next write with an error naming the
    path, and writes nothing into the new directory; the moved directory resumes from its last checkpoint."""
    run_dir, moved = tmp_path / "run", tmp_path / "moved"
    _bind(num_steps=20, eval_every=10, async_checkpoints=False)

    def evaluate(params, step):
        run_dir.rename(moved)
        run_dir.mkdir()
        (run_dir / "marker").write_text("another run\n")
        return {"score": 1.0}

    with pytest.raises(RunDirMovedError, match=f"{run_dir} is no longer the run directory"):
        train_loop(RegressionTask(0.1), make_iterator(16, seed=7, sleep=0.0, nan_at_step=None), run_dir,
                   evaluate=evaluate)
    assert sorted(p.name for p in run_dir.iterdir()) == ["marker"]
    assert _committed_steps(moved) == [5, 10] and max(_losses(moved)) == 10
    gin.bind_parameter("train_loop.eval_every", 0)
    assert int(_train(moved).state.step) == 20 and _committed_steps(moved) == [10, 15, 20]
