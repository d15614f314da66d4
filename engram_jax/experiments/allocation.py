"""Sparsity allocation (ENGRAM_SPEC section 6): iso-parameter, iso-activated configs over rho.

``rho`` is the share of the sparse budget held by routed experts::

    P_sparse = P_tot - P_act,   P_MoE_sparse = (E - top_k) * 3 D F * L_moe = rho * P_sparse,
    P_Engram_sparse = table params - retrieved rows = (1 - rho) * P_sparse.

``rho = 1`` is the pure MoE (no Engram module). The targets ``P_tot`` and ``P_act`` default to
those of the base config's pure-MoE form. A point changes the number of routed experts ``E``
and the Engram table rows (``engram.engram_vocab_size``, equal for every order), and for
``rho < 1`` it adds the Engram module at ``base.engram.layer_ids``.

How the budget absorbs Engram's dense parts. The fusion module (W_V, W_K^(m), norms, short
conv) and the retrieved rows are *activated* parameters. In the paper they are ~1% of P_act
(3.73B -> 3.77B) and are simply carried; at toy scale (d=64) they are ~8% of P_act, which
would break iso-FLOPs. The router (D x E per MoE layer) is activated too and shrinks with E
(up to ~4% of P_act here). So every point pays the activated difference with the width of the
leading dense FFN(s): ``model.dense_hidden += round((P_act - act) / (3 D n_dense_layers))``
(the one backbone field that scales activated parameters without touching the experts; at
rho = 1 with the default targets it is unchanged). The table rows then absorb whatever is
left of ``P_tot``, to within a few rows. Every point's actual counts come from
:func:`count_params` and must be within ``tol`` (2%) of both targets, else ``ValueError``.
``rho`` is quantized by whole experts, so each point reports the *actual* rho next to the
nominal one.
"""

from __future__ import annotations

import dataclasses

from engram_jax.config import Config
from engram_jax.experiments import Point, with_engram, with_model, with_moe
from engram_jax.params import count_params

RHOS = (1.0, 0.9, 0.8, 0.6, 0.4)


def pure_moe(cfg: Config) -> Config:
    return with_engram(cfg, layer_ids=())


def budget(base: Config) -> tuple[int, int]:
    """``(P_tot, P_act)`` of the base config's pure-MoE form: the default targets."""
    c = count_params(pure_moe(base))
    return c["total"], c["activated"]


def _expert_sparse(cfg: Config) -> int:
    """Sparse params per routed expert: 3 D F in each MoE layer."""
    return (
        3
        * cfg.model.d_model
        * cfg.moe.expert_hidden
        * (cfg.model.n_layers - cfg.model.n_dense_layers)
    )


def _fit_tables(cfg: Config, table_target: int) -> Config:
    """Set the per-head base rows so the table params come closest to ``table_target``
    (real sizes are the next distinct primes, so iterate on the measured count)."""
    e = cfg.engram
    heads = len(e.layer_ids) * e.n_hash_heads
    rows = max(2, round(table_target / (e.d_head * heads)))
    for _ in range(4):
        cfg = with_engram(cfg, engram_vocab_size=(rows,) * (e.max_ngram_size - 1))
        err = table_target - count_params(cfg)["engram"]
        step = round(err / (e.d_head * heads))
        if step == 0:
            break
        rows = max(2, rows + step)
    return cfg


def allocate(base: Config, rho: float, p_tot: int, p_act: int) -> Config:
    """The config at allocation ratio ``rho`` with totals ``p_tot`` / ``p_act`` (see module)."""
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho={rho!r} is invalid: must be in (0, 1]")
    k, per_expert = base.moe.top_k, _expert_sparse(base)
    d, n_dense = base.model.d_model, base.model.n_dense_layers
    cfg = pure_moe(base)
    if rho < 1.0:
        cfg = with_engram(
            base,
            layer_ids=base.engram.layer_ids or (1,),
            engram_vocab_size=(2,) * (base.engram.max_ngram_size - 1),
        )
    for _ in range(3):  # E moves the router (activated) and the dense width moves P_sparse
        n_sparse = round(rho * (p_tot - count_params(cfg)["activated"]) / per_expert)
        cfg = with_moe(cfg, n_routed_experts=max(k, 1, k + n_sparse))
        gap = p_act - count_params(cfg)["activated"]
        if gap and n_dense < 1:
            raise ValueError(
                "allocation needs model.n_dense_layers >= 1 (the dense FFN "
                "width absorbs the activated-parameter differences)"
            )
        hidden = cfg.model.dense_hidden + round(gap / (3 * d * max(n_dense, 1)))
        if hidden < 1:
            raise ValueError(
                f"the Engram fusion and router do not fit in "
                f"model.dense_hidden={base.model.dense_hidden}"
            )
        cfg = with_model(cfg, dense_hidden=hidden)
    if rho < 1.0:
        c = count_params(cfg)
        table_target = p_tot - c["total"] + c["engram"]
        cfg = _fit_tables(cfg, table_target)
    return cfg


def check(cfg: Config, p_tot: int, p_act: int, tol: float = 0.02) -> dict:
    """Counts of ``cfg``; ``ValueError`` if P_tot or P_act is off by more than ``tol``."""
    c = count_params(cfg)
    for key, target in (("total", p_tot), ("activated", p_act)):
        if abs(c[key] - target) > tol * target:
            raise ValueError(
                f"allocation missed {key}: {c[key]:,} vs target {target:,} "
                f"(> {tol:.0%}); the budget is too small for this rho grid"
            )
    return c


def sweep(
    base: Config, rhos=RHOS, p_tot: int | None = None, p_act: int | None = None, tol: float = 0.02
) -> list[Point]:
    """One :class:`Point` per rho, named ``rho<rho>``, labelled with the nominal and actual rho
    and the layout (experts, table rows)."""
    t_tot, t_act = budget(base)
    p_tot, p_act = p_tot or t_tot, p_act or t_act
    points = []
    for rho in rhos:
        cfg = allocate(base, float(rho), p_tot, p_act)
        c = check(cfg, p_tot, p_act, tol)
        name = f"rho{float(rho):.2f}"
        cfg = dataclasses.replace(cfg, name=f"{base.name}-{name}")
        points.append(
            Point(
                name,
                cfg,
                {
                    "rho": float(rho),
                    "rho_actual": round(c["rho"], 4),
                    "experts": cfg.moe.n_routed_experts,
                    "slots": _slots(cfg),
                    "dense_hidden": cfg.model.dense_hidden,
                },
            )
        )
    return points


def _slots(cfg: Config) -> int:
    """Total Engram table rows (0 without Engram)."""
    c = count_params(cfg)
    return c["engram"] // cfg.engram.d_head if cfg.engram.enabled else 0
