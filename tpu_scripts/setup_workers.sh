#!/usr/bin/env bash
# Install the project on every worker of the slice: snapshot this checkout (tracked and untracked,
# non-ignored files) to gs://BUCKET/runs/RUN_NAME/code/, unpack it to WORKER_ROOT/src on each worker,
# create WORKER_ROOT/venv with Python PYTHON_VERSION (via uv: TPU VM images ship 3.10) and install the
# project with `jax[tpu]` at setup.py's jax pin. With DATA_GCS, copy the prepared corpus / features to
# WORKER_ROOT/data on each worker (DATA_MODE=copy, gcloud storage rsync) or mount it there (mount, gcsfuse).
#
#   setup_workers.sh --run_name NAME --bucket gs://B [--data_gcs gs://B/data/flickr30k] [--data_mode copy|mount]
# Environment: PIP_PACKAGES (extra pinned requirements; default safetensors at setup.py's pin, for
# HuggingFace T5 checkpoint import). Common settings: see common.sh. --dry_run prints every command.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,9s/^# \{0,1\}//p' "$0"; }

parse_flags "$@"
require RUN_NAME GCS_BUCKET
resolve_project
if [[ -n $DATA_GCS && $DATA_GCS != gs://* ]]; then
  die "DATA_GCS=$DATA_GCS: expected a gs:// folder"
fi

dir=$(run_dir)
jax_version=$(setup_py_pin jax)
read -ra pip_packages <<< "${PIP_PACKAGES:-safetensors==$(setup_py_pin safetensors)}"

# 1. The exact code this run executes, kept beside its checkpoints.
sha=$(git -C "$REPO_ROOT" rev-parse --short=12 HEAD)
if [[ -n $(git -C "$REPO_ROOT" status --porcelain) ]]; then
  sha+=-dirty
fi
code_url=$dir/code/avg_jax-$sha.tar.gz
local_archive=${TMPDIR:-/tmp}/avg_jax-$RUN_NAME-$sha.tar.gz
run bash -c "cd $(quote_words "$REPO_ROOT") && git ls-files -z --cached --others --exclude-standard \
| tar --null --ignore-failed-read -T - -czf $(quote_words "$local_archive")"
run gcloud storage cp "$local_archive" "$code_url"

# 2. Unpack and install on every worker (all in parallel).
root=$(quote_words "$WORKER_ROOT")
remote="set -euo pipefail"
remote+="; mkdir -p $root/logs $root/data && rm -rf $root/src && mkdir -p $root/src"
remote+="; gcloud storage cp $(quote_words "$code_url") $root/code.tar.gz && tar -xzf $root/code.tar.gz -C $root/src"
remote+="; python3 -m pip install --user --quiet uv || python3 -m pip install --user --quiet --break-system-packages uv"
remote+="; python3 -m uv venv --allow-existing --python $(quote_words "$PYTHON_VERSION") $root/venv"
remote+="; python3 -m uv pip install --python $root/venv/bin/python -e $root/src"
remote+=" $(quote_words "jax[tpu]==$jax_version" "${pip_packages[@]}")"

# 3. Data.
if [[ -n $DATA_GCS && $DATA_MODE == copy ]]; then
  remote+="; gcloud storage rsync --recursive $(quote_words "${DATA_GCS%/}") $root/data"
elif [[ -n $DATA_GCS ]]; then
  bucket=${DATA_GCS#gs://}
  prefix=${bucket#*/}
  bucket=${bucket%%/*}
  [[ $prefix != "$bucket" ]] || prefix=""
  only_dir=()
  [[ -z ${prefix%/} ]] || only_dir=(--only-dir "${prefix%/}")
  # gcsfuse from Google's apt repository, as its documentation installs it.
  remote+="; if ! command -v gcsfuse > /dev/null; then"
  remote+=" curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg"
  remote+=" | sudo gpg --batch --yes --dearmor -o /usr/share/keyrings/cloud.google.gpg"
  remote+=" && echo \"deb [signed-by=/usr/share/keyrings/cloud.google.gpg] https://packages.cloud.google.com/apt"
  remote+=" gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null"
  remote+=" && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; fi"
  remote+="; mountpoint -q $root/data || gcsfuse --implicit-dirs $(quote_words "${only_dir[@]}" "$bucket") $root/data"
fi

# 4. Check that the environment imports (the backend itself is checked by launch.sh --entry launch-check).
remote+="; $root/venv/bin/python -c 'import jax, avg_jax; print(jax.__version__, avg_jax.__file__)'"
on_workers all "$remote"
log "workers ready; next: tpu_scripts/launch.sh --run_name $RUN_NAME --entry launch-check"
