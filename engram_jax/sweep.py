"""The experiment runner: train every point of a study, then write results, plots, summary.

``run_sweep(study, points, out, seeds)`` trains each ``(point, seed)`` with
:func:`engram_jax.train.train` in ``out/runs/<point>-s<seed>/`` (``train.seed`` = seed) and
writes after every run ``out/results.csv`` (one row per run); at the end ``out/summary.json``
and the study's figures ``out/*.png``. It is the only side-effecting part of the experiments
(:mod:`engram_jax.experiments` builds the configs).

- Restart: a run whose ``summary.json`` says ``ok`` for the same config is not trained again.
- Failure: a run that raises (or diverges) becomes a row with ``status``/``error`` and the
  sweep goes on.
- Parallel invocations on one ``out`` (e.g. on subsets, to use more processes): each run is
  claimed with a lock file; a run held by another live process is reported ``busy`` and
  skipped; re-running the full command afterwards skips everything finished and writes the
  complete results.
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

COLUMNS = (
    "name",
    "study",
    "point",
    "rho",
    "rho_actual",
    "slots",
    "variant",
    "layer",
    "experts",
    "dense_hidden",
    "seed",
    "total_params",
    "activated_params",
    "engram_params",
    "train_loss",
    "val_loss",
    "tokens",
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
        same = Config.from_dict(json.load(f)) == cfg
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
        error=error,
    )
    s = summary or {}
    for key in ("train_loss", "val_loss", "tokens", "wall_s", "compile_s"):
        row[key] = "" if s.get(key) is None else s[key]
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
        write_csv(rows, os.path.join(out, "results.csv"))
    return rows


def finish(study: str, rows: list[dict], out: str) -> dict:
    """Write ``out/summary.json`` and the study's plots from the result rows."""
    from engram_jax.experiments import report

    summary = report.summarize(study, rows)
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    summary["figures"] = plot(study, rows, summary, out)
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    return summary


# ---------------------------------------------------------------------------------------------
# Figures (matplotlib Agg)


def plot(study: str, rows: list[dict], summary: dict, out: str) -> list[str]:
    """The study's figure(s) in ``out``; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = summary.get("points", [])
    if not groups:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    if study == "rho":
        name = "rho_ucurve.png"
        xs = [g["rho_actual"] for g in groups]
        ax.errorbar(
            xs,
            [g["val_loss_mean"] for g in groups],
            yerr=[g["val_loss_std"] for g in groups],
            marker="o",
            capsize=4,
        )
        for r in rows:
            if r.get("val_loss") not in ("", None):
                ax.plot(float(r["rho_actual"]), float(r["val_loss"]), "k.", alpha=0.4)
        ax.set_xlabel("rho (share of sparse params in routed experts; 1 = pure MoE)")
        ax.set_ylabel("validation loss")
        ax.set_title("Sparsity allocation at fixed P_tot, P_act (mean +- std over seeds)")
    elif study == "slots":
        import numpy as np

        name = "loss_vs_slots.png"
        pts = [
            (float(r["slots"]), float(r["val_loss"]))
            for r in rows
            if r.get("val_loss") not in ("", None)
        ]
        ax.plot([np.log10(x) for x, _ in pts], [y for _, y in pts], "o", label="runs")
        fit = summary.get("fit")
        if fit:
            x = np.linspace(min(np.log10(x) for x, _ in pts), max(np.log10(x) for x, _ in pts))
            ax.plot(
                x,
                fit["intercept"] + fit["slope"] * x,
                "-",
                label=f"fit: slope {fit['slope']:.4f}/decade, R^2 {fit['r2']:.3f}",
            )
        ax.set_xlabel("log10(Engram slots = total table rows)")
        ax.set_ylabel("validation loss")
        ax.legend()
        ax.set_title("Memory scaling at a fixed backbone")
    else:
        name = "ablations.png"
        labels = [g["point"] for g in groups]
        means = [g["val_loss_mean"] for g in groups]
        ax.bar(
            range(len(groups)),
            means,
            yerr=[g["val_loss_std"] for g in groups],
            capsize=3,
            color=["C1" if n == "reference" else "C0" for n in labels],
        )
        ref = summary.get("reference_val_loss")
        if ref is not None:
            ax.axhline(ref, color="C1", lw=1, ls="--")
        lo, hi = min(means), max(means)
        ax.set_ylim(lo - 0.5 * (hi - lo + 1e-3), hi + 0.5 * (hi - lo + 1e-3))
        ax.set_xticks(range(len(groups)), labels, rotation=45, ha="right")
        ax.set_ylabel("validation loss")
        ax.set_title("Ablations (dashed: reference Engram)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, name), dpi=110)
    plt.close(fig)
    return [name]
