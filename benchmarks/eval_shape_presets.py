"""Abstract construction of the paper presets: ``nnx.eval_shape`` time and parameter counts.

Nothing is allocated: the model is traced with ShapeDtypeStructs. The counts printed are
the real ``nnx.Param`` sizes and equal the analytic ``count_params`` (asserted).

    python -m benchmarks.eval_shape_presets
    python -m benchmarks.eval_shape_presets --update BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import jax
from flax import nnx

from benchmarks.bench_markdown import command_line, date_utc, publish
from engram_jax.model import EngramLM
from engram_jax.params import count_module_params, count_params, human
from engram_jax.presets import get_preset

HEADING = "## Abstract model construction (nnx.eval_shape)"
PRESETS = ("dense-4b", "moe-27b", "engram-27b", "engram-40b", "ablation-3b")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--update", type=Path, help="replace this section of a markdown file")
    args = ap.parse_args()
    lines = [
        HEADING,
        "",
        f"Command: `{command_line()}`  ",
        f"Date: {date_utc()}  ",
        f"Machine: {os.cpu_count()} CPU cores shared with other jobs (load average "
        f"{os.getloadavg()[0]:.1f} at start), jax {jax.__version__}; wall-clock, one run.",
        "",
        "| preset | eval_shape s | P_tot (actual Params) | Engram tables |",
        "|---|---:|---:|---:|",
    ]
    for name in PRESETS:
        cfg = get_preset(name)
        start = time.perf_counter()
        model = nnx.eval_shape(lambda cfg=cfg: EngramLM(cfg, rngs=nnx.Rngs(0)))
        seconds = time.perf_counter() - start
        actual = count_module_params(model)
        assert actual["total"] == count_params(cfg)["total"], name
        lines.append(
            f"| {name} | {seconds:.1f} | {human(actual['total'])} | "
            f"{human(actual['engram_tables'])} |"
        )
    publish(HEADING, lines, args.update)


if __name__ == "__main__":
    main()
