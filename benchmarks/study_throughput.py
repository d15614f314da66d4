"""The study loop's speed (issue 10): the study preset's full model against a plain dense model.

Prints, in one run:

- tokens/s of the study preset (default ``toy``: MoE + mHC + Engram + Muon) and of the plain
  dense model of the same width, depth and vocabulary (``DENSE`` overrides: dense SwiGLU in
  every block, one residual branch, no Engram, AdamW instead of Muon), each the real compiled
  train step (``train_throughput.Variant``) on a fixed batch, interleaved rounds, medians;
- their step-time ratio at equal tokens (goal <= 1.3) and the full model's tokens/s (goal
  >= 12,000);
- XLA GFLOP/s of each (the compiled step's ``cost_analysis`` FLOPs / median step time) against
  the best fp32 ``jax.jit(a @ a)`` rate measured in the same run;
- the train step's compile time (trace + lower + compile, as ``engram-jax train`` does) in a
  fresh subprocess with an empty persistent compilation cache (cold, goal <= 20 s), then in
  another one with the cache that run filled (warm, goal <= 5 s).

    python -m benchmarks.study_throughput
    python -m benchmarks.study_throughput --update BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks.bench_markdown import interleaved_header, publish
from benchmarks.common import add_variant_args
from benchmarks.train_throughput import Variant, interleave, matmul_peak

HEADING = "## Study loop: the study preset vs a plain dense model (CPU)"
GOAL_TOKENS, GOAL_RATIO, GOAL_COLD, GOAL_WARM = 12_000, 1.3, 20.0, 5.0


def dense_overrides(cfg) -> list[str]:
    """The plain dense model of ``cfg``'s width, depth and vocabulary."""
    return [
        f"model.n_dense_layers={cfg.model.n_layers}",
        "model.hc_mult=1",
        "engram.layer_ids=[]",
        "optim.use_muon=False",
    ]


def compile_seconds(preset: str, sets: list[str], cache_dir: str) -> float:
    """Train-step compile time in a new process (its own jax, the given persistent cache)."""
    code = (
        "import json, sys, time;"
        "import jax;"
        f"jax.config.update('jax_compilation_cache_dir', {cache_dir!r});"
        "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0);"
        "from benchmarks.study_throughput import _compile_once;"
        f"print(json.dumps(_compile_once({preset!r}, {sets!r})))"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def _compile_once(preset: str, sets: list[str]) -> float:
    from engram_jax import sharding as shd
    from engram_jax.config import override
    from engram_jax.data import synthetic_batch
    from engram_jax.optim import make_optimizer
    from engram_jax.presets import get_preset
    from engram_jax.state import init_state
    from engram_jax.step import compile_train_step

    cfg = override(get_preset(preset), ["mesh.data=1", *sets])
    mesh = shd.make_mesh(cfg.mesh, jax.devices()[:1])
    tx = make_optimizer(cfg, cfg.train.steps)
    graphdef, state = init_state(cfg, mesh, tx)
    batch = shd.global_batch_from_local(mesh, synthetic_batch(cfg))
    t = time.perf_counter()
    compile_train_step(cfg, graphdef, tx, mesh, state, batch)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_variant_args(ap, repeats=7, steps=5)
    ap.add_argument("--no-compile", action="store_true", help="skip the compile-time runs")
    ap.add_argument("--update", type=Path, help="replace this section of a markdown file")
    args = ap.parse_args()
    load0 = os.getloadavg()
    cold = warm = None
    if not args.no_compile:
        with tempfile.TemporaryDirectory() as cache:
            cold = compile_seconds(args.preset, args.sets, cache)
            warm = compile_seconds(args.preset, args.sets, cache)
        print(f"compile: cold {cold:.1f} s, warm {warm:.1f} s", flush=True)
    peak0, per0 = matmul_peak()
    full = Variant("full", args.preset, args.sets)
    dense = Variant("plain dense", args.preset, [*args.sets, *dense_overrides(full.cfg)])
    interleave([full, dense], args.repeats, args.steps)
    peak1, per1 = matmul_peak()
    peak = max(peak0, peak1)
    per = {n: max(per0[n], per1[n]) for n in per0}
    load1 = os.getloadavg()

    lines = _markdown(args, (load0, load1), full, dense, peak, per, cold, warm)
    publish(HEADING, lines, args.update)


def _verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def _markdown(args, loads, full, dense, peak: float, per: dict, cold, warm) -> list[str]:
    """The section: header, the two variants' table, the ratios and compile times vs goals."""
    cfg = full.cfg
    tokens = cfg.train.batch_size * cfg.train.seq_len
    ratio = full.median / dense.median
    cpu_ratio = full.cpu_median / dense.cpu_median
    tps = tokens / full.median

    lines = [
        *interleaved_header(
            HEADING,
            loads,
            args,
            cfg,
            ", medians of all step times. Peak: best fp32 `jax.jit(a @ a)` in this run, "
            + ", ".join(f"{n}^2: {r / 1e9:.0f} GFLOP/s" for n, r in per.items())
            + ".",
            f"Plain dense: `{' '.join(dense_overrides(cfg))}`.",
        ),
        "",
        "| variant | step ms (median) | step CPU ms | tokens/s | tokens per CPU-s | XLA GFLOP/step "
        "| XLA GFLOP/s | % of peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in (full, dense):
        gfs = v.xla_flops / v.median / 1e9
        lines.append(
            f"| {v.name} | {v.median * 1e3:.1f} | {v.cpu_median * 1e3:.1f} | "
            f"{tokens / v.median:,.0f} | {tokens / v.cpu_median:,.0f} | "
            f"{v.xla_flops / 1e9:.2f} | {gfs:.1f} | "
            f"{gfs * 1e9 / peak * 100:.1f}% |"
        )
    compile_line = (
        "not measured (--no-compile)"
        if cold is None
        else f"cold {cold:.1f} s (goal <= {GOAL_COLD:.0f} s: {_verdict(cold <= GOAL_COLD)}), "
        f"warm {warm:.1f} s (goal <= {GOAL_WARM:.0f} s: {_verdict(warm <= GOAL_WARM)})"
    )
    lines += [
        "",
        f"Full / plain dense step time at equal tokens: wall **{ratio:.2f}**, CPU {cpu_ratio:.2f}"
        f" (goal <= {GOAL_RATIO}: {_verdict(ratio <= GOAL_RATIO)}). Full model "
        f"**{tps:,.0f} tokens/s** (goal >= {GOAL_TOKENS:,}: {_verdict(tps >= GOAL_TOKENS)}), "
        f"{tokens / full.cpu_median:,.0f} tokens per CPU-second (steadier under load; it is the "
        "idle machine's tokens/s if the step keeps one core's worth of CPU busy, which the "
        "profile section measures as XLA CPU-s per wall-s).",
        "",
        f"Train-step compile (trace + lower + compile, fresh process, persistent cache): "
        f"{compile_line}.",
        "",
    ]
    return lines


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
