"""Studies: every registered study builds its configs from any preset; rho holds P_tot and turns
only experts and slots; slots pair Engram and OverEncoding; the 2-layer ablation reference;
the pre-registered criteria on rows with a known answer; the runner's resume, failure and
lock handling (no training: a fake ``train`` writes what the real one writes)."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest

from engram_jax.cli import build_parser
from engram_jax.config import Config
from engram_jax.experiments import (
    STUDIES,
    Point,
    ablations,
    base_config,
    get_study,
    rho,
    slots,
    slots_of,
    stats,
)
from engram_jax.params import count_params
from engram_jax.presets import get_preset
from engram_jax.sweep import finish, read_csv, run_sweep, write_csv

TOY = base_config("toy")
BASES = [TOY, get_preset("tiny")]


def _cli(*argv):
    return build_parser().parse_args(["sweep", *argv])


@pytest.mark.parametrize("base", BASES, ids=lambda c: c.name)
def test_every_registered_study_builds_configs(base):
    from engram_jax.commands.sweep import build_points

    for name in STUDIES:
        mod = get_study(name)
        assert mod.__name__.endswith(f".{name}") and "engram-jax sweep " + name in mod.__doc__
        args = _cli(name, "--preset", base.name, "--steps", "5")
        points = build_points(args)
        assert points and len({p.name for p in points}) == len(points)
        for p in points:
            assert isinstance(p.cfg, Config) and p.cfg.train.steps == 5
            count_params(p.cfg)


def _without(cfg: Config, *keys) -> dict:
    d = cfg.to_dict()
    d.pop("name")
    for k in keys:
        sec, field = k.split(".")
        d[sec].pop(field)
    return d


@pytest.mark.parametrize("base", BASES, ids=lambda c: c.name)
def test_rho_holds_p_tot_and_turns_only_experts_and_slots(base):
    rhos = (1.0, 0.8, 0.6, 0.4, 0.25, 0.15)
    p_tot, p_act = rho.budget(base)
    points = rho.sweep(base, rhos)
    ref = _without(
        points[0].cfg, "moe.n_routed_experts", "engram.engram_vocab_size", "engram.layer_ids"
    )
    experts = []
    for r, p in zip(rhos, points):
        c = count_params(p.cfg)
        assert abs(c["total"] - p_tot) <= 0.02 * p_tot, (r, c["total"], p_tot)
        assert p.cfg.model.dense_hidden == base.model.dense_hidden  # no third knob
        keys = ("moe.n_routed_experts", "engram.engram_vocab_size", "engram.layer_ids")
        assert _without(p.cfg, *keys) == ref
        assert p.labels["p_act_vs_moe"] == round(c["activated"] / p_act, 4)  # reported
        quantum = 1 / (base.moe.n_routed_experts - base.moe.top_k)  # whole experts
        assert abs(p.labels["rho_actual"] - r) < quantum + 0.02, (r, p.labels)
        experts.append(p.cfg.moe.n_routed_experts)
    assert experts == sorted(experts, reverse=True) and not points[0].cfg.engram.enabled
    strict = rho.sweep(base, (1.0, 0.4), strict_p_act=True)
    assert abs(count_params(strict[1].cfg)["activated"] - p_act) <= 0.02 * p_act
    assert strict[1].cfg.model.dense_hidden != base.model.dense_hidden
    with pytest.raises(ValueError, match="rho"):
        rho.allocate(base, 0.0, p_tot)


def test_slots_pair_engram_and_overencoding_over_two_decades():
    points = slots.sweep(TOY)
    kinds = {k: [p for p in points if p.labels["kind"] == k] for k in slots.KINDS}
    assert [p.name.split("-")[1] for p in kinds["engram"]] == [
        p.name.split("-")[1] for p in kinds["overencoding"]
    ]
    counts = [p.labels["slots"] for p in kinds["engram"]]
    assert len(counts) >= 5 and math.log10(max(counts) / min(counts)) >= 2 - 1e-3
    e = TOY.engram
    for p in points:
        n = int(p.name.split("slots")[1])
        assert abs(p.labels["slots"] / n - 1) < 0.05
        assert p.labels["slots"] == slots_of(p.cfg)
        assert p.labels["slots_dmem"] == p.labels["slots"] * e.d_head // e.d_mem
        tokens = p.cfg.train.steps * p.cfg.train.batch_size * p.cfg.train.seq_len
        lookups = tokens * e.n_hash_heads * len(p.cfg.engram.layer_ids)
        assert p.labels["reads_per_row"] == pytest.approx(lookups / p.labels["slots"], abs=0.051)
    for p in kinds["engram"]:
        assert _without(p.cfg, "engram.engram_vocab_size") == _without(
            TOY, "engram.engram_vocab_size"
        )
    oe = kinds["overencoding"][0].cfg.engram
    assert oe.layer_ids == (0,) and not (oe.use_gating or oe.use_short_conv or oe.multi_branch)


def test_fit_recovers_a_known_slope():
    rng = np.random.default_rng(0)
    x = np.array([1e4, 3e4, 1e5, 3e5, 1e6])
    y = 4.0 - 0.05 * np.log10(x) + rng.normal(0, 1e-4, x.shape)
    fit = stats.fit_log(x, y)
    assert fit["slope"] == pytest.approx(-0.05, abs=2e-3) and fit["r2"] > 0.99
    with pytest.raises(ValueError):
        stats.fit_log([1e4, 1e4], [1.0, 2.0])


def test_ablations_reference_is_the_papers_two_layer_engram():
    v = ablations.variants(TOY)
    assert v["reference"].engram.layer_ids == (1, 2)  # 4 blocks: 0-based 1 and round(5*4/12)
    assert v["one_layer"].engram.layer_ids == (1,)
    total = slots_of(TOY)
    for name in ("reference", "one_layer", "ngram4", "overencoding", "layer0", "no_multi_branch"):
        assert abs(slots_of(v[name]) / total - 1) < 0.01, name
    ref_rows = v["reference"].engram.engram_vocab_size[0]
    split = len(TOY.engram.layer_ids) / 2  # a 1-layer base's memory is split over 2 layers
    assert abs(ref_rows / TOY.engram.engram_vocab_size[0] - split) < 0.03
    for name in ("no_gating", "no_compression", "no_short_conv", "no_multi_branch", "rows_min"):
        assert v[name].engram.layer_ids == (1, 2), name
    heads = 2 * TOY.engram.n_hash_heads
    assert slots_of(v["rows_min"]) < 30 * heads and slots_of(v["rows_64"]) < 120 * heads
    assert not v["no_multi_branch"].engram.multi_branch and not v["moe"].engram.enabled
    assert ablations.reference_layers(get_preset("small")) == (1, 4)  # two layers given: kept
    with pytest.raises(ValueError, match="unknown"):
        ablations.sweep(TOY, ["nope"])


# ---------------------------------------------------------------------------------------------
# Criteria on rows with a known answer


def _rows(losses: dict) -> list[dict]:
    """``{point: [loss per seed]}`` -> result rows."""
    out = []
    for point, ls in losses.items():
        for seed, loss in enumerate(ls):
            r = {"name": f"{point}-s{seed}", "point": point, "seed": seed, "status": "ok"}
            r.update(val_loss=loss, train_loss=loss, wall_s=1.0)
            r["rho"] = float(point[3:]) if point.startswith("rho") else ""
            r["rho_actual"] = r["rho"]
            out.append(r)
    return out


def test_paired_difference_and_its_standard_error():
    rows = _rows({"a": [1.0, 2.0, 3.5], "b": [0.5, 1.0, 3.0]})
    d = stats.paired(rows, "a", "b")  # differences 0.5, 1.0, 0.5
    assert d["mean"] == pytest.approx(2 / 3) and d["n"] == 3
    assert d["se"] == pytest.approx(np.std([0.5, 1.0, 0.5], ddof=1) / math.sqrt(3))
    assert "SE)" in stats.fmt_delta(d)
    one = stats.paired(_rows({"a": [1.0], "b": [0.5]}), "a", "b")  # one seed: no SE to show
    assert one["n"] == 1 and stats.fmt_delta(one) == "+0.5000 (n=1, no SE)"


def test_u_curve_criterion():
    seed_shift = [0.0, 0.3, -0.2]  # big seed effects cancel in paired differences
    u = {
        f"rho{r}": [base + s for s in seed_shift]
        for r, base in ((1.0, 3.50), (0.6, 3.40), (0.15, 3.45))
    }
    u["rho0.6"][1] += 0.004
    s = rho.summarize(_rows(u))
    assert s["u_curve"] and s["best_rho"] == 0.6
    assert s["best_minus_rho_max"]["mean"] == pytest.approx(-0.1 + 0.004 / 3)
    noisy = dict(u, **{"rho0.15": [3.41, 3.69, 3.19]})  # within noise of the best at one end
    assert not rho.summarize(_rows(noisy))["u_curve"]
    edge = dict(u, **{"rho0.15": [x - 0.2 for x in u["rho0.15"]]})  # best at the smallest rho
    assert not rho.summarize(_rows(edge))["u_curve"]


def test_power_law_and_ablation_criteria():
    rows = []
    for kind, slope in (("engram", -0.03), ("overencoding", -0.001)):
        for n in (4000, 40000, 400000):
            for seed in (0, 1):
                loss = 3.5 + slope * math.log10(n) + 0.01 * seed + (0.002 if n == 40000 else 0)
                rows.append(dict(name=f"{kind}-slots{n}-s{seed}", point=f"{kind}-slots{n}",
                                 seed=seed, status="ok", val_loss=loss, train_loss=loss,
                                 wall_s=1.0, kind=kind, slots=n, reads_per_row=100))  # fmt: skip
    s = slots.summarize(rows)
    assert s["fit_engram"]["power_law"] and s["fit_engram"]["slope"] == pytest.approx(-0.03)
    assert not s["fit_overencoding"]["power_law"]  # R^2 < 0.9: the bump dominates
    assert s["engram_minus_overencoding"]["slots4000"]["mean"] == pytest.approx(-0.029 * 3.60206)
    two = slots.summarize([r for r in rows if r["slots"] != 40000])  # R^2 = 1 by construction
    assert two["fit_engram"]["r2"] == pytest.approx(1.0) and not two["fit_engram"]["power_law"]
    a = ablations.summarize(_rows({"reference": [3.0, 3.2], "no_gating": [3.1, 3.31],
                                   "moe": [3.0, 3.5]}))  # fmt: skip
    assert a["beyond_2se"] == ["no_gating"]  # +0.1, +0.11: SE 0.005; moe: +0 and +0.3


# ---------------------------------------------------------------------------------------------
# The runner


def _fake_train(calls, fail=()):
    def train(cfg, workdir, progress=False):
        calls.append(workdir)
        if os.path.basename(workdir) in fail:
            raise RuntimeError("boom")
        assert os.path.isdir(os.path.join(workdir, "data"))  # shared data link
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f)
        loss = 3.0 + 0.1 * cfg.train.seed + 1e-6 * count_params(cfg)["engram"]
        s = dict(status="ok", train_loss=loss, val_loss=loss, tokens=10, wall_s=1.0, compile_s=0.5)
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:  # as train() logs gates
            for step, g in ((1, 0.5), (2, 0.25 + 0.1 * cfg.train.seed)):
                rec = {"step": step, "loss": loss}
                rec.update({f"engram_gate_{i}": g + 0.1 * i for i in cfg.engram.layer_ids})
                f.write(json.dumps(rec) + "\n")
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(s, f)
        return s

    return train


def test_runner_skips_finished_runs_and_survives_a_failure(tmp_path):
    out = str(tmp_path / "sweep")
    points = slots.sweep(TOY, (1e4, 4e4, 1.6e5), ("engram",))
    calls, logs = [], []
    fail = {"engram-slots40000-s1"}
    rows = run_sweep(
        "slots", points, out, seeds=(0, 1), log=logs.append, train_fn=_fake_train(calls, fail)
    )
    assert len(calls) == 6 and len(rows) == 6
    bad = [r for r in rows if r["status"] != "ok"]
    assert [r["name"] for r in bad] == ["engram-slots40000-s1"] and "boom" in bad[0]["error"]
    csv_rows = read_csv(os.path.join(out, "results.csv"))
    assert [r["name"] for r in csv_rows] == [r["name"] for r in rows]
    for key in ("slots", "slots_dmem", "reads_per_row", "seed", "val_loss", "activated_params",
                "eval_tokens", "wall_s", "status", "error"):  # fmt: skip
        assert key in csv_rows[0]
    calls.clear()
    rows = run_sweep(
        "slots", points, out, seeds=(0, 1), log=logs.append, train_fn=_fake_train(calls)
    )
    assert [os.path.basename(c) for c in calls] == ["engram-slots40000-s1"]  # only the failed one
    layers = points[0].cfg.engram.layer_ids  # gates at the last logged step, mean over layers
    want = {s: round(0.25 + 0.1 * s + 0.1 * sum(layers) / len(layers), 4) for s in (0, 1)}
    assert [r["gate_mean"] for r in rows] == [want[int(r["seed"])] for r in rows]
    summary = finish("slots", read_csv(os.path.join(out, "results.csv")), out)
    assert summary["fit_engram"]["n"] == 3 and summary["fit_engram"]["decades"] > 1.1
    assert summary["wall_s"] == 6.0
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["figures"] == ["slots.png", "slots_curves.png"]
    assert os.path.exists(os.path.join(out, "slots.png"))


def test_runner_leaves_runs_claimed_by_a_live_process(tmp_path):
    import subprocess
    import sys

    out = str(tmp_path / "sweep")
    points = slots.sweep(TOY, (1e4, 4e4), ("engram",))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    for name, pid in (("engram-slots10000-s0", os.getpid()), ("engram-slots40000-s0", dead)):
        os.makedirs(os.path.join(out, "runs", name))
        with open(os.path.join(out, "runs", name, ".sweep.lock"), "w") as f:
            f.write(str(pid))
    calls = []
    rows = run_sweep("slots", points, out, train_fn=_fake_train(calls), log=lambda s: None)
    assert [r["status"] for r in rows] == ["busy", "ok"]  # live lock kept, stale one taken
    assert [os.path.basename(c) for c in calls] == ["engram-slots40000-s0"]


def test_bad_input_stops_the_sweep_with_its_error(tmp_path, capsys):
    # a corpus every run shares that cannot train: one line, exit 2, not a traceback per run
    from engram_jax.cli import main

    text = tmp_path / "small.txt"
    text.write_text("\n".join(f"line {i} of a small text" for i in range(200)), encoding="utf-8")
    out = str(tmp_path / "sw")
    args = ["sweep", "rho", "--rhos", "1,0.5", "--seeds", "1", "--steps", "2"]
    assert main([*args, "--data", str(text), "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.vocab_size=" in err[0], err


def test_rows_of_runs_another_process_finished_are_filled_in(tmp_path):
    # two sweep processes share one --out: each writes results.csv with the other's runs as
    # "busy"; whichever writes last, and --report, must record every run finished by then
    from engram_jax.cli import main

    out = str(tmp_path / "sweep")
    points = slots.sweep(TOY, (1e4, 4e4), ("engram",))
    first, second = (f"{p.name}-s0" for p in points)
    os.makedirs(os.path.join(out, "runs", first, "data"))
    with open(os.path.join(out, "runs", first, ".sweep.lock"), "w") as f:
        f.write(str(os.getpid()))  # a live process holds the first run
    other = _fake_train([])

    def train(cfg, workdir, progress=False):  # the other process finishes meanwhile
        os.remove(os.path.join(out, "runs", first, ".sweep.lock"))
        other(points[0].cfg, os.path.join(out, "runs", first))
        return other(cfg, workdir)

    rows = run_sweep("slots", points, out, train_fn=train, log=lambda s: None)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[0]["val_loss"] == pytest.approx(3.0 + 1e-6 * count_params(points[0].cfg)["engram"])
    # --report fills in a run that finished after the last write
    csv_path = os.path.join(out, "results.csv")
    rows[1].update(status="busy", val_loss="", error="busy: another sweep process")
    write_csv(rows, csv_path)
    assert main(["sweep", "slots", "--report", "--out", out]) == 0
    assert [r["status"] for r in read_csv(csv_path)] == ["ok", "ok"]
    # a run still in progress elsewhere is not a failure
    os.remove(os.path.join(out, "runs", second, "summary.json"))
    write_csv(rows, csv_path)
    assert main(["sweep", "slots", "--report", "--out", out]) == 0
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    assert (s["ok"], s["failed"], s["busy"]) == (1, [], [second])


def test_runner_retrains_when_the_config_changed(tmp_path):
    out = str(tmp_path / "sweep")
    p = ablations.sweep(TOY, ["reference"])
    calls = []
    run_sweep("ablations", p, out, train_fn=_fake_train(calls), log=lambda s: None)
    cfg = dataclasses.replace(p[0].cfg, train=dataclasses.replace(p[0].cfg.train, steps=7))
    run_sweep("ablations", [Point(p[0].name, cfg, p[0].labels)], out, train_fn=_fake_train(calls),
              log=lambda s: None)  # fmt: skip
    assert len(calls) == 2


@pytest.mark.parametrize("study", STUDIES)
def test_summaries_and_figures_of_every_study(tmp_path, study):
    from engram_jax.commands.sweep import build_points

    grid = {"rho": ["--rhos", "1,0.6,0.2"], "slots": ["--slots", "1e4,1e5"],
            "ablations": ["--only", "reference,moe,no_gating"]}[study]  # fmt: skip
    out = str(tmp_path / study)
    points = build_points(_cli(study, *grid, "--out", out))
    rows = run_sweep(study, points, out, seeds=(0, 1), train_fn=_fake_train([]), log=lambda s: None)
    s = finish(study, rows, out)
    assert s["ok"] == len(rows) and len(s["points"]) == len(points)
    assert s["figures"] and all(os.path.exists(os.path.join(out, f)) for f in s["figures"])
    # summary.md: a table row per point holding its per-seed losses (the fake train's), and
    # the pre-registered criterion's verdict where the study has one
    with open(os.path.join(out, "summary.md")) as f:
        md = f.read()
    for p in points:
        want = " / ".join(f"{r['val_loss']:.4f}" for r in rows if r["point"] == p.name)
        assert any(line.startswith("|") and want in line for line in md.splitlines()), p.name
    verdict = {"rho": s.get("u_curve"), "slots": s.get("fit_engram", {}).get("power_law")}
    if study in verdict:
        assert ("**met**" if verdict[study] else "**not met**") in md


def test_report_rewrites_the_summaries_without_training(tmp_path, capsys):
    from engram_jax.cli import main

    out = str(tmp_path / "rho")
    points = rho.sweep(TOY, (1.0, 0.5))
    rows = run_sweep("rho", points, out, seeds=(0, 1), train_fn=_fake_train([]), log=print)
    finish("rho", rows, out)
    before = {f: open(os.path.join(out, f)).read() for f in ("summary.json", "summary.md")}
    for f in ("summary.json", "summary.md", "rho.png"):
        os.remove(os.path.join(out, f))
    assert main(["sweep", "rho", "--report", "--out", out]) == 0
    assert {f: open(os.path.join(out, f)).read() for f in before} == before
    assert os.path.exists(os.path.join(out, "rho.png"))
    # nothing to report on: one line naming what to do, exit 2, nothing written
    capsys.readouterr()
    empty = str(tmp_path / "none")
    assert main(["sweep", "slots", "--report", "--out", empty]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "results.csv" in err and not os.path.exists(empty)
    assert main(["sweep", "slots", "--report", "--out", out]) == 2  # rho's runs, not slots'


def test_gate_curves_only_for_runs_that_have_a_gate(tmp_path):
    # the fake run logs engram_gate_* for every Engram layer, gated or not, as runs from
    # before the model stopped reporting alpha = 1 did; the run's own config decides
    out = str(tmp_path / "slots")
    points = slots.sweep(TOY, (1e4,))
    rows = run_sweep("slots", points, out, seeds=(0,), train_fn=_fake_train([]), log=print)
    kinds = {p.name.split("-")[0]: p.name for p in points}
    assert stats.curve(out, rows, kinds["engram"], "gate", smooth=1) is not None
    assert stats.curve(out, rows, kinds["overencoding"], "gate", smooth=1) is None
    assert stats.curve(out, rows, kinds["overencoding"], "loss", smooth=1) is not None


def test_cli_options_reach_the_configs():
    from engram_jax.commands.sweep import build_points

    args = _cli("rho", "--rhos", "1,0.5", "--steps", "3", "--set", "train.batch_size=4")
    assert args.out == "experiments/results/rho" and args.seeds == 2
    pts = build_points(args)
    assert [p.labels["rho"] for p in pts] == [1.0, 0.5]
    t = pts[0].cfg.train
    assert t.steps == t.eval_every == 3 and t.eval_batches * 4 * t.seq_len >= 65_536
    args = _cli("ablations", "--only", "moe,reference", "--preset", "tiny", "--eval-tokens", "10")
    assert {p.name for p in build_points(args)} == {"moe", "reference"}


def test_learning_curves_are_paired_per_seed(tmp_path):
    out = str(tmp_path / "rho")
    points = rho.sweep(TOY, (1.0, 0.5))
    rows = run_sweep("rho", points, out, seeds=(0, 1), train_fn=_fake_train([]), log=print)
    top, half = points[0], points[1]
    # the fake run logs loss 3 + 0.1 seed + 1e-6 engram params at steps 1 and 2: the seed
    # term cancels in the paired difference
    want = 1e-6 * (count_params(half.cfg)["engram"] - count_params(top.cfg)["engram"])
    steps, d = stats.curve(out, rows, half.name, "loss", top.name, smooth=1)
    assert list(steps) == [1, 2] and d == pytest.approx([want, want])
    # gates: 0.5 at step 1, then 0.25 + 0.1 seed (seed mean 0.3), + 0.1 x the mean layer id
    layers = half.cfg.engram.layer_ids
    steps, gate = stats.curve(out, rows, half.name, "gate", smooth=1)
    assert gate == pytest.approx(np.array([0.5, 0.3]) + 0.1 * np.mean(layers))
    assert stats.curve(out, rows, top.name, "gate") is None  # pure MoE: no gates logged
    assert "rho_curves.png" in finish("rho", rows, out)["figures"]
    with open(os.path.join(out, "summary.md")) as f:
        md = f.read()  # gap and gate peak of the rho 0.5 point, running mean of the 2 logs
    assert f"| {want:+.3f} at step 2 | {want:+.3f} |" in md
    assert f"| {0.4 + 0.1 * np.mean(layers):.3f} at step 2 |" in md
