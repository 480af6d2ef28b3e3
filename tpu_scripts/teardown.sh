#!/usr/bin/env bash
# Delete the TPU slice (the queued resource together with its node, or the plain TPU VM). Checkpoints and
# logs under gs://BUCKET/runs/ are kept.
#
#   teardown.sh [--run_name NAME | --tpu_name NAME] [--provisioning queued|vm]
# Common settings: see common.sh. --dry_run prints every command instead of running it.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,6s/^# \{0,1\}//p' "$0"; }

parse_flags "$@"
resolve_project

if [[ $TPU_PROVISIONING == queued ]]; then
  gcloud_tpu queued-resources delete "$QUEUED_RESOURCE" --force --quiet
else
  gcloud_tpu tpu-vm delete "$TPU_NAME" --quiet
fi
