"""A training run's directory, finished or running: the one owner of its files.

``WORKDIR/`` (a local path or ``gs://bucket/run``, see :mod:`engram_jax.paths`) holds

- ``config.json``: the run's :class:`~engram_jax.config.Config`;
- ``tokenizer.model``: the SentencePiece model the run tokenized with (the trainer publishes it;
  it is the only place loaders look);
- ``data/``: the token cache (tokenizers trained here, tokenized splits, the corpus manifest);
- ``checkpoints/<step>/``: Orbax checkpoints (:mod:`engram_jax.checkpoint`);
- ``metrics.jsonl``, ``tb/``: metrics (:mod:`engram_jax.metrics`); ``summary.json`` at the end.

:meth:`Workdir.load` restores a checkpoint into an abstract state, so loading for inference
builds neither random weights nor optimizer moments. Evaluation, generation, analysis and
sweeps load runs through here, never through the training loop.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, NamedTuple

import jax

from engram_jax import paths
from engram_jax.checkpoint import Checkpointer
from engram_jax.config import Config, MeshConfig


class Loaded(NamedTuple):
    """A restored checkpoint: the config, the model's static graph, the state, its step."""

    cfg: Config
    graphdef: Any
    state: dict
    step: int

    def model(self):
        from engram_jax.state import merge_model

        return merge_model(self.graphdef, self.state)


def single_device_mesh():
    from engram_jax import sharding as shd

    return shd.make_mesh(MeshConfig(data=1, fsdp=1, expert=1, tensor=1), jax.devices()[:1])


_CATCH_UP_KEYS = ("table_mu", "table_nu", "table_last", "step")


def exact_table_adam(cfg: Config) -> bool:
    """Whether the stored tables lag dense Adam (sparse path, exact Adam: rows are caught up
    when read, :mod:`engram_jax.catch_up`)."""
    return cfg.engram.enabled and cfg.engram.sparse_update and not cfg.engram.lazy_adam


def _caught_up(cfg: Config, state: dict) -> dict:
    """The model entries of ``state`` with every table row caught up; moments dropped."""
    from engram_jax.catch_up import catch_up_all
    from engram_jax.optim import table_learning_rate_schedule
    from engram_jax.state import set_tables, tables_by_layer

    lr_fn, o = table_learning_rate_schedule(cfg, cfg.train.steps), cfg.optim
    new = {}
    for i, t in tables_by_layer(state["tables"]).items():
        mu, nu, last = (state[k][i] for k in _CATCH_UP_KEYS[:3])
        new[i] = catch_up_all(t, mu, nu, last, state["step"], lr_fn, o.b1, o.b2, o.eps)[0]
    return dict(params=state["params"], tables=set_tables(state["tables"], new), rest=state["rest"])


class Workdir:
    """``Workdir(path)``: the files of the run in ``path`` (see the module docstring)."""

    def __init__(self, path):
        self.path = paths.as_path(path)
        self.config_file = self.path / "config.json"
        self.tokenizer_file = self.path / "tokenizer.model"
        self.metrics_file = self.path / "metrics.jsonl"
        self.summary_file = self.path / "summary.json"
        self.data_dir = self.path / "data"

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"Workdir({str(self.path)!r})"

    # -- config, summary, metrics -------------------------------------------------------------

    def read_config(self) -> Config | None:
        """The saved config, or None when the directory holds no run yet."""
        if not self.config_file.exists():
            return None
        return Config.from_dict(json.loads(self.config_file.read_text(encoding="utf-8")))

    @property
    def config(self) -> Config:
        cfg = self.read_config()
        if cfg is None:
            raise FileNotFoundError(f"{self.path} holds no training run (no config.json)")
        return cfg

    def write_config(self, cfg: Config) -> None:
        paths.write_text(self.config_file, json.dumps(cfg.to_dict(), indent=1, sort_keys=True))

    def read_summary(self) -> dict | None:
        if not self.summary_file.exists():
            return None
        return json.loads(self.summary_file.read_text(encoding="utf-8"))

    def write_summary(self, summary: dict) -> None:
        paths.write_text(self.summary_file, json.dumps(summary, indent=1))

    def metrics(self) -> list[dict]:
        """The records of ``metrics.jsonl`` (empty before the first log)."""
        if not self.metrics_file.exists():
            return []
        text = self.metrics_file.read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    # -- tokenizer and token cache ------------------------------------------------------------

    def tokenizer(self) -> str:
        """A local path of the run's SentencePiece model (copied from a remote workdir)."""
        if not self.tokenizer_file.exists():
            raise FileNotFoundError(
                f"{self.tokenizer_file} is missing: the run's tokenizer is needed to tokenize "
                "text the same way (copy the model the run trained with there)"
            )
        if paths.is_local(self.path):
            return str(self.tokenizer_file)
        local = paths.local_cache(self.path) / "tokenizer.model"
        paths.write_bytes(paths.as_path(local), self.tokenizer_file.read_bytes())
        return str(local)

    def publish_tokenizer(self, src) -> None:
        """Make ``src`` the run's tokenizer (``WORKDIR/tokenizer.model``)."""
        src = paths.as_path(src)
        if src != self.tokenizer_file:
            paths.write_bytes(self.tokenizer_file, src.read_bytes())

    def data_root(self) -> pathlib.Path:
        """The local directory whose ``data/`` holds the token cache (for
        :func:`engram_jax.data.build_data`): the workdir itself when local, else a local cache
        kept in step with ``WORKDIR/data`` by :meth:`pull_data` / :meth:`push_data`."""
        return paths.local_cache(self.path)

    def pull_data(self) -> list[str]:
        """Copy the workdir's token cache files missing locally (remote workdirs)."""
        if paths.is_local(self.path):
            return []
        return paths.copy_missing(self.data_dir, paths.as_path(self.data_root() / "data"))

    def push_data(self) -> list[str]:
        """Copy local token cache files the workdir lacks (remote workdirs)."""
        if paths.is_local(self.path):
            return []
        return paths.copy_missing(paths.as_path(self.data_root() / "data"), self.data_dir)

    # -- checkpoints --------------------------------------------------------------------------

    def checkpointer(self, keep: int | None = None) -> Checkpointer:
        keep = keep if keep is not None else self.config.train.keep_checkpoints
        return Checkpointer(self.path, keep=keep)

    def latest_step(self) -> int | None:
        ckpt = Checkpointer(self.path, keep=1)
        try:
            return ckpt.latest_step()
        finally:
            ckpt.close()

    def load(self, step: int | None = None, *, with_optimizer: bool = False, mesh=None) -> Loaded:
        """Restore checkpoint ``step`` (default: the latest complete one) onto ``mesh``
        (default: one device). ``with_optimizer``: the whole training state. Else the model
        (``params``, ``tables``, ``rest``) only, into the abstract state, nothing random built;
        with exact table Adam, the table rows are caught up to what dense Adam holds at that
        step (the values the trainer's eval reads), which also reads the table moments."""
        from engram_jax.optim import make_optimizer
        from engram_jax.state import MODEL_KEYS, abstract_train_state

        cfg = self.config
        mesh = mesh if mesh is not None else single_device_mesh()
        ckpt = self.checkpointer()
        try:
            step = ckpt.latest_step() if step is None else step
            if step is None:
                raise FileNotFoundError(f"no complete checkpoint in {ckpt.directory}")
            tx = make_optimizer(cfg, cfg.train.steps)
            graphdef, like = abstract_train_state(cfg, mesh, tx)
            if not with_optimizer:
                keep = set(MODEL_KEYS) | (set(_CATCH_UP_KEYS) if exact_table_adam(cfg) else set())
                like = {k: v for k, v in like.items() if k in keep}
            state = ckpt.restore(step, like, partial=not with_optimizer)
        finally:
            ckpt.close()
        if not with_optimizer and exact_table_adam(cfg):
            state = _caught_up(cfg, state)
        return Loaded(cfg, graphdef, state, step)

    def load_model(self, step: int | None = None):
        """``(cfg, model)``: the trained model of checkpoint ``step`` (latest), on one device."""
        loaded = self.load(step)
        return loaded.cfg, loaded.model()
