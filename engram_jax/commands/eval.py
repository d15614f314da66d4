"""``engram-jax eval``: validation loss of the latest checkpoint in a workdir, as one JSON line."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="validation loss of a trained workdir", description=__doc__)
    p.add_argument("--workdir", required=True)
    p.add_argument(
        "--data",
        default=None,
        help="evaluate on this data instead of the run's "
        "validation split (same formats as train --data)",
    )
    p.add_argument("--batches", type=int, default=None, help="number of validation batches")
    p.set_defaults(func=run)


def run(args) -> int:
    from engram_jax.runs import evaluate_workdir

    result = evaluate_workdir(args.workdir, data=args.data, batches=args.batches)
    print(json.dumps(result))
    return 0
