"""The training state: what it holds, built concretely or abstractly on a mesh.

The model is split once into a static graph and three state groups (NNX functional style):

- ``params``: backbone ``nnx.Param``s (and, on the dense path, the tables too), updated by optax
  (Muon for 2-D matrices, AdamW for the rest, Adam with lr x multiplier for tables);
- ``tables``: Engram ``TableParam``s on the sparse path (the default), updated row-wise by
  :func:`engram_jax.tables.sparse_tables_step`;
- ``rest``: everything else (the MoE router bias, updated from the observed expert load).

The training state is a flat dict of these plus the optax state ``opt``, per-table state
(``table_mu``/``table_nu``: ``{layer: array shaped like the table}``; ``table_last``:
``{layer: int32 [rows]}``, the step through which each row is up to date, for exact Adam,
:mod:`engram_jax.catch_up`) and the ``step``. Every per-table entry is listed in
:data:`TABLE_STATE`: adding one there (with its initial value) gives it the table's row
sharding, a place in checkpoints and in the abstract state.

:func:`init_state` materializes the state directly sharded (one jit, each device builds only its
shards); :func:`abstract_train_state` gives the same tree as ``ShapeDtypeStruct``s with their
``NamedSharding``s and allocates nothing (for ahead-of-time compilation and restore targets);
:func:`abstract_model_state` is the model part only (inference loading: no optimizer state).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from engram_jax import sharding as shd
from engram_jax.config import Config
from engram_jax.engram import TableParam
from engram_jax.layer_stack import scanned_runs, stack_runs
from engram_jax.model import EngramLM

# Table rows are padded to a multiple of this (and of the shard count), so a checkpoint's
# table shapes do not depend on the mesh: a run saved on 8 devices restores on 4 or 1.
TABLE_ROW_MULTIPLE = 1024

# Per-table training state: name -> initial value from the table (same shape, same sharding).
TABLE_STATE: dict[str, Callable[[jax.Array], jax.Array]] = {
    "table_mu": jnp.zeros_like,
    "table_nu": jnp.zeros_like,
    "table_last": lambda t: jnp.full(t.shape[:1], -1, jnp.int32),  # -1: never updated
}

MODEL_KEYS = ("params", "tables", "rest")


def make_model_fn(cfg: Config, mesh) -> Callable[[], EngramLM]:
    """The model constructor of a run on ``mesh`` (tables padded for its shard count)."""
    rows = math.lcm(TABLE_ROW_MULTIPLE, shd.shard_count_for_tables(mesh))
    return lambda: EngramLM(cfg, rngs=nnx.Rngs(cfg.train.seed), row_multiple=rows)


def build_model(cfg: Config, mesh) -> EngramLM:
    """The freshly initialized model, sharded on ``mesh``."""
    return shd.sharded_init(mesh, make_model_fn(cfg, mesh))


def split_model(model: EngramLM, cfg: Config):
    """``graphdef, params, tables, rest``; on the dense path ``tables`` is empty."""
    if cfg.engram.sparse_update:
        graphdef, tables, params, rest = nnx.split(model, TableParam, nnx.Param, ...)
        return graphdef, params, tables, rest
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, nnx.State({}), rest


def merge_model(graphdef, state: dict) -> EngramLM:
    """The model of a training (or model-only) state."""
    return nnx.merge(graphdef, *(state[k] for k in MODEL_KEYS))


def tables_by_layer(tables: nnx.State) -> dict[int, Any]:
    """``{layer: table}`` from the TableParam state (one table per Engram layer)."""
    return {int(path[1]): _value(var) for path, var in nnx.to_flat_state(tables)}


def set_tables(tables: nnx.State, new: dict[int, jax.Array]) -> nnx.State:
    """``tables`` with each layer's array replaced by ``new[layer]``."""
    flat = [(path, var.replace(new[int(path[1])])) for path, var in nnx.to_flat_state(tables)]
    return nnx.from_flat_state(flat)


def _value(var):
    return var.get_value() if isinstance(var, nnx.Variable) else var


# ---------------------------------------------------------------------------------------------
# Building


def _plan(cfg: Config, mesh, tx, *, with_optimizer: bool = True):
    """``(graphdef, init, shardings)``: ``init()`` builds the state (traceable, no arguments),
    ``shardings`` is the state's tree with a ``NamedSharding`` per leaf."""
    make_model = make_model_fn(cfg, mesh)

    def init() -> dict:
        _, params, tables, rest = split_model(make_model(), cfg)
        state = dict(params=params, tables=tables, rest=rest)
        if with_optimizer:
            tarr = tables_by_layer(tables)
            # scanned blocks' parameters stacked per run (engram_jax.layer_stack)
            state["opt"] = tx.init(stack_runs(params, scanned_runs(cfg)))
            for name, fn in TABLE_STATE.items():
                state[name] = {k: fn(t) for k, t in tarr.items()}
            state["step"] = jnp.zeros((), jnp.int32)
        return state

    graphdef = split_model(nnx.eval_shape(make_model), cfg)[0]
    abstract = jax.eval_shape(init)
    # Variables (model and optax state, which keeps its parameters' metadata) by the rule
    # table; plain arrays (counts, the step) replicated; per-table state like its table.
    shardings = _leaf_shardings(mesh, {k: v for k, v in abstract.items() if k not in TABLE_STATE})
    table_sh = tables_by_layer(shardings["tables"])
    for name in TABLE_STATE:
        if name in abstract:
            shardings[name] = {k: _rows_like(table_sh[k], a) for k, a in abstract[name].items()}
    return graphdef, init, shardings


def _rows_like(table_sharding, x):
    """The table's sharding for a per-table entry of fewer dimensions (rows first)."""
    spec = tuple(table_sharding.spec) + (None,) * x.ndim
    return jax.sharding.NamedSharding(
        table_sharding.mesh, jax.sharding.PartitionSpec(*spec[: x.ndim])
    )


def _leaf_shardings(mesh, tree):
    def one(x):
        if isinstance(x, nnx.Variable) and not hasattr(x.get_value(), "shape"):
            return x  # e.g. optax's MaskedNode for a parameter a transform skips: no array
        return shd.state_shardings(mesh, x)

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def init_state(cfg: Config, mesh, tx) -> tuple[Any, dict]:
    """Fresh ``(graphdef, state)`` for a run, every leaf sharded on ``mesh``."""
    graphdef, init, shardings = _plan(cfg, mesh, tx)
    return graphdef, jax.jit(init, out_shardings=shardings)()


def _abstract(init, shardings) -> Any:
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(init),
        shardings,
    )


def abstract_train_state(cfg: Config, mesh, tx) -> tuple[Any, dict]:
    """``(graphdef, state)`` with ``jax.ShapeDtypeStruct`` leaves carrying the ``NamedSharding``
    each leaf of :func:`init_state` has on ``mesh``; allocates nothing, for any preset and mesh
    (e.g. a TPU topology's devices)."""
    graphdef, init, shardings = _plan(cfg, mesh, tx)
    return graphdef, _abstract(init, shardings)


def abstract_model_state(cfg: Config, mesh) -> tuple[Any, dict]:
    """``(graphdef, {"params", "tables", "rest"})`` abstract, as :func:`abstract_train_state`
    without the optimizer and per-table state: the restore target of inference loading."""
    graphdef, init, shardings = _plan(cfg, mesh, None, with_optimizer=False)
    return graphdef, _abstract(init, shardings)
