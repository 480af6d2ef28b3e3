#!/usr/bin/env bash
# Keep a run going until it finishes, through preemptions: the whole lifecycle in one command.
# Every POLL_SECONDS it looks at the slice and at worker 0's exit code in gs://BUCKET/runs/RUN_NAME/launcher/:
#   slice missing, preempted, suspended or failed   -> delete it, create.sh, setup_workers.sh, launch.sh
#   slice usable, no exit code, avg-jax not running -> launch.sh (first start, or a lost process)
#   avg-jax exited 143/137 (SIGTERM/SIGKILL)        -> launch.sh again (maintenance / preemption notice)
#   avg-jax exited 0 and the slice is still usable one poll later -> finished: teardown.sh (unless --keep_tpu)
#   avg-jax exited with any other code              -> a bug, not a preemption: stop, exit 1, slice kept
# The trainer resumes from the latest orbax checkpoint in the run directory, so a relaunch continues the run.
# Every launch.sh (stage 2, train) is preceded by stage 1 (launch.sh --entry tokenize) while the identifier
# table is missing from IDENTIFIERS_GCS.
# At most MAX_RESTARTS recoveries (--max_restarts). All flags are passed on to the scripts it calls.
#
#   watch.sh --run_name NAME --bucket gs://B --gin_file F [--gin_param P]... [--spot] [--keep_tpu]
# Common settings: see common.sh. --dry_run prints the commands of one recovery cycle and returns.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,15s/^# \{0,1\}//p' "$0"; }

parse_flags "$@"
require RUN_NAME GCS_BUCKET
resolve_project
dir=$(run_dir)
restarts=0
first_look=1

sub() { # sub SCRIPT ARGS...: run a sibling script
  local script=$1
  shift
  bash "$SCRIPTS_DIR/$script" "$@"
}

worker0_exit_code() {
  if [[ $DRY_RUN == 1 ]]; then
    echo "+ gcloud storage cat $dir/launcher/worker0.exit" >&2
    return
  fi
  gcloud storage cat "$dir/launcher/worker0.exit" 2> /dev/null | tr -d '[:space:]' || true
}

# Stage 1 unless its identifier table is on GCS already, then stage 2 (the training run).
launch_run() {
  local ids
  ids=$(identifiers_gcs)
  if [[ $DRY_RUN == 1 ]]; then
    echo "+ gcloud storage ls $ids/identifiers.json  (a dry run assumes it missing)" >&2
  elif gcloud storage ls "$ids/identifiers.json" > /dev/null 2>&1; then
    sub launch.sh "$@"
    return
  fi
  log "no identifier table at $ids: stage 1 (avg-jax tokenize) first"
  sub launch.sh "$@" --entry tokenize && sub launch.sh "$@"
}

is_running() {
  local pid_file
  pid_file=$(quote_words "$WORKER_ROOT/logs/$RUN_NAME.log.pid")
  on_workers 0 "test -f $pid_file && kill -0 \"\$(cat $pid_file)\"" 2> /dev/null
}

count_restart() {
  restarts=$((restarts + 1))
  ((restarts <= MAX_RESTARTS)) || die "gave up after $MAX_RESTARTS restarts (--max_restarts); slice kept"
  log "restart $restarts of at most $MAX_RESTARTS: $*"
}

slice_usable() {
  [[ $1 == READY || $1 == ACTIVE ]]
}

while :; do
  state=$(tpu_state)
  case $state in
    NOT_FOUND | PREEMPTED | TERMINATED | STOPPED | SUSPENDING | SUSPENDED | FAILED)
      if [[ $first_look == 1 && $state == NOT_FOUND ]]; then
        log "slice $TPU_NAME does not exist yet: creating it"
      else
        count_restart "slice $TPU_NAME is $state: re-creating it"
      fi
      if [[ $state != NOT_FOUND ]]; then
        sub teardown.sh "$@" || log "teardown of $TPU_NAME failed; creating anyway"
      fi
      # A step that fails (no capacity, a flaky ssh) is retried on the next look, as one more restart.
      if ! { sub create.sh "$@" && sub setup_workers.sh "$@" && launch_run "$@"; }; then
        log "recovery did not complete; will look again in ${POLL_SECONDS}s"
      fi
      ;;
    READY | ACTIVE)
      code=$(worker0_exit_code)
      case $code in
        "")
          if ! is_running; then
            log "run $RUN_NAME is not running on $TPU_NAME: launching it"
            launch_run "$@" || count_restart "launch failed; will look again in ${POLL_SECONDS}s"
          fi
          ;;
        0)
          sleep "$POLL_SECONDS"
          if slice_usable "$(tpu_state)"; then
            log "run $RUN_NAME finished (exit 0); checkpoints and logs in $dir"
            [[ $KEEP_TPU == 1 ]] || sub teardown.sh "$@"
            exit 0
          fi
          ;;
        137 | 143)
          count_restart "avg-jax was killed (exit $code) on a usable slice: relaunching"
          launch_run "$@" || log "launch failed; will look again in ${POLL_SECONDS}s"
          ;;
        *)
          die "avg-jax exited with $code on a usable slice (not a preemption); see tpu_scripts/logs.sh --run_name $RUN_NAME --worker all --no_follow"
          ;;
      esac
      ;;
    *) log "slice $TPU_NAME is $state; waiting" ;;
  esac
  first_look=0
  [[ $DRY_RUN != 1 ]] || exit 0
  sleep "$POLL_SECONDS"
done
