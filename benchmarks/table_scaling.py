"""Train-step time vs Engram table size: sparse row-wise Adam (default) vs the dense path.

The ``tiny`` preset with one Engram layer (``engram.layer_ids=[1]``), 2 orders x 4 heads and
``engram.engram_vocab_size=[N,N]``: 8 heads of ~N rows, i.e. ~8N total table rows. For N =
12,500 / 125,000 / 1,250,000 (1e5 / 1e6 / 1e7 rows) both paths are compiled (the real
``make_train_step``, jit with ``donate_argnums=0``) and timed on one fixed synthetic batch,
every variant interleaved in each round; medians. The sparse path's step should not depend on
the table size (its work is O(looked-up rows)); the dense path differentiates through the
gather (a table-sized gradient) and runs Adam over the whole table.

``--outside-bar`` also runs the project's CLI for the smallest and largest N exactly as an
outside check would (``engram-jax train --preset tiny --set ...``, checkpoints and eval off)
and reports the median ``step_time_s`` of its ``metrics.jsonl``.

    python -m benchmarks.table_scaling
    python -m benchmarks.table_scaling --outside-bar --update BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks.bench_markdown import header, publish
from benchmarks.common import parse_args_with_cache
from benchmarks.train_throughput import Variant, interleave

HEADING = "## Train step vs table size: sparse vs dense table updates (CPU)"
BASE = ["engram.layer_ids=[1]", "engram.n_head_per_ngram=4"]


def outside_bar(n: int, steps: int) -> tuple[float, str]:
    workdir = tempfile.mkdtemp(prefix=f"tscale{n}_", dir="/tmp")
    sets = [
        *BASE,
        f"engram.engram_vocab_size=[{n},{n}]",
        f"train.steps={steps}",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.log_every=1",
    ]
    exe = str(Path(sys.executable).with_name("engram-jax"))
    cmd = [exe, "train", "--preset", "tiny", "--workdir", workdir]
    for s in sets:
        cmd += ["--set", s]
    shown = "engram-jax train --preset tiny --workdir W " + " ".join(f"--set {s}" for s in sets)
    print(f"running: {shown}", flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    times = [r["step_time_s"] for r in recs if "step_time_s" in r]
    shutil.rmtree(workdir, ignore_errors=True)
    med = float(np.median(times))
    print(
        f"  N={n}: {len(times)} steps, median step_time_s {med:.4f} (wall {wall:.0f} s)", flush=True
    )
    return med, shown


def _args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="12500,125000,1250000", help="N per order (comma list)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round and variant")
    ap.add_argument("--no-dense", action="store_true", help="sparse path only")
    ap.add_argument(
        "--outside-bar",
        action="store_true",
        help="also run `engram-jax train` for the smallest and largest N",
    )
    ap.add_argument("--bar-steps", type=int, default=30)
    return parse_args_with_cache(ap)


def main() -> None:
    args = _args()
    sizes = [int(s) for s in args.sizes.split(",")]
    load = os.getloadavg()[0]

    variants = []
    for path, extra in (("sparse", []), ("dense", ["engram.sparse_update=False"])):
        if path == "dense" and args.no_dense:
            continue
        for n in sizes:
            v = Variant(
                f"{path} N={n}", "tiny", [*BASE, f"engram.engram_vocab_size=[{n},{n}]", *extra]
            )
            v.path, v.n = path, n
            print(f"compiled {v.name} ({v.table_rows():,} rows) in {v.compile_s:.1f} s", flush=True)
            variants.append(v)
    interleave(variants, args.repeats, args.steps)

    bar = []
    if args.outside_bar:
        for n in (sizes[0], sizes[-1]):
            bar.append((n, *outside_bar(n, args.bar_steps)))

    publish(HEADING, _markdown(args, load, sizes, variants, bar), args.update)


def _ratio(by: dict, sizes: list, path: str, attr: str) -> float:
    """``attr`` of ``path``'s variant at the largest N over the one at the smallest."""
    return getattr(by[(path, sizes[-1])], attr) / getattr(by[(path, sizes[0])], attr)


def _size_table(sizes: list, variants: list, paths: list, by: dict) -> list[str]:
    head = "| N | table rows |" + "".join(
        f" {p} wall ms | vs smallest | {p} CPU ms | vs smallest |" for p in paths
    )
    lines = [head, "|---:|---:|" + "---:|---:|---:|---:|" * len(paths)]
    for n in sizes:
        row = f"| {n:,} | {by[(paths[0], n)].table_rows():,} |"
        for p in paths:
            v, v0 = by[(p, n)], by[(p, sizes[0])]
            row += (
                f" {v.median * 1e3:.1f} | {v.median / v0.median:.3f} |"
                f" {v.cpu_median * 1e3:.1f} | {v.cpu_median / v0.cpu_median:.3f} |"
            )
        lines.append(row)
    return lines


def _memory_lines(variants: list) -> list[str]:
    lines = [
        "",
        "Compiled step (XLA): scratch memory besides inputs/outputs, donated bytes, "
        "and the instructions whose result is table-shaped:",
        "",
        "| variant | temp MB | aliased (donated) MB | table-shaped ops |",
        "|---|---:|---:|---|",
    ]
    for v in variants:
        ops = ", ".join(f"{k} x{c}" for k, c in sorted(v.table_ops.items())) or "-"
        lines.append(f"| {v.name} | {v.temp_bytes / 1e6:.1f} | {v.alias_bytes / 1e6:.1f} | {ops} |")
    return lines


def _bar_lines(args, bar: list) -> list[str]:
    if not bar:
        return []
    lines = [
        "",
        f"Outside-bar command, {args.bar_steps} steps each, median `step_time_s` "
        "from `metrics.jsonl` (`W` a fresh /tmp directory):",
        "",
    ]
    for _, med, shown in bar:
        lines.append(f"- `{shown}`: {med * 1e3:.1f} ms")
    lines.append(f"- ratio N={bar[-1][0]:,} / N={bar[0][0]:,}: **{bar[-1][1] / bar[0][1]:.3f}**")
    return lines


def _reading(variants: list, paths: list, ratio) -> str:
    sp = [v for v in variants if v.path == "sparse"]
    reading = (
        f"Reading (computed from the figures above): with "
        f"{sp[-1].table_rows() / sp[0].table_rows():.0f}x the table rows the sparse step "
        f"takes {ratio('sparse', 'median'):.3f}x the wall time and "
        f"{ratio('sparse', 'cpu_median'):.3f}x the CPU time (goal <= 1.15: "
        f"{'met' if ratio('sparse', 'median') <= 1.15 else 'missed'} on wall time). Its "
        f"scratch memory goes {sp[0].temp_bytes / 1e6:.1f} -> {sp[-1].temp_bytes / 1e6:.1f}"
        f" MB while the donated (in-place) bytes grow with the tables "
        f"({sp[0].alias_bytes / 1e6:.1f} -> {sp[-1].alias_bytes / 1e6:.1f} MB)."
    )
    if "dense" in paths:
        de = [v for v in variants if v.path == "dense"]
        reading += (
            f" The dense path grows {ratio('dense', 'median'):.2f}x in wall time and "
            f"{ratio('dense', 'cpu_median'):.2f}x in CPU time, with scratch "
            f"{de[0].temp_bytes / 1e6:.1f} -> {de[-1].temp_bytes / 1e6:.1f} MB: a "
            "table-sized gradient and Adam over every row."
        )
    return reading


def _markdown(args, load: float, sizes: list, variants: list, bar: list) -> list[str]:
    lines = [
        *header(
            HEADING,
            load,
            f"jax {jax.__version__}. All variants compiled first, then {args.repeats} "
            f"interleaved rounds of {args.steps} steps each; medians.",
        ),
        "",
        "`tiny` with `"
        + " ".join(f"--set {s}" for s in BASE)
        + " --set engram.engram_vocab_size=[N,N]`; dense = "
        "`--set engram.sparse_update=False`.",
        "",
    ]
    paths = sorted({v.path for v in variants}, key=["sparse", "dense"].index)
    by = {(v.path, v.n): v for v in variants}
    lines += _size_table(sizes, variants, paths, by)

    def ratio(p, attr):
        return _ratio(by, sizes, p, attr)

    lines += [
        "",
        f"Sparse step(largest)/step(smallest): wall **{ratio('sparse', 'median'):.3f}**,"
        f" CPU time **{ratio('sparse', 'cpu_median'):.3f}** (goal <= 1.15).",
    ]
    if "dense" in paths:
        lines[-1] += (
            f" Dense: wall {ratio('dense', 'median'):.3f}, CPU time "
            f"{ratio('dense', 'cpu_median'):.3f}."
        )
    lines += _memory_lines(variants)
    lines += _bar_lines(args, bar)
    lines += ["", _reading(variants, paths, ratio), ""]
    return lines


if __name__ == "__main__":
    main()
