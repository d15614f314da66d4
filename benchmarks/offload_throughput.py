"""Decode throughput with Engram tables resident, in host memory, and on disk (fits in RAM and
larger than RAM), at batch sizes 1, 4 and 16, on real text.

    python -m benchmarks.offload_throughput --big-gb 40 --update BENCHMARKS.md

One process, one backbone (preset ``tiny``, random init), the modes measured side by side in
interleaved rounds (the 2-core VM is shared; each round runs every mode once):

- resident: tables in device memory, rows gathered by a jitted ``take``;
- host: tables in a host memory kind, gathered by host compute, fetched while the blocks
  before the first Engram layer run;
- disk: the same tables in a tensorstore table store (``engram_jax.disk_tier``) behind a
  device LRU cache of ``--cache-rows`` rows per layer, rows prefetched as soon as known;
- disk, large: the same backbone with tables of ``--big-gb`` GB on disk (only the row
  count differs; a random-normal table written once under ``--big-dir`` and reused), more
  than this machine's RAM; its files are evicted from the page cache
  (``posix_fadvise(DONTNEED)``) before the first round.

Workload: rows of real text (the Python standard library's source, BPE tokenizer of the
model's vocabulary trained on it, real compression). Every row prefills a ``--prompt-len``
token prompt, then decodes ``--new-tokens`` steps fed with the text's next token: the very
decode step (one token per row, waiting for the sampled token before the next step starts),
with the n-gram ids and cache hits of real text instead of a random model's loops. Each
(round, batch size) reads new text, so no row repeats; all modes read the same text.
Decode figures exclude the prefill. Cache hit rates are those of the device LRU in the runs,
plus a longer replay of the stream through LRU caches and static hot sets.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.bench_markdown import command_line, date_utc, publish
from engram_jax import disk_tier
from engram_jax.batch_generate import BatchGenerator
from engram_jax.config import override
from engram_jax.model import EngramLM
from engram_jax.offload import HostRows, make_store, most_frequent, simulate_hit_rate
from engram_jax.presets import get_preset
from engram_jax.tokenizer import build_compression, train_tokenizer

HEADING = "## Offloaded tables at inference"


def build_config(args, head_rows: int):
    cfg = get_preset(args.preset)
    eng = dataclasses.replace(
        cfg.engram, engram_vocab_size=(head_rows, head_rows), layer_ids=tuple(args.layers)
    )
    return override(dataclasses.replace(cfg, engram=eng), args.sets)


def stdlib_tokens(cfg, n_bytes: int):
    from engram_jax.corpus import default_corpus_files

    _, files = default_corpus_files(max_bytes=n_bytes)
    text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    with tempfile.TemporaryDirectory() as tmp:
        sp = train_tokenizer([text], Path(tmp) / "bpe.model", vocab_size=cfg.model.vocab_size)
    comp = build_compression(sp, enabled=cfg.engram.compress_tokenizer)
    return np.asarray(sp.encode(text), np.int32), comp


def table_free_model(small, big_cfg):
    """The backbone of ``small`` with the table shapes of ``big_cfg`` and no table values
    (a table larger than RAM is never built; the disk store serves its rows)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: EngramLM(big_cfg, rngs=nnx.Rngs(0))))
    _, values = nnx.split(small)

    def pick(a, v):
        return v if a.shape == v.shape else jnp.zeros((0,) + a.shape[1:], a.dtype)

    return nnx.merge(graphdef, jax.tree.map(pick, abstract, values))


def big_store(model, comp, args) -> str:
    """The large table store: reused when its manifest matches, else written once."""
    shapes = disk_tier.model_shapes(model)
    gb = sum(4 * r * d for r, d in shapes.values()) / 1e9
    sig = dict(disk_tier.hashing_signature(model.cfg.engram, comp.num_compressed))
    sig["source"] = "fresh seed 0"
    path = os.path.join(args.big_dir, f"tiny-{gb:.0f}GB")
    try:
        disk_tier.check_store(path, sig, shapes)
        print(f"reusing {path} ({gb:.1f} GB)", file=sys.stderr)
    except disk_tier.StoreError as e:
        print(f"{e}; writing {path} ({gb:.1f} GB) ...", file=sys.stderr)
        t0 = time.perf_counter()
        tables = {i: rolled_rows(model.cfg.engram.d_head, seed=i) for i in shapes}
        disk_tier.write_store(path, tables, shapes, sig, overwrite=os.path.exists(path))
        print(f"written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path, sig, shapes, gb


def rolled_rows(d: int, seed: int, block: int = 1 << 20):
    """Random-normal rows for a table larger than RAM, fast enough to write 40 GB in minutes:
    one random block, each later block a random rotation of it (the I/O does not depend on
    the values; generating 10G normal floats would take longer than the benchmark)."""
    base = disk_tier.fresh_rows(d, seed)(0, block)

    def rows(start: int, stop: int) -> np.ndarray:
        shift = int(np.random.default_rng([seed, start]).integers(block))
        idx = (np.arange(start, stop) + shift) % block
        return base[idx]

    return rows


def warm_caches(gens, modes, tokens, args) -> None:
    """Bring every device LRU to a server's steady state: the rows of ``--warm-tokens`` tokens
    of other text (the stream's tail) go through each cache; counters restart afterwards."""
    warm = tokens[-args.warm_tokens :][None] if args.warm_tokens else None
    for (name, b), gen in gens.items():
        rows = gen.rows
        if warm is None or not getattr(rows, "caches", None):
            continue
        gen.solo.reset()
        gids = gen.solo.engram_ids(warm)
        for a in range(0, warm.shape[1], 32):
            jax.block_until_ready(rows({i: g[:, a : a + 32] for i, g in gids.items()}))
        for c in rows.caches.values():
            c.lookups = c.hits = c.fetched = 0
        print(f"warmed {name} batch {b}", file=sys.stderr)


def evict(path: str) -> None:
    """Drop a store's pages from the page cache (no privilege needed; dirty pages are written
    first, as DONTNEED keeps them)."""
    os.sync()
    for folder, _, names in os.walk(path):
        for name in names:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def make_modes(small, big, comp, args) -> dict:
    """name -> (model, row source factory); a factory per batch size keeps caches apart."""
    tables = {i: np.asarray(small.blocks[i].engram.table.table[...]) for i in small.engram_layers}
    host = {i: make_store(t) for i, t in tables.items()}
    shapes, sig = (
        disk_tier.model_shapes(small),
        dict(
            disk_tier.hashing_signature(small.cfg.engram, comp.num_compressed), source="benchmark"
        ),
    )
    small_path = os.path.join(args.big_dir, "tiny-small")
    disk_tier.write_store(
        small_path, disk_tier.model_tables(small), shapes, sig, overwrite=os.path.exists(small_path)
    )
    modes = {
        "resident": (small, lambda: None),
        "host": (small, lambda: HostRows(host)),
        "disk": (
            small,
            lambda: HostRows(
                disk_tier.open_store(small_path, sig, shapes), hot_rows=args.cache_rows
            ),
        ),
    }
    if big is not None:
        model, (path, bsig, bshapes, _) = big
        modes["disk, large"] = (
            model,
            lambda: HostRows(disk_tier.open_store(path, bsig, bshapes), hot_rows=args.cache_rows),
        )
    return modes


def run_rows(gen: BatchGenerator, text_BxT: np.ndarray, prompt_len: int):
    """Prefill, then teacher-forced decode steps: -> (wall s, CPU s, tokens) of the decode."""
    gen.start(list(text_BxT[:, :prompt_len]))
    b, steps = text_BxT.shape[0], text_BxT.shape[1] - prompt_len
    jax.block_until_ready(gen.step(jnp.asarray(text_BxT[:, prompt_len]), text_BxT[:, prompt_len]))
    t0, c0 = time.perf_counter(), time.process_time()
    for t in range(prompt_len + 1, prompt_len + steps):
        token_B = gen.step(jnp.asarray(text_BxT[:, t]), text_BxT[:, t])
        np.asarray(token_B)  # a decode step waits for its sampled token
    return time.perf_counter() - t0, time.process_time() - c0, b * (steps - 1)


def time_modes(modes, comp, tokens, args) -> tuple[dict, dict]:
    seg = args.prompt_len + args.new_tokens
    gens, stats = {}, {}
    for name, (model, rows) in modes.items():
        for b in args.batches:
            src = rows()
            gens[name, b] = BatchGenerator(model, comp, batch=b, max_len=seg, rows=src)
            stats[name, b] = src
    warm_caches(gens, modes, tokens, args)
    wall = {k: [] for k in gens}
    cpu = {k: [] for k in gens}
    next_seg = 0
    for r in range(args.rounds + 1):  # round 0 compiles and warms the caches
        for b in args.batches:
            text = tokens[next_seg * seg : (next_seg + b) * seg].reshape(b, seg)
            next_seg += b
            for name in modes:
                w, c, n = run_rows(gens[name, b], text, args.prompt_len)
                if r:
                    wall[name, b].append(n / w)
                    cpu[name, b].append(1e3 * c / n)
        print(f"round {r} done", file=sys.stderr)
    speeds = {
        k: dict(
            best=max(wall[k]), median=statistics.median(wall[k]), cpu_ms=statistics.median(cpu[k])
        )
        for k in gens
    }
    hits = {}
    for k, src in stats.items():
        s = getattr(src, "stats", lambda: {})()
        if s:
            lookups = sum(v["lookups"] for v in s.values())
            hits[k] = sum(v["hits"] for v in s.values()) / max(1, lookups)
    return speeds, hits


def replay_hit_rates(model, comp, tokens, args) -> tuple[list[dict], dict]:
    cfg = model.cfg
    hasher = comp.hasher(cfg.engram)
    layer = model.engram_layers[0]
    offsets = np.asarray(model.blocks[layer].engram.table.offsets, np.int64)
    ids_TxH = hasher(comp(tokens[: args.stream_tokens])[None])[layer][0] + offsets[None, :]
    half = len(ids_TxH) // 2
    rows = []
    for cap in args.capacities:
        lru = simulate_hit_rate(ids_TxH[half:], cap, "lru")
        hot = most_frequent(ids_TxH[:half], cap)
        static = simulate_hit_rate(ids_TxH[half:], cap, "static", hot_ids=hot)
        rows.append(dict(capacity=cap, lru=lru["hit_rate"], static=static["hit_rate"]))
    info = dict(
        measured=len(ids_TxH) - half,
        layer=layer,
        distinct=len(np.unique(ids_TxH[half:])),
        heads=ids_TxH.shape[1],
        table_rows=model.blocks[layer].engram.table.n_rows,
    )
    return rows, info


def _speed_rows(speeds: dict, hits: dict) -> list[str]:
    lines = []
    for (name, b), v in speeds.items():
        base = speeds["resident", b]
        hit = f"{100 * hits[name, b]:.1f}%" if (name, b) in hits else ""
        lines.append(
            f"| {name} | {b} | {v['best']:.1f} | {v['median']:.1f} | "
            f"{100 * v['median'] / base['median']:.0f}% | {v['cpu_ms']:.2f} | {hit} |"
        )
    return lines


def _goals(speeds: dict, batches, big, big_gb: float) -> list[str]:
    """The issue's goals, each with the medians it is judged on."""
    b0, b1 = min(batches), max(batches)
    scale = speeds["resident", b1]["median"] / speeds["resident", b0]["median"]

    def ratio(name, b):
        return speeds[name, b]["median"] / speeds["resident", b]["median"]

    host = ", ".join(f"{100 * ratio('host', b):.0f}% at batch {b}" for b in batches)
    goals = [f"batched decode (resident): batch {b1} = {scale:.1f}x batch {b0} (goal >= 6x)"]
    goals.append(f"host vs resident (median tokens/s): {host} (goal: within 10%)")
    if big is not None:
        goals.append(
            f"disk with the {big_gb:.0f} GB table vs resident: "
            f"{100 * ratio('disk, large', b0):.0f}% at batch {b0} (goal >= 50%), "
            f"{100 * ratio('disk, large', b1):.0f}% at batch {b1} (goal >= 80%)"
        )
    return goals


def markdown(cfg, model, big, speeds, hits, replay, info, args, command, evicted) -> str:
    m = cfg.model
    rows = sum(model.blocks[i].engram.table.n_rows for i in model.engram_layers)
    mb = rows * cfg.engram.d_head * 4 / 1e6
    big_gb = big[1][3] if big else 0.0
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    lines = [
        HEADING,
        "",
        f"Command: `{command}`  ",
        f"Date: {date_utc()}  ",
        (
            f"Machine: 2 CPU cores shared with other jobs (load average {os.getloadavg()[1]:.1f} "
            f"at the end), {ram:.1f} GB RAM, jax {jax.__version__}. {args.rounds} interleaved "
            f"rounds after a warm-up round; every row: {args.prompt_len}-token prompt, then "
            f"{args.new_tokens} decode steps fed with the real text's next token. Tokens/s = "
            "rows x decode steps / decode wall time; CPU ms/token = process CPU time (all "
            "threads) / tokens, the figure least sensitive to the other jobs."
        ),
        "",
        (
            f"Model: preset `{args.preset}` (d={m.d_model}, {m.n_layers} blocks, mHC {m.hc_mult}, "
            f"{cfg.moe.n_routed_experts} experts), random init, Engram at blocks "
            f"{list(cfg.engram.layer_ids)}; tables of {rows:,} rows x {cfg.engram.d_head} "
            f"= {mb:.0f} MB (resident, host, disk) and, same backbone, "
            f"{big_gb:.1f} GB on disk (disk, large; {big_gb / ram:.2f}x RAM; {evicted}). Disk "
            f"modes: device LRU of {args.cache_rows:,} rows per layer. On CPU host and device "
            "memory are the same RAM."
        ),
        "",
        "| mode | batch | best tokens/s | median tokens/s | vs resident (median) | "
        "CPU ms/token | LRU hit rate |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += _speed_rows(speeds, hits)
    lines += [
        "",
        "Against the goals (computed from the medians above): "
        + "; ".join(_goals(speeds, args.batches, big, big_gb))
        + ".",
        "",
        (
            f"Hot-row cache replay on the same text ({info['measured']:,} tokens after "
            f"{info['measured']:,} of warm-up, Engram layer {info['layer']}, {info['heads']} "
            f"lookups per token into {info['table_rows']:,} rows, {info['distinct']:,} distinct "
            "rows). Static = the most frequent rows of the first half of the stream."
        ),
        "",
        "| cache rows | LRU hit rate | static hit rate |",
        "|---:|---:|---:|",
    ]
    lines += [
        f"| {r['capacity']:,} | {100 * r['lru']:.1f}% | {100 * r['static']:.1f}% |" for r in replay
    ]
    return "\n".join(lines + [""])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--head-rows", type=int, default=250_000, help="base rows of every head")
    p.add_argument("--layers", type=int, nargs="+", default=[1, 3])
    p.add_argument("--big-gb", type=float, default=40.0, help="large table on disk (0: none)")
    p.add_argument("--big-dir", default="/work/bigtable")
    p.add_argument("--cache-rows", type=int, default=65536)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warm-tokens", type=int, default=20_000, help="LRU warm-up text (0: cold)")
    p.add_argument("--text-bytes", type=int, default=4_000_000)
    p.add_argument("--stream-tokens", type=int, default=400_000)
    p.add_argument("--capacities", type=int, nargs="+", default=[4096, 65536, 262144])
    p.add_argument("--update", type=Path, help="write the section into this markdown file")
    args = p.parse_args()

    cfg = build_config(args, args.head_rows)
    small = nnx.jit(lambda: EngramLM(cfg, rngs=nnx.Rngs(0)))()
    tokens, comp = stdlib_tokens(cfg, args.text_bytes)
    big, evicted = None, "no large table"
    if args.big_gb > 0:
        heads = len(args.layers) * (cfg.engram.max_ngram_size - 1) * cfg.engram.n_head_per_ngram
        head_rows = int(args.big_gb * 1e9 / (4 * cfg.engram.d_head * heads))
        model = table_free_model(small, build_config(args, head_rows))
        big = (model, big_store(model, comp, args))
        evict(big[1][0])
        evicted = "its pages evicted from the page cache before the LRU warm-up"
    modes = make_modes(small, big, comp, args)
    speeds, hits = time_modes(modes, comp, tokens, args)
    print(speeds, hits, file=sys.stderr)
    replay, info = replay_hit_rates(small, comp, tokens, args)
    text = markdown(cfg, small, big, speeds, hits, replay, info, args, command_line(), evicted)
    publish(HEADING, text, args.update)


if __name__ == "__main__":
    main()
