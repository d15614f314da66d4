"""Experiments (ENGRAM_SPEC sections 6-7): pure functions from configs to configs.

Each study module exposes ``sweep(base, ...) -> list[Point]``; nothing runs at import and
nothing here touches the disk. :mod:`engram_jax.sweep` is the runner (training, results.csv,
plots, summary.json) and ``engram-jax sweep rho|slots|ablate`` its command line.

- :mod:`.allocation`: iso-parameter, iso-activated configs over the allocation ratio rho
  (the U-curve, spec section 6);
- :mod:`.memory_scaling`: a fixed backbone with Engram tables swept over slots, and the fit
  loss = a + b log10(slots) (the infinite-memory regime, spec section 6);
- :mod:`.ablations`: the reference Engram against its ablations, the MoE baseline and an
  OverEncoding baseline at equal table memory (spec section 7).

:func:`toy` is the shrunk backbone all three studies run on at CPU scale (the big_vision
"runlocal" idea: one function that makes any study fit a laptop).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from engram_jax.config import Config, override


@dataclass(frozen=True)
class Point:
    """One run of a study: a unique ``name``, its config, and the study's labels for the
    results table (``{"rho": 0.8}``, ``{"slots": 40_000}``, ``{"variant": "no_gating"}``)."""

    name: str
    cfg: Config
    labels: dict = field(default_factory=dict, hash=False, compare=False)


TOY_OVERRIDES = (
    "model.vocab_size=2048",
    "model.d_model=64",
    "model.n_layers=4",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.head_dim=16",
    "model.dense_hidden=192",
    "model.max_seq_len=256",
    "moe.n_routed_experts=64",
    "moe.expert_hidden=32",
    "moe.top_k=2",
    "engram.n_embed_per_ngram=32",
    "engram.n_head_per_ngram=4",
    "engram.engram_vocab_size=[5000,5000]",
    "train.seq_len=64",
    "train.batch_size=8",
    "train.steps=300",
    "train.eval_every=300",
    "train.eval_batches=16",
    "train.checkpoint_every=0",
)


def toy() -> Config:
    """The ``tiny`` preset shrunk for the CPU studies: d=64, 4 blocks (1 dense + 3 MoE), mHC 2,
    64 routed experts of hidden 32 (top-2) + 1 shared, vocab 2048, Engram at block 1 with
    orders 2-3 x 4 heads x ~5,000 rows of width 8, batches of 8 x 64 tokens, 300 steps, one
    evaluation (16 batches) at the end, no checkpoints. P_tot/P_act of the pure MoE is ~8
    (the paper's budgets: ~10)."""
    from engram_jax.presets import get_preset

    return dataclasses.replace(override(get_preset("tiny"), list(TOY_OVERRIDES)), name="toy")


def base_config(preset: str) -> Config:
    """``toy`` or any preset name of :mod:`engram_jax.presets`."""
    from engram_jax.presets import get_preset

    return toy() if preset == "toy" else get_preset(preset)


def with_engram(cfg: Config, **changes) -> Config:
    return dataclasses.replace(cfg, engram=dataclasses.replace(cfg.engram, **changes))


def with_moe(cfg: Config, **changes) -> Config:
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **changes))


def with_model(cfg: Config, **changes) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **changes))
