#!/usr/bin/env bash
# Start `avg-jax ENTRY --gin_file ... --gin_param ...` on every worker of the slice at once, detached, with
# jax.distributed initialised (on a TPU slice JAX finds the coordinator itself). Two stages:
#   --entry tokenize  stage 1, on worker 0 only and in the foreground: `avg-jax tokenize --out` a worker-local
#                     folder, then copied to IDENTIFIERS_GCS (default gs://BUCKET/runs/RUN_NAME/identifiers)
#   --entry train     stage 2 (default), every worker: copies that table to WORKER_ROOT/identifiers/RUN_NAME
#                     and runs `avg-jax train` with the multi-host gin switch, `--identifiers` that copy, and
#                     the run directory gs://BUCKET/runs/RUN_NAME (checkpoints; the trainer resumes from the
#                     latest one there, so launching again after a preemption continues the run)
#
#   launch.sh --run_name NAME --bucket gs://B --gin_file F [--gin_param P]... [--entry train|tokenize|...]
#   launch.sh --run_name NAME --stop           # SIGTERM the run on every worker (final checkpoint, then exit)
#   launch.sh --local_workers N [--port P] [--local_run_dir DIR] --entry launch-check ...
#       the same entry point as N CPU processes on this machine forming one jax.distributed cluster
#       (coordinator 127.0.0.1:P, gloo collectives); waits for all, prints their logs, fails if any fails.
#       Identifiers: DIR/identifiers (`--entry tokenize` runs one process, writing it).
# Common settings: see common.sh. --dry_run prints every command instead of running it.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,19s/^# \{0,1\}//p' "$0"; }

parse_flags "$@"

# Free TCP port on localhost for the local coordinator.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

launch_local() {
  local n=$LOCAL_WORKERS port=${LOCAL_PORT:-} dir=${LOCAL_RUN_DIR:-} i rc=0
  [[ -n $port ]] || port=$(free_port)
  [[ -n $dir ]] || dir=$(mktemp -d "${TMPDIR:-/tmp}/avg_jax_local.XXXXXX")
  [[ $ENTRY != tokenize ]] || n=1 # the tokenizer is single-process; one writer of the table
  local args
  mapfile -t args < <(entry_args "$dir/run" "$dir/identifiers")
  local pids=()
  for ((i = 0; i < n; i++)); do
    local envs=(JAX_PLATFORMS=cpu JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$n"
      JAX_PROCESS_ID="$i" AVG_JAX_WORKER_ID="$i")
    echo "+ $(quote_words env "${envs[@]}" bash "$SCRIPTS_DIR/worker.sh" "$dir/status" \
      "$dir/logs/worker$i.log" "${args[@]}") &"
    if [[ $DRY_RUN != 1 ]]; then
      env "${envs[@]}" bash "$SCRIPTS_DIR/worker.sh" "$dir/status" "$dir/logs/worker$i.log" "${args[@]}" &
      pids+=("$!")
    fi
  done
  [[ $DRY_RUN != 1 ]] || return 0
  # The first worker to fail takes the others down (they would wait for it until the JAX timeout).
  for i in "${!pids[@]}"; do
    if ! wait -n; then
      rc=1
      kill -TERM "${pids[@]}" 2> /dev/null || true
    fi
  done
  for ((i = 0; i < n; i++)); do
    sed "s/^/[worker $i] /" "$dir/logs/worker$i.log"
  done
  log "$n local workers finished in $dir (exit codes in $dir/status)"
  return "$rc"
}

# Stage 1: the identifier table, built on worker 0 (the tokenizer is single-host) and copied to GCS.
tokenize_tpu() {
  local dir=$1 ids_gcs=$2 ids=$3 args remote
  mapfile -t args < <(entry_args "$dir" "$ids")
  remote="cd $(quote_words "$WORKER_ROOT/src") || exit 1"
  remote+="; AVG_JAX_VENV=$(quote_words "$WORKER_ROOT/venv") bash tpu_scripts/worker.sh"
  remote+=" $(quote_words "$dir/tokenize" "$WORKER_ROOT/logs/$RUN_NAME.tokenize.log" "${args[@]}")"
  remote+=" && gcloud storage rsync --recursive $(quote_words "$ids" "$ids_gcs")"
  on_workers 0 "$remote"
  log "identifier table in $ids_gcs; next: tpu_scripts/launch.sh (stage 2, avg-jax train)"
}

launch_tpu() {
  resolve_project
  local dir args log_file pid_file remote ids_gcs ids
  dir=$(run_dir)
  ids_gcs=$(identifiers_gcs)
  ids=$(worker_identifiers)
  log_file=$WORKER_ROOT/logs/$RUN_NAME.log
  pid_file=$(quote_words "$log_file.pid")
  if [[ $STOP == 1 ]]; then
    remote="if [ -f $pid_file ]; then kill -TERM \"\$(cat $pid_file)\"; fi"
    on_workers all "$remote"
    return
  fi
  if [[ $ENTRY == train || $ENTRY == tokenize ]]; then
    ((${#GIN_FILE_LIST[@]})) || die "$ENTRY needs at least one --gin_file (or GIN_FILES)"
  fi
  if [[ $ENTRY == tokenize ]]; then
    tokenize_tpu "$dir" "$ids_gcs" "$ids"
    return
  fi
  mapfile -t args < <(entry_args "$dir" "$ids")
  remote="cd $(quote_words "$WORKER_ROOT/src") || exit 1"
  remote+="; if [ -f $pid_file ] && kill -0 \"\$(cat $pid_file)\" 2> /dev/null; then"
  remote+=" echo \"run $RUN_NAME is already running on \$(hostname)\" >&2; exit 1; fi"
  if [[ $ENTRY == train ]]; then
    run gcloud storage ls "$ids_gcs/identifiers.json" \
      || die "no identifier table at $ids_gcs: run stage 1 first (launch.sh --entry tokenize)"
    remote+="; mkdir -p $(quote_words "$ids") && gcloud storage rsync --recursive $(quote_words "$ids_gcs" "$ids")"
    remote+=" || exit 1"
  fi
  # Forget the exit codes of an earlier attempt so that watch.sh only sees this one.
  run gcloud storage rm --recursive "$dir/launcher" || true
  remote+="; AVG_JAX_VENV=$(quote_words "$WORKER_ROOT/venv") nohup setsid bash tpu_scripts/worker.sh"
  remote+=" $(quote_words "$dir/launcher" "$log_file" "${args[@]}") > /dev/null 2>&1 < /dev/null &"
  on_workers all "$remote"
  log "launched; follow with: tpu_scripts/logs.sh --run_name $RUN_NAME; keep alive with tpu_scripts/watch.sh"
}

if ((LOCAL_WORKERS > 0)); then
  launch_local
else
  require RUN_NAME GCS_BUCKET
  launch_tpu
fi
