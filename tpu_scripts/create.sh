#!/usr/bin/env bash
# Create the TPU slice (a queued resource, or a plain TPU VM with --provisioning vm), on-demand, spot or
# reserved, and wait until it is usable (queued resource ACTIVE; `tpu-vm create` itself returns when READY).
#
#   create.sh [--accelerator v4-32] [--spot] [--provisioning queued|vm] [--run_name NAME | --tpu_name NAME]
# Common settings: see common.sh. --dry_run prints every command instead of running it.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,6s/^# \{0,1\}//p' "$0"; }

parse_flags "$@"
resolve_project
DRY_RUN_TPU_STATE=${DRY_RUN_TPU_STATE:-ACTIVE}

pricing_flags=()
case $TPU_PRICING in
  spot) pricing_flags=(--spot) ;;
  reserved) pricing_flags=(--reserved) ;;
esac

if [[ $TPU_PROVISIONING == queued ]]; then
  gcloud_tpu queued-resources create "$QUEUED_RESOURCE" --node-id="$TPU_NAME" \
    --accelerator-type="$TPU_ACCELERATOR" --runtime-version="$TPU_RUNTIME_VERSION" "${pricing_flags[@]}"
  # A queued resource waits for capacity (minutes to hours for spot); poll until it is ACTIVE.
  while :; do
    state=$(tpu_state)
    log "queued resource $QUEUED_RESOURCE: $state"
    case $state in
      ACTIVE) break ;;
      FAILED | SUSPENDED | NOT_FOUND) die "queued resource $QUEUED_RESOURCE is $state (see: gcloud compute tpus queued-resources describe $QUEUED_RESOURCE --zone=$TPU_ZONE)" ;;
    esac
    [[ $DRY_RUN != 1 ]] || break
    sleep "$POLL_SECONDS"
  done
else
  gcloud_tpu tpu-vm create "$TPU_NAME" --accelerator-type="$TPU_ACCELERATOR" \
    --version="$TPU_RUNTIME_VERSION" "${pricing_flags[@]}"
fi
log "TPU $TPU_NAME ($TPU_ACCELERATOR, $TPU_PRICING) is ready in $TPU_ZONE"
