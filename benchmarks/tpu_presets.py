"""Paper presets on Cloud TPU v5p slices, compiled ahead of time on this CPU host (no TPU).

For each paper preset: the slice, mesh and global batch found with ``engram-jax compile``, and
what the compiled train step needs per chip (HBM, table bytes), the compiler's step-time
estimate and the MFU it implies, and the collectives of the compiled program. Also: engram-27b
at 4x table rows (its collective bytes must equal the 1x program's), and the all-to-all bytes
of the expert-parallel MoE against the analytic volume.

Each compile of a 27B-40B preset takes minutes and several GB of RAM: the raw reports are kept
in ``benchmarks/tpu_presets.json`` and ``--only NAME`` recompiles one entry.

    python -m benchmarks.tpu_presets --only engram-27b
    python -m benchmarks.tpu_presets --update BENCHMARKS.md     # every entry, then the table
    python -m benchmarks.tpu_presets --table-only --update BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from benchmarks.bench_markdown import command_line, date_utc, publish
from engram_jax.config import override
from engram_jax.presets import get_preset
from engram_jax.tpu_compile import compile_in_subprocess

HEADING = "## Paper presets on TPU slices (ahead-of-time compile, no TPU)"
RESULTS = Path(__file__).with_name("tpu_presets.json")
EP = "moe.dispatch=ep"


def _cube(preset: str, *sets: str, batch: int = 64) -> tuple:
    """A recipe on v5p-128 (v5p:4x4x4, 64 chips): FSDP over all of them, expert-parallel
    dispatch, a global batch of ``batch`` (64: 1 sequence of 4096 per chip), then ``sets``."""
    return (preset, "v5p:4x4x4", {"fsdp": 64}, [EP, f"train.batch_size={batch}", *sets])


def _v5p16(preset: str, *sets: str) -> tuple:
    """A recipe on v5p-16 (v5p:2x2x2, 8 chips), FSDP over all of them, with ``sets``."""
    return (preset, "v5p:2x2x2", {"fsdp": 8}, list(sets))


# name -> (preset, topology, mesh, --set overrides); the batch is global (per chip x chips)
RECIPES = {
    # the previous session's program: 30 blocks unrolled (before model.scan_layers)
    "engram-27b-unrolled-2-per-chip": _cube("engram-27b", "model.scan_layers=false", batch=128),
    "engram-27b": _cube("engram-27b"),
    "engram-27b-4x-rows": _cube("engram-27b", "engram.engram_vocab_size=[9049600,9049600]"),
    "engram-27b-muon-split": _cube("engram-27b", "optim.muon_split=true"),
    "engram-40b": _cube("engram-40b"),
    "moe-27b": _cube("moe-27b"),
    "moe-27b-muon-split": _cube("moe-27b", "optim.muon_split=true"),
    "moe-27b-muon-split-async-ag": _cube("moe-27b", "optim.muon_split=true"),  # LIBTPU_ARGS
    # a 4B dense model needs no cube: v5p-16 (8 chips), its state split over all of them
    "dense-4b": _v5p16("dense-4b", "train.batch_size=16"),
    "dense-4b-1-per-chip": _v5p16("dense-4b", "train.batch_size=8"),
    "dense-4b-muon-split": _v5p16("dense-4b", "train.batch_size=16", "optim.muon_split=true"),
    # 3B (0.58B activated) + 1.6B of tables: v5p-16 (8 chips) holds it, 2 sequences per chip
    "ablation-3b": _v5p16("ablation-3b", EP, "train.batch_size=16"),
    "ablation-3b-4-per-chip": _v5p16("ablation-3b", EP, "train.batch_size=32"),
}


# The TPU compiler's flags (LIBTPU_INIT_ARGS) of a recipe; every other recipe compiles with none.
# Async all-gathers, preferred to all-reduce: without them libtpu lowers the FSDP all-gathers
# of a 1-D 64-chip axis over the 4x4x4 torus to all-reduces of zero-padded buffers.
ASYNC_ALL_GATHER = (
    "--xla_tpu_enable_async_collective_fusion=true "
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true "
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true "
    "--xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true "
    "--xla_tpu_prefer_async_allgather_to_allreduce=true"
)
LIBTPU_ARGS = {"moe-27b-muon-split-async-ag": ASYNC_ALL_GATHER}


# What the table does not show yet (update when an entry is compiled).
STATUS = [
    "- `engram-27b-unrolled-2-per-chip` is the session-3 program (30 blocks unrolled, "
    "per-block optimizer): XLA refused it (97 GiB of temporaries per chip), after 755 s.",
    "- `engram-27b` (session 5, 2026-12-01, with Muon's Newton-Schulz as one scan and the "
    "Pallas grouped matmul for the experts): the first 27B compile that finished here, "
    "`engram-jax compile --preset engram-27b --topology v5p:4x4x4 --mesh fsdp=64 --set "
    "moe.dispatch=ep --set train.batch_size=64 --json --no-decode` under /usr/bin/time -v: "
    "708 s of CPU, 24 min wall at load 6-8 (three study sweeps), 13.96 GB peak RSS of the "
    "compiler (session 4: stopped after 781-866 s of CPU at 13.6-17.5 GB). It fits: 60.4 GiB "
    "per chip (64% of 95). The 10-minute goal is not met on this host (11.8 CPU-minutes, "
    "most of it libtpu's code generation: see the next section). `engram-40b` (3.2x the "
    "table rows, same backbone), same command: 708 s of CPU, 25 min wall, 14.5 GB peak RSS; "
    "fits at 63.5 GiB per chip (67%). Session 7 (2026-12-01 07:22, load 0.4), after the "
    "expert-parallel dispatch's fixes (7d6e416, d42428d), `python -m benchmarks.tpu_presets "
    "--only engram-27b` under /usr/bin/time -v: 446 s of CPU, 4.5 min wall, 13.0 GB peak RSS "
    "(the 10-minute goal met on a quiet host); HBM 60.4 -> 53.1 GiB per chip, all-reduce "
    "403.6 -> 366.1 GiB per chip per step, bytes accessed 7.29 -> 5.13 TB, est. MFU 11% -> "
    "15%. engram-40b, same (07:28, load 0.0): 462 s of CPU, 4.7 min wall, 12.6 GB peak RSS; "
    "HBM 63.5 -> 61.7 GiB per chip, est. MFU 15%. The other engram-27b entries were not "
    "recompiled.",
    "- The estimated MFU (11%) is bound by bytes accessed (roofline; XLA gave no "
    "`optimal_seconds` for this program) and is an upper bound: XLA counts the FLOPs and bytes "
    "of Newton-Schulz's scan once, not 5 times (the optimizer update alone: 39 TFLOP/chip "
    "counted vs 196 with the iterations unrolled, same arithmetic). Muon under FSDP is what "
    "the step spends most on: every chip orthogonalizes every expert matrix, and the Gram "
    "products of the scanned runs' expert stacks ([825 or 660, 1536, 1536] f32 per expert "
    "weight) are all-reduced at every iteration, about 210 GiB of the step's 404 GiB of "
    "all-reduce per chip (from those shapes x 3 weights x 5 iterations). Splitting the "
    "matrices over the chips (each orthogonalizes its own) is the next step for the MFU goal "
    "(>= 40%).",
    "- `dense-4b` (session 6, 2026-12-01): `engram-jax compile --preset dense-4b --topology "
    "v5p:2x2x2 --mesh fsdp=8 --set train.batch_size=16 --json --no-decode` (v5p-16: 8 chips, "
    "2 sequences of 4096 per chip) under /usr/bin/time -v: 165 s of CPU, 4.5 min wall, 3.1 GB "
    "peak RSS at load 4-5 (two study sweeps); fits at 48.3 GiB per chip (51%); at 1 per chip "
    "186 s of CPU, 6 min wall, 3.1 GB, 34.4 GiB (36%), est. MFU 30% vs 33% at 2 per chip. "
    "The earlier note that its compile did not finish dates from the unrolled 30-block "
    "program (no dense-4b compile had been run since `model.scan_layers`): scanned, its 30 "
    "dense blocks are one loop body and the program is smaller than engram-27b's (one run "
    "instead of two, no Engram or MoE blocks). Its MFU is an upper bound for the same reason "
    "as engram-27b's: XLA counts the 5 Newton-Schulz iterations of Muon's scan (over the 30 "
    "blocks' [2560, 12288] matrices) once.",
    "- `moe-27b` (session 6, 2026-12-01), the recipe's command (as engram-27b's): 442 s of "
    "CPU, 16 min wall, 6.9 GB peak RSS at load 5-6 (two study sweeps); fits at 52.8 GiB per "
    "chip (56%), est. MFU 11%, bound as engram-27b's by bytes accessed (roofline) and, as "
    "there, by Muon's replicated Newton-Schulz: its one scanned run stacks 29 x 72 = 2,088 "
    "expert matrices per weight, and its all-reduce (504 GiB per chip per step) exceeds "
    "engram-27b's (404 GiB). Half engram-27b's compile CPU: one scanned run instead of two "
    "and no Engram blocks. Session 7 (2026-12-01 06:35, load 0.8), after the expert-parallel "
    "dispatch's fix (see moe-27b-muon-split below): 371 s of CPU, 6.4 min wall, 7.7 GB peak "
    "RSS; all-reduce 504.2 -> 458.3 GiB per chip per step (29 x 1.58 GiB less), bytes "
    "accessed 6.92 -> 6.63 TB, est. MFU 11.4% -> 11.9%, HBM 52.8 -> 53.2 GiB per chip. "
    "After d42428d (06:57, load 1.7; the recompiles of 06:47-07:01 took 539 s of CPU for "
    "this entry and the async-ag one, 7.3 GB peak RSS): bytes accessed 6.63 -> 4.69 TB, XLA "
    "FLOPs 291 -> 223 TFLOP per chip, est. MFU 11.9% -> 16.8%. "
    "engram-27b's programs use the same dispatch but were not recompiled (their compile "
    "needs about 15 GB of host memory).",
    "- `ablation-3b` (session 6, 2026-12-01): `engram-jax compile --preset ablation-3b "
    "--topology v5p:2x2x2 --mesh fsdp=8 --set moe.dispatch=ep --set train.batch_size=16 "
    "--json --no-decode` (v5p-16: 8 chips, 2 sequences of 4096 per chip): 631 s of CPU, 18 "
    "min wall, 10.9 GB peak RSS at load 5-6 (two study sweeps; more compile than moe-27b: "
    "its program has engram-27b's structure, two Engram blocks and two scanned runs); fits "
    "at 26.7 GiB per chip (28%), tables 2.3 GiB per chip. Est. MFU 6%: the roofline on "
    "bytes accessed (5.2 TB per chip per step against 49 TFLOP of model FLOPs at d_model "
    "1280). At 4 sequences per chip (`ablation-3b-4-per-chip`: 622 s of CPU, 14 min wall, "
    "10.9 GB peak RSS) it fits at 42.3 GiB (45%), but the est. MFU stays 6%: the bytes "
    "accessed double with the batch (10.1 TB), so what bounds the estimate is per-token "
    "traffic, not a per-step cost (optimizer, tables) that a larger batch would amortize.",
    "- `engram-27b-muon-split` (session 6, 2026-12-01): engram-27b's command with `--set "
    "optim.muon_split=true` (each chip runs Muon on whole matrices of its own, "
    "`engram_jax/muon_split.py`): 775 s of CPU, 24 min wall, 14.9 GB peak RSS at load 5-8. "
    "Against `engram-27b`: all-reduce 403.6 -> 156.8 GiB per chip per step (all-to-all 0.1 "
    "-> 11.4 GiB: the matrices moved to their chip and back), HBM 60.4 -> 50.6 GiB per "
    "chip, XLA FLOPs 280.5 -> 247.5 TFLOP per chip (Newton-Schulz's scan counted once in "
    "both; the optimizer update alone: 39.3 -> 6.2). The est. MFU stays 11%: the estimate "
    "is the roofline on XLA's bytes accessed (7.29 -> 7.11 TB per chip per step), which "
    "the split barely changes. With the 5 Newton-Schulz iterations counted, the FLOPs per "
    "chip go from about 438 (280.5 - 39.3 + 196.3, the unrolled update) to at most 272 "
    "(247.5 + 4 x 6.2). Not yet the paper presets' default: dense-4b, engram-40b and "
    "ablation-3b were not recompiled with it.",
    "- `moe-27b-muon-split` (session 6, 2026-12-01 05:00, the host quiet: load 0.3-1.8): "
    "moe-27b's command with `--set optim.muon_split=true`: 344 s of CPU, 6 min wall, 8.1 GB "
    "peak RSS. Against `moe-27b`: all-reduce 504.2 -> 192.4 GiB per chip per step "
    "(all-to-all 0.1 -> 10.6 GiB), HBM 52.8 -> 42.1 GiB per chip, XLA FLOPs 290.8 -> 245.2 "
    "TFLOP per chip, bytes accessed 6.92 -> 6.63 TB: est. MFU 11% -> 12% (roofline on "
    "bytes accessed). Session 7 (2026-12-01 06:21, load 0.7), after the expert-parallel "
    "dispatch takes the expert weights into its shard_map FSDP-split and gathers them there "
    "(their gradients were psummed whole, and the backward re-gathered them in f32): 345 s "
    "of CPU, 3.5 min wall, 8.0 GB peak RSS; all-reduce 192.4 -> 146.5 GiB per chip per step, "
    "HBM 42.1 -> 39.4 GiB per chip, bytes accessed 6.63 -> 6.34 TB, est. MFU 11.9% -> 12.4%. "
    "What the all-reduce bytes are: the TPU profile section below. Then (06:47, load 2.8) "
    "with at most s*K dispatch slots per destination (d42428d; capacity_factor 2 on an "
    "expert axis of 1 had doubled every dispatch buffer): 275 s of CPU, 2.8 min wall, 7.3 GB "
    "peak RSS; bytes accessed 6.34 -> 4.39 TB, XLA FLOPs 245 -> 178 TFLOP per chip (the "
    "Pallas grouped matmul's cost counts its padding rows), est. step 2.29 -> 1.59 s, est. "
    "MFU 12.4% -> 18.0%, HBM 39.4 -> 38.8 GiB; all-reduce unchanged.",
    "- `moe-27b-muon-split-async-ag` (session 7, 2026-12-01 06:27, load 1.7): the same "
    "program compiled with libtpu's async all-gather flags (`LIBTPU_ARGS` in "
    "benchmarks/tpu_presets.py; `compile_in_subprocess(..., libtpu_args=)`, or "
    "LIBTPU_INIT_ARGS in the environment of `engram-jax compile`): 402 s of CPU, 7.7 min "
    "wall, 6.9 GB peak RSS. Without them libtpu lowers every FSDP all-gather over the 64 "
    "chips as an all-reduce of a zero-filled buffer; with them they are all-gathers: "
    "all-reduce 146.5 -> 49.1 GiB per chip per step (left: the gradient reductions), "
    "all-gather 5.8 GiB (an all-gather counts its operand, the chip's 1/64 shard, so it is "
    "not comparable with the all-reduces' full buffers), HBM 39.4 -> 42.7 GiB per chip (the "
    "prefetched gathers), bytes accessed 6.34 -> 6.24 TB, est. MFU 12.4% -> 12.6%. After "
    "d42428d (06:52, load 0.5; 164 s wall, 6.4 GB peak RSS): bytes accessed 4.34 TB, est. "
    "MFU 18.2%, HBM 41.9 GiB per chip.",
    "- `dense-4b-muon-split` (2026-12-01 05:08, load 1.1): dense-4b's command with `--set "
    "optim.muon_split=true`: no gain there. XLA FLOPs 316.3 -> 314.5 TFLOP per chip and "
    "est. MFU 33% unchanged (its plain program apparently did not replicate Newton-Schulz: 30 "
    "dense matrices per weight on 8 chips), while HBM grows 48.3 -> 54.4 GiB per chip (the "
    "re-laid-out copies) and all-to-all 0.2 -> 9.4 GiB. The split is for the expert stacks "
    "of the MoE presets.",
]


def run(name: str) -> dict:
    preset, topology, mesh, sets = RECIPES[name]
    request = dict(preset=preset, topology=topology, mesh=mesh, sets=sets, decode=False)
    report = compile_in_subprocess(request, libtpu_args=LIBTPU_ARGS.get(name, ""))
    return {**report, "sets": sets}


def imported(name: str, path: Path) -> dict:
    """The report of ``engram-jax compile --json --no-decode`` for RECIPES[name], run by hand
    (e.g. under /usr/bin/time): checked against the recipe."""
    preset, topology, mesh, sets = RECIPES[name]
    report = json.loads(path.read_text())
    got = (report["preset"], report["topology"], report["global_batch"])
    want = (preset, topology, override(get_preset(preset), sets).train.batch_size)
    if got != want or any(report["mesh"][k] != v for k, v in mesh.items()):
        raise SystemExit(f"{path}: report of {got}, not of the recipe {name} {want}")
    return {**report, "sets": sets}


def a2a_analytic(report: dict) -> int:
    """All-to-all bytes per chip per step of the "ep" dispatch: per MoE layer, tokens there
    and back ([n, C, D] in the compute dtype) plus the int32 slot ids, in the forward, its
    remat recomputation, and (tokens only) transposed in the backward."""
    cfg = override(get_preset(report["preset"]), report["sets"])
    n = report["mesh"]["expert"]
    shards = report["mesh"]["data"] * report["mesh"]["fsdp"]
    s = cfg.train.batch_size * cfg.train.seq_len // (shards * n)
    assignments = s * cfg.moe.top_k
    cap = max(1, min(assignments, math.ceil(cfg.moe.capacity_factor * assignments / n)))
    rows = n * cap * cfg.model.d_model * (2 if cfg.model.dtype == "bfloat16" else 4)
    per_layer = 2 * (2 * rows + n * cap * 4) + 2 * rows
    return per_layer * (cfg.model.n_layers - cfg.model.n_dense_layers)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def _rss(report: dict) -> str:
    rss = report.get("host_peak_rss_bytes")
    return "-" if rss is None else f"{rss / 1e9:.1f}"


def table(results: dict) -> list[str]:
    lines = [
        "| entry | slice | mesh (data,fsdp,expert,tensor) | batch (per chip) | HBM/chip GiB "
        "(% of 95) | tables/chip GiB | est. step s | est. MFU | FLOPs / step-time source | "
        "collectives GiB/step/chip | compile s, host peak RSS GB (load) |",
        "|---|---|---|---|---:|---:|---:|---:|---|---|---:|",
    ]
    for name, r in results.items():
        m = r["mesh"]
        pct = 100 * r["hbm_bytes_per_chip"] / r["hbm_capacity_bytes"]
        # a program XLA refused has no compiled estimate: no step time or MFU to show
        step = f"{r['est_step_s']:.2f}" if r["fits"] else "-"
        mfu = f"{100 * r['est_mfu']:.0f}%" if r["fits"] else "-"
        coll = ", ".join(f"{k} {_gib(v)}" for k, v in r["collective_bytes"].items()) or "-"
        lines.append(
            f"| {name} | {r['topology']} ({r['chips']} chips) | {m['data']},{m['fsdp']},"
            f"{m['expert']},{m['tensor']} | {r['global_batch']} ({r['batch_per_chip']:g}) | "
            f"{_gib(r['hbm_bytes_per_chip'])} ({pct:.0f}%)"
            f"{'' if r['fits'] else ' DOES NOT FIT'} | {_gib(r['table_bytes_per_chip'])} | "
            f"{step} | {mfu} | {r['flops_source']} / {r['est_source']} | {coll} | "
            f"{r['wall_s']:.0f}, {_rss(r)} ({r['load_at_start']}) |"
        )
    return lines


def _rows_check(name: str, one: dict, more: dict) -> str:
    """Collective bytes of engram-27b against a compile with more table rows."""
    # reports made before loop trips were counted hold per-instruction bytes only
    key = "collective_bytes_per_instruction"
    a, b = (r.get(key, r["collective_bytes"]) for r in (one, more))
    return (
        f"- engram-27b vs {name}: tables {_gib(one['table_bytes_per_chip'])} vs "
        f"{_gib(more['table_bytes_per_chip'])} GiB per chip; collective bytes of the program's "
        f"instructions (each once) {'IDENTICAL' if a == b else 'DIFFER'}: "
        f"{sum(a.values()):,} vs {sum(b.values()):,} B."
    )


def notes(results: dict) -> list[str]:
    out = []
    one, forty = results.get("engram-27b"), results.get("engram-40b")
    if one and forty and one["collective_bytes"] and forty["collective_bytes"]:
        out.append(_rows_check("engram-40b (3.2x table rows, same backbone)", one, forty))
    four = results.get("engram-27b-4x-rows")
    if one and four:
        same = one["collective_bytes"] == four["collective_bytes"]
        b1, b4 = (sum(r["collective_bytes"].values()) for r in (one, four))
        out.append(
            f"- engram-27b table traffic: tables {_gib(one['table_bytes_per_chip'])} vs "
            f"{_gib(four['table_bytes_per_chip'])} GiB per chip (1x vs 4x rows); collective "
            f"bytes per step {'IDENTICAL' if same else 'DIFFER'}: "
            f"{b1:,} vs {b4:,} B."
        )
    for name, r in results.items():
        if r["mesh"]["expert"] > 1 and r.get("collective_bytes"):
            out.append(
                f"- {name}: all-to-all bytes per chip per step in the compiled HLO "
                f"{r['collective_bytes'].get('all-to-all', 0):,} vs analytic {a2a_analytic(r):,} "
                f"(expert axis {r['mesh']['expert']})."
            )
    return out


def _save(results: dict) -> None:
    results = {k: results[k] for k in RECIPES if k in results}
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", choices=sorted(RECIPES), help="recompile these")
    ap.add_argument("--table-only", action="store_true", help="no compile: table from the JSON")
    ap.add_argument("--update", type=Path, help="replace this section of a markdown file")
    ap.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="store a report saved by `engram-jax compile --json --no-decode` as entry NAME",
    )
    args = ap.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for item in args.imports:
        name, _, path = item.partition("=")
        results[name] = imported(name, Path(path))
    todo = [] if args.table_only or args.imports else (args.only or list(RECIPES))
    for name in todo:
        print(f"compiling {name} ...", flush=True)
        results[name] = run(name)
        _save(results)
    _save(results)
    lines = [
        HEADING,
        "",
        f"Command: `{command_line()}` (raw reports: `benchmarks/tpu_presets.json`)  ",
        f"Date: {date_utc()}  ",
        "Each row is one `engram-jax compile --preset P --topology T --mesh M --set ...` of the "
        "REAL train step for a v5p slice (95 GiB HBM, 459 TFLOP/s bf16 per chip), compiled by "
        "libtpu 0.0.42.1 on this 2-core CPU host shared with other jobs (load average at the "
        "start in the last column). HBM is the compiled program's per-chip footprint "
        "(arguments + outputs - donated + temporaries + code); the step time is XLA's own "
        "estimate (`optimal_seconds`) when it gives one, else the roofline max(FLOPs / peak, "
        "bytes accessed / HBM bandwidth), a lower bound (the source column says which); MFU = "
        "analytic model FLOPs (6 x matmul params x tokens + attention) / (step time x peak). "
        "The paper presets run with `model.scan_layers` (each run of identical blocks is "
        "one `lax.scan`): XLA counts a loop body once, so the FLOPs and bytes of one block's "
        "forward + backward, compiled alone on the same mesh, are added once per further "
        "layer (source `xla + scanned blocks`), and the HLO's collectives are counted once per "
        "loop trip. "
        "Estimates, not measurements on a TPU. The presets use `moe.dispatch=ep` on an expert "
        "axis of 1 (a local, per-chip dispatch: the global-batch sort of the single-program "
        "dispatches needs hundreds of GiB per chip); the batch is split over data x fsdp only, "
        "so an expert axis > 1 would repeat the attention work of its chips. The all-to-all "
        "volume of an expert axis of 4 is checked against the analytic one on a v5p:2x2x1 "
        "compile in `tests/test_tpu_compile.py`.",
        "",
        *table(results),
        "",
        *notes(results),
        *STATUS,
    ]
    publish(HEADING, lines, args.update)


if __name__ == "__main__":
    main()
