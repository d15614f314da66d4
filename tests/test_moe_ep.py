"""Expert-parallel MoE dispatch (``moe.dispatch="ep"``) on 8 fake CPU devices.

Oracle: the same MoE module (same weights) run with the single-program ``"capacity"`` and
``"ragged"`` dispatches, which never see a mesh. With ``capacity_factor`` >= the expert-axis
size no assignment can be dropped, so outputs, expert loads and gradients must agree. The
compiled program is checked to hold the all-to-alls, sized by the analytic volume, and no
collective carrying all experts' weights.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from engram_jax import hlo
from engram_jax import sharding as shd
from engram_jax.config import MeshConfig, MoEConfig
from engram_jax.moe import MoE

D, E, F, K = 16, 8, 24, 2


def make_moe(dispatch, capacity_factor=4.0):
    cfg = MoEConfig(
        n_routed_experts=E,
        n_shared_experts=1,
        top_k=K,
        expert_hidden=F,
        dispatch=dispatch,
        capacity_factor=capacity_factor,
    )
    moe = MoE(cfg, D, rngs=nnx.Rngs(0))
    moe.router_bias[...] = jnp.linspace(-0.05, 0.05, E)  # selection bias must be honoured
    return moe


def with_dispatch(moe, dispatch, capacity_factor=4.0):
    graphdef, state = nnx.split(moe)
    other = make_moe(dispatch, capacity_factor)
    nnx.update(other, state)
    return other


@pytest.fixture(scope="module")
def mesh():
    return shd.make_mesh(MeshConfig(data=2, expert=4), jax.devices()[:8])


def run(moe, x, mesh=None):
    def f(state, x):
        m = nnx.merge(graphdef, state)
        y, load = m(x)
        return y, load

    graphdef, state = nnx.split(moe)
    if mesh is None:
        return jax.jit(f)(state, x)
    state = jax.device_put(state, shd.state_shardings(mesh, state))
    x = jax.device_put(x, NamedSharding(mesh, PartitionSpec(shd.batch_axes())))
    with jax.set_mesh(mesh):
        return jax.jit(f)(state, x)


def tokens(b=4, t=16, seed=1):
    return jax.random.normal(jax.random.key(seed), (b, t, D), jnp.float32)


def test_ep_equals_single_program_dispatches(mesh):
    base = make_moe("capacity")
    x = tokens()
    y_cap, load_cap = run(base, x)
    y_rag, load_rag = run(with_dispatch(base, "ragged"), x)
    y_ep, load_ep = run(with_dispatch(base, "ep"), x, mesh)
    np.testing.assert_allclose(y_cap, y_rag, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y_ep), np.asarray(y_cap), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(load_ep, load_cap)
    assert int(load_ep.sum()) == x.shape[0] * x.shape[1] * K


def test_ep_gradients_match(mesh):
    base = make_moe("capacity")
    x = tokens(seed=2)

    def grads(moe, mesh=None):
        graphdef, *state = nnx.split(moe, nnx.Param, ...)

        def loss(params, rest, x):
            y, _ = nnx.merge(graphdef, params, rest)(x)
            return jnp.sum(jnp.sin(y))

        g = jax.grad(loss, argnums=(0, 2))
        if mesh is None:
            return jax.jit(g)(*state, x)
        with jax.set_mesh(mesh):
            return jax.jit(g)(*state, x)

    g_ref = grads(base)
    g_ep = grads(with_dispatch(base, "ep"), mesh)
    flat_ref = jax.tree.leaves(g_ref)
    flat_ep = jax.tree.leaves(g_ep)
    assert len(flat_ref) == len(flat_ep)
    for a, b in zip(flat_ref, flat_ep):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)


def test_ep_drops_only_beyond_capacity(mesh):
    """capacity_factor 0.25: each destination takes ceil(0.25*s*K/n) rows; the loads still
    count every assignment (as the "capacity" dispatch does) and the output differs."""
    base = make_moe("capacity")
    x = tokens(seed=3)
    y_full, _ = run(with_dispatch(base, "ep", 4.0), x, mesh)
    y_drop, load_drop = run(with_dispatch(base, "ep", 0.25), x, mesh)
    assert int(load_drop.sum()) == x.shape[0] * x.shape[1] * K
    assert not np.allclose(y_full, y_drop)


def test_ep_hlo_all_to_all_volume(mesh):
    """Forward: two all-to-alls of [n, C, D] rows (plus the int32 slot metadata) per device;
    no collective as large as all experts' weights."""
    moe = with_dispatch(make_moe("capacity"), "ep", 2.0)
    x = tokens()
    graphdef, state = nnx.split(moe)
    state = jax.device_put(state, shd.state_shardings(mesh, state))
    xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec(shd.batch_axes())))
    with jax.set_mesh(mesh):
        text = (
            jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0]).lower(state, xs).compile().as_text()
        )
    colls = hlo.collectives(text)
    n, shards = mesh.shape["expert"], mesh.shape["data"]
    s = x.shape[0] * x.shape[1] // (shards * n)
    cap = math.ceil(2.0 * s * K / n)
    a2a = [c for c in colls if c.op == "all-to-all"]
    rows = n * cap * D * 4  # float32 activations
    assert sum(c.bytes for c in a2a) == 2 * rows + n * cap * 4, hlo.summary(a2a)
    all_experts = 3 * E * D * F * 4
    assert all(c.bytes < all_experts for c in colls), hlo.summary(colls)


def test_ep_slots_per_destination_never_exceed_the_assignments(mesh):
    """capacity_factor 8 on 4 expert devices: ceil(8*s*K/4) = 2*s*K slots per destination,
    but a destination can only receive this device's s*K assignments: the buffers that go
    through the all-to-alls hold s*K rows each, and nothing is dropped."""
    base = make_moe("capacity")
    moe = with_dispatch(base, "ep", 8.0)
    x = tokens()
    graphdef, state = nnx.split(moe)
    state = jax.device_put(state, shd.state_shardings(mesh, state))
    xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec(shd.batch_axes())))
    with jax.set_mesh(mesh):
        fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
        text = fwd.lower(state, xs).compile().as_text()
        y_ep = fwd(state, xs)
    n, shards = mesh.shape["expert"], mesh.shape["data"]
    s = x.shape[0] * x.shape[1] // (shards * n)
    a2a = [c for c in hlo.collectives(text) if c.op == "all-to-all"]
    assert sum(c.bytes for c in a2a) == 2 * n * s * K * D * 4 + n * s * K * 4, hlo.summary(a2a)
    y_cap, _ = run(base, x)
    np.testing.assert_allclose(np.asarray(y_ep), np.asarray(y_cap), rtol=1e-5, atol=1e-5)


def test_ep_without_a_mesh_runs_every_expert_locally_dropless():
    """A model trained with "ep" and then called on its own (generation, analysis): no mesh
    context to split experts over, so the experts run here, as the dropless dispatches do."""
    base = make_moe("ragged")
    x = tokens()
    y_rag, load_rag = run(base, x)
    y_ep, load_ep = run(with_dispatch(base, "ep", capacity_factor=0.5), x)  # would drop on a mesh
    np.testing.assert_allclose(np.asarray(y_ep), np.asarray(y_rag), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(load_ep, load_rag)


@pytest.fixture(scope="module")
def fsdp_mesh():
    """Expert weights split over ``fsdp`` along ``embed`` as well as over ``expert``."""
    return shd.make_mesh(MeshConfig(data=1, fsdp=4, expert=2), jax.devices()[:8])


def sharded_grad(moe, mesh, x):
    """``(jitted grad of sum(sin(y)) w.r.t. the params and x, its arguments)``, the params
    placed by the rule table (FSDP-split on this mesh) and x batch-sharded."""
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

    def loss(params, rest, x):
        y, _ = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(jnp.sin(y))

    params = jax.device_put(params, shd.state_shardings(mesh, params))
    x = jax.device_put(x, NamedSharding(mesh, PartitionSpec(shd.batch_axes())))
    return jax.jit(jax.grad(loss, argnums=(0, 2))), (params, rest, x)


def test_ep_gradients_match_with_fsdp_split_weights(fsdp_mesh):
    base = make_moe("capacity")
    x = tokens(seed=4)
    graphdef, params, rest = nnx.split(base, nnx.Param, ...)
    g_ref = jax.grad(
        lambda p, x: jnp.sum(jnp.sin(nnx.merge(graphdef, p, rest)(x)[0])), argnums=(0, 1)
    )(params, x)
    grad, args = sharded_grad(with_dispatch(base, "ep"), fsdp_mesh, x)
    with jax.set_mesh(fsdp_mesh):
        g_ep = grad(*args)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_ep), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)


def test_ep_weight_gradients_are_reduce_scattered_not_all_reduced(fsdp_mesh):
    """Each device computes its local experts' weight gradients whole from its own tokens; the
    FSDP shards it stores need them summed over the fsdp axis and split: a reduce-scatter.
    An all-reduce of the whole local expert stack [E/n, D, F] (then sliced) moves twice the
    bytes and holds the whole gradient on every device (the TPU compile of moe-27b:
    BENCHMARKS.md, TPU profile)."""
    grad, args = sharded_grad(with_dispatch(make_moe("capacity"), "ep"), fsdp_mesh, tokens())
    with jax.set_mesh(fsdp_mesh):
        colls = hlo.collectives(grad.lower(*args).compile().as_text())
    stack = E // fsdp_mesh.shape["expert"] * D * F  # elements of one local expert stack

    def carrying_stacks(op):
        return [
            c for c in colls if c.op == op and any(math.prod(sh) == stack for _, sh in c.operands)
        ]

    assert not carrying_stacks("all-reduce"), hlo.summary(colls)
    scattered = sum(
        math.prod(sh) == stack for c in carrying_stacks("reduce-scatter") for _, sh in c.operands
    )
    assert scattered == 3, hlo.summary(colls)  # w_gate, w_up, w_down


def test_ep_config_is_validated():
    with pytest.raises(ValueError, match="dispatch"):
        dataclasses.replace(MoEConfig(), dispatch="bogus")


@pytest.mark.parametrize("interpret", [False, True])
def test_grouped_matmul_equals_per_group_products_with_gradients(interpret):
    """Rows in order by group (sizes [10, 0, 30], 24 rows in no group) times their group's
    matrix, zeros elsewhere; gradients of x and w. interpret=True runs the TPU (Pallas)
    kernel in the interpreter; the oracle is a dense product with a one-hot group mask."""
    from engram_jax.moe_ep import grouped_matmul

    k = jax.random.split(jax.random.key(0), 3)
    x_QxD, w_LxDxF = jax.random.normal(k[0], (64, 32)), jax.random.normal(k[1], (3, 32, 48))
    sizes_L = jnp.array([10, 0, 30], jnp.int32)
    ct_QxF = jax.random.normal(k[2], (64, 48))
    group_Q = np.repeat([0, 1, 2, 3], [10, 0, 30, 24])  # 3 = no group
    onehot_QxL = jnp.asarray(group_Q[:, None] == np.arange(3), jnp.float32)

    def oracle(x_QxD, w_LxDxF):
        return jnp.einsum("qd,ldf,ql->qf", x_QxD, w_LxDxF, onehot_QxL)

    def got(x_QxD, w_LxDxF):
        return grouped_matmul(x_QxD, w_LxDxF, sizes_L, interpret=interpret)

    np.testing.assert_allclose(got(x_QxD, w_LxDxF), oracle(x_QxD, w_LxDxF), atol=1e-4)

    def grad(f):
        return jax.grad(lambda x_QxD, w_LxDxF: jnp.sum(f(x_QxD, w_LxDxF) * ct_QxF), (0, 1))

    for g, o in zip(grad(got)(x_QxD, w_LxDxF), grad(oracle)(x_QxD, w_LxDxF)):
        np.testing.assert_allclose(g, o, atol=1e-3)
