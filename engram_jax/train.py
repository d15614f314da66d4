"""Training: state, the jitted train step, the loop with metrics, checkpoints and resumption.

The model is split once into a static graph and four state groups (NNX functional style):

- ``params``: backbone ``nnx.Param``s (and, on the dense path, the tables too), updated by optax
  (Muon for 2-D matrices, AdamW for the rest, Adam with lr x multiplier for tables);
- ``tables``: Engram ``TableParam``s on the sparse path (the default): the step looks rows up
  outside the gradient, differentiates w.r.t. the gathered rows, and applies row-wise Adam to
  the touched rows only (:mod:`engram_jax.tables`), in place through buffer donation;
- ``rest``: everything else (the MoE router bias, updated from the observed expert load).

``TrainState`` is a flat dict of these plus the optimizer states and the step, which is what
Orbax saves. The step is compiled ahead of time, so ``step_time_s`` excludes compilation.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from engram_jax import sharding as shd
from engram_jax.checkpoint import Checkpointer, abstract_like, config_mismatch
from engram_jax.config import Config, override
from engram_jax.engram import TableParam
from engram_jax.metrics import MetricsLog
from engram_jax.model import EngramLM
from engram_jax.moe import RouterBias, bias_step
from engram_jax.optim import decay_boundaries, make_optimizer, table_learning_rate_schedule
from engram_jax.tables import init_moments, sparse_tables_step


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf."""


# ---------------------------------------------------------------------------------------------
# Config resolution


def resolve_config(workdir: str, preset: str | None, sets: list[str]) -> Config:
    """The run's config: the workdir's saved config when resuming without ``--preset``,
    else the preset (default ``tiny``), then ``--set`` overrides. A preset whose config
    differs from the workdir's run (beyond schedule-length knobs) is an error."""
    from engram_jax.presets import get_preset

    saved_path = os.path.join(workdir, "config.json")
    saved = None
    if os.path.exists(saved_path):
        with open(saved_path, encoding="utf-8") as f:
            saved = Config.from_dict(json.load(f))
    base = get_preset(preset) if preset else (saved or get_preset("tiny"))
    cfg = override(base, sets)
    if saved is not None:
        diff = config_mismatch(saved.to_dict(), cfg.to_dict())
        if diff:
            raise ValueError(
                f"workdir {workdir} holds a run with a different config ({', '.join(diff[:6])}"
                f"{'...' if len(diff) > 6 else ''}); use another --workdir or the same config"
            )
        old_b = decay_boundaries(saved.optim, saved.train.steps)
        new_b = decay_boundaries(cfg.optim, cfg.train.steps)
        if not cfg.optim.decay_steps and old_b != new_b and jax.process_index() == 0:
            print(
                f"engram-jax train: warning: train.steps {saved.train.steps} -> "
                f"{cfg.train.steps} moves the default lr decay boundaries from {list(old_b)} "
                f"(the workdir's config) to {list(new_b)}; pass --set "
                f"optim.decay_steps={list(old_b)} to keep them",
                file=sys.stderr,
                flush=True,
            )
    return cfg


# ---------------------------------------------------------------------------------------------
# State


def split_model(model: EngramLM, cfg: Config):
    """``graphdef, params, tables, rest``; on the dense path ``tables`` is empty."""
    if cfg.engram.sparse_update:
        graphdef, tables, params, rest = nnx.split(model, TableParam, nnx.Param, ...)
        return graphdef, params, tables, rest
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, nnx.State({}), rest


# Table rows are padded to a multiple of this (and of the shard count), so a checkpoint's
# table shapes do not depend on the mesh: a run saved on 8 devices restores on 4 or 1.
TABLE_ROW_MULTIPLE = 1024


def build_model(cfg: Config, mesh) -> EngramLM:
    rows = math.lcm(TABLE_ROW_MULTIPLE, shd.shard_count_for_tables(mesh))
    seed = cfg.train.seed
    return shd.sharded_init(mesh, lambda: EngramLM(cfg, rngs=nnx.Rngs(seed), row_multiple=rows))


def init_state(cfg: Config, mesh, tx) -> tuple[Any, dict]:
    """Fresh ``(graphdef, state)`` for a run; ``state`` is the pytree Orbax saves."""
    model = build_model(cfg, mesh)
    graphdef, params, tables, rest = split_model(model, cfg)
    table_arrays = {k: v for k, v in _tables_by_layer(tables).items()}
    moments = {k: init_moments(t) for k, t in table_arrays.items()}
    state = dict(
        params=params,
        tables=tables,
        rest=rest,
        opt=tx.init(params),
        table_mu={k: m[0] for k, m in moments.items()},
        table_nu={k: m[1] for k, m in moments.items()},
        step=jnp.zeros((), jnp.int32),
    )
    return graphdef, _on_mesh(mesh, state)


def _on_mesh(mesh, tree):
    """Replicate over ``mesh`` every leaf not already placed on it (optimizer counts, the
    step). Else they stay on the default device, and a restore from a checkpoint COMMITS them
    there: jit then refuses to mix them with the mesh's arrays (more than one device)."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def put(x):
        s = getattr(x, "sharding", None)
        if isinstance(s, jax.sharding.NamedSharding) and s.mesh == mesh:
            return x
        return jax.device_put(x, replicated)

    return jax.tree.map(put, tree)


def _tables_by_layer(tables: nnx.State) -> dict[str, jax.Array]:
    """``{"<layer>": table array}`` from the TableParam state (one table per Engram layer)."""
    out = {}
    for path, var in nnx.to_flat_state(tables):
        out[str(path[1])] = var.get_value() if isinstance(var, nnx.Variable) else var
    return out


def _set_tables(tables: nnx.State, new: dict[str, jax.Array]) -> nnx.State:
    flat = []
    for path, var in nnx.to_flat_state(tables):
        flat.append((path, var.replace(new[str(path[1])])))
    return nnx.from_flat_state(flat)


# ---------------------------------------------------------------------------------------------
# The step


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


def _update_router_bias(rest: nnx.State, loads: dict, rate: float) -> nnx.State:
    """Loss-free balancing: bias += rate * sign(mean load - load), outside the gradient."""
    flat = []
    for path, var in nnx.to_flat_state(rest):
        layer = next((p for p in path if isinstance(p, int)), None)
        if isinstance(var, RouterBias) and layer in loads:
            var = var.replace(bias_step(var.get_value(), loads[layer], rate))
        flat.append((path, var))
    return nnx.from_flat_state(flat)


def make_train_step(cfg: Config, graphdef, tx, mesh):
    """``step(state, batch) -> (state, metrics)``; jit with ``donate_argnums=0``."""
    sparse = cfg.engram.sparse_update and cfg.engram.enabled
    table_lr = table_learning_rate_schedule(cfg, cfg.train.steps)
    o = cfg.optim

    def loss_fn(params, tables, rest, rows, batch):
        model = nnx.merge(graphdef, params, tables, rest)
        logits, aux = model(batch["inputs"], engram_ids=batch["engram_ids"], engram_rows=rows)
        return cross_entropy(logits, batch["targets"]), aux

    def step(state, batch):
        params, tables, rest = state["params"], state["tables"], state["rest"]
        ids = {str(k): v for k, v in batch["engram_ids"].items()}
        rows = None
        if sparse:
            model = nnx.merge(graphdef, params, tables, rest)
            rows = {int(k): model.blocks[int(k)].engram.table.global_ids(v) for k, v in ids.items()}
            tarr = _tables_by_layer(tables)
            gids = {str(k): v for k, v in rows.items()}
            rows = {int(k): jnp.take(tarr[k], gids[k], axis=0) for k in tarr}
        grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 3), has_aux=True)
        (loss, aux), (g_params, g_rows) = grad_fn(params, tables, rest, rows, batch)
        p_sq = optax.tree.norm(g_params, squared=True)
        metrics = dict(loss=loss, **_aux_metrics(aux))
        new = dict(state)
        if sparse:
            tarr = _tables_by_layer(tables)
            new_t, mu, nu, t_sq = sparse_tables_step(
                mesh,
                tarr,
                state["table_mu"],
                state["table_nu"],
                gids,
                {str(k): v for k, v in g_rows.items()},
                state["step"],
                table_lr(state["step"]),
                b1=o.b1,
                b2=o.b2,
                eps=o.eps,
                clip_norm=o.grad_clip,
                other_sq_norm=p_sq,
            )
            new.update(tables=_set_tables(tables, new_t), table_mu=mu, table_nu=nu)
        else:
            t_sq = jnp.zeros((), jnp.float32)
        updates, new["opt"] = tx.update(g_params, state["opt"], params, table_sq_norm=t_sq)
        new["params"] = optax.apply_updates(params, updates)
        new["rest"] = _update_router_bias(rest, aux["moe_loads"], cfg.moe.bias_update_rate)
        new["step"] = state["step"] + 1
        metrics["grad_norm"] = jnp.sqrt(p_sq + t_sq)
        return new, metrics

    return step


def make_eval_step(cfg: Config, graphdef):
    def eval_step(state, batch):
        model = nnx.merge(graphdef, state["params"], state["tables"], state["rest"])
        logits, _ = model(batch["inputs"], engram_ids=batch["engram_ids"])
        return cross_entropy(logits, batch["targets"])

    return eval_step


# ---------------------------------------------------------------------------------------------
# Checkpoint form: a flat dict with string keys (robust across NNX/optax pytree node types)


def flatten_state(state: dict) -> tuple[dict[str, Any], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    return {jax.tree_util.keystr(p): x for p, x in leaves}, treedef


def unflatten_state(flat: dict[str, Any], like: dict) -> dict:
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    return jax.tree_util.tree_unflatten(treedef, [flat[jax.tree_util.keystr(p)] for p, _ in paths])


# ---------------------------------------------------------------------------------------------
# The loop


def _host_metrics(metrics: dict) -> dict:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _check_batch_split(cfg: Config, mesh) -> None:
    shards = math.prod(mesh.shape[a] for a in shd.batch_axes())
    if cfg.train.batch_size % shards:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} must be a multiple of the "
            f"{shards} batch shards of the mesh (data x fsdp)"
        )


def evaluate(eval_fn, state, batches: list[dict], mesh) -> float:
    losses = [float(eval_fn(state, shd.global_batch_from_local(mesh, b))) for b in batches]
    return float(np.mean(losses))


def _drop_suspect_checkpoint(ckpt: Checkpointer, step: int, start: int) -> int | None:
    """The loss at ``step`` is computed from the state saved at ``step - 1``: if it is not
    finite, that checkpoint is bad. Delete it when this run wrote it; return the latest
    remaining step."""
    ckpt.wait()
    if step - 1 > start and (step - 1) in ckpt.all_steps():
        ckpt.manager.delete(step - 1)
    return ckpt.latest_step()


def _barrier(name: str, timeout_s: int = 3600) -> None:
    """Wait until every process reaches ``name`` (no-op with one process). Uses the
    jax.distributed coordination service, not a device collective: no gloo deadline."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the client Orbax and jax's serialization use

    distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)


def _seek(it, position: int) -> None:
    """Move a fresh training iterator to batch ``position`` (= the number of batches the run
    consumed before that step's checkpoint)."""
    state = it.get_state()
    if isinstance(state, dict) and "next_index" in state:  # MapDataset-backed: random access
        it.set_state({**state, "next_index": position})
        return
    for _ in range(position):  # e.g. mp_prefetch workers: replay
        next(it)


def train(cfg: Config, workdir: str, *, progress: bool = True) -> dict:
    """Train ``cfg`` in ``workdir``, resuming from its latest complete checkpoint.

    Writes ``config.json``, ``metrics.jsonl``, ``tb/``, ``checkpoints/`` and ``summary.json``
    (process 0 only) and returns the summary (``status``: ``ok`` or ``diverged``).
    """
    from engram_jax.data import build_data

    t_start = time.time()
    mesh = shd.make_mesh(cfg.mesh)
    _check_batch_split(cfg, mesh)
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if not is_main:  # process 0 builds the shared tokenizer/token cache first
        _barrier("engram_jax.train.data")
    data = build_data(
        cfg, workdir, process_index=jax.process_index(), process_count=jax.process_count()
    )
    if is_main:
        _barrier("engram_jax.train.data")
        _publish_tokenizer(data.tokenizer_path, workdir)
    tx = make_optimizer(cfg, cfg.train.steps)
    graphdef, state = init_state(cfg, mesh, tx)
    flat, _ = flatten_state(state)

    ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
    it = data.train_iter()
    start = ckpt.latest_step() or 0
    if start:
        # The iterator state is per process (Grain writes process_<i>-of-<n>.json). Resuming
        # with another process count restores the model only and seeks the iterator to the
        # step: batch i of the pipeline is the same global batch for any process count.
        same_processes = ckpt.has_data_state(start)
        restored = ckpt.restore(start, abstract_like(flat), it if same_processes else None)
        state = unflatten_state(restored, state)
        if not same_processes:
            _seek(it, start)
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg.to_dict(), f, indent=1, sort_keys=True)
    log = MetricsLog(workdir, start, enabled=is_main)

    batch = shd.global_batch_from_local(mesh, next(it))
    t0 = time.time()
    step_fn = jax.jit(make_train_step(cfg, graphdef, tx, mesh), donate_argnums=0)
    step_fn = step_fn.lower(state, batch).compile()
    eval_fn = jax.jit(make_eval_step(cfg, graphdef))
    compile_s = time.time() - t0
    # Gloo gives a peer 30 s to join the first collective; compile times differ by more on a
    # loaded host, so all processes start the first step together.
    _barrier("engram_jax.train.compiled")
    val = data.val_batches(cfg.train.eval_batches) if cfg.train.eval_every else []
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len

    bar = None
    if progress and is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.steps, initial=start, unit="step", dynamic_ncols=True)
    status, last, val_loss, losses = "ok", {}, None, []
    try:
        for step in range(start + 1, cfg.train.steps + 1):
            if step > start + 1:
                batch = shd.global_batch_from_local(mesh, next(it))
            t = time.time()
            state, metrics = step_fn(state, batch)
            m = _host_metrics(metrics)  # blocks: step_time_s is the step's own time
            dt = time.time() - t
            if not all(math.isfinite(v) for v in (m["loss"], m["grad_norm"])):
                status = "diverged"
                good = _drop_suspect_checkpoint(ckpt, step, start)
                raise TrainingDiverged(
                    f"training diverged at step {step} (loss {m['loss']}, grad norm "
                    f"{m['grad_norm']}); stopped. Last good checkpoint: step {good} in "
                    f"{ckpt.directory}"
                )
            losses.append(m["loss"])
            last = dict(step=step, **m, step_time_s=dt, tokens_per_s=tokens_per_step / dt)
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                log.write(last)
            if cfg.train.eval_every and (
                step % cfg.train.eval_every == 0 or step == cfg.train.steps
            ):
                val_loss = evaluate(eval_fn, state, val, mesh)
                log.write(dict(step=step, val_loss=val_loss))
            if cfg.train.checkpoint_every and (
                step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps
            ):
                ckpt.save(step, flatten_state(state)[0], it, cfg.to_dict())
            if bar is not None:
                bar.set_postfix(
                    loss=f"{m['loss']:.3f}",
                    tok_s=f"{last['tokens_per_s']:.0f}",
                    val=f"{val_loss:.3f}" if val_loss is not None else "-",
                )
                bar.update(1)
    except TrainingDiverged as e:
        print(f"engram-jax train: error: {e}", file=sys.stderr, flush=True)
    finally:
        if bar is not None:
            bar.close()
        ckpt.close()
        log.close()

    summary = dict(
        status=status,
        workdir=os.path.abspath(workdir),
        steps=cfg.train.steps,
        resumed_from=start,
        final_step=last.get("step", start),
        train_loss=float(np.mean(losses[-10:])) if losses else None,
        val_loss=val_loss,
        tokens=(last.get("step", start)) * tokens_per_step,
        compile_s=round(compile_s, 2),
        wall_s=round(time.time() - t_start, 2),
        data=data.stats,
    )
    if is_main:
        with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
        print(
            f"{status}: {summary['final_step']} steps, train loss "
            f"{summary['train_loss']}, val loss {val_loss}; metrics: "
            f"{os.path.join(workdir, 'metrics.jsonl')}, checkpoints: {ckpt.directory}, "
            f"non-UTF-8 files replaced: {data.stats.get('non_utf8_documents', 0)}"
        )
    return summary


def _publish_tokenizer(path, workdir: str) -> None:
    """Copy the run's SentencePiece model to ``WORKDIR/tokenizer.model`` (where generation,
    analysis and evaluation on other data look for it)."""
    import shutil

    dest = os.path.join(workdir, "tokenizer.model")
    if os.path.abspath(str(path)) != os.path.abspath(dest):
        tmp = dest + ".tmp"
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)
