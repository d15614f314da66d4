#!/usr/bin/env bash
# Install engram-jax on every worker of a TPU VM or pod slice. See README.md.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="Usage: install.sh (--repo-url URL [--ref REF] | --local PATH) [--python VERSION]
                  [common flags]

Put the source in ~/engram-jax on every worker (replacing any previous copy) and install it with
pip install -e '.[tpu]' into the venv ~/engram-jax-venv.
  --repo-url URL    git clone URL on each worker
  --ref REF         branch, tag or commit to check out (default: main)
  --local PATH      instead, pack the working tree at PATH (less .git, .venv, runs/) into a tarball
                    and scp it to every worker
  --python VERSION  Python of the venv (default: 3.12; jax needs >= 3.11, newer than the 3.10 of
                    the Ubuntu 22.04 TPU images, so the venv is made by uv, which fetches it)"

REPO_URL="" REF=main LOCAL="" PYTHON=3.12
while (($#)); do
  case $1 in
    --repo-url) REPO_URL=$(value "$@"); shift 2 ;;
    --ref) REF=$(value "$@"); shift 2 ;;
    --local) LOCAL=$(value "$@"); shift 2 ;;
    --python) PYTHON=$(value "$@"); shift 2 ;;
    *) common_flag "$@"; shift "$USED" ;;
  esac
done
check_common
[[ -n $REPO_URL || -n $LOCAL ]] || die "missing --repo-url URL or --local PATH"
[[ -z $REPO_URL || -z $LOCAL ]] || die "give --repo-url or --local, not both"

if [[ -n $LOCAL ]]; then
  tarball="${TMPDIR:-/tmp}/engram-jax-$NAME.tar.gz"
  # When TMPDIR lies inside the tree, tar must neither pack the archive it is writing nor see the
  # directory change under it ("file changed as we read it"): the file exists before tar starts
  # and is excluded by name.
  [[ $DRY_RUN == 1 ]] || : > "$tarball"
  run tar -czf "$tarball" --exclude=.git --exclude=.venv --exclude=__pycache__ \
    --exclude='*.egg-info' --exclude=./runs --exclude="engram-jax-$NAME.tar.gz" -C "$LOCAL" .
  run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:engram-jax.tar.gz" "${LOC[@]}" --worker=all
  fetch="rm -rf $SRC && mkdir -p $SRC && tar -xzf ~/engram-jax.tar.gz -C $SRC"
else
  fetch="rm -rf $SRC && git clone -q $(printf %q "$REPO_URL") $SRC \
&& git -C $SRC checkout -q $(printf %q "$REF")"
fi
ssh_all "$fetch && python3 -m pip install -q --user uv \
&& python3 -m uv venv -q --allow-existing --seed --python $(printf %q "$PYTHON") $VENV \
&& cd $SRC && $VENV/bin/pip install -q -e \".[tpu]\""
