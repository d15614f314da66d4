"""What bounds an Orbax restore of the 2 GiB table: ``perf`` samples of one restore.

    python -m benchmarks.restore_profile --update BENCHMARKS.md

Saves the table of ``benchmarks.checkpoint_bandwidth`` (8 devices), evicts its files from the
page cache, then runs that benchmark's restore worker (onto 1 device) under
``perf record`` (all threads, user and kernel) and tabulates where the CPU samples fall:
the symbols with the most samples, and the share of kernel page-fault work (zeroing and
mapping freshly allocated memory) against copies and reads. Needs ``perf`` and
``perf_event_paranoid <= 2``. The worker's own CRC-32 and lookup checks after the restore are
in the samples too (``crc32_z``, a few percent).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.bench_markdown import header, publish
from benchmarks.checkpoint_bandwidth import _evict

HEADING = "## What bounds the restore of a 2 GiB table (perf profile)"
GROUPS = {
    "kernel: zeroing new pages (clear_page*)": ("clear_page",),
    "kernel: page faults, memcg, LRU, TLB": (
        "fault",
        "folio",
        "memcg",
        "lru",
        "_raw_spin",
        "tlb",
        "rmqueue",
        "charge",
        "mm_",
        "unmap",
        "pages",
    ),
    "copies (memmove/memcpy)": ("memmove", "memcpy"),
    "kernel: file read (copy_to_iter, filemap)": ("copy_to_iter", "filemap", "read"),
    "checks after the restore (crc32)": ("crc32",),
}


def _worker(kind: str, devices: int, directory: str, gib: float, perf: str | None) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu", MALLOC_ARENA_MAX="2")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.checkpoint_bandwidth",
        "--worker",
        kind,
        "--dir",
        directory,
        "--gib",
        str(gib),
        "--saves",
        "1",
        "--ab-repeats",
        "0",
    ]
    if perf:
        cmd = ["perf", "record", "-F", "499", "-g", "-o", perf, "--", *cmd]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:]


def _symbols(perf: str) -> list[tuple[float, str]]:
    text = subprocess.run(
        ["perf", "report", "-i", perf, "--no-children", "--sort", "sym", "--stdio", "-g", "none"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].endswith("%") and not line.startswith("#"):
            rows.append((float(parts[0][:-1]), " ".join(parts[2:])))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--dir", default="/tmp/restore_profile")
    p.add_argument("--update", type=Path)
    args = p.parse_args()
    load = os.getloadavg()[0]
    os.makedirs(args.dir, exist_ok=True)
    try:
        _worker("save", 8, args.dir, args.gib, None)
        _evict(args.dir)
        perf = os.path.join(args.dir, "perf.data")
        res = json.loads(_worker("restore", 1, args.dir, args.gib, perf))
        rows = _symbols(perf)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    total = sum(share for share, _ in rows)
    grouped = {name: 0.0 for name in GROUPS}
    for share, sym in rows:
        for name, keys in GROUPS.items():
            if any(k in sym for k in keys):
                grouped[name] += share
                break
    lines = header(HEADING, load, f"`perf record -F 499 -g`, {args.gib:g} GiB table.") + [
        "",
        f"Restore onto 1 device under perf: {res['restore_s']:.2f} s wall, "
        f"{res['restore_cpu_s']:.2f} s CPU; tensorstore alone reading the same array: "
        f"{res['ts_read_s']:.2f} s wall, {res['ts_read_cpu_s']:.2f} s CPU (both from an "
        "evicted page cache).",
        "",
        "| where the CPU samples fall | share |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {share:.1f}% |" for name, share in grouped.items()]
    lines += [f"| other ({len(rows)} symbols in all) | {total - sum(grouped.values()):.1f}% |"]
    lines += ["", "| top symbols | share |", "|---|---:|"]
    lines += [f"| `{sym}` | {share:.1f}% |" for share, sym in rows[:8]]
    publish(HEADING, lines + [""], args.update)


if __name__ == "__main__":
    main()
