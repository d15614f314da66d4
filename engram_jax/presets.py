"""Named configurations: CPU presets for this machine and the paper's models.

Each preset is a function returning a :class:`~engram_jax.config.Config`; its docstring says
what it is for. ``get_preset(name)`` looks one up. Paper presets (``dense-4b``, ``moe-27b``,
``engram-27b``, ``engram-40b``, ``ablation-3b``) follow ENGRAM_SPEC sections 5-7.
"""

from __future__ import annotations

from engram_jax.config import (Config, EngramConfig, ModelConfig, MoEConfig, TrainConfig)

PRESETS: dict = {}


def preset(name: str):
    def register(fn):
        PRESETS[name] = fn
        return fn
    return register


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


@preset("tiny")
def tiny() -> Config:
    """CPU preset: 4 blocks of width 128, 2 mHC branches, 8 routed experts (top-2), Engram at
    block 1 with 2 orders x 4 heads x ~5,000 rows (40k rows). Trains on 2 CPU cores in minutes:
    ``engram-jax train --preset tiny``."""
    return Config(
        name="tiny",
        model=ModelConfig(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                          head_dim=32, dense_hidden=384, n_dense_layers=1, hc_mult=2,
                          max_seq_len=1024),
        moe=MoEConfig(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_hidden=128),
        engram=EngramConfig(engram_vocab_size=(5000, 5000), max_ngram_size=3,
                            n_embed_per_ngram=64, n_head_per_ngram=4, layer_ids=(1,)),
        train=TrainConfig(steps=300, batch_size=8, seq_len=128),
    )


@preset("small")
def small() -> Config:
    """CPU preset, a step up from tiny: 6 blocks of width 256, 4 mHC branches, 16 routed
    experts (top-2), Engram at blocks 1 and 4 with 2 orders x 8 heads x ~20,000 rows."""
    return Config(
        name="small",
        model=ModelConfig(vocab_size=8000, d_model=256, n_layers=6, n_heads=8, n_kv_heads=4,
                          head_dim=32, dense_hidden=768, n_dense_layers=1, hc_mult=4,
                          max_seq_len=2048),
        moe=MoEConfig(n_routed_experts=16, n_shared_experts=1, top_k=2, expert_hidden=192),
        engram=EngramConfig(engram_vocab_size=(20_000, 20_000), max_ngram_size=3,
                            n_embed_per_ngram=128, n_head_per_ngram=8, layer_ids=(1, 4)),
        train=TrainConfig(steps=1000, batch_size=16, seq_len=256),
    )
