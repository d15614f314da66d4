"""Engram: conditional memory by hashed n-gram lookup (ENGRAM_SPEC sections 2-4), Flax NNX.

Shape legend: B batch, T sequence, M mHC branches (hc_mult), G gated groups (M, or 1 when
``multi_branch=False``), D d_model, H hash heads ((N-1)*K), d row width (d_head),
E d_mem = H*d, C conv channels G*D, W conv taps (kernel_size), S conv history (W-1)*N,
R table rows.

Equations, numbered as the steps in :meth:`Engram._forward`:
  (1) e_t = concat_h Table[offset_h + z_{t,h}]                                   spec 2
  (2) k_t^(m) = W_K^(m) e_t + b_K^(m),  v_t = W_V e_t + b_V                     spec 3, 4
  (3) a^(m) = RMSNorm_q^(m)(h_t^(m)) . RMSNorm_k^(m)(k_t^(m)) / sqrt(D)
  (4) a <- sign(a) sqrt(max(|a|, 1e-6)),  alpha^(m) = sigmoid(a)                 demo
  (5) V~^(m) = alpha^(m) v_t
  (6) Y = SiLU(Conv1D(RMSNorm^(m)(V~))) + V~: depthwise over all G*D channels, causal,
      W taps, dilation N, no bias, zero-initialized (so Engram starts as a gated lookup).
As in the reference demo, ``key_norm`` is applied to the key and ``query_norm`` to the hidden
state; every RMSNorm here uses ``cfg.norm_eps`` (the demo's gate norms use torch's default eps,
a difference of order 1e-5 in the normalized values). Ablations: ``use_gating=False`` sets
alpha = 1 (and reports no gates); ``use_short_conv=False`` gives Y = V~; ``multi_branch=False``
runs one fusion on the pre-mapped hidden state ``h_pre = H_pre x`` (spec section 4; the block
passes its attention sublayer's mHC pre-mapping, else the branch mean) and adds the same Y to
every branch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engram_jax.config import EngramConfig
from engram_jax.layers import RMSNorm, param


class TableParam(nnx.Param):
    """Variable type of Engram memory tables: lets optimizers and sharding rules treat tables
    (sparse row-wise updates, Adam with a larger lr, no weight decay) apart from the backbone."""


class MultiHeadTable(nnx.Module):
    """One flat table for all hash heads of a layer, with per-head row offsets (spec 2).

    ``head_sizes`` are the per-head (prime) table sizes in id order (order, then head). Rows
    are padded up to a multiple of ``row_multiple`` so the table divides across shards;
    hashed ids never reach padding rows. Init: normal with std ``init_std`` (default
    1/sqrt(d_head), so each head's row has unit expected norm and every head contributes
    equally to e_t; the gate's RMSNorm makes the key path scale-free anyway).
    """

    def __init__(
        self,
        head_sizes: Sequence[int],
        d_head: int,
        *,
        row_multiple: int = 1,
        init_std: float | None = None,
        rngs: nnx.Rngs,
    ):
        sizes = tuple(int(s) for s in head_sizes)
        if not sizes or min(sizes) < 1 or row_multiple < 1:
            raise ValueError(f"head_sizes={sizes!r} must be positive and row_multiple >= 1")
        self.head_sizes = sizes
        self.offsets = tuple(int(o) for o in np.cumsum((0,) + sizes[:-1]))  # static constant
        self.n_rows = sum(sizes)  # rows reachable by hashed ids
        n_padded = -(-self.n_rows // row_multiple) * row_multiple
        std = d_head**-0.5 if init_std is None else init_std
        table_RxD = std * jax.random.normal(rngs.params(), (n_padded, d_head), jnp.float32)
        self.table = param(table_RxD, ("table_rows", None), TableParam)

    def global_ids(self, ids_BxTxH: jax.Array) -> jax.Array:
        """Per-head ids -> flat table rows (adds each head's row offset)."""
        offsets_H = np.asarray(self.offsets, np.int32)
        if ids_BxTxH.shape[-1] != len(offsets_H):
            raise ValueError(f"ids have {ids_BxTxH.shape[-1]} heads, table has {len(offsets_H)}")
        lead = (1,) * (ids_BxTxH.ndim - 1)
        return ids_BxTxH.astype(jnp.int32) + offsets_H.reshape(lead + (-1,))

    def rows(self, ids_BxTxH: jax.Array) -> jax.Array:
        """Gather the rows of ``ids_BxTxH``: returns ``rows_BxTxHxd`` (float32)."""
        return jnp.take(self.table[...], self.global_ids(ids_BxTxH), axis=0)


def causal_depthwise_conv(
    x_BxTxC: jax.Array, w_WxC: jax.Array, dilation: int, history_BxSxC: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """y[t] = sum_j w[j] * x[t - (W-1-j)*dilation] (tap W-1 sees the current position).

    ``history_BxSxC`` holds the S = (W-1)*dilation inputs preceding x (zeros at the start of a
    sequence). Returns y and the new history (the last S inputs), for incremental decoding.
    """
    B, T, C = x_BxTxC.shape
    W = w_WxC.shape[0]
    S = (W - 1) * dilation
    if history_BxSxC is None:
        history_BxSxC = jnp.zeros((B, S, C), x_BxTxC.dtype)
    xp_Bx_S_T_xC = jnp.concatenate([history_BxSxC.astype(x_BxTxC.dtype), x_BxTxC], axis=1)
    w_WxC = w_WxC.astype(x_BxTxC.dtype)
    y_BxTxC = sum(
        w_WxC[j][None, None, :] * xp_Bx_S_T_xC[:, j * dilation : j * dilation + T] for j in range(W)
    )
    return y_BxTxC, xp_Bx_S_T_xC[:, T:]


class Engram(nnx.Module):
    """The Engram layer of block ``layer_id``: lookup, context-aware gate, short conv.

    ``table_sizes[n-2][k]`` is the prime size of head k of order n for this layer (from
    ``engram_jax.hashing.table_sizes(cfg)[layer_id]``). Parameters are float32; ``dtype`` is
    the compute dtype. Call with ``h_BxTxMxD`` and exactly one of ``ids_BxTxH`` (gathered here)
    or ``rows_BxTxHxd`` (pre-gathered, e.g. to differentiate w.r.t. the gathered rows only).
    """

    def __init__(
        self,
        cfg: EngramConfig,
        layer_id: int,
        d_model: int,
        hc_mult: int,
        *,
        table_sizes: Sequence[Sequence[int]],
        rngs: nnx.Rngs,
        row_multiple: int = 1,
        dtype: Any = jnp.float32,
        table_init_std: float | None = None,
    ):
        K, n_orders = cfg.n_head_per_ngram, cfg.max_ngram_size - 1
        if len(table_sizes) != n_orders or any(len(s) != K for s in table_sizes):
            raise ValueError(
                f"table_sizes must be {n_orders} orders x {K} heads, "
                f"got {[len(s) for s in table_sizes]}"
            )
        self.cfg, self.layer_id = cfg, int(layer_id)
        self.d_model, self.hc_mult = int(d_model), int(hc_mult)
        self.dtype = jnp.dtype(dtype)
        G = self.n_groups = self.hc_mult if cfg.multi_branch else 1
        D, E = self.d_model, cfg.d_mem
        self.table = MultiHeadTable(
            [s for order in table_sizes for s in order],
            cfg.d_head,
            row_multiple=row_multiple,
            init_std=table_init_std,
            rngs=rngs,
        )
        normal = jax.random.normal
        self.value_kernel = param(E**-0.5 * normal(rngs.params(), (E, D)), (None, "embed"))
        self.value_bias = param(jnp.zeros((D,)), ("embed",))
        if cfg.use_gating:
            self.key_kernel = param(
                E**-0.5 * normal(rngs.params(), (E, G, D)), (None, None, "embed")
            )
            self.key_bias = param(jnp.zeros((G, D)), (None, "embed"))
            self.key_norm = RMSNorm(D, cfg.norm_eps, groups=G)
            self.query_norm = RMSNorm(D, cfg.norm_eps, groups=G)
        else:  # no context-aware gate: no key path at all
            self.key_kernel = self.key_bias = self.key_norm = self.query_norm = None
        if cfg.use_short_conv:
            self.conv_norm = RMSNorm(D, cfg.norm_eps, groups=G)
            self.conv_kernel = param(jnp.zeros((cfg.kernel_size, G, D)), (None, None, "embed"))
        else:
            self.conv_norm = self.conv_kernel = None

    # -- public API ------------------------------------------------------------------------

    def __call__(
        self,
        h_BxTxMxD: jax.Array,
        ids: jax.Array | None = None,
        rows: jax.Array | None = None,
        *,
        return_gates: bool = False,
        h_pre_BxTxD: jax.Array | None = None,
    ):
        """Returns ``y_BxTxMxD`` (compute dtype), or ``(y, gates_BxTxM)`` (float32 alpha; None
        when ``use_gating=False``) when ``return_gates``. A 3-D ``h_BxTxD`` is accepted when
        hc_mult == 1 (y is then 3-D).
        ``h_pre_BxTxD``: the pre-mapped state the single gate reads when multi_branch=False."""
        y, gates, _ = self._forward(h_BxTxMxD, self._memory(ids, rows), None, h_pre_BxTxD)
        return (y, gates) if return_gates else y

    def init_cache(self, batch: int) -> jax.Array:
        """Short-conv history for decoding: zeros [B, S, C] (S = 0 without the short conv)."""
        S = (self.cfg.kernel_size - 1) * self.cfg.max_ngram_size if self.cfg.use_short_conv else 0
        return jnp.zeros((batch, S, self.n_groups * self.d_model), self.dtype)

    def step(
        self,
        h_BxTxMxD: jax.Array,
        cache_BxSxC: jax.Array,
        ids: jax.Array | None = None,
        rows: jax.Array | None = None,
        h_pre_BxTxD: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Incremental pass over the next T >= 1 positions given the conv history.

        Returns ``(y, gates_BxTxM, new_cache)``; chaining steps from :meth:`init_cache`
        equals one full :meth:`__call__` over the concatenated positions.
        """
        return self._forward(h_BxTxMxD, self._memory(ids, rows), cache_BxSxC, h_pre_BxTxD)

    # -- internals -------------------------------------------------------------------------

    def _memory(self, ids, rows) -> jax.Array:
        """Step (1): e_BxTxE from hash ids or pre-gathered rows."""
        if (ids is None) == (rows is None):
            raise ValueError("pass exactly one of ids=[B,T,H] or rows=[B,T,H,d]")
        if rows is None:
            rows = self.table.rows(ids)
        H, d = self.cfg.n_hash_heads, self.cfg.d_head
        if rows.ndim != 4 or rows.shape[2:] != (H, d):
            raise ValueError(f"rows must be [B, T, {H}, {d}], got {rows.shape}")
        B, T = rows.shape[:2]
        return rows.reshape(B, T, H * d).astype(self.dtype)

    def _gates(self, h_BxTxMxD: jax.Array, k_BxTxGxD: jax.Array, h_pre_BxTxD=None) -> jax.Array:
        """Steps (3)-(4): alpha_BxTxG in float32."""
        if self.n_groups != self.hc_mult:  # multi_branch=False: gate on the pre-mapped state
            if h_pre_BxTxD is not None:
                h_BxTxMxD = h_pre_BxTxD[:, :, None, :]
            else:
                h_BxTxMxD = jnp.mean(h_BxTxMxD.astype(jnp.float32), axis=2, keepdims=True)
        q_BxTxGxD = self.query_norm(h_BxTxMxD.astype(jnp.float32))
        k_BxTxGxD = self.key_norm(k_BxTxGxD.astype(jnp.float32))
        a_BxTxG = jnp.einsum("btgd,btgd->btg", q_BxTxGxD, k_BxTxGxD) / math.sqrt(self.d_model)
        a_BxTxG = jnp.sign(a_BxTxG) * jnp.sqrt(jnp.maximum(jnp.abs(a_BxTxG), 1e-6))
        return jax.nn.sigmoid(a_BxTxG)

    def _short_conv(self, u_BxTxGxD: jax.Array, history_BxSxC: jax.Array | None):
        """Step (6) without the residual: SiLU(Conv1D(RMSNorm^(m)(V~)))."""
        B, T, G, D = u_BxTxGxD.shape
        x_BxTxC = self.conv_norm(u_BxTxGxD).reshape(B, T, G * D)
        w_WxC = self.conv_kernel[...].reshape(self.cfg.kernel_size, G * D)
        y_BxTxC, history_BxSxC = causal_depthwise_conv(
            x_BxTxC, w_WxC, self.cfg.max_ngram_size, history_BxSxC
        )
        return jax.nn.silu(y_BxTxC).reshape(B, T, G, D), history_BxSxC

    def _forward(self, h, e_BxTxE, history_BxSxC, h_pre_BxTxD=None):
        squeeze = h.ndim == 3
        h_BxTxMxD = h[:, :, None, :] if squeeze else h
        B, T, M, D = h_BxTxMxD.shape
        if (M, D) != (self.hc_mult, self.d_model) or e_BxTxE.shape[:2] != (B, T):
            raise ValueError(
                f"hidden {h.shape} / memory {e_BxTxE.shape} do not match "
                f"hc_mult={self.hc_mult}, d_model={self.d_model}"
            )
        G = self.n_groups
        # (2) value and G keys: two matmuls, each output contiguous (slicing one fused
        # [B,T,1+G,D] product along its third axis ran as a slow strided copy on XLA CPU)
        dt = self.dtype
        v_BxTxD = jnp.einsum("bte,ed->btd", e_BxTxE, self.value_kernel[...].astype(dt))
        v_BxTxD = v_BxTxD + self.value_bias[...].astype(dt)[None, None]
        # (3)-(4) one gate per token per group
        if self.cfg.use_gating:
            w_ExGxD = self.key_kernel[...].astype(dt)
            k_BxTxGxD = jnp.einsum("bte,egd->btgd", e_BxTxE, w_ExGxD)
            k_BxTxGxD = k_BxTxGxD + self.key_bias[...].astype(dt)[None, None]
            gates_BxTxG = self._gates(h_BxTxMxD, k_BxTxGxD, h_pre_BxTxD)
            # (5) gated value V~
            u_BxTxGxD = gates_BxTxG[..., None].astype(self.dtype) * v_BxTxD[:, :, None, :]
        else:  # alpha = 1, and no gate to report (a logged constant 1.0 would read as one)
            gates_BxTxG = None
            u_BxTxGxD = jnp.broadcast_to(v_BxTxD[:, :, None, :], (B, T, G, D))
        # (6) short conv + residual
        y_BxTxGxD = u_BxTxGxD
        if self.cfg.use_short_conv:
            conv_BxTxGxD, history_BxSxC = self._short_conv(u_BxTxGxD, history_BxSxC)
            y_BxTxGxD = conv_BxTxGxD + u_BxTxGxD
        elif history_BxSxC is None:
            history_BxSxC = jnp.zeros((B, 0, G * D), self.dtype)
        y_BxTxMxD = jnp.broadcast_to(y_BxTxGxD, (B, T, M, D))
        gates_BxTxM = None if gates_BxTxG is None else jnp.broadcast_to(gates_BxTxG, (B, T, M))
        y = y_BxTxMxD[:, :, 0] if squeeze else y_BxTxMxD
        return y, gates_BxTxM, history_BxSxC
