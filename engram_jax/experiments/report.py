"""Summaries of a study's result rows (pure): per-point mean/std, the best rho against pure
MoE, the log-slots fit, ablation deltas against the reference. Used by the runner for
``summary.json`` and by the figures."""

from __future__ import annotations

import math

import numpy as np

from engram_jax.experiments.memory_scaling import fit_log_slots


def _ok(rows):
    return [r for r in rows if r.get("status") == "ok" and r.get("val_loss") not in ("", None)]


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def group(rows) -> list[dict]:
    """Per point, in first-seen order: seeds, val/train loss mean and std (ddof 1; 0 for one
    seed), plus the point's labels."""
    order, by = [], {}
    for r in _ok(rows):
        if r["point"] not in by:
            order.append(r["point"])
            by[r["point"]] = []
        by[r["point"]].append(r)
    out = []
    for p in order:
        rs = by[p]
        val = np.array([float(r["val_loss"]) for r in rs])
        tr = np.array([float(r["train_loss"]) for r in rs])
        g = {
            k: _num(rs[0].get(k, ""))
            for k in (
                "rho",
                "rho_actual",
                "slots",
                "variant",
                "layer",
                "experts",
                "total_params",
                "activated_params",
                "engram_params",
            )
        }
        g.update(
            point=p,
            seeds=len(rs),
            val_loss_mean=float(val.mean()),
            val_loss_std=float(val.std(ddof=1)) if len(rs) > 1 else 0.0,
            train_loss_mean=float(tr.mean()),
        )
        out.append(g)
    return out


def summarize(study: str, rows) -> dict:
    groups = group(rows)
    s = {
        "study": study,
        "runs": len(rows),
        "ok": len(_ok(rows)),
        "failed": [r["name"] for r in rows if r.get("status") != "ok"],
        "points": groups,
    }
    if not groups:
        return s
    if study == "rho":
        best = min(groups, key=lambda g: g["val_loss_mean"])
        s["best_rho"], s["best_rho_actual"] = best["rho"], best["rho_actual"]
        s["best_val_loss"] = best["val_loss_mean"]
        moe = [g for g in groups if g["rho"] == 1.0]
        if moe:
            m = moe[0]
            gain = m["val_loss_mean"] - best["val_loss_mean"]
            se = math.sqrt(
                best["val_loss_std"] ** 2 / best["seeds"] + m["val_loss_std"] ** 2 / m["seeds"]
            )
            stds = [g["val_loss_std"] for g in groups if g["seeds"] > 1]
            s.update(
                moe_val_loss=m["val_loss_mean"],
                gain_vs_moe=gain,
                gain_se=se,
                mean_seed_std=float(np.mean(stds)) if stds else None,
                best_below_1_beyond_noise=bool(best["rho"] < 1.0 and gain > 2 * se and se > 0),
            )
    elif study == "slots":
        ok = _ok(rows)
        if len({r["slots"] for r in ok}) >= 2:
            s["fit"] = fit_log_slots(
                [float(r["slots"]) for r in ok], [float(r["val_loss"]) for r in ok]
            )
            s["fit_of_means"] = fit_log_slots(
                [g["slots"] for g in groups], [g["val_loss_mean"] for g in groups]
            )
        xs = [g["slots"] for g in groups]
        s["decades"] = math.log10(max(xs) / min(xs)) if min(xs) > 0 else None
    else:
        ref = {g["point"]: g["val_loss_mean"] for g in groups}
        if "reference" in ref:
            s["reference_val_loss"] = ref["reference"]
            s["delta_vs_reference"] = {k: v - ref["reference"] for k, v in ref.items()}
        if "moe" in ref:
            s["delta_vs_moe"] = {k: v - ref["moe"] for k, v in ref.items()}
    return s
