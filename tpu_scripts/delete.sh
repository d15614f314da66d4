#!/usr/bin/env bash
# Delete a TPU VM or pod slice, or the queued resource that holds it. See README.md.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="Usage: delete.sh [--queued] [--quiet] [common flags]

Delete the TPU VM or pod slice NAME; its local disks (and the logs on them) go with it.
  --queued  it was made with create.sh --queued: delete the queued resource NAME and its node
  --quiet   do not ask for confirmation"

QUEUED="" QUIET=""
while (($#)); do
  case $1 in
    --queued) QUEUED=1; shift ;;
    --quiet) QUIET=1; shift ;;
    *) common_flag "$@"; shift "$USED" ;;
  esac
done
check_common

if [[ -n $QUEUED ]]; then
  run gcloud compute tpus queued-resources delete "$NAME" "${LOC[@]}" --force ${QUIET:+--quiet}
else
  run gcloud compute tpus tpu-vm delete "$NAME" "${LOC[@]}" ${QUIET:+--quiet}
fi
