"""Multi-head multiplicative-XOR n-gram hashing (ENGRAM_SPEC section 2), on the host in NumPy.

Letters: B batch, T sequence, N max n-gram order, K heads per order, H = (N-1)*K hash heads.

For layer ``l`` with odd multipliers ``m_0..m_{N-1}`` (drawn from ``default_rng(seed + 10007 l)``)
and compressed ids ``x'``::

    mix_n(t) = XOR_{k<n} (x'_{t-k} * m_k)          (int64, wrapping)
    z_{n,j}(t) = mix_n(t) mod M_{n,j}                 (floor modulo, in [0, M_{n,j}))

Positions before the start of the sequence (or, with ``segment_ids``, in an earlier packed
document) read the compressed pad id. ``M_{n,j}`` are distinct primes shared out across all
layers and heads in configured order. The output per layer is ``ids_BxTxH`` ordered by order,
then head, exactly as the reference demo.

Speed: each product ``x' * m_k`` is computed once per position (``mix_n`` extends ``mix_{n-1}``),
shifts are views into one left-padded copy, work runs in cache-sized chunks, and the modulo is
``mix - (mix // p) * p`` (NumPy's SIMD division by a scalar) finished in wrapping int32, which is
exact because the remainder is below ``p < 2**31``. Heads are written head-major and transposed
once per chunk, which is cheaper than strided per-head writes.
"""

from __future__ import annotations

import functools
import threading

import numpy as np

from engram_jax.config import EngramConfig

_LAYER_SEED_STRIDE = 10007  # seed + 10007 * layer_id, as in the reference demo
_INT64_MAX = np.iinfo(np.int64).max
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)  # deterministic below 3.3e24


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for every n < 3.3e24 (covers all int64)."""
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in _MR_BASES:
        y = pow(a, d, n)
        if y in (1, n - 1):
            continue
        for _ in range(s - 1):
            y = y * y % n
            if y == n - 1:
                break
        else:
            return False
    return True


@functools.lru_cache(maxsize=64)
def _table_sizes_cached(
    vocab_sizes: tuple, max_ngram_size: int, n_head: int, layer_ids: tuple
) -> tuple:
    taken: set[int] = set()
    result = []
    for _layer in layer_ids:
        orders = []
        for n in range(2, max_ngram_size + 1):
            start = vocab_sizes[n - 2] - 1
            heads = []
            for _ in range(n_head):
                cand = start + 1
                while cand in taken or not is_prime(cand):
                    cand += 1
                taken.add(cand)
                heads.append(cand)
                start = cand
            orders.append(tuple(heads))
        result.append(tuple(orders))
    return tuple(result)


def table_sizes(config: EngramConfig) -> dict[int, list[list[int]]]:
    """Prime table size of every head: ``{layer_id: [order][head]}``, from the config alone."""
    cached = _table_sizes_cached(
        tuple(config.engram_vocab_size),
        config.max_ngram_size,
        config.n_head_per_ngram,
        tuple(config.layer_ids),
    )
    return {lid: [list(h) for h in orders] for lid, orders in zip(config.layer_ids, cached)}


def head_offsets(sizes: list[list[int]]) -> np.ndarray:
    """Row offset of each head in the flat per-layer table: int64 ``[H]``, starting at 0."""
    flat = np.asarray([s for order in sizes for s in order], dtype=np.int64)
    return np.concatenate([np.zeros(1, np.int64), np.cumsum(flat)[:-1]])


def num_rows(sizes: list[list[int]]) -> int:
    """Rows of the flat per-layer table: the sum of all head sizes."""
    return int(sum(s for order in sizes for s in order))


def layer_multipliers(config: EngramConfig, vocab_size: int) -> dict[int, np.ndarray]:
    """Odd int64 multipliers ``[N]`` per layer for a compressed vocabulary of ``vocab_size``."""
    if vocab_size < 1:
        raise ValueError(f"compressed_vocab_size={vocab_size} is invalid: must be >= 1")
    half = max(1, _INT64_MAX // vocab_size // 2)
    out = {}
    for lid in config.layer_ids:
        rng = np.random.default_rng(config.seed + _LAYER_SEED_STRIDE * lid)
        r = rng.integers(0, half, size=config.max_ngram_size, dtype=np.int64)
        out[lid] = r * 2 + 1
    return out


def _same_doc_masks(seg_p: np.ndarray, c0: int, c1: int, n_max: int) -> list:
    """``same[k][b, t]``: position t-k is in the same document as t (contiguous run of seg ids)."""
    pad = n_max - 1
    masks = [None]
    run = None
    for k in range(1, n_max):
        eq = seg_p[:, c0 + pad - k : c1 + pad - k] == seg_p[:, c0 + pad - k + 1 : c1 + pad - k + 1]
        run = eq if run is None else run & eq
        masks.append(run)
    return masks


class NgramHasher:
    """Hash compressed token ids into per-layer, per-head table rows (pure function of ids).

    ``NgramHasher(cfg, compressed_vocab_size=V, pad_id=P)`` where ``P`` is already a compressed
    id. ``h(ids_BxT) -> {layer_id: ids_BxTxH}``. ``out_dtype`` is int64 (as the demo) or int32
    (what the input pipeline ships to devices).
    """

    def __init__(
        self,
        config: EngramConfig,
        compressed_vocab_size: int,
        pad_id: int,
        *,
        out_dtype=np.int64,
        chunk_tokens: int | None = None,
    ):
        vocab = int(compressed_vocab_size)
        if not 0 <= int(pad_id) < vocab:
            raise ValueError(
                f"pad_id={pad_id} is invalid: must be a compressed id in "
                f"[0, compressed_vocab_size={vocab})"
            )
        self.config = config
        self.vocab_size = vocab
        self.pad_id = int(pad_id)
        self.layer_ids = tuple(config.layer_ids)
        self.max_ngram_size = config.max_ngram_size
        self.n_head_per_ngram = config.n_head_per_ngram
        self.n_heads = config.n_hash_heads
        self.multipliers = layer_multipliers(config, vocab)
        self.table_sizes = table_sizes(config)
        self.out_dtype = np.dtype(out_dtype)
        if self.out_dtype not in (np.dtype(np.int32), np.dtype(np.int64)):
            raise ValueError(f"out_dtype={out_dtype} is invalid: must be int32 or int64")
        biggest = max((s for v in self.table_sizes.values() for o in v for s in o), default=0)
        self._small_primes = biggest < 2**31
        if self.out_dtype == np.int32 and not self._small_primes:
            raise ValueError(f"out_dtype=int32 cannot hold table size {biggest}; use int64")
        if chunk_tokens is None:  # keep the head-major scratch (H x chunk) near 1 MB, in L2
            chunk_tokens = min(65536, max(2048, 2**20 // (self.n_heads * self.out_dtype.itemsize)))
        self.chunk_tokens = max(1, int(chunk_tokens))
        self._work_dtype = np.int32 if self._small_primes else np.int64
        self._local = threading.local()
        self._primes = {
            lid: np.asarray([p for o in v for p in o], self._work_dtype)[:, None]
            for lid, v in self.table_sizes.items()
        }

    def __getstate__(self):  # picklable for Grain worker processes; scratch is per thread
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def _buffers(self, n: int) -> _Buffers:
        # Kept per thread and reused: fresh megabyte buffers would page-fault on every call.
        bufs = getattr(self._local, "bufs", None)
        if bufs is None or bufs.size < n:
            bufs = self._local.bufs = _Buffers(
                n, self.n_heads, self.max_ngram_size - 1, self._work_dtype
            )
        return bufs

    def head_offsets(self, layer_id: int) -> np.ndarray:
        return head_offsets(self.table_sizes[layer_id])

    def _check_ids(self, ids, segment_ids):
        x = np.asarray(ids)
        if x.ndim != 2:
            raise ValueError(f"ids must have shape [B, T]; got rank {x.ndim} shape {x.shape}")
        if not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"ids must be integers; got dtype {x.dtype}")
        if x.size and (x.min() < 0 or x.max() >= self.vocab_size):
            raise ValueError(
                f"ids must be compressed ids in [0, {self.vocab_size}); got values "
                f"in [{x.min()}, {x.max()}]"
            )
        seg = None
        if segment_ids is not None:
            seg = np.asarray(segment_ids)
            if seg.shape != x.shape or not np.issubdtype(seg.dtype, np.integer):
                raise ValueError(
                    f"segment_ids must be integers of shape {x.shape}; got {seg.dtype} {seg.shape}"
                )
        return x, seg

    def __call__(self, ids, segment_ids=None) -> dict[int, np.ndarray]:
        """``ids_BxT`` compressed ids -> ``{layer_id: ids_BxTxH}``.

        ``segment_ids`` (optional, ``[B, T]``): n-grams do not cross document boundaries; an
        earlier position counts as the same document only if every position between has the
        same segment id.
        """
        x, seg = self._check_ids(ids, segment_ids)
        b, t = x.shape
        n_max, pad = self.max_ngram_size, self.max_ngram_size - 1
        out = {lid: np.empty((b, t, self.n_heads), self.out_dtype) for lid in self.layer_ids}
        if x.size == 0 or not self.layer_ids:
            return out
        # One left-padded int64 copy; every shift k is the view x_p[:, pad-k : pad-k+T].
        x_p = np.empty((b, t + pad), np.int64)
        x_p[:, :pad] = self.pad_id
        x_p[:, pad:] = x
        seg_p = None
        if seg is not None:
            seg_p = np.empty((b, t + pad), seg.dtype)
            seg_p[:, :pad] = seg[:, :1]
            seg_p[:, pad:] = seg
        cols = min(t, self.chunk_tokens)
        rows = max(1, self.chunk_tokens // cols)
        bufs = self._buffers(min(rows, b) * cols)
        for r0 in range(0, b, rows):
            r1 = min(b, r0 + rows)
            for c0 in range(0, t, cols):
                c1 = min(t, c0 + cols)
                shifted = [x_p[r0:r1, c0 + pad - k : c1 + pad - k] for k in range(n_max)]
                if seg_p is not None:
                    same = _same_doc_masks(seg_p[r0:r1], c0, c1, n_max)
                    shifted = [shifted[0]] + [
                        np.where(same[k], shifted[k], self.pad_id) for k in range(1, n_max)
                    ]
                for lid in self.layer_ids:
                    self._hash_chunk(shifted, lid, bufs, out[lid][r0:r1, c0:c1])
        return out

    def _hash_chunk(self, shifted, layer_id, bufs, out_view):
        """Hash one chunk of ``shifted[k]`` (each ``[r, c]``) into ``out_view`` ``[r, c, H]``."""
        r, c = shifted[0].shape
        n = r * c
        mult = self.multipliers[layer_id]
        mix = bufs.mix[:n].reshape(r, c)
        term = bufs.term[:n].reshape(r, c)
        heads = bufs.heads[:, :n]  # quotients, then remainders, head-major
        np.multiply(shifted[0], mult[0], out=mix)
        k_heads = self.n_head_per_ngram
        for order in range(2, self.max_ngram_size + 1):
            k = order - 1
            np.multiply(shifted[k], mult[k], out=term)
            np.bitwise_xor(mix, term, out=mix)
            flat = mix.reshape(n)
            np.copyto(bufs.mix_low[k - 1, :n], flat, casting="unsafe")
            for j, p in enumerate(self.table_sizes[layer_id][order - 2]):
                np.floor_divide(flat, p, out=heads[(k - 1) * k_heads + j], casting="unsafe")
        # r = mix - floor(mix / p) * p in the wrapping arithmetic of the work dtype: exact since
        # 0 <= r < p fits (int32 only when every p < 2**31).
        np.multiply(heads, self._primes[layer_id], out=heads)
        heads_oxkxn = heads.reshape(self.max_ngram_size - 1, k_heads, n)
        np.subtract(bufs.mix_low[:, None, :n], heads_oxkxn, out=heads_oxkxn)
        np.copyto(out_view, heads.T.reshape(r, c, self.n_heads), casting="unsafe")


class _Buffers:
    """Scratch space for one chunk, reused across chunks and layers."""

    def __init__(self, n: int, n_heads: int, n_orders: int, dtype):
        self.size = n
        self.mix = np.empty(n, np.int64)
        self.term = np.empty(n, np.int64)
        self.mix_low = np.empty((n_orders, n), dtype)
        self.heads = np.empty((n_heads, n), dtype)
