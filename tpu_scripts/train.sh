#!/usr/bin/env bash
# Launch `engram-jax train` on every worker of a TPU VM or pod slice. See README.md.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="Usage: train.sh --workdir gs://BUCKET/RUN --preset PRESET [--set KEY=VALUE]...
                [common flags] [-- ARG...]

Start 'engram-jax train --preset PRESET --workdir gs://... [--set KEY=VALUE]... [ARG...]' detached
(nohup) on every worker; each writes ~/engram-jax-logs/train.log (collect with logs.sh) and
~/engram-jax-logs/train.pid.
  --workdir gs://...  checkpoints and metrics; must be on GCS so that all workers share it
  --preset PRESET     model/training preset, e.g. tiny, small
  --set KEY=VALUE     config override, repeatable, e.g. --set train.steps=1000
  -- ARG...           anything after -- is passed to 'engram-jax train' unchanged"

WORKDIR="" PRESET="" ARGS=()
while (($#)); do
  case $1 in
    --workdir) WORKDIR=$(value "$@"); shift 2 ;;
    --preset) PRESET=$(value "$@"); shift 2 ;;
    --set) ARGS+=(--set "$(value "$@")"); shift 2 ;;
    --) ARGS+=("${@:2}"); break ;;
    *) common_flag "$@"; shift "$USED" ;;
  esac
done
check_common
[[ -n $WORKDIR ]] || die "missing --workdir gs://BUCKET/RUN"
[[ $WORKDIR == gs://?* ]] || die "--workdir must be on GCS (gs://...) for all workers to share it"
[[ -n $PRESET ]] || die "missing --preset (e.g. small)"

launch train train --preset "$PRESET" --workdir "$WORKDIR" ${ARGS[@]+"${ARGS[@]}"}
