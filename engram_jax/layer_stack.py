"""Runs of scanned blocks (``model.scan_layers``) and the optimizer's stacked view of them.

:func:`block_runs` says which consecutive blocks share one structure: no Engram and the same
FFN kind (dense or MoE). With ``model.scan_layers`` the model applies each run of two or
more such blocks with one ``lax.scan`` (:mod:`engram_jax.model`), while parameters stay
stored per block (``blocks/<i>/...``: checkpoints, decoding, the router-bias update and the
per-layer initialization are those of the unrolled model).

The optimizer sees each run's parameters stacked on a leading axis (:func:`stack_runs`,
logical axis ``layers``, replicated): one leaf per parameter of the run instead of one per
block, so the compiled optimizer update has the ops of a few blocks, not of all of them (with
30 unrolled blocks the per-leaf update is most of the train step's program). Muon
orthogonalizes each layer's matrix separately (leading axes are batch axes) and the group
labels and the weight-decay mask ignore the layer axis (:mod:`engram_jax.optim`), so the
update is the per-block one.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from engram_jax.config import Config

AXES_KEY = "logical_axes"  # Variable metadata key, as in engram_jax.layers
STACKED = "scanned_blocks"  # top-level key of the stacked runs in the optimizer's view


def block_runs(cfg: Config) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of blocks applied together, in order: with
    ``model.scan_layers``, maximal runs of consecutive blocks without Engram and with the
    same FFN kind; every other block is a range of its own."""
    m = cfg.model
    engram = set(cfg.engram.layer_ids) if cfg.engram.enabled else set()
    runs: list[tuple[int, int]] = []
    prev = None
    for i in range(m.n_layers):
        key = None if not m.scan_layers or i in engram else i < m.n_dense_layers
        if key is not None and key == prev:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
        prev = key
    return runs


def scanned_runs(cfg: Config) -> list[tuple[int, int]]:
    """The runs of :func:`block_runs` that are scanned (two or more blocks)."""
    return [(a, b) for a, b in block_runs(cfg) if b - a > 1]


def _run_key(run: tuple[int, int]) -> str:
    return f"{run[0]}_{run[1]}"


def stack_runs(state: Any, runs: list[tuple[int, int]]) -> Any:
    """The optimizer's view of a parameter (or gradient) state: ``blocks/<i>/<p>`` of every
    block ``i`` of a run ``(a, b)`` become one Variable ``scanned_blocks/<a>_<b>/<p>`` of
    shape ``[b - a, ...]`` with logical axes ``("layers", ...)``. Identity without runs."""
    if not runs:
        return state
    run_of = {i: run for run in runs for i in range(*run)}
    out, grouped = {}, {}
    for path, var in nnx.to_flat_state(state):
        if len(path) > 2 and path[0] == "blocks" and int(path[1]) in run_of:
            grouped.setdefault((run_of[int(path[1])], path[2:]), []).append(var)
        else:
            out[path] = var
    for (run, rest), variables in grouped.items():
        axes = variables[0].get_metadata().get(AXES_KEY)
        meta = {} if axes is None else {AXES_KEY: ("layers", *axes)}
        value = jnp.stack([v.get_value() for v in variables])
        out[(STACKED, _run_key(run), *rest)] = variables[0].replace(value, **meta)
    return nnx.from_flat_state(out)


def unstack_runs(stacked: Any, like: Any, runs: list[tuple[int, int]]) -> Any:
    """Inverse of :func:`stack_runs`: the per-block state shaped and annotated like ``like``
    (the state that was stacked) with the values of ``stacked``."""
    if not runs:
        return stacked
    flat = dict(nnx.to_flat_state(stacked))
    out = {}
    for path, var in nnx.to_flat_state(like):
        if path in flat:
            out[path] = var.replace(flat[path].get_value())
            continue
        layer = int(path[1])
        run = next(r for r in runs if r[0] <= layer < r[1])
        value = flat[(STACKED, _run_key(run), *path[2:])].get_value()
        out[path] = var.replace(value[layer - run[0]])
    return nnx.from_flat_state(out)
