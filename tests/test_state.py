"""The abstract training state equals the concrete one (shapes, dtypes, shardings) without
allocating, on one device and on meshes of 8 fake devices, sparse and dense paths."""

import jax
import pytest
from conftest import tiny_cfg

from engram_jax import sharding as shd
from engram_jax.config import MeshConfig
from engram_jax.optim import make_optimizer
from engram_jax.state import abstract_model_state, abstract_train_state, init_state


def _leaves(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


@pytest.mark.parametrize(
    "mesh_cfg, n, sets",
    [
        (MeshConfig(data=1), 1, []),
        (MeshConfig(data=2, fsdp=2, expert=2), 8, []),
        (MeshConfig(data=4, tensor=2), 8, ["engram.sparse_update=False"]),
    ],
)
def test_abstract_state_equals_concrete(mesh_cfg, n, sets):
    cfg = tiny_cfg("engram.engram_vocab_size=[500,500]", *sets)
    mesh = shd.make_mesh(mesh_cfg, jax.devices()[:n])
    tx = make_optimizer(cfg, cfg.train.steps)
    g_abs, abstract = abstract_train_state(cfg, mesh, tx)
    g_con, concrete = init_state(cfg, mesh, tx)
    assert g_abs == g_con
    a, c = _leaves(abstract), _leaves(concrete)
    assert [p for p, _ in a] == [p for p, _ in c]
    assert len(a) > 20 and all(isinstance(x, jax.ShapeDtypeStruct) for _, x in a)
    for (path, x), (_, y) in zip(a, c):
        where = jax.tree_util.keystr(path)
        assert (x.shape, x.dtype) == (y.shape, y.dtype), where
        assert x.sharding == y.sharding, where
    if n > 1:  # the tables are row-sharded, so the comparison can tell shardings apart
        assert any(not x.sharding.is_fully_replicated for _, x in a)

    g_model, model_only = abstract_model_state(cfg, mesh)
    assert set(model_only) == {"params", "tables", "rest"}
    for k in model_only:
        assert _leaves(model_only[k]) == _leaves(abstract[k])
