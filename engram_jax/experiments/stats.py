"""Statistics shared by the studies: per-point means, paired differences over seeds, the
log-linear fit, learning curves from the runs' logs, the figures and the Markdown of
``summary.md``.

Paired design: within a seed every point sees the same data order and the same evaluation
batches, so a difference between two points is measured per seed; its standard error is
``std(d_s, ddof=1) / sqrt(n)`` over the seeds s present in both (0 with one seed).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from engram_jax.sweep import PARAM_COLUMNS, POINT_LABELS


def ok_rows(rows) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok" and r.get("val_loss") not in ("", None)]


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def losses_by_seed(rows, point: str) -> dict[int, float]:
    return {int(r["seed"]): float(r["val_loss"]) for r in ok_rows(rows) if r["point"] == point}


def paired(rows, a: str, b: str) -> dict:
    """``loss(a) - loss(b)`` per shared seed: ``{mean, se, n}`` (se 0 for one seed)."""
    la, lb = losses_by_seed(rows, a), losses_by_seed(rows, b)
    d = np.array([la[s] - lb[s] for s in sorted(set(la) & set(lb))])
    if not len(d):
        return {"mean": None, "se": None, "n": 0}
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    return {"mean": float(d.mean()), "se": se, "n": int(len(d))}


LABELS = (*POINT_LABELS, *PARAM_COLUMNS)


def group(rows) -> list[dict]:
    """Per point, in first-seen order: its labels, seeds, val/train loss mean and std."""
    order, by = [], {}
    for r in ok_rows(rows):
        by.setdefault(r["point"], []).append(r)
        if r["point"] not in order:
            order.append(r["point"])
    out = []
    for p in order:
        rs = by[p]
        val = np.array([float(r["val_loss"]) for r in rs])
        g = {k: _num(rs[0].get(k, "")) for k in LABELS}
        g.update(
            point=p,
            seeds=len(rs),
            val_loss_mean=float(val.mean()),
            val_loss_std=float(val.std(ddof=1)) if len(rs) > 1 else 0.0,
            train_loss_mean=float(np.mean([float(r["train_loss"]) for r in rs])),
            wall_s=float(np.sum([float(r["wall_s"] or 0) for r in rs])),
        )
        gates = [float(r["gate_mean"]) for r in rs if r.get("gate_mean") not in ("", None)]
        g["gate_mean"] = float(np.mean(gates)) if gates else None
        out.append(g)
    return out


def base_summary(name: str, rows) -> dict:
    return {
        "study": name,
        "runs": len(rows),
        "ok": len(ok_rows(rows)),
        "failed": [r["name"] for r in rows if r.get("status") not in ("ok", "busy")],
        "busy": [r["name"] for r in rows if r.get("status") == "busy"],  # another process's
        "wall_s": float(sum(float(r["wall_s"] or 0) for r in rows if r.get("wall_s"))),
        "points": group(rows),
    }


def fit_log(x, y) -> dict:
    """Least squares ``y = a + b log10(x)``: ``{intercept, slope, r2, n}``."""
    lx = np.log10(np.asarray(x, np.float64))
    y = np.asarray(y, np.float64)
    if len(lx) < 2 or np.ptp(lx) == 0:
        raise ValueError("the fit needs at least two distinct x values")
    b, a = np.polyfit(lx, y, 1)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum((y - (a + b * lx)) ** 2)) / ss_tot if ss_tot > 0 else 1.0
    return {"intercept": float(a), "slope": float(b), "r2": r2, "n": int(len(lx))}


def errorbar_figure(path: str, series: dict, *, xlabel: str, ylabel: str, title: str,
                    logx: bool = False, bars: bool = False) -> str:  # fmt: skip
    """One PNG: ``series = {label: (xs, ys, yerr)}`` (lines with error bars, or bars with
    ``bars=True`` where xs are tick labels). Returns the file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (label, (xs, ys, err)) in enumerate(series.items()):
        if bars:
            ax.bar(range(len(xs)), ys, yerr=err, capsize=3, color=f"C{i}", label=label)
            ax.set_xticks(range(len(xs)), xs, rotation=45, ha="right")
        else:
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, label=label)
    ax.axhline(0.0, color="k", lw=0.8, ls="--")
    if logx:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.path.basename(path)


def md_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; floats as given (format them before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt_delta(d: dict) -> str:
    """A paired difference as ``-0.1381 +- 0.0123 (11.2 SE)``; ``-`` without data; one seed
    has no standard error: ``-0.1381 (n=1, no SE)``."""
    if not d or d.get("mean") is None:
        return "-"
    if d["mean"] == 0 and d["se"] == 0:  # a point against itself
        return "0 (reference)"
    if d["n"] < 2:
        return f"{d['mean']:+.4f} (n=1, no SE)"
    text = f"{d['mean']:+.4f} +- {d['se']:.4f}"
    if d["se"] <= 1e-9 * abs(d["mean"]):  # no spread over seeds (or one seed)
        return text + f" (n={d['n']})"
    return text + f" ({abs(d['mean']) / d['se']:.1f} SE)"


def seed_losses(rows, point: str) -> str:
    """The point's validation loss per seed, ``2.8042 / 2.8098`` in seed order."""
    by = losses_by_seed(rows, point)
    return " / ".join(f"{by[s]:.4f}" for s in sorted(by))


def met(flag) -> str:
    return "**met**" if flag else "**not met**"


def runs_line(summary: dict) -> str:
    failed, busy = summary.get("failed") or [], summary.get("busy") or []
    return (
        f"{summary['ok']} of {summary['runs']} runs ok"
        + (f" (failed: {', '.join(failed)})" if failed else "")
        + (f" (in progress in another sweep process: {', '.join(busy)})" if busy else "")
        + f"; total wall time {summary['wall_s']:,.0f} s ({summary['wall_s'] / 3600:.1f} h)."
    )


def _series(out: str, run: str, key: str) -> dict[int, float]:
    """A run's training log ``out/runs/<run>/metrics.jsonl`` as ``{step: value}``; key
    ``"gate"`` is the mean of the Engram gates (``engram_gate_<layer>``) at each step, empty
    for a run whose config has no gate (OverEncoding, ``no_gating``: runs before the model
    stopped reporting their alpha = 1 logged it as a gate)."""
    path = os.path.join(out, "runs", run, "metrics.jsonl")
    if not os.path.exists(path) or (key == "gate" and not _gated(out, run)):
        return {}
    series = {}
    with open(path, encoding="utf-8") as f:
        for rec in map(json.loads, f):
            if "loss" not in rec:  # the evaluation record
                continue
            if key == "gate":
                gates = [v for k, v in rec.items() if k.startswith("engram_gate_")]
                if gates:
                    series[rec["step"]] = float(np.mean(gates))
            elif key in rec:
                series[rec["step"]] = float(rec[key])
    return series


def _gated(out: str, run: str) -> bool:
    path = os.path.join(out, "runs", run, "config.json")
    if not os.path.exists(path):
        return True
    with open(path, encoding="utf-8") as f:
        return bool(json.load(f).get("engram", {}).get("use_gating", True))


def curve(out: str, rows, point: str, key: str, minus: str | None = None, smooth: int = 5):
    """Seed mean of a logged metric of ``point`` over training, ``(steps, values)``; with
    ``minus``, paired per seed: ``point - minus`` at the same steps (the same batches, so batch
    noise cancels). A running mean over ``smooth`` logs; ``None`` without logs."""
    per_seed = []
    for r in ok_rows(rows):
        if r["point"] != point:
            continue
        a = _series(out, r["name"], key)
        b = _series(out, r["name"].replace(point, minus, 1), key) if minus else {}
        steps = sorted(set(a) & set(b)) if minus else sorted(a)
        if steps:
            per_seed.append({s: a[s] - (b[s] if minus else 0.0) for s in steps})
    if not per_seed:
        return None
    steps = sorted(set.intersection(*(set(d) for d in per_seed)))
    y = np.mean([[d[s] for s in steps] for d in per_seed], axis=0)
    k = max(1, min(smooth, len(y)))
    y = np.convolve(y, np.ones(k) / k, mode="valid")
    return np.asarray(steps[k - 1 :]), y


def over_training(rows, out: str, labels: dict, ref: str, ref_label: str) -> dict:
    """Learning curves of the points ``labels`` (point -> label): each one's training loss
    minus ``ref``'s (paired per seed) and its mean Engram gate, as :func:`curve` gives them.
    ``{"ref": ref_label, "loss": {label: (steps, values)}, "gate": {...}}``."""
    loss, gate = {}, {}
    for point, label in labels.items():
        if point != ref and (c := curve(out, rows, point, "loss", ref)) is not None:
            loss[label] = c
        if (c := curve(out, rows, point, "gate")) is not None:
            gate[label] = c
    return {"ref": ref_label, "labels": list(labels.values()), "loss": loss, "gate": gate}


def curves_table(curves: dict, label_header: str, figure: str) -> str:
    """Markdown: per point, the lowest paired training-loss difference to the reference (and
    its step) and the last one; the gate's peak (and step) and last value."""
    rows = []
    for label in curves["labels"]:
        row = [label, "-", "-", "-", "-"]
        if label == curves["ref"]:
            row[1] = "reference"
        elif label in curves["loss"]:
            steps, d = curves["loss"][label]
            i = int(d.argmin())
            row[1:3] = [f"{d[i]:+.3f} at step {steps[i]}", f"{d[-1]:+.3f}"]
        if label in curves["gate"]:
            gs, g = curves["gate"][label]
            j = int(g.argmax())
            row[3:] = [f"{g[j]:.3f} at step {gs[j]}", f"{g[-1]:.3f}"]
        if row[1:] != ["-"] * 4:
            rows.append(row)
    if not curves["loss"]:
        return ""
    header = [label_header, f"train loss - {curves['ref']}: lowest", "at the end"]
    return (
        f"Over training (seed means, paired per seed, running mean of 5 logs; {figure}):\n\n"
        + md_table(header + ["mean gate: peak", "at the end"], rows)
        + "\n\n"
    )


def curves_figure(path: str, curves: dict, *, title: str) -> list[str]:
    """One PNG with the two panels of :func:`over_training`; ``[file name]``, or ``[]`` when
    no run has logs."""
    if not curves["loss"]:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"train loss - train loss({curves['ref']})", curves["loss"])]
    if curves["gate"]:
        panels.append(("mean Engram gate", curves["gate"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    colors = plt.get_cmap("tab10" if len(curves["labels"]) <= 10 else "tab20")
    for ax, (ylabel, series) in zip(axes[0], panels):
        for label, (xs, ys) in series.items():  # one color per point in both panels
            ax.plot(xs, ys, label=label, color=colors(curves["labels"].index(label) % 20))
        ax.set(xlabel="step", ylabel=ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title} (seed means, running mean of 5 logs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [os.path.basename(path)]
