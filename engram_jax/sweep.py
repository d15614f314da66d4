"""The experiment runner: train every point of a study, then write results, plots, summary.

``run_sweep(study, points, out, seeds)`` trains each ``(point, seed)`` with
:func:`engram_jax.train.train` in ``out/runs/<point>-s<seed>/`` (``train.seed`` = seed) and
writes after every run ``out/results.csv`` (one row per run); :func:`finish` then writes
``out/summary.json`` and the study's figures ``out/*.png`` (the study module's ``summarize``
and ``plot``). It is the only side-effecting part of the experiments
(:mod:`engram_jax.experiments` builds the configs).

- Paired seeds: ``train.seed`` sets the data order and initialization, and the evaluation
  batches are the first windows of the held-out split, so within a seed every point of a
  study sees the same training batches and the same evaluation tokens.
- Evaluation size: :func:`with_eval_tokens` raises ``train.eval_batches`` to cover at least
  ``eval_tokens`` held-out tokens (default 65,536), evaluated once at the last step.

- Restart: a run whose ``summary.json`` says ``ok`` for the same config is not trained again.
- Failure: a run that raises (or diverges) becomes a row with ``status``/``error`` and the
  sweep goes on; bad input (``ValueError``/``FileNotFoundError``: a corpus or config every run
  shares) stops it with that error.
- Parallel invocations on one ``out`` (e.g. on subsets, to use more processes): each run is
  claimed with a lock file; a run held by another live process is reported ``busy`` and
  skipped, and its row is filled in from its ``summary.json`` at the next write (or by
  ``--report``) once it has finished, so the process that writes last records every run.
- Sharing: every run's ``data/`` is a link to ``out/data``, so the tokenizer is trained and
  the corpus encoded once per sweep; XLA executables go to a persistent compilation cache
  (``out/jax_cache``), so runs of the same shapes (the seeds of a point, the same layout in two
  studies) compile once.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import time
import traceback

from engram_jax.config import Config
from engram_jax.params import count_params

# The labels a study gives its points, and the parameter counts the runner adds: one row each in
# the CSV, and what experiments.stats groups by.
POINT_LABELS = (
    "rho",
    "rho_actual",
    "kind",
    "slots",
    "slots_dmem",
    "reads_per_row",
    "variant",
    "layer",
    "experts",
    "dense_hidden",
)
PARAM_COLUMNS = ("total_params", "activated_params", "engram_params")
COLUMNS = (
    "name",
    "study",
    "point",
    *POINT_LABELS,
    "p_act_vs_moe",
    "seed",
    *PARAM_COLUMNS,
    "train_loss",
    "val_loss",
    "gate_mean",
    "tokens",
    "eval_tokens",
    "steps",
    "wall_s",
    "compile_s",
    "status",
    "error",
)


def _finished(workdir: str, cfg: Config) -> dict | None:
    path = os.path.join(workdir, "summary.json")
    cfg_path = os.path.join(workdir, "config.json")
    if not (os.path.exists(path) and os.path.exists(cfg_path)):
        return None
    with open(path, encoding="utf-8") as f:
        summary = json.load(f)
    with open(cfg_path, encoding="utf-8") as f:
        same = Config.from_dict(json.load(f)).with_derived() == cfg.with_derived()
    return summary if summary.get("status") == "ok" and same else None


def _link_data(out: str, workdir: str) -> None:
    shared = os.path.abspath(os.path.join(out, "data"))
    os.makedirs(shared, exist_ok=True)
    os.makedirs(workdir, exist_ok=True)
    link = os.path.join(workdir, "data")
    if not os.path.lexists(link):
        os.symlink(shared, link)


def _lock(workdir: str) -> bool:
    """Claim ``workdir`` for this process (``.sweep.lock`` holding the pid), so that several
    invocations of a sweep on the same ``--out`` never train one run twice. A lock whose
    process is gone is taken over. False: another live process holds it."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, ".sweep.lock")
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path, encoding="utf-8") as f:
                    os.kill(int(f.read().strip() or 0), 0)
                return False
            except (ProcessLookupError, ValueError, FileNotFoundError):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            except PermissionError:  # alive, owned by someone else
                return False
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def _unlock(workdir: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(workdir, ".sweep.lock"))


def enable_compilation_cache(path: str) -> None:
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def final_gate(workdir: str) -> float | str:
    """Mean Engram gate alpha over the Engram layers at the last logged step of a run (from
    its metrics.jsonl): whether the gates learned to select (they start near 0.5)."""
    path = os.path.join(workdir, "metrics.jsonl")
    last = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                gates = [v for k, v in rec.items() if k.startswith("engram_gate_")]
                if gates:
                    last = gates
    return round(sum(last) / len(last), 4) if last else ""


def _summary_fields(s: dict) -> dict:
    """The columns a run's summary.json fills in ("" where it has no value)."""
    keys = ("train_loss", "val_loss", "tokens", "wall_s", "compile_s")
    return {k: "" if s.get(k) is None else s[k] for k in keys}


def _row(study: str, point, seed: int, cfg: Config, summary: dict | None, error: str) -> dict:
    c = count_params(cfg)
    row = dict.fromkeys(COLUMNS, "")
    row.update({k: v for k, v in point.labels.items() if k in COLUMNS})
    row.update(
        name=f"{point.name}-s{seed}",
        study=study,
        point=point.name,
        seed=seed,
        experts=cfg.moe.n_routed_experts,
        dense_hidden=cfg.model.dense_hidden,
        total_params=c["total"],
        activated_params=c["activated"],
        engram_params=c["engram"],
        rho_actual=round(c["rho"], 4),
        steps=cfg.train.steps,
        eval_tokens=cfg.train.eval_batches * cfg.train.batch_size * cfg.train.seq_len,
        error=error,
    )
    s = summary or {}
    row.update(_summary_fields(s))
    row["status"] = s.get("status", "error") if not error else error.split(":")[0]
    if row["status"] not in ("ok", "busy", "diverged"):
        row["status"] = "error"
    return row


def write_csv(rows: list[dict], path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def read_csv(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def refresh_busy(rows: list[dict], out: str) -> bool:
    """Fill in, from ``out/runs/<name>/summary.json``, the rows of runs that another sweep
    process was training when this one passed them (``busy``) and that have finished since,
    so that whichever process writes results.csv last records every finished run. True when
    a row changed."""
    changed = False
    for r in rows:
        workdir = os.path.join(out, "runs", r["name"])
        path = os.path.join(workdir, "summary.json")
        if r.get("status") != "busy" or not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            s = json.load(f)
        if s.get("status") == "ok":
            r.update(_summary_fields(s), status="ok", error="", gate_mean=final_gate(workdir))
            changed = True
    return changed


def run_sweep(
    study: str, points: list, out: str, seeds=(0,), *, train_fn=None, log=print
) -> list[dict]:
    """Train every ``(point, seed)``; return the result rows (also in ``out/results.csv``)."""
    if train_fn is None:
        from engram_jax.train import train as train_fn
    os.makedirs(out, exist_ok=True)
    enable_compilation_cache(os.path.join(out, "jax_cache"))
    rows, total, t0 = [], len(points) * len(seeds), time.time()
    for i, (point, seed) in enumerate(((p, s) for p in points for s in seeds), 1):
        cfg = dataclasses.replace(
            point.cfg, train=dataclasses.replace(point.cfg.train, seed=int(seed))
        )
        name = f"{point.name}-s{seed}"
        workdir = os.path.join(out, "runs", name)
        summary, error = _finished(workdir, cfg), ""
        if summary is not None:
            log(f"[{i}/{total}] {name}: done before (val loss {summary.get('val_loss')}), skipped")
        elif not _lock(workdir):
            error = "busy: another sweep process is training this run"
            log(f"[{i}/{total}] {name}: {error}, skipped")
        else:
            log(
                f"[{i}/{total}] {name}: training {cfg.train.steps} steps "
                f"({time.time() - t0:.0f} s into the sweep)"
            )
            try:
                _link_data(out, workdir)
                summary = train_fn(cfg, workdir, progress=False)
                if summary.get("status") != "ok":
                    error = f"status {summary.get('status')}"
            except (ValueError, FileNotFoundError):  # bad input (data, config): every run
                raise  # would fail alike, so stop with the one-line error; rows so far are kept
            except Exception as e:  # noqa: BLE001 - one failed run must not stop the sweep
                error = f"{type(e).__name__}: {e}"
                log(f"[{i}/{total}] {name}: FAILED: {error}\n{traceback.format_exc(limit=3)}")
            finally:
                _unlock(workdir)
            if summary and not error:
                log(
                    f"[{i}/{total}] {name}: val loss {summary.get('val_loss')}, train loss "
                    f"{summary.get('train_loss')}, {summary.get('wall_s')} s"
                )
        rows.append(_row(study, point, seed, cfg, summary, error))
        rows[-1]["gate_mean"] = final_gate(workdir)
        refresh_busy(rows, out)
        write_csv(rows, os.path.join(out, "results.csv"))
    return rows


def with_eval_tokens(cfg: Config, eval_tokens: int) -> Config:
    """One evaluation at the last step over at least ``eval_tokens`` held-out tokens."""
    t = cfg.train
    per_batch = t.batch_size * t.seq_len
    batches = max(t.eval_batches, -(-int(eval_tokens) // per_batch))
    return dataclasses.replace(
        cfg, train=dataclasses.replace(t, eval_batches=batches, eval_every=t.steps)
    )


def finish(study: str, rows: list[dict], out: str) -> dict:
    """Write ``out/summary.json``, ``out/summary.md`` (the study's tables and criteria) and the
    study's plots from the result rows."""
    from engram_jax.experiments import get_study

    mod = get_study(study)
    summary = mod.summarize(rows)
    summary["figures"] = mod.plot(rows, summary, out)
    tmp = os.path.join(out, "summary.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(out, "summary.json"))
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(mod.report(rows, summary, out))
    os.replace(tmp, os.path.join(out, "summary.md"))
    return summary
