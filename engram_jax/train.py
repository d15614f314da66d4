"""The training loop: config resolution, data, metrics, checkpoints and resumption.

The state and its construction live in :mod:`engram_jax.state`, the jitted step in
:mod:`engram_jax.step`. The step is compiled ahead of time, so ``step_time_s`` excludes
compilation.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import numpy as np

from engram_jax import sharding as shd
from engram_jax.checkpoint import Checkpointer, config_mismatch
from engram_jax.config import Config, override
from engram_jax.metrics import MetricsLog
from engram_jax.optim import decay_boundaries, make_optimizer
from engram_jax.state import abstract_train_state, init_state
from engram_jax.step import compile_train_step, make_eval_step


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
    with jax.set_mesh(mesh):  # the eval step traces here (moe.dispatch="ep" needs the mesh)
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
    ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
    it = data.train_iter()
    start = ckpt.latest_step() or 0
    if start:
        # The iterator state is per process (Grain writes process_<i>-of-<n>.json). Resuming
        # with another process count restores the model only and seeks the iterator to the
        # step: batch i of the pipeline is the same global batch for any process count.
        same_processes = ckpt.has_data_state(start)
        graphdef, like = abstract_train_state(cfg, mesh, tx)
        state = ckpt.restore(start, like, it if same_processes else None)
        if not same_processes:
            _seek(it, start)
    else:
        graphdef, state = init_state(cfg, mesh, tx)
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg.to_dict(), f, indent=1, sort_keys=True)
    log = MetricsLog(workdir, start, enabled=is_main)

    batch = shd.global_batch_from_local(mesh, next(it))
    t0 = time.time()
    step_fn = compile_train_step(cfg, graphdef, tx, mesh, state, batch)
    eval_fn = jax.jit(make_eval_step(cfg, graphdef, mesh))
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
                ckpt.save(step, state, it, cfg.to_dict())
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
