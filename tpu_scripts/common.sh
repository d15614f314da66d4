# shellcheck shell=bash disable=SC2034  # the variables set here are read by the scripts
# Sourced (never run) by every tpu_scripts/*.sh: flag helpers and `run`.
#
# Every script takes --name, --zone and --project (defaults: $TPU_NAME, $TPU_ZONE, $TPU_PROJECT;
# nothing is baked in, a missing one is an error), --dry-run and --help.

NAME=${TPU_NAME:-} ZONE=${TPU_ZONE:-} PROJECT=${TPU_PROJECT:-} DRY_RUN=0 USED=0 LOC=()

# Paths on the workers, relative to the remote home directory (the remote shell expands ~).
# shellcheck disable=SC2088
SRC='~/engram-jax' VENV='~/engram-jax-venv' LOGS='~/engram-jax-logs'

COMMON_HELP="Common flags:
  --name NAME        TPU VM / pod slice name (default: \$TPU_NAME)
  --zone ZONE        e.g. us-central2-b (default: \$TPU_ZONE)
  --project PROJECT  Google Cloud project id (default: \$TPU_PROJECT)
  --dry-run          print the commands, one per line prefixed '+ ', and run nothing
  -h, --help         show this help"

usage() { printf '%s\n\n%s\n' "$USAGE" "$COMMON_HELP"; }

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }

# value FLAG ARG...: print the argument after FLAG, or die if there is none.
value() { [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value"; printf '%s' "$2"; }

# common_flag ARG...: handle a flag every script takes; set USED to the arguments it consumed.
common_flag() {
  USED=2
  case $1 in
    --name) NAME=$(value "$@") ;;
    --zone) ZONE=$(value "$@") ;;
    --project) PROJECT=$(value "$@") ;;
    --dry-run) DRY_RUN=1 USED=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
}

# check_common: every command needs the node, zone and project; LOC holds the last two as flags.
check_common() {
  [[ -n $NAME ]] || die "missing --name (or set TPU_NAME)"
  [[ -n $ZONE ]] || die "missing --zone (or set TPU_ZONE)"
  [[ -n $PROJECT ]] || die "missing --project (or set TPU_PROJECT)"
  LOC=(--zone="$ZONE" --project="$PROJECT")
}

# quote ARG: ARG as a shell would read it back (single quotes only where needed).
quote() {
  local sq="'\\''"
  if [[ $1 =~ ^[][A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 =~ ^(--[a-z-]+=)(.*)$ ]]; then
    printf "%s'%s'" "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]//\'/$sq}"
  else
    printf "'%s'" "${1//\'/$sq}"
  fi
}

# show CMD...: print "+ CMD", copy-pasteable.
show() {
  local line="+" arg
  for arg in "$@"; do line+=" $(quote "$arg")"; done
  echo "$line"
}

# run CMD...: show CMD, then run it unless --dry-run.
run() { show "$@"; [[ $DRY_RUN == 1 ]] || "$@"; }

# ssh_all CMD [FLAG...]: run the shell command CMD on every worker of the slice at once.
ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker=all --command="$1" "${@:2}"
}

# launch LOG ARG...: start `engram-jax ARG...` detached on every worker. The command is the same on
# all of them: on TPU VMs jax.distributed.initialize() finds its peers without arguments.
# Each worker writes its output to $LOGS/LOG.log on its own disk and the pid to $LOGS/LOG.pid.
launch() {
  local log="$LOGS/$1" args
  args=$(printf ' %q' "${@:2}")
  ssh_all "mkdir -p $LOGS && { nohup $VENV/bin/engram-jax$args > $log.log 2>&1 < /dev/null \
& echo \$! > $log.pid; }"
}
