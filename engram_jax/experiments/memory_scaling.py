"""Memory scaling (ENGRAM_SPEC section 6, "infinite-memory regime"): a fixed backbone with
Engram tables swept over slots, and the fit ``val_loss = a + b log10(slots)``.

``slots`` = total table rows over all Engram layers, orders and heads (each row is
``d_head`` wide). A point changes only ``engram.engram_vocab_size`` (the same per-head base
for every order; the real head sizes are the next distinct primes, so the actual slot count
is reported). The paper sweeps 2.58e5 -> 1e7 slots on a 3B MoE and finds a straight line in
log(slots); the default grid here spans 10^1.8 (x4 per step, the toy reference ~4e4 included).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from engram_jax.config import Config
from engram_jax.experiments import Point, with_engram
from engram_jax.params import count_params

SLOTS = (10_000, 40_000, 160_000, 640_000)


def slots_of(cfg: Config) -> int:
    """Total Engram table rows of ``cfg`` (0 without Engram)."""
    return count_params(cfg)["engram"] // cfg.engram.d_head if cfg.engram.enabled else 0


def with_slots(cfg: Config, slots: int) -> Config:
    """``cfg`` with per-head base rows ``slots / (layers x heads)`` for every order."""
    e = cfg.engram
    if not e.enabled:
        raise ValueError("memory scaling needs an Engram config (engram.layer_ids non-empty)")
    heads = len(e.layer_ids) * e.n_hash_heads
    return with_engram(
        cfg, engram_vocab_size=(max(2, round(slots / heads)),) * (e.max_ngram_size - 1)
    )


def decades(slots) -> float:
    return math.log10(max(slots) / min(slots))


def sweep(base: Config, slots=SLOTS) -> list[Point]:
    """One :class:`Point` per slot count, named ``slots<n>``; the backbone is ``base``."""
    points = []
    for n in slots:
        cfg = with_slots(base, int(n))
        name = f"slots{int(n)}"
        points.append(
            Point(
                name, dataclasses.replace(cfg, name=f"{base.name}-{name}"), {"slots": slots_of(cfg)}
            )
        )
    return points


def fit_log_slots(slots, losses) -> dict:
    """Least squares ``loss = a + b log10(slots)``: ``{intercept, slope, r2, n}``."""
    x = np.log10(np.asarray(slots, np.float64))
    y = np.asarray(losses, np.float64)
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError("the fit needs at least two distinct slot counts")
    b, a = np.polyfit(x, y, 1)
    resid = y - (a + b * x)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else 1.0
    return {"intercept": float(a), "slope": float(b), "r2": r2, "n": len(x)}
