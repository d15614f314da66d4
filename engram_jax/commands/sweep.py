"""``engram-jax sweep STUDY``: train a study's configs, write results.csv, plots and
summary.json to ``--out`` (default ``experiments/results/STUDY``). Studies: see
:mod:`engram_jax.experiments` (one module each, same name). Re-running the same command skips
finished runs (resumable); a failed run is a row with an error."""

from __future__ import annotations

from engram_jax.commands import add_set_arg


def _add_common(p, study: str) -> None:
    p.add_argument("--preset", default="toy", help="base config: any preset (default: toy)")
    p.add_argument("--data", default=None, help="text file/dir/.jsonl (default: Python stdlib)")
    p.add_argument("--seeds", type=int, default=2, help="paired seeds per point (0..K-1)")
    p.add_argument(
        "--steps", type=int, default=None, help="training steps per run (default: the preset's)"
    )
    p.add_argument(
        "--eval-tokens",
        type=int,
        default=65_536,
        help="held-out tokens of the one evaluation at the last step (>= this many)",
    )
    add_set_arg(p, "data.max_bytes=0")
    p.add_argument("--out", default=f"experiments/results/{study}", help="output directory")
    p.add_argument(
        "--report",
        action="store_true",
        help="train nothing: rewrite summary.json, summary.md and the figures from the runs "
        "already in OUT/results.csv (e.g. of a study still running; runs another sweep "
        "process had claimed are filled in from OUT/runs/ once finished)",
    )


def add_parser(sub) -> None:
    from engram_jax.experiments import STUDIES, get_study

    p = sub.add_parser("sweep", help="run a study (rho, slots, ablations)", description=__doc__)
    studies = p.add_subparsers(dest="study", required=True, metavar="STUDY")
    for name in STUDIES:
        mod = get_study(name)
        sp = studies.add_parser(name, help=mod.__doc__.split(":")[0], description=mod.__doc__)
        _add_common(sp, name)
        mod.add_arguments(sp)
        sp.set_defaults(func=run)


def build_points(args):
    from engram_jax.config import override
    from engram_jax.experiments import base_config, get_study
    from engram_jax.sweep import with_eval_tokens

    sets = list(args.sets)
    if args.steps is not None:
        sets.append(f"train.steps={args.steps}")
    if args.data is not None:
        sets.append(f"data.path={args.data!r}")
    base = override(base_config(args.preset), sets)
    base = with_eval_tokens(base, args.eval_tokens)
    return get_study(args.study).points(base, args)


def run(args) -> int:
    import os

    from engram_jax.sweep import finish, read_csv, refresh_busy, run_sweep, write_csv

    if args.seeds < 1:
        raise ValueError(f"--seeds={args.seeds} must be >= 1")
    if args.report:
        csv_path = os.path.join(args.out, "results.csv")
        if not os.path.isfile(csv_path):
            raise ValueError(f"--report needs {csv_path}: run the sweep first (without --report)")
        every = read_csv(csv_path)
        rows = [r for r in every if r.get("study") == args.study]
        if not rows:
            raise ValueError(f"{csv_path} has no runs of study {args.study!r}")
        if refresh_busy(rows, args.out):  # runs another process finished since the csv
            write_csv(every, csv_path)
    else:
        points = build_points(args)
        rows = run_sweep(args.study, points, args.out, seeds=tuple(range(args.seeds)))
    summary = finish(args.study, rows, args.out)
    keys = ("best_rho", "u_curve", "fit_engram", "fit_overencoding", "beyond_2se", "failed")
    print({k: summary[k] for k in keys if k in summary})
    figures = ", ".join(summary["figures"])
    print(f"results: {args.out}/results.csv, summary.json, summary.md, {figures}")
    return 0 if not summary["failed"] else 1
