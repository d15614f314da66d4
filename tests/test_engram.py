"""Engram layer tests: a NumPy oracle written from ENGRAM_SPEC sections 2-4, causality by
gradients and by perturbation, sparse table gradients, the ids/rows paths, jit, ablations."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax.config import EngramConfig
from engram_jax.engram import Engram, TableParam, causal_depthwise_conv
from engram_jax.hashing import head_offsets
from engram_jax.layers import Linear, RMSNorm, logical_axes

CFG = EngramConfig(
    engram_vocab_size=(50, 66),
    max_ngram_size=3,
    n_embed_per_ngram=12,
    n_head_per_ngram=3,
    kernel_size=4,
    layer_ids=(0,),
)
SIZES = [[53, 59, 61], [67, 71, 73]]  # 2 orders x 3 heads (distinct primes)
D, B, T = 16, 2, 16  # T > (kernel_size - 1) * N = 9, so the conv reaches back to t=0


def make(M, cfg=CFG, seed=0, **kw):
    return Engram(cfg, 0, D, M, table_sizes=SIZES, rngs=nnx.Rngs(seed), **kw)


def inputs(M, seed=1):
    rng = np.random.default_rng(seed)  # NumPy: no per-shape JAX RNG compiles
    h = rng.normal(size=(B, T, M, D)).astype(np.float32)
    ids = np.stack([rng.integers(0, n, (B, T)) for order in SIZES for n in order], axis=-1)
    return jnp.asarray(h), jnp.asarray(ids, jnp.int32)


@nnx.jit
def run(model, h, ids=None, rows=None):
    """Jitted forward -> (y, gates): one compile per shape instead of one per eager op."""
    return model(h, ids=ids, rows=rows, return_gates=True)


def randomize(model, seed=7):
    """Nonzero conv kernel and non-unit norm scales, so every path is exercised (one stream
    per parameter, so models differing by an ablation get equal values where they overlap)."""
    for i, mod in enumerate((model.conv_norm, model.key_norm, model.query_norm)):
        if mod is not None:
            rng = np.random.default_rng([seed, i])
            mod.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, mod.scale[...].shape), jnp.float32)
    if model.conv_kernel is not None:
        rng = np.random.default_rng([seed, 3])
        model.conv_kernel[...] = jnp.asarray(
            rng.normal(0, 0.5, model.conv_kernel[...].shape), jnp.float32
        )
    return model


# -- independent NumPy oracle (spec sections 2-4, the demo's arithmetic) ---------------------


def np_rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def oracle(model, h, ids, h_pre=None):
    """Returns (Y [B,T,M,D], alpha [B,T,M], V~ [B,T,M,D]) in float64. ``h_pre`` [B,T,D]: the
    pre-mapped state the single gate reads without multi-branch fusion (default: the mean)."""
    cfg = model.cfg
    g = lambda v: np.asarray(v[...], np.float64)
    h, ids = np.asarray(h, np.float64), np.asarray(ids)
    Bn, Tn, M, Dn = h.shape
    flat = [s for order in SIZES for s in order]
    offsets = np.concatenate([[0], np.cumsum(flat)[:-1]])
    e = g(model.table.table)[ids + offsets].reshape(Bn, Tn, -1)  # concat of head rows
    v = e @ g(model.value_kernel) + g(model.value_bias)
    groups = M if cfg.multi_branch else 1
    q_src = h if cfg.multi_branch else h.mean(axis=2, keepdims=True)
    if h_pre is not None and not cfg.multi_branch:
        q_src = np.asarray(h_pre, np.float64)[:, :, None]
    alpha = np.ones((Bn, Tn, groups))
    if cfg.use_gating:
        for m in range(groups):
            k = e @ g(model.key_kernel)[:, m] + g(model.key_bias)[m]
            a = (
                np_rms(q_src[:, :, m], g(model.query_norm.scale)[m], cfg.norm_eps)
                * np_rms(k, g(model.key_norm.scale)[m], cfg.norm_eps)
            ).sum(-1) / np.sqrt(Dn)
            a = np.sign(a) * np.sqrt(np.maximum(np.abs(a), 1e-6))
            alpha[:, :, m] = 1 / (1 + np.exp(-a))
    u = alpha[..., None] * v[:, :, None, :]
    y = u.copy()
    if cfg.use_short_conv:
        w = g(model.conv_kernel)  # [W, G, D]; tap j sees lag (W-1-j)*N
        W, dil = w.shape[0], cfg.max_ngram_size
        x = np.stack(
            [np_rms(u[:, :, m], g(model.conv_norm.scale)[m], cfg.norm_eps) for m in range(groups)],
            axis=2,
        )
        conv = np.zeros_like(x)
        for t in range(Tn):
            for j in range(W):
                src = t - (W - 1 - j) * dil
                if src >= 0:
                    conv[:, t] += w[j] * x[:, src]
        y = conv / (1 + np.exp(-conv)) + u
    return (
        np.broadcast_to(y, (Bn, Tn, M, Dn)),
        np.broadcast_to(alpha, (Bn, Tn, M)),
        np.broadcast_to(u, (Bn, Tn, M, Dn)),
    )


# -- shapes, types, init ----------------------------------------------------------------------


@pytest.mark.parametrize("M", [1, 4])
def test_shapes_and_variable_types(M):
    model = make(M, row_multiple=64)
    h, ids = inputs(M)
    y, gates = run(model, h, ids)
    assert y.shape == (B, T, M, D) and gates.shape == (B, T, M) and y.dtype == jnp.float32
    assert model.table.table[...].shape == (384, CFG.d_head)  # 384 = sum(SIZES) padded to 64
    assert model.table.n_rows == sum(map(sum, SIZES))
    np.testing.assert_array_equal(model.table.offsets, head_offsets(SIZES))  # same as hashing
    assert isinstance(model.table.table, TableParam)
    assert logical_axes(model.table.table) == ("table_rows", None)
    tables = nnx.state(model, TableParam)
    assert len(jax.tree.leaves(tables)) == 1
    others = nnx.state(model, nnx.All(nnx.Param, nnx.Not(TableParam)))
    assert all(
        logical_axes(v) is not None
        for v in jax.tree.leaves(others, is_leaf=lambda x: isinstance(x, nnx.Variable))
    )
    assert model.conv_kernel[...].shape == (CFG.kernel_size, M, D)
    assert not np.any(np.asarray(model.conv_kernel[...]))  # zero init
    if M == 1:
        assert run(model, h[:, :, 0], ids)[0].shape == (B, T, D)


@pytest.mark.parametrize("M", [1, 4])
def test_init_output_is_gated_value(M):
    model = make(M)
    h, ids = inputs(M)
    y, gates = run(model, h, ids)
    _, alpha_ref, u_ref = oracle(model, h, ids)
    np.testing.assert_allclose(gates, alpha_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, u_ref, rtol=1e-4, atol=1e-5)  # zero conv: Y = V~
    assert np.all((np.asarray(gates) > 0) & (np.asarray(gates) < 1))


@pytest.mark.parametrize("M", [1, 4])
def test_nonzero_conv_matches_oracle(M):
    model = randomize(make(M))
    h, ids = inputs(M)
    y_ref, _, u_ref = oracle(model, h, ids)
    y = np.asarray(run(model, h, ids)[0])
    assert np.abs(y - u_ref).max() > 1e-2  # the conv does something
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)


def test_bfloat16_compute_close_to_float32():
    h, ids = inputs(4)
    y32 = run(randomize(make(4)), h, ids)[0]
    model = randomize(make(4, dtype=jnp.bfloat16))
    y16 = run(model, h.astype(jnp.bfloat16), ids)[0]
    assert y16.dtype == jnp.bfloat16 and model.value_kernel[...].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.1, rtol=0.05)


def test_causal_conv_oracle_direct():
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(2, 11, 5)), rng.normal(size=(3, 5))
    y, hist = causal_depthwise_conv(jnp.asarray(x), jnp.asarray(w), 2)
    ref = np.zeros_like(x)
    for t in range(11):
        for j in range(3):
            if t - (2 - j) * 2 >= 0:
                ref[:, t] += w[j] * x[:, t - (2 - j) * 2]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hist, x[:, -4:], rtol=1e-6)


# -- causality ----------------------------------------------------------------------------------


@pytest.mark.parametrize("conv", ["zero", "random"])
def test_causality_by_gradient(conv):
    model = make(4)
    if conv == "random":
        randomize(model)
    h, ids = inputs(4)
    rows = model.table.rows(ids)
    r = jnp.asarray(np.random.default_rng(3).normal(size=(B, T, 4, D)), jnp.float32)
    ts = (0, 5, T - 2)

    @jax.jit
    def grads(h, rows):  # d(sum of outputs at positions <= t) / d(inputs), for each t
        _, vjp = jax.vjp(lambda h, rows: model(h, rows=rows), h, rows)
        return [vjp(r * (jnp.arange(T) <= t).astype(jnp.float32)[None, :, None, None]) for t in ts]

    for t, (gh, gr) in zip(ts, grads(h, rows)):
        assert not np.any(np.asarray(gh[:, t + 1 :])) and not np.any(np.asarray(gr[:, t + 1 :]))
        assert np.any(np.asarray(gh[:, t])) and np.any(np.asarray(gr[:, t]))


def test_causality_by_perturbation_with_nonzero_conv():
    model = randomize(make(4))
    h, ids = inputs(4)
    y = np.asarray(run(model, h, ids)[0])
    t = 6
    h2 = h.at[:, t + 1].add(1.0)
    ids2 = ids.at[:, t + 1].set((ids[:, t + 1] + 1) % 53)
    y2 = np.asarray(run(model, h2, ids2)[0])
    np.testing.assert_array_equal(y2[:, : t + 1], y[:, : t + 1])
    dil = CFG.max_ngram_size
    assert np.abs(y2[:, t + 1] - y[:, t + 1]).max() > 1e-3
    assert np.abs(y2[:, t + 1 + dil] - y[:, t + 1 + dil]).max() > 1e-4  # reached via the conv


# -- gradients, ids vs rows, jit --------------------------------------------------------------


def test_table_gradient_touches_exactly_the_looked_up_rows():
    model = randomize(make(4, row_multiple=64))
    h, ids = inputs(4)
    r = jnp.asarray(np.random.default_rng(4).normal(size=(B, T, 4, D)), jnp.float32)

    def loss(model):
        return jnp.sum(model(h, ids=ids) * r)

    grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, TableParam)))(model)
    g = np.asarray(grads["table"]["table"][...])
    flat = [s for order in SIZES for s in order]
    expect = set((np.asarray(ids) + np.concatenate([[0], np.cumsum(flat)[:-1]])).ravel())
    assert set(np.flatnonzero(np.abs(g).sum(-1))) == expect


def test_rows_path_equals_ids_path():
    model = randomize(make(4))
    h, ids = inputs(4)
    y1, g1 = run(model, h, ids=ids)
    y2, g2 = run(model, h, rows=model.table.rows(ids))
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(g1, g2)
    with pytest.raises(ValueError):
        model(h)
    with pytest.raises(ValueError):
        model(h, ids=ids, rows=model.table.rows(ids))


def test_jit_traces_once():
    model = make(4)
    traces = []

    @nnx.jit
    def forward(model, h, ids):
        traces.append(1)
        return model(h, ids=ids, return_gates=True)

    for seed in range(3):
        h, ids = inputs(4, seed=seed)
        y, _ = forward(model, h, ids)
        np.testing.assert_allclose(y, model(h, ids=ids), rtol=1e-5, atol=1e-6)
        model.conv_kernel[...] = model.conv_kernel[...] + 0.1  # new values, same structure
    assert len(traces) == 1


# -- incremental decoding ---------------------------------------------------------------------


@nnx.jit
def step(model, h, cache, ids):
    return model.step(h, cache, ids=ids)


def test_step_equals_full_pass():
    model = randomize(make(4))
    h, ids = inputs(4)
    y_full, g_full = run(model, h, ids)
    cache = model.init_cache(B)
    assert cache.shape == (B, (CFG.kernel_size - 1) * CFG.max_ngram_size, 4 * D)
    outs, gates = [], []
    for lo, hi in [(0, 5)] + [(t, t + 1) for t in range(5, T)]:  # prefill, then one at a time
        y, g, cache = step(model, h[:, lo:hi], cache, ids[:, lo:hi])
        outs.append(y)
        gates.append(g)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), y_full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jnp.concatenate(gates, 1), g_full, rtol=1e-6)


# -- ablations ----------------------------------------------------------------------------------


def test_no_gating_sets_alpha_to_one():
    cfg = dataclasses.replace(CFG, use_gating=False)
    model = make(4, cfg)
    h, ids = inputs(4)
    y, gates = run(model, h, ids)
    assert gates is None and model.key_kernel is None  # alpha = 1, nothing to report
    v = np.asarray(
        model.table.rows(ids).reshape(B, T, -1) @ model.value_kernel[...]
        + model.value_bias[...][None, None]
    )
    np.testing.assert_allclose(y, np.broadcast_to(v[:, :, None], y.shape), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, oracle(model, h, ids)[0], rtol=1e-4, atol=1e-5)


def test_no_short_conv_gives_gated_value():
    h, ids = inputs(4)
    full = randomize(make(4))
    cfg = dataclasses.replace(CFG, use_short_conv=False)
    bare = make(4, cfg)
    randomize(bare)
    assert bare.conv_kernel is None
    y_full, y_bare = np.asarray(run(full, h, ids)[0]), np.asarray(run(bare, h, ids)[0])
    _, _, u_ref = oracle(full, h, ids)  # same seed, same table/projections/gate params
    np.testing.assert_allclose(y_bare, u_ref, rtol=1e-4, atol=1e-5)
    assert np.abs(y_full - y_bare).max() > 1e-2


def test_single_branch_fusion_on_mean_hidden():
    cfg = dataclasses.replace(CFG, multi_branch=False)
    model = randomize(make(4, cfg))
    assert model.key_kernel[...].shape == (cfg.d_mem, 1, D)
    h, ids = inputs(4)
    y, gates = run(model, h, ids)
    y_ref, alpha_ref, _ = oracle(model, h, ids)
    np.testing.assert_allclose(gates, alpha_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
    y = np.asarray(y)
    assert all(np.array_equal(y[:, :, 0], y[:, :, m]) for m in range(4))


def test_single_branch_fusion_on_the_pre_mapped_state():
    """Spec section 4, "w/o multi-branch": one fusion gated on H_pre x; in a block, H_pre is
    the attention sublayer's mHC pre-mapping (not the uniform branch mean)."""
    cfg = dataclasses.replace(CFG, multi_branch=False)
    model = randomize(make(4, cfg))
    h, ids = inputs(4)
    w = jnp.asarray([0.7, 0.1, 0.15, 0.05])
    h_pre = jnp.einsum("m,btmd->btd", w, h)
    y, gates = nnx.jit(lambda m, h, i, p: m(h, ids=i, return_gates=True, h_pre_BxTxD=p))(
        model, h, ids, h_pre
    )
    y_ref, alpha_ref, _ = oracle(model, h, ids, h_pre=h_pre)
    np.testing.assert_allclose(gates, alpha_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
    _, alpha_mean, _ = oracle(model, h, ids)
    assert np.abs(alpha_mean - alpha_ref).max() > 1e-3

    from engram_jax.model import EngramLM
    from engram_jax.presets import get_preset

    lm_cfg = get_preset("tiny")
    lm_cfg = dataclasses.replace(
        lm_cfg, engram=dataclasses.replace(lm_cfg.engram, multi_branch=False)
    )
    block = EngramLM(lm_cfg, rngs=nnx.Rngs(0), row_multiple=8).blocks[1]
    M, Dm, H = lm_cfg.model.hc_mult, lm_cfg.model.d_model, lm_cfg.engram.n_hash_heads
    rng = np.random.default_rng(2)
    hb = jnp.asarray(rng.normal(size=(1, 8, M, Dm)), jnp.float32)
    idb = jnp.asarray(rng.integers(0, 50, size=(1, 8, H)), jnp.int32)
    _, _, gates_block = nnx.jit(lambda b, h, i: b(h, i))(block, hb, idb)
    pre = block.attn_hc.read(hb)[0]
    engram = nnx.jit(lambda e, h, i, p: e(h, ids=i, return_gates=True, h_pre_BxTxD=p))
    _, want = engram(block.engram, hb, idb, pre)
    _, mean = engram(block.engram, hb, idb, None)
    np.testing.assert_allclose(gates_block, want, rtol=1e-6)
    assert np.abs(np.asarray(gates_block) - np.asarray(mean)).max() > 1e-4


# -- shared layers ----------------------------------------------------------------------------


def test_rmsnorm_and_linear():
    x = jnp.asarray(np.random.default_rng(0).normal(0, 3, (2, 3, 4, 8)), jnp.float32)
    norm = RMSNorm(8, 1e-5, groups=4)
    norm.scale[...] = jnp.arange(32.0).reshape(4, 8) / 10
    ref = np_rms(np.asarray(x, np.float64), np.arange(32.0).reshape(4, 8) / 10, 1e-5)
    np.testing.assert_allclose(norm(x), ref, rtol=1e-5, atol=1e-6)
    assert RMSNorm(8)(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    lin = Linear(8, 5, axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    assert logical_axes(lin.kernel) == ("embed", "mlp") and logical_axes(lin.bias) == ("mlp",)
    np.testing.assert_allclose(
        lin(x), np.asarray(x) @ np.asarray(lin.kernel[...]), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError):
        Linear(8, 5, axes=("embed", "nonsense"), rngs=nnx.Rngs(0))


def test_demo_command_runs_on_bytes(capsys):
    from engram_jax.cli import main

    assert main(["demo", "--bytes", "--kb", "1", "--seq-len", "128"]) == 0
    out = capsys.readouterr().out
    assert "V=256" in out and "gates" in out and "y (8, 128, 2, 128)" in out
