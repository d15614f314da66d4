"""Sparse row-wise Adam and sharded table lookup/update, checked against dense optax.adam.

The toy train step (embedding table -> dense head -> cross-entropy) is the pattern the real
train step follows on the sparse path; its compiled HLO must contain no table-sized collective.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from engram_jax import hlo, tables
from engram_jax import sharding as shd
from engram_jax.config import MeshConfig
from engram_jax.optim import clip_by_global_norm_with_tables

B1, B2, EPS = 0.9, 0.95, 1e-8
TOL = {"rtol": 2e-5, "atol": 2e-6}


def _step_ids(rng, n, rows, always):
    ids = rng.integers(0, rows, size=n)
    ids[: 2 * len(always)] = np.tile(always, 2)  # always-touched rows, each twice (duplicates)
    return rng.permutation(ids)


def test_sparse_adam_equals_dense_adam_on_rows_touched_every_step():
    R, D, N, steps = 40, 3, 12, 4
    rng = np.random.default_rng(0)
    always = np.array([3, 17, 29])
    table = jnp.asarray(rng.normal(size=(R, D)), jnp.float32)
    tx = optax.adam(1e-2, b1=B1, b2=B2, eps=EPS)

    @jax.jit
    def dense_step(dense, state, ids, g):
        upd, state = tx.update(jnp.zeros_like(dense).at[ids].add(g), state, dense)
        return optax.apply_updates(dense, upd), state

    sparse_step = jax.jit(tables.sparse_adam_update, static_argnums=(7, 8, 9))
    dense, dense_state = table, tx.init(table)
    sparse, mu, nu = table, jnp.zeros_like(table), jnp.zeros_like(table)
    ever = set()
    for step in range(steps):
        ids = jnp.asarray(_step_ids(rng, N, R - 8, always))  # rows >= R-8 never touched
        g = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
        ever |= set(np.asarray(ids).tolist())
        dense, dense_state = dense_step(dense, dense_state, ids, g)
        sparse, mu, nu = sparse_step(sparse, mu, nu, ids, g, step, 1e-2, B1, B2, EPS)
    np.testing.assert_allclose(sparse[always], dense[always], **TOL)
    np.testing.assert_allclose(mu[always], dense_state[0].mu[always], **TOL)
    np.testing.assert_allclose(nu[always], dense_state[0].nu[always], **TOL)
    never = np.array(sorted(set(range(R)) - ever))
    np.testing.assert_array_equal(sparse[never], table[never])
    np.testing.assert_array_equal(dense[never], table[never])
    assert not np.allclose(sparse[always], table[always])


def test_duplicates_merged():
    R, D = 10, 2
    ids = jnp.array([2, 2, 5, 2, 12, -1])  # 12 and -1 are out of range: ignored
    g = jnp.arange(12.0).reshape(6, 2)
    rows, merged = tables.merge_duplicate_rows(ids, g, R)
    np.testing.assert_array_equal(rows[:2], [2, 5])
    assert np.all(np.asarray(rows[2:]) >= R) and np.all(np.diff(np.asarray(rows)) > 0)
    np.testing.assert_allclose(merged[0], g[0] + g[1] + g[3])
    np.testing.assert_allclose(merged[1], g[2])
    np.testing.assert_array_equal(merged[2:], 0)
    # one sparse step == one dense Adam step on the summed gradient
    table = jnp.ones((R, D))
    out, _, _ = tables.sparse_adam_update(
        table, jnp.zeros_like(table), jnp.zeros_like(table), ids, g, 0, 0.1, B1, B2, EPS
    )
    dense_grad = jnp.zeros((R, D)).at[ids[:4]].add(g[:4])
    tx = optax.adam(0.1, b1=B1, b2=B2, eps=EPS)
    upd, _ = tx.update(dense_grad, tx.init(table), table)
    touched = np.array([2, 5])
    np.testing.assert_allclose(out[touched], optax.apply_updates(table, upd)[touched], **TOL)
    np.testing.assert_array_equal(np.delete(np.asarray(out), touched, 0), 1.0)


def test_donated_update_is_in_place():
    R, D = 64, 4
    table = jnp.asarray(np.random.default_rng(1).normal(size=(R, D)), jnp.float32)
    ids, g = jnp.array([1, 9, 9, 40]), jnp.ones((4, D))
    expected = tables.sparse_adam_update(
        table, jnp.zeros_like(table), jnp.zeros_like(table), ids, g, 0, 0.1
    )
    update = jax.jit(tables.sparse_adam_update, donate_argnums=(0, 1, 2))
    t, m, v = jnp.array(table), jnp.zeros_like(table), jnp.zeros_like(table)
    text = update.lower(t, m, v, ids, g, 0, 0.1).compile().as_text()
    assert text.count("may-alias") == 3  # outputs alias the three donated inputs
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "donated buffers were not usable" would fail here
        out = update(t, m, v, ids, g, 0, 0.1)
    assert t.is_deleted() and m.is_deleted() and v.is_deleted()
    for a, b in zip(out, expected):  # jit vs eager: rounding only
        np.testing.assert_allclose(a, b, **TOL)


MESHES = [MeshConfig(data=8), MeshConfig(data=2, fsdp=2, tensor=2), MeshConfig(data=1)]


@pytest.mark.parametrize("mesh_cfg", MESHES, ids=["data8", "d2f2t2", "one"])
def test_sharded_lookup_and_update_equal_unsharded(mesh_cfg):
    devices = jax.devices()[:1] if mesh_cfg.data == 1 else None
    mesh = shd.make_mesh(mesh_cfg, devices)
    R, D = 64, 4
    rng = np.random.default_rng(2)
    table = jnp.asarray(rng.normal(size=(R, D)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 60, size=(8, 3, 2)), jnp.int32)
    ids = ids.at[0, 0].set(ids[7, 2])  # a duplicate across batch shards
    g = jnp.asarray(rng.normal(size=(8, 3, 2, D)), jnp.float32)
    row_s = NamedSharding(mesh, P(shd.MESH_AXES))
    t_s = jax.device_put(table, row_s)
    ids_s, g_s = jax.device_put((ids, g), shd.data_sharding(mesh))
    rows = jax.jit(lambda t, i: tables.sharded_lookup(mesh, t, i))(t_s, ids_s)
    np.testing.assert_array_equal(rows, table[ids])
    mu, nu = tables.init_moments(t_s)
    mu = mu.at[5].set(0.3)  # nonzero state: the update reads moments, not just grads
    # the trainer's path: one table through sparse_tables_step, no clipping
    step = jax.jit(
        lambda t, m, v, i, g: tables.sparse_tables_step(
            mesh, {0: t}, {0: m}, {0: v}, {0: i}, {0: g}, 3, 0.05, b1=B1, b2=B2, eps=EPS
        )
    )
    got = [d[0] for d in step(t_s, mu, nu, ids_s, g_s)[:3]]
    want = tables.sparse_adam_update(
        table,
        jnp.zeros_like(table).at[5].set(0.3),
        jnp.zeros_like(table),
        ids.reshape(-1),
        g.reshape(-1, D),
        3,
        0.05,
        B1,
        B2,
        EPS,
    )
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, **TOL)
    assert got[0].sharding.is_equivalent_to(row_s, 2)


# ---------------------------------------------------------------------------------------------
# Toy train step: table [R, D] -> rows [B, T, H, D] -> head [H*D, V] -> cross-entropy

B, T, H, D, V = 16, 4, 2, 8, 5
CLIP, LR = 0.05, 3e-2


def _loss(W, rows, targets):
    logits = rows.reshape(B, T, H * D) @ W
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def _toy_step(mesh):
    """Sparse path: lookup outside the gradient, row grads -> sharded row-wise Adam, one
    global-norm clip over head + table gradients."""
    tx = optax.chain(clip_by_global_norm_with_tables(CLIP), optax.adam(LR, b1=B1, b2=B2, eps=EPS))

    def step(table, mu, nu, W, w_state, ids, targets, count):
        rows = tables.sharded_lookup(mesh, table, ids)
        loss, (gW, g_rows) = jax.value_and_grad(_loss, argnums=(0, 1))(W, rows, targets)
        t, m, v, table_sq = tables.sparse_tables_step(
            mesh,
            {"t": table},
            {"t": mu},
            {"t": nu},
            {"t": ids},
            {"t": g_rows},
            count,
            LR,
            b1=B1,
            b2=B2,
            eps=EPS,
            clip_norm=CLIP,
            other_sq_norm=optax.tree.norm(gW, squared=True),
        )
        upd, w_state = tx.update(gW, w_state, W, table_sq_norm=table_sq)
        return t["t"], m["t"], v["t"], optax.apply_updates(W, upd), w_state, loss

    return tx, jax.jit(step, donate_argnums=(0, 1, 2))


def _ref_step():
    """Dense reference on one device: gradient through table[ids], optax clip + adam."""
    tx = optax.chain(optax.clip_by_global_norm(CLIP), optax.adam(LR, b1=B1, b2=B2, eps=EPS))

    @jax.jit
    def step(params, state, ids, targets):
        g = jax.grad(lambda p: _loss(p["W"], p["table"][ids], targets))(params)
        upd, state = tx.update(g, state, params)
        return optax.apply_updates(params, upd), state

    return tx, step


def _batches(always, n_steps):
    """Ids drawn from ``always`` only, every one of its rows present at every step: then the
    sparse run must track dense Adam exactly (a row skipped at one step would keep moving
    under dense Adam and change the later losses)."""
    rng = np.random.default_rng(3)
    for _ in range(n_steps):
        ids = rng.choice(always, size=B * T * H)
        ids[: len(always)] = always
        ids = rng.permutation(ids).reshape(B, T, H).astype(np.int32)
        yield ids, rng.integers(0, V, size=(B, T)).astype(np.int32)


@pytest.mark.parametrize("mesh_cfg", MESHES[:2], ids=["data8", "d2f2t2"])
def test_toy_sharded_sparse_step_equals_dense_adam(mesh_cfg):
    mesh = shd.make_mesh(mesh_cfg)
    R = 96
    rng = np.random.default_rng(4)
    always = np.sort(rng.choice(90, size=24, replace=False))  # rows 90..95: padding
    table0 = jnp.asarray(rng.normal(size=(R, D)), jnp.float32)
    W0 = jnp.asarray(0.3 * rng.normal(size=(H * D, V)), jnp.float32)

    tx, step = _toy_step(mesh)
    table = jax.device_put(table0, NamedSharding(mesh, P(shd.MESH_AXES)))
    mu, nu = tables.init_moments(table)
    W, w_state = W0, tx.init(W0)
    ref_tx, ref_step = _ref_step()
    params = {"table": table0, "W": W0}
    ref_state = ref_tx.init(params)
    for count, (ids, targets) in enumerate(_batches(always, 3)):
        ids_s, tg_s = jax.device_put((ids, targets), shd.data_sharding(mesh))
        table, mu, nu, W, w_state, _ = step(table, mu, nu, W, w_state, ids_s, tg_s, count)
        params, ref_state = ref_step(params, ref_state, ids, targets)
    np.testing.assert_allclose(W, params["W"], **TOL)
    np.testing.assert_allclose(table[always], params["table"][always], **TOL)
    never = np.setdiff1d(np.arange(R), always)
    np.testing.assert_array_equal(table[never], table0[never])
    np.testing.assert_array_equal(params["table"][never], table0[never])
    assert not np.allclose(table[always], table0[always])


def _collectives_of_toy_step(mesh, R):
    tx, step = _toy_step(mesh)
    row_s = NamedSharding(mesh, P(shd.MESH_AXES))
    table = jax.ShapeDtypeStruct((R, D), jnp.float32, sharding=row_s)
    W = jnp.zeros((H * D, V))
    ids = jax.ShapeDtypeStruct((B, T, H), jnp.int32, sharding=shd.data_sharding(mesh))
    tg = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=shd.data_sharding(mesh))
    text = step.lower(table, table, table, W, tx.init(W), ids, tg, 0).compile().as_text()
    header = text.splitlines()[0]  # input_output_alias: the donated table, mu, nu are reused
    assert header.count("may-alias") + header.count("must-alias") >= 3, header
    return hlo.collectives(text)


def test_toy_step_collectives_are_independent_of_table_size():
    mesh = shd.make_mesh(MeshConfig(data=8))
    S = shd.shard_count_for_tables(mesh)
    per_size = {}
    for R in (S * 37, S * 148):  # 1x and 4x rows; 37 and 148 match no other dimension
        colls = _collectives_of_toy_step(mesh, R)
        assert any(c.op == "all-gather" for c in colls), hlo.summary(colls)
        for c in colls:
            for _, shape in c.operands:
                assert R not in shape and R // S not in shape, (R, hlo.summary(colls))
        per_size[R] = hlo.total_bytes(colls)
    small, big = per_size.values()
    assert small == big, per_size
    # ids + row grads (backward) and the rows (forward) dominate: O(N d), N = B*T*H
    assert small < 4 * 4 * B * T * H * (D + 1) + 4096, small


def test_hlo_parser_reads_typed_and_untyped_operands():
    text = """
  %p = f32[8,4]{1,0} parameter(0)
  %ag = f32[64,4]{1,0} all-gather(%p), dimensions={0}
  %ar = (f32[2]{0}, s32[3]{0}) all-reduce(f32[2]{0} %a, s32[3]{0} %b), to_apply=%add
  %done = f32[64,4]{1,0} all-gather-done(%ag)
"""
    colls = hlo.collectives(text)
    assert [c.op for c in colls] == ["all-gather", "all-reduce"]
    assert colls[0].operands == (("f32", (8, 4)),) and colls[0].bytes == 128
    assert colls[1].operands == (("f32", (2,)), ("s32", (3,))) and colls[1].bytes == 20
