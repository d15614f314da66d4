"""Orbax checkpoints of a training run: model, optimizer, data iterator, config and step.

One Orbax ``CheckpointManager`` per workdir (``WORKDIR/checkpoints/<step>/``), asynchronous
saves, the last ``keep`` kept. Each checkpoint holds three items:

- ``state``: the training-state pytree (model params, optimizer state, table moments, step),
  saved with ``PyTreeSave`` so arrays are written sharded, each host writing its shards,
  WITHOUT zstd compression (Orbax's default): on float tables it saves few bytes and makes
  saves CPU-bound (measured in BENCHMARKS.md, checkpoint bandwidth).
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

Layout (this module owns it): the state is saved flat, each array under the dotted path of its
leaf (:func:`flatten`: ``params.blocks.0.attn.wq.kernel``, ``opt.1.inner_states...``,
``table_mu.1``, ``step``). Engram tables are at :func:`table_key` and written in row chunks of
about :data:`TABLE_CHUNK_BYTES`, so :class:`TableRows` (tensorstore) reads a few rows of a
training checkpoint without reading the table.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from engram_jax import paths

# Row chunks of saved tables: a row read touches about this many bytes per distinct chunk.
TABLE_CHUNK_BYTES = 1 << 20

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

    def __init__(
        self,
        workdir,
        *,
        keep: int = 3,
        async_save: bool = True,
        table_chunk_bytes: int = TABLE_CHUNK_BYTES,
    ):
        self.directory = paths.as_path(workdir) / "checkpoints"
        self.table_chunk_bytes = int(table_chunk_bytes)
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

        flat = flatten(state)
        items = dict(
            state=ocp.args.PyTreeSave(flat, save_args=_save_args(flat, self.table_chunk_bytes)),
            config=ocp.args.JsonSave(config_dict),
        )
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def state_dir(self, step: int):
        """The directory of checkpoint ``step``'s state arrays (an OCDBT store)."""
        return self.directory / str(step) / "state"

    def data_state_path(self, step: int):
        """This process's Grain iterator state in checkpoint ``step``: Grain writes one file per
        process, ``process_<i>-of-<n>.json``, so it exists only for the same process count."""
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        return self.directory / str(step) / "data" / name

    def has_data_state(self, step: int) -> bool:
        return self.data_state_path(step).exists()

    def restore(
        self, step: int, like: Any, data_iter: Any | None = None, *, partial: bool = False
    ) -> Any:
        """The state saved at ``step``, as the tree ``like`` (arrays or ShapeDtypeStructs,
        whose shardings the arrays are restored onto); the data iterator, if given, is restored
        in place. ``partial``: ``like`` names a subset of the saved arrays (e.g. the model
        without the optimizer state); only those are read."""
        import grain

        target = abstract_like(flatten(like))
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        items = dict(
            state=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=partial
            )
        )
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return unflatten(restored["state"], like)

    def table_rows(self, step: int, layer: int) -> TableRows:
        """Rows of layer ``layer``'s Engram table in checkpoint ``step``, read on demand."""
        return TableRows.open(self.state_dir(step), layer)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _key(path) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        else:  # FlattenedIndexKey
            parts.append(str(k.key))
    if parts and parts[-1] == "value":  # an NNX Variable's array
        parts.pop()
    return ".".join(parts)


def flatten(state: Any) -> dict[str, Any]:
    """The checkpoint form of a state pytree: a flat dict keyed by each leaf's dotted path
    (robust across NNX/optax pytree node types)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(state)
    flat = {_key(p): x for p, x in leaves}
    if len(flat) != len(leaves):
        raise ValueError("two leaves of the state have the same checkpoint key")
    return flat


def unflatten(flat: dict[str, Any], like: Any) -> Any:
    """Inverse of :func:`flatten`: ``flat``'s values in the tree structure of ``like``."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    return jax.tree_util.tree_unflatten(treedef, [flat[_key(p)] for p, _ in leaves])


def table_key(layer: int, *, sparse: bool = True) -> str:
    """Where layer ``layer``'s Engram table is saved: the ``tables`` group on the sparse path,
    among the ``params`` on the dense path."""
    return f"{'tables' if sparse else 'params'}.blocks.{layer}.engram.table.table"


def _is_table_key(key: str) -> bool:
    return key in (table_key(_layer(key)), table_key(_layer(key), sparse=False))


def _layer(key: str) -> int:
    parts = key.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else -1


def _save_args(flat: dict, chunk_bytes: int) -> dict:
    return {
        k: ocp.SaveArgs(chunk_byte_size=chunk_bytes) if _is_table_key(k) else ocp.SaveArgs()
        for k in flat
    }


def _kvstore(state_dir) -> dict:
    path = paths.as_path(state_dir)
    base = str(path) if not paths.is_local(path) else f"file://{path}"
    return {"driver": "ocdbt", "base": base}


def array_keys(state_dir) -> list[str]:
    """Names of the arrays saved in a checkpoint's state directory."""
    import tensorstore as ts

    kv = ts.KvStore.open(_kvstore(state_dir)).result()
    keys = [k.decode() for k in kv.list().result()]
    return sorted(k[: -len("/.zarray")] for k in keys if k.endswith("/.zarray"))


class TableRows:
    """One saved array opened with tensorstore: ``take`` reads only the chunks holding the
    requested rows (tables are saved in row chunks, see :data:`TABLE_CHUNK_BYTES`)."""

    def __init__(self, state_dir, key: str):
        import tensorstore as ts

        spec = {"driver": "zarr", "kvstore": dict(_kvstore(state_dir), path=key + "/")}
        self.array = ts.open(spec, open=True, read=True).result()
        self.shape = tuple(self.array.shape)
        self.key = key

    @classmethod
    def open(cls, state_dir, layer: int) -> TableRows:
        """Layer ``layer``'s table in ``state_dir`` (either path's layout)."""
        keys = set(array_keys(state_dir))
        for key in (table_key(layer), table_key(layer, sparse=False)):
            if key in keys:
                return cls(state_dir, key)
        raise FileNotFoundError(f"no Engram table of layer {layer} in {state_dir}")

    def take(self, ids_N) -> np.ndarray:
        ids_N = np.asarray(ids_N, np.int64)
        if ids_N.size == 0:
            return np.zeros((0,) + self.shape[1:], self.array.dtype.numpy_dtype)
        uniq, inv = np.unique(ids_N, return_inverse=True)  # tensorstore wants no repeats
        return self.array[uniq].read().result()[inv.reshape(-1)]


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: a restore target."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )
