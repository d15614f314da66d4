"""Backbone: MoE routing vs a NumPy loop, loss-free balancing, Sinkhorn, mHC, causality,
Engram on/off, one jitted training step of the tiny preset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax.config import Config, EngramConfig, ModelConfig, MoEConfig, TrainConfig
from engram_jax.engram import TableParam
from engram_jax.hashing import NgramHasher
from engram_jax.hyper import HyperConnection, sinkhorn
from engram_jax.model import EngramLM
from engram_jax.moe import MoE, RouterBias, bias_step, route, update_router_bias
from engram_jax.presets import get_preset

moe_forward = nnx.jit(MoE.__call__)


def _np(x):
    return np.asarray(x, np.float64)


def moe_oracle(moe: MoE, x_SxD: np.ndarray):
    """Plain loop over tokens: top-k on biased scores, weights from unbiased scores."""
    cfg = moe.cfg
    router, bias = _np(moe.router[...]), _np(moe.router_bias[...])
    wg, wu, wd = _np(moe.w_gate[...]), _np(moe.w_up[...]), _np(moe.w_down[...])

    def silu(z):
        return z / (1 + np.exp(-z))

    y = np.zeros_like(x_SxD)
    load = np.zeros(cfg.n_routed_experts, np.int64)
    for s, x in enumerate(x_SxD):
        logits = x @ router
        scores = (
            1 / (1 + np.exp(-logits))
            if cfg.score_func == "sigmoid"
            else np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        )
        chosen = np.argsort(-(scores + bias), kind="stable")[: cfg.top_k]
        w = scores[chosen] / (scores[chosen].sum() if cfg.norm_topk_prob else 1.0)
        for e, we in zip(chosen, w * cfg.route_scale):
            y[s] += we * ((silu(x @ wg[e]) * (x @ wu[e])) @ wd[e])
            load[e] += 1
        sh = moe.shared
        y[s] += (silu(x @ _np(sh.w_gate.kernel[...])) * (x @ _np(sh.w_up.kernel[...]))) @ _np(
            sh.w_down.kernel[...]
        )
    return y, load


@pytest.mark.parametrize(
    "dispatch,score_func",
    [
        ("ragged", "sigmoid"),
        ("blocked", "sigmoid"),
        ("capacity", "sigmoid"),
        ("blocked", "softmax"),
    ],
)
def test_moe_matches_token_loop(dispatch, score_func):
    cfg = MoEConfig(
        n_routed_experts=6,
        n_shared_experts=1,
        top_k=2,
        expert_hidden=8,
        score_func=score_func,
        route_scale=1.5,
        dispatch=dispatch,
        capacity_factor=3.0,
    )  # 3.0 = E/k: capacity >= S, nothing dropped
    moe = MoE(cfg, 16, rngs=nnx.Rngs(0))
    moe.router_bias[...] = jnp.asarray([0.3, -0.2, 0.0, 0.5, -0.4, 0.1])  # bias matters
    x = jax.random.normal(jax.random.key(1), (2, 7, 16))
    y, load = moe_forward(moe, x)
    y_ref, load_ref = moe_oracle(moe, _np(x).reshape(14, 16))
    np.testing.assert_allclose(_np(y).reshape(14, 16), y_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(load), load_ref)


def test_dispatches_agree_in_value_and_gradient():
    cfg = MoEConfig(
        n_routed_experts=6, n_shared_experts=1, top_k=3, expert_hidden=8, capacity_factor=2.0
    )  # 2.0 = E/k: capacity never drops here
    x = jax.random.normal(jax.random.key(5), (2, 9, 16))

    def loss(params, x, graph, rest):
        return jnp.sum(jnp.sin(nnx.merge(graph, params, rest)(x)[0]))

    results = {}
    for dispatch in ("ragged", "blocked", "capacity"):  # same seed: same parameters
        moe = MoE(dataclasses.replace(cfg, dispatch=dispatch), 16, rngs=nnx.Rngs(0))
        graph, params, rest = nnx.split(moe, nnx.Param, ...)
        grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
        results[dispatch] = grad_fn(params, x, graph, rest)
    for dispatch in ("blocked", "capacity"):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
            results[dispatch],
            results["ragged"],
        )


def test_capacity_drops_overflow_only():
    cfg = MoEConfig(
        n_routed_experts=4,
        n_shared_experts=1,
        top_k=1,
        expert_hidden=8,
        dispatch="capacity",
        capacity_factor=1.0,
    )
    moe = MoE(cfg, 8, rngs=nnx.Rngs(0))
    moe.router_bias[...] = jnp.asarray([10.0, 0.0, 0.0, 0.0])  # everything to expert 0
    x = jax.random.normal(jax.random.key(2), (1, 8, 8))
    y, load = moe_forward(moe, x)
    assert int(load[0]) == 8
    shared_only = moe.shared(x)
    kept = ~np.isclose(_np(y), _np(shared_only), atol=1e-6).all(-1)[0]
    assert kept.tolist() == [True] * 2 + [False] * 6  # capacity 8/4 = 2 slots, first come


def test_bias_balances_load_without_changing_weights():
    cfg = MoEConfig(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_hidden=8)
    moe = MoE(cfg, 16, rngs=nnx.Rngs(0))
    router = np.asarray(moe.router[...]).copy()
    router[:, :2] += 0.1  # skew: experts 0 and 1 win for positive inputs
    moe.router[...] = jnp.asarray(router)
    x = jnp.abs(jax.random.normal(jax.random.key(3), (4, 64, 16)))
    y0, _ = moe_forward(moe, x)
    imbalance = []
    for _ in range(10):
        _, load = moe_forward(moe, x)
        imbalance.append(float(jnp.max(load) / jnp.mean(load.astype(jnp.float32))))
        moe.router_bias[...] = bias_step(moe.router_bias[...], load, 0.05)
    assert imbalance[0] > 3.0 and max(imbalance[-3:]) < 0.6 * imbalance[0], imbalance
    # combine weights come from the unbiased scores, whatever the bias
    scores = jax.nn.sigmoid(jax.random.normal(jax.random.key(4), (5, 8)))
    idx, w = route(scores, moe.router_bias[...], cfg)
    expect = jnp.take_along_axis(scores, idx, axis=-1)
    np.testing.assert_allclose(w, expect / expect.sum(-1, keepdims=True), rtol=1e-6)
    # a bias that keeps every token's selection keeps the output exactly
    same = moe.router_bias[...] * 0 + 1e-3
    moe.router_bias[...] = same
    np.testing.assert_allclose(moe_forward(moe, x)[0], y0, rtol=1e-6, atol=1e-6)
    assert not isinstance(moe.router_bias, nnx.Param)


def tiny_cfg(**model) -> Config:
    """Two blocks (dense, MoE), width 32, mHC 2, Engram at block 1; tables of ~700 rows."""
    m = ModelConfig(
        vocab_size=97,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        dense_hidden=64,
        n_dense_layers=1,
        hc_mult=2,
        sinkhorn_iters=10,
        max_seq_len=64,
        **model,
    )
    return Config(
        model=m,
        moe=MoEConfig(
            n_routed_experts=4, n_shared_experts=1, top_k=2, expert_hidden=16, dispatch="blocked"
        ),
        engram=EngramConfig(
            engram_vocab_size=(101, 89),
            max_ngram_size=3,
            n_embed_per_ngram=16,
            n_head_per_ngram=2,
            layer_ids=(1,),
        ),
        train=TrainConfig(seq_len=16),
    )


def hash_ids(cfg: Config, tokens) -> dict:
    hasher = NgramHasher(cfg.engram, cfg.model.vocab_size, 0)
    return {k: jnp.asarray(v, jnp.int32) for k, v in hasher(np.asarray(tokens)).items()}


def test_sinkhorn_doubly_stochastic():
    logits = 3.0 * jax.random.normal(jax.random.key(0), (5, 4, 4))
    for iters, row_tol in ((20, 3e-3), (200, 1e-5)):  # 20: the mHC paper's t_max
        p = sinkhorn(logits, iters)
        assert bool(jnp.all(p >= 0))
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=row_tol)
        np.testing.assert_allclose(p.sum(-2), 1.0, atol=1e-5)  # the last step normalizes columns


def _sinkhorn_reference(logits, iters):
    """The textbook iteration: logsumexp over the trailing [M, M] axes, one op at a time."""
    lp = logits.astype(jnp.float32)
    for _ in range(iters):
        lp = lp - jax.nn.logsumexp(lp, axis=-1, keepdims=True)
        lp = lp - jax.nn.logsumexp(lp, axis=-2, keepdims=True)
    return jnp.exp(lp)


@pytest.mark.parametrize("m", [2, 4])
def test_sinkhorn_matches_reference_in_value_and_gradient(m):
    logits = 2.0 * jax.random.normal(jax.random.key(m), (3, 5, m, m))
    w = jax.random.normal(jax.random.key(7), (3, 5, m, m))
    np.testing.assert_allclose(sinkhorn(logits, 20), _sinkhorn_reference(logits, 20), rtol=1e-6)
    # the oracle in float64 NumPy: alternate row and column normalization of exp(logits)
    p = np.exp(np.asarray(logits, np.float64))
    for _ in range(20):
        p = p / p.sum(-1, keepdims=True)
        p = p / p.sum(-2, keepdims=True)
    np.testing.assert_allclose(sinkhorn(logits, 20), p, rtol=2e-5, atol=1e-6)
    grads = [
        jax.jit(jax.grad(lambda x, f=f: jnp.sum(f(x, 20) * w)))(logits)
        for f in (sinkhorn, _sinkhorn_reference)
    ]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_hyper_connection_single_branch_is_plain_residual():
    hc = HyperConnection(8, 1, layer_index=0, sinkhorn_iters=5, rngs=nnx.Rngs(0))
    assert not nnx.state(hc, nnx.Param)
    h = jax.random.normal(jax.random.key(0), (2, 3, 1, 8))
    u, maps = hc.read(h)
    np.testing.assert_array_equal(hc.write(h, jnp.tanh(u), maps), h + jnp.tanh(h))


def test_hyper_connection_mappings():
    hc = HyperConnection(8, 4, layer_index=1, sinkhorn_iters=20, rngs=nnx.Rngs(0))
    h = jax.random.normal(jax.random.key(0), (2, 3, 4, 8))
    pre, post, res = hc.mappings(h)
    assert pre.shape == post.shape == (2, 3, 4) and res.shape == (2, 3, 4, 4)
    assert bool(jnp.all((pre > 0) & (pre < 1) & (post > 0) & (post < 2)))
    np.testing.assert_allclose(res.sum(-2), 1.0, atol=1e-5)
    np.testing.assert_allclose(res.sum(-1), 1.0, atol=1e-3)
    u, maps = hc.read(h)
    np.testing.assert_allclose(u, jnp.einsum("btm,btmd->btd", pre, h), rtol=1e-5)
    y = jax.random.normal(jax.random.key(1), (2, 3, 8))
    want = jnp.einsum("btmn,btnd->btmd", res, h) + post[..., None] * y[:, :, None]
    np.testing.assert_allclose(hc.write(h, y, maps), want, rtol=1e-5, atol=1e-6)


def abstract_graphdef(cfg: Config):
    """The graph of a model for ``cfg`` without building it (no allocation, no compile)."""
    return nnx.graphdef(nnx.eval_shape(lambda: EngramLM(cfg, rngs=nnx.Rngs(0))))


@pytest.fixture(scope="module")
def lm():
    cfg = tiny_cfg()
    return cfg, EngramLM(cfg, rngs=nnx.Rngs(0))


@nnx.jit(static_argnames="collect")
def forward(model, tokens, ids=None, rows=None, collect=False):
    """Jitted: one compile instead of an eager compile per op."""
    return model(tokens, ids, rows, collect=collect)


def fresh(model):
    return nnx.merge(*nnx.split(model))  # a copy whose variables can be changed freely


@pytest.mark.parametrize("attention", ["gqa", pytest.param("mla", marks=pytest.mark.slow)])
def test_lm_is_causal(attention, lm):
    cfg, model = lm
    if attention == "mla":
        cfg = tiny_cfg(attention="mla", q_lora_rank=8, kv_lora_rank=12, qk_rope_head_dim=4)
        model = EngramLM(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.model.vocab_size)
    rows = model.gather_engram_rows(hash_ids(cfg, tokens))
    t = 6

    @nnx.jit
    def grad_rows(model, rows, tok):
        def logits_at_t(rows):
            logits, _ = model(tok, engram_rows=rows)
            return jnp.sum(logits[:, t] * jnp.arange(cfg.model.vocab_size)[None, :])

        return jax.grad(logits_at_t)(rows)

    # 1. gradient of logits at t w.r.t. the Engram rows of later positions is zero
    g = grad_rows(model, rows, tokens)[1]
    assert float(jnp.abs(g[:, t + 1 :]).max()) == 0.0 and float(jnp.abs(g[:, : t + 1]).max()) > 0
    # 2. changing later tokens (and their hash ids) leaves logits up to t unchanged
    other = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 5) % cfg.model.vocab_size)
    a, _ = forward(model, tokens, hash_ids(cfg, tokens))
    b, _ = forward(model, other, hash_ids(cfg, other))
    np.testing.assert_allclose(a[:, : t + 1], b[:, : t + 1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[:, t + 1 :], b[:, t + 1 :])


def test_engram_disabled_is_plain_backbone(lm):
    cfg, with_engram = lm
    with_engram = fresh(with_engram)
    plain_cfg = dataclasses.replace(cfg, engram=dataclasses.replace(cfg.engram, layer_ids=()))
    plain_graph = abstract_graphdef(plain_cfg)
    # the plain model is the Engram model's backbone weights in the plain graph
    backbone = [
        (p, v) for p, v in nnx.to_flat_state(nnx.state(with_engram)) if "engram" not in map(str, p)
    ]
    plain = nnx.merge(plain_graph, nnx.from_flat_state(backbone))
    assert not nnx.state(plain, TableParam) and plain.engram_layers == ()
    assert all("engram" not in map(str, p) for p, _ in nnx.to_flat_state(nnx.state(plain)))
    # silence Engram's value path: then both models compute the same function
    eng = with_engram.blocks[1].engram
    eng.value_kernel[...] = jnp.zeros_like(eng.value_kernel[...])
    tokens = jax.random.randint(jax.random.key(0), (2, 10), 0, cfg.model.vocab_size)
    a, aux_a = forward(with_engram, tokens, hash_ids(cfg, tokens))
    b, aux_b = forward(plain, tokens)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert set(aux_a["engram_gates"]) == {1} and aux_b["engram_gates"] == {}
    with pytest.raises(ValueError, match="engram_ids"):
        with_engram(tokens)


def test_aux_remat_and_bias_update(lm):
    cfg, model = lm
    model = fresh(model)
    tokens = jax.random.randint(jax.random.key(0), (2, 10), 0, cfg.model.vocab_size)
    ids = hash_ids(cfg, tokens)
    logits, aux = forward(model, tokens, ids, collect=True)
    assert logits.shape == (2, 10, 97) and logits.dtype == jnp.float32
    assert aux["moe_loads"][1].shape == (4,) and int(aux["moe_loads"][1].sum()) == 2 * 10 * 2
    assert aux["engram_gates"][1].shape == (2, 10, 2)
    assert sorted(aux["hidden"]) == [0, 1] and aux["hidden"][1].shape == (2, 10, 2, 32)
    np.testing.assert_allclose(
        nnx.jit(EngramLM.readout)(model, aux["hidden"][1]), logits, rtol=1e-6
    )
    remat = nnx.merge(abstract_graphdef(tiny_cfg(remat=True)), nnx.state(model))
    np.testing.assert_allclose(forward(remat, tokens, ids)[0], logits, rtol=1e-5, atol=1e-5)
    # update_router_bias: a State is returned updated (input untouched), a Module in place
    load = aux["moe_loads"][1]
    step = 0.1 * jnp.sign(jnp.mean(load.astype(jnp.float32)) - load)
    state = nnx.state(model, RouterBias)
    new_state = update_router_bias(state, aux["moe_loads"], 0.1)
    assert isinstance(new_state, nnx.State)
    np.testing.assert_allclose(new_state["blocks"][1]["ffn"]["router_bias"][...], step)
    np.testing.assert_array_equal(state["blocks"][1]["ffn"]["router_bias"][...], 0.0)
    update_router_bias(model, aux["moe_loads"], 0.1)
    np.testing.assert_allclose(model.blocks[1].ffn.router_bias[...], step)


def test_bfloat16_compute_float32_params_and_logits(lm):
    cfg, model = lm
    bf16 = nnx.merge(abstract_graphdef(tiny_cfg(dtype="bfloat16")), nnx.state(model))
    assert all(v.dtype == jnp.float32 for _, v in nnx.to_flat_state(nnx.state(bf16, nnx.Param)))
    tokens = jax.random.randint(jax.random.key(0), (2, 10), 0, cfg.model.vocab_size)
    ids = hash_ids(cfg, tokens)
    low, _ = forward(bf16, tokens, ids)
    high, _ = forward(model, tokens, ids)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, high, atol=0.1 * float(jnp.std(high)))


@pytest.mark.slow
def test_tiny_preset_trains_one_step_under_jit():
    cfg = get_preset("tiny")
    model = EngramLM(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 33), 0, cfg.model.vocab_size)
    ids = {k: v[:, :-1] for k, v in hash_ids(cfg, tokens).items()}

    @nnx.jit
    def grad_step(model, tokens, ids):
        def loss_fn(model):
            logits, aux = model(tokens[:, :-1], ids)
            logp = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1)), aux

        (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        return loss, grads, aux

    loss, grads, aux = grad_step(model, tokens, ids)
    assert np.isfinite(float(loss)) and abs(float(loss) - np.log(cfg.model.vocab_size)) < 3
    leaves = jax.tree.leaves(grads)
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert all("router_bias" not in map(str, p) for p, _ in nnx.to_flat_state(grads))
    assert sorted(aux["moe_loads"]) == [1, 2, 3] and sorted(aux["engram_gates"]) == [1]
    table_grad = grads["blocks"][1]["engram"]["table"]["table"][...]
    assert float(jnp.abs(table_grad).sum()) > 0
