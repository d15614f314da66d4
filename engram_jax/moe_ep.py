"""Expert-parallel MoE dispatch (``MoEConfig.dispatch = "ep"``): all-to-all over ``expert``.

The routed experts' weights are split over the ``expert`` mesh axis (n devices, E/n experts
each, never gathered whole); tokens stay split over the batch axes. Inside one
``jax.shard_map`` over the whole mesh, each device:

  1. takes its 1/n slice of the batch shard's tokens (the batch is replicated over
     ``expert``, so the n devices of an expert group split it instead of repeating it);
  2. routes them (same :func:`engram_jax.moe.route` as every dispatch) and packs each
     (token, expert) assignment into a send buffer ``[n, C, D]`` by destination device,
     ``C = min(s * K, ceil(capacity_factor * s * K / n))`` slots per destination
     (assignments beyond C are dropped, as in ``"capacity"``; ``capacity_factor >= n`` never
     drops);
  3. ``all_to_all`` over ``expert``: each device receives the rows for its own experts, runs
     them through its E/n SwiGLU experts (:func:`grouped_matmul` on rows sorted by local
     expert), and sends the outputs back with a second ``all_to_all``;
  4. combines the weighted outputs per token and all-gathers the n token slices over
     ``expert`` (restoring the batch layout the rest of the block uses).

Per device and MoE layer the forward moves 2 x n x C x D activations through all-to-all (the
backward the same again) and all-gathers s x n x D outputs; expert weights move only along
the FSDP/tensor axes that also split them. The expert load (for loss-free balancing) is
summed over every device, so it equals the other dispatches' load.

Needs a mesh context (``with jax.set_mesh(mesh):`` around lowering) holding an ``expert``
axis that divides E, and a batch shard divisible by the expert axis size. Without one (e.g. a
trained model called on its own for generation or analysis) :class:`engram_jax.moe.MoE` runs
its experts with the dropless ``"blocked"`` dispatch instead.

Shape legend: S tokens of the batch shard, s = S/n tokens of this device's slice, D d_model,
E routed experts (L = E/n local), F expert hidden, K top-k, A = s*K assignments,
C slots per destination device, n expert-axis size, Q = n*C received rows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from engram_jax import sharding as shd

AXIS = "expert"


def has_expert_axis() -> bool:
    """Whether the mesh context (``jax.set_mesh``) has an ``expert`` axis to split over."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and AXIS in mesh.axis_names


def _mesh():
    mesh = jax.sharding.get_abstract_mesh()
    if not has_expert_axis():
        raise ValueError(
            "moe.dispatch='ep' needs a mesh context with an 'expert' axis: lower the step "
            "inside `with jax.set_mesh(mesh):`"
        )
    return mesh


def _pack(dest_A, n: int, cap: int):
    """Slot of every assignment in its destination's buffer (stable: token order); slot ``cap``
    or more means dropped."""
    order_A = jnp.argsort(dest_A, stable=True)
    count_n = jnp.bincount(dest_A, length=n)
    start_n = jnp.cumsum(count_n) - count_n
    rank_sorted_A = jnp.arange(dest_A.shape[0]) - start_n[dest_A[order_A]]
    return jnp.zeros_like(dest_A).at[order_A].set(rank_sorted_A)


def grouped_matmul(x_QxD, w_LxDxF, sizes_L, *, interpret: bool = False):
    """``x`` rows grouped in order (``sizes_L`` rows for matrix l, the rest in no group)
    times their group's matrix: ``[Q, F]`` in ``x``'s dtype, zeros in rows of no group (the
    Pallas kernel leaves those rows, and their input gradient, unwritten: both are masked).

    Compiled for TPU: the Pallas grouped matmul (megablox ``gmm``), whose backward computes
    the weight gradient with a grouped kernel (``tgmm``). XLA's TPU lowering of
    ``ragged_dot``'s weight gradient is a dense contraction of all Q rows with every group's
    mask (L times the routed FLOPs, and the slowest kernels of the step to generate code for:
    BENCHMARKS.md, TPU compile profile). Elsewhere ``jax.lax.ragged_dot``. ``interpret``
    runs the TPU kernel in Pallas' interpreter (any backend; for tests)."""
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    def tpu(x_QxD, w_LxDxF, sizes_L):
        tiling = tuple(min(128, d) for d in (x_QxD.shape[0], *w_LxDxF.shape[1:]))
        return gmm(x_QxD, w_LxDxF, sizes_L, x_QxD.dtype, tiling, None, None, False, interpret)

    in_Qx1 = (jnp.arange(x_QxD.shape[0]) < jnp.sum(sizes_L))[:, None]
    x_QxD = jnp.where(in_Qx1, x_QxD, 0)
    if interpret:
        y_QxF = tpu(x_QxD, w_LxDxF, sizes_L)
    else:
        other = lambda x_QxD, w_LxDxF, sizes_L: jax.lax.ragged_dot(x_QxD, w_LxDxF, sizes_L)
        y_QxF = jax.lax.platform_dependent(x_QxD, w_LxDxF, sizes_L, tpu=tpu, default=other)
    return jnp.where(in_Qx1, y_QxF, 0)


def _local_experts(x_QxD, expert_Q, valid_Q, wg_LxDxF, wu_LxDxF, wd_LxFxD, interpret=False):
    """SwiGLU of each received row by its local expert (invalid rows -> zeros)."""
    n_local = wg_LxDxF.shape[0]
    key_Q = jnp.where(valid_Q, expert_Q, n_local)  # invalid rows sort last, in no group
    order_Q = jnp.argsort(key_Q, stable=True)
    xs_QxD = x_QxD[order_Q]
    sizes_L = jnp.bincount(key_Q, length=n_local + 1)[:n_local].astype(jnp.int32)
    mm = lambda x, w: grouped_matmul(x, w, sizes_L, interpret=interpret)
    h_QxF = jax.nn.silu(mm(xs_QxD, wg_LxDxF)) * mm(xs_QxD, wu_LxDxF)
    ys_QxD = mm(h_QxF, wd_LxFxD)  # zeros in the rows of no expert
    return jnp.zeros_like(ys_QxD).at[order_Q].set(ys_QxD)


def _split(mesh, n_experts: int, n_tokens: int) -> tuple[tuple[str, ...], int]:
    """The batch axes the tokens are sharded over, and ``s``: tokens per device (each batch
    shard's tokens are cut again over the ``expert`` axis)."""
    n = mesh.shape[AXIS]
    if n_experts % n:
        raise ValueError(
            f"moe.n_routed_experts={n_experts} must be a multiple of the expert axis ({n})"
        )
    batch = tuple(a for a in shd.batch_axes() if mesh.shape[a] > 1)
    shards = math.prod(mesh.shape[a] for a in batch)
    if n_tokens % (shards * n):
        raise ValueError(
            f"{n_tokens} tokens per MoE layer do not split over {shards} batch shards "
            f"x {n} expert devices"
        )
    return batch, n_tokens // (shards * n)


def _send_buffers(x_sxD, token_A, dest_A, slot_A, local_A, n: int, cap: int):
    """Each assignment's token row and local expert id at its (destination device, slot); slots
    past ``cap`` are dropped (the local expert id of an empty slot is -1)."""
    put = dict(mode="drop")
    send_nxCxD = jnp.zeros((n, cap, x_sxD.shape[1]), x_sxD.dtype)
    send_nxCxD = send_nxCxD.at[dest_A, slot_A].set(x_sxD[token_A], **put)
    meta_nxC = jnp.full((n, cap), -1, jnp.int32).at[dest_A, slot_A].set(local_A, **put)
    return send_nxCxD, meta_nxC


def _stored_spec(mesh, variable, value) -> P:
    """``value``'s PartitionSpec as the rule table stores ``variable`` (FSDP-split along
    ``embed``, ...), its ``expert`` dimension (if any) on the expert axis, size-1 axes left out."""
    spec = shd.logical_to_spec(shd.variable_logical_axes(variable), shape=value.shape, mesh=mesh)
    out = []
    for axes in (*spec, *(None,) * (value.ndim - len(spec))):
        axes = (axes,) if isinstance(axes, str) else axes or ()
        kept = tuple(a for a in axes if a == AXIS or mesh.shape[a] > 1)
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return P(*out)


def _gather(w, spec: P):
    """Inside the shard_map: the whole of ``w`` along every dimension but the expert one.
    The transpose of this all-gather is a reduce-scatter: each device's gradient of a stored
    shard is summed over the devices that split it, and only that shard is kept. (Entering the
    shard_map replicated, ``P(AXIS)``, the weights' gradients were psummed whole over the
    FSDP axes by the shard_map's transpose: an all-reduce of every expert's weights per MoE
    layer, BENCHMARKS.md, TPU profile.)"""
    for dim, axes in enumerate(spec):
        if axes is not None and axes != AXIS:
            w = jax.lax.all_gather(w, axes, axis=dim, tiled=True)
    return w


def ep_routed(moe, x_SxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Routed-expert output ``y [S, D]`` and expert load ``[E]`` of :class:`engram_jax.moe.MoE`
    ``moe`` for global tokens ``x_SxD`` (batch-sharded), experts split over ``expert``. The
    router and expert weights enter as stored (split over FSDP too) and are gathered inside."""
    cfg, mesh = moe.cfg, _mesh()
    n, e, k = mesh.shape[AXIS], cfg.n_routed_experts, cfg.top_k
    batch, s = _split(mesh, e, x_SxD.shape[0])
    # a destination receives at most this device's s*K assignments: slots beyond are never
    # filled (on an expert axis of 1, capacity_factor 2 doubled every dispatch buffer)
    cap = max(1, min(s * k, math.ceil(cfg.capacity_factor * s * k / n)))
    wg, wu, wd = moe._weights()
    router = moe.router[...]
    bias = jax.lax.stop_gradient(moe.router_bias[...])
    spec_r = _stored_spec(mesh, moe.router, router)
    spec_in, spec_out = _stored_spec(mesh, moe.w_gate, wg), _stored_spec(mesh, moe.w_down, wd)
    if spec_in[0] != AXIS or spec_out[0] != AXIS:
        raise ValueError(f"routed expert weights must be split over {AXIS!r} first")

    def local(x_nsxD, router_DxE, bias_E, wg_LxDxF, wu_LxDxF, wd_LxFxD):
        from engram_jax.moe import gate_scores, route

        router_DxE = _gather(router_DxE, spec_r)
        wg_LxDxF, wu_LxDxF = _gather(wg_LxDxF, spec_in), _gather(wu_LxDxF, spec_in)
        wd_LxFxD = _gather(wd_LxFxD, spec_out)
        i = jax.lax.axis_index(AXIS)
        x_sxD = jax.lax.dynamic_slice_in_dim(x_nsxD, i * s, s)
        scores_sxE = gate_scores(x_sxD.astype(jnp.float32) @ router_DxE, cfg)
        idx_sxK, w_sxK = route(scores_sxE, bias_E, cfg)
        expert_A = idx_sxK.reshape(-1)
        dest_A, local_A = expert_A // (e // n), expert_A % (e // n)
        slot_A = _pack(dest_A, n, cap)
        token_A = jnp.arange(s * k) // k
        send_nxCxD, meta_nxC = _send_buffers(x_sxD, token_A, dest_A, slot_A, local_A, n, cap)
        recv_nxCxD = jax.lax.all_to_all(send_nxCxD, AXIS, 0, 0, tiled=True)
        rmeta_nxC = jax.lax.all_to_all(meta_nxC, AXIS, 0, 0, tiled=True)
        out_QxD = _local_experts(
            recv_nxCxD.reshape(n * cap, -1),
            rmeta_nxC.reshape(-1),
            rmeta_nxC.reshape(-1) >= 0,
            wg_LxDxF,
            wu_LxDxF,
            wd_LxFxD,
        )
        back_nxCxD = jax.lax.all_to_all(out_QxD.reshape(n, cap, -1), AXIS, 0, 0, tiled=True)
        kept_A = slot_A < cap
        got_AxD = back_nxCxD.at[dest_A, jnp.minimum(slot_A, cap - 1)].get()
        got_AxD = jnp.where(kept_A[:, None], got_AxD * w_sxK.reshape(-1, 1).astype(x_sxD.dtype), 0)
        y_sxD = jnp.zeros_like(x_sxD).at[token_A].add(got_AxD)
        y_nsxD = jax.lax.all_gather(y_sxD, AXIS, tiled=True)
        load_E = jax.lax.psum(jnp.bincount(expert_A, length=e), (*batch, AXIS))
        return y_nsxD, load_E

    fn = jax.shard_map(
        local,
        in_specs=(P(batch), spec_r, P(), spec_in, spec_in, spec_out),
        out_specs=(P(batch), P()),
        check_vma=False,
    )
    return fn(x_SxD, router, bias, wg, wu, wd)
