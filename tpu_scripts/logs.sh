#!/usr/bin/env bash
# Stream a run's log from worker 0 (process 0 is the one that logs metrics), or from every worker with
# --worker all (each line prefixed with the host name). --no_follow prints the last lines and returns.
#
#   logs.sh --run_name NAME [--worker 0|N|all] [--lines 100] [--no_follow]
# Common settings: see common.sh. --dry_run prints every command instead of running it.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,6s/^# \{0,1\}//p' "$0"; }

parse_flags "$@"
require RUN_NAME
resolve_project
[[ $LOG_WORKER == all || $LOG_WORKER =~ ^[0-9]+$ ]] || die "--worker $LOG_WORKER: expected all or a number"
[[ $LOG_LINES =~ ^[0-9]+$ ]] || die "--lines $LOG_LINES: expected a number"

tail_flags=()
[[ $FOLLOW != 1 ]] || tail_flags=(-F)
remote="tail -n $LOG_LINES ${tail_flags[*]} $(quote_words "$WORKER_ROOT/logs/$RUN_NAME.log")"
if [[ $LOG_WORKER == all ]]; then
  remote+=" | sed -u \"s/^/[\$(hostname)] /\""
fi
on_workers "$LOG_WORKER" "$remote"
