"""Device mesh and THE logical -> mesh rule table.

Model code names logical axes only (``batch, seq, embed, heads, mlp, expert, vocab,
table_rows``, stored per parameter under the ``logical_axes`` metadata key, see
:mod:`engram_jax.layers`); this module is the only place that names mesh axes.

Mesh axes, outermost first: ``data`` (pure data parallelism), ``fsdp`` (data parallelism that
also shards parameters along ``embed``), ``expert`` (MoE experts), ``tensor`` (heads / MLP /
vocab). The batch is split over ``data x fsdp``; Engram tables are split by rows over EVERY
device (paper section 8: capacity grows linearly with the device count), so a table's padded
row count must be a multiple of :func:`shard_count_for_tables`.

Axis types are ``Auto``: XLA propagates shardings and the sparse table code in
:mod:`engram_jax.tables` uses ``jax.shard_map``. (``jax.make_mesh`` defaults to ``Explicit``,
where a plain gather on a sharded table raises ``ShardingTypeError``; see JAX_NOTES.)

Works with several processes: :func:`make_mesh` uses the global device list and
:func:`global_batch_from_local` assembles each process's share of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from engram_jax.config import MeshConfig
from engram_jax.engram import TableParam

MESH_AXES = ("data", "fsdp", "expert", "tensor")
AXES_KEY = "logical_axes"  # Variable metadata key, as in engram_jax.layers

# The one rule table. A logical axis maps to a mesh axis, a tuple of mesh axes, or None
# (replicated). A mesh axis is used at most once per array: a later dimension asking for an
# axis already taken stays replicated on it (e.g. activations [batch, seq, embed]: batch takes
# data+fsdp, so embed is not split again).
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("embed", "fsdp"),  # FSDP: parameters split along the model width
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("vocab", "tensor"),
    ("table_rows", MESH_AXES),  # Engram tables: rows over every device
    ("table_dim", None),  # row width d_head is small; never split
    ("layers", None),  # stacked (scanned) layers, if any
)
_RULES = dict(LOGICAL_RULES)


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A 4-axis mesh ``(data, fsdp, expert, tensor)`` over ``devices`` (default: all, globally).

    One size may be -1: it takes all remaining devices. The product must equal the number of
    devices, else ``ValueError``.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.expert, mesh_cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(
                f"mesh sizes {dict(zip(MESH_AXES, sizes))}: the fixed axes (product {known}) "
                f"do not divide the {n} devices"
            )
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(
            f"mesh sizes {dict(zip(MESH_AXES, sizes))} have product {math.prod(sizes)} but there "
            f"are {n} devices; the product must equal the device count (use -1 on one axis)"
        )
    return jax.make_mesh(
        tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def mesh_axes_for(logical: str | None) -> tuple[str, ...]:
    """Mesh axes of one logical axis name (empty tuple: replicated)."""
    if logical is None:
        return ()
    if logical not in _RULES:
        raise ValueError(f"unknown logical axis {logical!r}; known: {sorted(_RULES)}")
    target = _RULES[logical]
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    *,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> PartitionSpec:
    """PartitionSpec of an array whose dimensions carry ``logical_axes``.

    With ``shape`` and ``mesh``, a mesh axis whose size does not divide its dimension is dropped
    (that dimension stays replicated on it), except for ``table_rows``: a table that does not
    divide over all devices raises, because replicating it would be the bug to catch.
    """
    used: set[str] = set()
    spec = []
    for dim, logical in enumerate(logical_axes):
        axes = [a for a in mesh_axes_for(logical) if a not in used]
        if shape is not None and mesh is not None:
            if logical == "table_rows":
                count = math.prod(mesh.shape[a] for a in axes)
                if shape[dim] % count:
                    raise ValueError(
                        f"table rows {shape[dim]} are not a multiple of the table shard count "
                        f"{count}; pad rows to a multiple of shard_count_for_tables(mesh)"
                    )
            else:
                kept = []
                for a in axes:
                    if shape[dim] % (math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]) == 0:
                        kept.append(a)
                axes = kept
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def batch_axes() -> tuple[str, ...]:
    return mesh_axes_for("batch")


def constrain_batch(x: jax.Array) -> jax.Array:
    """Pin an activation's dimension 0 to the batch axes of the context mesh (``jax.set_mesh``;
    a no-op without one). Without it, FSDP-sharded weights can pull activations onto the
    ``embed`` split and XLA then runs attention on the whole global batch on every chip."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(batch_axes()) <= set(mesh.axis_names):
        return x
    axes = tuple(a for a in batch_axes() if mesh.shape[a] > 1)
    if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(axes))


def constrain_stacked(state: Any) -> Any:
    """Pin per-layer states stacked on a new leading axis (``layers``, replicated) to the
    sharding each Variable has unstacked, by the rule table, on the context mesh (a no-op
    without one): the scan over layers then slices one layer's shard per iteration."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return state

    def one(v):
        shape = np.shape(v.get_value())
        axes = v.get_metadata().get(AXES_KEY)
        axes = (None,) * (len(shape) - 1) if axes is None or len(axes) != len(shape) - 1 else axes
        spec = logical_to_spec(("layers", *axes), shape=shape, mesh=mesh)
        return v.replace(jax.lax.with_sharding_constraint(v.get_value(), spec))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def table_axes() -> tuple[str, ...]:
    return mesh_axes_for("table_rows")


def shard_count_for_tables(mesh: Mesh) -> int:
    """Number of row shards of every Engram table: pad table rows to a multiple of this."""
    return math.prod(mesh.shape[a] for a in table_axes())


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of batch arrays: leading dimension over ``data x fsdp``, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(batch_axes()))


def global_batch_from_local(mesh: Mesh, local_batch_tree: Any) -> Any:
    """Assemble global batch arrays from each process's local share (leading dimension).

    Every process passes the rows of the batch it loaded; the global batch is their
    concatenation in process order along dimension 0, sharded with :func:`data_sharding`. With
    one process this is a plain ``device_put``. Processes whose devices are replicas along
    ``expert``/``tensor`` hold the same batch shards and must pass identical data.
    """
    sharding = data_sharding(mesh)
    n_shards = math.prod(mesh.shape[a] for a in batch_axes())
    local_shards = _local_batch_shard_count(mesh)

    def put(x):
        x = np.asarray(x)
        if x.shape[0] % local_shards:
            raise ValueError(
                f"local batch {x.shape[0]} does not split over this process's "
                f"{local_shards} batch shards"
            )
        global_shape = (x.shape[0] // local_shards * n_shards,) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(put, local_batch_tree)


def check_batch_split(mesh: Mesh, global_batch_size: int) -> int:
    """The number of batch shards (mesh data x fsdp); ``ValueError`` naming
    ``train.batch_size`` unless the global batch splits evenly over them."""
    n_shards = math.prod(mesh.shape[a] for a in batch_axes())
    if global_batch_size % n_shards:
        raise ValueError(
            f"train.batch_size={global_batch_size} must be a multiple of the "
            f"{n_shards} batch shards of the mesh (data x fsdp)"
        )
    return n_shards


def local_batch_size(mesh: Mesh, global_batch_size: int) -> int:
    """Rows of the global batch this process must load."""
    n_shards = check_batch_split(mesh, global_batch_size)
    return global_batch_size // n_shards * _local_batch_shard_count(mesh)


def _local_batch_shard_count(mesh: Mesh) -> int:
    """Distinct (data, fsdp) coordinates among this process's devices."""
    idx = [mesh.axis_names.index(a) for a in batch_axes()]
    coords = set()
    pid = jax.process_index()
    for pos in np.ndindex(mesh.devices.shape):
        if mesh.devices[pos].process_index == pid:
            coords.add(tuple(pos[i] for i in idx))
    return len(coords)


# ---------------------------------------------------------------------------------------------
# NNX state placement


def variable_logical_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
    """Logical axes of a Variable: its ``logical_axes`` metadata, else by rule: Engram tables
    (``TableParam``) shard rows over all devices, everything else is replicated.

    Works for optimizer state too: ``nnx.Optimizer`` copies each parameter's metadata onto its
    moments, so moments are sharded like their parameters."""
    ndim = np.ndim(variable.get_value())
    axes = variable.get_metadata().get(AXES_KEY)
    if axes is not None and len(axes) == ndim:
        return tuple(axes)
    # no axes, or axes copied onto a value of another rank (optimizer-state scalars carry their
    # parameter's metadata): fall back to the rule below
    if _is_table(variable) and ndim == 2:
        return ("table_rows", None)
    return (None,) * ndim


def _is_table(variable: nnx.Variable) -> bool:
    return isinstance(variable, TableParam)


def state_shardings(mesh: Mesh, state: Any) -> Any:
    """The same tree as an NNX ``state`` (Variable leaves), each Variable holding the
    ``NamedSharding`` of its value: usable as jit ``out_shardings`` or for ``device_put``."""

    def one(v):
        if not isinstance(v, nnx.Variable):  # plain arrays in the tree: replicate
            return NamedSharding(mesh, PartitionSpec())
        shape = np.shape(v.get_value())
        spec = logical_to_spec(variable_logical_axes(v), shape=shape, mesh=mesh)
        return v.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def sharded_init(mesh: Mesh, make_model) -> nnx.Module:
    """Build ``make_model()`` directly sharded: each device materializes only its shards.

    ``make_model`` is a no-argument function returning the NNX module (e.g. a lambda over
    ``EngramLM(cfg, rngs=nnx.Rngs(seed), row_multiple=shard_count_for_tables(mesh))``).
    """
    abstract = nnx.eval_shape(make_model)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(mesh, abstract_state)

    @jax.jit
    def init():
        state = nnx.state(make_model())
        return jax.lax.with_sharding_constraint(state, shardings)

    return nnx.merge(graphdef, init())
