"""tpu_scripts/*.sh, each script's own commands (create, delete, install, train with its
preflight compile, sweep, logs), dry-run against the fakes of tpu_scripts_fakes.py."""

from __future__ import annotations

import shlex
import subprocess
import time
from pathlib import Path

import pytest
from tpu_scripts_fakes import CASES, LOC, ROOT, dry, make_env, remote, sh


@pytest.fixture
def env(tmp_path):
    return make_env(tmp_path)


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
