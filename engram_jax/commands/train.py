"""``engram-jax train``: train a preset on text, resuming from the workdir's latest checkpoint."""

from __future__ import annotations

import argparse

from engram_jax.commands import add_set_arg


def add_common_config_args(p: argparse.ArgumentParser, *, preset_default: str | None) -> None:
    p.add_argument(
        "--preset",
        default=preset_default,
        help="named config (tiny, small, ...; see `engram-jax params --help`)",
    )
    add_set_arg(p)


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-process")
    g.add_argument(
        "--coordinator-address",
        default=None,
        help="host:port of process 0 (loopback for local tests); on TPU VMs omit "
        "it with --num-processes unset and jax works it out",
    )
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)
    g.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        help="fake N CPU devices in this process (testing meshes without a TPU)",
    )


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train a model (resumes if WORKDIR has checkpoints)", description=__doc__
    )
    add_common_config_args(p, preset_default=None)
    p.add_argument(
        "--data",
        default=None,
        help="text file, directory of text files, or .jsonl (default: the Python "
        "standard library source of this interpreter)",
    )
    p.add_argument("--workdir", default="runs/tiny", help="where metrics and checkpoints go")
    p.add_argument("--steps", type=int, default=None, help="shorthand for --set train.steps=N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_distributed_args(p)
    p.set_defaults(func=run)


def init_distributed(args) -> None:
    """Set up fake CPU devices and jax.distributed before the backend starts."""
    import jax

    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", int(args.cpu_devices))
    if args.num_processes is not None or args.coordinator_address is not None:
        if args.num_processes and args.num_processes > 1 and args.process_id is None:
            raise ValueError("--process-id is required with --num-processes > 1")
        jax.distributed.initialize(
            coordinator_address=args.coordinator_address,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )


def run(args) -> int:
    init_distributed(args)
    from engram_jax.train import resolve_config, train

    sets = list(args.sets)
    if args.steps is not None:
        sets.append(f"train.steps={args.steps}")
    if args.data is not None:
        sets.append(f"data.path={args.data!r}")
    cfg = resolve_config(args.workdir, args.preset, sets)
    summary = train(cfg, args.workdir, progress=not args.no_progress)
    return 0 if summary.get("status") == "ok" else 1
