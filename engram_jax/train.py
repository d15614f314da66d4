"""The training loop: config resolution, data, metrics, checkpoints and resumption.

The state and its construction live in :mod:`engram_jax.state`, the jitted step in
:mod:`engram_jax.step`, the run's files in :mod:`engram_jax.workdir`. The step is compiled ahead
of time. The loop keeps the device busy: the next global batch is prepared in a background
thread while a step runs, and metrics stay on the device until a logging, eval or checkpoint
step (where non-finite losses are caught before any checkpoint is written).
"""

from __future__ import annotations

import dataclasses
import json
import math
import queue
import sys
import threading
import time

import jax
import numpy as np

from engram_jax import sharding as shd
from engram_jax.checkpoint import Checkpointer, config_mismatch
from engram_jax.config import Config, override
from engram_jax.metrics import MetricsLog
from engram_jax.optim import make_optimizer
from engram_jax.state import abstract_train_state, init_state
from engram_jax.step import compile_train_step, evaluate, make_eval_step
from engram_jax.workdir import Workdir


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or Inf at ``step``."""

    def __init__(self, step: int, metrics: dict):
        self.step = step
        super().__init__(
            f"training diverged at step {step} (loss {metrics['loss']}, grad norm "
            f"{metrics['grad_norm']}); stopped"
        )


# ---------------------------------------------------------------------------------------------
# Config resolution


def resolve_config(workdir, preset: str | None, sets: list[str]) -> Config:
    """The run's config: the workdir's saved config when resuming without ``--preset``,
    else the preset (default ``tiny``), then ``--set`` overrides, with derived values written in
    (:meth:`Config.with_derived`; on resume, the run's own). A preset whose config differs from
    the workdir's run (beyond schedule-length knobs) is an error."""
    from engram_jax.presets import get_preset

    saved = Workdir(workdir).read_config()
    base = get_preset(preset) if preset else (saved or get_preset("tiny"))
    cfg = override(base, sets)
    if saved is None:
        return cfg.with_derived()
    saved = saved.with_derived()
    if not cfg.optim.decay_steps:  # extending a run keeps the boundaries it was created with
        cfg = dataclasses.replace(
            cfg, optim=dataclasses.replace(cfg.optim, decay_steps=saved.optim.decay_steps)
        )
    diff = config_mismatch(saved.to_dict(), cfg.to_dict())
    if diff:
        raise ValueError(
            f"workdir {workdir} holds a run with a different config ({', '.join(diff[:6])}"
            f"{'...' if len(diff) > 6 else ''}); use another --workdir or the same config"
        )
    return cfg


# ---------------------------------------------------------------------------------------------
# The loop


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


class _Position:
    """The iterator position after a given batch, in the form Grain's checkpoint handler
    saves (``get_state()`` of a non-Dataset iterator: JSON bytes)."""

    def __init__(self, state):
        self.state = state

    def get_state(self) -> bytes:
        if isinstance(self.state, bytes):
            return self.state
        return json.dumps(self.state, indent=4).encode()


class _Prefetch:
    """Global batches assembled in a background thread ``depth`` steps ahead of the step that
    consumes them, so reading, hashing and the host-to-device copy overlap the running step.
    Yields ``(batch, position)``: ``position`` is the iterator's state just after that batch
    (what a checkpoint at that step must save, not the state of the prefetching iterator)."""

    def __init__(self, it, mesh, depth: int = 2):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(it, mesh), daemon=True)
        self._thread.start()

    def _run(self, it, mesh) -> None:
        try:
            while not self._stop.is_set():
                local = next(it)
                item = (shd.global_batch_from_local(mesh, local), _Position(it.get_state()))
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the consumer
            self._q.put(e)

    def __next__(self):
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class _Metrics:
    """Step metrics left on the device until a sync point (logging, eval, checkpoint, last
    step): the loop never waits for a step it does not report. ``step_time_s`` is the mean
    over the steps since the previous sync (compilation, eval and checkpoint calls excluded)."""

    def __init__(self, tokens_per_step: int):
        self.pending: list = []
        self.tokens_per_step = tokens_per_step
        self.losses: list[float] = []
        self.last: dict = {}
        self.restart_clock()

    def restart_clock(self) -> None:
        self.t0, self.n0 = time.time(), len(self.pending)

    def add(self, step: int, metrics) -> None:
        self.pending.append((step, metrics))

    def sync(self) -> dict:
        """Fetch the pending metrics; the record of the latest step. Raises
        :class:`TrainingDiverged` at the first step whose loss or grad norm is not finite."""
        host = jax.device_get([m for _, m in self.pending])
        dt = (time.time() - self.t0) / max(1, len(self.pending) - self.n0)
        for (step, _), m in zip(self.pending, host):
            m = {k: float(v) for k, v in m.items()}
            if not all(math.isfinite(v) for v in (m["loss"], m["grad_norm"])):
                self.pending = []
                raise TrainingDiverged(step, m)
            self.losses.append(m["loss"])
            self.last = dict(step=step, **m, step_time_s=dt, tokens_per_s=self.tokens_per_step / dt)
        self.pending = []
        return self.last


def _due(step: int, every: int, last: int) -> bool:
    return bool(every) and (step % every == 0 or step == last)


def train(cfg: Config, workdir, *, progress: bool = True) -> dict:
    """Train ``cfg`` in ``workdir`` (a :class:`~engram_jax.workdir.Workdir` path, local or
    ``gs://``), resuming from its latest complete checkpoint.

    Writes ``config.json``, ``tokenizer.model``, ``data/``, ``metrics.jsonl``, ``tb/``,
    ``checkpoints/`` and ``summary.json`` (process 0 only) and returns the summary
    (``status``: ``ok`` or ``diverged``).
    """
    t_start = time.time()
    cfg = cfg.with_derived()
    wd = Workdir(workdir)
    mesh = shd.make_mesh(cfg.mesh)
    shd.check_batch_split(mesh, cfg.train.batch_size)
    is_main = jax.process_index() == 0
    wd.path.mkdir(parents=True, exist_ok=True)
    data = _build_data(cfg, wd, is_main)
    tx = make_optimizer(cfg, cfg.train.steps)
    ckpt = Checkpointer(wd.path, keep=cfg.train.keep_checkpoints)
    it = data.train_iter()
    graphdef, state, start = _restore_or_init(cfg, mesh, tx, ckpt, it)
    if is_main:
        wd.write_config(cfg)
    log = MetricsLog(wd.path, start, enabled=is_main)
    batches = _Prefetch(it, mesh)
    first = next(batches)
    t0 = time.time()
    step_fn = compile_train_step(cfg, graphdef, tx, mesh, state, first[0])
    eval_fn = jax.jit(make_eval_step(cfg, graphdef, mesh))
    compile_s = time.time() - t0
    # Gloo gives a peer 30 s to join the first collective; compile times differ by more on a
    # loaded host, so all processes start the first step together.
    _barrier("engram_jax.train.compiled")
    val = data.val_batches(cfg.train.eval_batches) if cfg.train.eval_every else []
    run = _Run(cfg, mesh, step_fn, eval_fn, val, ckpt, log, start, progress and is_main)
    try:
        run.steps(state, first, batches)
    except TrainingDiverged as e:
        run.status = "diverged"
        good = _drop_suspect_checkpoint(ckpt, e.step, start)
        print(
            f"engram-jax train: error: {e}. Last good checkpoint: step {good} in {ckpt.directory}",
            file=sys.stderr,
            flush=True,
        )
    finally:
        batches.close()
        run.close()
    summary = _summary(cfg, wd, run, start, data.stats, compile_s, time.time() - t_start)
    if is_main:
        wd.write_summary(summary)
        print(
            f"{run.status}: {summary['final_step']} steps, train loss {summary['train_loss']}, "
            f"val loss {run.val_loss}; metrics: {wd.metrics_file}, checkpoints: "
            f"{ckpt.directory}, non-UTF-8 files replaced: "
            f"{data.stats.get('non_utf8_documents', 0)}"
        )
    return summary


def _summary(cfg: Config, wd: Workdir, run, start: int, stats: dict, compile_s, wall_s) -> dict:
    """What ``summary.json`` records of a finished (or diverged) run."""
    last, losses = run.metrics.last, run.metrics.losses
    return dict(
        status=run.status,
        workdir=str(wd.path),
        steps=cfg.train.steps,
        resumed_from=start,
        final_step=last.get("step", start),
        train_loss=float(np.mean(losses[-10:])) if losses else None,
        val_loss=run.val_loss,
        tokens=(last.get("step", start)) * run.metrics.tokens_per_step,
        compile_s=round(compile_s, 2),
        wall_s=round(wall_s, 2),
        data=stats,
    )


def _restore_or_init(cfg: Config, mesh, tx, ckpt: Checkpointer, it):
    """``(graphdef, state, start step)``: the latest checkpoint restored onto the abstract
    state (nothing initialized first), else a fresh state."""
    start = ckpt.latest_step() or 0
    if not start:
        return (*init_state(cfg, mesh, tx), 0)
    # The iterator state is per process (Grain writes process_<i>-of-<n>.json). Resuming
    # with another process count restores the model only and seeks the iterator to the
    # step: batch i of the pipeline is the same global batch for any process count.
    same_processes = ckpt.has_data_state(start)
    graphdef, like = abstract_train_state(cfg, mesh, tx)
    state = ckpt.restore(start, like, it if same_processes else None)
    if not same_processes:
        _seek(it, start)
    return graphdef, state, start


class _Run:
    """The steps of a run, with their logging, evaluation, checkpoints and progress bar."""

    def __init__(self, cfg, mesh, step_fn, eval_fn, val, ckpt, log, start, bar: bool):
        self.cfg, self.mesh, self.step_fn, self.eval_fn, self.val = cfg, mesh, step_fn, eval_fn, val
        self.ckpt, self.log, self.start = ckpt, log, start
        self.metrics = _Metrics(cfg.train.batch_size * cfg.train.seq_len)
        self.status, self.val_loss, self.bar = "ok", None, None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.train.steps, initial=start, unit="step", dynamic_ncols=True)

    def steps(self, state, first, batches) -> None:
        t = self.cfg.train
        batch, position = first
        for step in range(self.start + 1, t.steps + 1):
            if step > self.start + 1:
                batch, position = next(batches)
            state, m = self.step_fn(state, batch)
            self.metrics.add(step, m)
            logged = _due(step, t.log_every, t.steps)
            evaluated = _due(step, t.eval_every, t.steps)
            saved = _due(step, t.checkpoint_every, t.steps)
            if logged or evaluated or saved:
                rec = self.metrics.sync()  # raises TrainingDiverged before anything is saved
                if logged:
                    self.log.write(rec)
                if evaluated:
                    self.val_loss = evaluate(self.eval_fn, state, self.val, self.mesh)
                    self.log.write(dict(step=step, val_loss=self.val_loss))
                if saved:
                    self.ckpt.save(step, state, position, self.cfg.to_dict())
                self._postfix(rec)
                self.metrics.restart_clock()
            if self.bar is not None:
                self.bar.update(1)

    def _postfix(self, rec: dict) -> None:
        if self.bar is not None:
            val = f"{self.val_loss:.3f}" if self.val_loss is not None else "-"
            self.bar.set_postfix(
                loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}", val=val
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.ckpt.close()
        self.log.close()


def _build_data(cfg: Config, wd: Workdir, is_main: bool):
    """The run's data pipeline. Process 0 builds the tokenizer and token cache first (and
    publishes them to a remote workdir); the others then reuse them."""
    from engram_jax.data import build_data

    if not is_main:
        _barrier("engram_jax.train.data")
    wd.pull_data()
    data = build_data(
        cfg, wd.data_root(), process_index=jax.process_index(), process_count=jax.process_count()
    )
    if is_main:
        wd.push_data()
        wd.publish_tokenizer(data.tokenizer_path)
        _barrier("engram_jax.train.data")
    return data
