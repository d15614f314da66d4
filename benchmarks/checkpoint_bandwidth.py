"""Checkpoint bandwidth of a 2 GiB Engram table through the project's Checkpointer, vs dd,
and the same checkpoint restored onto other meshes (8 -> 4 and 8 -> 1 CPU devices).

The state holds one Engram table at the trainer's key (``checkpoint.table_key``, row-chunked)
of ``--gib`` GiB (``[R, 64]`` fp32, rows sharded over every device as in training) and
the step. Steps, each in a fresh subprocess so the device count and ``MALLOC_ARENA_MAX`` can
differ and the peak RSS is the step's own:

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
import resource
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

from benchmarks.common import cpu_seconds
from engram_jax.checkpoint import table_key

HEADING = "## Checkpoint bandwidth and cross-mesh restore of a 2 GiB table (CPU)"
KEY_TABLE = table_key(1)  # where the trainer saves layer 1's table (row-chunked)
KEY_STEP = "step"
D = 64


# ---------------------------------------------------------------------------------------------
# Worker (runs in a subprocess with its own device count)


def _mesh_and_sharding(n_dev: int):
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from engram_jax import sharding as shd
    from engram_jax.config import MeshConfig

    mesh = shd.make_mesh(MeshConfig(data=-1), jax.devices()[:n_dev])
    return mesh, NamedSharding(mesh, P(shd.table_axes(), None)), NamedSharding(mesh, P())


def _crc_rows(arr) -> int:
    """CRC-32 of the table's bytes in global row order (independent of the sharding)."""
    import numpy as np

    shards = sorted(arr.addressable_shards, key=lambda s: s.index[0].start or 0)
    crc, seen = 0, set()
    for s in shards:
        start = s.index[0].start or 0
        if start in seen:  # replicas
            continue
        seen.add(start)
        crc = zlib.crc32(memoryview(np.ascontiguousarray(np.asarray(s.data))).cast("B"), crc)
    return crc


def _lookup(mesh, table):
    import jax
    import numpy as np

    from engram_jax.tables import sharded_lookup

    rng = np.random.default_rng(0)
    ids = rng.integers(0, table.shape[0], (8, 512)).astype(np.int32)
    out = jax.jit(lambda t, i: sharded_lookup(mesh, t, i))(table, ids)
    return np.asarray(out)


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def zstd_ab(args, table, state) -> list[dict]:
    """Raw Orbax (PyTreeCheckpointHandler) with zstd on vs off, alternating, same process."""
    import orbax.checkpoint as ocp

    res = []
    for rep in range(args.ab_repeats):
        for comp in (True, False):
            d = os.path.join(args.dir, f"ab_{'zstd' if comp else 'raw'}_{rep}")
            mgr = ocp.CheckpointManager(
                d,
                options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
                item_handlers={"state": ocp.PyTreeCheckpointHandler(use_compression=comp)},
            )
            t0, c0 = time.perf_counter(), cpu_seconds()
            mgr.save(1, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)), force=True)
            mgr.wait_until_finished()
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            mgr.close()
            du = int(
                subprocess.run(["du", "-sb", d], capture_output=True, text=True).stdout.split()[0]
            )
            shutil.rmtree(d, ignore_errors=True)
            res.append(dict(zstd=comp, wall=wall, cpu=cpu, disk_bytes=du))
            print(
                f"  raw Orbax zstd={comp}: {wall:.1f} s wall, {cpu:.1f} s CPU, {du / 1e6:.0f} MB",
                file=sys.stderr,
                flush=True,
            )
    return res


def worker(args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from engram_jax.checkpoint import Checkpointer

    n_dev = len(jax.devices())
    mesh, tsh, rep = _mesh_and_sharding(n_dev)
    rows = int(args.gib * 2**30 // (4 * D)) // 1024 * 1024
    nbytes = rows * D * 4
    out = dict(
        devices=n_dev, rows=rows, bytes=nbytes, malloc_arena_max=os.environ.get("MALLOC_ARENA_MAX")
    )
    if args.worker == "save":

        def fill():
            x = jax.lax.broadcasted_iota(jnp.uint32, (rows, D), 0) * jnp.uint32(
                D
            ) + jax.lax.broadcasted_iota(jnp.uint32, (rows, D), 1)
            x = x * jnp.uint32(2654435761)
            x = x ^ (x >> 15)
            return (x >> 8).astype(jnp.float32) * (2.0**-24) - 0.5

        table = jax.jit(fill, out_shardings=tsh)()
        state = {KEY_TABLE: table, KEY_STEP: jax.device_put(jnp.int32(7), rep)}
        jax.block_until_ready(state)
        np.save(os.path.join(args.dir, "ref_lookup.npy"), _lookup(mesh, table))
        out["crc"] = _crc_rows(table)
        ck = Checkpointer(args.dir, keep=1)
        out["saves"] = []
        for step in range(1, args.saves + 1):
            t0, c0 = time.perf_counter(), cpu_seconds()
            ck.save(step, state, None, {"bench": "checkpoint_bandwidth", "gib": args.gib})
            t1 = time.perf_counter()
            ck.wait()
            t2 = time.perf_counter()
            os.sync()
            t3 = time.perf_counter()
            out["saves"].append(
                dict(returned=t1 - t0, finished=t2 - t0, synced=t3 - t0, cpu=cpu_seconds() - c0)
            )
            print(
                f"  save {step}: returned {t1 - t0:.2f} s, finished {t2 - t0:.2f} s, "
                f"synced {t3 - t0:.2f} s",
                file=sys.stderr,
                flush=True,
            )
        ck.close()
        if args.ab_repeats:
            out["zstd_ab"] = zstd_ab(args, table, state)
    else:
        from jax import ShapeDtypeStruct as SDS

        ck = Checkpointer(args.dir, keep=1)
        target = {
            KEY_TABLE: SDS((rows, D), jnp.float32, sharding=tsh),
            KEY_STEP: SDS((), jnp.int32, sharding=rep),
        }
        t0, c0 = time.perf_counter(), cpu_seconds()
        restored = ck.restore(ck.latest_step(), target)
        jax.block_until_ready(restored)
        out["restore_s"] = time.perf_counter() - t0
        out["restore_cpu_s"] = cpu_seconds() - c0
        ck.close()
        table = restored[KEY_TABLE]
        out["sharding"] = str(table.sharding.spec)
        out["shards"] = len(table.addressable_shards)
        out["crc"] = _crc_rows(table)
        ref = np.load(os.path.join(args.dir, "ref_lookup.npy"))
        out["lookup_identical"] = bool(np.array_equal(_lookup(mesh, table), ref))
        out["step"] = int(restored[KEY_STEP])
        out["peak_rss_gb"] = _rss_gb()  # of the restore, before the tensorstore read below
        del restored, table
        # The floor under Orbax: tensorstore alone reading the same array into one NumPy array
        # (no sharding, no device copies), from an evicted page cache like the restore.
        from engram_jax.checkpoint import TableRows

        state_dir = ck.state_dir(ck.latest_step())
        _evict(str(state_dir))
        t0, c0 = time.perf_counter(), cpu_seconds()
        whole = TableRows.open(state_dir, 1).array.read().result()
        out["ts_read_s"], out["ts_read_cpu_s"] = time.perf_counter() - t0, cpu_seconds() - c0
        out["ts_crc"] = zlib.crc32(memoryview(np.ascontiguousarray(whole)).cast("B"))
        del whole
    out.setdefault("peak_rss_gb", _rss_gb())
    print("RESULT " + json.dumps(out), flush=True)


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
        __file__,
        "--worker",
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


def _evict(directory: str) -> None:
    os.sync()
    for root, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


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
    _evict(directory)
    out["read_evicted"] = _dd([f"if={f}", "of=/dev/null", "bs=16M"])
    os.remove(f)
    print("  dd MB/s: " + ", ".join(f"{k} {v:.0f}" for k, v in out.items()), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.0, help="table size in GiB")
    ap.add_argument("--saves", type=int, default=3, help="timed saves (8 devices)")
    ap.add_argument(
        "--ab-repeats",
        type=int,
        default=0,
        help="also save with raw Orbax, zstd on vs off, this many times each",
    )
    ap.add_argument("--dir", default="/tmp/ckpt_bandwidth", help="scratch directory (deleted)")
    ap.add_argument(
        "--rss-limit-gb",
        type=float,
        default=14.0,
        help="kill a worker above this RSS (shared machine)",
    )
    ap.add_argument("--update", type=Path, help="replace this section of a markdown file")
    ap.add_argument("--worker", choices=["save", "restore"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    from benchmarks.bench_markdown import header, publish

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
                _evict(ck_dir)
                restores.append(
                    _run_worker("restore", devices, ck_dir, args, arena, args.rss_limit_gb)
                )
        print("dd (after) ...", flush=True)
        dd.append(dd_bandwidth(args.dir, args.gib))
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)

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

    lines = [
        *header(
            HEADING,
            load,
            f"{args.dir} on `{df.splitlines()[-1].split()[0]}`; page cache evicted with "
            "`posix_fadvise(DONTNEED)` before every read (no privilege to drop caches).",
        ),
        "",
        f"State: one Engram table `[{save['rows']:,}, {D}]` fp32 = {mb:,.0f} MB "
        f"({nbytes / 2**30:.2f} GiB; {int(du) / 1e6:,.0f} MB on disk) + the step, saved "
        f"from 8 fake CPU devices (rows sharded 8 ways) with `Checkpointer.save` "
        f"(async), {args.saves} saves, medians.",
        "",
        "| | seconds | MB/s | vs dd |",
        "|---|---:|---:|---:|",
        f"| dd write `bs=16M oflag=direct` | | {ddb['write_direct']:.0f} | |",
        f"| dd write `bs=16M conv=fdatasync` | | {ddb['write_fdatasync']:.0f} | |",
        f"| dd read `bs=16M iflag=direct` | | {ddb['read_direct']:.0f} | |",
        f"| dd read `bs=16M`, cache evicted | | {ddb['read_evicted']:.0f} | |",
        f"| Orbax `save()` returned | {ret:.2f} | | |",
        f"| Orbax save, write finished (CPU {cpu_save:.1f} s) | {fin:.2f} | {save_bw:.0f} | "
        f"{save_bw / wref * 100:.0f}% |",
        f"| Orbax save, finished + `os.sync()` | {syn:.2f} | {sync_bw:.0f} | "
        f"{sync_bw / wref * 100:.0f}% |",
        f"| Orbax restore, median of {len(ok)} (CPU {cpu_rest:.1f} s) | {rest:.2f} | "
        f"{rest_bw:.0f} | "
        f"{rest_bw / rref * 100:.0f}% |",
        f"| tensorstore alone: whole array into one NumPy array, median of {len(ok)} "
        f"(CPU {ts_cpu:.1f} s) | {ts_s:.2f} | {mb / ts_s:.0f} | "
        f"{mb / ts_s / rref * 100:.0f}% |",
        "",
        "Ratios against the best dd write / read of the two runs (before and after), "
        "buffered or direct, whichever is faster; goal >= 50%. CPU = user+system seconds "
        "of the process during the operation.",
        "",
        f"Reading (computed from the figures above): save reaches "
        f"{save_bw / ddb['write_direct'] * 100:.0f}% of dd's O_DIRECT write and "
        f"{save_bw / ddb['write_fdatasync'] * 100:.0f}% of its buffered write + fdatasync. "
        f"Restore reaches {rest_bw / ddb['read_direct'] * 100:.0f}% of dd's O_DIRECT read "
        f"and {rest_bw / ddb['read_evicted'] * 100:.0f}% of its buffered read of an "
        f"evicted file; tensorstore alone, without Orbax's sharding and device copies, "
        f"reaches {mb / ts_s / rref * 100:.0f}% of the best dd read. Restore spends "
        f"{cpu_rest:.1f} s of CPU for {rest:.1f} s of wall time on {os.cpu_count()} "
        f"cores: it is bound by CPU (copies), not by the disk.",
        "",
    ]
    if save.get("zstd_ab"):
        lines += [
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
    lines += [
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
