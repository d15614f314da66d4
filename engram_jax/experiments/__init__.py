"""Studies (ENGRAM_SPEC sections 6-7), one module each, registered once by name.

A study's name is its module (``engram_jax.experiments.<name>``), its CLI subcommand
(``engram-jax sweep <name>``) and its results directory (``experiments/results/<name>/``).
Each module gives its command, runtime on this machine and expected result in its docstring,
and exposes:

- ``add_arguments(parser)``: its own grid options;
- ``points(base, args) -> list[Point]``: pure, from a base config to the runs' configs;
- ``summarize(rows) -> dict``: the pre-registered criteria (experiments/README.md);
- ``plot(rows, summary, out) -> list[str]``: PNG figures with error bars.

:mod:`engram_jax.sweep` is the runner (training, resume, results.csv, summary.json).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from types import ModuleType

from engram_jax.config import Config

STUDIES = ("rho", "slots", "ablations")


@dataclass(frozen=True)
class Point:
    """One run of a study: a unique ``name``, its config, and the study's labels for the
    results table (``{"rho": 0.8}``, ``{"slots": 40_000}``, ``{"variant": "no_gating"}``)."""

    name: str
    cfg: Config
    labels: dict = field(default_factory=dict, hash=False, compare=False)


def get_study(name: str) -> ModuleType:
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; choose one of: {', '.join(STUDIES)}")
    return importlib.import_module(f"engram_jax.experiments.{name}")


def base_config(preset: str = "toy") -> Config:
    """The study base: any preset name (default ``toy``, the study model)."""
    from engram_jax.presets import get_preset

    return get_preset(preset)


def with_engram(cfg: Config, **changes) -> Config:
    return dataclasses.replace(cfg, engram=dataclasses.replace(cfg.engram, **changes))


def with_moe(cfg: Config, **changes) -> Config:
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **changes))


def with_model(cfg: Config, **changes) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **changes))


def named(base: Config, name: str, cfg: Config, labels: dict) -> Point:
    return Point(name, dataclasses.replace(cfg, name=f"{base.name}-{name}"), labels)


def slots_of(cfg: Config) -> int:
    """Total Engram table rows of ``cfg`` (each ``d_head`` wide; 0 without Engram)."""
    from engram_jax.params import count_params

    return count_params(cfg)["engram"] // cfg.engram.d_head if cfg.engram.enabled else 0


def memory_labels(cfg: Config, tokens: int) -> dict:
    """Slots in both units and how often a row is read in training: ``slots`` (rows of
    ``d_head`` floats, this code's unit), ``slots_dmem`` (table params / d_mem: the paper's
    unit, one d_mem-wide memory entry per slot), ``reads_per_row`` (lookups / rows)."""
    rows = slots_of(cfg)
    if not rows:
        return {"slots": 0, "slots_dmem": 0, "reads_per_row": ""}
    e = cfg.engram
    lookups = tokens * e.n_hash_heads * len(e.layer_ids)
    return {
        "slots": rows,
        "slots_dmem": rows * e.d_head // e.d_mem,
        "reads_per_row": round(lookups / rows, 1),
    }


def train_tokens(cfg: Config) -> int:
    return cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len
