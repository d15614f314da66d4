"""NgramHasher against a plain-Python oracle written from ENGRAM_SPEC section 2."""

import numpy as np
import pytest

from engram_jax.config import EngramConfig
from engram_jax.hashing import NgramHasher, head_offsets, num_rows, table_sizes

# ----------------------------------------------------------------------------------------------
# Oracle: Python ints, explicit 64-bit wraparound, explicit pad filling, naive primality.


def _wrap64(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def _naive_prime(n: int) -> bool:
    if n < 2:
        return False
    d = 2
    while d * d <= n:
        if n % d == 0:
            return False
        d += 1
    return True


def _oracle_sizes(cfg):
    seen, out = set(), {}
    for lid in cfg.layer_ids:
        orders = []
        for n in range(2, cfg.max_ngram_size + 1):
            start, heads = cfg.engram_vocab_size[n - 2] - 1, []
            for _ in range(cfg.n_head_per_ngram):
                c = start + 1
                while not (_naive_prime(c) and c not in seen):
                    c += 1
                seen.add(c)
                heads.append(c)
                start = c
            orders.append(heads)
        out[lid] = orders
    return out


def _oracle_multipliers(cfg, vocab):
    half = max(1, (2**63 - 1) // vocab // 2)
    out = {}
    for lid in cfg.layer_ids:
        rng = np.random.default_rng(cfg.seed + 10007 * lid)
        r = rng.integers(0, half, size=cfg.max_ngram_size, dtype=np.int64)
        out[lid] = [2 * int(v) + 1 for v in r]
    return out


def _oracle_token(row, segs_row, pad, t, k):
    """x'_{t-k}, or the pad id before the start or across a document boundary."""
    if t - k < 0:
        return pad
    if segs_row is not None and any(segs_row[t - j] != segs_row[t] for j in range(k + 1)):
        return pad
    return row[t - k]


def _oracle_hash(cfg, vocab, pad, ids, segs=None):
    sizes, mults = _oracle_sizes(cfg), _oracle_multipliers(cfg, vocab)
    ids = [[int(v) for v in row] for row in ids]
    result = {}
    for lid in cfg.layer_ids:
        rows = []
        for b, row in enumerate(ids):
            segs_row = None if segs is None else segs[b]
            out_row = []
            for t in range(len(row)):
                heads = []
                for n in range(2, cfg.max_ngram_size + 1):
                    mix = 0
                    for k in range(n):
                        mix ^= _wrap64(_oracle_token(row, segs_row, pad, t, k) * mults[lid][k])
                    mix = _wrap64(mix)
                    heads += [mix % p for p in sizes[lid][n - 2]]  # Python % is floor-mod
                out_row.append(heads)
            rows.append(out_row)
        result[lid] = np.array(rows, dtype=np.int64)
    return result


# ----------------------------------------------------------------------------------------------

CONFIGS = [
    EngramConfig(
        engram_vocab_size=(101,),
        max_ngram_size=2,
        n_head_per_ngram=3,
        layer_ids=(0,),
        n_embed_per_ngram=6,
    ),
    EngramConfig(
        engram_vocab_size=(500, 300), max_ngram_size=3, n_head_per_ngram=4, layer_ids=(1, 5), seed=7
    ),
    EngramConfig(
        engram_vocab_size=(1000, 1000, 997),
        max_ngram_size=4,
        n_head_per_ngram=2,
        layer_ids=(3, 0, 2),
        seed=123,
        n_embed_per_ngram=8,
    ),
]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("vocab", [50, 7919])
@pytest.mark.parametrize("out_dtype", [np.int64, np.int32])
def test_matches_oracle(cfg, vocab, out_dtype):
    rng = np.random.default_rng(vocab)
    ids = rng.integers(0, vocab, size=(3, 11))
    pad = 2
    h = NgramHasher(
        cfg, compressed_vocab_size=vocab, pad_id=pad, out_dtype=out_dtype, chunk_tokens=5
    )  # tiny chunks: exercise row and column chunking
    got = h(ids)
    want = _oracle_hash(cfg, vocab, pad, ids)
    assert list(got) == list(cfg.layer_ids)
    for lid in cfg.layer_ids:
        assert got[lid].shape == (3, 11, (cfg.max_ngram_size - 1) * cfg.n_head_per_ngram)
        assert got[lid].dtype == out_dtype
        np.testing.assert_array_equal(got[lid], want[lid])
    assert h.table_sizes == _oracle_sizes(cfg)
    for lid, m in _oracle_multipliers(cfg, vocab).items():
        assert h.multipliers[lid].dtype == np.int64 and h.multipliers[lid].tolist() == m


def test_default_chunking_large_vocab_extremes():
    """Ids near V-1 with V ~ 1e5 drive products to the int64 extremes (negative mixes)."""
    cfg = CONFIGS[1]
    vocab = 129_280
    rng = np.random.default_rng(0)
    ids = np.concatenate(
        [rng.integers(vocab - 5, vocab, size=(2, 40)), rng.integers(0, vocab, size=(2, 40))]
    )
    got = NgramHasher(cfg, vocab, pad_id=1)(ids.astype(np.int32))
    want = _oracle_hash(cfg, vocab, 1, ids)
    for lid in cfg.layer_ids:
        np.testing.assert_array_equal(got[lid], want[lid])


def test_first_positions_read_pad():
    cfg = CONFIGS[1]
    vocab, pad = 97, 5
    h = NgramHasher(cfg, vocab, pad_id=pad)
    ids = np.array([[9, 10, 11, 12]])
    all_pad_prefix = np.array([[pad, pad, 9, 10, 11, 12]])
    out, longer = h(ids), h(all_pad_prefix)
    for lid in cfg.layer_ids:
        # Explicit pad tokens in front give the same hashes as the implicit pad fill.
        np.testing.assert_array_equal(out[lid], longer[lid][:, 2:])
    want = _oracle_hash(cfg, vocab, pad, ids)
    np.testing.assert_array_equal(out[1], want[1])


def test_order_sensitive():
    cfg = CONFIGS[0]
    h = NgramHasher(cfg, 1000, pad_id=0)
    a = h(np.array([[3, 4]]))[0][0, 1]
    b = h(np.array([[4, 3]]))[0][0, 1]
    assert not np.array_equal(a, b)


def test_primes_distinct_and_prime():
    cfg = EngramConfig(
        engram_vocab_size=(200, 200, 200),
        max_ngram_size=4,
        n_head_per_ngram=5,
        layer_ids=(0, 1, 2),
        n_embed_per_ngram=10,
    )
    sizes = table_sizes(cfg)
    flat = [p for lid in cfg.layer_ids for order in sizes[lid] for p in order]
    assert len(flat) == 3 * 3 * 5 == len(set(flat))
    assert all(_naive_prime(p) and p >= 200 for p in flat)
    assert sizes == _oracle_sizes(cfg)
    offs = head_offsets(sizes[1])
    heads = [p for order in sizes[1] for p in order]
    assert offs.tolist() == [sum(heads[:i]) for i in range(len(heads))]
    assert num_rows(sizes[1]) == sum(heads)


def test_segment_ids_stop_at_document_boundaries():
    cfg = CONFIGS[2]
    vocab, pad = 300, 4
    rng = np.random.default_rng(1)
    ids = rng.integers(0, vocab, size=(2, 12))
    segs = np.array([[0] * 5 + [1] * 4 + [2] * 3, [7] * 3 + [8] * 6 + [7] * 3])
    h = NgramHasher(cfg, vocab, pad_id=pad, chunk_tokens=4)
    got = h(ids, segment_ids=segs)
    want = _oracle_hash(cfg, vocab, pad, ids, segs.tolist())
    for lid in cfg.layer_ids:
        np.testing.assert_array_equal(got[lid], want[lid])
    # A document starting at column 5 hashes exactly like a fresh sequence.
    np.testing.assert_array_equal(got[0][0, 5:9], h(ids[:1, 5:9])[0][0])


@pytest.mark.parametrize(
    "bad",
    [
        np.array([[0, 1, 10]]),  # id == V
        np.array([[-1, 2]]),  # negative
        np.array([1, 2, 3]),  # rank 1
        np.zeros((1, 2, 3), np.int64),  # rank 3
        np.array([[0.5, 1.0]]),  # not integers
    ],
)
def test_bad_ids_raise(bad):
    h = NgramHasher(CONFIGS[0], 10, pad_id=0)
    with pytest.raises(ValueError, match="ids"):
        h(bad)


def test_bad_construction_raises():
    with pytest.raises(ValueError, match="pad_id"):
        NgramHasher(CONFIGS[0], 10, pad_id=10)
    big = EngramConfig(
        engram_vocab_size=(2**31 + 5,), max_ngram_size=2, n_head_per_ngram=1, n_embed_per_ngram=4
    )
    with pytest.raises(ValueError, match="int32"):
        NgramHasher(big, 10, pad_id=0, out_dtype=np.int32)


def test_primes_above_int32_use_int64_path():
    cfg = EngramConfig(
        engram_vocab_size=(2**31 + 5,),
        max_ngram_size=2,
        n_head_per_ngram=2,
        n_embed_per_ngram=4,
        layer_ids=(0,),
    )
    vocab = 5000
    ids = np.random.default_rng(3).integers(0, vocab, size=(2, 6))
    got = NgramHasher(cfg, vocab, pad_id=0)(ids)
    np.testing.assert_array_equal(got[0], _oracle_hash(cfg, vocab, 0, ids)[0])


def test_pickle_round_trip():
    """Grain worker processes receive the hasher pickled."""
    import pickle

    h = NgramHasher(CONFIGS[1], 500, pad_id=3, out_dtype=np.int32)
    ids = np.random.default_rng(5).integers(0, 500, size=(2, 9))
    h(ids)  # populate the per-thread scratch, which must not be pickled
    h2 = pickle.loads(pickle.dumps(h))
    for lid in CONFIGS[1].layer_ids:
        np.testing.assert_array_equal(h2(ids)[lid], h(ids)[lid])


def test_scratch_reuse_across_shapes():
    """One hasher called with growing and shrinking shapes matches fresh hashers."""
    cfg = CONFIGS[1]
    h = NgramHasher(cfg, 700, pad_id=1, chunk_tokens=64)
    rng = np.random.default_rng(11)
    for shape in [(1, 5), (3, 40), (2, 7), (9, 3), (1, 200), (2, 2)]:
        ids = rng.integers(0, 700, size=shape)
        got, want = h(ids), NgramHasher(cfg, 700, pad_id=1)(ids)
        for lid in cfg.layer_ids:
            np.testing.assert_array_equal(got[lid], want[lid])
