"""Orbax checkpoints of a training run: model, optimizer, data iterator, config and step.

One Orbax ``CheckpointManager`` per workdir (``WORKDIR/checkpoints/<step>/``), asynchronous
saves, the last ``keep`` kept. Each checkpoint holds three items:

- ``state``: the training-state pytree (model params, optimizer state, table moments, step),
  saved with ``PyTreeSave`` so arrays are written sharded, each host writing its shards,
  WITHOUT zstd compression (Orbax's default): on float tables it saved ~8% of the bytes and
  made saves CPU-bound, 5x slower on 2 cores (BENCHMARKS.md, checkpoint bandwidth).
  Checkpoints written compressed still restore;
- ``data``: the Grain iterator state (``grain.checkpoint.CheckpointSave``), so a resumed run
  sees exactly the batches the uninterrupted run would;
- ``config``: the run's :class:`~engram_jax.config.Config` as JSON.

Several processes: every process calls ``save``/``restore``; Orbax writes each array's shards
from the process that holds them, and Grain writes one iterator file per process
(``data/process_<i>-of-<n>.json``). Arrays restore onto any mesh and process count. The
iterator state only restores with the same process count (:meth:`Checkpointer.has_data_state`);
otherwise :func:`engram_jax.train.train` restores the arrays only and seeks a fresh iterator to
the checkpoint's step: the pipeline is a shuffled ``MapDataset`` whose element i is global batch
i whatever the process count, so the resumed run reads exactly the batches it would have.

A process killed during an async save leaves ``<step>.orbax-checkpoint-tmp*``; Orbax ignores
those, so ``latest_step()`` is always a complete checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

# Config keys that may differ between a run and its resumption: the run's length and lr decay
# boundaries (extending a run), logging/eval/checkpoint cadence, input workers, the mesh.
RESUMABLE_KEYS = {
    "train.steps",
    "optim.decay_steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "data.prefetch",
    "data.worker_count",
    "mesh.data",
    "mesh.fsdp",
    "mesh.expert",
    "mesh.tensor",
    "name",
}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def config_mismatch(saved: dict, current: dict) -> list[str]:
    """Keys whose values differ in a way that makes resuming meaningless."""
    a, b = _flatten(saved), _flatten(current)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if k not in RESUMABLE_KEYS and a.get(k) != b.get(k)]


def _item_handlers() -> dict:
    import grain

    return {
        "state": ocp.PyTreeCheckpointHandler(use_compression=False),
        "config": ocp.JsonCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
    }


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` naming the three items of a run."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=_item_handlers()
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iter: Any | None, config_dict: dict) -> bool:
        """Start an asynchronous save of ``state`` (any pytree of arrays, stored in its
        :func:`flatten` form), the iterator position and the config."""
        import grain

        items = dict(
            state=ocp.args.PyTreeSave(flatten(state)), config=ocp.args.JsonSave(config_dict)
        )
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def data_state_path(self, step: int) -> str:
        """This process's Grain iterator state in checkpoint ``step``: Grain writes one file per
        process, ``process_<i>-of-<n>.json``, so it exists only for the same process count."""
        return os.path.join(
            self.directory,
            str(step),
            "data",
            f"process_{jax.process_index()}-of-{jax.process_count()}.json",
        )

    def has_data_state(self, step: int) -> bool:
        return os.path.exists(self.data_state_path(step))

    def restore(self, step: int, like: Any, data_iter: Any | None = None) -> Any:
        """The state saved at ``step``, as the tree ``like`` (arrays or ShapeDtypeStructs,
        whose shardings the arrays are restored onto); the data iterator, if given, is restored
        in place."""
        import grain

        target = abstract_like(flatten(like))
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        items = dict(state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return unflatten(restored["state"], like)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def flatten(state: Any) -> dict[str, Any]:
    """The checkpoint form of a state pytree: a flat dict keyed by each leaf's path string
    (robust across NNX/optax pytree node types)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(state)
    return {jax.tree_util.keystr(p): x for p, x in leaves}


def unflatten(flat: dict[str, Any], like: Any) -> Any:
    """Inverse of :func:`flatten`: ``flat``'s values in the tree structure of ``like``."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    return jax.tree_util.tree_unflatten(treedef, [flat[jax.tree_util.keystr(p)] for p, _ in paths])


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: a restore target."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )
