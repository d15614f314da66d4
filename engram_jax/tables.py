"""Giant Engram tables: sharded row lookup and sparse row-wise Adam (ENGRAM_SPEC section 8).

Why: the gradient of a gather is a dense table-sized array, and on a row-sharded table XLA
turns it into a table-sized all-reduce (JAX_NOTES, "Giant tables"). Here the model never
differentiates through the table. The training step instead

  1. looks up rows outside the gradient: ``rows = sharded_lookup(mesh, table, ids)``;
  2. differentiates the loss w.r.t. the gathered rows (``row_grads``, shaped like ``rows``);
  3. all-gathers ids and row gradients over the batch axes; each table shard merges duplicate
     ids and applies Adam to the rows it owns (:func:`sparse_tables_step`).

Every collective is sized by the number of looked-up rows N (global batch x seq x heads),
never by the table: forward all-gather of N ids + reduce-scatter of [N, d] rows, backward
all-gather of N ids + [N, d] gradients, plus a scalar for the gradient norm.

Row-wise Adam semantics. State per table: ``mu``, ``nu`` shaped like the table, ``last``
(int32 [R]: the step through which the row's parameters and moments are up to date; -1 before
its first touch) and the global step. Two semantics (``EngramConfig.lazy_adam``):

- **Adam (default): exact catch-up.** Dense ``optax.adam`` keeps moving a row after its last
  gradient: at every zero-gradient step s, ``m <- b1 m``, ``v <- b2 v`` and
  ``p <- p - lr_s m_hat / (sqrt(v_hat) + eps)`` with the bias corrections of count s + 1.
  Before a row is read at step t (:func:`sharded_catch_up`, and at lookup time in evaluation,
  :func:`sharded_lookup` with ``catch_up``), its missed steps ``last+1 .. t-1`` are replayed
  with exactly that arithmetic and the lr schedule (:func:`catch_up_rows`). Moments decay in
  closed form (``b1**gap``); the parameter's remaining motion is a sum whose terms shrink at
  least like ``(b1/sqrt(b2))**k`` (Cauchy-Schwarz bounds ``|m|/sqrt(v)``), so the replay stops
  after :func:`catch_up_horizon` steps (265 for b1 0.9, b2 0.95), where the neglected tail is
  below 1e-7 x lr. Per touched row the work is O(horizon x d): independent of the table size.
  Then the row's update at t is ``optax.adam``'s. Result: every row equals dense Adam to fp32.
- **Lazy Adam** (``lazy_adam=True``): the usual sparse-embedding optimizer: an untouched row's
  moments do not decay and its parameters do not move; the bias correction uses the global
  step. A row hit once moves ~13x less in total than under Adam (b1 0.9, b2 0.95).

Checkpoints store the lazy form (table, moments, ``last``), which resumes exactly; to export
tables equal to dense Adam's, :func:`catch_up_all` replays every row once (O(R x horizon)).

In place: the update reads and writes K = N rows of three tables. Call it inside a jit that
DONATES the table, mu and nu (``donate_argnums``); without donation XLA copies all three
tables every step, which dominates the step on big tables.

The train step (:func:`engram_jax.step.make_train_step`) calls :func:`sharded_catch_up` on the
batch's ids, gathers the rows, differentiates the loss w.r.t. them and calls
:func:`sparse_tables_step`.

Limits: every device all-gathers all N ids and row gradients and sorts N ids, so per-device
work and traffic are O(N d) in the GLOBAL lookup count. That is the right order for this
project's meshes; for very large global batches an all-to-all to row owners with a capacity
factor (paper section 8) would make it O(N d / S).

Shape legend: R table rows (padded to the shard count), d row width, S table shards,
N looked-up ids (global), n ids per batch shard, K unique slots (= N).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from engram_jax import sharding as shd
from engram_jax.catch_up import (
    NO_GAP,
    CatchUp,
    catch_up_horizon,
    catch_up_rows,
    catch_up_touched,
)

# ---------------------------------------------------------------------------------------------
# Single device


def merge_duplicate_rows(ids_N: jax.Array, grads_NxD: jax.Array, num_rows: int):
    """Sum the gradients of repeated ids. Returns ``(rows_K, grads_KxD)`` with K = N.

    ``rows_K`` is strictly increasing: the distinct in-range ids, then out-of-range slots
    ``num_rows + k`` (padding, and the merged ids outside [0, num_rows)) with zero gradient,
    which the scatter drops. Distinct sorted indices let the scatter run with ``unique_indices``.
    """
    N = ids_N.shape[0]
    ids_N = ids_N.astype(jnp.int32)
    ids_N = jnp.where((ids_N >= 0) & (ids_N < num_rows), ids_N, num_rows)
    uniq_K, inv_N = jnp.unique(ids_N, size=N, fill_value=num_rows, return_inverse=True)
    grads_KxD = jax.ops.segment_sum(
        grads_NxD, inv_N.reshape(-1), num_segments=N, indices_are_sorted=False
    )
    valid_K = uniq_K < num_rows
    rows_K = jnp.where(valid_K, uniq_K, num_rows + jnp.arange(N, dtype=jnp.int32))
    return rows_K, jnp.where(valid_K[:, None], grads_KxD, 0)


def adam_rows(
    table, mu, nu, rows_K, grads_KxD, step, lr, b1=0.9, b2=0.999, eps=1e-8, grad_scale=1.0
):
    """Adam on the distinct sorted ``rows_K`` only (output of :func:`merge_duplicate_rows`).

    ``step`` is the 0-based index of this update (optax's ``count`` before it), so the bias
    correction uses ``step + 1``. Arithmetic mirrors ``optax.adam`` (eps_root = 0).
    """
    at = {"mode": "fill", "fill_value": 0, "indices_are_sorted": True, "unique_indices": True}
    g = grads_KxD.astype(mu.dtype) * grad_scale
    mu_K = b1 * mu.at[rows_K].get(**at) + (1 - b1) * g  # optax: (1-b) g + b m, same terms
    nu_K = b2 * nu.at[rows_K].get(**at) + (1 - b2) * (g * g)
    count = jnp.asarray(step, jnp.int32) + 1
    mu_hat = mu_K / (1 - jnp.asarray(b1, mu.dtype) ** count).astype(mu.dtype)
    nu_hat = nu_K / (1 - jnp.asarray(b2, nu.dtype) ** count).astype(nu.dtype)
    p_K = table.at[rows_K].get(**at) - lr * (mu_hat / (jnp.sqrt(nu_hat) + eps))
    put = {"mode": "drop", "indices_are_sorted": True, "unique_indices": True}
    return (
        table.at[rows_K].set(p_K.astype(table.dtype), **put),
        mu.at[rows_K].set(mu_K, **put),
        nu.at[rows_K].set(nu_K, **put),
    )


def sparse_adam_update(
    table, mu, nu, ids_flat, row_grads_flat, step, lr, b1=0.9, b2=0.999, eps=1e-8, *, grad_scale=1.0
):
    """Row-wise Adam on one unsharded table: merge duplicate ids, update those rows only.

    table, mu, nu: [R, d]; ids_flat: [N] int; row_grads_flat: [N, d] (gradient of the loss
    w.r.t. each looked-up row); step: 0-based global step; lr: scalar (already multiplied by
    the table lr multiplier). Ids outside [0, R) are ignored. Returns (table, mu, nu).
    Donate table, mu and nu to the enclosing jit, else all three are copied.
    """
    rows_K, grads_KxD = merge_duplicate_rows(
        ids_flat.reshape(-1), row_grads_flat.reshape(-1, table.shape[-1]), table.shape[0]
    )
    return adam_rows(table, mu, nu, rows_K, grads_KxD, step, lr, b1, b2, eps, grad_scale)


def init_moments(table: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Zero (mu, nu) shaped and sharded like ``table``."""
    s = table.sharding
    return jax.jit(lambda t: (jnp.zeros_like(t), jnp.zeros_like(t)), out_shardings=(s, s))(table)


def init_last(table: jax.Array) -> jax.Array:
    """Per-row ``last`` step (int32 [R], -1: never updated), sharded like the table's rows."""
    spec = P(*table.sharding.spec[:1]) if isinstance(table.sharding, NamedSharding) else None
    out = None if spec is None else NamedSharding(table.sharding.mesh, spec)
    return jax.jit(lambda: jnp.full(table.shape[:1], -1, jnp.int32), out_shardings=out)()


# ---------------------------------------------------------------------------------------------
# Row-sharded tables on a mesh


def _axes(mesh: Mesh) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(batch axes, table axes, table axes not in the batch axes) of size > 1 in ``mesh``:
    collectives over size-1 axes are not always elided by XLA."""
    live = lambda axes: tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
    batch, table = live(shd.batch_axes()), live(shd.table_axes())
    return batch, table, tuple(a for a in table if a not in batch)


def _owned(ids_N: jax.Array, rows_per_shard: int, table_axes: tuple[str, ...]) -> jax.Array:
    """Global ids -> this shard's local row index; rows owned elsewhere -> out of range."""
    lo = jax.lax.axis_index(table_axes) * rows_per_shard if table_axes else 0
    local = ids_N.astype(jnp.int32) - lo
    return jnp.where((local >= 0) & (local < rows_per_shard), local, rows_per_shard)


def sharded_lookup(
    mesh: Mesh, table: jax.Array, ids: jax.Array, catch_up: CatchUp | None = None
) -> jax.Array:
    """``table[ids]`` for a table row-sharded over every device and ids batch-sharded.

    ids: [B, ...] int (dimension 0 over the batch axes); returns [B, ..., d] sharded likewise.
    Each shard reads its own rows for all N ids (zeros elsewhere), then a reduce-scatter over
    the batch axes (and an all-reduce over the remaining table axes) hands every device the
    rows of its ids: traffic O(N d), independent of R. Not differentiable w.r.t. the table by
    design: differentiate w.r.t. the returned rows and use :func:`sparse_tables_step`.
    ``catch_up``: return the rows caught up to ``step - 1`` (evaluation under exact Adam)
    without writing anything.
    """
    batch, taxes, rest = _axes(mesh)
    R, D = table.shape
    S = shd.shard_count_for_tables(mesh)
    c = catch_up
    horizon = 0 if c is None else catch_up_horizon(c.b1, c.b2)

    def local(table_rxD, mu, nu, last, step, ids_b):
        ids_n = ids_b.reshape(-1)
        ids_N = jax.lax.all_gather(ids_n, batch, tiled=True) if batch else ids_n
        local_N = _owned(ids_N, R // S, taxes)
        rows_NxD = table_rxD.at[local_N].get(mode="fill", fill_value=0)
        if c is not None:
            get = lambda x: x.at[local_N].get(mode="fill", fill_value=0)
            last_N = last.at[local_N].get(mode="fill", fill_value=NO_GAP)
            args = (get(mu), get(nu), last_N, step, c.lr_fn, c.b1, c.b2, c.eps, horizon)
            rows_NxD = catch_up_rows(rows_NxD.astype(mu.dtype), *args)[0].astype(table.dtype)
        rows_nxD = (
            jax.lax.psum_scatter(rows_NxD, batch, scatter_dimension=0, tiled=True)
            if batch
            else rows_NxD
        )
        if rest:
            rows_nxD = jax.lax.psum(rows_nxD, rest)
        return rows_nxD.reshape(ids_b.shape + (D,))

    row, vec = P(taxes, None), P(taxes)
    if c is None:  # placeholders, unused
        extra, specs = (table, table, jnp.zeros((R,), jnp.int32), 0), (row, row, vec, P())
    else:
        extra, specs = (c.mu, c.nu, c.last, jnp.asarray(c.step, jnp.int32)), (row, row, vec, P())
    fn = jax.shard_map(
        local, mesh=mesh, in_specs=(row, *specs, P(batch)), out_specs=P(batch), check_vma=False
    )
    return fn(table, *extra, ids)


def sharded_catch_up(mesh: Mesh, table, mu, nu, last, ids, step, lr_fn, b1, b2, eps, **chunk):
    """:func:`catch_up_touched` on a row-sharded table from batch-sharded ids (all-gathered
    over the batch axes: O(N) traffic). Returns ``(table, mu, nu, last)``; donate them.
    ``chunk=``: rows replayed together (:func:`engram_jax.catch_up.catch_up_rows`)."""
    batch, taxes, _ = _axes(mesh)
    horizon = catch_up_horizon(b1, b2)

    def local(t, m, v, lst, ids_b, step):
        ids_N = ids_b.reshape(-1)
        if batch:
            ids_N = jax.lax.all_gather(ids_N, batch, tiled=True)
        local_N = _owned(ids_N, t.shape[0], taxes)
        return catch_up_touched(t, m, v, lst, local_N, step, lr_fn, b1, b2, eps, horizon, **chunk)

    row, vec = P(taxes, None), P(taxes)
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(row, row, row, vec, P(batch), P()),
        out_specs=(row, row, row, vec),
        check_vma=False,
    )
    return fn(table, mu, nu, last, ids, jnp.asarray(step, jnp.int32))


class MergedRowGrads(NamedTuple):
    """Per-shard merged row gradients: shard s holds K slots of local row ids and their summed
    gradients (global arrays [S*K] and [S*K, d], dimension 0 over the table axes)."""

    rows: jax.Array
    grads: jax.Array

    def sq_norm(self) -> jax.Array:
        """Squared norm of the table's whole (dense-equivalent) gradient."""
        return jnp.sum(jnp.square(self.grads.astype(jnp.float32)))


def sharded_merge_row_grads(
    mesh: Mesh, ids: jax.Array, row_grads: jax.Array, num_rows: int
) -> MergedRowGrads:
    """All-gather ids and row gradients over the batch axes; each table shard keeps and merges
    the ids it owns. ids: [B, ...]; row_grads: [B, ..., d], both batch-sharded."""
    batch, taxes, _ = _axes(mesh)
    S = shd.shard_count_for_tables(mesh)
    D = row_grads.shape[-1]

    def local(ids_b, g_b):
        ids_n, g_nxD = ids_b.reshape(-1), g_b.reshape(-1, D)
        if batch:
            ids_n = jax.lax.all_gather(ids_n, batch, tiled=True)
            g_nxD = jax.lax.all_gather(g_nxD, batch, tiled=True)
        local_N = _owned(ids_n, num_rows // S, taxes)
        return MergedRowGrads(*merge_duplicate_rows(local_N, g_nxD, num_rows // S))

    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(batch), P(batch)),
        out_specs=MergedRowGrads(P(taxes), P(taxes, None)),
        check_vma=False,
    )
    return fn(ids, row_grads)


def sharded_apply_adam(
    mesh: Mesh,
    table,
    mu,
    nu,
    merged: MergedRowGrads,
    step,
    lr,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    *,
    grad_scale=1.0,
):
    """Adam on each shard's merged rows (local compute only, no communication)."""
    _, taxes, _ = _axes(mesh)
    spec = P(taxes, None)

    def local(t, m, v, rows_K, g_KxD, step, lr, scale):
        return adam_rows(t, m, v, rows_K, g_KxD, step, lr, b1, b2, eps, scale)

    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(spec, spec, spec, P(taxes), spec, P(), P(), P()),
        out_specs=(spec, spec, spec),
        check_vma=False,
    )
    return fn(
        table,
        mu,
        nu,
        merged.rows,
        merged.grads,
        jnp.asarray(step, jnp.int32),
        jnp.asarray(lr, jnp.float32),
        jnp.asarray(grad_scale, jnp.float32),
    )


def clip_scale(sq_norm: jax.Array, max_norm: float) -> jax.Array:
    """optax.clip_by_global_norm's factor for a global squared norm (1 when max_norm is 0)."""
    if not max_norm:
        return jnp.ones((), jnp.float32)
    norm = jnp.sqrt(sq_norm)
    return jnp.where(norm < max_norm, 1.0, max_norm / norm).astype(jnp.float32)


def sparse_tables_step(
    mesh: Mesh,
    tables: dict,
    mus: dict,
    nus: dict,
    ids: dict,
    row_grads: dict,
    step,
    lr,
    *,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    clip_norm: float = 0.0,
    other_sq_norm: Any = 0.0,
):
    """Sparse Adam on several tables (dicts keyed alike) with ONE global-norm clip.

    The clip norm is over the backbone gradients (``other_sq_norm``, their squared global
    norm) and the merged gradients of every table, i.e. exactly the norm the dense path clips.
    Returns ``(tables, mus, nus, table_sq_norm)``; pass ``table_sq_norm`` to the optax update
    (``table_sq_norm=`` keyword of :func:`engram_jax.optim.make_optimizer`'s transform) so the
    backbone is clipped by the same factor.
    """
    merged = {
        k: sharded_merge_row_grads(mesh, ids[k], row_grads[k], tables[k].shape[0]) for k in tables
    }
    table_sq = sum((m.sq_norm() for m in merged.values()), jnp.zeros((), jnp.float32))
    scale = clip_scale(other_sq_norm + table_sq, clip_norm)
    out = {
        k: sharded_apply_adam(
            mesh, tables[k], mus[k], nus[k], merged[k], step, lr, b1, b2, eps, grad_scale=scale
        )
        for k in tables
    }
    return (
        {k: o[0] for k, o in out.items()},
        {k: o[1] for k, o in out.items()},
        {k: o[2] for k, o in out.items()},
        table_sq,
    )
