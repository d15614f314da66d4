"""Parameter accounting (ENGRAM_SPEC section 6), analytic from the config alone.

``count_params(cfg)`` mirrors the modules exactly (``tests/test_params.py`` checks it against
the real ``nnx.Param`` sizes, built or via ``nnx.eval_shape``):

- ``total`` = P_tot: every trainable parameter except the token embedding and the LM head
  (Engram tables included; the router bias is state, not a parameter, and is excluded);
- ``activated`` = P_act: what one token touches: attention, norms, mHC, dense FFNs, shared
  experts, ``top_k`` routed experts, the router, Engram projections/norms/conv, and the
  Engram rows it retrieves (``n_hash_heads * d_head`` per Engram layer, not the table);
- ``sparse`` = total - activated (unselected experts + unretrieved rows);
- ``engram`` = table parameters (real prime sizes from ``hashing.table_sizes``);
- ``rho`` = routed_sparse / sparse, routed_sparse = (E - top_k) * expert * n_moe_layers;
- ``total_with_embedding`` = total + the input embedding: the convention of the paper's
  Table of totals (Dense-4B 4.1B vs 3.8B activated differ by exactly one 129,280 x 2,560
  embedding, 0.33B; see ``presets.py``);
- ``breakdown``: per component (also embedding and lm_head, outside ``total``).
"""

from __future__ import annotations

import math

from flax import nnx

from engram_jax.attention import attention_params
from engram_jax.config import Config, EngramConfig
from engram_jax.hyper import hyper_params
from engram_jax.moe import RouterBias, moe_params

COMPONENTS = (
    "attention",
    "norms",
    "mhc",
    "dense_ffn",
    "shared_experts",
    "routed_experts",
    "router",
    "engram_fusion",
    "engram_tables",
)
OUTSIDE = ("embedding", "lm_head")  # excluded from P_tot


def engram_fusion_params(cfg: EngramConfig, d_model: int, hc_mult: int) -> int:
    """Non-table parameters of one Engram layer (mirrors ``engram.Engram``)."""
    g = hc_mult if cfg.multi_branch else 1
    n = cfg.d_mem * d_model + d_model  # W_V, b_V
    if cfg.use_gating:
        n += cfg.d_mem * g * d_model + 3 * g * d_model  # W_K^(m), b_K^(m), key/query norms
    if cfg.use_short_conv:
        n += g * d_model + cfg.kernel_size * g * d_model  # conv norm, conv kernel
    return n


def engram_table_rows(cfg: EngramConfig, row_multiple: int = 1) -> dict[int, int]:
    """Rows of every Engram layer's flat table (sum of its prime head sizes, padded)."""
    from engram_jax.hashing import table_sizes

    out = {}
    for layer, sizes in table_sizes(cfg).items():
        rows = sum(sum(order) for order in sizes)
        out[layer] = -(-rows // row_multiple) * row_multiple
    return out


def count_params(cfg: Config, row_multiple: int = 1) -> dict:
    """Analytic parameter counts; see the module docstring for the keys."""
    m, e = cfg.model, cfg.engram
    d, n_moe = m.d_model, m.n_layers - m.n_dense_layers
    moe = moe_params(cfg.moe, d)
    b = dict.fromkeys(OUTSIDE + COMPONENTS, 0)
    b["embedding"] = m.vocab_size * d
    b["lm_head"] = 0 if m.tie_embeddings else d * m.vocab_size
    b["attention"] = m.n_layers * attention_params(m)
    b["norms"] = (2 * m.n_layers + 1) * d
    b["mhc"] = 2 * m.n_layers * hyper_params(d, m.hc_mult, m.hc_dynamic)
    b["dense_ffn"] = m.n_dense_layers * 3 * d * m.dense_hidden
    b["shared_experts"] = n_moe * moe["shared_experts"]
    b["routed_experts"] = n_moe * moe["routed_experts"]
    b["router"] = n_moe * moe["router"]
    rows = engram_table_rows(e, row_multiple) if e.enabled else {}
    b["engram_fusion"] = len(rows) * engram_fusion_params(e, d, m.hc_mult)
    b["engram_tables"] = sum(rows.values()) * e.d_head
    total = sum(b[k] for k in COMPONENTS)
    activated = (
        total
        - b["routed_experts"]
        - b["engram_tables"]
        + n_moe * cfg.moe.top_k * moe["expert"]
        + len(rows) * e.n_hash_heads * e.d_head
    )
    sparse = total - activated
    routed_sparse = (cfg.moe.n_routed_experts - cfg.moe.top_k) * moe["expert"] * n_moe
    return {
        "total": total,
        "activated": activated,
        "sparse": sparse,
        "engram": b["engram_tables"],
        "rho": routed_sparse / sparse if sparse else 1.0,
        "routed_sparse": routed_sparse,
        "total_with_embedding": total + b["embedding"],
        "breakdown": b,
    }


def _category(path: tuple, var: nnx.Variable) -> str:
    from engram_jax.engram import TableParam

    names = [str(p) for p in path]
    if isinstance(var, TableParam):
        return "engram_tables"
    if names[0] in ("embed", "head"):
        return {"embed": "embedding", "head": "lm_head"}[names[0]]
    if names[0] == "final_norm":
        return "norms"
    part = names[2]  # ("blocks", i, <sublayer>, ...)
    if part == "engram":
        return "engram_fusion"
    if part in ("attn_hc", "ffn_hc"):
        return "mhc"
    if part in ("attn_norm", "ffn_norm"):
        return "norms"
    if part == "attn":
        return "attention"
    if names[3] == "shared":
        return "shared_experts"
    if names[3] == "router":
        return "router"
    if names[3] in ("w_gate", "w_up", "w_down") and len(names) == 4:
        return "routed_experts"
    return "dense_ffn"


def count_module_params(model) -> dict:
    """Actual ``nnx.Param`` sizes of an ``EngramLM`` (real or from ``nnx.eval_shape``) per
    component (keys as ``count_params(cfg)["breakdown"]``) plus ``total`` (P_tot).
    ``RouterBias`` is not a Param and does not appear."""
    out = dict.fromkeys(OUTSIDE + COMPONENTS, 0)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        assert not isinstance(var, RouterBias)
        out[_category(path, var)] += math.prod(var.shape)
    out["total"] = sum(out[k] for k in COMPONENTS)
    return out


def human(n: float) -> str:
    """26_712_345_678 -> '26.71B' (four significant digits)."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.4g}{unit}"
    return str(int(n))
