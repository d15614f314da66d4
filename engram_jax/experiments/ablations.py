"""Ablations (ENGRAM_SPEC section 7): the reference Engram against one change at a time.

Variants of ``base`` (which must hold the reference Engram: N=3, one layer, mHC branches):

- ``reference``: ``base`` as is;
- ``no_gating`` (alpha = 1), ``no_compression`` (hash raw ids), ``no_short_conv``,
  ``no_multi_branch`` (one fusion on the branch mean; needs ``model.hc_mult > 1``);
- ``ngram4``: orders 2-4 at the same table budget (per-head rows rescaled so the total
  rows and table memory match to within 0.1%);
- ``layer<l>``: the single Engram layer moved to block ``l``, for every other block;
- ``moe``: the MoE baseline, no Engram module;
- ``overencoding``: the OverEncoding baseline at equal table memory: the same hashed n-gram
  tables, projected by ``W_V`` and added to the input embedding before the first block
  (Engram at block 0 without gate, short conv or multi-branch fusion). OverEncoding averages
  the n-gram embeddings with the token embedding; a sum differs only by a constant factor on
  the input, which the pre-norm blocks see through their RMSNorms.

Every variant except ``moe`` has the reference table memory; none is iso-parameter with the
MoE baseline (as in the paper's ablation table, where Engram adds 1.6B parameters).
"""

from __future__ import annotations

import dataclasses

from engram_jax.config import Config
from engram_jax.experiments import Point, with_engram
from engram_jax.experiments.memory_scaling import slots_of


def ngram4(cfg: Config) -> Config:
    """Orders 2..4 with the per-head rows rescaled so the total rows stay equal (to the
    distinct-prime rounding: more heads means larger primes, so correct on the real count)."""
    e = cfg.engram
    target, heads = slots_of(cfg), len(e.layer_ids) * 3 * e.n_head_per_ngram
    per_head = round(target / heads)
    for _ in range(3):
        out = with_engram(cfg, max_ngram_size=4, engram_vocab_size=(per_head,) * 3)
        per_head += round((target - slots_of(out)) / heads)
    return with_engram(cfg, max_ngram_size=4, engram_vocab_size=(per_head,) * 3)


def variants(base: Config) -> dict[str, Config]:
    e, n_layers = base.engram, base.model.n_layers
    if len(e.layer_ids) != 1:
        raise ValueError(f"ablations need one reference Engram layer, got {e.layer_ids}")
    out = {
        "reference": base,
        "no_gating": with_engram(base, use_gating=False),
        "no_compression": with_engram(base, compress_tokenizer=False),
        "no_short_conv": with_engram(base, use_short_conv=False),
    }
    if base.model.hc_mult > 1:
        out["no_multi_branch"] = with_engram(base, multi_branch=False)
    out["ngram4"] = ngram4(base)
    for layer in range(n_layers):
        if layer != e.layer_ids[0]:
            out[f"layer{layer}"] = with_engram(base, layer_ids=(layer,))
    out["moe"] = with_engram(base, layer_ids=())
    out["overencoding"] = with_engram(
        base, layer_ids=(0,), use_gating=False, use_short_conv=False, multi_branch=False
    )
    return out


def sweep(base: Config, only=None) -> list[Point]:
    """One :class:`Point` per variant (``only``: a subset of names, in this order)."""
    items = variants(base)
    if only:
        unknown = sorted(set(only) - set(items))
        if unknown:
            raise ValueError(f"unknown ablation variants {unknown}; choose from {list(items)}")
        items = {k: v for k, v in items.items() if k in set(only)}
    return [
        Point(
            name,
            dataclasses.replace(cfg, name=f"{base.name}-{name}"),
            {
                "variant": name,
                "slots": slots_of(cfg),
                "layer": cfg.engram.layer_ids[0] if cfg.engram.layer_ids else "",
            },
        )
        for name, cfg in items.items()
    ]
