"""Memory scaling (ENGRAM_SPEC section 6, "infinite-memory regime"): a fixed backbone with
Engram tables swept over slots, OverEncoding at the same slot counts, and the fits
``val_loss = a + b log10(slots)``.

    engram-jax sweep slots --seeds 2 --steps 625 --set data.max_bytes=0 \
        --set data.val_fraction=0.04 --out experiments/results/slots

Runtime: 20 runs (5 slot counts x 2 kinds x 2 seeds) of 625 steps x 128 x 64 tokens (5.1M
tokens each): 5.5 h of run wall time on this machine, sharing its 2 cores with a second
study (experiments/README.md, "Results: slots").
Expected at paper scale: loss linear in log(slots) for Engram (a power law), with
OverEncoding gaining less per slot; at toy scale (issue 11, 1.6M tokens) the curve flattened
where rows were read only ~20 times, so the default grid keeps every row read >= 100 times.

Units. ``slots`` = total table rows over layers, orders and heads, each ``d_head`` wide (this
code's unit); ``slots_dmem`` = table params / d_mem, the paper's unit (one d_mem-wide memory
entry). ``reads_per_row`` = training lookups / rows. A point changes only
``engram.engram_vocab_size`` (the same per-head base for every order; real head sizes are the
next distinct primes, so actual counts are reported). OverEncoding: the same hashed tables
projected by W_V and added before the first block, without gate, short conv or multi-branch
fusion (a sum instead of the paper's mean differs by a constant factor the pre-norm blocks
see through their RMSNorms).
"""

from __future__ import annotations

import math
import os

from engram_jax.config import Config
from engram_jax.experiments import memory_labels, named, slots_of, stats, train_tokens, with_engram
from engram_jax.experiments.stats import base_summary, errorbar_figure, fit_log, paired

SLOTS = (1_900, 6_000, 19_000, 60_000, 200_000)
KINDS = ("engram", "overencoding")


def add_arguments(p) -> None:
    p.add_argument("--slots", type=_ints, default=SLOTS, help="slot grid (rows), e.g. 4e3,4e4,4e5")
    p.add_argument("--kinds", default=",".join(KINDS), help="engram,overencoding or one of them")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(float(x)) for x in text.split(",") if x.strip())


def with_slots(cfg: Config, slots: int) -> Config:
    """``cfg`` with the same per-head base rows for every order and head, chosen so the total
    rows come closest to ``slots`` (real sizes are the next distinct primes: corrected on the
    measured count, as more heads push the primes further up)."""
    e = cfg.engram
    if not e.enabled:
        raise ValueError("memory scaling needs an Engram config (engram.layer_ids non-empty)")
    heads = len(e.layer_ids) * e.n_hash_heads
    per_head = max(2, round(slots / heads))
    for _ in range(3):
        out = with_engram(cfg, engram_vocab_size=(per_head,) * (e.max_ngram_size - 1))
        step = round((slots - slots_of(out)) / heads)
        if step == 0 or per_head + step < 2:
            break
        per_head += step
    return with_engram(cfg, engram_vocab_size=(per_head,) * (e.max_ngram_size - 1))


def overencoding(cfg: Config) -> Config:
    """The OverEncoding baseline with ``cfg``'s tables: n-gram embeddings into the input."""
    return with_engram(
        cfg, layer_ids=(0,), use_gating=False, use_short_conv=False, multi_branch=False
    )


def sweep(base: Config, slots=SLOTS, kinds=KINDS) -> list:
    """One point per (kind, slot count), named ``<kind>-slots<n>``; the backbone is ``base``."""
    out = []
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")
        for n in slots:
            if kind == "engram":
                cfg = with_slots(base, int(n))
            else:  # the same total rows, in one table set at the input
                cfg = overencoding(with_slots(with_engram(base, layer_ids=(0,)), int(n)))
            labels = {"kind": kind, **memory_labels(cfg, train_tokens(cfg))}
            out.append(named(base, f"{kind}-slots{int(n)}", cfg, labels))
    return out


def points(base: Config, args) -> list:
    return sweep(base, args.slots, tuple(k.strip() for k in args.kinds.split(",") if k.strip()))


def summarize(rows) -> dict:
    """Per kind: the fit of mean loss on log10(slots) and the pre-registered power-law
    criterion (slope < 0 and R^2 >= 0.9); Engram minus OverEncoding per slot count."""
    s = base_summary("slots", rows)
    for kind in KINDS:
        g = [p for p in s["points"] if p["kind"] == kind]
        if len({p["slots"] for p in g}) < 2:
            continue
        fit = fit_log([p["slots"] for p in g], [p["val_loss_mean"] for p in g])
        fit.update(  # a line through two points has R^2 1: a fit of two proves nothing
            power_law=bool(fit["slope"] < 0 and fit["r2"] >= 0.9 and fit["n"] >= 3),
            decades=math.log10(max(p["slots"] for p in g) / min(p["slots"] for p in g)),
            min_reads_per_row=min(p["reads_per_row"] for p in g),
        )
        s[f"fit_{kind}"] = fit
    names = {p["point"] for p in s["points"]}
    s["engram_minus_overencoding"] = {
        n: paired(rows, f"engram-{n}", f"overencoding-{n}")
        for n in sorted({p["point"].split("-", 1)[1] for p in s["points"]})
        if f"engram-{n}" in names and f"overencoding-{n}" in names
    }
    s["power_law_criterion"] = (
        "slope < 0 and R^2 >= 0.9 (fit of seed means on log10 slots, >= 3 slot counts)"
    )
    return s


def plot(rows, summary: dict, out: str) -> list[str]:
    g = summary.get("points", [])
    if not g:
        return []
    ref = min(g, key=lambda p: (p["kind"] != "engram", p["slots"]))["point"]
    series = {}
    for kind in KINDS:
        pts = sorted((p for p in g if p["kind"] == kind), key=lambda p: p["slots"])
        if pts:
            d = [paired(rows, p["point"], ref) for p in pts]
            fit = summary.get(f"fit_{kind}")
            label = f"{kind}" + (
                f": slope {fit['slope']:.4f}/decade, R^2 {fit['r2']:.2f}" if fit else ""
            )
            series[label] = (
                [p["slots"] for p in pts],
                [x["mean"] for x in d],
                [x["se"] for x in d],
            )
    figure = errorbar_figure(
        os.path.join(out, "slots.png"),
        series,
        xlabel="Engram slots (table rows of d_head floats)",
        ylabel=f"val loss - val loss({ref}), paired (+- SE)",
        title="Memory scaling at a fixed backbone",
        logx=True,
    )
    return [figure] + stats.curves_figure(
        os.path.join(out, "slots_curves.png"),
        stats.over_training(rows, out, *_curve_points(g)),
        title="Memory scaling over training",
    )


def _curve_points(g: list) -> tuple[dict, str, str]:
    pts = sorted(g, key=lambda p: (p["kind"] != "engram", p["slots"]))
    label = lambda p: f"{p['kind']} {int(p['slots']):,}"  # noqa: E731
    return {p["point"]: label(p) for p in pts}, pts[0]["point"], label(pts[0])


def report(rows, summary: dict, out: str) -> str:
    """``summary.md``: one row per (kind, slots), the fits and the power-law criterion."""
    g = sorted(summary.get("points", []), key=lambda p: (p["kind"], p["slots"]))
    if not g:
        return "# slots\n\nNo finished runs.\n"
    vs = summary.get("engram_minus_overencoding", {})
    _, ref, ref_label = _curve_points(g)  # the smallest Engram table, as in slots.png
    table = stats.md_table(
        ["kind", "slots (d_head rows)", "slots (d_mem entries)", "reads per row",
         "val loss per seed", "mean", f"vs {ref_label} (+- SE)",
         "engram - overencoding (+- SE)", "mean gate"],
        [
            [p["kind"], f"{int(p['slots']):,}", f"{int(p['slots_dmem']):,}",
             f"{p['reads_per_row']:,.0f}", stats.seed_losses(rows, p["point"]),
             f"{p['val_loss_mean']:.4f}", stats.fmt_delta(stats.paired(rows, p["point"], ref)),
             stats.fmt_delta(vs.get(p["point"].split("-", 1)[1])),
             f"{p['gate_mean']:.3f}" if p["kind"] == "engram" and p["gate_mean"] else "-"]
            for p in g
        ],
    )  # fmt: skip
    fits = []
    for kind in KINDS:
        fit = summary.get(f"fit_{kind}")
        if fit is None:
            fits.append(f"- {kind}: fewer than 2 slot counts finished, no fit.")
            continue
        fits.append(
            f"- {kind}: val loss = {fit['intercept']:.4f} {fit['slope']:+.4f} log10(slots), "
            f"R^2 {fit['r2']:.3f} over {fit['n']} points and {fit['decades']:.2f} decades "
            f"(min reads per row {fit['min_reads_per_row']:,.0f}): power law "
            f"{stats.met(fit['power_law'])}."
        )
    curves = stats.over_training(rows, out, *_curve_points(g))
    return (
        f"# slots\n\n{stats.runs_line(summary)}\n\n{table}\n\n"
        + stats.curves_table(curves, "kind, slots", "slots_curves.png")
        + f"Power law ({summary['power_law_criterion']}):\n\n"
        + "\n".join(fits)
        + "\n"
    )
