"""Exact table Adam: untouched rows caught up (engram_jax.catch_up) against dense optax.adam,
chunked and unchunked replays bit-identical, the real train step's sparse path against its dense
path."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from engram_jax import catch_up, tables
from engram_jax import sharding as shd
from engram_jax.config import MeshConfig

B1, B2, EPS = 0.9, 0.95, 1e-8
TOL = {"rtol": 2e-5, "atol": 2e-6}


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
    from conftest import train_steps

    from engram_jax.config import override
    from engram_jax.optim import table_learning_rate_schedule
    from engram_jax.presets import get_preset
    from engram_jax.state import tables_by_layer
    from engram_jax.step import make_eval_step

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
        global_batches = [shd.global_batch_from_local(mesh, b) for b in batches]
        graphdef, state, metrics = train_steps(cfg, mesh, global_batches)
        losses = [float(m["loss"]) for m in metrics]
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
