"""The REAL compiled train step moves no table-sized data between devices (sparse path).

Compiles :func:`engram_jax.train.make_train_step` on a mesh of 8 fake CPU devices with the Engram
table row-sharded over all of them, for a table of 1x and 4x the rows, and reads the collectives
from the compiled HLO: none has an operand as large as the table or one table shard, and the
total collective bytes do not change with the table size. The dense path (optax Adam on the
table) is checked to HAVE a table-shard-sized collective, so the test can fail.
"""

import jax
import numpy as np
import pytest

from engram_jax import hlo
from engram_jax import sharding as shd
from engram_jax.config import override
from engram_jax.optim import make_optimizer
from engram_jax.presets import get_preset
from engram_jax.state import init_state, tables_by_layer
from engram_jax.step import make_train_step

TINY = [
    "model.d_model=32",
    "model.head_dim=16",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.n_layers=2",
    "model.vocab_size=512",
    "model.dense_hidden=64",
    "moe.expert_hidden=32",
    "moe.n_routed_experts=4",
    "engram.n_embed_per_ngram=16",
    "train.batch_size=8",
    "train.seq_len=16",
    "optim.warmup_steps=2",
    "train.steps=10",
]


def tiny_cfg(*sets):
    return override(get_preset("tiny"), [*TINY, *sets])


def synthetic_batch(cfg, mesh, seed=0):
    """A global batch of random tokens and per-head Engram ids, batch-sharded over the mesh."""
    rng = np.random.default_rng(seed)
    B, T = cfg.train.batch_size, cfg.train.seq_len
    H = (cfg.engram.max_ngram_size - 1) * cfg.engram.n_head_per_ngram
    tokens = rng.integers(0, cfg.model.vocab_size, (B, T + 1), dtype=np.int32)
    ids = {
        layer: rng.integers(0, min(cfg.engram.engram_vocab_size), (B, T, H), dtype=np.int32)
        for layer in cfg.engram.layer_ids
    }
    batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], engram_ids=ids)
    return shd.global_batch_from_local(mesh, batch)


def compiled_step(cfg, mesh):
    """``(compiled train step, state, batch)`` as train() builds them."""
    tx = make_optimizer(cfg, cfg.train.steps)
    graphdef, state = init_state(cfg, mesh, tx)
    batch = synthetic_batch(cfg, mesh)
    step = jax.jit(make_train_step(cfg, graphdef, tx, mesh), donate_argnums=0)
    return step.lower(state, batch).compile(), state, batch


def _table_rows(cfg, state):
    if cfg.engram.sparse_update:
        tables = tables_by_layer(state["tables"])
    else:  # dense path: the tables are among the params
        tables = {
            str(k): v
            for k, v in jax.tree.leaves_with_path(state["params"])
            if "table" in jax.tree_util.keystr(k)
        }
    (table,) = tables.values()
    return table.shape[0], table


def _collectives(cfg, mesh):
    compiled, state, _ = compiled_step(cfg, mesh)
    rows, table = _table_rows(cfg, state)
    assert table.sharding.spec[0] is not None and len(table.sharding.device_set) == 8
    assert table.addressable_shards[0].data.shape[0] == rows // 8  # row-sharded over all 8
    return hlo.collectives(compiled.as_text()), rows


def _table_sized(colls, rows):
    sizes = {rows, rows // 8}
    return [c for c in colls if any(d in sizes for _, shape in c.operands for d in shape)]


@pytest.fixture(scope="module")
def mesh8():
    from engram_jax.config import MeshConfig

    return shd.make_mesh(MeshConfig(data=8), jax.devices()[:8])


def test_sparse_train_step_collectives_do_not_scale_with_the_table(mesh8):
    c1, rows1 = _collectives(tiny_cfg("engram.engram_vocab_size=[3000,3000]"), mesh8)
    c4, rows4 = _collectives(tiny_cfg("engram.engram_vocab_size=[12000,12000]"), mesh8)
    assert rows4 >= 3.9 * rows1
    assert c1, "no collectives at all: the step is not sharded"
    assert not _table_sized(c1, rows1), hlo.summary(_table_sized(c1, rows1))
    assert not _table_sized(c4, rows4), hlo.summary(_table_sized(c4, rows4))
    assert hlo.total_bytes(c1) == hlo.total_bytes(c4), (
        f"1x: {hlo.total_bytes(c1)} B\n{hlo.summary(c1)}\n4x: {hlo.total_bytes(c4)} B\n"
        f"{hlo.summary(c4)}"
    )


def test_a_table_moving_program_is_detected(mesh8):
    """Control, so the checks above can fail: a program that all-gathers the row-sharded table
    has a collective of table-shard rows. (The DENSE train step, engram.sparse_update=False, has
    none either on this stack: XLA's SPMD partitioner turns the gather's scatter-add gradient
    into all-gathers of the ids and row gradients, as the sparse path does by hand; its extra
    cost is dense Adam over every row, compute not communication. See the test below.)"""
    cfg = tiny_cfg("engram.engram_vocab_size=[3000,3000]")
    tx = make_optimizer(cfg, cfg.train.steps)
    _, state = init_state(cfg, mesh8, tx)
    rows, table = _table_rows(cfg, state)
    replicated = jax.sharding.NamedSharding(mesh8, jax.sharding.PartitionSpec())
    text = jax.jit(lambda t: t * 2, out_shardings=replicated).lower(table).compile().as_text()
    assert _table_sized(hlo.collectives(text), rows)


def test_dense_train_step_collectives_are_not_table_sized_either(mesh8):
    colls, rows = _collectives(
        tiny_cfg("engram.engram_vocab_size=[3000,3000]", "engram.sparse_update=False"), mesh8
    )
    assert colls and not _table_sized(colls, rows), hlo.summary(colls)
