"""Muon with each device orthogonalizing its own matrices (``optim.muon_split``).

Under FSDP a weight matrix's momentum is split along one of its dimensions, so XLA runs
Muon's Newton-Schulz iterations with the Gram products all-reduced, and every chip
orthogonalizes every matrix: for engram-27b on 64 chips about half of the step's all-reduce
bytes and more FLOPs than the model (BENCHMARKS.md, TPU sections). Constraining the
shardings around optax's Muon did not change that (XLA kept the iterations replicated), so
:func:`split_by_matrix` runs the whole Muon update inside a ``shard_map`` over the mesh axes
of size > 1, on its inputs re-laid out by matrix: every leaf ``[..., m, n]`` of the
gradients, the parameters and the momentum becomes ``[N, m, n]`` (its matrices, zero-padded
to a multiple of the devices) split along that first axis, so each device holds whole
matrices and runs the ordinary update on them alone. A zero matrix stays zero (Newton-Schulz
divides it by its norm + eps), and the padding is cut on the way back.

Per matrix this is Muon's arithmetic; only the summation order of the products differs from
the FSDP-split program (float rounding). Without a mesh, or on one device, the wrapped Muon
runs unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

# the mesh axes that split weight matrices (engram_jax.sharding: embed over fsdp, heads/mlp over
# tensor); over the others (data, expert) a matrix is replicated and stays so
SPLIT_AXES = ("fsdp", "tensor")


def _pack(x: jax.Array, n: int) -> jax.Array:
    """``[..., m, k]`` -> ``[N', m, k]``: its matrices, zero-padded to a multiple of ``n``."""
    mats = x.reshape(-1, *x.shape[-2:])
    return jnp.pad(mats, ((0, -mats.shape[0] % n), (0, 0), (0, 0)))


def _unpack(y: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return y[: math.prod(shape[:-2])].reshape(shape)


def _matrix_leaves(state: Any, params_def: Any) -> list[bool]:
    """For each leaf of ``state``: is it in a parameter-shaped subtree (Muon's momentum) and a
    matrix? The step count and the Newton-Schulz coefficients are not."""
    is_params = lambda t: jax.tree.structure(t) == params_def  # noqa: E731
    flags = jax.tree.map(
        lambda t: jax.tree.map(lambda x: x.ndim >= 2, t) if is_params(t) else False,
        state,
        is_leaf=is_params,
    )
    return jax.tree.leaves(flags)


def _modes(leaves: list, split: list[bool], n: int) -> list[str | None]:
    """Per leaf: None (not a matrix: replicated in the shard_map), "rows" (split by matrix
    in, back split along its matrix's first axis: one all-to-all inside, so that the padding
    is cut on an unsplit axis; cut outside, GSPMD would gather the whole stack onto every
    device), or "mats" (the first axis does not divide: back split by matrix)."""
    return [
        None if not s else "rows" if x.shape[-2] % n == 0 else "mats"
        for x, s in zip(leaves, split, strict=True)
    ]


def _in_specs(modes, axes):
    return [P(axes) if m else P() for m in modes]


def _out_specs(modes, axes):
    return [P(None, axes) if m == "rows" else P(axes) if m else P() for m in modes]


def _to_rows(leaves, modes, axes):
    return [
        jax.lax.all_to_all(y, axes, 1, 0, tiled=True) if m == "rows" else y
        for y, m in zip(leaves, modes, strict=True)
    ]


def split_by_matrix(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` (optax's Muon) with each device updating whole matrices of its own."""

    def update_fn(updates, state, params=None):
        mesh = jax.sharding.get_abstract_mesh()
        axes = () if mesh.empty else tuple(a for a in SPLIT_AXES if mesh.shape.get(a, 1) > 1)
        if not axes:
            return inner.update(updates, state, params)
        n = math.prod(mesh.shape[a] for a in axes)
        u_leaves, u_def = jax.tree.flatten(updates)
        s_leaves, s_def = jax.tree.flatten(state)
        p_leaves = [] if params is None else jax.tree.leaves(params)
        u_modes = _modes(u_leaves, [x.ndim >= 2 for x in u_leaves], n)
        s_modes = _modes(s_leaves, _matrix_leaves(state, u_def), n)
        p_modes = u_modes[: len(p_leaves)]

        def body(u, s, p):
            out_u, out_s = inner.update(
                jax.tree.unflatten(u_def, u),
                jax.tree.unflatten(s_def, s),
                None if params is None else jax.tree.unflatten(u_def, p),
            )
            return (
                _to_rows(jax.tree.leaves(out_u), u_modes, axes),
                _to_rows(jax.tree.leaves(out_s), s_modes, axes),
            )

        def pack(leaves, modes):
            return [_pack(x, n) if m else x for x, m in zip(leaves, modes, strict=True)]

        out_u, out_s = jax.shard_map(
            body,
            in_specs=(_in_specs(u_modes, axes), _in_specs(s_modes, axes), _in_specs(p_modes, axes)),
            out_specs=(_out_specs(u_modes, axes), _out_specs(s_modes, axes)),
            check_vma=False,
        )(pack(u_leaves, u_modes), pack(s_leaves, s_modes), pack(p_leaves, p_modes))

        def unpack(leaves, like, modes):
            return [_unpack(y, x.shape) if m else y for y, x, m in zip(leaves, like, modes)]

        return (
            jax.tree.unflatten(u_def, unpack(out_u, u_leaves, u_modes)),
            jax.tree.unflatten(s_def, unpack(out_s, s_leaves, s_modes)),
        )

    return optax.GradientTransformation(inner.init, update_fn)
