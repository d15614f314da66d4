"""Loading a finished or interrupted training run: its config, state, model and tokenizer.

Used by ``engram-jax eval``, ``generate`` and ``analyze``. Everything restores onto one device
(Orbax reshards the saved arrays onto the new mesh).
"""

from __future__ import annotations

import json
import os

import jax
from flax import nnx

from engram_jax import sharding as shd
from engram_jax.checkpoint import Checkpointer
from engram_jax.config import Config
from engram_jax.model import EngramLM
from engram_jax.optim import make_optimizer
from engram_jax.state import init_state
from engram_jax.step import make_eval_step
from engram_jax.train import evaluate


def load_state(workdir: str, step: int | None = None, *, mesh=None):
    """``(cfg, graphdef, state, step)`` of a workdir's checkpoint (latest by default)."""
    cfg_path = os.path.join(workdir, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{workdir} holds no training run (no config.json)")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = Config.from_dict(json.load(f))
    ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {ckpt.directory}")
    if mesh is None:
        mesh = shd.make_mesh(single_device_mesh_cfg(), jax.devices()[:1])
    tx = make_optimizer(cfg, cfg.train.steps)
    graphdef, state = init_state(cfg, mesh, tx)
    state = ckpt.restore(step, state)
    ckpt.close()
    return cfg, graphdef, state, step


def single_device_mesh_cfg():
    from engram_jax.config import MeshConfig

    return MeshConfig(data=1, fsdp=1, expert=1, tensor=1)


def load_model(workdir: str, step: int | None = None) -> tuple[Config, EngramLM]:
    """The trained model of a workdir (latest checkpoint), on one device."""
    cfg, graphdef, state, _ = load_state(workdir, step)
    return cfg, nnx.merge(graphdef, state["params"], state["tables"], state["rest"])


def run_tokenizer_path(workdir: str) -> str:
    """The SentencePiece model a run trained with."""
    path = os.path.join(workdir, "tokenizer.model")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is missing: the run's tokenizer is needed to tokenize other data the same way"
        )
    return path


def evaluate_workdir(workdir: str, *, data: str | None = None, batches: int | None = None) -> dict:
    """Validation loss of a workdir's latest checkpoint (on ``data`` if given)."""
    import dataclasses

    from engram_jax.data import build_data

    cfg, graphdef, state, step = load_state(workdir)
    if data is not None:  # other text, tokenized with the run's own tokenizer
        cfg = dataclasses.replace(
            cfg,
            data=dataclasses.replace(cfg.data, path=data, tokenizer=run_tokenizer_path(workdir)),
        )
    mesh = shd.make_mesh(single_device_mesh_cfg(), jax.devices()[:1])
    bundle = build_data(cfg, workdir)
    n = batches or cfg.train.eval_batches
    eval_fn = jax.jit(make_eval_step(cfg, graphdef))
    loss = evaluate(eval_fn, state, bundle.val_batches(n), mesh)
    return dict(
        workdir=os.path.abspath(workdir),
        step=step,
        val_loss=loss,
        batches=n,
        data=cfg.data.path or "<python stdlib>",
    )
