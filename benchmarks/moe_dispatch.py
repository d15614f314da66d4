"""MoE dispatch on CPU: ragged_dot vs padded blocks vs capacity einsum, forward + backward.

One MoE sublayer (router, routed experts, shared expert) at the tiny and small presets'
sizes, jitted ``value_and_grad`` of a scalar of its output w.r.t. all its parameters. The
reference is a dense SwiGLU of width ``top_k * expert_hidden`` over the same tokens: exactly the
routed FLOPs with no dispatch at all. Each time is the best of ``--repeats`` runs (the machine
is shared). XLA's own FLOP estimate (``cost_analysis``) is load-independent.

    python -m benchmarks.moe_dispatch
    python -m benchmarks.moe_dispatch --update BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.bench_markdown import command_line, date_utc, publish
from engram_jax.config import MoEConfig
from engram_jax.moe import MoE, SwiGLU
from engram_jax.presets import get_preset

HEADING = "## MoE dispatch (CPU)"
NOTE = (
    "ragged_dot lowers on CPU to a masked dense dot over all E experts (E times the routed "
    "FLOPs); blocked pads each expert's rows to a block multiple and gathers one weight "
    "matrix per block; capacity computes E x C slots. The presets use `blocked` on CPU and "
    "`ragged` (native grouped matmul) for TPU/GPU."
)


def _timed(fn, args, repeats: int) -> tuple[float, float]:
    jitted = jax.jit(fn)
    flops = jitted.lower(*args).compile().cost_analysis().get("flops", float("nan"))
    jax.block_until_ready(jitted(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(jitted(*args))
        best = min(best, time.perf_counter() - start)
    return best, flops


def _loss_grad(graphdef, rest, first_output_only: bool):
    def loss(state, x):
        out = nnx.merge(graphdef, state, *rest)(x)
        return jnp.mean(jnp.square(out[0] if first_output_only else out))

    return jax.value_and_grad(loss)


def bench(preset: str, batch: int, seq: int, repeats: int) -> list[str]:
    cfg = get_preset(preset)
    d, moe_cfg = cfg.model.d_model, cfg.moe
    x = jax.random.normal(jax.random.key(0), (batch, seq, d))
    rows = []
    dense = SwiGLU(
        d, (moe_cfg.top_k + moe_cfg.n_shared_experts) * moe_cfg.expert_hidden, rngs=nnx.Rngs(0)
    )
    g, s = nnx.split(dense, nnx.Param)
    ref_t, ref_f = _timed(_loss_grad(g, (), False), (s, x), repeats)
    rows.append(("dense SwiGLU, width (k+shared)*F", ref_t, ref_f))
    for dispatch in ("ragged", "blocked", "capacity"):
        mc = MoEConfig(**{**moe_cfg.__dict__, "dispatch": dispatch})
        g, s, bias = nnx.split(MoE(mc, d, rngs=nnx.Rngs(0)), nnx.Param, ...)
        t, f = _timed(_loss_grad(g, (bias,), True), (s, x), repeats)
        label = dispatch + (f" (factor {mc.capacity_factor})" if dispatch == "capacity" else "")
        rows.append((label, t, f))
    head = (
        f"| {preset}: S={batch}x{seq}, D={d}, E={moe_cfg.n_routed_experts}, "
        f"k={moe_cfg.top_k}, F={moe_cfg.expert_hidden} | fwd+bwd ms | vs dense | GFLOP |"
    )
    out = [head, "|---|---:|---:|---:|"]
    for label, t, f in rows:
        out.append(f"| {label} | {t * 1e3:.1f} | {t / ref_t:.2f}x | {f / 1e9:.2f} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--update", type=Path, help="replace this section of a markdown file")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    machine = (
        f"Machine: {os.cpu_count()} CPU cores shared with other jobs (load average "
        f"{load:.1f} at start), jax {jax.__version__}. Best of {args.repeats} wall-clock "
        "runs, so times are noisy; the GFLOP column (XLA's cost analysis) is not."
    )
    lines = [HEADING, "", f"Command: `{command_line()}`  ", f"Date: {date_utc()}  ", machine, ""]
    for preset, batch, seq in (("tiny", 8, 128), ("small", 16, 256)):
        lines += [*bench(preset, batch, seq, args.repeats), ""]
    lines += [NOTE, ""]
    publish(HEADING, lines, args.update)


if __name__ == "__main__":
    main()
