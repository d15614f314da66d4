"""The jitted train and eval steps over the state of :mod:`engram_jax.state`.

Sparse path (the default): the step looks table rows up outside the gradient, differentiates
the loss w.r.t. the gathered rows, and applies row-wise Adam to the touched rows only
(:mod:`engram_jax.tables`), in place through buffer donation (jit with ``donate_argnums=0``).
The backbone goes through optax with the same global-norm clip factor. Tables, ids and rows are
keyed by the Engram layer index (an ``int``) everywhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from engram_jax.config import Config
from engram_jax.hashing import head_offsets, table_sizes
from engram_jax.moe import update_router_bias
from engram_jax.optim import table_learning_rate_schedule
from engram_jax.state import MODEL_KEYS, set_tables, tables_by_layer
from engram_jax.tables import sparse_tables_step


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


def make_train_step(cfg: Config, graphdef, tx, mesh):
    """``step(state, batch) -> (state, metrics)``; jit with ``donate_argnums=0``."""
    sparse = cfg.engram.sparse_update and cfg.engram.enabled
    table_lr = table_learning_rate_schedule(cfg, cfg.train.steps)
    offsets = table_row_offsets(cfg)
    o = cfg.optim

    def loss_fn(params, tables, rest, rows, batch):
        model = nnx.merge(graphdef, params, tables, rest)
        logits, aux = model(batch["inputs"], engram_ids=batch["engram_ids"], engram_rows=rows)
        return cross_entropy(logits, batch["targets"]), aux

    def step(state, batch):
        params, tables, rest = (state[k] for k in MODEL_KEYS)
        rows = None
        if sparse:
            tarr = tables_by_layer(tables)
            gids = {i: ids.astype(jnp.int32) + offsets[i] for i, ids in batch["engram_ids"].items()}
            rows = {i: jnp.take(t, gids[i], axis=0) for i, t in tarr.items()}
        grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 3), has_aux=True)
        (loss, aux), (g_params, g_rows) = grad_fn(params, tables, rest, rows, batch)
        p_sq = optax.tree.norm(g_params, squared=True)
        metrics = dict(loss=loss, **_aux_metrics(aux))
        new = dict(state)
        if sparse:
            new_t, new["table_mu"], new["table_nu"], t_sq = sparse_tables_step(
                mesh,
                tarr,
                state["table_mu"],
                state["table_nu"],
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
            new["tables"] = set_tables(tables, new_t)
        else:
            t_sq = jnp.zeros((), jnp.float32)
        updates, new["opt"] = tx.update(g_params, state["opt"], params, table_sq_norm=t_sq)
        new["params"] = optax.apply_updates(params, updates)
        new["rest"] = update_router_bias(rest, aux["moe_loads"], cfg.moe.bias_update_rate)
        new["step"] = state["step"] + 1
        metrics["grad_norm"] = jnp.sqrt(p_sq + t_sq)
        return new, metrics

    return step


def make_eval_step(cfg: Config, graphdef):
    """``eval_step(state, batch) -> mean token cross-entropy``; ``state`` needs only the model
    entries (``params``, ``tables``, ``rest``)."""

    def eval_step(state, batch):
        model = nnx.merge(graphdef, *(state[k] for k in MODEL_KEYS))
        logits, _ = model(batch["inputs"], engram_ids=batch["engram_ids"])
        return cross_entropy(logits, batch["targets"])

    return eval_step


def compile_train_step(cfg: Config, graphdef, tx, mesh, state, batch):
    """The train step compiled ahead of time for ``state`` and ``batch`` (arrays or
    ``ShapeDtypeStruct``s) exactly as the trainer runs it: state donated."""
    step = jax.jit(make_train_step(cfg, graphdef, tx, mesh), donate_argnums=0)
    return step.lower(state, batch).compile()
