"""Named configurations: CPU presets for this machine and the paper's models.

Each preset is a function returning a :class:`~engram_jax.config.Config`; its docstring says
what it is for. ``get_preset(name)`` looks one up. Paper presets (``dense-4b``, ``moe-27b``,
``engram-27b``, ``engram-40b``, ``ablation-3b``) follow ENGRAM_SPEC sections 5-7.
"""

from __future__ import annotations

import dataclasses

from engram_jax.config import (
    Config,
    EngramConfig,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    TrainConfig,
)

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


# The CPU presets side by side, one row a field (the ``--set`` key), one column a preset; fields
# not listed keep their defaults. Each preset's function below says what it is for.
_CPU_COLUMNS = ("tiny", "small", "toy")
# fmt: off
_CPU_TABLE = {
    #                            tiny            small               toy
    "model.vocab_size":         (4096,           8000,               2048),
    "model.d_model":            (128,            256,                64),
    "model.n_layers":           (4,              6,                  4),
    "model.n_heads":            (4,              8,                  4),
    "model.n_kv_heads":         (2,              4,                  2),
    "model.head_dim":           (32,             32,                 16),
    "model.dense_hidden":       (384,            768,                96),
    "model.n_dense_layers":     (1,              1,                  1),
    "model.hc_mult":            (2,              4,                  2),
    "model.max_seq_len":        (1024,           2048,               256),
    "moe.n_routed_experts":     (8,              16,                 72),
    "moe.n_shared_experts":     (1,              1,                  1),
    "moe.top_k":                (2,              2,                  2),
    "moe.expert_hidden":        (128,            192,                32),
    "moe.dispatch":             ("blocked",      "blocked",          "blocked"),
    "engram.engram_vocab_size": ((5000, 5000),   (20_000, 20_000),   (4000, 4000)),
    "engram.max_ngram_size":    (3,              3,                  3),
    "engram.n_embed_per_ngram": (64,             128,                16),
    "engram.n_head_per_ngram":  (4,              8,                  1),
    "engram.layer_ids":         ((1,),           (1, 4),             (1, 2)),
    "train.steps":              (300,            1000,               300),
    "train.batch_size":         (8,              16,                 128),
    "train.seq_len":            (128,            256,                64),
    "train.eval_every":         (100,            100,                300),
    "train.eval_batches":       (8,              8,                  16),
    "train.checkpoint_every":   (100,            100,                0),
}
# fmt: on


def _cpu_preset(name: str) -> Config:
    """The column ``name`` of the table above as a config."""
    column = _CPU_COLUMNS.index(name)
    sections: dict = {}
    for key, values in _CPU_TABLE.items():
        section, field = key.split(".")
        sections.setdefault(section, {})[field] = values[column]
    return Config.from_dict({"name": name, **sections})


@preset("tiny")
def tiny() -> Config:
    """CPU preset: 4 blocks of width 128, 2 mHC branches, 8 routed experts (top-2), Engram at
    block 1 with 2 orders x 4 heads x ~5,000 rows (40k rows). Trains on 2 CPU cores in minutes:
    ``engram-jax train --preset tiny``."""
    return _cpu_preset("tiny")


@preset("small")
def small() -> Config:
    """CPU preset, a step up from tiny: 6 blocks of width 256, 4 mHC branches, 16 routed
    experts (top-2), Engram at blocks 1 and 4 with 2 orders x 8 heads x ~20,000 rows."""
    return _cpu_preset("small")


@preset("toy")
def toy() -> Config:
    """The study model of experiments/ (issues 10 and 11): the paper's proportions at the
    largest scale whose runs of millions of tokens take minutes on 2 CPU cores.

    - Width 64, 4 blocks (1 dense + 3 MoE), GQA 4 heads / 2 kv heads of 16, mHC with 2
      branches, vocab 2048, sequences of 64 tokens. Training cost per token is set by the
      width, depth and the LM head (64 x 2048): this is the budget that keeps a 5M-token run
      in minutes.
    - MoE: 72 routed experts of hidden 32 (top-2) + 1 shared; the dense block's FFN is 96
      wide, as wide as the 3 experts a token activates (DeepSeek-V3's convention, as in the
      paper presets). P_tot/P_act of the pure MoE (``engram.layer_ids=[]``) is 9.9 (paper's
      budgets: ~10); it needs fine-grained experts, hence 72 of them.
    - Engram at blocks 1 and 2 (0-based), the paper's reference placement (layers 2 and 6 of
      12, i.e. after 1/12 and 5/12 of the depth) scaled to 4 blocks; orders 2-3, one head per
      order, rows of 16 floats, d_mem = 32 = d_model / 2 (paper: 0.5, rows of 80 floats);
      ~4,000 rows per head (256k table parameters, rho ~0.83 with the experts above), so a
      5M-token run reads each row ~1,250 times. The two fusions are 9% of P_act (paper ~1%):
      a fusion's share is set by d_mem/d_model and the number of blocks, and 4 blocks is what
      the time budget allows.
    - Batches of 128 x 64 tokens: the step's fixed costs (optimizer, Muon's Newton-Schulz,
      dispatch) are amortized over twice the tokens of 64 x 64 (BENCHMARKS.md, study loop).
    300 steps, one evaluation (16 batches) at the end, no checkpoints; studies set their own
    step counts. ``engram-jax params --preset toy`` prints the proportions."""
    return _cpu_preset("toy")


# ---------------------------------------------------------------------------------------------
# The paper's models (ENGRAM_SPEC sections 5-7). Published: 30 blocks, d=2560, MLA with 32
# heads, mHC expansion 4, vocab 129,280, RoPE theta 10,000, seq 4096; the MoE layout; the Engram
# sizes. NOT published, chosen here: MLA dimensions = DeepSeek-V3's own (q_lora_rank 1536,
# kv_lora_rank 512, qk_nope = v head dim 128, qk_rope 64); routed/shared expert hidden 1536
# (sets the sparse budget: 66 unselected x 29 layers x 11.8M = 22.6B); dense FFN width
# 12,288 = 8 x 1536, as wide as the 8 experts a token activates (DeepSeek-V3's convention).
#
# How the published totals come out (``engram-jax params --preset NAME``): activated
# (embedding and head excluded) 3.73B (Dense-4B, MoE-27B) and 3.77B (Engram, + 2 fusion
# modules) vs 3.8B. The published *totals* count the input embedding (129,280 x 2,560 =
# 0.33B): Dense-4B 4.1B = 3.8B activated + 0.33B is only possible that way, since a dense
# model's P_tot equals its P_act. Key ``total_with_embedding``: 4.06B, 26.65B, 26.65B, 39.40B
# vs 4.1B, 26.7B, 26.7B, 39.5B. ``total`` (P_tot, spec section 6, no embedding/head): 3.73B,
# 26.32B, 26.32B, 39.07B. Engram tables: 5.79B and 18.53B vs 5.7B and 18.5B.
#
# Engram layers: the paper says blocks 2 and 15 of 30 (1-based), i.e. 0-based (1, 14); the
# demo's list [1, 15] is 0-based, i.e. blocks 2 and 16. We follow the paper (the spec's
# section 1 and 5 text); ``--set engram.layer_ids=[1,15]`` gives the demo's placement.

_PAPER_MODEL = ModelConfig(
    vocab_size=129_280,
    d_model=2560,
    n_layers=30,
    n_dense_layers=1,
    dense_hidden=12_288,
    dtype="bfloat16",
    max_seq_len=4096,
    rope_theta=10_000.0,
    hc_mult=4,
    sinkhorn_iters=20,
    attention="mla",
    n_heads=32,
    n_kv_heads=32,
    head_dim=128,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_rope_head_dim=64,
    remat=True,
    scan_layers=True,
)
_PAPER_MOE = MoEConfig(
    n_routed_experts=72,
    n_shared_experts=2,
    top_k=6,
    expert_hidden=1536,
    score_func="sigmoid",
    dispatch="ragged",
)
_PAPER_TRAIN = TrainConfig(steps=50_000, batch_size=1280, seq_len=4096)
# The paper's optimizer (spec section 5): Muon for the backbone, base lr 4e-4, step decay
# (x0.316 at 80% and 90% of the steps), weight decay 0.1 on weight matrices; tables Adam with
# lr x5 and no decay (``engram.table_lr_multiplier``, default 5). Not published, chosen here:
# Muon at the same lr as AdamW through Moonlight's RMS matching (0.2), b1 0.9, b2 0.95 and
# 2,000 warmup steps (DeepSeek-V3's).
_PAPER_OPTIM = OptimConfig(
    lr=4e-4,
    muon_lr=4e-4,
    muon_consistent_rms=0.2,
    weight_decay=0.1,
    warmup_steps=2000,
    muon_ns_scan=True,  # compile time on TPU (BENCHMARKS.md, TPU compile profile)
)
_ENGRAM_27B = EngramConfig(
    engram_vocab_size=(2_262_400, 2_262_400),
    max_ngram_size=3,
    n_embed_per_ngram=640,
    n_head_per_ngram=8,
    layer_ids=(1, 14),
)
_ENGRAM_MOE = dataclasses.replace(_PAPER_MOE, n_routed_experts=55)  # the Engram models' MoE
_NO_ENGRAM = EngramConfig(layer_ids=())


def _paper_preset(
    name: str,
    *,
    model: ModelConfig = _PAPER_MODEL,
    moe: MoEConfig = _PAPER_MOE,
    engram: EngramConfig = _NO_ENGRAM,
    train: TrainConfig = _PAPER_TRAIN,
) -> Config:
    """A paper preset: MoE-27B (the paper backbone and its MoE, no Engram, the paper's
    training length and optimizer) with the parts given replaced."""
    return Config(name=name, model=model, moe=moe, engram=engram, train=train, optim=_PAPER_OPTIM)


@preset("dense-4b")
def dense_4b() -> Config:
    """Dense-4B: the paper backbone with a dense SwiGLU (width 12,288) in all 30 blocks.
    3.73B activated = P_tot; 4.06B with the input embedding (paper: 4.1B, 3.8B activated).
    TPU: fits on v5p-16 (8 chips) with ``--topology v5p:2x2x2 --mesh fsdp=8 --set
    train.batch_size=16`` (2 sequences of 4096 per chip; a larger slice adds fsdp or data
    shards at the same per-chip batch); HBM, estimated MFU and collectives of that compile in
    BENCHMARKS.md."""
    return _paper_preset("dense-4b", model=dataclasses.replace(_PAPER_MODEL, n_dense_layers=30))


@preset("moe-27b")
def moe_27b() -> Config:
    """MoE-27B: 1 leading dense block, then DeepSeekMoE with 2 shared + 72 routed experts
    (hidden 1536), top-6, sigmoid scores, loss-free balancing. P_tot 26.32B, 26.65B with the
    embedding (paper 26.7B); 3.73B activated (paper 3.8B).
    TPU: fits on v5p-128 (64 chips) with ``--topology v5p:4x4x4 --mesh fsdp=64 --set
    moe.dispatch=ep --set train.batch_size=64`` (1 sequence of 4096 per chip); HBM,
    estimated MFU and collectives of that compile in BENCHMARKS.md, also with ``--set
    optim.muon_split=true`` (each chip runs Muon on its own matrices: less HBM and
    all-reduce)."""
    return _paper_preset("moe-27b")


@preset("engram-27b")
def engram_27b() -> Config:
    """Engram-27B: MoE-27B with 55 routed experts; Engram at blocks 2 and 15 (1-based), N=3
    (orders 2 and 3), 8 heads per order, d_mem 1280, base 2,262,400 rows per head: tables
    5.79B (paper 5.7B). P_tot 26.32B, 26.65B with the embedding (paper 26.7B).
    TPU: fits on v5p-128 (64 chips) with ``--topology v5p:4x4x4 --mesh fsdp=64 --set
    moe.dispatch=ep --set train.batch_size=64`` (1 sequence of 4096 per chip; 55 experts do
    not divide an expert axis of a power-of-two slice, so experts stay FSDP-split); HBM,
    estimated MFU and collectives of that compile in BENCHMARKS.md. 2 per chip does not fit
    unrolled. ``--set optim.muon_split=true`` (each chip runs Muon on its own matrices) lowers
    its HBM and all-reduce bytes (BENCHMARKS.md)."""
    return _paper_preset("engram-27b", moe=_ENGRAM_MOE, engram=_ENGRAM_27B)


@preset("engram-40b")
def engram_40b() -> Config:
    """Engram-40B: Engram-27B with 7,239,680 base rows per head: tables 18.53B (paper 18.5B).
    P_tot 39.07B, 39.40B with the embedding (paper 39.5B); activated unchanged.
    TPU: fits on v5p-128 (64 chips) with ``--topology v5p:4x4x4 --mesh fsdp=64 --set
    moe.dispatch=ep --set train.batch_size=64`` (1 sequence of 4096 per chip), with the
    collectives of engram-27b's program (BENCHMARKS.md)."""
    return _paper_preset(
        "engram-40b",
        moe=_ENGRAM_MOE,
        engram=dataclasses.replace(_ENGRAM_27B, engram_vocab_size=(7_239_680,) * 2),
    )


@preset("ablation-3b")
def ablation_3b() -> Config:
    """Ablation model (paper section 7): 12 blocks, a 3B MoE with 0.56B activated, plus the
    reference 1.6B Engram at blocks 2 and 6 (1-based; 0-based (1, 5)), N=3, 8 heads per order.
    Unpublished, chosen here: d=1280, mHC 4, MLA 16 heads (q_lora 768, kv_lora 512, head dims
    128/64), 2 shared + 48 routed experts of hidden 1280, top-6; d_mem 640 (n_embed_per_ngram
    320, d_head 40) and 1,250,000 base rows per head. MoE part 3.02B with the embedding, 0.58B
    activated; Engram tables 1.60B. The MoE baseline: ``--set engram.layer_ids=[]``.
    TPU: fits on v5p-16 (8 chips) with ``--topology v5p:2x2x2 --mesh fsdp=8 --set
    moe.dispatch=ep --set train.batch_size=16`` (2 sequences of 4096 per chip); HBM, table
    bytes, estimated MFU and collectives of that compile in BENCHMARKS.md."""
    return _paper_preset(
        "ablation-3b",
        model=dataclasses.replace(
            _PAPER_MODEL,
            d_model=1280,
            n_layers=12,
            n_heads=16,
            n_kv_heads=16,
            q_lora_rank=768,
            dense_hidden=8 * 1280,
        ),
        moe=dataclasses.replace(_PAPER_MOE, n_routed_experts=48, expert_hidden=1280),
        engram=dataclasses.replace(
            _ENGRAM_27B, engram_vocab_size=(1_250_000,) * 2, n_embed_per_ngram=320, layer_ids=(1, 5)
        ),
        train=dataclasses.replace(_PAPER_TRAIN, batch_size=512),
    )
