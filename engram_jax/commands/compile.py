"""``engram-jax compile``: compile the train and decode steps for a TPU slice on this host.

The compile runs in a child process with its own environment (see
:mod:`engram_jax.tpu_compile`); this module parses arguments and prints the report.
"""

from __future__ import annotations

import json

from engram_jax.commands import add_set_arg

GiB = 1024**3


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "compile",
        help="compile the train step for a Cloud TPU slice on this CPU host: memory, time, MFU",
        description=(
            "Compile the real train step (and the cached decode step) ahead of time for a TPU "
            "slice, without a TPU (needs libtpu: pip install 'engram-jax[tpu]'), and report per "
            "chip: HBM use against capacity, FLOPs, estimated step time and MFU, collectives. "
            "Exit status 0 when the train step fits in HBM, 1 when it does not, 2 on bad input."
        ),
    )
    p.add_argument("--preset", required=True, help="preset name, e.g. engram-27b")
    p.add_argument(
        "--topology", required=True, help="TPU slice, e.g. v5p:4x4x8 (v5p-256), v5e:2x2, v4:2x2x1"
    )
    p.add_argument(
        "--mesh", default="", help="mesh axis sizes, e.g. fsdp=64,tensor=2 (default: the preset's)"
    )
    add_set_arg(p, "train.batch_size=256")
    p.add_argument("--no-decode", action="store_true", help="compile the train step only")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    from engram_jax.tpu_compile import compile_in_subprocess, parse_mesh

    request = dict(
        preset=args.preset,
        topology=args.topology,
        mesh=parse_mesh(args.mesh),
        sets=list(args.sets),
        decode=not args.no_decode,
    )
    report = compile_in_subprocess(request)
    print(json.dumps(report, sort_keys=True) if args.json else format_report(report))
    return 0 if report["fits"] else 1


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def format_report(r: dict) -> str:
    order = ("data", "fsdp", "expert", "tensor")
    mesh = ",".join(f"{k}={r['mesh'][k]}" for k in order)
    verdict = "fits" if r["fits"] else "DOES NOT FIT"
    hbm, cap = r["hbm_bytes_per_chip"], r["hbm_capacity_bytes"]
    lines = [
        f"{r['preset']} on {r['topology']} ({r['chips']} chips), mesh {mesh}, "
        f"batch {r['global_batch']} x {r['seq_len']} ({r['batch_per_chip']:g} per chip), "
        f"MoE dispatch {r['moe_dispatch']}; compiled in {r['compile_s']:.0f} s",
        "per chip:",
        f"  parameters   {_size(r['param_bytes_per_chip'])}",
        f"  optimizer    {_size(r['optimizer_bytes_per_chip'])}",
        f"  tables       {_size(r['table_bytes_per_chip'])} with their moments",
        f"  activations  {_size(r['activation_bytes_per_chip'])} (program temporaries)",
        f"  HBM total    {_size(hbm)} of {_size(cap)} ({100 * hbm / cap:.0f}%): {verdict}",
    ]
    if r["pinned_host_supported"]:
        rest = r["hbm_bytes_per_chip_tables_on_host"]
        lines.append(
            f"  tables in pinned host memory instead: HBM {_size(rest)} "
            f"({'fits' if r['fits_with_tables_on_host'] else 'does not fit'}; estimate)"
        )
    xla = r.get("xla_flops_per_chip")
    lines += [
        f"  FLOPs        {r['flops_per_chip']:.3e} per step ({r['flops_source']}"
        + (f"; XLA counted {xla:.3e}" if xla is not None else "")
        + f"; model FLOPs {r['model_flops_per_chip']:.3e})",
        f"  step time    {r['est_step_s']:.3f} s estimated ({r['est_source']}), "
        f"MFU {100 * r['est_mfu']:.1f}%",
        "collectives per step (operand bytes per chip):",
    ]
    lines += [f"  {k:<20}{_size(v)}" for k, v in r["collective_bytes"].items()] or ["  none"]
    d = r.get("decode")
    if d and "hbm_bytes_per_chip" in d:
        lines.append(
            f"decode step (batch {d['batch']}, cache {d['cache_len']}): HBM "
            f"{_size(d['hbm_bytes_per_chip'])} ({'fits' if d['fits'] else 'DOES NOT FIT'}), "
            f"~{1e3 * d['est_step_s']:.2f} ms/token, compiled in {d['compile_s']:.0f} s"
        )
    elif d:
        lines.append(f"decode step (batch {d['batch']}, cache {d['cache_len']}): DOES NOT FIT")
    return "\n".join(lines)
