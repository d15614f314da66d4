"""Checkpoint bandwidth of a 2 GiB Engram table through the project's Checkpointer, vs dd,
and the same checkpoint restored onto other meshes (8 -> 4 and 8 -> 1 CPU devices).

The state holds one Engram table at the trainer's key (``checkpoint.table_key``, row-chunked)
of ``--gib`` GiB (``[R, 64]`` fp32, rows sharded over every device as in training) and
the step. Steps, each in a fresh subprocess so the device count and ``MALLOC_ARENA_MAX`` can
differ and the peak RSS is the step's own (:mod:`benchmarks.checkpoint_worker`):

1. ``save`` on 8 fake CPU devices (``--xla_force_host_platform_device_count=8``): the table is
   written ``--saves`` times through :class:`engram_jax.checkpoint.Checkpointer` (Orbax, async).
   Timed: ``save()`` returning, the write finished (``wait_until_finished``), and after an
   ``os.sync()`` (data on disk). Also records the table's CRC-32 in row order and a
   ``sharded_lookup`` of fixed ids (the rows the model would see).
2. ``restore`` onto 4 and onto 1 device, with and without ``MALLOC_ARENA_MAX=2``: an abstract
   target (``ShapeDtypeStruct`` with the NEW mesh's sharding) is restored, then CRC-32 and the
   lookup are compared bit for bit with step 1. Before each restore the checkpoint files are
   evicted from the page cache (``posix_fadvise(DONTNEED)`` after ``sync``; dropping caches
   needs privileges this container lacks), so restores read the disk.
   Then, as the floor under Orbax, tensorstore alone reads the same array (evicted again)
   into one NumPy array.
3. ``dd`` on the same file system, before and after: write ``bs=16M oflag=direct`` and
   ``conv=fdatasync``; read ``iflag=direct`` and buffered after eviction. Ratios use the best
   dd figures.

    python -m benchmarks.checkpoint_bandwidth
    python -m benchmarks.checkpoint_bandwidth --update BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.checkpoint_worker import D, evict

HEADING = "## Checkpoint bandwidth and cross-mesh restore of a 2 GiB table (CPU)"


# ---------------------------------------------------------------------------------------------
# Orchestrator


def _run_worker(
    kind: str, devices: int, directory: str, args, arena: bool, rss_limit_gb: float
) -> dict:
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
    )
    env.pop("MALLOC_ARENA_MAX", None)
    if arena:
        env["MALLOC_ARENA_MAX"] = "2"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.checkpoint_worker",
        kind,
        "--dir",
        directory,
        "--gib",
        str(args.gib),
        "--saves",
        str(args.saves),
        "--ab-repeats",
        str(args.ab_repeats if kind == "save" else 0),
    ]
    label = f"{kind} on {devices} device(s){' MALLOC_ARENA_MAX=2' if arena else ''}"
    print(f"{label} ...", flush=True)
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    peak = 0.0
    killed = False
    while p.poll() is None:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                rss = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS")) / 1e6
            peak = max(peak, rss)
            if rss > rss_limit_gb:
                p.kill()
                killed = True
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            pass
        time.sleep(0.05)
    text = p.stdout.read()
    if killed:
        print(f"  killed: RSS above {rss_limit_gb} GB", flush=True)
        return dict(
            killed=True, peak_rss_gb=peak, malloc_arena_max="2" if arena else None, devices=devices
        )
    if p.returncode:
        raise RuntimeError(f"{label} failed ({p.returncode})")
    res = json.loads(next(ln for ln in text.splitlines() if ln.startswith("RESULT "))[7:])
    print(f"  {json.dumps(res)}", flush=True)
    return res


def _dd(args_list: list[str]) -> float:
    """Run dd, return its MB/s (10^6 bytes) from its own byte count and our wall time."""
    t = time.perf_counter()
    r = subprocess.run(["dd", *args_list], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    nbytes = int(re.search(r"^(\d+) bytes", r.stderr, re.MULTILINE).group(1))
    return nbytes / wall / 1e6


def dd_bandwidth(directory: str, gib: float) -> dict:
    f = os.path.join(directory, "dd.bin")
    count = max(1, int(gib * 64))  # 16 MiB blocks
    out = {}
    out["write_direct"] = _dd(
        ["if=/dev/zero", f"of={f}", "bs=16M", f"count={count}", "oflag=direct"]
    )
    out["read_direct"] = _dd([f"if={f}", "of=/dev/null", "bs=16M", "iflag=direct"])
    os.remove(f)
    out["write_fdatasync"] = _dd(
        ["if=/dev/zero", f"of={f}", "bs=16M", f"count={count}", "conv=fdatasync"]
    )
    evict(directory)
    out["read_evicted"] = _dd([f"if={f}", "of=/dev/null", "bs=16M"])
    os.remove(f)
    print("  dd MB/s: " + ", ".join(f"{k} {v:.0f}" for k, v in out.items()), flush=True)
    return out


def _zstd_lines(save: dict, mb: float) -> list[str]:
    """The raw-Orbax zstd on/off table (only with --ab-repeats)."""
    import numpy as np

    if not save.get("zstd_ab"):
        return []
    lines = [
        "Raw Orbax (`PyTreeCheckpointHandler`, same process, alternating), zstd "
        "compression (Orbax's default; `Checkpointer` turns it off) on vs off:",
        "",
        "| zstd | save s (median) | MB/s | CPU s | on disk MB |",
        "|---|---:|---:|---:|---:|",
    ]
    for comp in (True, False):
        rs = [r for r in save["zstd_ab"] if r["zstd"] == comp]
        w = float(np.median([r["wall"] for r in rs]))
        lines.append(
            f"| {'on' if comp else 'off'} | {w:.2f} | {mb / w:.0f} | "
            f"{float(np.median([r['cpu'] for r in rs])):.1f} | "
            f"{rs[0]['disk_bytes'] / 1e6:,.0f} |"
        )
    lines.append("")
    return lines


def _restore_lines(args, save: dict, restores: list, mb: float, rref: float) -> list[str]:
    """The cross-mesh restore table."""
    lines = [
        "Cross-mesh restore of the 8-device checkpoint (abstract target with the new "
        "mesh's `NamedSharding`, rows over all devices):",
        "",
        "| restore onto | MALLOC_ARENA_MAX | seconds | MB/s | vs dd read | CRC-32 = saved "
        "(Orbax, tensorstore) | lookup identical | peak RSS GB |",
        "|---|---|---:|---:|---:|---|---|---:|",
    ]
    for r in restores:
        if r.get("killed"):
            lines.append(
                f"| {r['devices']} device(s) | {r['malloc_arena_max'] or 'unset'} | "
                f"killed | | | | | > {args.rss_limit_gb:.0f} |"
            )
            continue
        lines.append(
            f"| {r['devices']} device(s), `{r['sharding']}` | "
            f"{r['malloc_arena_max'] or 'unset'} | {r['restore_s']:.2f} | "
            f"{mb / r['restore_s']:.0f} | {mb / r['restore_s'] / rref * 100:.0f}% | "
            f"{r['crc'] == save['crc'] and r['ts_crc'] == save['crc']} | "
            f"{r['lookup_identical']} | {r['peak_rss_gb']:.2f} |"
        )
    return lines


def _measure(args):
    """dd before, the save worker, restores onto 4 and 1 devices (with and without
    MALLOC_ARENA_MAX=2), dd after: ``(load, df, save, restores, dd, du)``."""
    os.makedirs(args.dir, exist_ok=True)
    free = shutil.disk_usage(args.dir).free / 2**30
    if free < 3 * args.gib + 2:
        raise SystemExit(f"{args.dir}: only {free:.1f} GiB free")
    df = subprocess.run(["df", "-h", args.dir], capture_output=True, text=True).stdout
    print(df, flush=True)
    load = os.getloadavg()[0]
    ck_dir = os.path.join(args.dir, "run")
    os.makedirs(ck_dir, exist_ok=True)
    try:
        print("dd (before) ...", flush=True)
        dd = [dd_bandwidth(args.dir, args.gib)]
        save = _run_worker("save", 8, ck_dir, args, arena=True, rss_limit_gb=args.rss_limit_gb)
        du = subprocess.run(
            ["du", "-sb", os.path.join(ck_dir, "checkpoints")], capture_output=True, text=True
        ).stdout.split()[0]
        restores = []
        for devices in (4, 1):
            for arena in (True, False):
                evict(ck_dir)
                restores.append(
                    _run_worker("restore", devices, ck_dir, args, arena, args.rss_limit_gb)
                )
        print("dd (after) ...", flush=True)
        dd.append(dd_bandwidth(args.dir, args.gib))
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)

    return load, df, save, restores, dd, du


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.0, help="table size in GiB")
    ap.add_argument("--saves", type=int, default=3, help="timed saves (8 devices)")
    ap.add_argument("--ab-repeats", type=int, default=0, help="also N raw Orbax saves, zstd on/off")
    ap.add_argument("--dir", default="/tmp/ckpt_bandwidth", help="scratch directory (deleted)")
    ap.add_argument("--rss-limit-gb", type=float, default=14.0, help="kill a worker over this (GB)")
    ap.add_argument("--update", type=Path, help="replace this section of a markdown file")
    args = ap.parse_args()
    load, df, save, restores, dd, du = _measure(args)
    _publish(args, load, df, save, restores, dd, du)


def _figures(save: dict, restores: list, dd: list):
    """The medians of the runs, their bandwidths, and the best dd figures they are compared
    with (``rref``/``wref``: the best read/write)."""
    import types

    import numpy as np

    nbytes = save["bytes"]
    mb = nbytes / 1e6
    ddb = {k: max(d[k] for d in dd) for k in dd[0]}
    fin = float(np.median([s["finished"] for s in save["saves"]]))
    syn = float(np.median([s["synced"] for s in save["saves"]]))
    ret = float(np.median([s["returned"] for s in save["saves"]]))
    ok = [r for r in restores if not r.get("killed")]
    rest = float(np.median([r["restore_s"] for r in ok])) if ok else float("nan")
    save_bw, sync_bw, rest_bw = mb / fin, mb / syn, mb / rest
    cpu_save = float(np.median([s["cpu"] for s in save["saves"]]))
    cpu_rest = float(np.median([r["restore_cpu_s"] for r in ok])) if ok else float("nan")
    ts_s = float(np.median([r["ts_read_s"] for r in ok])) if ok else float("nan")
    ts_cpu = float(np.median([r["ts_read_cpu_s"] for r in ok])) if ok else float("nan")
    wref = max(ddb["write_direct"], ddb["write_fdatasync"])
    rref = max(ddb["read_direct"], ddb["read_evicted"])

    return types.SimpleNamespace(**{k: v for k, v in locals().items() if k not in ("np", "types")})


def _publish(args, load, df, save, restores, dd, du) -> None:
    from benchmarks.bench_markdown import header, publish

    g = _figures(save, restores, dd)
    lines = [
        *header(
            HEADING,
            load,
            f"{args.dir} on `{df.splitlines()[-1].split()[0]}`; page cache evicted with "
            "`posix_fadvise(DONTNEED)` before every read (no privilege to drop caches).",
        ),
        "",
        f"State: one Engram table `[{save['rows']:,}, {D}]` fp32 = {g.mb:,.0f} MB "
        f"({g.nbytes / 2**30:.2f} GiB; {int(du) / 1e6:,.0f} MB on disk) + the step, saved "
        f"from 8 fake CPU devices (rows sharded 8 ways) with `Checkpointer.save` "
        f"(async), {args.saves} saves, medians.",
        "",
        "| | seconds | MB/s | vs dd |",
        "|---|---:|---:|---:|",
        f"| dd write `bs=16M oflag=direct` | | {g.ddb['write_direct']:.0f} | |",
        f"| dd write `bs=16M conv=fdatasync` | | {g.ddb['write_fdatasync']:.0f} | |",
        f"| dd read `bs=16M iflag=direct` | | {g.ddb['read_direct']:.0f} | |",
        f"| dd read `bs=16M`, cache evicted | | {g.ddb['read_evicted']:.0f} | |",
        f"| Orbax `save()` returned | {g.ret:.2f} | | |",
        f"| Orbax save, write finished (CPU {g.cpu_save:.1f} s) | {g.fin:.2f} | {g.save_bw:.0f} | "
        f"{g.save_bw / g.wref * 100:.0f}% |",
        f"| Orbax save, finished + `os.sync()` | {g.syn:.2f} | {g.sync_bw:.0f} | "
        f"{g.sync_bw / g.wref * 100:.0f}% |",
        f"| Orbax restore, median of {len(g.ok)} (CPU {g.cpu_rest:.1f} s) | {g.rest:.2f} | "
        f"{g.rest_bw:.0f} | "
        f"{g.rest_bw / g.rref * 100:.0f}% |",
        f"| tensorstore alone: whole array into one NumPy array, median of {len(g.ok)} "
        f"(CPU {g.ts_cpu:.1f} s) | {g.ts_s:.2f} | {g.mb / g.ts_s:.0f} | "
        f"{g.mb / g.ts_s / g.rref * 100:.0f}% |",
        "",
        "Ratios against the best dd write / read of the two runs (before and after), "
        "buffered or direct, whichever is faster; goal >= 50%. CPU = user+system seconds "
        "of the process during the operation.",
        "",
        f"Reading (computed from the figures above): save reaches "
        f"{g.save_bw / g.ddb['write_direct'] * 100:.0f}% of dd's O_DIRECT write and "
        f"{g.save_bw / g.ddb['write_fdatasync'] * 100:.0f}% of its buffered write + fdatasync. "
        f"Restore reaches {g.rest_bw / g.ddb['read_direct'] * 100:.0f}% of dd's O_DIRECT read "
        f"and {g.rest_bw / g.ddb['read_evicted'] * 100:.0f}% of its buffered read of an "
        f"evicted file; tensorstore alone, without Orbax's sharding and device copies, "
        f"reaches {g.mb / g.ts_s / g.rref * 100:.0f}% of the best dd read. Restore spends "
        f"{g.cpu_rest:.1f} s of CPU for {g.rest:.1f} s of wall time on {os.cpu_count()} "
        f"cores: it is bound by CPU (copies), not by the disk.",
        "",
    ]
    lines += _zstd_lines(save, g.mb)
    lines += _restore_lines(args, save, restores, g.mb, g.rref)
    lines += [
        "",
        f"Save worker (8 devices, MALLOC_ARENA_MAX=2, builds the table too): peak "
        f"RSS {save['peak_rss_gb']:.2f} GB. CRC-32 of the table in row order "
        f"{save['crc']:#010x}; lookup = `sharded_lookup` of 8x512 fixed ids on the "
        "restored mesh vs on the saving mesh, bitwise.",
        "",
    ]
    publish(HEADING, lines, args.update)


if __name__ == "__main__":
    main()
