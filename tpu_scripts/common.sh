# shellcheck shell=bash
# Shared settings and helpers for the Cloud TPU scripts; sourced by every script in tpu_scripts/.
#
# Every setting is an environment variable that a flag of the same meaning overrides (flags win):
#   TPU_PROJECT          --project           GCP project (default: `gcloud config get-value project`)
#   TPU_ZONE             --zone              zone (default by family: v4 us-central2-b, v5e us-west4-a, v5p us-east5-a)
#   TPU_ACCELERATOR      --accelerator       v4-8, v4-32, v5e-16 (= v5litepod-16), v5p-8, ... (default v4-32)
#   TPU_RUNTIME_VERSION  --runtime_version   TPU VM image (default by family, see default_runtime_version)
#   TPU_PRICING          --pricing           on-demand | spot | reserved (default on-demand); --spot = spot
#   TPU_PROVISIONING     --provisioning      queued (queued resource, default) | vm (plain TPU VM)
#   TPU_NAME             --tpu_name          TPU VM node name (default avg-jax-RUN_NAME)
#   GCS_BUCKET           --bucket            gs://bucket holding code snapshots, checkpoints, status
#   RUN_NAME             --run_name          run directory gs://BUCKET/runs/RUN_NAME (checkpoints, logs)
#   IDENTIFIERS_GCS      --identifiers_gcs   gs:// folder of the identifier table: stage 1 (`--entry tokenize`)
#                                            writes it, stage 2 (`train`) reads it (default RUN_DIR/identifiers;
#                                            point several runs at one table to share it, as the sweeps do)
#   DATA_GCS             --data_gcs          gs:// folder with the prepared corpus / features (optional)
#   DATA_MODE            --data_mode         copy (gcloud storage rsync, default) | mount (gcsfuse)
#   WORKER_ROOT          --worker_root       folder on each worker: src/, venv/, data/, logs/ (default /tmp/avg_jax)
#   GIN_FILES            --gin_file F        gin files, whitespace-separated in the variable; the flag repeats
#   GIN_PARAMS           --gin_param P       gin bindings, one per LINE in the variable; the flag repeats
#   DRY_RUN=1            --dry_run           print every command instead of running it
# Script-specific flags are parsed here too (one parser for all scripts) and documented in each script.

set -euo pipefail

SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPTS_DIR/.." && pwd)

# --- How our entry points are told to run multi-host and where to write. THE ONE PLACE to change these. ---
# gin binding that makes the trainer's first call, avg_jax.distributed.initialize_distributed(), join the cluster.
DISTRIBUTED_GIN_PARAM=${DISTRIBUTED_GIN_PARAM:-"initialize_distributed.enabled = True"}
# `avg-jax train` flag naming its run directory (train_loop takes run_dir from the CLI, not from gin); the
# trainer writes orbax checkpoints there and resumes from the latest one on start.
RUN_DIR_FLAG=${RUN_DIR_FLAG:---run_dir}

TPU_PROJECT=${TPU_PROJECT:-}
TPU_ZONE=${TPU_ZONE:-}
TPU_ACCELERATOR=${TPU_ACCELERATOR:-v4-32}
TPU_RUNTIME_VERSION=${TPU_RUNTIME_VERSION:-}
TPU_PRICING=${TPU_PRICING:-on-demand}
TPU_PROVISIONING=${TPU_PROVISIONING:-queued}
TPU_NAME=${TPU_NAME:-}
GCS_BUCKET=${GCS_BUCKET:-}
RUN_NAME=${RUN_NAME:-}
IDENTIFIERS_GCS=${IDENTIFIERS_GCS:-}
DATA_GCS=${DATA_GCS:-}
DATA_MODE=${DATA_MODE:-copy}
WORKER_ROOT=${WORKER_ROOT:-/tmp/avg_jax}
DRY_RUN=${DRY_RUN:-0}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}   # TPU VM images ship Python 3.10; uv installs this one beside it
POLL_SECONDS=${POLL_SECONDS:-60}
MAX_RESTARTS=${MAX_RESTARTS:-20}
ENTRY=${ENTRY:-train}
LOCAL_WORKERS=${LOCAL_WORKERS:-0}
LOCAL_PORT=${LOCAL_PORT:-}
LOCAL_RUN_DIR=${LOCAL_RUN_DIR:-}
LOG_WORKER=${LOG_WORKER:-0}
LOG_LINES=${LOG_LINES:-100}
STOP=${STOP:-0}
FOLLOW=${FOLLOW:-1}
KEEP_TPU=${KEEP_TPU:-0}

read -ra GIN_FILE_LIST <<< "${GIN_FILES:-}"
GIN_PARAM_LIST=()
if [[ -n ${GIN_PARAMS:-} ]]; then
  mapfile -t GIN_PARAM_LIST <<< "$GIN_PARAMS"
fi

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

log() {
  echo "[$(basename "$0")] $*" >&2
}

# parse_flags "$@": the flags of every script (see the header); anything else is an error naming it.
parse_flags() {
  while (($#)); do
    local flag=$1
    case $flag in
      --dry_run) DRY_RUN=1; shift; continue ;;
      --spot) TPU_PRICING=spot; shift; continue ;;
      --stop) STOP=1; shift; continue ;;
      --no_follow) FOLLOW=0; shift; continue ;;
      --keep_tpu) KEEP_TPU=1; shift; continue ;;
      -h | --help) usage; exit 0 ;;
    esac
    if [[ $flag == --*=* ]]; then
      set -- "${flag%%=*}" "${flag#*=}" "${@:2}"
      flag=$1
    fi
    (($# >= 2)) || die "flag $flag needs a value"
    case $flag in
      --project) TPU_PROJECT=$2 ;;
      --zone) TPU_ZONE=$2 ;;
      --accelerator) TPU_ACCELERATOR=$2 ;;
      --runtime_version) TPU_RUNTIME_VERSION=$2 ;;
      --pricing) TPU_PRICING=$2 ;;
      --provisioning) TPU_PROVISIONING=$2 ;;
      --tpu_name) TPU_NAME=$2 ;;
      --bucket) GCS_BUCKET=$2 ;;
      --run_name) RUN_NAME=$2 ;;
      --identifiers_gcs) IDENTIFIERS_GCS=$2 ;;
      --data_gcs) DATA_GCS=$2 ;;
      --data_mode) DATA_MODE=$2 ;;
      --worker_root) WORKER_ROOT=$2 ;;
      --gin_file) GIN_FILE_LIST+=("$2") ;;
      --gin_param) GIN_PARAM_LIST+=("$2") ;;
      --entry) ENTRY=$2 ;;
      --local_workers) LOCAL_WORKERS=$2 ;;
      --port) LOCAL_PORT=$2 ;;
      --local_run_dir) LOCAL_RUN_DIR=$2 ;;
      --worker) LOG_WORKER=$2 ;;
      --lines) LOG_LINES=$2 ;;
      --poll_seconds) POLL_SECONDS=$2 ;;
      --max_restarts) MAX_RESTARTS=$2 ;;
      *) die "unknown flag $flag (see $(basename "$0") --help)" ;;
    esac
    shift 2
  done
  finalize_settings
}

# Canonical accelerator name, family defaults, and validation of every enumerated setting.
finalize_settings() {
  case $TPU_ACCELERATOR in
    v5e-*) TPU_ACCELERATOR=v5litepod-${TPU_ACCELERATOR#v5e-} ;;
  esac
  [[ $TPU_ACCELERATOR =~ ^(v4|v5litepod|v5p|v6e)-[0-9]+$ ]] \
    || die "TPU_ACCELERATOR=$TPU_ACCELERATOR: expected e.g. v4-32, v5e-16 (v5litepod-16), v5p-8, v6e-8"
  TPU_FAMILY=${TPU_ACCELERATOR%-*}
  if [[ -z $TPU_ZONE ]]; then
    case $TPU_FAMILY in
      v4) TPU_ZONE=us-central2-b ;;
      v5litepod) TPU_ZONE=us-west4-a ;;
      v5p) TPU_ZONE=us-east5-a ;;
      v6e) TPU_ZONE=us-east5-b ;;
    esac
  fi
  [[ -n $TPU_RUNTIME_VERSION ]] || TPU_RUNTIME_VERSION=$(default_runtime_version "$TPU_FAMILY")
  case $TPU_PRICING in
    on-demand | spot | reserved) ;;
    *) die "TPU_PRICING=$TPU_PRICING: expected on-demand, spot or reserved" ;;
  esac
  case $TPU_PROVISIONING in
    queued | vm) ;;
    *) die "TPU_PROVISIONING=$TPU_PROVISIONING: expected queued or vm" ;;
  esac
  case $DATA_MODE in
    copy | mount) ;;
    *) die "DATA_MODE=$DATA_MODE: expected copy or mount" ;;
  esac
  [[ $LOCAL_WORKERS =~ ^[0-9]+$ ]] || die "--local_workers $LOCAL_WORKERS: expected a non-negative integer"
  [[ $WORKER_ROOT == /* ]] || die "WORKER_ROOT=$WORKER_ROOT: must be an absolute path"
  if [[ -n $GCS_BUCKET && $GCS_BUCKET != gs://* ]]; then
    GCS_BUCKET=gs://$GCS_BUCKET
  fi
  GCS_BUCKET=${GCS_BUCKET%/}
  if [[ -n $RUN_NAME ]]; then
    [[ $RUN_NAME =~ ^[a-z0-9][a-z0-9-]*$ ]] || die "RUN_NAME=$RUN_NAME: use lowercase letters, digits and '-'"
  fi
  [[ -n $TPU_NAME ]] || TPU_NAME=avg-jax${RUN_NAME:+-$RUN_NAME}
  QUEUED_RESOURCE=${TPU_NAME}-qr
}

# TPU VM software versions documented for JAX on each generation.
default_runtime_version() {
  case $1 in
    v4) echo tpu-ubuntu2204-base ;;
    v5litepod) echo v2-alpha-tpuv5-lite ;;
    v5p) echo v2-alpha-tpuv5 ;;
    v6e) echo v2-alpha-tpuv6e ;;
    *) die "no default runtime version for TPU family $1; set TPU_RUNTIME_VERSION" ;;
  esac
}

require() {
  local name
  for name in "$@"; do
    [[ -n ${!name} ]] || die "$name is not set (environment variable or the matching flag, see --help)"
  done
}

# The project from gcloud's own configuration when TPU_PROJECT is unset.
resolve_project() {
  if [[ -z $TPU_PROJECT ]]; then
    TPU_PROJECT=$(gcloud config get-value project 2> /dev/null || true)
  fi
  [[ -n $TPU_PROJECT ]] || die "TPU_PROJECT is not set and gcloud has no default project (--project)"
}

run_dir() {
  require GCS_BUCKET RUN_NAME
  echo "$GCS_BUCKET/runs/$RUN_NAME"
}

# The identifier table on GCS (stage 1's output, stage 2's input) and its copy on each worker.
identifiers_gcs() {
  if [[ -n $IDENTIFIERS_GCS ]]; then
    [[ $IDENTIFIERS_GCS == gs://* ]] || die "IDENTIFIERS_GCS=$IDENTIFIERS_GCS: expected a gs:// folder"
    echo "${IDENTIFIERS_GCS%/}"
  else
    echo "$(run_dir)/identifiers"
  fi
}

worker_identifiers() {
  echo "$WORKER_ROOT/identifiers/$RUN_NAME"
}

# The exact pin of a package in setup.py, e.g. `setup_py_pin jax` -> 0.10.2 (one source of versions).
setup_py_pin() {
  local version
  version=$(sed -n "s/.*\"$1==\([^\"]*\)\".*/\1/p" "$REPO_ROOT/setup.py" | head -n 1)
  [[ -n $version ]] || die "no \"$1==...\" pin in $REPO_ROOT/setup.py"
  echo "$version"
}

# One shell word per argument (single-quoted where needed), safe to paste into a shell or to send as a
# remote command line.
quote_words() {
  local out="" word q="'"
  for word in "$@"; do
    if [[ ! $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      word="'${word//$q/$q\\$q$q}'"
    fi
    out+="${out:+ }$word"
  done
  echo "$out"
}

# run CMD ARGS...: print it (always) and run it (unless --dry_run).
run() {
  echo "+ $(quote_words "$@")"
  if [[ $DRY_RUN != 1 ]]; then
    "$@"
  fi
}

gcloud_tpu() {
  run gcloud compute tpus "$@" --project="$TPU_PROJECT" --zone="$TPU_ZONE"
}

# on_workers WORKER REMOTE_COMMAND: run a bash command line on one worker (0, 1, ...) or on all of them.
on_workers() {
  gcloud_tpu tpu-vm ssh "$TPU_NAME" --worker="$1" --command="$2"
}

# State of the slice: READY / CREATING / PREEMPTED / ... for a TPU VM, ACTIVE / WAITING_FOR_RESOURCES /
# SUSPENDED / FAILED / ... for a queued resource, NOT_FOUND when it does not exist. A dry run prints the
# query (on stderr, stdout is the answer) and answers DRY_RUN_TPU_STATE (default PREEMPTED).
tpu_state() {
  local state
  if [[ $DRY_RUN == 1 ]]; then
    if [[ $TPU_PROVISIONING == queued ]]; then
      echo "+ gcloud compute tpus queued-resources describe $QUEUED_RESOURCE --format='value(state.state)'" >&2
    else
      echo "+ gcloud compute tpus tpu-vm describe $TPU_NAME --format='value(state)'" >&2
    fi
    echo "${DRY_RUN_TPU_STATE:-PREEMPTED}"
    return
  fi
  if [[ $TPU_PROVISIONING == queued ]]; then
    state=$(gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" --project="$TPU_PROJECT" \
      --zone="$TPU_ZONE" --format='value(state.state)' 2> /dev/null) || state=NOT_FOUND
  else
    state=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" --project="$TPU_PROJECT" --zone="$TPU_ZONE" \
      --format='value(state)' 2> /dev/null) || state=NOT_FOUND
  fi
  echo "${state:-NOT_FOUND}"
}

# The command every worker runs: `avg-jax ENTRY`, the gin files and bindings, for `tokenize` (stage 1) the
# identifier table's output directory, and for `train` (stage 2) the multi-host switch, the run directory and
# that table. Prints one argument per line (read with mapfile).
entry_args() {
  local run_dir=$1 identifiers=$2 f p
  printf '%s\n' avg-jax "$ENTRY"
  for f in "${GIN_FILE_LIST[@]}"; do
    printf '%s\n' --gin_file "$f"
  done
  for p in "${GIN_PARAM_LIST[@]}"; do
    [[ -n $p ]] && printf '%s\n' --gin_param "$p"
  done
  case $ENTRY in
    tokenize) printf '%s\n' --out "$identifiers" ;;
    train)
      printf '%s\n' --gin_param "$DISTRIBUTED_GIN_PARAM" "$RUN_DIR_FLAG" "$run_dir" --identifiers "$identifiers"
      ;;
  esac
}
