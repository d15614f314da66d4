"""The jitted train and eval steps over the state of :mod:`engram_jax.state`.

Sparse path (the default): the step first catches the batch's table rows up to dense Adam
(their missed zero-gradient steps, :mod:`engram_jax.catch_up`; skipped with
``engram.lazy_adam``), looks them up outside the gradient, differentiates the loss w.r.t. the
gathered rows, and applies row-wise Adam to the touched rows only (:mod:`engram_jax.tables`),
in place through buffer donation (jit with ``donate_argnums=0``). The eval step reads rows
caught up the same way (nothing written): it sees the parameters dense Adam would have.
The backbone goes through optax with the same global-norm clip factor. Tables, ids and rows are
keyed by the Engram layer index (an ``int``) everywhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from engram_jax import sharding as shd
from engram_jax.config import Config
from engram_jax.hashing import head_offsets, table_sizes
from engram_jax.layer_stack import scanned_runs, stack_runs, unstack_runs
from engram_jax.moe import update_router_bias
from engram_jax.optim import table_learning_rate_schedule
from engram_jax.state import MODEL_KEYS, set_tables, tables_by_layer
from engram_jax.tables import CatchUp, sharded_catch_up, sharded_lookup, sparse_tables_step


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    logz = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    picked = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    return jnp.mean(logz - picked)


def _aux_metrics(aux: dict) -> dict:
    out = {}
    loads = list(aux["moe_loads"].values())
    if loads:
        imb = [jnp.max(x) / jnp.maximum(jnp.mean(x.astype(jnp.float32)), 1e-9) for x in loads]
        out["moe_imbalance"] = jnp.mean(jnp.stack(imb))
    for layer, g in aux["engram_gates"].items():
        out[f"engram_gate_{layer}"] = jnp.mean(g)
    return out


def table_row_offsets(cfg: Config) -> dict[int, np.ndarray]:
    """``{layer: int32 [1, 1, H]}``: each hash head's first row in the layer's flat table
    (broadcasts against ids ``[B, T, H]``)."""
    if not cfg.engram.enabled:
        return {}
    return {
        layer: head_offsets(sizes).astype(np.int32).reshape(1, 1, -1)
        for layer, sizes in table_sizes(cfg.engram).items()
    }


def _catch_up(mesh, o, table_lr, tarr, new, gids):
    """Rows of this batch brought to dense Adam's values after step - 1 (in place): the caught-up
    tables, and ``new`` with the rows' moments and last-update steps written."""
    out = {
        i: sharded_catch_up(
            mesh,
            t,
            new["table_mu"][i],
            new["table_nu"][i],
            new["table_last"][i],
            gids[i],
            new["step"],
            table_lr,
            o.b1,
            o.b2,
            o.eps,
        )  # fmt: skip
        for i, t in tarr.items()
    }
    for j, name in enumerate(("table_mu", "table_nu", "table_last"), 1):
        new[name] = {i: c[j] for i, c in out.items()}
    return {i: c[0] for i, c in out.items()}, new


def _update_tables(mesh, o, table_lr, state, new, tarr, gids, g_rows, p_sq):
    """Row-wise Adam on the touched rows, clipped by the global norm over the backbone's
    (``p_sq``) and the rows' gradients; writes the tables and moments into ``new`` and returns
    the rows' squared gradient norm."""
    new_t, new["table_mu"], new["table_nu"], t_sq = sparse_tables_step(
        mesh,
        tarr,
        new["table_mu"],
        new["table_nu"],
        gids,
        g_rows,
        state["step"],
        table_lr(state["step"]),
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
        clip_norm=o.grad_clip,
        other_sq_norm=p_sq,
    )
    new["tables"] = set_tables(state["tables"], new_t)
    return t_sq


def make_train_step(cfg: Config, graphdef, tx, mesh):
    """``step(state, batch) -> (state, metrics)``; jit with ``donate_argnums=0``."""
    sparse = cfg.engram.sparse_update and cfg.engram.enabled
    table_lr = table_learning_rate_schedule(cfg, cfg.train.steps)
    offsets = table_row_offsets(cfg)
    runs = scanned_runs(cfg)
    o = cfg.optim

    def loss_fn(params, tables, rest, rows, batch):
        model = nnx.merge(graphdef, params, tables, rest)
        logits, aux = model(batch["inputs"], engram_ids=batch["engram_ids"], engram_rows=rows)
        return cross_entropy(logits, batch["targets"]), aux

    def step(state, batch):
        params, tables, rest = (state[k] for k in MODEL_KEYS)
        rows = None
        new = dict(state)
        if sparse:
            tarr = tables_by_layer(tables)
            gids = {i: ids.astype(jnp.int32) + offsets[i] for i, ids in batch["engram_ids"].items()}
            if not cfg.engram.lazy_adam:
                tarr, new = _catch_up(mesh, o, table_lr, tarr, new, gids)
            rows = {i: jnp.take(t, gids[i], axis=0) for i, t in tarr.items()}
        grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 3), has_aux=True)
        (loss, aux), (g_params, g_rows) = grad_fn(params, tables, rest, rows, batch)
        g_view = stack_runs(g_params, runs)  # the optimizer's view (engram_jax.layer_stack)
        p_sq = optax.tree.norm(g_view, squared=True)
        metrics = dict(loss=loss, **_aux_metrics(aux))
        if sparse:
            t_sq = _update_tables(mesh, o, table_lr, state, new, tarr, gids, g_rows, p_sq)
        else:
            t_sq = jnp.zeros((), jnp.float32)
        view = stack_runs(params, runs)
        updates, new["opt"] = tx.update(g_view, state["opt"], view, table_sq_norm=t_sq)
        new["params"] = unstack_runs(optax.apply_updates(view, updates), params, runs)
        new["rest"] = update_router_bias(rest, aux["moe_loads"], cfg.moe.bias_update_rate)
        new["step"] = state["step"] + 1
        metrics["grad_norm"] = jnp.sqrt(p_sq + t_sq)
        return new, metrics

    return step


def make_eval_step(cfg: Config, graphdef, mesh=None):
    """``eval_step(state, batch) -> mean token cross-entropy``; ``state`` needs only the model
    entries (``params``, ``tables``, ``rest``). With ``mesh`` and a training state (exact
    table Adam on the sparse path), Engram rows are read caught up to dense Adam's values."""
    exact = cfg.engram.enabled and cfg.engram.sparse_update and not cfg.engram.lazy_adam
    table_lr = table_learning_rate_schedule(cfg, cfg.train.steps)
    offsets, o = table_row_offsets(cfg), cfg.optim

    def eval_step(state, batch):
        model = nnx.merge(graphdef, *(state[k] for k in MODEL_KEYS))
        rows = None
        if exact and mesh is not None and "table_last" in state:
            rows = {}
            for i, t in tables_by_layer(state["tables"]).items():
                gids = batch["engram_ids"][i].astype(jnp.int32) + offsets[i]
                c = CatchUp(state["table_mu"][i], state["table_nu"][i], state["table_last"][i],
                            state["step"], table_lr, o.b1, o.b2, o.eps)  # fmt: skip
                rows[i] = sharded_lookup(mesh, t, gids, catch_up=c)
        logits, _ = model(batch["inputs"], engram_ids=batch["engram_ids"], engram_rows=rows)
        return cross_entropy(logits, batch["targets"])

    return eval_step


def evaluate(eval_fn, state, batches: list[dict], mesh) -> float:
    """Mean of ``eval_fn`` over local ``batches`` (each assembled into a global batch)."""
    with jax.set_mesh(mesh):  # the eval step traces here (moe.dispatch="ep" needs the mesh)
        losses = [float(eval_fn(state, shd.global_batch_from_local(mesh, b))) for b in batches]
    return float(np.mean(losses))


def compile_train_step(cfg: Config, graphdef, tx, mesh, state, batch):
    """The train step compiled ahead of time for ``state`` and ``batch`` (arrays or
    ``ShapeDtypeStruct``s) exactly as the trainer runs it: state donated."""
    step = jax.jit(make_train_step(cfg, graphdef, tx, mesh), donate_argnums=0)
    with jax.set_mesh(mesh):  # code that shard_maps over the context mesh (moe.dispatch="ep")
        return step.lower(state, batch).compile()
