#!/usr/bin/env bash
# Runs ON one worker (a TPU VM host, or one localhost process of `launch.sh --local_workers N`):
# COMMAND (`avg-jax train ...`) with its output appended to LOG_FILE, this script's pid in LOG_FILE.pid (for
# launch.sh --stop), and its exit code written to STATUS_DIR/worker<ID>.exit (a local folder or gs://),
# which watch.sh reads. A SIGTERM (TPU maintenance / preemption notice, launch.sh --stop) is passed on to
# COMMAND (the trainer saves a final checkpoint); the exit code is recorded either way.
#
# Usage: worker.sh STATUS_DIR LOG_FILE COMMAND [ARGS...]
# Environment: AVG_JAX_VENV (virtualenv to activate, optional), AVG_JAX_WORKER_ID (default: the TPU
# metadata's agent-worker-number, else the host name).
set -uo pipefail

(($# >= 3)) || {
  echo "usage: worker.sh STATUS_DIR LOG_FILE COMMAND [ARGS...]" >&2
  exit 2
}
status_dir=$1
log_file=$2
shift 2

worker_id=${AVG_JAX_WORKER_ID:-}
if [[ -z $worker_id ]]; then
  worker_id=$(curl -sf -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \
    || hostname)
fi
if [[ -n ${AVG_JAX_VENV:-} ]]; then
  # shellcheck disable=SC1091  # the virtualenv exists only on the worker
  source "$AVG_JAX_VENV/bin/activate"
fi
command -v "$1" > /dev/null || {
  echo "worker.sh: $1 is not on PATH (set AVG_JAX_VENV or install the project)" >&2
  exit 2
}

mkdir -p "$(dirname "$log_file")"
echo "$$" > "$log_file.pid"
echo "[worker.sh] worker $worker_id on $(hostname) at $(date -u +%FT%TZ):$(printf ' %q' "$@")" >> "$log_file"

"$@" >> "$log_file" 2>&1 &
child=$!
trap 'kill -TERM "$child" 2> /dev/null' TERM INT
rc=0
wait "$child" || rc=$?
if kill -0 "$child" 2> /dev/null; then # wait was interrupted by the trap: wait for COMMAND to finish
  rc=0
  wait "$child" || rc=$?
fi
echo "[worker.sh] worker $worker_id: $1 exited with $rc at $(date -u +%FT%TZ)" >> "$log_file"

status_file=$status_dir/worker$worker_id.exit
if [[ $status_dir == gs://* ]]; then
  printf '%s\n' "$rc" | gcloud storage cp - "$status_file" > /dev/null 2>&1 \
    || echo "[worker.sh] could not write $status_file" >> "$log_file"
else
  mkdir -p "$status_dir" && printf '%s\n' "$rc" > "$status_file"
fi
rm -f "$log_file.pid"
exit "$rc"
