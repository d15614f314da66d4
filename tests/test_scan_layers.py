"""``model.scan_layers``: runs of blocks of one structure applied by one ``lax.scan``.

Oracle: the unrolled model (``scan_layers=False``) on the same per-block parameters. The
scanned model must give the same loss, gradients (float32 rounding), per-layer expert loads
and hidden states, and the real train step the same metrics and router-bias update.
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import global_batch, tiny_cfg, train_steps
from flax import nnx

from engram_jax import sharding as shd
from engram_jax.config import MeshConfig
from engram_jax.data import synthetic_batch
from engram_jax.layer_stack import block_runs
from engram_jax.model import EngramLM
from engram_jax.optim import make_optimizer
from engram_jax.step import cross_entropy

# 5 blocks: 0 dense, 1 MoE with Engram, 2-4 MoE without Engram (one scanned run of 3;
# mHC with 2 branches, so blocks 2 and 3 start from different pre-mappings)
SETS = ("model.n_layers=5", "engram.layer_ids=[1]", "model.hc_mult=2")


def _cfg(scan: bool, *sets):
    return tiny_cfg(*SETS, f"model.scan_layers={scan}", *sets)


def _layer_scans(jaxpr, h_shape) -> list[int]:
    """Trip counts of the scans (nested ones included) that carry a residual stream of shape
    ``h_shape``: scans over blocks (sinkhorn's loops carry [M, M, B, T] maps)."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            n = eqn.params["num_consts"]
            carry = eqn.invars[n : n + eqn.params["num_carry"]]
            if any(getattr(v.aval, "shape", None) == h_shape for v in carry):
                out.append(eqn.params["length"])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out += _layer_scans(sub, h_shape)
    return out


@pytest.mark.parametrize(
    "layer_ids, n_layers, expected",
    [
        ((1,), 5, [(0, 1), (1, 2), (2, 5)]),
        ((1, 3), 6, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 6)]),
        ((), 4, [(0, 1), (1, 4)]),
    ],
)
def test_runs_split_at_engram_and_dense_blocks(layer_ids, n_layers, expected):
    ids = "[" + ",".join(map(str, layer_ids)) + "]"
    sets = (f"model.n_layers={n_layers}", f"engram.layer_ids={ids}")
    assert block_runs(tiny_cfg(*sets, "model.scan_layers=true")) == expected
    assert block_runs(tiny_cfg(*sets)) == [(i, i + 1) for i in range(n_layers)]


def _loss_and_grads(graphdef, state, batch):
    params, rest = state

    def loss_fn(params):
        model = nnx.merge(graphdef, params, rest)
        logits, aux = model(batch["inputs"], engram_ids=batch["engram_ids"], collect=True)
        return cross_entropy(logits, batch["targets"]), aux

    fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, aux), grads = jax.jit(fn)(params)
    return loss, aux, grads, jax.make_jaxpr(fn)(params)


@pytest.mark.slow  # ~25-45 s: XLA CPU compiles of both programs
def test_scanned_model_equals_the_unrolled_one():
    """With remat (the paper presets' setting; the train-step test below runs without)."""
    remat = True
    cfg = _cfg(False, f"model.remat={remat}")
    model = EngramLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    scan_cfg = _cfg(True, f"model.remat={remat}")
    scan_def = nnx.split(nnx.eval_shape(lambda: EngramLM(scan_cfg, rngs=nnx.Rngs(0))))[0]
    batch = synthetic_batch(cfg, 0)
    ref = _loss_and_grads(graphdef, (params, rest), batch)
    got = _loss_and_grads(scan_def, (params, rest), batch)
    # the scanned program loops over the 3 MoE blocks (forward, and backward); the unrolled
    # one has no loop over blocks
    h_shape = ref[1]["hidden"][0].shape
    assert _layer_scans(got[3].jaxpr, h_shape)[:1] == [3] and not _layer_scans(
        ref[3].jaxpr, h_shape
    )
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
    assert got[1]["moe_loads"].keys() == ref[1]["moe_loads"].keys() == {1, 2, 3, 4}
    for i, load in ref[1]["moe_loads"].items():
        np.testing.assert_array_equal(got[1]["moe_loads"][i], load)
    for i, h in ref[1]["hidden"].items():
        np.testing.assert_allclose(got[1]["hidden"][i], h, rtol=1e-5, atol=1e-5)
    flat_ref = dict(nnx.to_flat_state(ref[2]))
    flat_got = dict(nnx.to_flat_state(got[2]))
    assert flat_got.keys() == flat_ref.keys()
    # float32 rounding differs (the scan's stacked weights, another fusion order): relative
    # to the largest gradient entry, as some leaves' gradients are ~1e-9 (saturated sigmoids)
    scale = max(float(np.abs(g[...]).max()) for g in flat_ref.values())
    for path, g in flat_ref.items():
        np.testing.assert_allclose(
            flat_got[path][...], g[...], rtol=1e-4, atol=1e-5 * scale, err_msg=str(path)
        )
    # the per-block pre-mappings differ (branch l mod 2), and each block's gradient is its own
    pre = [np.asarray(model.blocks[i].attn_hc.pre_bias[...]) for i in (2, 3)]
    assert not np.array_equal(*pre)


@pytest.mark.slow  # ~40-60 s: two train steps compiled on CPU
def test_scanned_train_step_matches_over_two_steps():
    """The real train step (sparse tables, Muon, router-bias update from the per-layer loads)
    on a 2-device mesh: same metrics at both steps and the same router biases after them."""
    mesh = shd.make_mesh(MeshConfig(data=2), jax.devices()[:2])
    out = []
    for scan in (False, True):
        cfg = _cfg(scan)
        batches = [global_batch(cfg, mesh, seed) for seed in (0, 1)]
        _, state, metrics = train_steps(cfg, mesh, batches)
        biases = {
            path: np.asarray(v[...])
            for path, v in nnx.to_flat_state(state["rest"])
            if path[-1] == "router_bias"
        }
        out.append((metrics, biases))
    (m_ref, b_ref), (m_got, b_got) = out
    for ref, got in zip(m_ref, m_got):
        assert got.keys() == ref.keys()
        for key in ref:
            np.testing.assert_allclose(got[key], ref[key], rtol=2e-5, err_msg=key)
    assert b_got.keys() == b_ref.keys() and len(b_ref) == 4
    for path, b in b_ref.items():
        np.testing.assert_allclose(b_got[path], b, atol=1e-7, err_msg=str(path))
        assert np.any(b != 0), path  # the update ran
    assert jnp.isfinite(m_got[-1]["loss"])


def _psum_layers(mesh, loops: tuple[int, ...]):
    """``x -> tanh(psum(x @ w_l))`` for every layer l: nested scans of ``loops`` trips, or
    (``loops=()``) the same 6 layers unrolled in Python. One all-reduce of [4, 8] float32 per
    layer."""
    from jax.sharding import PartitionSpec as P

    def layer(x, w):
        return jnp.tanh(jax.lax.psum(x @ w, "data"))

    def local(w_LxDxD, x):
        if not loops:
            for i in range(w_LxDxD.shape[0]):
                x = layer(x, w_LxDxD[i])
            return x

        def scan(x, w_IxDxD):
            return jax.lax.scan(lambda c, w: (layer(c, w), None), x, w_IxDxD)[0], None

        if len(loops) == 1:
            return scan(x, w_LxDxD)[0]
        return jax.lax.scan(scan, x, w_LxDxD.reshape(*loops, 8, 8))[0]

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P()), out_specs=P())


@pytest.mark.parametrize("loops", [(6,), (2, 3)])
def test_collectives_in_loop_bodies_count_once_per_trip(loops):
    from engram_jax import hlo

    mesh = shd.make_mesh(MeshConfig(data=2), jax.devices()[:2])
    args = (jnp.zeros((6, 8, 8)), jnp.zeros((4, 8)))
    unrolled = hlo.collectives(jax.jit(_psum_layers(mesh, ())).lower(*args).compile().as_text())
    looped = hlo.collectives(jax.jit(_psum_layers(mesh, loops)).lower(*args).compile().as_text())
    assert [c.count for c in unrolled] == [1] * 6 and all(c.op == "all-reduce" for c in looped)
    assert len(looped) == 1 and looped[0].count == 6 and looped[0].bytes == 4 * 8 * 4
    assert looped[0].step_bytes == sum(c.step_bytes for c in unrolled)


@pytest.mark.slow  # ~30-70 s: the optimizer of both trees compiled on CPU
def test_optimizer_on_stacked_runs_equals_the_per_block_one():
    """The optimizer state of scanned runs is stacked (one leaf per parameter of a run): two
    updates (Muon, AdamW with its decay mask, global-norm clip) equal the per-block ones, and
    every stacked leaf gets its blocks' group label and decay decision."""
    from engram_jax.layer_stack import scanned_runs, stack_runs, unstack_runs
    from engram_jax.optim import decay_mask, optimizer_filter, param_labels

    cfg = _cfg(True, "optim.muon_consistent_rms=0.2")
    runs = scanned_runs(cfg)
    assert runs == [(2, 5)]
    params = nnx.state(EngramLM(cfg, rngs=nnx.Rngs(0)), optimizer_filter(cfg))
    view = stack_runs(params, runs)
    labels, decay = dict(nnx.to_flat_state(param_labels(params))), decay_mask(params)
    decay = dict(nnx.to_flat_state(decay))
    for path, label in nnx.to_flat_state(param_labels(view)):
        if path[0] == "scanned_blocks":
            for i in range(2, 5):
                assert labels[("blocks", i, *path[2:])] == label, path
    for path, d in nnx.to_flat_state(decay_mask(view)):
        if path[0] == "scanned_blocks":
            assert decay[("blocks", 2, *path[2:])] == d, path
    tx = make_optimizer(cfg, cfg.train.steps)
    keys = iter(jax.random.split(jax.random.key(1), 1000))
    grads = [jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape), params) for _ in "ab"]

    @jax.jit
    def step(g, opt, p):
        u, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, u), opt

    ref_p, ref_s = params, tx.init(params)
    got_p, got_s = view, tx.init(view)
    for g in grads:
        ref_p, ref_s = step(g, ref_s, ref_p)
        got_p, got_s = step(stack_runs(g, runs), got_s, got_p)
    got = dict(nnx.to_flat_state(unstack_runs(got_p, params, runs)))
    for path, p in nnx.to_flat_state(ref_p):
        np.testing.assert_allclose(got[path][...], p[...], rtol=1e-5, atol=1e-6, err_msg=str(path))
    assert got[("blocks", 3, "ffn", "w_up")].get_metadata()["logical_axes"][0] == "expert"


def test_stacked_optimizer_state_is_sharded_like_its_blocks():
    from engram_jax.state import abstract_train_state

    mesh = shd.make_mesh(MeshConfig(data=1, fsdp=2), jax.devices()[:2])
    cfg = _cfg(True)
    tx = make_optimizer(cfg, cfg.train.steps)
    _, state = abstract_train_state(cfg, mesh, tx)
    params = dict(nnx.to_flat_state(state["params"]))
    moments = [
        (path, leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(state["opt"])[0]
        if any(getattr(k, "key", None) == "scanned_blocks" for k in path)
    ]
    assert moments
    for path, leaf in moments:
        names = [str(getattr(k, "key", getattr(k, "idx", ""))) for k in path]
        rest = tuple(n for n in names[names.index("scanned_blocks") + 2 :] if n != "")
        per_block = params[("blocks", 2, *rest)]
        assert leaf.shape == (3, *per_block.shape), names
        spec = tuple(per_block.sharding.spec) + (None,) * (
            per_block.ndim - len(per_block.sharding.spec)
        )
        got = tuple(leaf.sharding.spec) + (None,) * (leaf.ndim - len(leaf.sharding.spec))
        assert got == (None, *spec), names
