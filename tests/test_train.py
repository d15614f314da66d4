"""End-to-end training through the CLI: kill -9 and resume bit-identically, eval, bad inputs.

The CLI runs in this process (``engram_jax.cli.main``) except in the kill -9 test, where the
process boundary is the point. The reference run is conftest's ``trained_run``: ``step8``'s
config on 8 devices, so the persistent compilation cache serves it the step that fixture
compiled.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from engram_jax.cli import main


def _cli(args, capsys):
    """``engram-jax ARGS`` in this process: ``(exit status, stdout, stderr)``."""
    capsys.readouterr()
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


@pytest.mark.slow
def test_kill9_resume_is_bit_identical(cli_train_args, trained_run, tmp_path):
    wd = str(tmp_path / "killed")
    # this process's environment: the same 8 fake devices and compilation cache
    cmd = [sys.executable, "-m", "engram_jax.cli", "train", *cli_train_args, "--steps", "12"]
    cmd += ["--workdir", wd, "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = os.path.join(wd, "metrics.jsonl")
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and max(_losses(wd), default=0) >= 6:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_losses(wd))
    assert killed_at < 12
    resumed = subprocess.run(  # resumes with the saved config
        [sys.executable, "-m", "engram_jax.cli", "train", "--workdir", wd, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref, got = _losses(trained_run), _losses(wd)
    assert sorted(got) == list(range(1, 13))
    assert got == ref  # exact float equality, every step


def test_eval_prints_val_loss(trained_run, capsys):
    code, stdout, stderr = _cli(["eval", "--workdir", trained_run, "--batches", "2"], capsys)
    assert code == 0, stderr[-2000:]
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["step"] == 12 and 0 < out["val_loss"] < 10


def test_workdir_loads_the_model_and_table_rows_from_the_trainers_checkpoint(trained_run):
    import jax
    import numpy as np
    from conftest import global_batch

    from engram_jax.generate import Generator, load_workdir
    from engram_jax.offload import HostRows
    from engram_jax.state import merge_model
    from engram_jax.step import make_eval_step
    from engram_jax.workdir import Workdir, single_device_mesh

    wd = Workdir(trained_run)
    loaded = wd.load()  # the model only: no optimizer state built, tables caught up
    assert loaded.step == 12 and set(loaded.state) == {"params", "tables", "rest"}
    full = wd.load(with_optimizer=True)  # the training state as saved
    assert int(full.state["step"]) == 12 and "opt" in full.state
    for k in ("params", "rest"):
        for a, b in zip(jax.tree.leaves(loaded.state[k]), jax.tree.leaves(full.state[k])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the loaded model evaluates as the trainer's eval step does (rows caught up on read)
    cfg, mesh = loaded.cfg, single_device_mesh()
    batch = global_batch(cfg, mesh)
    trainer_eval = jax.jit(make_eval_step(cfg, full.graphdef, mesh))(full.state, batch)
    model_eval = jax.jit(make_eval_step(cfg, loaded.graphdef))(loaded.state, batch)
    stale_eval = jax.jit(make_eval_step(cfg, full.graphdef))(full.state, batch)
    np.testing.assert_allclose(model_eval, trainer_eval, rtol=1e-5)
    assert stale_eval != trainer_eval  # so the check above can fail

    # rows read straight from the checkpoint are the saved rows
    raw = merge_model(full.graphdef, full.state)
    ckpt = wd.checkpointer()
    ids = np.array([0, 5, 4999, 5, 17], np.int64)
    for layer in raw.engram_layers:
        table = np.asarray(raw.blocks[layer].engram.table.table[...])
        np.testing.assert_array_equal(ckpt.table_rows(12, layer).take(ids), table[ids])
    # decoding with rows read from the checkpoint equals decoding with resident tables
    _, _, sp, comp = load_workdir(trained_run)
    prompt = np.asarray([sp.encode("def main(")], np.int32)
    rows = HostRows.from_checkpoint(ckpt.state_dir(12), raw.engram_layers)
    ckpt.close()
    a = Generator(raw, comp, max_len=32, rows=rows).generate(prompt, 4).tokens
    b = Generator(raw, comp, max_len=32).generate(prompt, 4).tokens
    np.testing.assert_array_equal(a, b)


def test_workdir_of_another_config_is_refused(cli_train_args, trained_run, capsys):
    before = open(os.path.join(trained_run, "config.json")).read()
    args = ["train", *cli_train_args, "--set", "model.d_model=64", "--workdir", trained_run]
    code, _, stderr = _cli(args, capsys)
    assert code == 2
    assert "different config" in stderr and "model.d_model" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert open(os.path.join(trained_run, "config.json")).read() == before


@pytest.mark.parametrize(
    "data, message", [("missing/path.txt", "not found"), ("EMPTY", "no non-empty documents")]
)
def test_bad_data_is_one_line_error(cli_train_args, tmp_path, data, message, capsys):
    if data == "EMPTY":
        data = str(tmp_path / "empty")
        os.makedirs(data)
    wd = tmp_path / "wd"
    code, _, stderr = _cli(["train", *cli_train_args, "--data", data, "--workdir", str(wd)], capsys)
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert message in stderr.lower()
    assert not (wd / "checkpoints").exists()


@pytest.mark.slow
def test_nan_loss_stops_with_last_good_checkpoint(cli_train_args, tmp_path, capsys):
    wd = str(tmp_path / "nan")
    code, _, stderr = _cli(
        [
            "train",
            *cli_train_args,
            "--steps",
            "30",
            "--set",
            "train.checkpoint_every=1",
            "--set",
            "optim.lr=30",
            "--set",
            "optim.muon_lr=30",
            "--set",
            "optim.warmup_steps=30",
            "--set",
            "optim.grad_clip=0.0",
            "--workdir",
            wd,
            "--no-progress",
        ],
        capsys,
    )
    assert code != 0
    assert "training diverged" in stderr
    steps = sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())
    losses = _losses(wd)
    assert all(v == v and abs(v) != float("inf") for v in losses.values())
    assert steps and max(steps) < max(losses)  # the state before the NaN step is dropped


def test_extending_steps_keeps_the_decay_boundaries_the_run_was_created_with(tmp_path):
    from engram_jax.presets import get_preset
    from engram_jax.train import resolve_config

    tiny = get_preset("tiny")
    # default boundaries are 80% and 90% of train.steps (OptimConfig.decay_steps docs)
    fresh = resolve_config(str(tmp_path), None, ["train.steps=100", "optim.decay_steps=[]"])
    assert fresh.optim.decay_steps == (80, 90)
    (tmp_path / "config.json").write_text(json.dumps(fresh.to_dict()))
    assert resolve_config(str(tmp_path), None, ["train.steps=200"]).optim.decay_steps == (80, 90)
    # a workdir written before boundaries were stored: derived from ITS train.steps
    old = dataclasses.replace(
        tiny,
        train=dataclasses.replace(tiny.train, steps=100),
        optim=dataclasses.replace(tiny.optim, decay_steps=()),
    )
    (tmp_path / "config.json").write_text(json.dumps(old.to_dict()))
    assert resolve_config(str(tmp_path), None, ["train.steps=200"]).optim.decay_steps == (80, 90)
    # explicit boundaries win
    cfg = resolve_config(str(tmp_path), None, ["train.steps=200", "optim.decay_steps=[150]"])
    assert cfg.optim.decay_steps == (150,)


def test_config_from_dict_refuses_unknown_keys():
    from engram_jax.config import Config

    d = Config().to_dict()
    assert Config.from_dict(d) == Config()
    d["optim"]["learning_rate"] = 1e-3  # e.g. a renamed field
    with pytest.raises(ValueError, match="unknown config key 'optim.learning_rate'"):
        Config.from_dict(d)
    with pytest.raises(ValueError, match="unknown config key 'optimizer'"):
        Config.from_dict({"optimizer": {}})


# Counts and sizes that may be 0 (0 means "none" or "disabled"); every other int field of a
# config section is a count or size >= 1, and every bool field a real bool.
_ZERO_OK = {
    "EngramConfig": {"seed"},
    "MoEConfig": {"n_shared_experts"},
    "ModelConfig": {"q_lora_rank", "sinkhorn_iters", "n_dense_layers"},
    "OptimConfig": {"warmup_steps"},
    "DataConfig": {"max_files", "max_bytes", "prefetch", "worker_count"},
    "TrainConfig": {"seed", "eval_every", "checkpoint_every"},
}


@pytest.mark.parametrize("section", sorted(_ZERO_OK))
def test_config_int_and_bool_fields_are_checked(section):
    import engram_jax.config as config_mod

    cls = getattr(config_mod, section)
    base = cls()
    for f in dataclasses.fields(cls):
        value = getattr(base, f.name)
        if isinstance(value, bool):
            bad = [1, "yes"]
        elif isinstance(value, int) and f.name != "pad_id":
            bad = [-1, 2.0, True] + ([] if f.name in _ZERO_OK[section] else [0])
        else:
            continue
        for v in bad:
            with pytest.raises(ValueError, match=rf"^{section}\.{f.name}="):
                dataclasses.replace(base, **{f.name: v})
