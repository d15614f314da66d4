#!/usr/bin/env bash
# Launch `engram-jax sweep` on every worker of a TPU VM or pod slice. See README.md.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="Usage: sweep.sh rho|slots|ablations --out gs://BUCKET/DIR [common flags] [-- ARG...]

Start 'engram-jax sweep KIND --out gs://... [ARG...]' detached (nohup) on every worker; each writes
~/engram-jax-logs/sweep-KIND.log (collect with logs.sh) and ~/engram-jax-logs/sweep-KIND.pid.
  rho|slots|ablations  which study: memory/MoE split, table size, or the Engram ablations
  --out gs://...    results directory; must be on GCS so that all workers share it
  -- ARG...         anything after -- is passed to 'engram-jax sweep' unchanged"

KIND="" OUT="" ARGS=()
while (($#)); do
  case $1 in
    rho | slots | ablations) KIND=$1; shift ;;
    --out) OUT=$(value "$@"); shift 2 ;;
    --) ARGS+=("${@:2}"); break ;;
    *) common_flag "$@"; shift "$USED" ;;
  esac
done
check_common
[[ -n $KIND ]] || die "missing the sweep: rho, slots or ablations"
[[ -n $OUT ]] || die "missing --out gs://BUCKET/DIR"
[[ $OUT == gs://?* ]] || die "--out must be on GCS (gs://...) for all workers to share it"

launch "sweep-$KIND" sweep "$KIND" --out "$OUT" ${ARGS[@]+"${ARGS[@]}"}
