"""The fakes the tpu_scripts tests run the scripts against, never touching Google Cloud.

A fake ``gcloud`` goes first on PATH in every test. Under --dry-run it fails loudly and leaves a
marker, which proves dry runs run nothing; without --dry-run it records its arguments (and answers
ACTIVE to ``describe``), which proves a real run executes exactly the commands a dry run prints.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tpu_scripts"
NAMES = ("create", "install", "train", "sweep", "logs", "delete")
LOC = ("--name", "pod", "--zone", "us-central2-b", "--project", "proj-x")

# Fake arguments of each script besides LOC: (what it needs, a few extras).
CASES = {
    "create": (("--accelerator-type", "v5litepod-16", "--version", "v2-alpha-tpuv5-lite"), ()),
    "install": (("--repo-url", "https://example.com/engram-jax.git", "--ref", "v0.1"), ()),
    "train": (
        ("--workdir", "gs://bkt/run1", "--preset", "small", "--topology", "v5p:2x2x1"),
        ("--set", "train.steps=10"),
    ),
    "sweep": (("rho", "--out", "gs://bkt/sweeps"), ()),
    "logs": ((), ()),
    "delete": ((), ()),
}

FAKE_GCLOUD = """#!/usr/bin/env bash
if [[ -n ${FAKE_GCLOUD_FAIL:-} ]]; then touch "$FAKE_GCLOUD_FAIL"; exit 97; fi
printf '%s\\0' "$@" >> "$FAKE_GCLOUD_LOG"; printf '\\n' >> "$FAKE_GCLOUD_LOG"
if [[ " $* " == *" describe "* ]]; then echo "${FAKE_STATE:-ACTIVE}"; fi
"""
# The local `engram-jax` of train.sh's preflight compile: fails loudly under --dry-run, else
# records its arguments and exits with $FAKE_EJ_EXIT (a compile that does not fit exits 1).
FAKE_ENGRAM_JAX = """#!/usr/bin/env bash
if [[ -n ${FAKE_GCLOUD_FAIL:-} ]]; then touch "$FAKE_GCLOUD_FAIL"; exit 97; fi
printf '%s\\0' "$@" >> "$FAKE_EJ_LOG"; printf '\\n' >> "$FAKE_EJ_LOG"
if [[ ${FAKE_EJ_EXIT:-0} != 0 ]]; then echo "engram-jax compile: DOES NOT FIT"; fi
exit "${FAKE_EJ_EXIT:-0}"
"""


def make_env(tmp_path):
    """The environment of a script run: the fakes first on PATH, TPU_* cleared, logs in
    ``tmp_path``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(FAKE_GCLOUD)
    fake.chmod(0o755)
    (bin_dir / "engram-jax").write_text(FAKE_ENGRAM_JAX)
    (bin_dir / "engram-jax").chmod(0o755)
    e = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    e.update(
        PATH=f"{bin_dir}{os.pathsep}{e.get('PATH', '')}",
        TMPDIR=str(tmp_path),
        FAKE_GCLOUD_FAIL=str(tmp_path / "gcloud-was-called"),
        FAKE_GCLOUD_LOG=str(tmp_path / "gcloud.log"),
        FAKE_EJ_LOG=str(tmp_path / "engram-jax.log"),
    )
    return e


def sh(name, *args, env, cwd):
    return subprocess.run(
        ["bash", str(SCRIPTS / f"{name}.sh"), *args],
        check=False,
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def dry(name, *args, env, cwd):
    """Dry-run a script; return its printed commands, each split back into argv."""
    r = sh(name, "--dry-run", *args, env=env, cwd=cwd)  # first: after a bare -- it passes through
    assert r.returncode == 0, r.stderr
    assert not Path(env["FAKE_GCLOUD_FAIL"]).exists(), "--dry-run called gcloud"
    lines = r.stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), r.stdout
    return [shlex.split(line[2:]) for line in lines]


def gcloud(cmds):
    return [c for c in cmds if c[0] == "gcloud"]


def remote(cmd):
    """The shell command an ``ssh --command=...`` line runs on the workers."""
    (c,) = [a for a in cmd if a.startswith("--command=")]
    return c[len("--command=") :]
