"""``engram-jax params``: parameter accounting of a preset, analytic (allocates nothing)."""

from __future__ import annotations

import json

from engram_jax.commands import add_set_arg


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "params",
        help="count parameters of a preset (P_tot, P_act, sparse, Engram, rho)",
        description="Analytic parameter counts from the config alone (ENGRAM_SPEC section 6).",
    )
    p.add_argument("--preset", required=True, help="preset name, e.g. engram-27b")
    add_set_arg(p, "moe.n_routed_experts=64")
    p.add_argument("--json", action="store_true", help="print one JSON object (raw counts)")
    p.set_defaults(func=run)


def run(args) -> int:
    from engram_jax.config import override
    from engram_jax.params import count_params, human
    from engram_jax.presets import get_preset

    cfg = override(get_preset(args.preset), args.sets)
    counts = count_params(cfg)
    if args.json:
        print(json.dumps({"preset": cfg.name, **counts}, sort_keys=True))
        return 0
    print(f"{cfg.name}: parameters (analytic; embedding and LM head outside total)")
    rows = [
        ("total (P_tot)", counts["total"]),
        ("activated (P_act)", counts["activated"]),
        ("sparse", counts["sparse"]),
        ("engram tables", counts["engram"]),
        ("total + input embedding", counts["total_with_embedding"]),
    ]
    for name, n in rows:
        print(f"  {name:<26}{human(n):>10}  ({n:,})")
    print(f"  {'rho (routed share)':<26}{counts['rho']:>10.3f}")
    print("breakdown:")
    for name, n in counts["breakdown"].items():
        print(f"  {name:<26}{human(n):>10}  ({n:,})")
    return 0
