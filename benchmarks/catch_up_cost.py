"""What exact table Adam's catch-up costs in the real train step, on Zipf-distributed text.

Three variants of the study preset's compiled train step, interleaved (A, B, C, A, ...):

- ``exact, chunked``: the default (rows replayed longest gap first in chunks, each chunk for
  its own longest gap: :func:`engram_jax.catch_up.catch_up_rows`);
- ``exact, unchunked``: the replay before chunking (every touched slot for the longest gap
  of the batch), traced with ``catch_up_touched(chunk=None)``; same arithmetic;
- ``lazy``: ``engram.lazy_adam=true`` (no catch-up at all).

A fixed batch would hide the catch-up (every row's gap becomes 0 after one step), so each step
gets a FRESH batch: tokens drawn from a Zipf law (p ~ 1/rank over the vocabulary), hashed by
``NgramHasher`` as the input pipeline does (on the host, outside the timed step); every
variant sees the same sequence of batches. The state starts as after ``--history`` steps of
such text: ``step`` and each table row's ``last`` are set from the touches of ``--history``
simulated batches (the moments stay zero: the replay's cost does not depend on their values),
so the gaps have their steady-state spread instead of growing from zero during the run.

    python -m benchmarks.catch_up_cost
    python -m benchmarks.catch_up_cost --update BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks.bench_markdown import interleaved_header, publish
from benchmarks.common import add_variant_args, cpu_seconds
from benchmarks.train_throughput import Variant, interleave
from engram_jax import catch_up, tables
from engram_jax import sharding as shd
from engram_jax.hashing import NgramHasher
from engram_jax.step import table_row_offsets

HEADING = "## Exact table Adam: catch-up cost on Zipf text (CPU)"


class ZipfText:
    """Batches of Zipf-distributed tokens, each new, with their hashed Engram ids."""

    def __init__(self, cfg, seed: int = 0, exponent: float = 1.0):
        self.cfg, V = cfg, cfg.model.vocab_size
        p = 1.0 / np.arange(1, V - 3 + 1) ** exponent
        self.p = p / p.sum()
        self.rng = np.random.default_rng(seed)
        self.hasher = NgramHasher(cfg.engram, V, pad_id=2, out_dtype=np.int32)

    def __next__(self) -> dict:
        B, S = self.cfg.train.batch_size, self.cfg.train.seq_len
        inputs = (3 + self.rng.choice(len(self.p), (B, S), p=self.p)).astype(np.int32)
        return {
            "inputs": inputs,
            "targets": np.roll(inputs, -1, axis=1),
            "engram_ids": self.hasher(inputs),
        }


def history(cfg, rows: dict[int, int], steps: int, seed: int = 0) -> dict[int, np.ndarray]:
    """Each table row's last step touched in ``steps`` batches of Zipf text (-1: never)."""
    text, offsets = ZipfText(cfg, seed), table_row_offsets(cfg)
    last = {i: np.full(n, -1, np.int32) for i, n in rows.items()}
    for s in range(steps):
        for i, ids in next(text)["engram_ids"].items():
            last[i][(ids + offsets[i]).reshape(-1)] = s
    return last


def gap_profile(cfg, last: dict[int, np.ndarray], seed: int = 1) -> dict:
    """For the first timed batch: touched rows, and the replay's row-steps unchunked (slots x
    the longest gap) and as rows (sum of min(gap, horizon)), summed over the Engram layers."""
    h = catch_up.catch_up_horizon(cfg.optim.b1, cfg.optim.b2)
    step, out = max(int(v.max()) for v in last.values()) + 1, dict(rows=0, slots=0, unch=0, ch=0)
    for i, ids in next(ZipfText(cfg, seed))["engram_ids"].items():
        lk = last[i][np.unique((ids + table_row_offsets(cfg)[i]).reshape(-1))]
        gap = np.where(lk < 0, 0, step - 1 - lk)
        out["rows"] += len(gap)
        out["slots"] += ids.size
        out["unch"] += ids.size * min(int(gap.max()), h)
        out["ch"] += int(np.minimum(gap, h).sum())
    return out


class ZipfVariant(Variant):
    """A :class:`Variant` that starts after ``last`` and reads a new batch every step."""

    def __init__(self, name, preset, sets, hist_steps, unchunked=False, seed=1):
        self.seed = seed
        saved = tables.catch_up_touched
        if unchunked:  # only while tracing
            tables.catch_up_touched = functools.partial(saved, chunk=None)
        try:
            super().__init__(name, preset, sets)
        finally:
            tables.catch_up_touched = saved
        st = self.state
        rows = {i: int(x.shape[0]) for i, x in st["table_last"].items()}
        self.last = history(self.cfg, rows, hist_steps)
        st["step"] = jax.device_put(np.int32(hist_steps), st["step"].sharding)
        for i, x in st["table_last"].items():
            st["table_last"][i] = jax.device_put(self.last[i], x.sharding)
        self.text = ZipfText(self.cfg, seed)
        self.times.clear()
        self.cpu.clear()

    def run(self, n: int) -> None:
        if not hasattr(self, "text"):  # the warm-up inside Variant.__init__
            self.text = ZipfText(self.cfg, self.seed + 100)
        for _ in range(n):
            batch = shd.global_batch_from_local(self.mesh, next(self.text))
            c, t = cpu_seconds(), time.perf_counter()
            self.state, m = self.fn(self.state, batch)
            jax.block_until_ready(m)
            self.times.append(time.perf_counter() - t)
            self.cpu.append(cpu_seconds() - c)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_variant_args(ap, repeats=5, steps=3)
    ap.add_argument("--history", type=int, default=300, help="simulated steps before timing")
    ap.add_argument("--update", type=Path, help="replace this section of a markdown file")
    args = ap.parse_args()
    load0 = os.getloadavg()
    h = args.history
    variants = [
        ZipfVariant("exact, chunked", args.preset, args.sets, h),
        ZipfVariant("exact, unchunked", args.preset, args.sets, h, unchunked=True),
        ZipfVariant("lazy", args.preset, [*args.sets, "engram.lazy_adam=true"], h),
    ]
    interleave(variants, args.repeats, args.steps)
    load1 = os.getloadavg()
    cfg, lazy = variants[0].cfg, variants[-1]
    g = gap_profile(cfg, variants[0].last)
    lines = [
        *interleaved_header(
            HEADING,
            (load0, load1),
            args,
            cfg,
            f", a new Zipf batch every step, medians of all step times; state as after {h} "
            "steps of Zipf text.",
            f"First timed batch, over the Engram layers: {g['slots']:,} id slots, {g['rows']:,} "
            f"distinct rows; replayed row-steps unchunked (slots x longest gap, capped at the "
            f"horizon) {g['unch']:,}, as rows (sum of min(gap, horizon)) {g['ch']:,}.",
        ),
        "",
        "| variant | step ms (median) | step CPU ms | x lazy (wall) | x lazy (CPU) |",
        "|---|---:|---:|---:|---:|",
    ]
    for v in variants:
        lines.append(
            f"| {v.name} | {v.median * 1e3:.1f} | {v.cpu_median * 1e3:.1f} | "
            f"{v.median / lazy.median:.3f} | {v.cpu_median / lazy.cpu_median:.3f} |"
        )
    lines.append("")
    publish(HEADING, lines, args.update)


if __name__ == "__main__":
    main()
