"""Cached decoding equals the full forward pass; offloaded tables change nothing.

Tiny models (d=32, 3 blocks, Engram at blocks 1 and 2) with a non-zero short-conv kernel so
the conv history matters, two sequences per batch.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax.engram import TableParam
from engram_jax.generate import Generator
from engram_jax.hashing import NgramHasher
from engram_jax.model import EngramLM
from engram_jax.offload import (
    HostRows,
    HotRowCache,
    NumpyStore,
    OffloadConfig,
    make_store,
    most_frequent,
    simulate_hit_rate,
)
from engram_jax.presets import get_preset
from engram_jax.tokenizer import CompressionTable

V, B, T = 256, 2, 11


def tiny_config(attention="gqa", hc_mult=2, dense=False):
    cfg = get_preset("tiny")
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(
            cfg.model,
            vocab_size=V,
            d_model=32,
            n_layers=3,
            n_heads=4,
            n_kv_heads=2,
            head_dim=8,
            dense_hidden=64,
            hc_mult=hc_mult,
            attention=attention,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=4,
            n_dense_layers=3 if dense else 1,
        ),
        moe=dataclasses.replace(cfg.moe, expert_hidden=32, dispatch="blocked"),
        engram=dataclasses.replace(
            cfg.engram, engram_vocab_size=(300, 300), n_embed_per_ngram=16, layer_ids=(1, 2)
        ),
    )


@functools.cache
def build(cfg):
    """One model per config (built in one compiled program: eager init compiles per shape)."""
    model = nnx.jit(lambda: EngramLM(cfg, rngs=nnx.Rngs(0)))()
    for i in model.engram_layers:  # zero-init conv would hide a wrong conv history
        kernel = model.blocks[i].engram.conv_kernel
        kernel.set_value(0.3 * jax.random.normal(jax.random.key(i), kernel[...].shape))
    return model


def compression():
    """A many-to-one map (like a real compression): ids i and i + 128 share a compressed id."""
    return CompressionTable(np.arange(V, dtype=np.int64) % 128, 128)


@pytest.fixture(scope="module")
def model():
    return build(tiny_config())


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, V, (B, T)).astype(np.int32)


def full_logits(model, tokens, comp):
    cfg = model.cfg.engram
    hasher = NgramHasher(cfg, comp.num_compressed, int(comp([cfg.pad_id])[0]))
    ids = {i: jnp.asarray(v) for i, v in hasher(comp(tokens)).items()}
    return _forward(model, jnp.asarray(tokens), ids)


@nnx.jit
def _forward(model, tokens, ids):
    return model(tokens, engram_ids=ids)[0]


def cached_logits(gen, tokens, prefill):
    logits = [gen.prefill(tokens[:, :prefill])]
    logits += [gen.feed(tokens[:, t : t + 1]) for t in range(prefill, tokens.shape[1])]
    return jnp.concatenate(logits, axis=1)


@pytest.mark.parametrize("attention,hc_mult,dense", [("gqa", 2, False), ("mla", 1, True)])
def test_cached_decoding_matches_full_forward(attention, hc_mult, dense, tokens):
    model = build(tiny_config(attention, hc_mult, dense))
    comp = compression()
    full = full_logits(model, tokens, comp)
    gen = Generator(model, comp, max_len=32, batch=B)
    np.testing.assert_allclose(cached_logits(gen, tokens, 5), full, atol=1e-5, rtol=1e-5)


def test_multi_token_feed_matches(model, tokens):
    comp = compression()
    gen = Generator(model, comp, max_len=32, batch=B)
    parts = [gen.prefill(tokens[:, :5]), gen.feed(tokens[:, 5:10]), gen.feed(tokens[:, 10:])]
    np.testing.assert_allclose(
        jnp.concatenate(parts, axis=1), full_logits(model, tokens, comp), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize(
    "offload",
    [
        OffloadConfig(),
        OffloadConfig(memory_kind="numpy"),
        OffloadConfig(hot_rows=40),
        OffloadConfig(hot_rows=16, policy="static"),
    ],
)
def test_offloaded_logits_identical(model, tokens, offload):
    comp = compression()
    resident = cached_logits(Generator(model, comp, max_len=32, batch=B), tokens, 5)
    rows = HostRows.from_model(model, offload, hot_ids={1: np.arange(16), 2: np.arange(16)})
    offloaded = cached_logits(Generator(model, comp, max_len=32, batch=B, rows=rows), tokens, 5)
    np.testing.assert_array_equal(np.asarray(offloaded), np.asarray(resident))
    if offload.hot_rows:
        assert all(s["lookups"] > 0 for s in rows.stats().values())


def test_greedy_generation_identical_with_offload_and_deterministic(model, tokens):
    comp = compression()
    gen = Generator(model, comp, max_len=32, batch=B)
    a = gen.generate(tokens[:, :5], 6)
    b = gen.generate(tokens[:, :5], 6)
    rows = HostRows.from_model(model, OffloadConfig(hot_rows=32))
    c = Generator(model, comp, max_len=32, batch=B, rows=rows).generate(tokens[:, :5], 6)
    assert a.tokens.shape == (B, 6)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.tokens, c.tokens)
    # greedy = argmax of the cached logits of its own continuation
    full = full_logits(model, np.concatenate([tokens[:, :5], a.tokens], axis=1), comp)
    np.testing.assert_array_equal(np.argmax(full[:, 4:-1], axis=-1), a.tokens)


def test_sampling_seeded_and_top1_is_greedy(model, tokens):
    comp = compression()
    gen = Generator(model, comp, max_len=32, batch=B)
    s1 = gen.generate(tokens[:, :5], 8, temperature=1.0, top_k=20, seed=3).tokens
    s2 = gen.generate(tokens[:, :5], 8, temperature=1.0, top_k=20, seed=3).tokens
    s3 = gen.generate(tokens[:, :5], 8, temperature=1.0, top_k=20, seed=4).tokens
    np.testing.assert_array_equal(s1, s2)
    assert not np.array_equal(s1, s3)
    top1 = gen.generate(tokens[:, :5], 8, temperature=0.7, top_k=1, seed=9).tokens
    np.testing.assert_array_equal(top1, gen.generate(tokens[:, :5], 8).tokens)


def test_decode_compiles_once(model, tokens):
    gen = Generator(model, compression(), max_len=32, batch=B)
    gen.generate(tokens[:, :5], 3)
    sizes = (gen._pre._cache_size(), gen._post._cache_size())
    gen.generate(tokens[:, :5], 12)  # 12 decode steps, no new program
    other = Generator(model, compression(), max_len=32, batch=B)
    other.generate(tokens[:, :5], 4)
    assert other._post is gen._post
    assert (gen._pre._cache_size(), gen._post._cache_size()) == sizes


def test_eos_stops_and_max_len_enforced(model, tokens):
    gen = Generator(model, compression(), max_len=32, batch=B)
    same = np.repeat(tokens[:1, :5], B, axis=0)  # both rows produce the same tokens
    first = gen.generate(same, 3).tokens[0].tolist()
    assert gen.generate(same, 8, eos_id=first[1]).steps == first.index(first[1]) + 1
    # 5 prompt + 27 fed positions fill max_len=32; the last sampled token is returned too
    assert gen.generate(tokens[:, :5], 100).steps == 28
    with pytest.raises(ValueError, match="max_len"):
        gen.prefill(np.zeros((B, 33), np.int32))


def test_hot_row_cache_lru_and_static():
    lru = HotRowCache(3, "lru")
    slots, miss, _ = lru.plan(np.array([5, 6, 5]))
    assert sorted(miss.tolist()) == [5, 6] and slots[0] == slots[2]
    lru.plan(np.array([7]))  # cache full: 5, 6, 7
    lru.plan(np.array([5]))  # 5 becomes most recent; 6 is the oldest
    _, miss, miss_slots = lru.plan(np.array([8]))
    assert miss.tolist() == [8] and 6 not in lru.slot_of and 5 in lru.slot_of
    assert lru.plan(np.array([1, 2, 3, 4])) is None  # more rows than slots: bypass
    assert (lru.lookups, lru.hits, lru.fetched) == (6, 1, 4)  # [5, 6, 5]: both 5s miss
    static = HotRowCache(2, "static", hot_ids=[10, 11], scratch=4)
    slots, miss, miss_slots = static.plan(np.array([11, 12, 12]))
    assert slots.tolist() == [1, 2, 2] and miss.tolist() == [12] and miss_slots.tolist() == [2]
    assert 12 not in static.slot_of
    ids_TxH = np.array([[1, 2], [1, 3], [1, 2]])
    assert simulate_hit_rate(ids_TxH, 8)["hit_rate"] == pytest.approx(3 / 6)
    assert most_frequent(np.array([3, 1, 3, 2, 3, 1]), 2).tolist() == [3, 1]


def test_stores_gather_exact_rows():
    table = np.random.default_rng(1).standard_normal((50, 4)).astype(np.float32)
    ids = np.array([3, 49, 0, 3], np.int64)
    for store in (make_store(table), make_store(table, "numpy"), NumpyStore(table)):
        np.testing.assert_array_equal(np.asarray(store.take(ids)), table[ids])


def test_table_rows_from_a_checkpoint(tmp_path, model):
    from engram_jax.checkpoint import Checkpointer, TableRows, array_keys, table_key

    _, tables, rest = nnx.split(model, TableParam, ...)
    ckpt = Checkpointer(tmp_path, table_chunk_bytes=4096)
    ckpt.save(7, {"tables": tables, "rest": rest}, None, {})
    ckpt.close()
    state_dir = ckpt.state_dir(7)
    assert table_key(2) in array_keys(state_dir)
    ids = np.array([7, 0, 123, 7, 599], np.int64)
    for layer in model.engram_layers:
        table = np.asarray(model.blocks[layer].engram.table.table[...])
        store = TableRows.open(state_dir, layer)
        assert store.array.chunk_layout.read_chunk.shape[0] < store.shape[0]  # row chunks
        np.testing.assert_array_equal(store.take(ids), table[ids])
    with pytest.raises(FileNotFoundError):
        TableRows.open(state_dir, 0)
    # and a Generator decoding straight from the checkpoint matches the resident one
    comp = compression()
    tokens = np.random.default_rng(2).integers(0, V, (B, 5)).astype(np.int32)
    rows = HostRows.from_checkpoint(state_dir, model.engram_layers)
    a = Generator(model, comp, max_len=32, batch=B, rows=rows).generate(tokens, 4).tokens
    b = Generator(model, comp, max_len=32, batch=B).generate(tokens, 4).tokens
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Batched generation: prompts of different lengths together equal each decoded alone


@pytest.mark.parametrize("attention", ["gqa", pytest.param("mla", marks=pytest.mark.slow)])
def test_batched_generation_equals_each_prompt_alone(attention):
    from engram_jax.batch_generate import BatchGenerator

    model = build(tiny_config(attention))  # mHC 2, MoE in blocks 1-2, Engram at 1 and 2
    comp, rng = compression(), np.random.default_rng(7)
    # lengths 1 (shorter than the n-gram history), 4, 9, 13: rows at different positions
    prompts = [rng.integers(0, V, n).astype(np.int32) for n in (9, 1, 13, 4)]
    solo = Generator(model, comp, max_len=32, batch=1)
    alone = [solo.generate(p[None], 8).tokens[0] for p in prompts]
    batched = BatchGenerator(model, comp, batch=5, max_len=32)  # one idle row
    res = batched.generate(prompts, 8)
    assert res.prompt_lens == [9, 1, 13, 4] and res.steps == 7
    for got, want in zip(res.tokens, alone, strict=True):
        np.testing.assert_array_equal(got, want)
    # the batched greedy tokens are the argmax of a full forward pass over each continuation
    for p, got in zip(prompts, res.tokens, strict=True):
        full = full_logits(model, np.concatenate([p, got])[None], comp)[0]
        np.testing.assert_array_equal(np.argmax(full[len(p) - 1 : -1], axis=-1), got)
    # seeded sampling: every row draws as if alone (its own key folded with its position)
    kw = dict(temperature=1.0, top_k=20, seed=5)
    sampled = batched.generate(prompts, 6, **kw).tokens
    for p, got in zip(prompts, sampled, strict=True):
        np.testing.assert_array_equal(got, solo.generate(p[None], 6, **kw).tokens[0])


def test_batched_generation_eos_offload_and_limits(model):
    from engram_jax.batch_generate import BatchGenerator

    # the shapes of the test above (max_len 32, batch 5, prompt lengths among its own), so the
    # programs it compiled serve this one
    comp, rng = compression(), np.random.default_rng(3)
    prompts = [rng.integers(0, V, n).astype(np.int32) for n in (4, 9, 13)]
    solo = Generator(model, comp, max_len=32, batch=1)
    alone = [solo.generate(p[None], 6).tokens[0] for p in prompts]
    rows = HostRows.from_model(model, OffloadConfig(hot_rows=64))
    batched = BatchGenerator(model, comp, batch=5, max_len=32, rows=rows)
    eos = int(alone[1][2])  # row 1 stops at its third token; the others run on
    res = batched.generate(prompts, 6, eos_id=eos)
    for got, want in zip(res.tokens, alone, strict=True):
        stop = list(want).index(eos) + 1 if eos in want else len(want)
        np.testing.assert_array_equal(got, want[:stop])
    with pytest.raises(ValueError, match="max_len"):
        batched.generate([np.zeros(28, np.int32)], 6)  # 28 + 6 - 1 positions > 32
    with pytest.raises(ValueError, match="prompts for a batch"):
        batched.generate(prompts * 2, 2)
