"""The subprocess side of :mod:`benchmarks.checkpoint_bandwidth`: one save or restore of the
table checkpoint on this process's devices, its figures printed as one ``RESULT {json}`` line.

    python -m benchmarks.checkpoint_worker save|restore --dir D --gib G [--saves N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import zlib

from benchmarks.common import cpu_seconds
from engram_jax.checkpoint import table_key

KEY_TABLE = table_key(1)  # where the trainer saves layer 1's table (row-chunked)
KEY_STEP = "step"
D = 64


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


def evict(directory: str) -> None:
    """Drop ``directory``'s files from the page cache (after a sync), so reads hit the disk."""
    os.sync()
    for root, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _fill(rows: int):
    """A pseudo-random table ``[rows, D]`` in [-0.5, 0.5) from an integer hash of the position."""
    import jax
    import jax.numpy as jnp

    x = jax.lax.broadcasted_iota(jnp.uint32, (rows, D), 0) * jnp.uint32(
        D
    ) + jax.lax.broadcasted_iota(jnp.uint32, (rows, D), 1)
    x = x * jnp.uint32(2654435761)
    x = x ^ (x >> 15)
    return (x >> 8).astype(jnp.float32) * (2.0**-24) - 0.5


def save(args, out: dict, mesh, tsh, rep) -> None:
    """Build the table on the devices, record its CRC and lookup, save it ``args.saves`` times."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from engram_jax.checkpoint import Checkpointer

    table = jax.jit(functools.partial(_fill, out["rows"]), out_shardings=tsh)()
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


def restore(args, out: dict, mesh, tsh, rep) -> None:
    """Restore onto this process's mesh, compare CRC and lookup with the save; then tensorstore
    alone reading the same array."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import ShapeDtypeStruct as SDS

    from engram_jax.checkpoint import Checkpointer, TableRows

    ck = Checkpointer(args.dir, keep=1)
    target = {
        KEY_TABLE: SDS((out["rows"], D), jnp.float32, sharding=tsh),
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
    state_dir = ck.state_dir(ck.latest_step())
    evict(str(state_dir))
    t0, c0 = time.perf_counter(), cpu_seconds()
    whole = TableRows.open(state_dir, 1).array.read().result()
    out["ts_read_s"], out["ts_read_cpu_s"] = time.perf_counter() - t0, cpu_seconds() - c0
    out["ts_crc"] = zlib.crc32(memoryview(np.ascontiguousarray(whole)).cast("B"))


def main() -> None:
    import jax

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=["save", "restore"])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--gib", type=float, required=True)
    ap.add_argument("--saves", type=int, default=3)
    ap.add_argument("--ab-repeats", type=int, default=0)
    args = ap.parse_args()
    n_dev = len(jax.devices())
    mesh, tsh, rep = _mesh_and_sharding(n_dev)
    rows = int(args.gib * 2**30 // (4 * D)) // 1024 * 1024
    out = dict(
        devices=n_dev,
        rows=rows,
        bytes=rows * D * 4,
        malloc_arena_max=os.environ.get("MALLOC_ARENA_MAX"),
    )
    (save if args.kind == "save" else restore)(args, out, mesh, tsh, rep)
    out.setdefault("peak_rss_gb", _rss_gb())
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
