"""Rows of a table store (:mod:`engram_jax.disk_tier`) read straight from its zarr3 shard
files: ``take(ids_N) -> rows [N, d]`` and ``prefetch(ids)`` on a thread pool.

Shape legend: d row width, N ids, U unique ids.
"""

from __future__ import annotations

import os

import numpy as np


class DiskRows:
    """One layer's table in a store: ``take(ids_N) -> rows [N, d]`` (NumPy, float32);
    ``prefetch(ids)`` starts reading rows on a thread pool and returns at once.

    tensorstore opens (validates) the array; rows are then ``os.pread`` from the zarr3 shard
    files (the layout written here: raw little-endian inner chunks, the shard index of
    (offset, length) uint64 pairs at the end, loaded once per shard): one small read per row,
    where tensorstore's read path spends tens of microseconds of CPU per chunk. ``threads``:
    reads in flight (a disk serves concurrent random reads much faster than serial ones)."""

    _NONE = np.uint64(2**64 - 1)  # index entry of an inner chunk never written (fill value)

    def __init__(self, path: str, layer: int, *, threads: int = 32, keep: int = 4):
        import concurrent.futures
        import threading

        import tensorstore as ts

        root = os.path.join(path, f"layer_{layer}")
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": root}}
        meta = ts.open(spec, open=True, read=True).result().spec().to_json()["metadata"]
        self.shape = tuple(int(s) for s in meta["shape"])
        self.shard_rows = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        (codec,) = meta["codecs"]
        self.chunk_rows = int(codec["configuration"]["chunk_shape"][0])
        self.n_inner = -(-self.shard_rows // self.chunk_rows)
        self.row_bytes = 4 * self.shape[1]
        self.root = root
        self._shards: dict = {}  # shard -> (fd, offsets of its inner chunks)
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=int(threads))
        self._threads = int(threads)
        self._pending: list = []  # (sorted unique ids, future of their rows), newest last
        self.keep = int(keep)

    def _shard(self, s: int):
        got = self._shards.get(s)
        if got is not None:
            return got
        with self._lock:  # pool threads may meet a new shard together
            if s in self._shards:
                return self._shards[s]
            fd = os.open(os.path.join(self.root, "c", str(s), "0"), os.O_RDONLY)
            size = os.fstat(fd).st_size
            index = os.pread(fd, 16 * self.n_inner, size - 16 * self.n_inner - 4)
            got = self._shards[s] = fd, np.frombuffer(index, "<u8").reshape(-1, 2)[:, 0]
            return got

    def _read(self, ids_U: np.ndarray) -> np.ndarray:
        rows = bytearray(len(ids_U) * self.row_bytes)
        n, view = self.row_bytes, memoryview(rows)
        for j, g in enumerate(ids_U.tolist()):
            s, r = divmod(g, self.shard_rows)
            fd, offsets = self._shard(s)
            c, k = divmod(r, self.chunk_rows)
            if offsets[c] != self._NONE:
                view[j * n : (j + 1) * n] = os.pread(fd, n, int(offsets[c]) + k * n)
        return np.frombuffer(rows, np.float32).reshape(len(ids_U), self.shape[1])

    def _submit(self, uniq_U: np.ndarray):
        """Split the reads over the pool: -> a callable returning rows in ``uniq_U`` order."""
        parts = [p for p in np.array_split(uniq_U, min(self._threads, -(-len(uniq_U) // 4)))]
        futures = [self._pool.submit(self._read, p) for p in parts]
        # a part no pool thread has started yet is read here instead: on a busy machine a
        # thread's wake-up can take longer than its reads
        return lambda: np.concatenate(
            [self._read(p) if f.cancel() else f.result() for p, f in zip(parts, futures)]
        )

    def prefetch(self, ids_N) -> None:
        uniq_U = np.unique(np.asarray(ids_N, np.int64).reshape(-1))
        if uniq_U.size:
            self._pending.append([uniq_U, self._submit(uniq_U), None])
            del self._pending[: -self.keep]

    def take(self, ids_N) -> np.ndarray:
        ids_N = np.asarray(ids_N, np.int64).reshape(-1)
        if ids_N.size and (ids_N.min() < 0 or ids_N.max() >= self.shape[0]):
            raise IndexError(f"row ids outside [0, {self.shape[0]})")
        uniq_U, inv_N = np.unique(ids_N, return_inverse=True)
        rows_UxD = np.empty((len(uniq_U), self.shape[1]), np.float32)
        todo_U = np.ones(len(uniq_U), bool)
        for entry in reversed(self._pending):
            got_ids = entry[0]
            at_U = np.minimum(np.searchsorted(got_ids, uniq_U), len(got_ids) - 1)
            found_U = todo_U & (got_ids[at_U] == uniq_U)
            if found_U.any():
                if entry[2] is None:
                    entry[2] = entry[1]()  # wait for the prefetched rows
                rows_UxD[found_U] = entry[2][at_U[found_U]]
                todo_U &= ~found_U
        if todo_U.any():
            rows_UxD[todo_U] = self._submit(uniq_U[todo_U])()
        return rows_UxD[inv_N]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for fd, _ in self._shards.values():
            os.close(fd)
        self._shards.clear()
