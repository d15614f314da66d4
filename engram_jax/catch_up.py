"""Exact Adam for table rows that are not touched at every step (ENGRAM_SPEC section 5: the
tables train with Adam). See :mod:`engram_jax.tables`, "Row-wise Adam semantics".

Dense ``optax.adam`` keeps moving a row after its last gradient. At a zero-gradient step s
(0-based, count s + 1): ``m <- b1 m``, ``v <- b2 v``,
``p <- p - lr(s) (m / (1 - b1**(s+1))) / (sqrt(v / (1 - b2**(s+1))) + eps)``. A row last
updated at step ``last`` and read at step t misses steps ``last+1 .. t-1``; they are replayed
here with that arithmetic, for the touched rows only. Shape legend: K rows, D row width.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class CatchUp(NamedTuple):
    """What exact Adam needs to read rows as dense Adam holds them after ``step`` updates:
    the moments and ``last`` (sharded like the table's rows) and the table's Adam settings."""

    mu: jax.Array
    nu: jax.Array
    last: jax.Array
    step: Any
    lr_fn: Callable
    b1: float
    b2: float
    eps: float


NO_GAP = 2**30  # ``last`` read for out-of-range rows: nothing to replay


def catch_up_horizon(b1: float, b2: float, tol: float = 1e-7) -> int:
    """Zero-gradient steps after which a row's remaining Adam motion is below ``tol`` x lr.

    Term k of the motion is at most lr r**k / sqrt((1-b2)(1-r**2)) with r = b1/sqrt(b2)
    (Cauchy-Schwarz on m and v, bias corrections included), so the tail after H terms is at
    most lr r**(H+1) / ((1-r) sqrt((1-b2)(1-r**2))).
    """
    if b1 == 0:
        return 0
    r = b1 / math.sqrt(b2)
    if not r < 1:
        raise ValueError(
            f"exact table Adam needs b1**2 < b2 (optim.b1={b1}, optim.b2={b2}): the catch-up "
            "of untouched rows would not converge; set engram.lazy_adam=true"
        )
    c = (1 - r) * math.sqrt((1 - b2) * (1 - r * r))
    return max(1, math.ceil(math.log(tol * c) / math.log(r)) - 1)


def catch_up_gaps(last_K: jax.Array, step) -> jax.Array:
    """Zero-gradient steps to replay per row: ``last+1 .. step-1``. A row never updated
    (``last`` -1) has zero moments, so its replay is the identity (p - lr * 0 / eps): 0."""
    gap_K = jnp.maximum(jnp.asarray(step, jnp.int32) - 1 - last_K, 0)
    return jnp.where(last_K < 0, 0, gap_K)


def _replay(p_KxD, m_KxD, v_KxD, last_K, gap_K, lr_fn, b1f, b2f, eps, n):
    """Steps ``last+1 .. last+min(gap, n)`` of each row, as ``optax.adam`` with g = 0."""

    def body(k, carry):
        p, m, v = carry
        live = (k <= gap_K)[:, None]
        s_K = last_K + k
        m1, v1 = b1f * m, b2f * v
        m_hat = m1 / (1 - b1f ** (s_K + 1))[:, None]
        v_hat = v1 / (1 - b2f ** (s_K + 1))[:, None]
        p1 = p - lr_fn(s_K)[:, None] * (m_hat / (jnp.sqrt(v_hat) + eps))
        return jnp.where(live, p1, p), jnp.where(live, m1, m), jnp.where(live, v1, v)

    return jax.lax.fori_loop(1, n + 1, body, (p_KxD, m_KxD, v_KxD))


def catch_up_rows(p_KxD, m_KxD, v_KxD, last_K, step, lr_fn, b1, b2, eps, horizon, chunk=None):
    """Replay dense Adam's zero-gradient steps ``last+1 .. step-1`` on gathered rows.

    Each replayed step s is ``optax.adam``'s with g = 0 and count s + 1; after ``horizon``
    steps only the moments move (closed form). Returns ``(p, m, v)`` as after step - 1.

    ``chunk``: the rows must come ordered by gap, longest first (:func:`catch_up_touched`
    orders them). They are replayed ``chunk`` rows at a time, each chunk for its own longest
    gap, until a chunk whose longest gap is 0: the work is about sum_rows min(gap, horizon)
    instead of K x the longest gap of all (a few rows of real text always have long gaps).
    Per row the arithmetic is the same, so the result is bit-identical to ``chunk=None``.
    """
    gap_K = catch_up_gaps(last_K, step)
    b1f, b2f = jnp.asarray(b1, m_KxD.dtype), jnp.asarray(b2, v_KxD.dtype)
    args = (lr_fn, b1f, b2f, eps)
    K = p_KxD.shape[0]
    if chunk is None or chunk >= K:
        n = jnp.minimum(jnp.max(gap_K, initial=0), horizon)
        p, m, v = _replay(p_KxD, m_KxD, v_KxD, last_K, gap_K, *args, n)
    else:
        n_chunks = -(-K // chunk)

        def pending(carry):
            c = carry[0]
            return (c < n_chunks) & (gap_K[jnp.minimum(c * chunk, K - 1)] > 0)

        def one_chunk(carry):
            c, p, m, v = carry
            lo = jnp.minimum(c * chunk, K - chunk)  # the last chunk overlaps the one before
            sl = lambda x: jax.lax.dynamic_slice_in_dim(x, lo, chunk)
            fresh = lo + jnp.arange(chunk) >= c * chunk  # overlapped rows are already done
            gap_c = jnp.where(fresh, sl(gap_K), 0)
            n = jnp.minimum(jnp.max(gap_c), horizon)
            out = _replay(sl(p), sl(m), sl(v), sl(last_K), gap_c, *args, n)
            put = lambda x, y: jax.lax.dynamic_update_slice_in_dim(x, y, lo, 0)
            return (c + 1, *(put(x, y) for x, y in zip((p, m, v), out)))

        carry = (jnp.asarray(0, jnp.int32), p_KxD, m_KxD, v_KxD)
        _, p, m, v = jax.lax.while_loop(pending, one_chunk, carry)
    rest_K = jnp.maximum(gap_K - horizon, 0)[:, None]
    return p.astype(p_KxD.dtype), m * b1f**rest_K, v * b2f**rest_K


def unique_rows(ids_N: jax.Array, num_rows: int) -> jax.Array:
    """Distinct ids in [0, num_rows), sorted, then distinct out-of-range slots (K = N)."""
    N = ids_N.shape[0]
    ids_N = ids_N.astype(jnp.int32)
    ids_N = jnp.where((ids_N >= 0) & (ids_N < num_rows), ids_N, num_rows)
    uniq_K = jnp.unique(ids_N, size=N, fill_value=num_rows)
    return jnp.where(uniq_K < num_rows, uniq_K, num_rows + jnp.arange(N, dtype=jnp.int32))


def catch_up_touched(table, mu, nu, last, ids_flat, step, lr_fn, b1, b2, eps, horizon, chunk=256):
    """Catch up the rows of ``ids_flat`` to step - 1 in place and mark them ``last = step``
    (the update of this step follows). Returns ``(table, mu, nu, last)``; donate them.
    ``chunk``: see :func:`catch_up_rows`; the rows are gathered longest gap first for it."""
    rows_K = unique_rows(ids_flat.reshape(-1), table.shape[0])
    last_K = last.at[rows_K].get(mode="fill", fill_value=NO_GAP, indices_are_sorted=True)
    if chunk is not None:  # reorder the K ids, not the [K, D] rows
        order_K = jnp.argsort(-catch_up_gaps(last_K, step))
        rows_K, last_K = rows_K[order_K], last_K[order_K]
    srt = chunk is None
    at = {"mode": "fill", "fill_value": 0, "indices_are_sorted": srt, "unique_indices": True}
    p, m, v = catch_up_rows(
        table.at[rows_K].get(**at).astype(mu.dtype),
        mu.at[rows_K].get(**at),
        nu.at[rows_K].get(**at),
        last_K,
        step,
        lr_fn,
        b1,
        b2,
        eps,
        horizon,
        chunk,
    )
    put = {"mode": "drop", "indices_are_sorted": srt, "unique_indices": True}
    return (
        table.at[rows_K].set(p.astype(table.dtype), **put),
        mu.at[rows_K].set(m, **put),
        nu.at[rows_K].set(v, **put),
        last.at[rows_K].set(jnp.asarray(step, jnp.int32), **put),
    )


def catch_up_all(table, mu, nu, last, step, lr_fn, b1=0.9, b2=0.999, eps=1e-8, chunk=65_536):
    """Every row caught up to step - 1 (what dense Adam holds after ``step`` updates), in
    chunks of rows: for export or inference. Returns ``(table, mu, nu, last)``."""
    horizon = catch_up_horizon(b1, b2)
    fn = jax.jit(lambda p, m, v, lk: catch_up_rows(p, m, v, lk, step, lr_fn, b1, b2, eps, horizon))
    R = table.shape[0]
    parts = [fn(table[i : i + chunk], mu[i : i + chunk], nu[i : i + chunk], last[i : i + chunk])
             for i in range(0, R, chunk)]  # fmt: skip
    cat = lambda j: jnp.concatenate([x[j] for x in parts]) if parts else table
    caught = jnp.maximum(last, jnp.asarray(step, jnp.int32) - 1)
    return cat(0).astype(table.dtype), cat(1), cat(2), caught
