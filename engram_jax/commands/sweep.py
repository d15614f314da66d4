"""``engram-jax sweep rho|slots|ablate``: train a study's configs, write results.csv, plots and
summary.json to ``--out`` (see experiments/README.md for the runs committed in the repo).

- ``rho``: iso-P_tot, iso-P_act configs over the allocation ratio (``--rhos``);
- ``slots``: a fixed backbone with Engram tables over ``--slots`` total rows; log-linear fit;
- ``ablate``: the reference Engram, its ablations, the MoE and OverEncoding baselines.

Re-running the same command skips runs that finished; a failed run is a row with an error.
"""

from __future__ import annotations


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(float(x)) for x in text.split(",") if x.strip())


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sweep", help="run a study (rho U-curve, memory scaling, ablations)", description=__doc__
    )
    p.add_argument("study", choices=("rho", "slots", "ablate"))
    p.add_argument(
        "--preset",
        default="toy",
        help="base config: 'toy' (engram_jax.experiments.toy, the CPU studies) or a "
        "preset name such as tiny",
    )
    p.add_argument("--data", default=None, help="text file/dir/.jsonl (default: Python stdlib)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per point (train.seed 0..K-1)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps per run (also sets train.eval_every: one final eval)",
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a base config field before the sweep is built",
    )
    p.add_argument("--rhos", type=_floats, default=None, help="rho grid, e.g. 1,0.8,0.6")
    p.add_argument("--slots", type=_ints, default=None, help="slot grid, e.g. 1e4,4e4,1.6e5")
    p.add_argument("--only", default=None, help="ablate: comma-separated variant names")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=run)


def build_points(args):
    from engram_jax.config import override
    from engram_jax.experiments import (
        ablations,
        allocation,
        base_config,
        memory_scaling,
    )

    sets = list(args.sets)
    if args.steps is not None:
        sets += [f"train.steps={args.steps}", f"train.eval_every={args.steps}"]
    if args.data is not None:
        sets.append(f"data.path={args.data!r}")
    base = override(base_config(args.preset), sets)
    if args.study == "rho":
        return allocation.sweep(base, args.rhos or allocation.RHOS)
    if args.study == "slots":
        return memory_scaling.sweep(base, args.slots or memory_scaling.SLOTS)
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    return ablations.sweep(base, only)


def run(args) -> int:
    from engram_jax.sweep import finish, run_sweep

    if args.seeds < 1:
        raise ValueError(f"--seeds={args.seeds} must be >= 1")
    points = build_points(args)
    rows = run_sweep(args.study, points, args.out, seeds=tuple(range(args.seeds)))
    summary = finish(args.study, rows, args.out)
    keys = (
        "best_rho",
        "best_rho_actual",
        "gain_vs_moe",
        "gain_se",
        "fit",
        "delta_vs_reference",
        "failed",
    )
    print({k: summary[k] for k in keys if k in summary})
    print(f"results: {args.out}/results.csv, summary.json, {', '.join(summary['figures'])}")
    return 0 if not summary["failed"] else 1
