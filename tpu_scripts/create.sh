#!/usr/bin/env bash
# Create a TPU VM or pod slice, directly or through a queued resource. See README.md.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="Usage: create.sh --accelerator-type TYPE --version RUNTIME [--spot] [--queued] [common flags]

Create the TPU VM or pod slice NAME.
  --accelerator-type TYPE  e.g. v4-32, v5litepod-16, v6e-8
  --version RUNTIME        TPU software version, e.g. tpu-ubuntu2204-base (v4),
                           v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e)
  --spot                   Spot capacity: much cheaper, can be preempted at any time
  --queued                 request it as a queued resource (also named NAME) and wait until it
                           is ACTIVE, polling every 60 s; the reliable way to get large slices"

ACCEL="" VERSION="" SPOT="" QUEUED=""
while (($#)); do
  case $1 in
    --accelerator-type) ACCEL=$(value "$@"); shift 2 ;;
    --version) VERSION=$(value "$@"); shift 2 ;;
    --spot) SPOT=1; shift ;;
    --queued) QUEUED=1; shift ;;
    *) common_flag "$@"; shift "$USED" ;;
  esac
done
check_common
[[ -n $ACCEL ]] || die "missing --accelerator-type (e.g. v5litepod-16)"
[[ -n $VERSION ]] || die "missing --version (e.g. v2-alpha-tpuv5-lite)"

if [[ -z $QUEUED ]]; then
  run gcloud compute tpus tpu-vm create "$NAME" "${LOC[@]}" \
    --accelerator-type="$ACCEL" --version="$VERSION" ${SPOT:+--spot}
  exit
fi

run gcloud compute tpus queued-resources create "$NAME" "${LOC[@]}" --node-id="$NAME" \
  --accelerator-type="$ACCEL" --runtime-version="$VERSION" ${SPOT:+--spot}
describe=(gcloud compute tpus queued-resources describe "$NAME" "${LOC[@]}"
  --format='value(state.state)')
show "${describe[@]}"  # run below every 60 s until the slice is ACTIVE
if [[ $DRY_RUN == 1 ]]; then exit; fi
while :; do
  # a network blip must not end a wait of hours
  state=$("${describe[@]}") || state="unknown (describe failed)"
  case $state in
    ACTIVE) echo "$NAME is ACTIVE"; exit ;;
    FAILED | SUSPENDED) die "queued resource $NAME is $state (describe it to see why)" ;;
  esac
  echo "$NAME is ${state:-not visible yet}; checking again in 60 s" >&2
  sleep 60
done
