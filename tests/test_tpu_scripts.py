"""Cloud TPU scripts: shellcheck, the commands their dry runs print, and a real 2-process localhost launch."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "tpu_scripts"
SHELL_SCRIPTS = sorted(SCRIPTS.glob("*.sh"))
COMMON = ["--dry_run", "--project", "proj-1", "--run_name", "flickr-main", "--bucket", "gs://bkt"]
GIN_FILE = "experiments/avg/flickr30k_main.gin"
GIN_PARAM = "decode.beam_size = 30"


def setup_py_pin(name: str) -> str:
    """The pinned version in setup.py, read independently of the scripts."""
    match = re.search(rf'"{re.escape(name)}==([^"]+)"', (REPO / "setup.py").read_text())
    assert match, f"{name} is not pinned in setup.py"
    return match.group(1)


@pytest.fixture
def no_gcloud(tmp_path):
    """An environment whose `gcloud` records any call and fails: a dry run must never call it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "gcloud_was_called"
    fake = bin_dir / "gcloud"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {marker}\nexit 99\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "GCS_", "RUN_", "GIN_", "DATA_"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    yield env
    assert not marker.exists(), f"a dry run called gcloud: {marker.read_text()}"


def run_script(name: str, *args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(SCRIPTS / name), *args], env=env, capture_output=True, text=True,
                          timeout=60)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def commands(stdout: str) -> list[list[str]]:
    """The argv of every command a dry run printed (lines starting with '+ ')."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def flag(argv: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def remote_words(argv: list[str]) -> list[str]:
    """The remote command line of a `gcloud ... ssh --command=...`, split into shell words and operators."""
    lexer = shlex.shlex(flag(argv, "--command"), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian: apt-get install -y shellcheck; .ci/run installs it)")
    files = [*map(str, SHELL_SCRIPTS), str(REPO / ".ci" / "run")]
    proc = subprocess.run(["shellcheck", "-x", *files], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scripts_are_executable_bash():
    names = {p.name for p in SHELL_SCRIPTS}
    assert {"common.sh", "create.sh", "setup_workers.sh", "launch.sh", "logs.sh", "watch.sh", "teardown.sh",
            "worker.sh"} <= names
    for path in SHELL_SCRIPTS:
        if path.name != "common.sh":
            assert os.access(path, os.X_OK), path
            assert path.read_text().startswith("#!/usr/bin/env bash\n"), path


def test_create_queued_spot_v4(no_gcloud):
    proc = run_script("create.sh", *COMMON, "--spot", env=no_gcloud)
    (create,) = commands(proc.stdout)
    assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert create[5] == "avg-jax-flickr-main-qr"
    assert flag(create, "--node-id") == "avg-jax-flickr-main"
    assert flag(create, "--accelerator-type") == "v4-32"
    assert flag(create, "--runtime-version") == "tpu-ubuntu2204-base"
    assert flag(create, "--project") == "proj-1"
    assert flag(create, "--zone") == "us-central2-b"
    assert "--spot" in create
    # It then polls the state (printed on stderr: the state query's stdout is its answer).
    assert "+ gcloud compute tpus queued-resources describe avg-jax-flickr-main-qr" in proc.stderr


def test_create_plain_vm_v5e_on_demand(no_gcloud):
    out = run_script("create.sh", *COMMON, "--provisioning", "vm", "--accelerator", "v5e-16", "--zone",
                     "us-west4-a", env=no_gcloud).stdout
    (create,) = commands(out)
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "avg-jax-flickr-main"]
    assert flag(create, "--accelerator-type") == "v5litepod-16"
    assert flag(create, "--version") == "v2-alpha-tpuv5-lite"
    assert "--spot" not in create and "--reserved" not in create


def test_settings_from_environment(no_gcloud):
    env = {**no_gcloud, "TPU_PROJECT": "env-proj", "TPU_ACCELERATOR": "v5p-8", "TPU_PRICING": "reserved",
           "TPU_NAME": "my-node"}
    (create,) = commands(run_script("create.sh", "--dry_run", env=env).stdout)
    assert create[5] == "my-node-qr" and flag(create, "--node-id") == "my-node"
    assert flag(create, "--accelerator-type") == "v5p-8"
    assert flag(create, "--runtime-version") == "v2-alpha-tpuv5"
    assert flag(create, "--zone") == "us-east5-a"
    assert flag(create, "--project") == "env-proj"
    assert "--reserved" in create


def test_setup_workers_installs_jax_tpu_and_copies_data(no_gcloud):
    out = run_script("setup_workers.sh", *COMMON, "--data_gcs", "gs://bkt/data/flickr30k", env=no_gcloud).stdout
    archive, upload, ssh = commands(out)
    assert archive[:2] == ["bash", "-c"] and "git ls-files" in archive[2]
    assert upload[:3] == ["gcloud", "storage", "cp"]
    assert upload[4].startswith("gs://bkt/runs/flickr-main/code/avg_jax-") and upload[4].endswith(".tar.gz")
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "avg-jax-flickr-main"]
    assert "--worker=all" in ssh
    words = remote_words(ssh)
    assert f"jax[tpu]=={setup_py_pin('jax')}" in words
    assert "/tmp/avg_jax/src" in words and upload[4] in words
    i = words.index("rsync")
    assert words[i - 2:i + 4] == ["gcloud", "storage", "rsync", "--recursive", "gs://bkt/data/flickr30k",
                                  "/tmp/avg_jax/data"]


def test_setup_workers_mounts_with_gcsfuse(no_gcloud):
    out = run_script("setup_workers.sh", *COMMON, "--data_gcs", "gs://bkt/data/flickr30k/", "--data_mode", "mount",
                     env=no_gcloud).stdout
    words = remote_words(commands(out)[-1])
    i = words.index("--implicit-dirs")
    assert words[i - 1:i + 5] == ["gcsfuse", "--implicit-dirs", "--only-dir", "data/flickr30k", "bkt",
                                  "/tmp/avg_jax/data"]


def test_launch_runs_avg_jax_train_on_all_workers(no_gcloud):
    out = run_script("launch.sh", *COMMON, "--gin_file", GIN_FILE, "--gin_param", GIN_PARAM, env=no_gcloud).stdout
    check, clear, ssh = commands(out)
    assert check == ["gcloud", "storage", "ls", "gs://bkt/runs/flickr-main/identifiers/identifiers.json"]
    assert clear == ["gcloud", "storage", "rm", "--recursive", "gs://bkt/runs/flickr-main/launcher"]
    assert "--worker=all" in ssh and ssh[3:5] == ["tpu-vm", "ssh"]
    words = remote_words(ssh)
    start = words.index("tpu_scripts/worker.sh")
    end = words.index(">", start)
    status_dir, log_file, *command = words[start + 1:end]
    assert status_dir == "gs://bkt/runs/flickr-main/launcher"
    assert log_file == "/tmp/avg_jax/logs/flickr-main.log"
    common = (SCRIPTS / "common.sh").read_text()
    distributed = re.search(r'DISTRIBUTED_GIN_PARAM:-"([^"]+)"', common).group(1)
    assert command[:6] == ["avg-jax", "train", "--gin_file", GIN_FILE, "--gin_param", GIN_PARAM]
    assert command[6:8] == ["--gin_param", distributed]
    local_ids = "/tmp/avg_jax/identifiers/flickr-main"
    assert command[8:] == ["--run_dir", "gs://bkt/runs/flickr-main", "--identifiers", local_ids]
    assert words[start - 3:start] == ["nohup", "setsid", "bash"] and words[end:][-1] == "&"
    # Each worker copies stage 1's table to the folder --identifiers names before the trainer starts.
    copy = words.index("rsync")
    assert words[copy - 2:copy + 4] == ["gcloud", "storage", "rsync", "--recursive",
                                        "gs://bkt/runs/flickr-main/identifiers", local_ids]
    assert copy < start and words[copy + 4:copy + 7] == ["||", "exit", "1"]


def test_launch_tokenize_is_stage_one_on_worker_zero(no_gcloud):
    """Stage 1 writes the table that stage 2's --identifiers reads; --identifiers_gcs shares another run's."""
    out = run_script("launch.sh", *COMMON, "--gin_file", GIN_FILE, "--entry", "tokenize", env=no_gcloud).stdout
    (ssh,) = commands(out)
    assert "--worker=0" in ssh
    words = remote_words(ssh)
    start = words.index("tpu_scripts/worker.sh")
    assert words[start - 1] == "bash"
    assert "nohup" not in words and words[-1] != "&"  # foreground: stage 2 starts once it is done
    local_ids = "/tmp/avg_jax/identifiers/flickr-main"
    status_dir, log_file, *rest = words[start + 1:]
    assert status_dir == "gs://bkt/runs/flickr-main/tokenize" and log_file.endswith("flickr-main.tokenize.log")
    command = rest[:rest.index("&&")]
    assert command == ["avg-jax", "tokenize", "--gin_file", GIN_FILE, "--out", local_ids]
    assert rest[rest.index("&&") + 1:] == ["gcloud", "storage", "rsync", "--recursive", local_ids,
                                           "gs://bkt/runs/flickr-main/identifiers"]
    shared = "gs://bkt/runs/other/identifiers"
    out = run_script("launch.sh", *COMMON, "--gin_file", GIN_FILE, "--identifiers_gcs", shared, env=no_gcloud).stdout
    check, _, ssh = commands(out)
    assert check[-1] == shared + "/identifiers.json" and shared in remote_words(ssh)
    proc = run_script("launch.sh", *COMMON, "--gin_file", GIN_FILE, "--identifiers_gcs", "/local", env=no_gcloud,
                      check=False)
    assert proc.returncode == 2 and "IDENTIFIERS_GCS=/local: expected a gs:// folder" in proc.stderr


def test_launch_train_refuses_without_a_stage_one_table(tmp_path):
    fake, env = fake_slice(tmp_path, "ACTIVE", launch_exit=0)
    proc = run_script("launch.sh", *COMMON[1:], "--gin_file", GIN_FILE, env=env, check=False)
    assert proc.returncode == 2
    assert "no identifier table at gs://bkt/runs/flickr-main/identifiers: run stage 1 first" in proc.stderr
    assert not any("ssh" in c for c in (fake / "calls").read_text().splitlines())


def test_launch_stop_and_logs_and_teardown(no_gcloud):
    (stop,) = commands(run_script("launch.sh", *COMMON, "--stop", env=no_gcloud).stdout)
    assert "--worker=all" in stop and "kill" in remote_words(stop)
    (logs,) = commands(run_script("logs.sh", *COMMON, "--worker", "all", env=no_gcloud).stdout)
    assert "--worker=all" in logs
    words = remote_words(logs)
    assert words[:5] == ["tail", "-n", "100", "-F", "/tmp/avg_jax/logs/flickr-main.log"]
    (delete,) = commands(run_script("teardown.sh", *COMMON, env=no_gcloud).stdout)
    assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "avg-jax-flickr-main-qr"]
    assert "--force" in delete and "--quiet" in delete
    (delete,) = commands(run_script("teardown.sh", *COMMON, "--provisioning", "vm", env=no_gcloud).stdout)
    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "avg-jax-flickr-main"]


def test_watch_recovers_a_preempted_slice(no_gcloud):
    env = {**no_gcloud, "DRY_RUN_TPU_STATE": "PREEMPTED"}
    proc = run_script("watch.sh", *COMMON, "--gin_file", GIN_FILE, "--spot", env=env)
    expected = [
        ["gcloud", "compute", "tpus", "queued-resources", "delete"],  # the preempted resource and its node
        ["gcloud", "compute", "tpus", "queued-resources", "create"],
        ["bash", "-c"],  # setup_workers.sh: code snapshot
        ["gcloud", "storage", "cp"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],  # install
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],  # stage 1: tokenize (a dry run assumes no table)
        ["gcloud", "storage", "ls", "gs://bkt/runs/flickr-main/identifiers/identifiers.json"],
        ["gcloud", "storage", "rm", "--recursive", "gs://bkt/runs/flickr-main/launcher"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],  # launch: the trainer resumes from the run dir
    ]
    got = commands(proc.stdout)
    assert [c[:len(e)] for c, e in zip(got, expected, strict=True)] == expected
    assert "--spot" in got[1] and "tokenize" in remote_words(got[5]) and "train" in remote_words(got[-1])
    assert "restart 1 of at most 20" in proc.stderr and "PREEMPTED" in proc.stderr
    assert "queued-resources describe" in proc.stderr  # the state query itself


def test_watch_on_a_usable_slice_reads_the_exit_code(no_gcloud):
    env = {**no_gcloud, "DRY_RUN_TPU_STATE": "ACTIVE"}
    proc = run_script("watch.sh", *COMMON, "--gin_file", GIN_FILE, env=env)
    assert "gcloud storage cat gs://bkt/runs/flickr-main/launcher/worker0.exit" in proc.stderr
    (probe,) = commands(proc.stdout)
    assert "--worker=0" in probe and "kill" in remote_words(probe)


@pytest.mark.parametrize(("args", "message"), [
    (["--accelerator", "v9-8"], "TPU_ACCELERATOR=v9-8"),
    (["--pricing", "cheap"], "TPU_PRICING=cheap"),
    (["--provisioning", "gke"], "TPU_PROVISIONING=gke"),
    (["--bogus", "1"], "unknown flag --bogus"),
    (["--zone"], "flag --zone needs a value"),
    (["--run_name", "Bad_Name"], "RUN_NAME=Bad_Name"),
    (["--worker_root", "relative/dir"], "WORKER_ROOT=relative/dir"),
])
def test_bad_settings_fail_with_a_clear_error(no_gcloud, args, message):
    proc = run_script("create.sh", "--dry_run", "--project", "p", *args, env=no_gcloud, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "error" in proc.stderr


def test_launch_needs_run_name_and_gin_file(no_gcloud):
    proc = run_script("launch.sh", "--dry_run", "--project", "p", "--bucket", "b", env=no_gcloud, check=False)
    assert proc.returncode == 2 and "RUN_NAME is not set" in proc.stderr
    proc = run_script("launch.sh", *COMMON, env=no_gcloud, check=False)
    assert proc.returncode == 2 and "--gin_file" in proc.stderr


def test_worker_passes_sigterm_on_and_records_the_exit_code(tmp_path):
    """worker.sh forwards SIGTERM (a preemption notice) to its command and records the command's exit code."""
    child = ("import signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *_: (print('checkpoint saved', flush=True), sys.exit(143)))\n"
             "print('training', flush=True)\n"
             "time.sleep(60)\n")
    log = tmp_path / "logs" / "run.log"
    env = {**os.environ, "AVG_JAX_WORKER_ID": "3"}
    proc = subprocess.Popen(["bash", str(SCRIPTS / "worker.sh"), str(tmp_path / "status"), str(log),
                             sys.executable, "-c", child], env=env)
    deadline = time.monotonic() + 30
    while "training" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline and proc.poll() is None, "worker did not start its command"
        time.sleep(0.05)
    assert int((tmp_path / "logs" / "run.log.pid").read_text()) == proc.pid
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    text = log.read_text()
    assert "checkpoint saved" in text and "exited with 143" in text
    assert (tmp_path / "status" / "worker3.exit").read_text().strip() == "143"
    assert not (tmp_path / "logs" / "run.log.pid").exists()


def local_env(devices_per_process: int) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # avg-jax of this interpreter
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
    return env


def test_local_two_process_launch_forms_one_cluster(tmp_path):
    """`launch.sh --local_workers 2` starts 2 CPU processes that form one jax.distributed cluster."""
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "launch.sh"), "--local_workers", "2", "--local_run_dir", str(tmp_path),
         "--entry", "launch-check", "--gin_param", "make_device_mesh.model_parallelism = 2",
         "--gin_param", "initialize_distributed.initialization_timeout = 60"],
        env=local_env(2), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = {}
    for line in proc.stdout.splitlines():
        match = re.match(r"\[worker (\d)\] launch-check (\{.*\})$", line)
        if match:
            results[int(match.group(1))] = json.loads(match.group(2))
    assert sorted(results) == [0, 1], proc.stdout
    rows = np.arange(4 * 4 * 3).reshape(-1, 3) % 1009  # 4 devices x 4 rows per device, 3 columns
    expected = rows.sum(axis=0).tolist()
    for worker, r in results.items():
        assert r["process_id"] == worker and r["num_processes"] == 2
        assert r["device_count"] == 4 and r["local_device_count"] == 2
        assert r["mesh"] == {"data": 2, "model": 2}
        assert r["sharded_sum"] == expected and r["ok"]
    # Each process held different rows (devices 0-1 vs 2-3), and only together do they give the total.
    assert results[0]["local_partial_sum"] == rows[:8].sum(axis=0).tolist()
    assert results[1]["local_partial_sum"] == rows[8:].sum(axis=0).tolist()
    for i in range(2):
        assert (tmp_path / "status" / f"worker{i}.exit").read_text().strip() == "0"


def test_local_launch_reports_a_failing_worker(tmp_path):
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "launch.sh"), "--local_workers", "2", "--local_run_dir", str(tmp_path),
         "--entry", "launch-check", "--gin_param", "make_device_mesh.model_parallelism = 3"],
        env=local_env(1), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1
    assert "model_parallelism=3 does not divide the 2 devices" in proc.stdout
    # Both fail; a worker may die with the coordinator (process 0) before it reports its own error (exit 2).
    codes = [(tmp_path / "status" / f"worker{i}.exit").read_text().strip() for i in range(2)]
    assert "2" in codes and "0" not in codes, codes


def test_local_dry_run_sets_the_cluster_environment(no_gcloud, tmp_path):
    out = run_script("launch.sh", "--dry_run", "--local_workers", "2", "--port", "4321", "--local_run_dir",
                     str(tmp_path), "--gin_file", GIN_FILE, env=no_gcloud).stdout
    lines = commands(out)
    assert len(lines) == 2
    for i, argv in enumerate(lines):
        assert argv[0] == "env" and argv[-1] == "&"
        assert {"JAX_PLATFORMS=cpu", "JAX_COORDINATOR_ADDRESS=127.0.0.1:4321", "JAX_NUM_PROCESSES=2",
                f"JAX_PROCESS_ID={i}"} <= set(argv)
        start = argv.index(str(SCRIPTS / "worker.sh"))
        assert argv[start + 1:start + 3] == [str(tmp_path / "status"), str(tmp_path / "logs" / f"worker{i}.log")]
        assert argv[start + 3:start + 7] == ["avg-jax", "train", "--gin_file", GIN_FILE]
        assert argv[-3:-1] == ["--identifiers", str(tmp_path / "identifiers")]
    assert not (tmp_path / "status").exists()  # nothing ran
    (tokenize,) = commands(run_script("launch.sh", "--dry_run", "--local_workers", "2", "--local_run_dir",
                                      str(tmp_path), "--gin_file", GIN_FILE, "--entry", "tokenize",
                                      env=no_gcloud).stdout)  # one process writes the table
    assert tokenize[-7:] == ["avg-jax", "tokenize", "--gin_file", GIN_FILE, "--out", str(tmp_path / "identifiers"),
                             "&"]


def test_distributed_binding_names_the_launch_configurable():
    """The binding launch.sh adds for `train` resolves to avg_jax.distributed.initialize_distributed(enabled=True)."""
    import gin

    from avg_jax import distributed

    common = (SCRIPTS / "common.sh").read_text()
    binding = re.search(r'DISTRIBUTED_GIN_PARAM:-"([^"]+)"', common).group(1)
    gin.clear_config()
    try:
        gin.parse_config(binding)
        assert gin.query_parameter("avg_jax.distributed.initialize_distributed.enabled") is True
        assert distributed.initialize_distributed.__module__ == "avg_jax.distributed"
    finally:
        gin.clear_config()


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# A stand-in for gcloud: a slice whose state lives in $FAKE/state, a bucket in $FAKE/bucket; logs each call.
echo "$*" >> "$FAKE/calls"
case "$*" in
  *"queued-resources describe"*) [ -f "$FAKE/state" ] || exit 1; cat "$FAKE/state" ;;
  *"queued-resources create"*) echo ACTIVE > "$FAKE/state" ;;
  *"queued-resources delete"*) rm -f "$FAKE/state" ;;
  *"storage cat"*) cat "$FAKE/bucket/exit" 2> /dev/null || exit 1 ;;
  *"storage rm"*) rm -f "$FAKE/bucket/exit" ;;
  *"storage ls"*) [ -f "$FAKE/bucket/identifiers.json" ] || exit 1 ;;
  *"tpu-vm ssh"*"avg-jax tokenize"*) touch "$FAKE/bucket/identifiers.json" ;;  # stage 1
  *"tpu-vm ssh"*"worker.sh"*) cp "$FAKE/launch_exit" "$FAKE/bucket/exit" ;;  # launch: the run ends at once
  *"tpu-vm ssh"*"kill -0"*) exit 1 ;;                          # probe: avg-jax is not running
esac
exit 0
"""


def fake_slice(tmp_path: Path, state: str, launch_exit: int) -> tuple[Path, dict]:
    fake = tmp_path / "fake"
    (fake / "bucket").mkdir(parents=True)
    (fake / "state").write_text(state + "\n")
    (fake / "launch_exit").write_text(f"{launch_exit}\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "GCS_", "RUN_", "GIN_", "DATA_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE=str(fake), TMPDIR=str(tmp_path))
    return fake, env


def test_watch_loop_against_a_fake_gcloud(tmp_path):
    """The real (not dry-run) loop: a preempted slice is re-created, set up and relaunched; the finished run
    is torn down."""
    fake, env = fake_slice(tmp_path, "SUSPENDED", launch_exit=0)
    proc = run_script("watch.sh", *COMMON[1:], "--gin_file", GIN_FILE, "--poll_seconds", "0", env=env)
    calls = (fake / "calls").read_text().splitlines()
    expected = [
        "compute tpus queued-resources describe",  # SUSPENDED
        "compute tpus queued-resources delete",
        "compute tpus queued-resources create",
        "compute tpus queued-resources describe",  # ACTIVE
        "storage cp " + str(tmp_path),  # the code snapshot
        "compute tpus tpu-vm ssh",  # install
        "storage ls gs://bkt/runs/flickr-main/identifiers/identifiers.json",  # watch.sh: no table yet
        "compute tpus tpu-vm ssh",  # stage 1: tokenize on worker 0
        "storage ls gs://bkt/runs/flickr-main/identifiers/identifiers.json",  # launch.sh: the table is there
        "storage rm --recursive gs://bkt/runs/flickr-main/launcher",
        "compute tpus tpu-vm ssh",  # stage 2: train on all workers
        "compute tpus queued-resources describe",  # ACTIVE
        "storage cat gs://bkt/runs/flickr-main/launcher/worker0.exit",  # 0
        "compute tpus queued-resources describe",  # still ACTIVE one poll later: finished
        "compute tpus queued-resources delete",
    ]
    assert len(calls) == len(expected), calls
    for call, start in zip(calls, expected, strict=True):
        assert call.startswith(start), (call, start)
    assert "--worker=0" in calls[7] and "avg-jax tokenize" in calls[7] and "avg-jax train" in calls[10]
    assert "restart 1 of at most 20: slice avg-jax-flickr-main is SUSPENDED" in proc.stderr
    assert "run flickr-main finished (exit 0)" in proc.stderr
    assert not (fake / "state").exists()


def test_watch_stops_on_a_failing_run_and_keeps_the_slice(tmp_path):
    fake, env = fake_slice(tmp_path, "ACTIVE", launch_exit=1)
    proc = run_script("watch.sh", *COMMON[1:], "--gin_file", GIN_FILE, "--poll_seconds", "0", env=env,
                      check=False)
    assert proc.returncode == 2
    assert "avg-jax exited with 1 on a usable slice (not a preemption)" in proc.stderr
    assert (fake / "state").read_text().strip() == "ACTIVE"
    assert not any("delete" in call for call in (fake / "calls").read_text().splitlines())


def test_watch_relaunches_after_sigterm_up_to_max_restarts(tmp_path):
    fake, env = fake_slice(tmp_path, "ACTIVE", launch_exit=143)
    proc = run_script("watch.sh", *COMMON[1:], "--gin_file", GIN_FILE, "--poll_seconds", "0",
                      "--max_restarts", "2", env=env, check=False)
    assert proc.returncode == 2 and "gave up after 2 restarts" in proc.stderr
    launches = [c for c in (fake / "calls").read_text().splitlines() if "worker.sh" in c]
    assert len(launches) == 4 and "avg-jax tokenize" in launches[0]  # stage 1, the launch, two relaunches
