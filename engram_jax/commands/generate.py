"""``engram-jax generate``: continue a prompt with a trained workdir's model (KV-cached decoding).

Greedy with ``--temperature 0`` (the default), else top-k sampling seeded by ``--seed``.
``--offload host`` keeps the Engram tables in host memory (a pinned/unpinned host memory kind
where the platform has one, NumPy otherwise) and fetches each step's rows while the first
blocks run; ``--hot-rows N`` adds an LRU cache of N rows per table in device memory. The
generated text is identical with and without offload.
"""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a trained workdir",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workdir", required=True, help="a run trained with `engram-jax train`")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument(
        "--offload",
        choices=("none", "host"),
        default="none",
        help="where the Engram tables live during decoding",
    )
    p.add_argument(
        "--memory-kind",
        default="auto",
        choices=("auto", "pinned_host", "unpinned_host", "numpy"),
        help="host placement of offloaded tables",
    )
    p.add_argument(
        "--hot-rows",
        type=int,
        default=0,
        help="device-memory LRU cache of this many rows per table (with --offload)",
    )
    p.add_argument("--stats", action="store_true", help="print timing and cache statistics")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys
    import time

    from engram_jax.generate import load_workdir, make_generator

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    if args.temperature < 0:
        raise ValueError(f"--temperature={args.temperature} must be >= 0")
    offload = None
    if args.offload == "host":
        from engram_jax.offload import OffloadConfig

        offload = OffloadConfig(memory_kind=args.memory_kind, hot_rows=args.hot_rows)
    t0 = time.perf_counter()
    _, model, sp, compression = load_workdir(args.workdir, args.step)
    prompt_ids = [sp.encode(args.prompt)]
    if not prompt_ids[0]:
        raise ValueError("--prompt encodes to no tokens")
    needed = len(prompt_ids[0]) + args.max_new_tokens
    gen = make_generator(
        model, compression, max_len=-(-needed // 64) * 64, offload=offload, release=True
    )
    t1 = time.perf_counter()
    result = gen.generate(
        prompt_ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        eos_id=sp.eos_id(),
    )
    t2 = time.perf_counter()
    ids = [int(i) for i in result.tokens[0] if i != sp.eos_id()]
    print(args.prompt + sp.decode(ids))
    if args.stats:
        stats = {
            "load_s": round(t1 - t0, 2),
            "generate_s": round(t2 - t1, 2),
            "prompt_tokens": result.prompt_len,
            "new_tokens": result.steps,
        }
        cache = getattr(gen.rows, "stats", None)
        if cache is not None:
            stats["hot_rows"] = cache()
        print(stats, file=sys.stderr)
    return 0
