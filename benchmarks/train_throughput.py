"""Train-step throughput and MFU of a preset with and without Engram, side by side.

Both variants share the backbone (``engram.layer_ids=[]`` removes Engram and nothing else).
Each is the real compiled train step of ``engram_jax.step`` (``make_train_step``, jit with
``donate_argnums=0``, compiled ahead of time) on one fixed synthetic batch (random tokens,
hashed by ``NgramHasher`` as the input pipeline does). Repetitions are interleaved (A, B, A,
B, ...) and each variant's figure is the median, because the machine is shared: only ratios
measured in one run are meaningful.

MFU = model FLOPs per step / step time / peak, with the peak measured in the same run as the
best ``jax.jit(a @ a)`` fp32 rate on 1024^2 and 2048^2 matrices. Model FLOPs per step:

    6 * (P_act - R + V*d) * B*T  +  12 * L * H * Dh * T * B*T    (the PaLM/Chinchilla count)

with P_act the activated parameters of ``params.count_params`` (embedding and head excluded),
R the retrieved Engram row parameters (a gather, not a matmul: n_hash_heads * d_head per Engram
layer), V*d the LM head, L layers, H heads of width Dh, T the sequence length (the attention
term counts the full T x T score and value products, forward + backward). XLA's own FLOP count
of the compiled step (``cost_analysis``; it includes the blocked MoE's padding) is printed too.

    python -m benchmarks.train_throughput
    python -m benchmarks.train_throughput --update BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_markdown import command_line, date_utc, publish
from benchmarks.common import cpu_seconds, parse_args_with_cache
from engram_jax import sharding as shd
from engram_jax.config import override
from engram_jax.data import synthetic_batch
from engram_jax.optim import make_optimizer
from engram_jax.params import count_params
from engram_jax.presets import get_preset
from engram_jax.state import init_state
from engram_jax.step import make_train_step

HEADING = "## Train-step throughput and MFU (CPU)"
ATTRIBUTION = [
    ("Engram, dense table update", ["engram.sparse_update=False"]),
    ("Engram, no short conv", ["engram.use_short_conv=False"]),
    ("Engram, no gate", ["engram.use_gating=False"]),
]


# ---------------------------------------------------------------------------------------------
# Shared helpers (table_scaling.py imports these)


class Variant:
    """One config's compiled train step, its (donated) state and a fixed batch."""

    def __init__(self, name: str, preset: str, sets: list[str]):
        self.name = name
        self.cfg = cfg = override(get_preset(preset), ["mesh.data=1", *sets])
        self.mesh = shd.make_mesh(cfg.mesh, jax.devices()[:1])
        tx = make_optimizer(cfg, cfg.train.steps)
        graphdef, self.state = init_state(cfg, self.mesh, tx)
        self.batch = shd.global_batch_from_local(self.mesh, synthetic_batch(cfg))
        t0 = time.perf_counter()
        compiled = (
            jax.jit(make_train_step(cfg, graphdef, tx, self.mesh), donate_argnums=0)
            .lower(self.state, self.batch)
            .compile()
        )
        self.compile_s = time.perf_counter() - t0
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        self.xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
        self.fn = compiled
        mem = compiled.memory_analysis()  # temp_size: scratch the step allocates besides I/O
        self.temp_bytes = int(getattr(mem, "temp_size_in_bytes", -1)) if mem else -1
        self.alias_bytes = int(getattr(mem, "alias_size_in_bytes", -1)) if mem else -1
        self.table_ops = table_shaped_ops(compiled.as_text(), self.state)
        self.times: list[float] = []
        self.cpu: list[float] = []
        self.run(2)  # warm-up
        self.times.clear()
        self.cpu.clear()

    def run(self, n: int) -> None:
        for _ in range(n):
            c, t = cpu_seconds(), time.perf_counter()
            self.state, m = self.fn(self.state, self.batch)
            jax.block_until_ready(m)
            self.times.append(time.perf_counter() - t)
            self.cpu.append(cpu_seconds() - c)
        self.last_loss = float(m["loss"])

    @property
    def median(self) -> float:
        return float(np.median(self.times))

    @property
    def cpu_median(self) -> float:
        return float(np.median(self.cpu))

    def table_rows(self) -> int:
        return sum(int(x.shape[0]) for x in self.state["table_mu"].values()) or sum(
            int(np.prod(v.shape[:1]))
            for p, v in jax.tree_util.tree_leaves_with_path(self.state["params"])
            if "table" in jax.tree_util.keystr(p)
        )


def table_shaped_ops(hlo: str, state: dict) -> dict:
    """Opcodes of the compiled step's instructions whose result is shaped like an Engram table
    (e.g. ``f32[10000384,16]``): in place, only the row scatters (and their fusions) should be;
    a ``copy`` would mean a table-sized copy per step."""
    shapes = {
        f"f32[{x.shape[0]},{x.shape[1]}]"
        for path, x in jax.tree_util.tree_leaves_with_path((state["tables"], state["params"]))
        if "table" in jax.tree_util.keystr(path) and getattr(x, "ndim", 0) == 2
    }
    ops: dict = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?[\w.-]+ = (f32\[[\d,]+\])\S* ([\w-]+)\(", line)
        if m and m.group(1) in shapes:
            ops[m.group(2)] = ops.get(m.group(2), 0) + 1
    return ops


def interleave(variants: list[Variant], repeats: int, steps: int, label: str = "") -> None:
    for r in range(repeats):
        for v in variants:
            v.run(steps)
            print(
                f"  {label}rep {r + 1}/{repeats} {v.name}: median of {steps} steps "
                f"{np.median(v.times[-steps:]) * 1e3:.1f} ms wall, "
                f"{np.median(v.cpu[-steps:]) * 1e3:.1f} ms CPU",
                flush=True,
            )


def matmul_peak(sizes=(1024, 2048), repeats: int = 10) -> tuple[float, dict]:
    """Best fp32 ``jax.jit(a @ a)`` rate in FLOP/s over ``sizes``."""
    f = jax.jit(lambda a: a @ a)
    per = {}
    for n in sizes:
        a = jax.random.normal(jax.random.key(n), (n, n), jnp.float32)
        jax.block_until_ready(f(a))
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(f(a))
            best = min(best, time.perf_counter() - t)
        per[n] = 2 * n**3 / best
    return max(per.values()), per


# ---------------------------------------------------------------------------------------------


def model_flops(cfg) -> tuple[float, dict]:
    m, e = cfg.model, cfg.engram
    pc = count_params(cfg)
    retrieved = len(e.layer_ids) * e.n_hash_heads * e.d_head if e.enabled else 0
    tokens = cfg.train.batch_size * cfg.train.seq_len
    matmul_params = pc["activated"] - retrieved + m.vocab_size * m.d_model
    attn = 12 * m.n_layers * m.n_heads * m.head_dim * cfg.train.seq_len * tokens
    return 6 * matmul_params * tokens + attn, dict(
        activated=pc["activated"], retrieved=retrieved, matmul_params=matmul_params
    )


def _args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds per variant")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        help="extra override for both variants (repeatable)",
    )
    ap.add_argument(
        "--attribution",
        action="store_true",
        help="also time Engram variants without parts (dense table update, no "
        "short conv, no gate) to see where Engram's time goes",
    )
    return parse_args_with_cache(ap)


def main() -> None:
    args = _args()
    load = os.getloadavg()[0]

    print("measuring fp32 matmul peak ...", flush=True)
    peak0, per0 = matmul_peak()
    variants = [
        Variant("with Engram", args.preset, args.sets),
        Variant("without Engram", args.preset, [*args.sets, "engram.layer_ids=[]"]),
    ]
    if args.attribution:
        for name, extra in ATTRIBUTION:
            variants.append(Variant(name, args.preset, [*args.sets, *extra]))
    for v in variants:
        print(f"compiled {v.name} in {v.compile_s:.1f} s", flush=True)
    interleave(variants, args.repeats, args.steps)
    peak1, per1 = matmul_peak()
    per = {n: max(per0[n], per1[n]) for n in per0}
    publish(HEADING, _markdown(args, load, variants, max(peak0, peak1), per), args.update)


def _attribution_lines(variants, base) -> list[str]:
    lines = [
        "",
        "Attribution (same run, interleaved): step time of Engram variants "
        "relative to the backbone without Engram.",
        "",
        "| variant | wall ms | vs without | CPU ms | vs without |",
        "|---|---:|---:|---:|---:|",
    ]
    for v in variants:
        lines.append(
            f"| {v.name} | {v.median * 1e3:.1f} | "
            f"{v.median / base.median:.3f} | {v.cpu_median * 1e3:.1f} | "
            f"{v.cpu_median / base.cpu_median:.3f} |"
        )
    return lines


def _reading(args, variants, rows, ratio: float, cpu_ratio: float) -> str:
    eng = variants[0]
    (_, f_eng, _, _, mfu_eng, _), (_, f_base, _, _, mfu_base, _) = rows[:2]

    def verdict(r: float) -> str:
        return "met" if r <= 1.10 else "missed"

    reading = (
        f"Reading (computed from the figures above): Engram adds "
        f"{(cpu_ratio - 1) * 100:+.1f}% CPU time (goal {verdict(cpu_ratio)}) and "
        f"{(ratio - 1) * 100:+.1f}% wall time (goal {verdict(ratio)}) per step, for "
        f"{(f_eng / f_base - 1) * 100:+.1f}% model FLOPs; MFU {mfu_eng * 100:.1f}% with "
        f"and {mfu_base * 100:.1f}% without. XLA executes "
        f"{eng.xla_flops / f_eng:.2f}x the model FLOPs (optimizer, MoE block padding)."
    )
    if args.attribution:
        parts = ", ".join(
            f"{v.name}: {(v.cpu_median / eng.cpu_median - 1) * 100:+.1f}%" for v in variants[2:]
        )
        reading += f" CPU time of the Engram variants relative to the full Engram: {parts}."
    return reading


def _flops_rows(variants, peak: float) -> list[tuple]:
    """Per variant: ``(variant, model FLOPs, count info, tokens/s, MFU, XLA-FLOP util.)``."""
    rows = []
    for v in variants:
        flops, info = model_flops(v.cfg)
        toks = v.cfg.train.batch_size * v.cfg.train.seq_len
        mfu, xmfu = flops / v.median / peak, v.xla_flops / v.median / peak
        rows.append((v, flops, info, toks / v.median, mfu, xmfu))
    return rows


def _markdown(args, load: float, variants, peak: float, per: dict) -> list[str]:
    eng, base = variants[:2]
    cfg = eng.cfg
    rows = _flops_rows(variants, peak)
    ratio = eng.median / base.median
    cpu_ratio = eng.cpu_median / base.cpu_median
    extra_lines = _attribution_lines(variants, base) if args.attribution else []
    command = command_line()
    lines = [
        HEADING,
        "",
        f"Command: `{command}`  ",
        f"Date: {date_utc()}  ",
        f"Machine: {os.cpu_count()} CPU cores shared with other jobs (load average "
        f"{load:.1f} at start), jax {jax.__version__}. {args.repeats} interleaved rounds of "
        f"{args.steps} steps per variant; medians of all {args.repeats * args.steps} step "
        "times. Peak: best fp32 `jax.jit(a @ a)` in this run, "
        + ", ".join(f"{n}^2: {r / 1e9:.0f} GFLOP/s" for n, r in per.items())
        + f" -> {peak / 1e9:.0f} GFLOP/s.",
        "",
        f"Preset `{args.preset}`{' ' + ' '.join(args.sets) if args.sets else ''}: "
        f"batch {cfg.train.batch_size} x {cfg.train.seq_len} tokens, d={cfg.model.d_model}, "
        f"{cfg.model.n_layers} blocks; Engram at {list(cfg.engram.layer_ids)}, "
        f"{eng.table_rows():,} table rows (sparse row-wise Adam).",
        "",
        "| variant | step ms (median) | step CPU s | tokens/s | activated params "
        "| model GFLOP/step | MFU | XLA GFLOP/step | XLA-FLOP util. |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v, flops, info, tps, mfu, xmfu in rows[:2]:
        lines.append(
            f"| {v.name} | {v.median * 1e3:.1f} | {v.cpu_median:.2f} | {tps:,.0f} | "
            f"{info['activated']:,} | {flops / 1e9:.3f} | {mfu * 100:.1f}% | "
            f"{v.xla_flops / 1e9:.3f} | {xmfu * 100:.1f}% |"
        )
    lines += [
        "",
        f"Step time ratio Engram / no Engram: wall **{ratio:.3f}** "
        f"({(ratio - 1) * 100:+.1f}%), CPU time **{cpu_ratio:.3f}** "
        f"({(cpu_ratio - 1) * 100:+.1f}%); goal <= +10%. CPU time (user + system of all "
        "threads of the process) is the steadier measure on a loaded machine; MFU uses "
        "wall time.",
        *extra_lines,
        "",
        "Model FLOPs: `6 * (P_act - R + V*d) * B*T + 12 * L * H * Dh * T * B*T`, P_act "
        "from `count_params` (no embedding/head), R = retrieved Engram row parameters "
        "(a gather, no FLOPs), V*d the LM head; the attention term counts the full "
        "T x T products forward and backward. XLA GFLOP is the compiled step's "
        "`cost_analysis()` (includes optimizer arithmetic, MoE block padding).",
        "",
    ]
    reading = _reading(args, variants, rows, ratio, cpu_ratio)
    lines += [reading, ""]
    return lines


if __name__ == "__main__":
    main()
