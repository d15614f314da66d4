"""Feed-forward sublayers: dense SwiGLU and DeepSeekMoE with auxiliary-loss-free balancing.

**SwiGLU**: ``FFN(x) = (SiLU(x W_gate) * (x W_up)) W_down``.

**DeepSeekMoE** (DeepSeek-V3 eqs. 12-16):
``y = sum_shared FFN_i(x) + sum_{i in topk} g_i FFN_i(x)``.
Scores ``s = sigmoid(x W_router)`` (or softmax). Selection uses ``s + b`` where ``b`` is a
per-expert :class:`RouterBias` that is *not* a Param (no gradient); the combine weights use
the unbiased scores: ``g = s_topk / sum(s_topk)`` (if ``norm_topk_prob``) times
``route_scale``. After each step the trainer calls :func:`update_router_bias`, which moves
``b`` by ``rate * sign(mean_load - load)`` (loss-free balancing). The shared experts are one
SwiGLU of width ``n_shared_experts * expert_hidden`` (same parameters, one matmul).

**Dispatch** (``MoEConfig.dispatch``). All three give each of the S*K (token, expert)
assignments its row within its expert (token order, i.e. a stable sort by expert), place the
token copies into their expert's rows with one scatter, run each expert's SwiGLU on its rows,
and read the outputs back in assignment order with one gather; a token's output is then the
score-weighted sum of its K rows (no scatter-add):

- ``"ragged"`` (default; dropless): ``jax.lax.ragged_dot`` on the sorted rows. On TPU/GPU this is
  a grouped matmul costing exactly the routed FLOPs; expert parallelism means wrapping it in a
  ``shard_map`` with an all-to-all (MaxText style), which is ``sharding.py``'s business.
  **On CPU XLA lowers ragged_dot to a masked dense dot: E times the routed FLOPs.**
- ``"blocked"`` (dropless; the CPU choice): each expert's rows are padded to a multiple of a
  block size b and every block multiplies by its expert's weights (gathered per block), a
  batched matmul over at most ``S*k/b + E`` blocks: <= ``(1 + E*b/(S*k))`` times the routed
  FLOPs, plus a weight gather of ``blocks x D x F`` per matrix.
- ``"capacity"`` (drops overflow): an ``[E, C, D]`` buffer with ``C = ceil(capacity_factor *
  S*k / E)`` and one ``einsum('ecd,edf->ecf')``; ``capacity_factor`` times the routed FLOPs.
  Every tensor carries the expert axis first, so GSPMD shards it along ``expert`` with no
  shard_map. Tokens beyond an expert's capacity get no routed output (the shared expert still
  applies) but still count in the load.

The fwd+bwd XLA FLOPs of one MoE sublayer of each dispatch, relative to a dense SwiGLU of the
activated width, are in BENCHMARKS.md (``benchmarks/moe_dispatch.py``): ``blocked`` is the
cheapest on CPU, so the CPU presets use it; the paper presets use ``ragged``. Router logits and
scores are float32.

Shape legend: B batch, T sequence, S = B*T tokens, D d_model, E routed experts, F expert hidden,
K top-k, R = S*K sorted assignments, C capacity, N blocks of B rows (blocked dispatch;
B is the batch only in x_BxTxD), P = N*B padded rows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from engram_jax.config import MoEConfig
from engram_jax.layers import Linear, param


class RouterBias(nnx.Variable):
    """Per-expert selection bias for loss-free balancing: state, not a trainable Param."""


class SwiGLU(nnx.Module):
    def __init__(self, d_model: int, hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.w_gate = Linear(
            d_model, hidden, use_bias=False, axes=("embed", "mlp"), dtype=dtype, rngs=rngs
        )
        self.w_up = Linear(
            d_model, hidden, use_bias=False, axes=("embed", "mlp"), dtype=dtype, rngs=rngs
        )
        self.w_down = Linear(
            hidden, d_model, use_bias=False, axes=("mlp", "embed"), dtype=dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w_down(jax.nn.silu(self.w_gate(x)) * self.w_up(x))


def gate_scores(logits_SxE: jax.Array, cfg: MoEConfig) -> jax.Array:
    """Router scores ``s``: sigmoid (DeepSeek-V3) or softmax of the router logits."""
    if cfg.score_func == "sigmoid":
        return jax.nn.sigmoid(logits_SxE)
    return jax.nn.softmax(logits_SxE, axis=-1)


def route(scores_SxE: jax.Array, bias_E: jax.Array, cfg: MoEConfig):
    """Top-k on biased scores; combine weights from the unbiased scores. -> (idx, weights)."""
    _, idx_SxK = jax.lax.top_k(scores_SxE + bias_E[None, :], cfg.top_k)
    w_SxK = jnp.take_along_axis(scores_SxE, idx_SxK, axis=-1)
    if cfg.norm_topk_prob:
        w_SxK = w_SxK / (jnp.sum(w_SxK, axis=-1, keepdims=True) + 1e-20)
    return idx_SxK, w_SxK * cfg.route_scale


def _block_size(rows: int, n_experts: int) -> int:
    """Power of two near a quarter of the mean rows per expert, in [8, 512]."""
    target = max(1, rows // (4 * n_experts))
    return int(min(512, max(8, 2 ** int(math.log2(target)))))


class MoE(nnx.Module):
    def __init__(self, cfg: MoEConfig, d_model: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        e, d, f = cfg.n_routed_experts, d_model, cfg.expert_hidden
        self.cfg, self.dtype = cfg, jnp.dtype(dtype)
        self.router = param(d**-0.5 * jax.random.normal(rngs.params(), (d, e)), ("embed", None))
        self.router_bias = RouterBias(jnp.zeros((e,), jnp.float32))
        ax_in, ax_out = ("expert", "embed", "mlp"), ("expert", "mlp", "embed")
        self.w_gate = param(d**-0.5 * jax.random.normal(rngs.params(), (e, d, f)), ax_in)
        self.w_up = param(d**-0.5 * jax.random.normal(rngs.params(), (e, d, f)), ax_in)
        self.w_down = param(f**-0.5 * jax.random.normal(rngs.params(), (e, f, d)), ax_out)
        self.shared = (
            SwiGLU(d, cfg.n_shared_experts * f, dtype=dtype, rngs=rngs)
            if cfg.n_shared_experts
            else None
        )

    def __call__(self, x_BxTxD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """-> (y [B,T,D], load [E]: how many tokens selected each expert)."""
        b, t, d = x_BxTxD.shape
        cfg, e, k = self.cfg, self.cfg.n_routed_experts, self.cfg.top_k
        x_SxD = x_BxTxD.reshape(b * t, d).astype(self.dtype)
        dispatch = cfg.dispatch
        if dispatch == "ep":  # expert parallelism over the mesh: engram_jax.moe_ep
            from engram_jax.moe_ep import ep_routed, has_expert_axis

            if has_expert_axis():
                y_SxD, load_E = ep_routed(self, x_SxD)
                if self.shared is not None:
                    y_SxD = y_SxD + self.shared(x_SxD)
                return y_SxD.reshape(b, t, d), load_E
            dispatch = "blocked"  # no mesh to split the experts over: all of them, here
        scores_SxE = gate_scores(x_SxD.astype(jnp.float32) @ self.router[...], cfg)
        idx_SxK, w_SxK = route(scores_SxE, jax.lax.stop_gradient(self.router_bias[...]), cfg)
        # 1. each assignment's row within its expert, in token order (a stable sort by expert)
        expert_R = idx_SxK.reshape(-1)
        load_E = jnp.bincount(expert_R, length=e)
        rank_R = _rank_within_expert(expert_R, load_E)
        # 2. every expert's SwiGLU on its rows; the R rows stay in assignment order (token s,
        #    choice j at s*K + j), so the token's copies are a broadcast, not a gather, and the
        #    combine below is a sum over K, not a scatter-add
        xr_RxD = jnp.broadcast_to(x_SxD[:, None, :], (b * t, k, d)).reshape(b * t * k, d)
        ys_RxD = getattr(self, f"_{dispatch}")(xr_RxD, expert_R, rank_R, load_E)
        # 3. weight by the unbiased scores and sum each token's K outputs
        ys_SxKxD = ys_RxD.reshape(b * t, k, d)
        y_SxD = jnp.einsum("skd,sk->sd", ys_SxKxD, w_SxK.astype(ys_RxD.dtype))
        if self.shared is not None:
            y_SxD = y_SxD + self.shared(x_SxD)
        return y_SxD.reshape(b, t, d), load_E

    def _weights(self):
        return (
            self.w_gate[...].astype(self.dtype),
            self.w_up[...].astype(self.dtype),
            self.w_down[...].astype(self.dtype),
        )

    def _ragged(self, xr_RxD, expert_R, rank_R, load_E):
        start_E = jnp.cumsum(load_E) - load_E
        dest_R = start_E[expert_R] + rank_R  # position in expert-sorted order
        xs_RxD = jnp.zeros_like(xr_RxD).at[dest_R].set(xr_RxD, unique_indices=True)
        wg_ExDxF, wu_ExDxF, wd_ExFxD = self._weights()
        h_RxF = jax.nn.silu(jax.lax.ragged_dot(xs_RxD, wg_ExDxF, load_E)) * jax.lax.ragged_dot(
            xs_RxD, wu_ExDxF, load_E
        )
        return jax.lax.ragged_dot(h_RxF, wd_ExFxD, load_E)[dest_R]

    def _blocked(self, xr_RxD, expert_R, rank_R, load_E):
        rows, d = xr_RxD.shape
        e = load_E.shape[0]
        bs = _block_size(rows, e)
        n_blocks = -(-rows // bs) + e  # each expert wastes less than one block
        padded_E = -(-load_E // bs) * bs
        pstart_E = jnp.cumsum(padded_E) - padded_E
        dest_R = pstart_E[expert_R] + rank_R
        buf_PxD = (
            jnp.zeros((n_blocks * bs, d), xr_RxD.dtype).at[dest_R].set(xr_RxD, unique_indices=True)
        )
        buf_NxBxD = buf_PxD.reshape(n_blocks, bs, d)
        block_expert_N = jnp.searchsorted(
            jnp.cumsum(padded_E), jnp.arange(n_blocks) * bs, side="right"
        )
        block_expert_N = jnp.minimum(block_expert_N, e - 1)  # trailing empty blocks
        wg_ExDxF, wu_ExDxF, wd_ExFxD = self._weights()
        # gate and up side by side: one weight gather and one batched matmul for both
        wgu_NxDx2F = jnp.concatenate([wg_ExDxF, wu_ExDxF], axis=-1)[block_expert_N]
        gu_NxBx2F = jnp.einsum("nbd,ndf->nbf", buf_NxBxD, wgu_NxDx2F)
        f = wg_ExDxF.shape[-1]
        h_NxBxF = jax.nn.silu(gu_NxBx2F[..., :f]) * gu_NxBx2F[..., f:]
        out_NxBxD = jnp.einsum("nbf,nfd->nbd", h_NxBxF, wd_ExFxD[block_expert_N])
        return out_NxBxD.reshape(n_blocks * bs, d)[dest_R]

    def _capacity(self, xr_RxD, expert_R, rank_R, load_E):
        rows, d = xr_RxD.shape
        e = load_E.shape[0]
        cap = max(1, math.ceil(self.cfg.capacity_factor * rows / e))
        buf_ExCxD = (
            jnp.zeros((e, cap, d), xr_RxD.dtype).at[expert_R, rank_R].set(xr_RxD, mode="drop")
        )
        wg_ExDxF, wu_ExDxF, wd_ExFxD = self._weights()
        h_ExCxF = jax.nn.silu(jnp.einsum("ecd,edf->ecf", buf_ExCxD, wg_ExDxF)) * jnp.einsum(
            "ecd,edf->ecf", buf_ExCxD, wu_ExDxF
        )
        out_ExCxD = jnp.einsum("ecf,efd->ecd", h_ExCxF, wd_ExFxD)
        kept_R = (rank_R < cap)[:, None]
        return jnp.where(kept_R, out_ExCxD[expert_R, jnp.minimum(rank_R, cap - 1)], 0)


def _rank_within_expert(expert_R: jax.Array, load_E: jax.Array) -> jax.Array:
    """For each assignment, how many earlier assignments (in token order) chose its expert."""
    order_R = jnp.argsort(expert_R, stable=True)
    start_E = jnp.cumsum(load_E) - load_E
    pos_R = (
        jnp.zeros_like(expert_R)
        .at[order_R]
        .set(jnp.arange(expert_R.shape[0], dtype=expert_R.dtype), unique_indices=True)
    )
    return pos_R - start_E[expert_R]


def bias_step(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
    """Loss-free balancing: raise under-loaded experts, lower over-loaded ones."""
    load_E = load_E.astype(jnp.float32)
    return bias_E + rate * jnp.sign(jnp.mean(load_E) - load_E)


def update_router_bias(model_or_state, loads: dict, rate: float):
    """Apply :func:`bias_step` to every MoE layer's :class:`RouterBias`.

    ``loads``: ``{block_index: load [E]}`` (``aux["moe_loads"]`` of :class:`EngramLM`).
    A Module is updated in place (usable inside ``nnx.jit``) and returned; an ``nnx.State``
    (e.g. ``nnx.state(model, RouterBias)``) is not modified: a new State is returned.
    """
    if isinstance(model_or_state, nnx.Module):
        for i, load_E in loads.items():
            bias = model_or_state.blocks[i].ffn.router_bias
            bias[...] = bias_step(bias[...], load_E, rate)
        return model_or_state
    flat = dict(nnx.to_flat_state(model_or_state))
    new = {}
    for path, var in flat.items():
        layer = path[1] if len(path) > 2 and path[0] == "blocks" else None
        if layer in loads and path[-1] == "router_bias":
            var = var.replace(bias_step(var[...], loads[layer], rate))
        new[path] = var
    return nnx.from_flat_state(new)


def moe_params(cfg: MoEConfig, d_model: int) -> dict:
    """Analytic parameter counts of one MoE sublayer (mirrors :class:`MoE`)."""
    expert = 3 * d_model * cfg.expert_hidden
    return {
        "router": d_model * cfg.n_routed_experts,
        "routed_experts": cfg.n_routed_experts * expert,
        "shared_experts": cfg.n_shared_experts * expert,
        "expert": expert,
    }
