"""Small Flax NNX building blocks shared by the Engram layer and the backbone.

Parameters are float32; each module computes in a chosen ``dtype`` (float32 or bfloat16).
Normalization statistics are always computed in float32.

Sharding: every parameter carries a tuple of LOGICAL axis names in its metadata under
``logical_axes`` (one entry per dimension, ``None`` = replicated), drawn from
:data:`LOGICAL_AXES`. Only ``engram_jax.sharding`` maps logical names to mesh axes. We do not
use ``nnx.with_partitioning`` / ``out_sharding`` here because Flax's eager sharding then
requires a mesh at construction time; ``logical_axes`` is inert metadata that works with no mesh.

Shape legend: B batch, T sequence, G groups (e.g. mHC branches), D normalized feature width,
I/O input/output features of a linear map.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

LOGICAL_AXES = ("batch", "seq", "embed", "heads", "mlp", "expert", "vocab", "table_rows")
AXES_KEY = "logical_axes"  # Variable metadata key holding the logical axis names

Axes = tuple[str | None, ...]


def logical_axes(variable: nnx.Variable) -> Axes | None:
    """The logical axis names of a Variable (``None`` if it was created without them)."""
    return variable.get_metadata().get(AXES_KEY)


def _check_axes(axes: Axes, shape: tuple[int, ...]) -> Axes:
    axes = tuple(axes)
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match parameter shape {shape}")
    bad = [a for a in axes if a is not None and a not in LOGICAL_AXES]
    if bad:
        raise ValueError(f"unknown logical axis names {bad}; allowed: {LOGICAL_AXES} or None")
    return axes


def param(value: jax.Array, axes: Axes, kind: type[nnx.Param] = nnx.Param) -> nnx.Param:
    """Wrap ``value`` (cast to float32) as a ``kind`` Variable annotated with logical axes."""
    return kind(jnp.asarray(value, jnp.float32), **{AXES_KEY: _check_axes(axes, value.shape)})


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """``x / sqrt(mean(x^2, -1) + eps) * scale`` in float32, returned in ``x.dtype``."""
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    scale = scale.astype(jnp.float32).reshape((1,) * (x.ndim - scale.ndim) + scale.shape)
    return (x32 * inv * scale).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a learnable scale (initialized to one).

    ``groups=G`` keeps G independent scales, shape [G, D], for inputs [..., G, D]: this is G
    separate RMSNorms (one per mHC branch) applied in one op.
    """

    def __init__(
        self,
        dim: int,
        eps: float = 1e-6,
        *,
        groups: int | None = None,
        axes: Axes | None = None,
        rngs: nnx.Rngs | None = None,
    ):
        del rngs  # deterministic init; accepted for a uniform constructor signature
        self.eps = float(eps)
        shape = (dim,) if groups is None else (groups, dim)
        if axes is None:
            axes = ("embed",) if groups is None else (None, "embed")
        self.scale = param(jnp.ones(shape), axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


class Linear(nnx.Module):
    """``y = x @ W (+ b)`` over the last axis; W is [I, O], LeCun-normal init, b zeros.

    ``axes`` are the logical names of W's two dimensions (the bias takes the second).
    The matmul runs in ``dtype`` (default: the input's dtype) with float32 parameters.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        axes: Axes = (None, None),
        dtype: Any = None,
        init_std: float | None = None,
        rngs: nnx.Rngs,
    ):
        std = in_features**-0.5 if init_std is None else init_std
        w_IxO = std * jax.random.normal(rngs.params(), (in_features, out_features), jnp.float32)
        self.kernel = param(w_IxO, axes)
        self.bias = param(jnp.zeros((out_features,)), axes[1:]) if use_bias else None
        self.dtype = None if dtype is None else jnp.dtype(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        y = jnp.einsum("...i,io->...o", x.astype(dtype), self.kernel[...].astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype).reshape((1,) * (y.ndim - 1) + (-1,))
        return y
