"""Frozen, hashable configuration for engram-jax.

Every config is a ``@dataclass(frozen=True)`` holding only ints, floats, strings, bools and
tuples, so a whole ``Config`` can be a static ``jax.jit`` argument. Changes go through
``dataclasses.replace`` or :func:`override` (dotted keys such as ``engram.layer_ids``, parsed in
:mod:`engram_jax.config_io` and re-exported here). Validation runs in ``__post_init__`` and raises
``ValueError`` naming the field and what is allowed (:mod:`engram_jax.validate`). Presets live
in :mod:`engram_jax.presets`.

Field names of :class:`EngramConfig` follow the reference demo (ENGRAM_SPEC sections 2-4).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from engram_jax.config_io import from_dict
from engram_jax.config_io import override as override  # re-exported: the public path
from engram_jax.config_io import parse_value as parse_value
from engram_jax.config_io import valid_keys as valid_keys
from engram_jax.validate import at_most, check, choice, typed_fields, zero_ok


@dataclass(frozen=True)
class EngramConfig:
    """The Engram module (ENGRAM_SPEC sections 2-4); names follow the reference demo.

    ``engram_vocab_size[n-2]`` is the base table size of every head of n-gram order ``n``; the
    real sizes are the next distinct primes above it. ``layer_ids`` are 0-based block indices;
    an empty tuple disables Engram. ``pad_id`` is the *raw* tokenizer id used to fill positions
    before the start of a sequence (it is compressed before hashing, as in the demo).
    """

    engram_vocab_size: tuple[int, ...] = (10_000, 10_000)
    max_ngram_size: int = 3
    n_embed_per_ngram: int = 64
    n_head_per_ngram: int = 4
    layer_ids: tuple[int, ...] = (1,)
    kernel_size: int = 4
    seed: int = zero_ok(0)
    pad_id: int = 2
    norm_eps: float = 1e-5
    # Ablation switches (paper section 7).
    use_gating: bool = True  # False: alpha = 1 (no context-aware gate)
    use_short_conv: bool = True  # False: Y = V~ (no depthwise causal conv)
    multi_branch: bool = True  # False: one fusion on the mean of the M branches, added to all
    compress_tokenizer: bool = True  # False: hash raw token ids
    # Sparse row-wise optimizer for the tables (False: dense optax Adam). Both are Adam for
    # every row (untouched rows caught up exactly, engram_jax.catch_up) unless lazy_adam:
    # then an untouched row's moments and parameters stay put (sparse path only).
    sparse_update: bool = True
    lazy_adam: bool = False
    table_lr_multiplier: float = 5.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "engram_vocab_size", tuple(self.engram_vocab_size))
        object.__setattr__(self, "layer_ids", tuple(self.layer_ids))
        typed_fields(self, skip=("pad_id",))
        check(
            self.max_ngram_size >= 2,
            "EngramConfig.max_ngram_size",
            "an integer >= 2",
            self.max_ngram_size,
        )
        check(
            len(self.engram_vocab_size) == self.max_ngram_size - 1
            and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 2
                for v in self.engram_vocab_size
            ),
            "EngramConfig.engram_vocab_size",
            f"a list of {self.max_ngram_size - 1} integers >= 2 (one per order 2..max_ngram_size)",
            self.engram_vocab_size,
        )
        check(
            self.n_embed_per_ngram % self.n_head_per_ngram == 0,
            "EngramConfig.n_embed_per_ngram",
            f"divisible by n_head_per_ngram={self.n_head_per_ngram}",
            self.n_embed_per_ngram,
        )
        check(
            all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layer_ids)
            and len(set(self.layer_ids)) == len(self.layer_ids),
            "EngramConfig.layer_ids",
            "a list of distinct 0-based block indices",
            self.layer_ids,
        )
        check(isinstance(self.pad_id, int), "EngramConfig.pad_id", "an integer", self.pad_id)
        check(self.norm_eps > 0, "EngramConfig.norm_eps", "> 0", self.norm_eps)
        check(
            self.table_lr_multiplier > 0,
            "EngramConfig.table_lr_multiplier",
            "> 0",
            self.table_lr_multiplier,
        )

    @property
    def enabled(self) -> bool:
        return len(self.layer_ids) > 0

    @property
    def d_head(self) -> int:
        """Row width of the table: n_embed_per_ngram / n_head_per_ngram."""
        return self.n_embed_per_ngram // self.n_head_per_ngram

    @property
    def d_mem(self) -> int:
        """Width of the concatenated retrieved vector e_t: (N-1) * n_embed_per_ngram."""
        return (self.max_ngram_size - 1) * self.n_embed_per_ngram

    @property
    def n_hash_heads(self) -> int:
        """H = (N-1) * K hash ids per token per layer."""
        return (self.max_ngram_size - 1) * self.n_head_per_ngram


@dataclass(frozen=True)
class MoEConfig:
    """DeepSeekMoE: shared + fine-grained routed experts, top-k, loss-free balancing.

    ``n_routed_experts = 0`` with ``n_shared_experts = 0`` is not allowed for MoE blocks; a
    dense model sets ``ModelConfig.n_dense_layers = n_layers``.
    """

    n_routed_experts: int = 8
    n_shared_experts: int = zero_ok(1)
    top_k: int = 2
    expert_hidden: int = 64  # hidden width of each routed and shared expert
    score_func: str = "sigmoid"
    route_scale: float = 1.0
    norm_topk_prob: bool = True
    bias_update_rate: float = 1e-3  # loss-free balancing step (outside the gradient)
    # Token dispatch (see engram_jax.moe): "ragged" (dropless ragged_dot; TPU/GPU),
    # "blocked" (dropless padded blocks; fast on CPU), "capacity" (expert-axis einsum, drops),
    # "ep" (experts split over the `expert` mesh axis, all-to-all dispatch: engram_jax.moe_ep).
    dispatch: str = "ragged"
    # "capacity": slots per expert = factor * S*top_k / E; "ep": slots per destination device
    # = factor * s*top_k / n (s tokens per device, n expert-axis devices; factor >= n: no drops)
    capacity_factor: float = 2.0

    def __post_init__(self) -> None:
        typed_fields(self)
        at_most(self, "top_k", "n_routed_experts")
        choice(self, "score_func", ("sigmoid", "softmax"))
        check(self.route_scale > 0, "MoEConfig.route_scale", "> 0", self.route_scale)
        check(
            self.bias_update_rate >= 0, "MoEConfig.bias_update_rate", ">= 0", self.bias_update_rate
        )
        choice(self, "dispatch", ("ragged", "blocked", "capacity", "ep"))
        check(self.capacity_factor > 0, "MoEConfig.capacity_factor", "> 0", self.capacity_factor)


@dataclass(frozen=True)
class ModelConfig:
    """The backbone: embedding, ``n_dense_layers`` dense blocks then MoE blocks, norm, head.

    ``attention``: ``"gqa"`` (multi-head when ``n_kv_heads == n_heads``) or ``"mla"``.
    ``hc_mult`` is the number M of mHC residual branches; 1 means a plain residual stream.
    """

    vocab_size: int = 4096
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int = 16
    attention: str = "gqa"
    # MLA ranks (used only when attention == "mla").
    q_lora_rank: int = zero_ok(0)  # 0: full-rank query projection
    kv_lora_rank: int = 32
    qk_rope_head_dim: int = 8
    dense_hidden: int = 128  # SwiGLU hidden width of the dense blocks
    n_dense_layers: int = zero_ok(1)
    hc_mult: int = 1
    sinkhorn_iters: int = zero_ok(20)
    hc_dynamic: bool = True  # mHC: input-dependent mappings on top of the static ones
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    dtype: str = "float32"  # compute dtype; parameters are float32
    remat: bool = False
    # consecutive blocks of one structure (no Engram) run as one lax.scan over their stacked
    # parameters: the compiled program holds one copy of the block (compile time and memory of
    # deep models); parameters stay stored per block
    scan_layers: bool = False

    def __post_init__(self) -> None:
        typed_fields(self)
        at_most(self, "n_dense_layers", "n_layers")
        check(
            self.n_heads % self.n_kv_heads == 0,
            "ModelConfig.n_kv_heads",
            f"a divisor of n_heads={self.n_heads}",
            self.n_kv_heads,
        )
        choice(self, "attention", ("gqa", "mla"))
        check(self.head_dim % 2 == 0, "ModelConfig.head_dim", "even (RoPE)", self.head_dim)
        check(self.rope_theta > 0, "ModelConfig.rope_theta", "> 0", self.rope_theta)
        check(self.norm_eps > 0, "ModelConfig.norm_eps", "> 0", self.norm_eps)
        choice(self, "dtype", ("float32", "bfloat16"))


@dataclass(frozen=True)
class OptimConfig:
    """Muon for 2-D backbone matrices, AdamW for the rest, Adam (lr x multiplier) for tables."""

    lr: float = 3e-3
    muon_lr: float = 2e-2
    warmup_steps: int = zero_ok(20)
    # step decay boundaries; empty: 80% and 90% of train.steps, written in when a run starts
    decay_steps: tuple[int, ...] = ()
    decay_factor: float = 0.316
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    use_muon: bool = True
    # > 0: Muon updates scaled to this RMS (Moonlight's sqrt(max(fan_in, fan_out)) * rms, so
    # Muon shares AdamW's lr, as in the paper's recipe); 0: width scaling (Keller's Muon).
    muon_consistent_rms: float = 0.0
    # True: Muon's Newton-Schulz iterations run as one lax.scan (the TPU backend compiles one
    # iteration per parameter instead of five; the paper presets). Same arithmetic, but float
    # rounding differs from the unrolled loop the CPU studies in experiments/ were run with.
    muon_ns_scan: bool = False
    # True: under a mesh of more than one device, each device runs Muon on whole matrices of its
    # own (engram_jax.muon_split) instead of every device orthogonalizing every FSDP-split
    # matrix with all-reduced Gram products. Per-matrix arithmetic unchanged.
    muon_split: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "decay_steps", tuple(self.decay_steps))
        for name in ("lr", "muon_lr", "decay_factor", "eps"):
            check(getattr(self, name) > 0, f"OptimConfig.{name}", "> 0", getattr(self, name))
        typed_fields(self)
        check(
            0 <= self.b1 < 1 and 0 <= self.b2 < 1,
            "OptimConfig.b1/b2",
            "in [0, 1)",
            (self.b1, self.b2),
        )
        check(self.weight_decay >= 0, "OptimConfig.weight_decay", ">= 0", self.weight_decay)
        check(self.grad_clip >= 0, "OptimConfig.grad_clip", ">= 0 (0 disables)", self.grad_clip)
        check(
            self.muon_consistent_rms >= 0,
            "OptimConfig.muon_consistent_rms",
            ">= 0 (0: width scaling)",
            self.muon_consistent_rms,
        )


@dataclass(frozen=True)
class DataConfig:
    """Input pipeline. ``path=""`` means the embedded default corpus (Python's stdlib source)."""

    path: str = ""
    text_field: str = "text"  # JSONL field
    tokenizer: str = ""  # SentencePiece .model; "" trains one on the training split
    tokenizer_type: str = "bpe"
    val_fraction: float = 0.02
    max_files: int = zero_ok(0)  # 0: all files of the default corpus
    max_bytes: int = zero_ok(8_000_000)  # cap on default-corpus bytes read (0: no cap)
    prefetch: int = zero_ok(2)
    worker_count: int = zero_ok(0)  # Grain multiprocessing workers (0: in-process)

    def __post_init__(self) -> None:
        check(0 < self.val_fraction < 1, "DataConfig.val_fraction", "in (0, 1)", self.val_fraction)
        choice(self, "tokenizer_type", ("bpe", "unigram"))
        typed_fields(self)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 8
    seq_len: int = 128
    seed: int = zero_ok(0)
    log_every: int = 10
    eval_every: int = zero_ok(100)
    eval_batches: int = 8
    checkpoint_every: int = zero_ok(100)  # 0 disables checkpointing
    keep_checkpoints: int = 3

    def __post_init__(self) -> None:
        typed_fields(self)


@dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; -1 on one axis means 'all remaining devices' (default: data)."""

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = (self.data, self.fsdp, self.expert, self.tensor)
        check(
            all(isinstance(s, int) and (s >= 1 or s == -1) for s in sizes) and sizes.count(-1) <= 1,
            "MeshConfig",
            "positive sizes with at most one -1",
            sizes,
        )


def default_decay_steps(total_steps: int) -> tuple[int, int]:
    """The lr decay boundaries of a run of ``total_steps`` when none are given: 80% and 90%."""
    return (int(0.8 * total_steps), int(0.9 * total_steps))


@dataclass(frozen=True)
class Config:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    engram: EngramConfig = field(default_factory=EngramConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def __post_init__(self) -> None:
        bad = [i for i in self.engram.layer_ids if i >= self.model.n_layers]
        check(
            not bad,
            "engram.layer_ids",
            f"block indices < model.n_layers={self.model.n_layers}",
            self.engram.layer_ids,
        )
        check(
            self.train.seq_len <= self.model.max_seq_len,
            "train.seq_len",
            f"<= model.max_seq_len={self.model.max_seq_len}",
            self.train.seq_len,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        """The inverse of :meth:`to_dict`. Missing keys take their defaults; an unknown key
        (e.g. a renamed field) is an error naming it, never silently dropped."""
        return from_dict(cls, d)

    def with_derived(self) -> Config:
        """The config with the values derived from others written in (the lr decay
        boundaries from ``train.steps``), as a run stores it when it is created: resuming with
        another ``train.steps`` then keeps the run's boundaries."""
        if self.optim.decay_steps:
            return self
        bounds = default_decay_steps(self.train.steps)
        return dataclasses.replace(self, optim=dataclasses.replace(self.optim, decay_steps=bounds))
