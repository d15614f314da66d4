"""``engram-jax generate``: continue prompts with a trained workdir's model (KV-cached decoding).

Greedy with ``--temperature 0`` (the default), else top-k sampling seeded by ``--seed``.
Where the Engram tables live while decoding (the generated text is the same for all):

- ``--offload none``: device memory;
- ``--offload host``: host memory (a pinned/unpinned host memory kind where the platform has
  one, NumPy otherwise), each step's rows fetched while the first blocks run; ``--hot-rows N``
  adds an LRU cache of N rows per table in device memory;
- ``--offload disk``: a row-chunked tensorstore table store on disk (``--table-store PATH``;
  by default ``W/table_store/<step>``, written from the checkpoint on first use), read through
  a device LRU cache of ``--cache-rows`` rows per table, the next rows prefetched while the
  current step runs. A store that is missing (at an explicit path), truncated, or written for
  another model or checkpoint is refused.

``--prompts-file FILE`` (one prompt per line, or JSONL with a "prompt" field) decodes the
prompts in batches of ``--batch-size`` (each prompt exactly as if alone) and writes one JSON
object per prompt to stdout or ``--out``.
"""

from __future__ import annotations

import json
import os
import sys

from engram_jax.commands import add_command


def add_parser(sub) -> None:
    p = add_command(sub, "generate", "generate text from a trained workdir", __doc__)
    p.add_argument("--workdir", required=True, help="a run trained with `engram-jax train`")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="text to continue")
    what.add_argument("--prompts-file", help="one prompt per line, or JSONL with a 'prompt' field")
    p.add_argument("--out", help="with --prompts-file: write the JSON lines here, not stdout")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument(
        "--offload",
        choices=("none", "host", "disk"),
        default="none",
        help="where the Engram tables live during decoding",
    )
    p.add_argument(
        "--memory-kind",
        default="auto",
        choices=("auto", "pinned_host", "unpinned_host", "numpy"),
        help="host placement of offloaded tables (--offload host)",
    )
    p.add_argument(
        "--hot-rows",
        type=int,
        default=0,
        help="device-memory LRU cache of this many rows per table (--offload host)",
    )
    p.add_argument("--table-store", help="table store directory (--offload disk)")
    p.add_argument(
        "--cache-rows",
        type=int,
        default=65536,
        help="device-memory LRU cache rows per table (--offload disk)",
    )
    p.add_argument("--stats", action="store_true", help="print timing and cache statistics")
    p.set_defaults(func=run)


def read_prompts(path: str) -> list[str]:
    """Prompts of a file: JSONL objects with a "prompt" field, or one plain prompt per line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompts-file {path} does not exist")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            text = line.rstrip("\n")
            if not text.strip():
                continue
            if text.lstrip().startswith("{"):
                try:
                    text = json.loads(text)["prompt"]
                except (ValueError, KeyError, TypeError) as e:
                    msg = f"{path} line {n}: not a JSON object with a 'prompt' ({e})"
                    raise ValueError(msg) from None
            prompts.append(str(text))
    if not prompts:
        raise ValueError(f"--prompts-file {path} holds no prompt")
    return prompts


def _check(args) -> None:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    if args.temperature < 0:
        raise ValueError(f"--temperature={args.temperature} must be >= 0")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size={args.batch_size} must be >= 1")
    if args.cache_rows < 0 or args.hot_rows < 0:
        raise ValueError("--cache-rows and --hot-rows must be >= 0")
    if args.table_store and args.offload != "disk":
        raise ValueError("--table-store needs --offload disk")
    if args.out and not args.prompts_file:
        raise ValueError("--out needs --prompts-file")


def _rows(args, model, compression):
    """The row source of the chosen placement (None: tables stay on the device)."""
    if args.offload == "host" and model.engram_layers:
        from engram_jax.offload import HostRows, OffloadConfig

        cfg = OffloadConfig(memory_kind=args.memory_kind, hot_rows=args.hot_rows)
        return HostRows.from_model(model, cfg, release=True)
    if args.offload == "disk" and model.engram_layers:
        from engram_jax.disk_tier import default_store_path, disk_host_rows
        from engram_jax.workdir import Workdir

        step = Workdir(args.workdir).latest_step() if args.step is None else args.step
        path = args.table_store or default_store_path(args.workdir, step)
        return disk_host_rows(
            model,
            compression,
            path,
            source=f"checkpoint step {step}",
            cache_rows=args.cache_rows,
            write_missing=args.table_store is None,
            log=lambda m: print(m, file=sys.stderr),
        )
    return None


def _write_lines(lines: list[str], out: str | None) -> None:
    if out is None:
        sys.stdout.write("".join(lines))
        return
    tmp = f"{out}.tmp-{os.getpid()}"  # an existing --out survives any failure
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(lines)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def run(args) -> int:
    import time

    import numpy as np

    from engram_jax.batch_generate import BatchGenerator
    from engram_jax.generate import Generator, load_workdir

    _check(args)
    texts = read_prompts(args.prompts_file) if args.prompts_file else [args.prompt]
    t0 = time.perf_counter()
    _, model, sp, compression = load_workdir(args.workdir, args.step)
    ids = [sp.encode(t) for t in texts]
    empty = [n for n, p in enumerate(ids, 1) if not p]
    if empty:
        raise ValueError(f"prompt {empty[0]} encodes to no tokens")
    rows = _rows(args, model, compression)
    needed = max(len(p) for p in ids) + args.max_new_tokens
    max_len = -(-needed // 64) * 64
    sampling = dict(temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    t1 = time.perf_counter()
    eos = sp.eos_id()
    if args.prompts_file is None:
        gen = Generator(model, compression, max_len=max_len, rows=rows)
        result = gen.generate(ids, args.max_new_tokens, eos_id=eos, **sampling)
        print(args.prompt + sp.decode([int(i) for i in result.tokens[0] if i != eos]))
        done = [result.steps]
    else:
        batch = min(args.batch_size, len(ids))
        gen = BatchGenerator(model, compression, batch=batch, max_len=max_len, rows=rows)
        lines, done = [], []
        for start in range(0, len(ids), batch):
            res = gen.generate(
                ids[start : start + batch], args.max_new_tokens, eos_id=eos, **sampling
            )
            for k, new in enumerate(res.tokens):
                new = [int(i) for i in np.asarray(new) if i != eos]
                record = {
                    "index": start + k,
                    "prompt": texts[start + k],
                    "completion": sp.decode(new),
                    "prompt_tokens": len(ids[start + k]),
                    "new_tokens": len(new),
                }
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
                done.append(len(new))
        _write_lines(lines, args.out)
    if args.stats:
        stats = {
            "load_s": round(t1 - t0, 2),
            "generate_s": round(time.perf_counter() - t1, 2),
            "prompts": len(ids),
            "new_tokens": sum(done),
        }
        cache = getattr(rows, "stats", None)
        if cache is not None:
            stats["cache"] = cache()
        print(stats, file=sys.stderr)
    return 0
