#!/usr/bin/env bash
# Collect the engram-jax logs of every worker into a local directory. See README.md.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="Usage: logs.sh [--out DIR] [common flags]

Copy ~/engram-jax-logs/*.log of every worker into DIR/WORKER.log (0.log, 1.log, ...), each log
file headed by '==> FILE <=='.
  --out DIR  local directory, created if needed (default: tpu-logs/NAME)"

OUT=""
while (($#)); do
  case $1 in
    --out) OUT=$(value "$@"); shift 2 ;;
    *) common_flag "$@"; shift "$USED" ;;
  esac
done
check_common

OUT=${OUT:-tpu-logs/$NAME}
run mkdir -p "$OUT"
ssh_all "tail -n +1 $LOGS/*.log" --output-directory="$OUT"
