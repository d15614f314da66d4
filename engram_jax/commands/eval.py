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


def evaluate_workdir(workdir, *, data: str | None = None, batches: int | None = None) -> dict:
    """Validation loss of a workdir's latest checkpoint (on ``data`` if given), on one device."""
    import dataclasses

    import jax

    from engram_jax.data import build_data
    from engram_jax.step import evaluate, make_eval_step
    from engram_jax.workdir import Workdir, single_device_mesh

    wd = Workdir(workdir)
    loaded = wd.load()
    cfg = loaded.cfg
    if data is not None:  # other text, tokenized with the run's own tokenizer
        cfg = dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, path=data, tokenizer=wd.tokenizer())
        )
    wd.pull_data()
    bundle = build_data(cfg, wd.data_root())
    n = batches or cfg.train.eval_batches
    eval_fn = jax.jit(make_eval_step(cfg, loaded.graphdef))
    loss = evaluate(eval_fn, loaded.state, bundle.val_batches(n), single_device_mesh())
    return dict(
        workdir=str(wd.path),
        step=loaded.step,
        val_loss=loss,
        batches=n,
        data=cfg.data.path or "<python stdlib>",
    )


def run(args) -> int:
    result = evaluate_workdir(args.workdir, data=args.data, batches=args.batches)
    print(json.dumps(result))
    return 0
