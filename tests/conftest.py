"""Test setup and shared fixtures.

- 8 fake CPU devices for sharding tests, XLA's backend at optimization level 0 (faster compiles),
  strict rank promotion, and a persistent XLA compilation cache for the session (subprocess runs
  of the CLI share compiled steps), deleted when the session ends unless the caller set
  JAX_COMPILATION_CACHE_DIR;
- :func:`tiny_cfg`: THE tiny config of the step-level tests (2 layers, d=32, 4 experts);
- :func:`global_batch`: a synthetic batch placed on a mesh; :func:`train_steps`: a fresh state
  trained a few steps by the trainer's step;
- ``step8``: the train step compiled once per session on 8 devices (tables row-sharded over
  all of them) exactly as the trainer compiles it, shared by the HLO, distributed and CLI
  training tests (the CLI runs train its config: :func:`cli_config_args`);
- ``cli_tokenizer``: the CLI runs' SentencePiece model, trained once per session.

Tiers: tests marked ``slow`` (pytest.ini) run the CLI in subprocesses or repeat, on other
configs, compiles that the fast tier already makes; ``-m "not slow"`` skips them. Each
pytest-xdist worker (pytest.ini) is a session of its own: its own cache and session fixtures.
"""

import atexit
import os
import shutil
import tempfile
import types

# Tests compile many small programs and run each briefly: XLA's backend at optimization level 0
# compiles them faster on CPU. Subprocesses inherit it, except the TPU compiles of
# test_tpu_compile, which must compile as a real run does.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}")
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


# The config of the shared 8-device step (``step8``): tables of 3000 rows per head, row-sharded
# 8 ways, 12 steps. The CLI training runs (cli_config_args) train this same config, so the
# persistent compilation cache gives them the program ``step8`` compiled.
STEP8_SETS = ("engram.engram_vocab_size=[3000,3000]", "train.steps=12")
# The CLI runs' corpus: a slice of the default corpus (Python's stdlib source).
CLI_DATA = ("data.max_bytes=400000",)


def cli_config_args(*sets) -> list[str]:
    """``engram-jax train`` arguments for ``tiny_cfg(*STEP8_SETS)`` on a slice of the default
    corpus (seconds per step on 2 cores), then ``sets``."""
    args = ["--preset", "tiny"]
    for s in (*TINY, *STEP8_SETS, *CLI_DATA, *sets):
        args += ["--set", s]
    return args


@pytest.fixture(scope="session")
def cli_tokenizer(tmp_path_factory) -> str:
    """The SentencePiece model ``engram-jax train`` trains for :func:`cli_config_args`'s corpus,
    trained once per test run (by the data pipeline itself); CLI runs take it with
    ``--set data.tokenizer=PATH`` instead of each training the same one again."""
    from engram_jax.data import build_data

    cfg = tiny_cfg(*STEP8_SETS, *CLI_DATA)
    return str(build_data(cfg, tmp_path_factory.mktemp("cli-tokenizer")).tokenizer_path)


def global_batch(cfg, mesh, seed=0):
    """:func:`engram_jax.data.synthetic_batch`, batch-sharded over ``mesh``."""
    from engram_jax import sharding as shd
    from engram_jax.data import synthetic_batch

    return shd.global_batch_from_local(mesh, synthetic_batch(cfg, seed))


def train_steps(cfg, mesh, batches):
    """A fresh train state of ``cfg`` on ``mesh`` trained by the trainer's step (jit, the state
    donated), one step per global batch of ``batches``: ``(graphdef, state, metrics)``, the
    metrics of each step on the host."""
    from engram_jax.optim import make_optimizer
    from engram_jax.state import init_state
    from engram_jax.step import make_train_step

    tx = make_optimizer(cfg, cfg.train.steps)
    graphdef, state = init_state(cfg, mesh, tx)
    step = jax.jit(make_train_step(cfg, graphdef, tx, mesh), donate_argnums=0)
    metrics = []
    with jax.set_mesh(mesh):
        for batch in batches:
            state, m = step(state, batch)
            metrics.append(jax.device_get(m))
    return graphdef, state, metrics


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


# What the CLI training runs log and save: every step logged, no evaluation, a checkpoint every 4.
CLI_RUN = ("train.log_every=1", "train.eval_every=0", "train.checkpoint_every=4")


@pytest.fixture(scope="session")
def cli_train_args(cli_tokenizer) -> list[str]:
    """``engram-jax train`` config arguments of the CLI runs: ``step8``'s config, ``CLI_RUN``,
    the session's tokenizer."""
    return cli_config_args(*CLI_RUN, f"data.tokenizer={cli_tokenizer}")


@pytest.fixture(scope="session")
def trained_run(cli_train_args, tmp_path_factory) -> str:
    """A workdir ``engram-jax train`` trained for 12 steps in this process (checkpoints at 4, 8
    and 12). Tests that write into a run copy it first."""
    from engram_jax.cli import main

    wd = str(tmp_path_factory.mktemp("trained-run") / "run")
    assert main(["train", *cli_train_args, "--steps", "12", "--workdir", wd, "--no-progress"]) == 0
    return wd
