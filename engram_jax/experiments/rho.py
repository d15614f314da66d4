"""Sparsity allocation (ENGRAM_SPEC section 6, the U-curve): fixed P_tot, rho moves the sparse
budget between routed experts and Engram slots.

    engram-jax sweep rho --seeds 3 --steps 625 --set data.max_bytes=0 \
        --set data.val_fraction=0.04 --out experiments/results/rho

Runtime: 18 runs (6 rhos x 3 seeds) of 625 steps x 128 x 64 tokens (5.1M tokens each):
3.6 h of run wall time on this machine, sharing its 2 cores with a second study
(experiments/README.md, "Results: rho"). Expected at paper scale: a U-shape,
best rho ~0.75-0.8, Engram matching pure MoE down to rho ~0.4; at toy scale (issue 11, 1.6M
tokens) the loss fell steeply from rho 1 and flattened at 0.4-0.6, so the grid reaches 0.15.

``rho`` is the share of the sparse budget held by routed experts::

    P_sparse = P_tot - P_act,   P_MoE_sparse = (E - top_k) * 3 D F * L_moe = rho * P_sparse,
    P_Engram_sparse = table params - retrieved rows = (1 - rho) * P_sparse.

A point changes only the number of routed experts ``E`` and the Engram table rows (plus, for
rho < 1, the Engram module at ``base.engram.layer_ids``), as in the paper. ``P_tot`` is held
to 2%; ``P_act`` is reported per point (``activated_params``): the Engram fusion and the
retrieved rows are activated (1% of P_act in the paper, more at toy width) and the router
shrinks with E. ``--strict-p-act`` (the earlier design) also holds P_act by resizing the
leading dense FFN, a third knob correlated with rho. ``rho`` is quantized by whole experts:
each point reports the actual rho next to the nominal one.
"""

from __future__ import annotations

import os

from engram_jax.config import Config
from engram_jax.experiments import (
    memory_labels,
    named,
    stats,
    train_tokens,
    with_engram,
    with_model,
    with_moe,
)
from engram_jax.experiments.stats import base_summary, errorbar_figure, paired
from engram_jax.params import count_params

RHOS = (1.0, 0.8, 0.6, 0.4, 0.25, 0.15)


def add_arguments(p) -> None:
    p.add_argument("--rhos", type=_floats, default=RHOS, help="rho grid, e.g. 1,0.8,0.6")
    p.add_argument(
        "--strict-p-act",
        action="store_true",
        help="also hold P_act by resizing the leading dense FFN (a third knob)",
    )


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def pure_moe(cfg: Config) -> Config:
    return with_engram(cfg, layer_ids=())


def budget(base: Config) -> tuple[int, int]:
    """``(P_tot, P_act)`` of the base config's pure-MoE form: the targets."""
    c = count_params(pure_moe(base))
    return c["total"], c["activated"]


def _expert_sparse(cfg: Config) -> int:
    """Sparse params per routed expert: 3 D F in each MoE layer."""
    m = cfg.model
    return 3 * m.d_model * cfg.moe.expert_hidden * (m.n_layers - m.n_dense_layers)


def _fit_tables(cfg: Config, table_target: int) -> Config:
    """Per-head base rows so the table params come closest to ``table_target`` (real sizes
    are the next distinct primes, so iterate on the measured count)."""
    e = cfg.engram
    per_row = e.d_head * len(e.layer_ids) * e.n_hash_heads
    rows = max(2, round(table_target / per_row))
    for _ in range(4):
        cfg = with_engram(cfg, engram_vocab_size=(rows,) * (e.max_ngram_size - 1))
        step = round((table_target - count_params(cfg)["engram"]) / per_row)
        if step == 0:
            break
        rows = max(2, rows + step)
    return cfg


def allocate(base: Config, rho: float, p_tot: int, p_act: int | None = None) -> Config:
    """The config at allocation ratio ``rho`` with total ``p_tot`` (and, when ``p_act`` is
    given, activated ``p_act`` through the leading dense FFN width: the strict variant)."""
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho={rho!r} is invalid: must be in (0, 1]")
    k, per_expert = base.moe.top_k, _expert_sparse(base)
    cfg = pure_moe(base)
    if rho < 1.0:
        n = base.engram.max_ngram_size - 1
        cfg = with_engram(base, layer_ids=base.engram.layer_ids or (1,), engram_vocab_size=(2,) * n)
    for _ in range(3):  # E moves the router (activated), which moves P_sparse
        n_sparse = round(rho * (p_tot - count_params(cfg)["activated"]) / per_expert)
        cfg = with_moe(cfg, n_routed_experts=max(k, 1, k + n_sparse))
        if p_act is not None:
            cfg = _hold_p_act(cfg, base, p_act)
    if rho < 1.0:
        c = count_params(cfg)
        cfg = _fit_tables(cfg, p_tot - c["total"] + c["engram"])
    return cfg


def _hold_p_act(cfg: Config, base: Config, p_act: int) -> Config:
    d, n_dense = base.model.d_model, base.model.n_dense_layers
    if n_dense < 1:
        raise ValueError("--strict-p-act needs model.n_dense_layers >= 1 (its FFN absorbs P_act)")
    gap = p_act - count_params(cfg)["activated"]
    hidden = cfg.model.dense_hidden + round(gap / (3 * d * n_dense))
    if hidden < 1:
        raise ValueError(
            f"the Engram fusion does not fit in dense_hidden={base.model.dense_hidden}"
        )
    return with_model(cfg, dense_hidden=hidden)


def sweep(base: Config, rhos=RHOS, *, strict_p_act: bool = False, tol: float = 0.02) -> list:
    """One point per rho, named ``rho<rho>``; ``ValueError`` if P_tot (and with
    ``strict_p_act`` P_act) misses its target by more than ``tol``."""
    p_tot, p_act = budget(base)
    points = []
    for rho in rhos:
        cfg = allocate(base, float(rho), p_tot, p_act if strict_p_act else None)
        c = count_params(cfg)
        checks = (("total", p_tot),) + ((("activated", p_act),) if strict_p_act else ())
        for key, target in checks:
            if abs(c[key] - target) > tol * target:
                raise ValueError(
                    f"allocation at rho={rho} missed {key}: {c[key]:,} vs {target:,} "
                    f"(> {tol:.0%}); the budget is too small for this rho grid"
                )
        labels = {
            "rho": float(rho),
            "rho_actual": round(c["rho"], 4),
            "experts": cfg.moe.n_routed_experts,
            "dense_hidden": cfg.model.dense_hidden,
            "p_act_vs_moe": round(c["activated"] / p_act, 4),
            **memory_labels(cfg, train_tokens(cfg)),
        }
        points.append(named(base, f"rho{float(rho):.2f}", cfg, labels))
    return points


def points(base: Config, args) -> list:
    return sweep(base, args.rhos, strict_p_act=args.strict_p_act)


def summarize(rows) -> dict:
    """Best rho and the pre-registered U-curve criterion: the best rho is interior (neither
    1 nor the smallest) and beats both rho = 1 and the smallest rho by more than 2 standard
    errors of the paired difference."""
    s = base_summary("rho", rows)
    g = s["points"]
    if not g:
        return s
    best = min(g, key=lambda p: p["val_loss_mean"])
    top, low = max(g, key=lambda p: p["rho"]), min(g, key=lambda p: p["rho"])
    vs_top, vs_low = (
        paired(rows, best["point"], top["point"]),
        paired(rows, best["point"], low["point"]),
    )
    beats = lambda d: d["n"] > 1 and d["mean"] is not None and d["mean"] < -2 * d["se"]
    interior = best["point"] not in (top["point"], low["point"])
    s.update(
        best_rho=best["rho"],
        best_rho_actual=best["rho_actual"],
        best_val_loss=best["val_loss_mean"],
        best_minus_rho_max=vs_top,
        best_minus_rho_min=vs_low,
        delta_vs_rho_max={p["point"]: paired(rows, p["point"], top["point"]) for p in g},
        u_curve=bool(interior and beats(vs_top) and beats(vs_low)),
        u_curve_criterion="best rho interior and better than rho max and rho min by > 2 SE "
        "of the paired difference",
    )
    return s


def plot(rows, summary: dict, out: str) -> list[str]:
    g = summary.get("points", [])
    if not g:
        return []
    d = summary["delta_vs_rho_max"]
    xs = [p["rho_actual"] for p in g]
    ys = [d[p["point"]]["mean"] for p in g]
    err = [d[p["point"]]["se"] for p in g]
    figures = [
        errorbar_figure(
            os.path.join(out, "rho.png"),
            {"val loss - val loss(rho max), paired over seeds (+- SE)": (xs, ys, err)},
            xlabel="rho (share of sparse params in routed experts; 1 = pure MoE)",
            ylabel="delta validation loss (nats)",
            title=f"Sparsity allocation at fixed P_tot (U-curve: {summary['u_curve']})",
        )
    ]
    return figures + stats.curves_figure(
        os.path.join(out, "rho_curves.png"),
        stats.over_training(rows, out, *_curve_points(g)),
        title="Sparsity allocation over training",
    )


def _curve_points(g: list) -> tuple[dict, str, str]:
    top = max(g, key=lambda p: p["rho"])
    labels = {p["point"]: f"rho {p['rho_actual']:.2f}" for p in g}
    return (
        labels,
        top["point"],
        labels[top["point"]],
    )


def report(rows, summary: dict, out: str) -> str:
    """``summary.md``: one row per rho and the U-curve criterion, from the result rows."""
    g = summary.get("points", [])
    if not g:
        return "# rho\n\nNo finished runs.\n"
    d = summary["delta_vs_rho_max"]
    table = stats.md_table(
        ["rho (actual)", "routed experts", "slots", "reads per row", "val loss per seed",
         "mean", "delta vs rho max (+- SE)", "mean gate", "train loss"],
        [
            [f"{p['rho_actual']:.3f}", int(p["experts"]), f"{int(p['slots'] or 0):,}",
             f"{p['reads_per_row']:,.0f}" if p["slots"] else "-",
             stats.seed_losses(rows, p["point"]),
             f"{p['val_loss_mean']:.4f}", stats.fmt_delta(d[p["point"]]),
             f"{p['gate_mean']:.3f}" if p["gate_mean"] is not None else "-",
             f"{p['train_loss_mean']:.4f}"]
            for p in g
        ],
    )  # fmt: skip
    top, low = max(p["rho"] for p in g), min(p["rho"] for p in g)
    return (
        f"# rho\n\n{stats.runs_line(summary)}\n\n{table}\n\n"
        + stats.curves_table(
            stats.over_training(rows, out, *_curve_points(g)), "rho (actual)", "rho_curves.png"
        )
        + f"U-curve ({summary['u_curve_criterion']}): {stats.met(summary['u_curve'])}. "
        f"Best rho {summary['best_rho']} (val loss {summary['best_val_loss']:.4f}); "
        f"best - rho {top}: {stats.fmt_delta(summary['best_minus_rho_max'])}; "
        f"best - rho {low}: {stats.fmt_delta(summary['best_minus_rho_min'])}.\n"
    )
