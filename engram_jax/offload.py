"""Engram tables outside device memory at inference (ENGRAM_SPEC section 8).

Engram's lookup ids depend only on token ids, so the rows a step needs are known as soon as
its token is: the host hashes, gathers and transfers them while the blocks before the first
Engram layer compute (``engram_jax.generate`` dispatches those blocks first). Pieces:

- row stores, one per Engram layer, each with ``take(ids_N) -> rows [N, d]``:
  :class:`MemoryKindStore` (a ``jax.Array`` in a host memory kind, ``pinned_host`` or
  ``unpinned_host``, gathered by host compute in one jitted call that also moves the rows to
  the device), :class:`NumpyStore` (a NumPy array; where the platform has no host memory
  kind) and :class:`engram_jax.checkpoint.TableRows` (rows read by index straight from a
  training checkpoint, never loading the table: :meth:`HostRows.from_checkpoint`);
- :class:`HotRowCache`: an optional cache of rows in device memory. N-gram accesses are
  Zipfian, so a small cache serves most lookups; policy ``"lru"`` (recency) or ``"static"``
  (a fixed hot set, e.g. the most frequent rows of a calibration text);
- :class:`HostRows`: ``{layer: global ids [B,T,H]} -> {layer: rows [B,T,H,d] on device}``,
  the row source ``engram_jax.generate.Generator`` takes.

Every path copies rows bit for bit, so generation is identical with and without offload.

Shape legend: B batch, T positions, H hash heads, d row width, N ids, C cache slots,
U scratch slots (rows fetched this step).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding


@dataclasses.dataclass(frozen=True)
class OffloadConfig:
    """``memory_kind``: "auto" (pinned_host, else unpinned_host, else NumPy), a kind name, or
    "numpy". ``hot_rows``: device-cache slots per Engram layer (0: no cache);
    ``policy``: "lru" or "static" (``hot_ids`` per layer: the rows kept on device)."""

    memory_kind: str = "auto"
    hot_rows: int = 0
    policy: str = "lru"

    def __post_init__(self) -> None:
        if self.memory_kind not in ("auto", "pinned_host", "unpinned_host", "numpy"):
            raise ValueError(
                f"OffloadConfig.memory_kind={self.memory_kind!r} is invalid: must "
                "be one of auto, pinned_host, unpinned_host, numpy"
            )
        if not isinstance(self.hot_rows, int) or self.hot_rows < 0:
            raise ValueError(
                f"OffloadConfig.hot_rows={self.hot_rows!r} is invalid: must be an integer >= 0"
            )
        if self.policy not in ("lru", "static"):
            raise ValueError(
                f"OffloadConfig.policy={self.policy!r} is invalid: must be lru or static"
            )


def host_memory_kind(device=None, prefer: str = "auto") -> str | None:
    """The host memory kind to use on ``device`` (None: the platform has none)."""
    device = device or jax.devices()[0]
    try:
        kinds = {m.kind for m in device.addressable_memories()}
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    if prefer == "numpy":
        return None
    order = ("pinned_host", "unpinned_host") if prefer == "auto" else (prefer,)
    return next((k for k in order if k in kinds), None)


# ---------------------------------------------------------------------------------------------
# Row stores


class RowStore(Protocol):
    shape: tuple[int, int]

    def take(self, ids_N: np.ndarray): ...  # rows [N, d], NumPy or a device jax.Array


class NumpyStore:
    """A table in host RAM as NumPy; ``take`` gathers with ``np.take``."""

    def __init__(self, table_RxD):
        self.table = np.asarray(table_RxD)
        self.shape = self.table.shape

    def take(self, ids_N):
        return np.take(self.table, ids_N, axis=0)


def _host_gather(table_RxD, ids_N, device_sharding):
    """Gather on the host (``compute_on("device_host")``), then move the rows to the device.

    ``lax.gather`` with PROMISE_IN_BOUNDS: ``jnp.take``'s bounds clamp would mix in constants
    from device memory, which host compute refuses; hashed ids are always in range."""
    from jax.experimental.compute_on import compute_on

    with compute_on("device_host"):
        dn = jax.lax.GatherDimensionNumbers(
            offset_dims=(1,), collapsed_slice_dims=(0,), start_index_map=(0,)
        )
        rows_NxD = jax.lax.gather(
            table_RxD,
            ids_N[:, None],
            dn,
            (1, table_RxD.shape[1]),
            mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS,
        )
    return jax.device_put(rows_NxD, device_sharding)


class MemoryKindStore:
    """A table as a ``jax.Array`` in a host memory kind of ``device``.

    ``take`` runs one jitted call: host-side gather of the requested rows, then their transfer
    to device memory. If host compute is not available, it falls back to a NumPy gather over
    the host buffer (zero-copy where the runtime allows) and ``jax.device_put``.
    """

    def __init__(self, table_RxD, kind: str, device=None):
        self.device = device or jax.devices()[0]
        self.kind = kind
        self.host_sharding = SingleDeviceSharding(self.device, memory_kind=kind)
        self.device_sharding = SingleDeviceSharding(self.device, memory_kind="device")
        self.table = jax.device_put(table_RxD, self.host_sharding)
        self.shape = tuple(self.table.shape)
        self._gather = jax.jit(_host_gather, static_argnums=2)
        self._numpy = None
        try:  # probe once: some platforms have host memory but no host compute
            probe = np.zeros(1, np.int32)
            jax.block_until_ready(self._gather(self.table, self._ids(probe), self.device_sharding))
        except Exception:  # noqa: BLE001 - any lowering failure selects the fallback
            self._numpy = np.asarray(self.table)

    def _ids(self, ids_N):
        return jax.device_put(np.asarray(ids_N, np.int32), self.host_sharding)

    def take(self, ids_N):
        if self._numpy is not None:
            return jax.device_put(np.take(self._numpy, ids_N, axis=0), self.device_sharding)
        return self._gather(self.table, self._ids(ids_N), self.device_sharding)


def make_store(table_RxD, memory_kind: str = "auto", device=None) -> RowStore:
    """Host store of one table: a host memory kind where the platform has one, else NumPy."""
    kind = host_memory_kind(device, memory_kind)
    if kind is None:
        return NumpyStore(np.asarray(table_RxD))
    return MemoryKindStore(table_RxD, kind, device)


# ---------------------------------------------------------------------------------------------
# Hot-row cache: slot bookkeeping on the host, rows in device memory


class HotRowCache:
    """Which table rows sit in the C device slots, and where this step's misses go.

    ``plan(ids_N)`` returns ``(slots_N, miss_ids_U, miss_slots_U)``: every id's slot after the
    misses are written to ``miss_slots``. ``"lru"`` evicts the least recently used rows;
    ``"static"`` keeps ``hot_ids`` for good and puts misses in U scratch slots after the C
    cached ones. Counters: ``lookups``, ``hits`` (ids already cached), ``fetched`` (rows
    transferred). Returns None when a step needs more rows than the cache can hold.
    """

    def __init__(self, capacity: int, policy: str = "lru", hot_ids=None, scratch: int = 0):
        self.capacity, self.policy = int(capacity), policy
        self.scratch = int(scratch)
        self.slot_of: collections.OrderedDict[int, int] = collections.OrderedDict()
        self.lookups = self.hits = self.fetched = 0
        if policy == "static":
            hot = [] if hot_ids is None else [int(i) for i in hot_ids][: self.capacity]
            self.slot_of.update((g, s) for s, g in enumerate(hot))
            self.preload = np.asarray(hot, np.int64)
        else:
            self.preload = np.zeros(0, np.int64)

    @property
    def size(self) -> int:
        """Device slots: C cached, plus U scratch slots for the static policy."""
        return self.capacity + (self.scratch if self.policy == "static" else 0)

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.lookups)

    def plan(self, ids_N: np.ndarray):
        uniq_U, inv_N = np.unique(np.asarray(ids_N, np.int64).reshape(-1), return_inverse=True)
        limit = self.scratch if self.policy == "static" else self.capacity
        if len(uniq_U) > limit:
            return None
        slot_U = np.empty(len(uniq_U), np.int64)
        miss = []
        for j, g in enumerate(uniq_U.tolist()):
            s = self.slot_of.get(g)
            if s is None:
                miss.append(j)
            else:
                slot_U[j] = s
                if self.policy == "lru":
                    self.slot_of.move_to_end(g)
        miss_U = np.asarray(miss, np.int64)
        if self.policy == "static":
            slot_U[miss_U] = self.capacity + np.arange(len(miss_U))
        else:
            for j in miss:
                if len(self.slot_of) < self.capacity:
                    s = len(self.slot_of)
                else:  # oldest entry; never one used this step (those were moved to the end)
                    s = self.slot_of.popitem(last=False)[1]
                self.slot_of[int(uniq_U[j])] = s
                slot_U[j] = s
        hit_U = np.ones(len(uniq_U), bool)
        hit_U[miss_U] = False
        self.lookups += inv_N.size
        self.hits += int(hit_U[inv_N.reshape(-1)].sum())
        self.fetched += len(miss_U)
        return slot_U[inv_N.reshape(-1)], uniq_U[miss_U], slot_U[miss_U]


def _pad_len(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())  # power of two: few distinct compiled shapes


def _assemble(cache_CxD, miss_slots_U, miss_rows_UxD, slots_N):
    cache_CxD = cache_CxD.at[miss_slots_U].set(miss_rows_UxD.astype(cache_CxD.dtype), mode="drop")
    return cache_CxD, jnp.take(cache_CxD, slots_N, axis=0)


_assemble_donated = jax.jit(_assemble, donate_argnums=0)


class HostRows:
    """Row source for ``Generator``: tables in host stores, optional device hot-row cache.

    ``HostRows(stores, hot_rows=0, policy="lru", hot_ids=None, max_ids_per_step=64)``;
    ``stores``: ``{layer: RowStore}``. A call returns ``{layer: rows [B,T,H,d]}`` as device
    arrays; transfers are asynchronous (the caller's next jitted call waits for them).
    """

    def __init__(
        self,
        stores: dict,
        *,
        hot_rows: int = 0,
        policy: str = "lru",
        hot_ids: dict | None = None,
        max_ids_per_step: int = 64,
        device=None,
    ):
        self.stores = dict(stores)
        self.device = device or jax.devices()[0]
        self.caches, self._dev = {}, {}
        if hot_rows > 0:
            for i, store in self.stores.items():
                c = HotRowCache(hot_rows, policy, (hot_ids or {}).get(i), scratch=max_ids_per_step)
                d = store.shape[1]
                dev = jnp.zeros((c.size, d), jnp.float32)
                if len(c.preload):
                    rows = jax.device_put(store.take(c.preload), self.device)
                    dev = dev.at[: len(c.preload)].set(rows)
                self.caches[i], self._dev[i] = c, dev

    @classmethod
    def from_model(
        cls,
        model,
        cfg: OffloadConfig | None = None,
        *,
        release: bool = False,
        hot_ids: dict | None = None,
    ) -> HostRows:
        """Copy every Engram table of ``model`` to host memory. ``release=True`` then drops
        the device copies (the model can no longer run with ``engram_ids=``, only with
        ``engram_rows=`` or through a Generator)."""
        cfg = cfg or OffloadConfig()
        stores = {}
        for i in model.engram_layers:
            var = model.blocks[i].engram.table.table
            stores[i] = make_store(np.asarray(var[...]), cfg.memory_kind)
            if release:
                var.set_value(jnp.zeros((0, var[...].shape[1]), var[...].dtype))
        return cls(stores, hot_rows=cfg.hot_rows, policy=cfg.policy, hot_ids=hot_ids)

    @classmethod
    def from_checkpoint(cls, state_dir, layers, **kw) -> HostRows:
        """Rows read on demand from a checkpoint's state (``Checkpointer.state_dir(step)``)."""
        from engram_jax.checkpoint import TableRows

        return cls({i: TableRows.open(state_dir, i) for i in layers}, **kw)

    def stats(self) -> dict:
        return {
            i: {"lookups": c.lookups, "hits": c.hits, "fetched": c.fetched, "hit_rate": c.hit_rate}
            for i, c in self.caches.items()
        }

    @property
    def prefetch(self):
        """``prefetch(gids)`` where a store can read ahead (a disk store), else None."""
        return self._prefetch if any(hasattr(s, "prefetch") for s in self.stores.values()) else None

    def _prefetch(self, gids: dict) -> None:
        """Start reading the rows of ``gids`` that are not in the device cache (the cache may
        still evict one before use: ``take`` then reads it directly)."""
        for i, ids in gids.items():
            start = getattr(self.stores[i], "prefetch", None)
            if start is None:
                continue
            ids_U = np.unique(np.asarray(ids, np.int64))
            if i in self.caches:
                cached = self.caches[i].slot_of
                ids_U = ids_U[np.fromiter((g not in cached for g in ids_U.tolist()), bool)]
            start(ids_U)

    def _direct(self, store, ids, lead):
        rows = store.take(ids.reshape(-1))
        if isinstance(rows, jax.Array):
            return rows.reshape(lead + (store.shape[1],))
        return jax.device_put(rows.reshape(lead + (store.shape[1],)), self.device)

    def __call__(self, gids: dict) -> dict:
        out = {}
        for i, ids in gids.items():
            ids = np.asarray(ids)
            lead, store = ids.shape, self.stores[i]
            plan = self.caches[i].plan(ids) if i in self.caches else None
            if plan is None:
                out[i] = self._direct(store, ids, lead)
                continue
            slots_N, miss_ids, miss_slots = plan
            u = _pad_len(ids.size)  # fixed per step shape: no recompilation as misses vary
            # padding repeats a miss (no extra row read); padding slots are dropped
            ids_U = np.full(u, miss_ids[0] if len(miss_ids) else 0, np.int64)
            ids_U[: len(miss_ids)] = miss_ids
            slots_U = np.full(u, self.caches[i].size, np.int32)
            slots_U[: len(miss_slots)] = miss_slots
            if len(miss_ids):
                rows_UxD = store.take(ids_U)
            else:  # every row cached: nothing to read
                rows_UxD = np.zeros((u, store.shape[1]), np.float32)
            # NumPy arguments go to the jitted call as they are (its fast transfer path)
            self._dev[i], out[i] = _assemble_donated(
                self._dev[i], slots_U, rows_UxD, slots_N.reshape(lead).astype(np.int32)
            )
        return out


def simulate_hit_rate(
    ids_TxH: np.ndarray, capacity: int, policy: str = "lru", hot_ids=None
) -> dict:
    """Replay a token stream's global row ids (one step per token) through a
    :class:`HotRowCache` without any device work: ``{hit_rate, fetched_per_token}``."""
    cache = HotRowCache(capacity, policy, hot_ids, scratch=ids_TxH.shape[1])
    for ids_H in np.asarray(ids_TxH):
        cache.plan(ids_H)
    return {"hit_rate": cache.hit_rate, "fetched_per_token": cache.fetched / max(1, len(ids_TxH))}


def most_frequent(ids_N: np.ndarray, k: int) -> np.ndarray:
    """The k most frequent ids (the static policy's hot set from a calibration stream)."""
    uniq, counts = np.unique(np.asarray(ids_N).reshape(-1), return_counts=True)
    return uniq[np.argsort(-counts, kind="stable")[:k]]
