"""tpu_scripts/*.sh, what every script shares: strict bash, help, dry runs that name the node,
zone and project only, one-line errors, and a real run (against the fakes of
tpu_scripts_fakes.py) that executes exactly what its dry run prints."""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from tpu_scripts_fakes import CASES, LOC, NAMES, ROOT, SCRIPTS, dry, gcloud, make_env, sh


@pytest.fixture
def env(tmp_path):
    return make_env(tmp_path)


# ---- every script ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_script_is_strict_and_executable(name):
    path = SCRIPTS / f"{name}.sh"
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert "0.0.0.0" not in text
    assert os.access(path, os.X_OK)
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_git_records_the_executable_bit():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(
        ["git", "ls-files", "-s", "tpu_scripts"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    modes = {Path(line.split("\t")[1]).stem: line.split()[0] for line in out.splitlines()}
    assert {n: modes.get(n) for n in NAMES} == {n: "100755" for n in NAMES}


def test_common_is_sourced_not_run():
    path = SCRIPTS / "common.sh"
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert not path.stat().st_mode & stat.S_IXUSR
    assert "0.0.0.0" not in path.read_text()


def test_shellcheck_is_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    subprocess.run(
        ["shellcheck", "-x", *sorted(map(str, SCRIPTS.glob("*.sh")))], cwd=SCRIPTS, check=True
    )


@pytest.mark.parametrize("name", NAMES)
def test_help(name, env, tmp_path):
    r = sh(name, "--help", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"Usage: {name}.sh") and "--dry-run" in r.stdout
    assert not Path(env["FAKE_GCLOUD_FAIL"]).exists()


@pytest.mark.parametrize("name", NAMES)
def test_dry_run_names_node_zone_and_given_project_only(name, env, tmp_path):
    required, optional = CASES[name]
    cmds = gcloud(dry(name, *LOC, *required, *optional, env=env, cwd=tmp_path))
    assert cmds
    for c in cmds:
        assert c[:3] == ["gcloud", "compute", "tpus"]
        assert "--zone=us-central2-b" in c
        assert [a for a in c if a.startswith("--project")] == ["--project=proj-x"]
    out = "\n".join(shlex.join(c) for c in cmds)
    assert "0.0.0.0" not in out


@pytest.mark.parametrize("name", NAMES)
def test_location_from_environment(name, env, tmp_path):
    required, _ = CASES[name]
    env.update(TPU_NAME="envpod", TPU_ZONE="europe-west4-a", TPU_PROJECT="env-proj")
    for c in gcloud(dry(name, *required, env=env, cwd=tmp_path)):
        assert "--zone=europe-west4-a" in c and "--project=env-proj" in c
        assert any(a == "envpod" or a.startswith("envpod:") for a in c)
    # a flag beats the environment
    for c in gcloud(dry(name, *required, "--project", "flag-proj", env=env, cwd=tmp_path)):
        assert [a for a in c if a.startswith("--project")] == ["--project=flag-proj"]


MISSING = [(n, f) for n in NAMES for f in ("--name", "--zone", "--project")] + [
    ("create", "--accelerator-type"),
    ("create", "--version"),
    ("install", "--repo-url"),
    ("train", "--workdir"),
    ("train", "--preset"),
    ("train", "--topology"),
    ("sweep", "rho"),
    ("sweep", "--out"),
]


@pytest.mark.parametrize("name,drop", MISSING)
def test_missing_argument_is_a_one_line_error(name, drop, env, tmp_path):
    args = [*LOC, *CASES[name][0]]
    i = args.index(drop)
    del args[i : i + (1 if drop == "rho" else 2)]
    r = sh(name, "--dry-run", *args, env=env, cwd=tmp_path)
    assert r.returncode != 0
    assert r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and f"{name}.sh: error: missing" in r.stderr, r.stderr
    assert not Path(env["FAKE_GCLOUD_FAIL"]).exists()


@pytest.mark.parametrize("args", [("--bogus",), ("--zone",), ("--zone", "--dry-run")])
def test_bad_flags_are_refused(args, env, tmp_path):
    r = sh("delete", *LOC, "--dry-run", *args, env=env, cwd=tmp_path)
    assert r.returncode != 0 and r.stdout == "" and len(r.stderr.splitlines()) == 1


# ---- a real run executes what the dry run printed -------------------------------------------


@pytest.mark.parametrize(
    "name,extra",
    [
        ("create", ("--queued",)),
        ("create", ()),
        ("install", ()),
        ("train", ()),
        ("sweep", ()),
        ("logs", ()),
        ("delete", ("--queued", "--quiet")),
        ("install", ("--local", ".")),
    ],
)
def test_real_run_executes_what_dry_run_prints(name, extra, env, tmp_path):
    required, optional = CASES[name]
    if "--local" in extra:
        required = ()
        (tmp_path / "setup.py").write_text("")
    commands = dry(name, *LOC, *required, *optional, *extra, env=env, cwd=tmp_path)
    del env["FAKE_GCLOUD_FAIL"]
    r = sh(name, *LOC, *required, *optional, *extra, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for tool, log in (("gcloud", "FAKE_GCLOUD_LOG"), ("engram-jax", "FAKE_EJ_LOG")):
        path = Path(env[log])
        entries = path.read_text().split("\n")[:-1] if path.exists() else []
        ran = [[tool, *entry.split("\0")[:-1]] for entry in entries]
        assert ran == [c for c in commands if c[0] == tool]
