"""Causal self-attention with RoPE: grouped-query (GQA/MHA) and Multi-head Latent Attention.

``GQAttention``: ``n_heads`` query heads share ``n_kv_heads`` key/value heads (MHA when equal).

``MLAttention`` (DeepSeek-V2/V3 MLA, the paper's backbone): queries optionally through a
low-rank bottleneck ``c_q = RMSNorm(x W_dq)`` (``q_lora_rank > 0``); keys and values from one
compressed latent ``c_kv = RMSNorm(x W_dkv)`` of width ``kv_lora_rank`` plus one RoPE key of
width ``qk_rope_head_dim`` shared by all heads. Per head, query/key = [no-RoPE part (head_dim),
RoPE part (qk_rope_head_dim)], value width = head_dim. (DeepSeek-V3 names: qk_nope_head_dim =
v_head_dim = ``head_dim`` here.) The softmax scale is 1/sqrt(head_dim + qk_rope_head_dim).

RoPE rotates the two halves of each rotated vector (the "rotate-half" convention).

Shape legend: B batch, T query positions, S key positions, D d_model, N query heads,
K key/value heads, G = N/K query heads per kv head, H head_dim, R rope dim, Q q_lora_rank,
L kv_lora_rank.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from engram_jax.config import ModelConfig
from engram_jax.layers import Linear, RMSNorm


def rope(x_BxTxNxH: jax.Array, positions_T: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding over the last axis (rotate-half), computed in float32.
    ``positions_T`` may also be per sequence, ``[B, T]`` (batched decoding of ragged rows)."""
    half = x_BxTxNxH.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    pos_BxT = positions_T.reshape((-1, positions_T.shape[-1])).astype(jnp.float32)  # B may be 1
    angle_BxTxH = pos_BxT[:, :, None] * freq[None, None, :]
    cos, sin = jnp.cos(angle_BxTxH)[:, :, None, :], jnp.sin(angle_BxTxH)[:, :, None, :]
    x = x_BxTxNxH.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxNxH.dtype)


def attend(
    q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxV: jax.Array, pos_T: jax.Array, scale: float
) -> jax.Array:
    """Softmax(q k^T * scale, masked) v with K <= N kv heads; scores and softmax in float32.

    Query t sits at absolute position ``pos_T[t]`` and sees key slot s when ``s <= pos_T[t]``:
    with ``pos_T = arange(T)`` over T keys this is the causal mask of a full forward pass; over
    a decode cache of S slots, later slots (empty or stale) are hidden. ``pos_T`` may be
    ``[B, T]``: every sequence at its own position (batched decoding of ragged rows).
    """
    b, t, n, h = q_BxTxNxH.shape
    k_heads, s = k_BxSxKxH.shape[2], k_BxSxKxH.shape[1]
    q_BxTxKxGxH = q_BxTxNxH.reshape(b, t, k_heads, n // k_heads, h)
    s_BxKxGxTxS = (
        jnp.einsum("btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH, preferred_element_type=jnp.float32)
        * scale
    )
    pos_BxT = pos_T.reshape((-1, t))  # one row, or one per sequence
    visible_BxTxS = jnp.arange(s)[None, None, :] <= pos_BxT[:, :, None]
    visible_Bx1x1xTxS = visible_BxTxS[:, None, None]
    s_BxKxGxTxS = jnp.where(visible_Bx1x1xTxS, s_BxKxGxTxS, jnp.finfo(jnp.float32).min)
    p_BxKxGxTxS = jax.nn.softmax(s_BxKxGxTxS, axis=-1).astype(v_BxSxKxV.dtype)
    o_BxTxKxGxV = jnp.einsum("bkgts,bskv->btkgv", p_BxKxGxTxS, v_BxSxKxV)
    return o_BxTxKxGxV.reshape(b, t, n, v_BxSxKxV.shape[-1])


def _write(cache_BxSx_: jax.Array, new_BxTx_: jax.Array, pos) -> jax.Array:
    """Write T new slots at ``pos`` (a scalar, or ``[B]``: one start per sequence)."""
    if jnp.ndim(pos) == 1:
        return jax.vmap(lambda c, n, p: _write(c[None], n[None], p)[0])(cache_BxSx_, new_BxTx_, pos)
    start = (0, pos) + (0,) * (cache_BxSx_.ndim - 2)
    return jax.lax.dynamic_update_slice(cache_BxSx_, new_BxTx_.astype(cache_BxSx_.dtype), start)


class _Attention(nnx.Module):
    """``__call__`` (a full causal pass) and ``step`` (T new positions against a KV cache) share
    the subclass's ``project``: ``x, positions -> (q, k, v, softmax scale)``."""

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        b, t, _ = x_BxTxD.shape
        pos_T = jnp.arange(t)
        q_BxTxNx_, k_BxTxKx_, v_BxTxKxH, scale = self.project(x_BxTxD, pos_T)
        o_BxTxNxH = attend(q_BxTxNx_, k_BxTxKx_.astype(q_BxTxNx_.dtype), v_BxTxKxH, pos_T, scale)
        return self.wo(o_BxTxNxH.reshape(b, t, -1))

    def step(self, x_BxTxD: jax.Array, kv: dict, pos) -> tuple[jax.Array, dict]:
        """T new positions starting at ``pos``, keys/values written into the cache
        ``kv = {"k": [B,S,K,.], "v": [B,S,K,.]}`` at slots pos..pos+T-1: -> (y, new kv).
        ``pos`` is a scalar, or ``[B]`` when every sequence sits at its own position."""
        b, t, _ = x_BxTxD.shape
        pos_T = pos + jnp.arange(t) if jnp.ndim(pos) == 0 else pos[:, None] + jnp.arange(t)[None]
        q_BxTxNx_, k_new, v_new, scale = self.project(x_BxTxD, pos_T)
        k_BxSxKx_, v_BxSxKxH = _write(kv["k"], k_new, pos), _write(kv["v"], v_new, pos)
        o_BxTxNxH = attend(q_BxTxNx_, k_BxSxKx_.astype(q_BxTxNx_.dtype), v_BxSxKxH, pos_T, scale)
        return self.wo(o_BxTxNxH.reshape(b, t, -1)), {"k": k_BxSxKx_, "v": v_BxSxKxH}

    def cache_shapes(self, batch: int, max_len: int) -> tuple[tuple, tuple]:
        raise NotImplementedError


class GQAttention(_Attention):
    """Grouped-query causal self-attention with RoPE on queries and keys (no biases)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        dt = jnp.dtype(cfg.dtype)
        self.n_heads, self.n_kv_heads, self.head_dim = n, k, h
        self.theta = cfg.rope_theta
        self.wq = Linear(d, n * h, use_bias=False, axes=("embed", "heads"), dtype=dt, rngs=rngs)
        self.wk = Linear(d, k * h, use_bias=False, axes=("embed", "heads"), dtype=dt, rngs=rngs)
        self.wv = Linear(d, k * h, use_bias=False, axes=("embed", "heads"), dtype=dt, rngs=rngs)
        self.wo = Linear(n * h, d, use_bias=False, axes=("heads", "embed"), dtype=dt, rngs=rngs)

    def project(self, x_BxTxD: jax.Array, pos_T: jax.Array):
        b, t, _ = x_BxTxD.shape
        n, k, h = self.n_heads, self.n_kv_heads, self.head_dim
        q_BxTxNxH = rope(self.wq(x_BxTxD).reshape(b, t, n, h), pos_T, self.theta)
        k_BxTxKxH = rope(self.wk(x_BxTxD).reshape(b, t, k, h), pos_T, self.theta)
        v_BxTxKxH = self.wv(x_BxTxD).reshape(b, t, k, h)
        return q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, h**-0.5

    def cache_shapes(self, batch: int, max_len: int) -> tuple[tuple, tuple]:
        shape = (batch, max_len, self.n_kv_heads, self.head_dim)
        return shape, shape


class MLAttention(_Attention):
    """Multi-head Latent Attention (DeepSeek-V2/V3) with decoupled RoPE keys.

    The decode cache holds the expanded per-head keys and values (not the latent ``c_kv``):
    simple and exact, at n_heads x the latent's memory.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.qk_rope_head_dim % 2:
            raise ValueError(
                f"ModelConfig.qk_rope_head_dim={cfg.qk_rope_head_dim} is invalid: "
                "must be even (RoPE) for attention='mla'"
            )
        d, n, h, r = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.qk_rope_head_dim
        qr, lr = cfg.q_lora_rank, cfg.kv_lora_rank
        dt = jnp.dtype(cfg.dtype)
        self.n_heads, self.head_dim, self.rope_dim, self.kv_rank = n, h, r, lr
        self.q_lora = qr > 0
        self.theta = cfg.rope_theta
        if qr > 0:
            self.wq_a = Linear(d, qr, use_bias=False, axes=("embed", None), dtype=dt, rngs=rngs)
            self.q_norm = RMSNorm(qr, cfg.norm_eps, axes=(None,))
            self.wq_b = Linear(
                qr, n * (h + r), use_bias=False, axes=(None, "heads"), dtype=dt, rngs=rngs
            )
        else:
            self.wq = Linear(
                d, n * (h + r), use_bias=False, axes=("embed", "heads"), dtype=dt, rngs=rngs
            )
        self.wkv_a = Linear(d, lr + r, use_bias=False, axes=("embed", None), dtype=dt, rngs=rngs)
        self.kv_norm = RMSNorm(lr, cfg.norm_eps, axes=(None,))
        self.wkv_b = Linear(
            lr, n * 2 * h, use_bias=False, axes=(None, "heads"), dtype=dt, rngs=rngs
        )
        self.wo = Linear(n * h, d, use_bias=False, axes=("heads", "embed"), dtype=dt, rngs=rngs)

    def project(self, x_BxTxD: jax.Array, pos_T: jax.Array):
        b, t, _ = x_BxTxD.shape
        n, h, r = self.n_heads, self.head_dim, self.rope_dim
        # 1. queries [no-RoPE | RoPE] per head, optionally through the q bottleneck
        q = self.wq_b(self.q_norm(self.wq_a(x_BxTxD))) if self.q_lora else self.wq(x_BxTxD)
        q_BxTxNx_ = q.reshape(b, t, n, h + r)
        q_BxTxNx_ = jnp.concatenate(
            [q_BxTxNx_[..., :h], rope(q_BxTxNx_[..., h:], pos_T, self.theta)], axis=-1
        )
        # 2. compressed latent c_kv (L) and the shared RoPE key (R)
        kv_a = self.wkv_a(x_BxTxD)
        c_BxTxL, k_rope_BxTx1xR = kv_a[..., : self.kv_rank], kv_a[..., None, self.kv_rank :]
        k_rope_BxTx1xR = rope(k_rope_BxTx1xR, pos_T, self.theta)
        # 3. per-head keys (no-RoPE part) and values from the latent
        kv_BxTxNx2H = self.wkv_b(self.kv_norm(c_BxTxL)).reshape(b, t, n, 2 * h)
        k_BxTxNx_ = jnp.concatenate(
            [kv_BxTxNx2H[..., :h], jnp.broadcast_to(k_rope_BxTx1xR, (b, t, n, r))], axis=-1
        )
        return q_BxTxNx_, k_BxTxNx_, kv_BxTxNx2H[..., h:], (h + r) ** -0.5

    def cache_shapes(self, batch: int, max_len: int) -> tuple[tuple, tuple]:
        n, h = self.n_heads, self.head_dim
        return (batch, max_len, n, h + self.rope_dim), (batch, max_len, n, h)


def make_attention(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    return MLAttention(cfg, rngs=rngs) if cfg.attention == "mla" else GQAttention(cfg, rngs=rngs)


def attention_params(cfg: ModelConfig) -> int:
    """Analytic parameter count of one attention sublayer (mirrors the modules above)."""
    d, n, h = cfg.d_model, cfg.n_heads, cfg.head_dim
    if cfg.attention == "gqa":
        return 2 * d * n * h + 2 * d * cfg.n_kv_heads * h
    r, qr, lr = cfg.qk_rope_head_dim, cfg.q_lora_rank, cfg.kv_lora_rank
    q = d * qr + qr + qr * n * (h + r) if qr > 0 else d * n * (h + r)
    return q + d * (lr + r) + lr + lr * n * 2 * h + n * h * d
