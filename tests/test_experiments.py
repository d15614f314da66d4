"""Experiments: every study builds its configs; allocation holds P_tot/P_act; the slot grid spans
>= 1.5 decades; the log-slots fit; the runner's restart and failure handling (no training: a
fake ``train`` writes what the real one writes)."""

import dataclasses
import importlib.util
import json
import math
import os

import numpy as np
import pytest

from engram_jax.cli import build_parser
from engram_jax.config import Config
from engram_jax.experiments import Point, ablations, allocation, memory_scaling, toy
from engram_jax.params import count_params
from engram_jax.presets import get_preset
from engram_jax.sweep import finish, read_csv, run_sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASES = [toy(), get_preset("tiny")]


@pytest.mark.parametrize("name", ["allocation", "memory_scaling", "ablations"])
def test_repo_experiment_files_reexport(name):
    path = os.path.join(REPO, "experiments", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert all(isinstance(p.cfg, Config) for p in mod.sweep(toy()))


@pytest.mark.parametrize("base", BASES, ids=lambda c: c.name)
def test_every_study_builds_configs(base):
    for points in (allocation.sweep(base), memory_scaling.sweep(base), ablations.sweep(base)):
        assert points and len({p.name for p in points}) == len(points)
        for p in points:
            assert isinstance(p.cfg, Config)
            count_params(p.cfg)


def _without_layout(cfg: Config) -> dict:
    d = cfg.to_dict()
    d.pop("name")
    d["moe"].pop("n_routed_experts")
    d["model"].pop("dense_hidden")
    for k in ("engram_vocab_size", "layer_ids"):
        d["engram"].pop(k)
    return d


@pytest.mark.parametrize("base", BASES, ids=lambda c: c.name)
def test_allocation_is_iso_parameter_and_changes_only_the_layout(base):
    rhos = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
    p_tot, p_act = allocation.budget(base)
    points = allocation.sweep(base, rhos)
    for rho, p in zip(rhos, points):
        c = count_params(p.cfg)
        assert abs(c["total"] - p_tot) <= 0.02 * p_tot, (rho, c["total"], p_tot)
        assert abs(c["activated"] - p_act) <= 0.02 * p_act, (rho, c["activated"], p_act)
        step = 1 / (base.moe.n_routed_experts - base.moe.top_k)  # rho moves by whole experts
        assert abs(c["rho"] - rho) <= step / 2 + 0.01, (rho, c["rho"])
        assert _without_layout(p.cfg) == _without_layout(base)
        assert p.cfg.engram.enabled == (rho < 1.0)
        if rho < 1.0:
            assert p.cfg.engram.layer_ids == base.engram.layer_ids
    assert points[0].cfg.moe.n_routed_experts == base.moe.n_routed_experts  # rho=1: the base
    assert points[0].cfg.model.dense_hidden == base.model.dense_hidden
    experts = [p.cfg.moe.n_routed_experts for p in points]
    assert experts == sorted(experts, reverse=True)


def test_allocation_with_explicit_budget_and_bad_rho():
    base = toy()
    p_tot, p_act = allocation.budget(base)
    for p in allocation.sweep(base, (1.0, 0.6), p_tot=int(p_tot * 1.3)):
        assert abs(count_params(p.cfg)["total"] - 1.3 * p_tot) <= 0.02 * 1.3 * p_tot
        assert abs(count_params(p.cfg)["activated"] - p_act) <= 0.02 * p_act
    with pytest.raises(ValueError, match="rho"):
        allocation.allocate(base, 0.0, p_tot, p_act)


def test_memory_scaling_grid_spans_decades_and_changes_only_tables():
    points = memory_scaling.sweep(toy())
    slots = [p.labels["slots"] for p in points]
    assert len(slots) >= 4 and math.log10(max(slots) / min(slots)) >= 1.5
    assert slots == sorted(slots)
    for p in points:
        assert abs(p.labels["slots"] / int(p.name[5:]) - 1) < 0.05
        a, b = p.cfg.to_dict(), toy().to_dict()
        for d in (a, b):
            d.pop("name")
            d["engram"].pop("engram_vocab_size")
        assert a == b


def test_fit_recovers_a_known_slope():
    rng = np.random.default_rng(0)
    slots = np.array([1e4, 3e4, 1e5, 3e5, 1e6])
    loss = 4.0 - 0.05 * np.log10(slots) + rng.normal(0, 1e-4, slots.shape)
    fit = memory_scaling.fit_log_slots(slots, loss)
    assert fit["slope"] == pytest.approx(-0.05, abs=2e-3)
    assert fit["intercept"] == pytest.approx(4.0, abs=1e-2)
    assert fit["r2"] > 0.99
    with pytest.raises(ValueError):
        memory_scaling.fit_log_slots([1e4, 1e4], [1.0, 2.0])


def test_ablation_variants():
    base = toy()
    v = ablations.variants(base)
    assert {
        "reference",
        "no_gating",
        "no_compression",
        "no_short_conv",
        "no_multi_branch",
        "ngram4",
        "moe",
        "overencoding",
        "layer0",
        "layer2",
        "layer3",
    } <= set(v)
    assert not v["no_gating"].engram.use_gating and not v["moe"].engram.enabled
    ref_slots = memory_scaling.slots_of(base)
    for name in ("ngram4", "overencoding", "layer0"):
        assert abs(memory_scaling.slots_of(v[name]) / ref_slots - 1) < 0.01, name
    assert v["ngram4"].engram.max_ngram_size == 4
    oe = v["overencoding"].engram
    assert oe.layer_ids == (0,) and not (oe.use_gating or oe.use_short_conv or oe.multi_branch)
    with pytest.raises(ValueError, match="unknown"):
        ablations.sweep(base, ["nope"])


def _fake_train(calls, fail=()):
    def train(cfg, workdir, progress=False):
        calls.append(workdir)
        if os.path.basename(workdir) in fail:
            raise RuntimeError("boom")
        assert os.path.isdir(os.path.join(workdir, "data"))  # shared data link
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f)
        loss = 3.0 + 0.1 * cfg.train.seed + 1e-6 * count_params(cfg)["engram"]
        s = {
            "status": "ok",
            "train_loss": loss,
            "val_loss": loss,
            "tokens": 10,
            "wall_s": 1.0,
            "compile_s": 0.5,
        }
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(s, f)
        return s

    return train


def test_runner_skips_finished_runs_and_survives_a_failure(tmp_path):
    out = str(tmp_path / "sweep")
    points = memory_scaling.sweep(toy(), (1e4, 4e4, 1.6e5))
    calls, logs = [], []
    rows = run_sweep(
        "slots",
        points,
        out,
        seeds=(0, 1),
        log=logs.append,
        train_fn=_fake_train(calls, fail={"slots40000-s1"}),
    )
    assert len(calls) == 6 and len(rows) == 6
    bad = [r for r in rows if r["status"] != "ok"]
    assert [r["name"] for r in bad] == ["slots40000-s1"] and "boom" in bad[0]["error"]
    csv_rows = read_csv(os.path.join(out, "results.csv"))
    assert [r["name"] for r in csv_rows] == [r["name"] for r in rows]
    for key in (
        "slots",
        "seed",
        "val_loss",
        "total_params",
        "activated_params",
        "engram_params",
        "train_loss",
        "tokens",
        "wall_s",
        "status",
        "error",
    ):
        assert key in csv_rows[0]
    calls.clear()
    rows = run_sweep(
        "slots", points, out, seeds=(0, 1), log=logs.append, train_fn=_fake_train(calls)
    )
    assert [os.path.basename(c) for c in calls] == ["slots40000-s1"]  # only the failed one
    assert all(r["status"] == "ok" for r in rows)
    summary = finish("slots", read_csv(os.path.join(out, "results.csv")), out)
    assert summary["fit"]["n"] == 6 and summary["decades"] > 1.1
    assert os.path.exists(os.path.join(out, "loss_vs_slots.png"))
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["figures"] == ["loss_vs_slots.png"]


def test_runner_leaves_runs_claimed_by_a_live_process(tmp_path):
    import subprocess
    import sys

    out = str(tmp_path / "sweep")
    points = memory_scaling.sweep(toy(), (1e4, 4e4))
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    for name, pid in (("slots10000-s0", os.getpid()), ("slots40000-s0", dead)):
        os.makedirs(os.path.join(out, "runs", name))
        with open(os.path.join(out, "runs", name, ".sweep.lock"), "w") as f:
            f.write(str(pid))
    calls = []
    rows = run_sweep("slots", points, out, train_fn=_fake_train(calls), log=lambda s: None)
    assert [r["status"] for r in rows] == ["busy", "ok"]  # live lock kept, stale one taken
    assert [os.path.basename(c) for c in calls] == ["slots40000-s0"]
    assert not os.path.exists(os.path.join(out, "runs", "slots40000-s0", ".sweep.lock"))


def test_runner_retrains_when_the_config_changed(tmp_path):
    out = str(tmp_path / "sweep")
    p = ablations.sweep(toy(), ["reference"])
    calls = []
    run_sweep("ablate", p, out, train_fn=_fake_train(calls), log=lambda s: None)
    changed = [
        Point(
            p[0].name,
            dataclasses.replace(p[0].cfg, train=dataclasses.replace(p[0].cfg.train, steps=7)),
            p[0].labels,
        )
    ]
    run_sweep("ablate", changed, out, train_fn=_fake_train(calls), log=lambda s: None)
    assert len(calls) == 2


@pytest.mark.parametrize("study", ["rho", "ablate"])
def test_summaries_and_figures(tmp_path, study):
    out = str(tmp_path / study)
    points = (
        allocation.sweep(toy(), (1.0, 0.8, 0.6))
        if study == "rho"
        else ablations.sweep(toy(), ["reference", "moe", "no_gating"])
    )
    rows = run_sweep(study, points, out, seeds=(0, 1), train_fn=_fake_train([]), log=lambda s: None)
    s = finish(study, rows, out)
    assert s["ok"] == len(rows) and len(s["points"]) == len(points)
    assert all(p["seeds"] == 2 and p["val_loss_std"] > 0 for p in s["points"])
    if study == "rho":
        assert s["best_rho"] == 1.0 and not s["best_below_1_beyond_noise"]  # fake: no Engram gain
        assert os.path.exists(os.path.join(out, "rho_ucurve.png"))
    else:
        assert s["delta_vs_reference"]["reference"] == 0.0 and "moe" in s["delta_vs_moe"]
        assert os.path.exists(os.path.join(out, "ablations.png"))


def test_cli_builds_the_sweeps():
    from engram_jax.commands.sweep import build_points

    parser = build_parser()
    args = parser.parse_args(
        [
            "sweep",
            "rho",
            "--rhos",
            "1,0.5",
            "--steps",
            "3",
            "--set",
            "train.batch_size=4",
            "--out",
            "x",
        ]
    )
    pts = build_points(args)
    assert [p.labels["rho"] for p in pts] == [1.0, 0.5]
    assert all(p.cfg.train.steps == 3 and p.cfg.train.eval_every == 3 for p in pts)
    args = parser.parse_args(["sweep", "slots", "--slots", "1e4,1e5", "--out", "x"])
    assert len(build_points(args)) == 2
    args = parser.parse_args(
        ["sweep", "ablate", "--only", "moe,reference", "--preset", "tiny", "--out", "x"]
    )
    assert {p.name for p in build_points(args)} == {"moe", "reference"}
