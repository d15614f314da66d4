"""The training step on several meshes and several processes.

- In process: the same jitted step on 1 device, on 8 fake CPU devices (data=8) and on a mixed
  mesh (data=2, fsdp=2, expert=2) gives the same losses.
- Multi-host on localhost: two ``engram-jax train`` processes (4 fake CPU devices each, one
  mesh data=8 over both, tables row-sharded over all 8 devices) train, checkpoint from both
  processes and resume; the losses match one process with 8 devices, and the 2-process
  checkpoint resumes in ONE process on 2 devices.
"""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import (
    STEP8_SETS,
    TEST_XLA_FLAGS,
    cli_config_args,
    global_batch,
    tiny_cfg,
    train_steps,
)

from engram_jax import sharding as shd
from engram_jax.config import MeshConfig
from engram_jax.optim import make_optimizer
from engram_jax.state import init_state


def _step_losses(step_fn, cfg, mesh, steps=3):
    tx = make_optimizer(cfg, cfg.train.steps)
    _, state = init_state(cfg, mesh, tx)
    out = []
    for i in range(steps):
        state, metrics = step_fn(state, global_batch(cfg, mesh, seed=i))
        out.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    return np.array(out)


def _losses_on(cfg, mesh_cfg, n_devices, steps=3):
    mesh = shd.make_mesh(mesh_cfg, jax.devices()[:n_devices])
    metrics = train_steps(cfg, mesh, [global_batch(cfg, mesh, seed=i) for i in range(steps)])[2]
    return np.array([(float(m["loss"]), float(m["grad_norm"])) for m in metrics])


@pytest.fixture(scope="module")
def one_device_losses():
    return _losses_on(tiny_cfg(*STEP8_SETS), MeshConfig(data=1), 1)


def test_train_step_same_losses_on_1_and_8_devices(step8, one_device_losses):
    one = one_device_losses
    data8 = _step_losses(step8.compiled, step8.cfg, step8.mesh)  # the shared 8-device step
    assert np.all(np.isfinite(one))
    assert one[-1, 0] != one[0, 0]  # the model trains: losses move
    np.testing.assert_allclose(data8, one, rtol=1e-4)


@pytest.mark.slow
def test_train_step_same_losses_on_a_mixed_mesh(one_device_losses):
    mixed = _losses_on(tiny_cfg(*STEP8_SETS), MeshConfig(data=2, fsdp=2, expert=2), 8)
    np.testing.assert_allclose(mixed, one_device_losses, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Multi-host on localhost

SMALL = [
    *cli_config_args(
        "train.seq_len=32",
        "train.log_every=1",
        "train.eval_every=0",
        "train.checkpoint_every=2",
        # an extended run keeps its boundaries, but the reference is created with other steps
        "optim.decay_steps=[100]",
    ),
    "--no-progress",
]


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # the session's compilation cache included
    env["XLA_FLAGS"] = TEST_XLA_FLAGS  # --cpu-devices sets the device count
    return env


def _cmd(workdir, *args):
    return [sys.executable, "-m", "engram_jax.cli", "train", *SMALL, "--workdir", workdir, *args]


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))  # loopback only
        return s.getsockname()[1]


def _run_two_processes(workdir, *args, timeout=600):
    port = _free_port()
    procs = [
        subprocess.Popen(
            _cmd(
                workdir,
                *args,
                "--coordinator-address",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
                "--cpu-devices",
                "4",
            ),
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    deadline = time.time() + timeout
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1, deadline - time.time()))
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:  # only the processes started here
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (rc, _, err) in enumerate(outs):
        assert rc == 0, f"process {i} failed:\n{err[-3000:]}"
    return outs


def _run_one_process(workdir, *args):
    r = subprocess.run(
        _cmd(workdir, *args), env=_env(), capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


@pytest.mark.slow
def test_two_processes_train_checkpoint_resume_match_one_process(cli_tokenizer, tmp_path):
    from engram_jax.cli import main

    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    # 2 processes x 4 devices, one data=8 mesh; checkpoints at steps 2 and 4 from both; a Grain
    # worker process per host, and evaluation every 2 steps (neither may change the losses)
    tok = ("--set", f"data.tokenizer={cli_tokenizer}")  # trained once per session
    workers = (*tok, "--set", "data.worker_count=1")
    outs = _run_two_processes(
        multi,
        "--set",
        "mesh.data=8",
        "--steps",
        "4",
        *workers,
        "--set",
        "train.eval_every=2",
        "--set",
        "train.eval_batches=1",
    )
    assert "ok: 4 steps" in outs[0][1] and "train loss" not in outs[1][1]  # process 0 reports
    with open(os.path.join(multi, "metrics.jsonl"), encoding="utf-8") as f:
        evals = {r["step"]: r["val_loss"] for r in map(json.loads, f) if "val_loss" in r}
    assert sorted(evals) == [2, 4] and all(np.isfinite(v) for v in evals.values())
    ckpt = os.path.join(multi, "checkpoints", "4")
    assert os.path.isdir(ckpt)
    data_files = sorted(os.listdir(os.path.join(ckpt, "data")))
    assert "process_0-of-2.json" in data_files and "process_1-of-2.json" in data_files
    # resume with 2 processes (the workers' iterator state restored), extending the run
    _run_two_processes(multi, "--steps", "6", *workers)
    with open(os.path.join(multi, "summary.json"), encoding="utf-8") as f:
        assert json.load(f)["resumed_from"] == 4

    # reference: one process with 8 devices (this one)
    assert (
        main(["train", *SMALL, *tok, "--workdir", single, "--set", "mesh.data=8", "--steps", "6"])
        == 0
    )
    got, ref = _losses(multi), _losses(single)
    assert sorted(got) == list(range(1, 7)) == sorted(ref)
    np.testing.assert_allclose(
        [got[s] for s in range(1, 7)], [ref[s] for s in range(1, 7)], rtol=1e-3
    )

    # the 2-process checkpoint resumes in ONE process on 2 devices
    r = _run_one_process(multi, *tok, "--set", "mesh.data=2", "--steps", "8", "--cpu-devices", "2")
    resumed = _losses(multi)
    assert sorted(resumed) == list(range(1, 9))
    assert all(np.isfinite(resumed[s]) for s in (7, 8))
    assert [resumed[s] for s in range(1, 7)] == [got[s] for s in range(1, 7)]
    assert "8 steps" in r.stdout
