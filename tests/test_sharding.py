"""Mesh construction, the logical rule table, state placement and batch assembly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from engram_jax import sharding as shd
from engram_jax.config import MeshConfig
from engram_jax.engram import TableParam
from engram_jax.layers import LOGICAL_AXES, Linear, param


def test_mesh_shapes_8_and_1_devices():
    mesh = shd.make_mesh(MeshConfig())
    assert mesh.axis_names == shd.MESH_AXES
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    mesh = shd.make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    one = shd.make_mesh(MeshConfig(), devices=jax.devices()[:1])
    assert one.size == 1 and shd.shard_count_for_tables(one) == 1
    assert shd.shard_count_for_tables(mesh) == 8


@pytest.mark.parametrize(
    "cfg",
    [
        MeshConfig(data=3),
        MeshConfig(data=-1, tensor=3),
        MeshConfig(data=2, fsdp=2, expert=1, tensor=1),
    ],
)
def test_bad_mesh_sizes_raise(cfg):
    with pytest.raises(ValueError, match="devices"):
        shd.make_mesh(cfg)


def test_rule_table_to_partition_specs():
    assert shd.logical_to_spec(("batch", "seq", "embed")) == P(("data", "fsdp"))
    assert shd.logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert shd.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert shd.logical_to_spec(("expert", "embed", "mlp")) == P("expert", "fsdp", "tensor")
    assert shd.logical_to_spec(("table_rows", None)) == P(("data", "fsdp", "expert", "tensor"))
    assert shd.logical_to_spec((None, None)) == P()
    assert shd.logical_to_spec(("heads", "heads")) == P("tensor")  # an axis is used once
    with pytest.raises(ValueError, match="unknown logical axis"):
        shd.logical_to_spec(("batchh",))
    # every logical name the model may use has a rule
    for name in LOGICAL_AXES:
        shd.mesh_axes_for(name)


def test_spec_drops_non_dividing_axes_but_tables_must_divide():
    mesh = shd.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert shd.logical_to_spec(("embed", "mlp"), shape=(64, 6), mesh=mesh) == P("fsdp", "tensor")
    assert shd.logical_to_spec(("embed", "mlp"), shape=(3, 6), mesh=mesh) == P(None, "tensor")
    assert shd.logical_to_spec(("table_rows", None), shape=(16, 4), mesh=mesh) == P(shd.MESH_AXES)
    with pytest.raises(ValueError, match="multiple"):
        shd.logical_to_spec(("table_rows", None), shape=(12, 4), mesh=mesh)


class _Toy(nnx.Module):
    def __init__(self, rngs):
        self.embed = param(jnp.ones((16, 8)), ("vocab", "embed"))
        self.proj = Linear(8, 4, axes=("embed", "mlp"), rngs=rngs)
        self.table = param(jnp.arange(64.0).reshape(16, 4), ("table_rows", None), TableParam)
        self.bare_table = TableParam(jnp.zeros((24, 4)))  # no metadata: rows sharded by rule
        self.bare = nnx.Param(jnp.zeros((8, 8)))  # no metadata: replicated


def test_state_shardings_and_sharded_init():
    mesh = shd.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model = shd.sharded_init(mesh, lambda: _Toy(nnx.Rngs(0)))
    expected = {
        "embed": P("tensor", "fsdp"),
        "table": P(shd.MESH_AXES),
        "bare_table": P(shd.MESH_AXES),
        "bare": P(),
    }
    for name, spec in expected.items():
        _assert_spec(mesh, model.__dict__[name][...], spec)
    _assert_spec(mesh, model.proj.kernel[...], P("fsdp", "tensor"))
    np.testing.assert_array_equal(model.table[...], np.arange(64.0).reshape(16, 4))
    # an existing model's state placed by the same rule
    eager = nnx.state(_Toy(nnx.Rngs(0)))
    eager = jax.device_put(eager, shd.state_shardings(mesh, eager))
    _assert_spec(mesh, eager["table"][...], P(shd.MESH_AXES))


def test_optimizer_state_is_sharded_like_its_params():
    import optax

    mesh = shd.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model = shd.sharded_init(mesh, lambda: _Toy(nnx.Rngs(0)))
    opt = nnx.state(nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param))
    opt = jax.device_put(opt, shd.state_shardings(mesh, opt))
    adam_state = opt["opt_state"][0]
    _assert_spec(mesh, adam_state.mu["table"][...], P(shd.MESH_AXES))
    _assert_spec(mesh, adam_state.nu["embed"][...], P("tensor", "fsdp"))
    _assert_spec(mesh, adam_state.count[...], P())


def _assert_spec(mesh, x, spec):
    # jit drops size-1 mesh axes from specs; compare device layouts instead
    assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim), (x.sharding, spec)


def test_global_batch_from_local_single_process():
    mesh = shd.make_mesh(MeshConfig(data=4, tensor=2))
    assert shd.local_batch_size(mesh, 8) == 8
    local = {"tokens": np.arange(8 * 3).reshape(8, 3), "ids": np.zeros((8, 3, 2), np.int32)}
    batch = shd.global_batch_from_local(mesh, local)
    assert batch["tokens"].shape == (8, 3) and batch["ids"].shape == (8, 3, 2)
    assert batch["tokens"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(batch["tokens"], local["tokens"])
    with pytest.raises(ValueError, match="multiple"):
        shd.local_batch_size(mesh, 6)
