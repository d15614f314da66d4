"""tpu_scripts/*.sh: run each with --dry-run and fake arguments, never touching Google Cloud.

A fake ``gcloud`` goes first on PATH in every test. Under --dry-run it fails loudly and leaves a
marker, which proves dry runs run nothing; without --dry-run it records its arguments (and answers
ACTIVE to ``describe``), which proves a real run executes exactly the commands a dry run prints.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

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


@pytest.fixture
def env(tmp_path):
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


# ---- create / delete ------------------------------------------------------------------------


def test_create(env, tmp_path):
    (c,) = dry("create", *LOC, *CASES["create"][0], env=env, cwd=tmp_path)
    assert c[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod"]
    assert {"--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite"} <= set(c)
    assert "--spot" not in c and "queued-resources" not in c
    (c,) = dry(
        "create",
        *LOC,
        "--accelerator-type",
        "v4-32",
        "--version",
        "tpu-ubuntu2204-base",
        "--spot",
        env=env,
        cwd=tmp_path,
    )
    assert {"--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"} <= set(c)


def test_create_queued_waits_for_active(env, tmp_path):
    create, describe = dry(
        "create", *LOC, *CASES["create"][0], "--queued", "--spot", env=env, cwd=tmp_path
    )
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "pod"]
    assert {
        "--node-id=pod",
        "--accelerator-type=v5litepod-16",
        "--runtime-version=v2-alpha-tpuv5-lite",
        "--spot",
    } <= set(create)
    assert describe[3:6] == ["queued-resources", "describe", "pod"]
    assert "--format=value(state.state)" in describe


def test_create_queued_stops_on_failure(env, tmp_path):
    del env["FAKE_GCLOUD_FAIL"]
    env["FAKE_STATE"] = "FAILED"
    r = sh("create", *LOC, *CASES["create"][0], "--queued", env=env, cwd=tmp_path)
    assert r.returncode != 0 and "FAILED" in r.stderr.splitlines()[-1]


def test_delete(env, tmp_path):
    (c,) = dry("delete", *LOC, env=env, cwd=tmp_path)
    assert c[3:6] == ["tpu-vm", "delete", "pod"] and "--quiet" not in c
    (c,) = dry("delete", *LOC, "--queued", "--quiet", env=env, cwd=tmp_path)
    assert c[3:6] == ["queued-resources", "delete", "pod"]
    assert {"--force", "--quiet"} <= set(c)


# ---- install --------------------------------------------------------------------------------


def test_install_from_git(env, tmp_path):
    (c,) = dry("install", *LOC, *CASES["install"][0], env=env, cwd=tmp_path)
    assert c[3:6] == ["tpu-vm", "ssh", "pod"] and "--worker=all" in c
    cmd = remote(c)
    assert "git clone -q https://example.com/engram-jax.git ~/engram-jax" in cmd
    assert "checkout -q v0.1" in cmd
    assert "uv venv" in cmd and "--python 3.12" in cmd
    assert cmd.endswith('bin/pip install -q -e ".[tpu]"')
    (c,) = dry("install", *LOC, "--repo-url", "u", env=env, cwd=tmp_path)
    assert "checkout -q main" in remote(c)


def test_install_from_local_tree(env, tmp_path):
    tar, scp, ssh = dry("install", *LOC, "--local", str(ROOT), env=env, cwd=tmp_path)
    assert tar[0] == "tar" and tar[-3:] == ["-C", str(ROOT), "."]
    tarball = tar[tar.index("-czf") + 1]
    assert not Path(tarball).exists(), "--dry-run made the tarball"
    assert scp[3:6] == ["tpu-vm", "scp", tarball] and "--worker=all" in scp
    assert "pod:engram-jax.tar.gz" in scp
    assert ssh[3:5] == ["tpu-vm", "ssh"] and "--worker=all" in ssh
    assert "tar -xzf ~/engram-jax.tar.gz" in remote(ssh) and ".[tpu]" in remote(ssh)


def test_install_needs_exactly_one_source(env, tmp_path):
    r = sh("install", *LOC, "--local", ".", "--repo-url", "u", "--dry-run", env=env, cwd=tmp_path)
    assert r.returncode != 0 and len(r.stderr.splitlines()) == 1


# ---- train / sweep / logs -------------------------------------------------------------------


def test_train(env, tmp_path):
    pre, c = dry(
        "train",
        *LOC,
        *CASES["train"][0],
        "--set",
        "train.steps=10",
        "--set",
        "engram.layer_ids=[1, 5]",
        "--",
        "--resume",
        env=env,
        cwd=tmp_path,
    )
    # the preflight compiles the same config for the slice, locally, before any gcloud call
    assert pre == [
        "engram-jax",
        "compile",
        "--preset",
        "small",
        "--topology",
        "v5p:2x2x1",
        "--no-decode",
        "--set",
        "train.steps=10",
        "--set",
        "engram.layer_ids=[1, 5]",
    ]
    assert c[3:6] == ["tpu-vm", "ssh", "pod"] and "--worker=all" in c
    cmd = remote(c)
    assert "nohup " in cmd and "> ~/engram-jax-logs/train.log 2>&1 < /dev/null &" in cmd
    # what each worker runs, as its shell will split it
    argv = shlex.split(cmd.split("nohup ", 1)[1].split(" > ", 1)[0])
    assert argv == [
        "~/engram-jax-venv/bin/engram-jax",
        "train",
        "--preset",
        "small",
        "--workdir",
        "gs://bkt/run1",
        "--set",
        "train.steps=10",
        "--set",
        "engram.layer_ids=[1, 5]",
        "--resume",
    ]


def test_remote_commands_work_in_a_local_shell(env, tmp_path):
    """Run what train.sh and logs.sh send to the workers in a local bash, against a fake venv."""
    home = tmp_path / "home"
    fake = home / "engram-jax-venv" / "bin" / "engram-jax"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\0" "$@"\n')
    fake.chmod(0o755)
    value = 'data.name=it\'s a "test" $HOME; `x` & y'
    _, c = dry("train", *LOC, *CASES["train"][0], "--set", value, env=env, cwd=tmp_path)
    local = {**env, "HOME": str(home)}
    subprocess.run(["bash", "-c", remote(c)], env=local, check=True, timeout=30)
    pid = int((home / "engram-jax-logs" / "train.pid").read_text())
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:  # the detached fake
        time.sleep(0.01)
    log = (home / "engram-jax-logs" / "train.log").read_text()
    assert log.split("\0")[:-1] == [
        "train",
        "--preset",
        "small",
        "--workdir",
        "gs://bkt/run1",
        "--set",
        value,
    ]
    _, c = dry("logs", *LOC, env=env, cwd=tmp_path)
    out = subprocess.run(
        ["bash", "-c", remote(c)], env=local, check=True, capture_output=True, text=True
    ).stdout
    assert out == log


def test_train_preflight_runs_first_and_stops_a_config_that_does_not_fit(env, tmp_path):
    del env["FAKE_GCLOUD_FAIL"]
    env["FAKE_EJ_EXIT"] = "1"
    r = sh("train", *LOC, *CASES["train"][0], env=env, cwd=tmp_path)
    assert r.returncode != 0 and "DOES NOT FIT" in r.stdout
    assert "preflight" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert not Path(env["FAKE_GCLOUD_LOG"]).exists(), "gcloud ran after a failed preflight"
    ran = Path(env["FAKE_EJ_LOG"]).read_text().split("\0")[:-1]
    assert ran[:5] == ["compile", "--preset", "small", "--topology", "v5p:2x2x1"]


def test_train_without_preflight(env, tmp_path):
    args = ("--workdir", "gs://bkt/run1", "--preset", "small", "--no-preflight")
    (c,) = dry("train", *LOC, *args, env=env, cwd=tmp_path)
    assert c[0] == "gcloud"


@pytest.mark.parametrize("workdir", ["/tmp/run", "runs/x", "s3://bkt/run", "gs://", "GS://bkt/r"])
def test_train_refuses_a_workdir_off_gcs(workdir, env, tmp_path):
    r = sh(
        "train", *LOC, "--workdir", workdir, "--preset", "small", "--dry-run", env=env, cwd=tmp_path
    )
    assert r.returncode != 0 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and "gs://" in r.stderr


@pytest.mark.parametrize("kind", ["rho", "slots", "ablations"])
def test_sweep(kind, env, tmp_path):
    (c,) = dry(
        "sweep", kind, *LOC, "--out", "gs://bkt/s", "--", "--preset", "small", env=env, cwd=tmp_path
    )
    assert "--worker=all" in c
    cmd = remote(c)
    assert f"engram-jax sweep {kind} --out gs://bkt/s --preset small > " in cmd
    assert f"~/engram-jax-logs/sweep-{kind}.log" in cmd


@pytest.mark.parametrize("args", [("bogus", "--out", "gs://b/s"), ("rho", "--out", "/tmp/s")])
def test_sweep_refuses_bad_kind_or_local_out(args, env, tmp_path):
    r = sh("sweep", *LOC, *args, "--dry-run", env=env, cwd=tmp_path)
    assert r.returncode != 0 and r.stdout == "" and len(r.stderr.splitlines()) == 1


def test_logs(env, tmp_path):
    mkdir, ssh = dry("logs", *LOC, "--out", "collected", env=env, cwd=tmp_path)
    assert mkdir == ["mkdir", "-p", "collected"]
    assert not (tmp_path / "collected").exists(), "--dry-run made the directory"
    assert "--worker=all" in ssh and "--output-directory=collected" in ssh
    assert "~/engram-jax-logs/*.log" in remote(ssh)
    _, ssh = dry("logs", *LOC, env=env, cwd=tmp_path)
    assert "--output-directory=tpu-logs/pod" in ssh


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


def test_local_tarball_inside_the_tree_is_not_packed_into_itself(env, tmp_path):
    """TMPDIR inside the packed tree (as on CI, where both are the test's tmp dir): tar must skip
    the archive it is writing instead of failing with "file changed as we read it"."""
    src = tmp_path
    (src / "setup.py").write_text("# fake\n" * 1000)
    (src / "runs").mkdir()
    (src / "runs" / "big.bin").write_bytes(b"x" * 100)
    del env["FAKE_GCLOUD_FAIL"]
    for _ in range(3):  # the failure was a race; a few runs make it likely to show if it returns
        r = sh("install", *LOC, "--local", ".", env=env, cwd=src)
        assert r.returncode == 0, r.stderr
    members = subprocess.run(
        ["tar", "-tzf", str(tmp_path / "engram-jax-pod.tar.gz")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert "./setup.py" in members
    assert not any("engram-jax-pod.tar.gz" in m or m.startswith("./runs") for m in members)
