"""Optimizer: global-norm clipping, then Muon / AdamW / table-Adam parameter groups.

ENGRAM_SPEC section 5: Muon for the backbone matrices, step-decayed lr, weight decay 0.1;
Engram tables use Adam with lr x ``table_lr_multiplier`` and no weight decay.

Groups (:func:`param_labels`, from each Variable's type, path and logical axes):
  ``table``  Engram tables (``engram.TableParam``);
  ``muon``   2-D backbone matrices with at least one model axis (embed/heads/mlp) in their
             ``logical_axes``: attention/MLP/Engram projections, MoE router, and 3-D routed
             expert stacks [expert, in, out] (one matrix per expert). Not the token
             embedding / LM head (a ``vocab`` axis), norm scales, biases, conv kernels, or
             matrices without model axes (mHC's small mixing maps, Engram's 3-D key kernel).
             (With ``use_muon=False`` this group runs AdamW.)
  ``adamw``  everything else.
Scanned blocks' parameters stacked on a leading ``layers`` axis for the optimizer
(:mod:`engram_jax.layer_stack`) are labelled as one block's (the layer axis is dropped first);
Muon treats every leading axis as a batch axis, so each layer's matrix is orthogonalized alone.

Weight decay (``optim.weight_decay``) applies to weight matrices only, decided by role (the
path's last name, :func:`is_decayed`), never by ndim: every ``muon``-group parameter (with
``use_muon=False`` that group runs AdamW with decay on all of it), and in the ``adamw`` group
the token embedding, the LM head and other ``kernel``s of linear maps (Engram's ``key_kernel``
W_K^(m)). Not decayed: norm scales, biases (incl. Engram ``key_bias``/``value_bias`` and mHC
``pre/post/res_bias``), mHC's ``phi`` and ``alpha`` (they parameterize the branch mixing,
whose identity/uniform balance decay would shift), the depthwise ``conv_kernel`` (initialized
to zero so the module starts as a gated lookup) and the tables (spec section 5: no decay).

Dense vs sparse tables (``EngramConfig.sparse_update``):
  dense   tables are ordinary leaves of the optax tree; ``table`` = ``optax.adam``.
  sparse  tables are left OUT of the optax tree: build the optimizer over
          ``nnx.state(model, optimizer_filter(cfg))`` (no tables), so the optax state holds no
          table-sized moments. Tables are updated by :func:`engram_jax.tables.sparse_tables_step`
          (row-wise Adam, moments kept by the caller). Should tables be passed anyway, the
          ``table`` group is ``optax.set_to_zero()``, which has no state.

Clipping. One global norm over everything that is trained, exactly as on the dense path: on
the sparse path the tables' share is the squared norm of their merged (dense-equivalent) row
gradients, computed by ``sparse_tables_step`` and passed to this optimizer's update as the
keyword ``table_sq_norm``; ``sparse_tables_step`` gets the backbone's squared norm
(``optax.tree.norm(grads, squared=True)``) as ``other_sq_norm``. Both sides then scale by the
same factor min(1, grad_clip / global_norm). ``grad_clip = 0`` disables clipping.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from optax.contrib import MuonDimensionNumbers

from engram_jax.config import Config, OptimConfig, default_decay_steps
from engram_jax.engram import TableParam
from engram_jax.muon_split import split_by_matrix
from engram_jax.tables import clip_scale

LABELS = ("muon", "adamw", "table")
_EMBED_NAMES = {
    "embed",
    "embedding",
    "embeddings",
    "tok_embed",
    "token_embed",
    "token_embedding",
    "wte",
    "lm_head",
    "head",
    "unembed",
    "output",
}
# Leaf names of weight matrices of linear maps (see the module docstring, "Weight decay").
_MATRIX_NAMES = {
    "kernel",
    "key_kernel",
    "value_kernel",
    "router",
    "w_up",
    "w_gate",
    "w_down",
}


# ---------------------------------------------------------------------------------------------
# Schedules


def decay_boundaries(optim_cfg: OptimConfig, total_steps: int) -> tuple[int, ...]:
    """Steps at which the lr is multiplied by ``decay_factor`` (default: 80% and 90%)."""
    if optim_cfg.decay_steps:
        return tuple(sorted(optim_cfg.decay_steps))
    return default_decay_steps(total_steps)


def learning_rate_schedule(
    optim_cfg: OptimConfig, total_steps: int, peak: float | None = None
) -> optax.Schedule:
    """Linear warmup then step decay; ``peak`` defaults to ``optim_cfg.lr``.

    lr(s) = peak * min(1, (s + 1) / warmup_steps) * decay_factor ** #{b in boundaries: s >= b},
    with s the 0-based step: the first step already has a nonzero lr and step warmup-1 reaches
    the peak.
    """
    peak = optim_cfg.lr if peak is None else peak
    warmup = optim_cfg.warmup_steps
    bounds = decay_boundaries(optim_cfg, total_steps)
    factor = optim_cfg.decay_factor

    def schedule(count):
        s = jnp.asarray(count, jnp.int32)
        warm = jnp.minimum(1.0, (s + 1).astype(jnp.float32) / warmup) if warmup else 1.0
        n = sum((s >= b).astype(jnp.int32) for b in bounds) if bounds else 0
        return peak * warm * jnp.power(jnp.float32(factor), n)

    return schedule


def table_learning_rate_schedule(cfg: Config, total_steps: int) -> optax.Schedule:
    """The AdamW schedule times ``engram.table_lr_multiplier``: the tables' lr per step."""
    base = learning_rate_schedule(cfg.optim, total_steps)
    return lambda count: base(count) * cfg.engram.table_lr_multiplier


# ---------------------------------------------------------------------------------------------
# Parameter groups


def _names(path) -> list[str]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    return out


def _is_table(v) -> bool:
    return isinstance(v, TableParam)


def _label(names: list[str], v: Any) -> str:
    if not isinstance(v, nnx.Variable):
        raise TypeError(
            f"param_labels needs Variable leaves (got {type(v).__name__} at {'/'.join(names)}): "
            "compute labels = param_labels(nnx.state(model, optimizer_filter(cfg))) and pass "
            "them to make_optimizer(..., labels=labels)"
        )
    if _is_table(v):
        return "table"
    shape = tuple(getattr(v.get_value(), "shape", ()))
    axes = v.get_metadata().get("logical_axes")
    if axes is not None and len(axes) == len(shape) and tuple(axes[:1]) == ("layers",):
        # scanned blocks stacked for the optimizer (engram_jax.layer_stack): one per layer
        shape, axes = shape[1:], tuple(axes)[1:]
    leaf = names[-1].lower() if names else ""
    lowered = [n.lower() for n in names]
    # [E, in, out] expert stacks are E matrices: Muon orthogonalizes each (axis 0 = batch)
    expert_stack = len(shape) == 3 and axes is not None and axes[0] == "expert"
    mat_axes = None if axes is None else tuple(axes)[-2:]
    not_matrix = (
        (len(shape) != 2 and not expert_stack)
        or min(shape[-2:], default=0) <= 1
        or (axes is not None and "vocab" in axes)  # token embedding / LM head
        or (mat_axes is not None and all(a is None for a in mat_axes))  # e.g. mHC mixing maps
        or any(n in _EMBED_NAMES for n in lowered)
        or leaf == "scale"
        or leaf.endswith("bias")
        or any("norm" in n or "conv" in n for n in lowered)
    )
    return "adamw" if not_matrix else "muon"


def is_decayed(names: list[str]) -> bool:
    """Whether an ``adamw``-group parameter at path ``names`` gets weight decay: a weight
    matrix (:data:`_MATRIX_NAMES`, or the token embedding / LM head), never a norm, bias,
    mHC mixing parameter, conv filter or table."""
    lowered = [n.lower() for n in names]
    leaf = lowered[-1] if lowered else ""
    if any("norm" in n for n in lowered) or leaf.endswith("bias"):
        return False
    return leaf in _MATRIX_NAMES or leaf in _EMBED_NAMES


def decay_mask(tree: Any) -> Any:
    """Boolean tree like ``tree`` (Variables or bare arrays): :func:`is_decayed` per path."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: is_decayed(_names(p)),
        tree,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def param_labels(params_state: Any) -> Any:
    """Group label per parameter: a tree like ``nnx.as_pure(params_state)`` of strings.

    ``params_state`` must keep its Variable leaves (e.g. ``nnx.state(model, nnx.Param)``): the
    table group is recognised by type, the others by path, shape and ``logical_axes``.
    """
    return jax.tree_util.tree_map_with_path(
        lambda p, v: _label(_names(p), v),
        params_state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def optimizer_filter(cfg: Config):
    """The NNX filter of the Variables optax trains: all Params on the dense path, all Params
    but the tables on the sparse path (use it for ``nnx.state``/``nnx.Optimizer(wrt=...)``
    and the gradient's ``DiffState``)."""
    from engram_jax.engram import TableParam

    if cfg.engram.sparse_update:
        return nnx.All(nnx.Param, nnx.Not(TableParam))
    return nnx.Param


# ---------------------------------------------------------------------------------------------
# The transform


def clip_by_global_norm_with_tables(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """``optax.clip_by_global_norm`` whose norm also counts ``table_sq_norm`` (a keyword of
    ``update``; default 0): the squared norm of table gradients handled outside optax."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, table_sq_norm=0.0, **extra_args):
        del params, extra_args
        if not max_norm:
            return updates, state
        scale = clip_scale(optax.tree.norm(updates, squared=True) + table_sq_norm, max_norm)
        return jax.tree.map(lambda u: u * scale.astype(u.dtype), updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _muon_dims(params: Any) -> Any:
    """Last two axes are (in, out); any leading axis (experts) is a batch axis."""
    return jax.tree.map(lambda x: MuonDimensionNumbers(jnp.ndim(x) - 2, jnp.ndim(x) - 1), params)


def _scanned_ns_coeffs() -> tuple:
    """optax's default Newton-Schulz coefficients once per iteration (``[ns_steps, 3]``).
    Given per iteration, optax runs the iterations as one ``lax.scan`` instead of unrolling
    them (same arithmetic): the compiled update holds one iteration per Muon parameter instead
    of five, and the TPU backend generates code for one (BENCHMARKS.md, TPU compile
    profile)."""
    sig = inspect.signature(optax.contrib.muon).parameters
    return (tuple(sig["ns_coeffs"].default),) * int(sig["ns_steps"].default)


def make_optimizer(
    cfg: Config, total_steps: int, labels: Any | Callable[[Any], Any] | None = None
) -> optax.GradientTransformationExtraArgs:
    """clip (global norm, ``table_sq_norm`` keyword) -> multi_transform{muon, adamw, table}.

    ``labels``: the label tree ``param_labels(nnx.state(model, optimizer_filter(cfg)))``.
    Pass it when using ``nnx.Optimizer``, which hands optax bare arrays (no Variable types).
    ``None`` computes labels on the fly from Variable types, which works when the trees given
    to ``init``/``update`` keep their Variable leaves (``nnx.split``-style functional code).
    """
    o = cfg.optim
    lr = learning_rate_schedule(o, total_steps)
    adamw = optax.adamw(
        lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask
    )
    if o.use_muon:
        muon = optax.contrib.muon(
            learning_rate_schedule(o, total_steps, peak=o.muon_lr),
            weight_decay=o.weight_decay,
            **({"ns_coeffs": _scanned_ns_coeffs()} if o.muon_ns_scan else {}),
            muon_weight_dimension_numbers=_muon_dims,
            consistent_rms=o.muon_consistent_rms or None,
        )
        if o.muon_split:
            muon = split_by_matrix(muon)
    else:  # the muon group holds weight matrices only: all decayed
        muon = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    if cfg.engram.sparse_update:
        table = optax.set_to_zero()
    else:
        table = optax.adam(
            table_learning_rate_schedule(cfg, total_steps), b1=o.b1, b2=o.b2, eps=o.eps
        )
    groups = optax.multi_transform(
        {"muon": muon, "adamw": adamw, "table": table}, param_labels if labels is None else labels
    )
    return optax.chain(clip_by_global_norm_with_tables(o.grad_clip), groups)
