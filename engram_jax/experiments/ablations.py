"""Ablations (ENGRAM_SPEC section 7): the paper's 2-layer reference Engram against one change at
a time, the 1-layer vs 2-layer comparison, a table-capacity control, MoE and OverEncoding.

    engram-jax sweep ablations --seeds 2 --steps 625 --set data.max_bytes=0 \
        --set data.val_fraction=0.04 --out experiments/results/ablations

Runtime: 28 runs (14 variants x 2 seeds) of 625 steps x 128 x 64 tokens (5.1M tokens
each): 6.5 h of run wall time on this machine, two sweep processes sharing its 2 cores
(experiments/README.md, "Results: ablations").
Expected at paper scale (3B MoE, 100B tokens): the reference beats MoE by 0.04 nats; removing
multi-branch fusion, the gate or tokenizer compression hurts most; removing the short conv
hurts slightly; 4-grams at equal memory are slightly worse; a single Engram layer is best at
layer 2 (1-based) and slightly worse than two layers.

Variants of ``base`` (its Engram: orders, heads, widths, total table rows):

- ``reference``: the paper's reference: Engram at two layers with the memory split across
  them (the paper: layers 2 and 6 of 12, 1-based; here the base's first Engram layer and
  ``round(5 L / 12)`` 0-based, i.e. (1, 2) for 4 blocks), or the base's layers if it has two;
- ``one_layer``: one Engram at the first reference layer holding all the memory;
- ``layer<l>``: that single Engram moved to block ``l`` (every other block);
- ``no_gating`` (alpha = 1), ``no_compression`` (hash raw ids), ``no_short_conv``,
  ``no_multi_branch`` (one fusion gated on the pre-mapped state H_pre x; needs mHC);
- ``ngram4``: orders 2-4 at the same total rows;
- ``rows_min`` / ``rows_64``: capacity controls, the same Engram with tables of the smallest
  distinct primes (the toy reference's 4 heads get 2, 3, 5 and 7 rows; 1 row per head is not
  expressible, as head sizes are distinct primes) and of base 64 rows per head: too few to
  store n-grams, so is the gain memorized n-grams or the extra gated branch?
- ``moe``: no Engram; ``overencoding``: the same memory as input n-gram embeddings.
"""

from __future__ import annotations

import os

from engram_jax.config import Config
from engram_jax.experiments import memory_labels, named, slots_of, stats, train_tokens, with_engram
from engram_jax.experiments.slots import overencoding, with_slots
from engram_jax.experiments.stats import base_summary, errorbar_figure, paired


def add_arguments(p) -> None:
    p.add_argument("--only", default=None, help="comma-separated variant names (default: all)")


def reference_layers(base: Config) -> tuple[int, int]:
    e, n = base.engram, base.model.n_layers
    if len(e.layer_ids) >= 2:
        return tuple(e.layer_ids[:2])
    if n < 3:
        raise ValueError(f"the 2-layer reference needs model.n_layers >= 3, got {n}")
    first = e.layer_ids[0] if e.layer_ids else 1
    return first, max(first + 1, min(n - 1, round(5 * n / 12)))


def ngram4(cfg: Config) -> Config:
    """Orders 2..4 with the per-head rows rescaled so the total rows stay equal (to the
    distinct-prime rounding, corrected on the real count)."""
    e = cfg.engram
    target, heads = slots_of(cfg), len(e.layer_ids) * 3 * e.n_head_per_ngram
    per_head = round(target / heads)
    for _ in range(3):
        out = with_engram(cfg, max_ngram_size=4, engram_vocab_size=(per_head,) * 3)
        per_head += round((target - slots_of(out)) / heads)
    return with_engram(cfg, max_ngram_size=4, engram_vocab_size=(per_head,) * 3)


def variants(base: Config) -> dict[str, Config]:
    if not base.engram.enabled:
        raise ValueError("ablations need an Engram base config (engram.layer_ids non-empty)")
    slots, n = slots_of(base), base.engram.max_ngram_size - 1
    layers = reference_layers(base)
    ref = with_slots(with_engram(base, layer_ids=layers), slots)
    single = lambda layer: with_slots(with_engram(base, layer_ids=(layer,)), slots)
    out = {
        "reference": ref,
        "one_layer": single(layers[0]),
        "no_gating": with_engram(ref, use_gating=False),
        "no_compression": with_engram(ref, compress_tokenizer=False),
        "no_short_conv": with_engram(ref, use_short_conv=False),
    }
    if base.model.hc_mult > 1:
        out["no_multi_branch"] = with_engram(ref, multi_branch=False)
    out["ngram4"] = ngram4(ref)
    out["rows_min"] = with_engram(ref, engram_vocab_size=(2,) * n)
    out["rows_64"] = with_engram(ref, engram_vocab_size=(64,) * n)
    out["moe"] = with_engram(base, layer_ids=())
    out["overencoding"] = overencoding(single(0))
    for layer in range(base.model.n_layers):
        if layer != layers[0]:
            out[f"layer{layer}"] = single(layer)
    return out


def sweep(base: Config, only=None) -> list:
    """One point per variant (``only``: a subset of names, in this order)."""
    items = variants(base)
    if only:
        unknown = sorted(set(only) - set(items))
        if unknown:
            raise ValueError(f"unknown ablation variants {unknown}; choose from {list(items)}")
        items = {k: v for k, v in items.items() if k in set(only)}
    return [
        named(
            base,
            name,
            cfg,
            {
                "variant": name,
                "layer": "+".join(map(str, cfg.engram.layer_ids)),
                **memory_labels(cfg, train_tokens(cfg)),
            },
        )
        for name, cfg in items.items()
    ]


def points(base: Config, args) -> list:
    return sweep(base, [s.strip() for s in args.only.split(",")] if args.only else None)


def summarize(rows) -> dict:
    """Paired differences against the reference (and MoE); ``beyond_2se``: the variants
    whose difference from the reference exceeds 2 standard errors."""
    s = base_summary("ablations", rows)
    names = [p["point"] for p in s["points"]]
    if "reference" in names:
        d = {n: paired(rows, n, "reference") for n in names}
        s["delta_vs_reference"] = d
        s["beyond_2se"] = sorted(
            n for n, x in d.items() if x["n"] > 1 and abs(x["mean"]) > 2 * x["se"]
        )
    if "moe" in names:
        s["delta_vs_moe"] = {n: paired(rows, n, "moe") for n in names}
    return s


def plot(rows, summary: dict, out: str) -> list[str]:
    d = summary.get("delta_vs_reference")
    if not d:
        return []
    names = [n for n in d if n != "reference"]
    return [
        errorbar_figure(
            os.path.join(out, "ablations.png"),
            {
                "variant - reference (2-layer Engram), paired (+- SE)": (
                    names,
                    [d[n]["mean"] for n in names],
                    [d[n]["se"] for n in names],
                )
            },
            xlabel="variant",
            ylabel="delta validation loss (nats)",
            title="Ablations against the 2-layer reference",
            bars=True,
        )
    ] + stats.curves_figure(
        os.path.join(out, "ablations_curves.png"),
        _curves(rows, summary, out),
        title="Ablations over training",
    )


def _curves(rows, summary: dict, out: str) -> dict:
    names = [p["point"] for p in summary["points"]]
    return stats.over_training(rows, out, {n: n for n in names}, "reference", "reference")


def _share(summary: dict, name: str) -> str:
    """How much of the reference's gain over MoE variant ``name`` keeps: 1 - d(name, ref) /
    d(moe, ref), as a percentage."""
    d = summary.get("delta_vs_reference", {})
    if name not in d or "moe" not in d or not d["moe"]["mean"]:
        return "-"
    return f"{100 * (1 - d[name]['mean'] / d['moe']['mean']):.0f}%"


def report(rows, summary: dict, out: str) -> str:
    """``summary.md``: one row per variant, paired against the reference and MoE."""
    g = summary.get("points", [])
    if not g:
        return "# ablations\n\nNo finished runs.\n"
    ref, moe = summary.get("delta_vs_reference", {}), summary.get("delta_vs_moe", {})
    beyond = set(summary.get("beyond_2se", []))
    table = stats.md_table(
        ["variant", "slots", "val loss per seed", "mean", "vs reference (+- SE)",
         "beyond 2 SE", "vs moe (+- SE)", "share of the reference's gain over moe"],
        [
            [p["point"], f"{int(p['slots'] or 0):,}", stats.seed_losses(rows, p["point"]),
             f"{p['val_loss_mean']:.4f}", stats.fmt_delta(ref.get(p["point"])),
             "yes" if p["point"] in beyond else "no", stats.fmt_delta(moe.get(p["point"])),
             _share(summary, p["point"])]
            for p in g
        ],
    )  # fmt: skip
    return (
        f"# ablations\n\n{stats.runs_line(summary)}\n\n{table}\n\n"
        + (
            stats.curves_table(_curves(rows, summary, out), "variant", "ablations_curves.png")
            if "reference" in [p["point"] for p in g]
            else ""
        )
        + "A variant differs from the 2-layer reference when |paired difference| > 2 SE "
        f"(beyond 2 SE: {', '.join(sorted(beyond)) or 'none'}). Capacity control: rows_min "
        f"keeps {_share(summary, 'rows_min')} and rows_64 {_share(summary, 'rows_64')} of the "
        "reference's gain over moe.\n"
    )
