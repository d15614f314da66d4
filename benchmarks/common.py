"""Helpers every benchmark shares (markdown sections: :mod:`benchmarks.bench_markdown`)."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_seconds() -> float:
    """CPU seconds (user + system, all threads) of this process: on a machine shared with
    other jobs this measures the work, where wall time also measures the queue."""
    t = os.times()
    return t.user + t.system


def add_cache_dir_arg(ap) -> None:
    ap.add_argument(
        "--cache-dir",
        default="/tmp/engram_jax_bench_cache",
        help="JAX persistent compilation cache ('' to disable)",
    )


def enable_compile_cache(path: str) -> None:
    """JAX's persistent compilation cache in ``path`` ('' leaves it off): reruns of the same
    shapes skip compilation."""
    if path:
        import jax

        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def add_variant_args(ap, *, repeats: int, steps: int) -> None:
    """What a benchmark of interleaved variants of one preset takes (and
    :func:`benchmarks.bench_markdown.interleaved_header` reports): --preset, --set (repeatable),
    --repeats, --steps."""
    ap.add_argument("--preset", default="toy")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--repeats", type=int, default=repeats, help="interleaved rounds per variant")
    ap.add_argument("--steps", type=int, default=steps, help="timed steps per round")


def parse_args_with_cache(ap):
    """``ap`` with ``--cache-dir`` and ``--update`` added, parsed; JAX's persistent compilation
    cache enabled in ``--cache-dir``."""
    add_cache_dir_arg(ap)
    ap.add_argument("--update", type=Path, help="replace this section of a markdown file")
    args = ap.parse_args()
    enable_compile_cache(args.cache_dir)
    return args
