"""optim.muon_split: Muon run by matrix on each device (engram_jax.muon_split)."""

import jax
import numpy as np
import pytest
from conftest import global_batch, tiny_cfg, train_steps
from flax import nnx
from test_optim import Small, _flat

from engram_jax import hlo, optim
from engram_jax import sharding as shd
from engram_jax.config import Config, MeshConfig, override


def _updates(cfg, grads, params, labels, mesh=None):
    """Two optimizer updates (the second with the first's state) and the compiled program."""
    tx = optim.make_optimizer(cfg, 100, labels=labels)

    def two(g, p):
        st = tx.init(p)
        u1, st = tx.update(g, st, p)
        u2, st = tx.update(jax.tree.map(lambda x: 0.5 * x, g), st, p)
        return u1, u2, st

    if mesh is None:
        out = jax.jit(two)(grads, params)
        return [_flat(t) for t in out], ""
    placed = jax.device_put((grads, params), shd.state_shardings(mesh, (grads, params)))
    with jax.set_mesh(mesh):
        fn = jax.jit(two)
        out = fn(*placed)
        text = fn.lower(*placed).compile().as_text()
    return [_flat(t) for t in out], text


def test_each_device_runs_muon_on_whole_matrices_with_the_plain_values():
    """On a data 2 x fsdp 4 mesh the Muon matrices (a [16, 16] kernel and a [4, 16, 16] expert
    stack, split along their 16-wide embed axis over fsdp) are re-laid out by matrix over the
    4 fsdp devices (the kernel padded with 3 zero matrices): two updates and the momentum
    equal optax's Muon without a mesh (the oracle), and the compiled program moves the
    matrices with all-to-all and never gathers them onto every device."""
    model = Small(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    labels = optim.param_labels(params)
    key = iter(jax.random.split(jax.random.key(5), 64))
    grads = jax.tree.map(lambda x: jax.random.normal(next(key), x.shape), params)
    mesh = shd.make_mesh(MeshConfig(data=2, fsdp=4, expert=1, tensor=1))
    split_cfg = override(Config(), ["optim.muon_split=true", "optim.muon_ns_scan=true"])
    plain_cfg = override(Config(), ["optim.muon_ns_scan=true"])

    oracle, _ = _updates(plain_cfg, grads, params, labels)
    split, split_text = _updates(split_cfg, grads, params, labels, mesh)

    for want, got in zip(oracle, split, strict=True):
        assert want.keys() == got.keys()
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=2e-5, atol=2e-6, err_msg=name)
    assert any("experts" in k for k in oracle[2])  # the momentum of the stack was compared
    ops = {c.op for c in hlo.collectives(split_text)}
    assert "all-to-all" in ops and "all-gather" not in ops, hlo.summary(hlo.collectives(split_text))


def test_without_a_mesh_the_split_is_the_plain_update():
    """No mesh (one device): the wrapped Muon is optax's, bit for bit."""
    model = Small(nnx.Rngs(1))
    params = nnx.state(model, nnx.Param)
    labels = optim.param_labels(params)
    grads = jax.tree.map(lambda x: 0.1 * x + 0.01, params)
    plain, _ = _updates(override(Config(), []), grads, params, labels)
    split, _ = _updates(override(Config(), ["optim.muon_split=true"]), grads, params, labels)
    for want, got in zip(plain, split, strict=True):
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


@pytest.mark.slow  # ~1 min: two train steps compiled twice on CPU
def test_real_train_step_with_scanned_runs_matches_the_plain_muon():
    """The real train step (scanned run of 3 MoE blocks stacked for the optimizer, Engram,
    sparse tables) on a 4-device FSDP mesh, split Muon vs optax's Muon on the same mesh: the
    parameters after one step and the losses of two steps agree to float rounding. (Later
    parameters are not compared: AdamW's first steps are about sign(g), so rounding-sized
    differences of a near-zero gradient move a parameter by up to the learning rate.)"""
    mesh = shd.make_mesh(MeshConfig(data=1, fsdp=4), jax.devices()[:4])
    sets = ("model.n_layers=5", "engram.layer_ids=[1]", "model.scan_layers=true")
    out = []
    for split in (False, True):
        cfg = tiny_cfg(*sets, "optim.muon_ns_scan=true", f"optim.muon_split={split}")
        batches = [global_batch(cfg, mesh, seed) for seed in (0, 1)]
        _, state, _ = train_steps(cfg, mesh, batches[:1])
        params = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(state["params"])}
        _, _, metrics = train_steps(cfg, mesh, batches)
        out.append((params, [float(m["loss"]) for m in metrics]))
    (plain, plain_losses), (split, split_losses) = out
    assert plain.keys() == split.keys() and any(v.ndim == 3 for v in plain.values())
    for path, want in plain.items():
        np.testing.assert_allclose(split[path], want, rtol=1e-4, atol=1e-6, err_msg=str(path))
    np.testing.assert_allclose(split_losses, plain_losses, rtol=1e-5)
