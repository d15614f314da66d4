"""The REAL compiled train step moves no table-sized data between devices (sparse path).

Compiles the train step as the trainer does (:func:`engram_jax.step.compile_train_step`) on a
mesh of 8 fake CPU devices with the Engram table row-sharded over all of them, for a table of
1x and 4x the rows, and reads the collectives from the compiled HLO: none has an operand as
large as the table or one table shard, and the total collective bytes do not change with the
table size. A control program that all-gathers the table IS flagged, so the check can fail; the
dense path (optax Adam on the table) has no table-sized collective either (see its test).
"""

import jax
import pytest
from conftest import global_batch, tiny_cfg

from engram_jax import hlo
from engram_jax.optim import make_optimizer
from engram_jax.state import init_state, tables_by_layer
from engram_jax.step import compile_train_step


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


def _collectives(compiled, cfg, state):
    rows, table = _table_rows(cfg, state)
    assert table.sharding.spec[0] is not None and len(table.sharding.device_set) == 8
    assert table.addressable_shards[0].data.shape[0] == rows // 8  # row-sharded over all 8
    return hlo.collectives(compiled.as_text()), rows


def _compile(cfg, mesh):
    tx = make_optimizer(cfg, cfg.train.steps)
    graphdef, state = init_state(cfg, mesh, tx)
    compiled = compile_train_step(cfg, graphdef, tx, mesh, state, global_batch(cfg, mesh))
    return _collectives(compiled, cfg, state)


def _table_sized(colls, rows):
    sizes = {rows, rows // 8}
    return [c for c in colls if any(d in sizes for _, shape in c.operands for d in shape)]


def test_sparse_train_step_collectives_do_not_scale_with_the_table(step8):
    c1, rows1 = _collectives(step8.compiled, step8.cfg, step8.state)
    c4, rows4 = _compile(tiny_cfg("engram.engram_vocab_size=[12000,12000]"), step8.mesh)
    assert rows4 >= 3.9 * rows1
    assert c1, "no collectives at all: the step is not sharded"
    assert not _table_sized(c1, rows1), hlo.summary(_table_sized(c1, rows1))
    assert not _table_sized(c4, rows4), hlo.summary(_table_sized(c4, rows4))
    assert hlo.total_bytes(c1) == hlo.total_bytes(c4), (
        f"1x: {hlo.total_bytes(c1)} B\n{hlo.summary(c1)}\n4x: {hlo.total_bytes(c4)} B\n"
        f"{hlo.summary(c4)}"
    )


def test_a_table_moving_program_is_detected(step8):
    """Control, so the checks above can fail: a program that all-gathers the row-sharded table
    has a collective of table-shard rows. (The DENSE train step, engram.sparse_update=False, has
    none either on this stack: XLA's SPMD partitioner turns the gather's scatter-add gradient
    into all-gathers of the ids and row gradients, as the sparse path does by hand; its extra
    cost is dense Adam over every row, compute not communication. See the test below.)"""
    rows, table = _table_rows(step8.cfg, step8.state)
    replicated = jax.sharding.NamedSharding(step8.mesh, jax.sharding.PartitionSpec())
    text = jax.jit(lambda t: t * 2, out_shardings=replicated).lower(table).compile().as_text()
    assert _table_sized(hlo.collectives(text), rows)


@pytest.mark.slow
def test_dense_train_step_collectives_are_not_table_sized_either(step8):
    cfg = tiny_cfg("engram.engram_vocab_size=[3000,3000]", "engram.sparse_update=False")
    colls, rows = _compile(cfg, step8.mesh)
    assert colls and not _table_sized(colls, rows), hlo.summary(colls)
