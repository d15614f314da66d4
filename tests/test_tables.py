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

from engram_jax import catch_up, hlo, tables
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
    step = jax.jit(
        lambda t, m, v, i, g: tables.sharded_sparse_adam_update(
            mesh, t, m, v, i, g, 3, 0.05, B1, B2, EPS
        )
    )
    got = step(t_s, mu, nu, ids_s, g_s)
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


# ---------------------------------------------------------------------------------------------
# Exact Adam (catch-up of untouched rows) against dense optax.adam


def _schedule(count):
    """Warmup 5 steps, lr 0.05, then x0.3 at 60 and 120 (the trainer's shape of schedule)."""
    s = jnp.asarray(count, jnp.int32)
    warm = jnp.minimum(1.0, (s + 1).astype(jnp.float32) / 5)
    return 0.05 * warm * jnp.power(jnp.float32(0.3), (s >= 60).astype(jnp.int32) + (s >= 120))


def _random_interval_ids(rng, steps, R, N):
    """Per step N ids: a few hot rows every step, the others at random intervals (some rows
    idle for longer than the catch-up horizon, some never touched)."""
    period = rng.integers(1, 400, size=R)  # row r touched every ~period[r] steps
    out = []
    for _ in range(steps):
        live = np.flatnonzero(rng.random(R) < 1.0 / period)
        live = live[live < R - 4]  # the last 4 rows: never touched
        ids = rng.choice(live, size=N) if len(live) else np.zeros(N, np.int64)
        ids[: len(live[:N])] = live[:N]
        out.append(ids.astype(np.int32))
    return out


def test_chunked_catch_up_is_bit_identical_to_the_unchunked_replay():
    # touched rows with gaps 0, 1-3, tens, beyond the horizon, never updated (last -1), and
    # duplicate and out-of-range ids; K = 50 slots is no multiple of the chunk sizes
    R, D, N, step = 300, 5, 50, 400
    rng = np.random.default_rng(3)
    last = rng.choice([step - 1, step - 2, step - 4, step - 40, step - 150, 5, -1], size=R)
    ids = jnp.asarray(np.r_[rng.integers(0, R, N - 6), [7, 7, R, R + 9, -1, 0]], jnp.int32)
    t, mu = (jnp.asarray(rng.normal(size=(R, D)), jnp.float32) for _ in range(2))
    nu = jnp.asarray(rng.random((R, D)), jnp.float32) * 1e-2
    mu, nu = (jnp.where(jnp.asarray(last)[:, None] < 0, 0, x) for x in (mu, nu))
    h = catch_up.catch_up_horizon(B1, B2)
    run = jax.jit(
        lambda c: catch_up.catch_up_touched(
            t, mu, nu, jnp.asarray(last, jnp.int32), ids, step, _schedule, B1, B2, EPS, h, c
        ),
        static_argnums=0,
    )
    ref = run(None)
    assert not np.array_equal(ref[0], t)  # the replay moved rows
    for chunk in (1, 4, 7, 16, 49):
        for a, b in zip(run(chunk), ref):
            np.testing.assert_array_equal(a, b)


def test_catch_up_horizon_bounds_the_tail():
    h = catch_up.catch_up_horizon(B1, B2)
    assert 200 < h < 300
    assert catch_up.catch_up_horizon(0.9, 0.999) < h
    with pytest.raises(ValueError, match="b1\\*\\*2 < b2"):
        catch_up.catch_up_horizon(0.99, 0.9)


@pytest.mark.parametrize("mesh_cfg", [None, MeshConfig(data=8)], ids=["1dev", "data8"])
def test_exact_adam_equals_dense_adam_with_rows_touched_at_random_intervals(mesh_cfg):
    # chunks of 3 of the 8 touched slots: the chunked replay, its overlapping last chunk
    _exact_adam_vs_dense(mesh_cfg, chunk=3)


def test_exact_adam_unchunked_equals_dense_adam():
    _exact_adam_vs_dense(None, chunk=None)


def _exact_adam_vs_dense(mesh_cfg, chunk):
    R, D, N, steps = 64, 3, 8, 700
    rng = np.random.default_rng(7)
    table0 = jnp.asarray(rng.normal(size=(R, D)), jnp.float32)
    tx = optax.adam(_schedule, b1=B1, b2=B2, eps=EPS)
    mesh = shd.make_mesh(MeshConfig(data=1), jax.devices()[:1]) if mesh_cfg is None else None
    mesh = mesh or shd.make_mesh(mesh_cfg)
    row_s = NamedSharding(mesh, P(shd.MESH_AXES))
    put = lambda x: jax.device_put(x, row_s)

    @jax.jit
    def dense_step(dense, state, ids, g):
        upd, state = tx.update(jnp.zeros_like(dense).at[ids].add(g), state, dense)
        return optax.apply_updates(dense, upd), state

    @jax.jit
    def sparse_step(t, mu, nu, last, ids, g, step):
        t, mu, nu, last = tables.sharded_catch_up(
            mesh, t, mu, nu, last, ids, step, _schedule, B1, B2, EPS, chunk=chunk
        )
        read = tables.sharded_lookup(mesh, t, ids)  # what the forward sees
        merged = tables.sharded_merge_row_grads(mesh, ids, g, R)
        t, mu, nu = tables.sharded_apply_adam(
            mesh, t, mu, nu, merged, step, _schedule(step), B1, B2, EPS
        )
        return t, mu, nu, last, read

    dense, dstate = table0, tx.init(table0)
    t = put(table0)
    mu, nu = tables.init_moments(t)
    last = tables.init_last(t)
    for step, ids_np in enumerate(_random_interval_ids(rng, steps, R, N)):
        ids = jnp.asarray(ids_np.reshape(N, 1))
        g = jnp.asarray(rng.normal(size=(N, 1, D)), jnp.float32)
        t, mu, nu, last, read = sparse_step(t, mu, nu, last, ids, g, step)
        np.testing.assert_allclose(read[:, 0], dense[ids_np], **TOL)  # before this update
        dense, dstate = dense_step(dense, dstate, ids_np, g[:, 0])
    # evaluation reads every row as dense Adam holds it, without writing
    every = jnp.arange(R, dtype=jnp.int32).reshape(8, R // 8)
    c = tables.CatchUp(mu, nu, last, steps, _schedule, B1, B2, EPS)
    np.testing.assert_allclose(
        tables.sharded_lookup(mesh, t, every, catch_up=c).reshape(R, D), dense, **TOL
    )
    lazy_gap = np.abs(np.asarray(t) - np.asarray(dense)).max()
    assert lazy_gap > 1e-3  # the stored (lazy) table differs: the catch-up is what matters
    flushed, fmu, fnu, flast = catch_up.catch_up_all(t, mu, nu, last, steps, _schedule, B1, B2, EPS)
    np.testing.assert_allclose(flushed, dense, **TOL)
    np.testing.assert_allclose(fmu, dstate[0].mu, **TOL)
    np.testing.assert_allclose(fnu, dstate[0].nu, rtol=2e-5, atol=1e-9)
    assert np.all(np.asarray(flast) == steps - 1)
    np.testing.assert_array_equal(flushed[R - 4 :], table0[R - 4 :])  # never touched


@pytest.mark.slow
def test_train_step_exact_table_adam_equals_the_dense_path():
    """The real train step, sparse path with exact table Adam, against the dense path
    (optax.adam on the whole table): same losses, and every table row equal (the idle rows
    caught up) after steps whose random ids leave most rows untouched at each step."""
    from engram_jax.config import override
    from engram_jax.optim import make_optimizer, table_learning_rate_schedule
    from engram_jax.presets import get_preset
    from engram_jax.state import init_state, tables_by_layer
    from engram_jax.step import make_eval_step, make_train_step

    sets = ["model.d_model=32", "model.head_dim=16", "model.n_heads=2", "model.n_kv_heads=1",
            "model.n_layers=2", "model.vocab_size=256", "model.dense_hidden=64",
            "moe.expert_hidden=16", "moe.n_routed_experts=4", "engram.n_embed_per_ngram=16",
            "engram.engram_vocab_size=[60,70]", "train.batch_size=8", "train.seq_len=4",
            "optim.warmup_steps=2", "optim.decay_steps=[4]", "train.steps=8"]  # fmt: skip
    mesh = shd.make_mesh(MeshConfig(data=8))
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(8):
        toks = rng.integers(0, 256, (8, 5), dtype=np.int32)
        ids = {1: rng.integers(0, 59, (8, 4, 8), dtype=np.int32)}
        batches.append(dict(inputs=toks[:, :-1], targets=toks[:, 1:], engram_ids=ids))
    out = {}
    for name, extra in (("sparse", []), ("dense", ["engram.sparse_update=false"])):
        cfg = override(get_preset("tiny"), sets + extra)
        tx = make_optimizer(cfg, cfg.train.steps)
        graphdef, state = init_state(cfg, mesh, tx)
        step = jax.jit(make_train_step(cfg, graphdef, tx, mesh), donate_argnums=0)
        losses = []
        for b in batches:
            state, m = step(state, shd.global_batch_from_local(mesh, b))
            losses.append(float(m["loss"]))
        last = shd.global_batch_from_local(mesh, batches[0])
        val = float(jax.jit(make_eval_step(cfg, graphdef, mesh))(state, last))
        out[name] = (losses, val, state, cfg)
    (ls, vs, ss, cfg), (ld, vd, sd, _) = out["sparse"], out["dense"]
    np.testing.assert_allclose(ls, ld, rtol=2e-5)
    assert vs == pytest.approx(vd, rel=2e-5)  # eval reads caught-up rows
    t, d = tables_by_layer(ss["tables"])[1], _dense_table(sd)
    moments = (ss["table_mu"][1], ss["table_nu"][1], ss["table_last"][1])
    lr = table_learning_rate_schedule(cfg, 8)
    flushed = catch_up.catch_up_all(t, *moments, 8, lr, 0.9, 0.95, 1e-8)[0]
    np.testing.assert_allclose(flushed, d, rtol=1e-4, atol=1e-6)
    assert np.abs(np.asarray(t) - np.asarray(d)).max() > 1e-4  # stored rows lag: catch-up matters


def _dense_table(state):
    from flax import nnx

    for path, var in nnx.to_flat_state(state["params"]):
        if path[-1] == "table":
            return var.get_value() if isinstance(var, nnx.Variable) else var
    raise AssertionError("no table in the dense path's params")
