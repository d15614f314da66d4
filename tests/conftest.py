"""Test setup and shared fixtures.

- 8 fake CPU devices for sharding tests, strict rank promotion, and a persistent XLA
  compilation cache for the session (subprocess runs of the CLI share compiled steps), deleted
  when the session ends unless the caller set JAX_COMPILATION_CACHE_DIR;
- :func:`tiny_cfg`: THE tiny config of the step-level tests (2 layers, d=32, 4 experts);
- :func:`global_batch`: a synthetic batch placed on a mesh;
- ``step8``: the train step compiled once per session on 8 devices (tables row-sharded over
  all of them) exactly as the trainer compiles it, shared by the HLO and distributed tests.

Tiers: tests marked ``slow`` (pytest.ini) run the CLI in subprocesses; ``-m "not slow"`` skips
them.
"""

import atexit
import os
import shutil
import tempfile
import types

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="engram-jax-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

TINY = [
    "model.d_model=32",
    "model.head_dim=16",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.n_layers=2",
    "model.vocab_size=512",
    "model.dense_hidden=64",
    "moe.expert_hidden=32",
    "moe.n_routed_experts=4",
    "engram.n_embed_per_ngram=16",
    "train.batch_size=8",
    "train.seq_len=16",
    "optim.warmup_steps=2",
    "train.steps=10",
]


def tiny_cfg(*sets):
    """The tiny preset shrunk further (``TINY``), then ``sets`` (``--set`` syntax)."""
    from engram_jax.config import override
    from engram_jax.presets import get_preset

    return override(get_preset("tiny"), [*TINY, *sets])


def cli_config_args(*sets) -> list[str]:
    """``engram-jax train`` arguments for :func:`tiny_cfg`'s config on a slice of the default
    corpus (seconds per step on 2 cores), then ``sets``."""
    args = ["--preset", "tiny"]
    for s in (*TINY, "engram.engram_vocab_size=[500,500]", "data.max_bytes=400000", *sets):
        args += ["--set", s]
    return args


def global_batch(cfg, mesh, seed=0):
    """:func:`engram_jax.data.synthetic_batch`, batch-sharded over ``mesh``."""
    from engram_jax import sharding as shd
    from engram_jax.data import synthetic_batch

    return shd.global_batch_from_local(mesh, synthetic_batch(cfg, seed))


# The config of the shared 8-device step: tables of 3000 rows per head, row-sharded 8 ways.
STEP8_SETS = ("engram.engram_vocab_size=[3000,3000]",)


@pytest.fixture(scope="session")
def mesh8():
    from engram_jax import sharding as shd
    from engram_jax.config import MeshConfig

    return shd.make_mesh(MeshConfig(data=8), jax.devices()[:8])


@pytest.fixture(scope="session")
def step8(mesh8):
    """``cfg, mesh, tx, graphdef, state, batch, compiled``: the train step of
    ``tiny_cfg(*STEP8_SETS)`` compiled for ``state`` and ``batch`` (not run: ``state`` is intact;
    the executable donates the state it is given)."""
    from engram_jax.optim import make_optimizer
    from engram_jax.state import init_state
    from engram_jax.step import compile_train_step

    cfg = tiny_cfg(*STEP8_SETS)
    tx = make_optimizer(cfg, cfg.train.steps)
    graphdef, state = init_state(cfg, mesh8, tx)
    batch = global_batch(cfg, mesh8)
    compiled = compile_train_step(cfg, graphdef, tx, mesh8, state, batch)
    return types.SimpleNamespace(
        cfg=cfg, mesh=mesh8, tx=tx, graphdef=graphdef, state=state, batch=batch, compiled=compiled
    )
