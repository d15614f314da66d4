#!/usr/bin/env bash
# Launch `engram-jax train` on every worker of a TPU VM or pod slice. See README.md.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="Usage: train.sh --workdir gs://BUCKET/RUN --preset PRESET --topology NAME
                [--set KEY=VALUE]... [--no-preflight] [common flags] [-- ARG...]

Preflight: compile the train step for the slice on this machine first ('engram-jax compile
--preset PRESET --topology NAME --no-decode [--set ...]', needs pip install 'engram-jax[tpu]');
stop here if it fails or does not fit in HBM. Then start 'engram-jax train --preset PRESET
--workdir gs://... [--set KEY=VALUE]... [ARG...]' detached (nohup) on every worker; each writes
~/engram-jax-logs/train.log (collect with logs.sh) and ~/engram-jax-logs/train.pid.
  --workdir gs://...  checkpoints and metrics; must be on GCS so that all workers share it
  --preset PRESET     model/training preset, e.g. tiny, small
  --topology NAME     the slice for the preflight, e.g. v5p:4x4x8 (v5p-256), v5e:4x4 (v5e-16)
  --set KEY=VALUE     config override, repeatable, e.g. --set train.steps=1000
  --no-preflight      skip the compile check (then --topology is not needed)
  -- ARG...           anything after -- is passed to 'engram-jax train' unchanged"

WORKDIR="" PRESET="" TOPOLOGY="" PREFLIGHT=1 SETS=() ARGS=()
while (($#)); do
  case $1 in
    --workdir) WORKDIR=$(value "$@"); shift 2 ;;
    --preset) PRESET=$(value "$@"); shift 2 ;;
    --topology) TOPOLOGY=$(value "$@"); shift 2 ;;
    --set) SETS+=(--set "$(value "$@")"); shift 2 ;;
    --no-preflight) PREFLIGHT=""; shift ;;
    --) ARGS+=("${@:2}"); break ;;
    *) common_flag "$@"; shift "$USED" ;;
  esac
done
check_common
[[ -n $WORKDIR ]] || die "missing --workdir gs://BUCKET/RUN"
[[ $WORKDIR == gs://?* ]] || die "--workdir must be on GCS (gs://...) for all workers to share it"
[[ -n $PRESET ]] || die "missing --preset (e.g. small)"
[[ -z $PREFLIGHT || -n $TOPOLOGY ]] ||
  die "missing --topology (e.g. v5p:4x4x8) for the preflight compile, or pass --no-preflight"

if [[ -n $PREFLIGHT ]]; then
  run engram-jax compile --preset "$PRESET" --topology "$TOPOLOGY" --no-decode \
    ${SETS[@]+"${SETS[@]}"} ||
    die "preflight: the train step does not compile or fit on $TOPOLOGY (report above)"
fi

launch train train --preset "$PRESET" --workdir "$WORKDIR" ${SETS[@]+"${SETS[@]}"} \
  ${ARGS[@]+"${ARGS[@]}"}
