"""Schedules, parameter groups, the optax chain, and no table moments on the sparse path."""

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from engram_jax import optim
from engram_jax.config import Config, EngramConfig, OptimConfig, override
from engram_jax.engram import MultiHeadTable
from engram_jax.layers import Linear, RMSNorm, param

B, T = 2, 3


def test_schedule_warmup_and_step_decay_boundaries():
    o = OptimConfig(lr=1.0, warmup_steps=10, decay_factor=0.5)
    lr = optim.learning_rate_schedule(o, total_steps=100)
    got = {s: float(lr(s)) for s in (0, 4, 9, 10, 79, 80, 89, 90, 99)}
    assert got == pytest.approx(
        {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 79: 1.0, 80: 0.5, 89: 0.5, 90: 0.25, 99: 0.25}
    )
    custom = optim.learning_rate_schedule(
        dataclasses.replace(o, warmup_steps=0, decay_steps=(5,)), 100, peak=2.0
    )
    assert [float(custom(s)) for s in (0, 4, 5, 99)] == pytest.approx([2.0, 2.0, 1.0, 1.0])
    cfg = Config(optim=o, engram=EngramConfig(table_lr_multiplier=5.0))
    assert float(optim.table_learning_rate_schedule(cfg, 100)(85)) == pytest.approx(2.5)


class Small(nnx.Module):
    """One parameter of every kind the groups must tell apart."""

    def __init__(self, rngs):
        n = lambda *s: jax.random.normal(rngs.params(), s)
        self.embed = param(n(32, 16), ("vocab", "embed"))
        self.proj = Linear(16, 16, axes=("embed", "mlp"), rngs=rngs)  # kernel: muon
        self.norm = RMSNorm(16)
        self.experts = param(0.3 * n(4, 16, 16), ("expert", "embed", "mlp"))  # muon, batched
        self.mix = param(0.3 * n(16, 16), (None, None))  # no model axis: adamw
        self.table = MultiHeadTable([7, 11], 8, row_multiple=8, rngs=rngs)  # 24 rows
        self.head = Linear(16, 32, use_bias=False, axes=("embed", "vocab"), rngs=rngs)

    def __call__(self, tokens, ids):
        x = self.embed[...][tokens] + self.table.rows(ids).reshape(B, T, 16)
        h = jax.nn.gelu(self.proj(self.norm(x)))
        h = h + jnp.einsum("btd,edf->btf", h, self.experts[...]) @ self.mix[...]
        return self.head(h)


def _loss(model, tokens, ids):
    logits = model(tokens, ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()


def _data():
    tokens = jnp.arange(B * T).reshape(B, T) % 32
    ids = (jnp.arange(B * T * 2).reshape(B, T, 2) * 5) % 7
    return tokens, ids


EXPECTED = {
    "embed": "adamw",
    "proj/kernel": "muon",
    "proj/bias": "adamw",
    "norm/scale": "adamw",
    "experts": "muon",
    "mix": "adamw",
    "table/table": "table",
    "head/kernel": "adamw",
}


def _flat(tree):
    return {
        "/".join(str(getattr(k, "key", k)) for k in p): v
        for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def test_labels_by_type_path_and_axes():
    labels = optim.param_labels(nnx.state(Small(nnx.Rngs(0)), nnx.Param))
    assert _flat(labels) == EXPECTED


def test_labels_of_the_real_model():
    model_mod = pytest.importorskip("engram_jax.model")
    from engram_jax.presets import get_preset

    cfg = get_preset("tiny")
    model = nnx.eval_shape(lambda: model_mod.EngramLM(cfg, rngs=nnx.Rngs(0), row_multiple=8))
    labels = _flat(optim.param_labels(nnx.state(model, nnx.Param)))
    tables = [k for k, v in labels.items() if v == "table"]
    assert tables and all(k.endswith("table/table") for k in tables)
    assert labels["embed"] == labels["head/kernel"] == labels["final_norm/scale"] == "adamw"
    muon = [k for k, v in labels.items() if v == "muon"]
    assert any(k.endswith("attn/wq/kernel") for k in muon)
    assert not any(k.endswith(("scale", "bias")) for k in muon)


def _state_kinds(tree) -> set[str]:
    """Type names of every optax state node (NamedTuples) anywhere in ``tree``."""
    kinds = set()

    def walk(x):
        if hasattr(x, "_fields"):
            kinds.add(type(x).__name__)
        children = (
            x.values()
            if hasattr(x, "values") and callable(x.values)
            else x
            if isinstance(x, (tuple, list))
            else ()
        )
        for c in children:
            walk(c)

    walk(tree)
    return kinds


def _table_shaped_leaves(tree, table_shape):
    return [x.shape for x in jax.tree.leaves(tree) if getattr(x, "shape", None) == table_shape]


def test_dense_path_one_step_changes_every_group():
    cfg = Config(engram=EngramConfig(sparse_update=False))
    model = Small(nnx.Rngs(0))
    before = jax.tree.map(jnp.copy, nnx.as_pure(nnx.state(model, nnx.Param)))
    wrt = optim.optimizer_filter(cfg)
    tx = optim.make_optimizer(cfg, 100, labels=optim.param_labels(nnx.state(model, wrt)))
    opt = nnx.Optimizer(model, tx, wrt=wrt)
    assert _table_shaped_leaves(nnx.as_pure(opt.opt_state), (24, 8))  # dense table moments
    nnx.jit(lambda m, o: o.update(m, nnx.grad(_loss)(m, *_data())))(model, opt)
    after = nnx.as_pure(nnx.state(model, nnx.Param))
    for name, b in _flat(before).items():
        assert not np.allclose(_flat(after)[name], b), f"{name} did not move"
    # each group's state is present: muon momentum, adamw and table moments
    assert {"MuonState", "ScaleByAdamState"} <= _state_kinds(nnx.as_pure(opt.opt_state))


def test_sparse_path_has_no_table_sized_state():
    cfg = Config()  # sparse_update=True by default
    model = Small(nnx.Rngs(0))
    wrt = optim.optimizer_filter(cfg)
    tx = optim.make_optimizer(cfg, 100, labels=optim.param_labels(nnx.state(model, wrt)))
    opt = nnx.Optimizer(model, tx, wrt=wrt)
    assert not _table_shaped_leaves(nnx.as_pure(opt.opt_state), (24, 8))
    table_before = jnp.copy(model.table.table[...])
    grad_fn = nnx.grad(_loss, argnums=nnx.DiffState(0, wrt))
    nnx.jit(lambda m, o: o.update(m, grad_fn(m, *_data())))(model, opt)
    np.testing.assert_array_equal(model.table.table[...], table_before)
    # even with tables in the tree, the sparse-path 'table' group keeps no state
    full = nnx.state(model, nnx.Param)
    tx_all = optim.make_optimizer(cfg, 100, labels=optim.param_labels(full))
    assert not _table_shaped_leaves(tx_all.init(nnx.as_pure(full)), (24, 8))


def test_labels_from_types_in_functional_style():
    cfg = Config(engram=EngramConfig(sparse_update=False))
    graphdef, params, rest = nnx.split(Small(nnx.Rngs(0)), nnx.Param, ...)
    tx = optim.make_optimizer(cfg, 100)  # labels from Variable types on each call
    state = tx.init(params)

    def loss(p):
        return _loss(nnx.merge(graphdef, p, rest), *_data())

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    new, _ = step(params, state)
    assert float(loss(new)) < float(loss(params))
    with pytest.raises(TypeError, match="Variable leaves"):
        jax.eval_shape(tx.update, nnx.as_pure(params), state, nnx.as_pure(params))


def test_clip_counts_table_sq_norm_like_one_global_clip():
    rng = np.random.default_rng(0)
    backbone = {"a": jnp.asarray(rng.normal(size=(3, 4))), "b": jnp.asarray(rng.normal(size=5))}
    table_grad = jnp.asarray(rng.normal(size=(6, 2)))
    joint, _ = optax.clip_by_global_norm(0.5).update({**backbone, "t": table_grad}, None)
    clip = optim.clip_by_global_norm_with_tables(0.5)
    mine, _ = clip.update(backbone, clip.init(backbone), table_sq_norm=jnp.sum(table_grad**2))
    for k in backbone:
        np.testing.assert_allclose(mine[k], joint[k], rtol=1e-6)
    off = optim.clip_by_global_norm_with_tables(0.0)
    same, _ = off.update(backbone, off.init(backbone), table_sq_norm=1e6)
    np.testing.assert_array_equal(same["a"], backbone["a"])


def test_without_muon_matrices_use_adamw():
    cfg = Config(optim=OptimConfig(use_muon=False))
    model = Small(nnx.Rngs(0))
    wrt = optim.optimizer_filter(cfg)
    tx = optim.make_optimizer(cfg, 100, labels=optim.param_labels(nnx.state(model, wrt)))
    state = tx.init(nnx.as_pure(nnx.state(model, wrt)))
    assert "MuonState" not in _state_kinds(state)


# Weight decay by role, for the real model (tiny preset): exactly these parameters are
# decayed (ENGRAM_SPEC section 5: decay on weight matrices; none on tables, norms, biases,
# mHC mixing parameters or the zero-initialized conv filter).
DECAYED_TINY = {
    "embed",
    "head/kernel",
    "blocks/N/attn/wq/kernel",
    "blocks/N/attn/wk/kernel",
    "blocks/N/attn/wv/kernel",
    "blocks/N/attn/wo/kernel",
    "blocks/N/ffn/w_gate/kernel",  # the leading dense block
    "blocks/N/ffn/w_up/kernel",
    "blocks/N/ffn/w_down/kernel",
    "blocks/N/ffn/router",
    "blocks/N/ffn/w_gate",  # routed expert stacks
    "blocks/N/ffn/w_up",
    "blocks/N/ffn/w_down",
    "blocks/N/ffn/shared/w_gate/kernel",
    "blocks/N/ffn/shared/w_up/kernel",
    "blocks/N/ffn/shared/w_down/kernel",
    "blocks/N/engram/key_kernel",
    "blocks/N/engram/value_kernel",
}


@pytest.mark.parametrize("use_muon", [True, False])
def test_weight_decay_hits_exactly_the_weight_matrices(use_muon):
    """With zero gradients only weight decay moves a parameter: the moved set is the list."""
    import re

    from engram_jax.model import EngramLM
    from engram_jax.presets import get_preset

    cfg = get_preset("tiny")
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, use_muon=use_muon))
    model = EngramLM(cfg, rngs=nnx.Rngs(0), row_multiple=8)
    params = nnx.state(model, optim.optimizer_filter(cfg))
    tx = optim.make_optimizer(cfg, 100)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    moved = set()
    for path, u in _flat(nnx.as_pure(updates)).items():
        if np.any(np.asarray(u) != 0):
            moved.add(re.sub(r"/\d+/", "/N/", path))
    assert moved == DECAYED_TINY
    every = {re.sub(r"/\d+/", "/N/", p) for p in _flat(nnx.as_pure(params))}
    # the ones the old ndim >= 2 rule decayed by mistake are present and untouched
    for name in ("engram/key_bias", "engram/conv_kernel", "attn_hc/res_bias", "attn_hc/phi"):
        assert f"blocks/N/{name}" in every - moved
    assert "blocks/N/engram/key_norm/scale" in every - moved


def test_decay_rule_by_path_names():
    assert optim.is_decayed(["blocks", "0", "attn", "wq", "kernel"])
    assert optim.is_decayed(["embed"])
    for names in (["final_norm", "scale"], ["x", "conv_kernel"], ["x", "key_bias"], ["hc", "phi"]):
        assert not optim.is_decayed(names)


PAPER_PRESETS = ("dense-4b", "moe-27b", "engram-27b", "engram-40b", "ablation-3b")


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_paper_presets_carry_the_paper_optimizer(name):
    """Spec section 5: base lr 4e-4 with step decay, weight decay 0.1; tables Adam lr x5."""
    from engram_jax.presets import get_preset

    cfg = get_preset(name)
    o, steps = cfg.optim, cfg.train.steps
    assert o.use_muon and o.lr == o.muon_lr == 4e-4 and o.weight_decay == 0.1
    lr = optim.learning_rate_schedule(o, steps)
    peak = o.warmup_steps + 10
    assert float(lr(peak)) == pytest.approx(4e-4)
    assert float(lr(int(0.85 * steps))) == pytest.approx(4e-4 * o.decay_factor)
    assert float(lr(steps - 1)) == pytest.approx(4e-4 * o.decay_factor**2)
    table_lr = optim.table_learning_rate_schedule(cfg, steps)
    assert float(table_lr(peak)) == pytest.approx(5 * 4e-4)


def test_consistent_rms_scales_muon_updates_to_the_requested_rms():
    """Moonlight's matching: update x sqrt(max(fan_in, fan_out)) x rms (vs Keller's width
    scaling sqrt(max(1, fan_out/fan_in)) = 1 for the 16 x 16 kernel): ratio exactly 16**0.5."""
    model = Small(nnx.Rngs(0))
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    key = iter(jax.random.split(jax.random.key(1), 64))
    grads = jax.tree.map(lambda x: jax.random.normal(next(key), x.shape), params)

    def proj_update(rms):
        o = OptimConfig(muon_lr=1.0, warmup_steps=0, weight_decay=0.0, grad_clip=0.0)
        cfg = Config(optim=dataclasses.replace(o, muon_consistent_rms=rms))
        tx = optim.make_optimizer(cfg, 100, labels=optim.param_labels(nnx.state(model, nnx.Param)))
        return _flat(tx.update(grads, tx.init(params), params)[0])["proj/kernel"]

    matched, width = proj_update(1.0), proj_update(0.0)
    np.testing.assert_allclose(matched, 4.0 * width, rtol=1e-5)
    assert float(jnp.sqrt(jnp.mean(matched**2))) == pytest.approx(1.0, rel=0.3)


@pytest.mark.parametrize("scan", [True, False])
def test_muon_newton_schulz_runs_as_one_scan_with_the_unrolled_values(scan):
    """With ``optim.muon_ns_scan`` the Newton-Schulz iterations are one lax.scan in the
    optimizer's program (one iteration compiled per parameter, not five) and give the unrolled
    iteration's update; without it (the default) the program is the unrolled one."""
    model = Small(nnx.Rngs(0))
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    key = iter(jax.random.split(jax.random.key(2), 64))
    grads = jax.tree.map(lambda x: jax.random.normal(next(key), x.shape), params)
    labels = optim.param_labels(nnx.state(model, nnx.Param))

    def update(cfg):
        tx = optim.make_optimizer(cfg, 100, labels=labels)
        fn = lambda g: tx.update(g, tx.init(params), params)[0]
        return _flat(fn(grads)), jax.jit(fn).lower(grads).as_text()

    cfg = override(Config(), [f"optim.muon_ns_scan={scan}"])
    scanned, scanned_text = update(cfg)
    # the oracle: optax's Muon with its default (unrolled) coefficients
    unrolled_coeffs = inspect.signature(optax.contrib.muon).parameters["ns_coeffs"].default
    assert len(np.shape(unrolled_coeffs)) == 1  # one triple: optax unrolls the iterations
    unrolled, unrolled_text = update(override(Config(), ["optim.muon_ns_scan=False"]))
    assert ("stablehlo.while" in scanned_text) == scan
    assert "stablehlo.while" not in unrolled_text
    for name in ("proj/kernel", "experts"):
        np.testing.assert_allclose(scanned[name], unrolled[name], rtol=1e-5, atol=1e-7)
