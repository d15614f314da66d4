"""Op-level profile of a compiled train step on XLA CPU: where the step's time goes.

The real compiled step of ``engram_jax.step`` (the ``Variant`` of ``train_throughput.py``) runs
a few steps under ``jax.profiler.trace``. Every XLA thunk the CPU runtime executes is an event
named after its HLO instruction; each instruction carries the Python call stack that created it
(the compiled HLO's ``StackFrames``). A thunk is attributed to the innermost engram_jax module
on that stack (``layers.py`` is generic and skipped), or to optax (Muon, or the other
transforms: clipping, AdamW):

- attention, MoE (routing, dispatch, experts), dense FFN, mHC, Engram (fusion), table Adam
  (``tables.py``);
- LM head + loss (``model.readout``, ``step.cross_entropy``), embedding;
- optimizer: Muon (``optax/contrib/_muon.py``), AdamW + clipping (other optax);
- step glue: the rest of the train step (``step.py``: row gathers, router-bias update, metrics).

Thunk durations are summed over threads (the two cores can run two thunks at once) and divided
by the number of steps; on a loaded machine a duration includes time the thread waited for a
core, so the shares are the reading. "Python/dispatch" is the median host time
to issue one step (the call returns before the XLA work runs). Step wall times are measured
without the profiler. The host input pipeline (tokenize, pack, hash) is measured
separately as the time to produce one batch of the preset, since the benchmark reuses a fixed
batch.

    python -m benchmarks.step_profile --preset toy --with-dense --preset tiny
    python -m benchmarks.step_profile --preset toy --with-dense --preset tiny --update BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile
import time

import jax
import numpy as np

from benchmarks.bench_markdown import command_line, date_utc, publish
from benchmarks.common import parse_args_with_cache
from benchmarks.train_throughput import Variant

HEADING = "## Train-step profile by component (CPU)"
ORDER = [
    "attention",
    "MoE",
    "dense FFN",
    "mHC",
    "Engram (fusion)",
    "Engram table Adam",
    "LM head + loss",
    "embedding",
    "Muon",
    "AdamW + clip",
    "step glue (train step)",
    "other",
]
_FILES = {
    "attention.py": "attention",
    "moe.py": "MoE",
    "hyper.py": "mHC",
    "engram.py": "Engram (fusion)",
    "tables.py": "Engram table Adam",
    "loss.py": "LM head + loss",
}


# ---------------------------------------------------------------------------------------------
# HLO instruction -> Python call stack -> component


def _section(hlo: str, name: str) -> list[str]:
    m = re.search(rf"^{name}\n(.*?)(?=^[^\d]|\Z)", hlo, re.DOTALL | re.MULTILINE)
    return m.group(1).splitlines() if m else []


def stack_table(hlo: str):
    """``frame id -> [(file, function), ...]`` innermost first, from the HLO's stack index."""
    files = {
        int(k): v.strip('"') for k, v in (ln.split(" ", 1) for ln in _section(hlo, "FileNames"))
    }
    funcs = {
        int(k): v.strip('"') for k, v in (ln.split(" ", 1) for ln in _section(hlo, "FunctionNames"))
    }
    locs = {}
    for ln in _section(hlo, "FileLocations"):
        k, rest = ln.split(" ", 1)
        f = int(re.search(r"file_name_id=(\d+)", rest).group(1))
        fn = int(re.search(r"function_name_id=(\d+)", rest).group(1))
        locs[int(k)] = (files.get(f, "?"), funcs.get(fn, "?"))
    parent, loc_of = {}, {}
    for ln in _section(hlo, "StackFrames"):
        k, rest = ln.split(" ", 1)
        loc_of[int(k)] = int(re.search(r"file_location_id=(\d+)", rest).group(1))
        # the text form prints the parent's id plus one (0 + 1 for a root frame)
        parent[int(k)] = int(re.search(r"parent_frame_id=(\d+)", rest).group(1)) - 1

    def frames(fid: int) -> list[tuple[str, str]]:
        out, seen = [], set()
        while fid in loc_of and fid not in seen:
            seen.add(fid)
            out.append(locs.get(loc_of[fid], ("?", "?")))
            fid = parent[fid]
        return out

    return frames


def component(stack: list[tuple[str, str]]) -> str:
    """The component of an instruction created under ``stack`` (innermost frame first)."""
    for file, _ in stack:
        if "/optax/" in file:
            return "Muon" if "muon" in file else "AdamW + clip"
    for file, func in stack:
        base = os.path.basename(file)
        if "engram_jax" not in file or base == "layers.py":
            continue
        if base == "moe.py":
            return "MoE" if any(fn.startswith("MoE.") for _, fn in stack) else "dense FFN"
        if base in _FILES:
            return _FILES[base]
        if base == "model.py":
            if func == "EngramLM.readout":
                return "LM head + loss"
            if func == "EngramLM.embed_tokens":
                return "embedding"
            continue  # Block glue: the caller decides
        if base in ("train.py", "step.py", "state.py"):
            return "LM head + loss" if func == "cross_entropy" else "step glue (train step)"
    return "other"


def instruction_components(hlo: str) -> dict[str, str]:
    frames = stack_table(hlo)
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.-]+) = .*?stack_frame_id=(\d+)", hlo, re.MULTILINE):
        out[m.group(1)] = component(frames(int(m.group(2))))
    return out


# ---------------------------------------------------------------------------------------------
# The trace


def profile_steps(v: Variant, steps: int, top: int = 0) -> dict:
    """-> thunk seconds per component per step. ``top > 0`` prints the ``top`` most expensive
    instructions."""
    hlo = v.fn.as_text()
    comp = instruction_components(hlo)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            v.run(steps)
        path = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0]
        pd = jax.profiler.ProfileData.from_file(path)
    per, per_op = collections.Counter(), collections.Counter()
    for plane in pd.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            for e in line.events:
                stats = dict(e.stats)
                if stats.get("hlo_module") != "jit_step" or "hlo_op" not in stats:
                    continue
                per[comp.get(stats["hlo_op"], "other")] += e.duration_ns * 1e-9
                per_op[stats["hlo_op"]] += e.duration_ns * 1e-9
    for op, sec in per_op.most_common(top):
        m = re.search(rf"^\s*(?:ROOT )?%?{re.escape(op)} = (\S+) ", hlo, re.MULTILINE)
        shape = m.group(1) if m else "?"
        print(f"  {sec / steps * 1e3:8.2f} ms  {comp.get(op, 'other'):20s} {op} {shape}")
    return {k: s / steps for k, s in per.items()}


def dispatch_seconds(v: Variant, steps: int) -> float:
    """Median host time to issue one step: from the call until it returns (jax dispatches
    asynchronously, so this is the Python + pytree + launch cost, before any XLA work)."""
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        v.state, m = v.fn(v.state, v.batch)
        times.append(time.perf_counter() - t)
        jax.block_until_ready(m)
    return float(np.median(times))


def input_batch_seconds(cfg, n: int = 20) -> float:
    """Seconds per batch of the real input pipeline (tokenized, packed, hashed), in-process."""
    from engram_jax.data import build_data

    with tempfile.TemporaryDirectory() as d:
        data = build_data(cfg, d, process_index=0, process_count=1)
        it = data.train_iter()
        next(it)
        t = time.perf_counter()
        for _ in range(n):
            next(it)
        return (time.perf_counter() - t) / n


def _args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", action="append", default=[], help="repeatable (default toy)")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--steps", type=int, default=6, help="profiled steps per preset")
    ap.add_argument(
        "--with-dense",
        action="store_true",
        help="also profile the plain dense model of the first preset (study_throughput.py)",
    )
    ap.add_argument("--top", type=int, default=0, help="print the N most expensive ops")
    ap.add_argument("--no-input", action="store_true", help="skip the input-pipeline timing")
    return parse_args_with_cache(ap)


def _runs(args) -> list[tuple[str, list]]:
    """``(preset, sets)`` to profile: each --preset, and with --with-dense the first preset's
    plain dense model second."""
    runs = [(name, args.sets) for name in (args.preset or ["toy"])]
    if args.with_dense:
        from benchmarks.study_throughput import dense_overrides
        from engram_jax.config import override
        from engram_jax.presets import get_preset

        first = runs[0][0]
        runs.insert(
            1, (first, [*args.sets, *dense_overrides(override(get_preset(first), args.sets))])
        )
    return runs


def _preset_lines(name: str, sets: list, args) -> list[str]:
    """Profile one preset's train step: its section (components, dispatch, input pipeline)."""
    v = Variant(name, name, sets)
    cfg = v.cfg
    v.run(args.steps)
    wall = v.median  # untraced: the profiler's own overhead is not in it
    dispatch = dispatch_seconds(v, args.steps)
    per = profile_steps(v, args.steps, args.top)
    total = sum(per.values())
    inp = None if args.no_input else input_batch_seconds(cfg)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    lines = [
        f"### `{name}`{' ' + ' '.join(sets) if sets else ''}: batch "
        f"{cfg.train.batch_size} x {cfg.train.seq_len}, step wall {wall * 1e3:.0f} ms "
        f"({tokens / wall:,.0f} tokens/s), XLA thunk time {total * 1e3:.0f} ms per step",
        "",
        "| component | thunk ms per step | share |",
        "|---|---:|---:|",
    ]
    for k in ORDER:
        if per.get(k):
            lines.append(f"| {k} | {per[k] * 1e3:.1f} | {per[k] / total * 100:.1f}% |")
    lines.append(
        f"| Python/dispatch (host time to issue a step) | {dispatch * 1e3:.1f} "
        f"| {dispatch / wall * 100:.1f}% of step wall |"
    )
    if inp is not None:
        lines.append(
            f"| host input pipeline (one batch, not in the step above) | {inp * 1e3:.1f} "
            f"| {inp / wall * 100:.1f}% of step wall |"
        )
    top = sorted(per.items(), key=lambda kv: -kv[1])[:3]
    lines += [
        "",
        "Largest (computed): "
        + ", ".join(f"{k} {s / total * 100:.0f}%" for k, s in top)
        + f"; XLA work {total / wall:.2f} CPU-s per wall-s of step.",
        "",
    ]
    return lines


def main() -> None:
    args = _args()
    load = os.getloadavg()[0]
    runs = _runs(args)
    lines = [
        HEADING,
        "",
        f"Command: `{command_line()}`  ",
        f"Date: {date_utc()}  ",
        f"Machine: {os.cpu_count()} CPU cores shared with other jobs (load average {load:.1f} "
        f"at start), jax {jax.__version__}. {args.steps} profiled steps per preset after 2 "
        "warm-up steps; XLA thunk time summed over threads per step (each thunk's duration: on a "
        "loaded machine it includes time its thread waited for a core, so read the shares), "
        "attributed by the Python call stack recorded in each HLO instruction "
        "(`benchmarks.step_profile` docstring).",
        "",
    ]
    for name, sets in runs:
        lines += _preset_lines(name, sets, args)
    publish(HEADING, lines, args.update)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
