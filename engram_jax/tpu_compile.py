"""Compile the real train and decode steps for a Cloud TPU slice on a CPU host (ahead of time).

With ``libtpu`` importable, ``jax.experimental.topologies.get_topology_desc`` returns the chips
of a named slice (``v5p:4x4x8`` = v5p-256, 128 chips) without any TPU; the train step is lowered on
abstract arguments (shapes + ``NamedSharding``s, nothing allocated) over a mesh of those chips
and compiled by the TPU compiler. The report, per chip: parameter / optimizer / table bytes
(from the shardings), activation bytes (the program's temporaries), the total against the
chip's HBM, FLOPs, the compiler's step-time estimate and the MFU it implies, and the
collectives of the compiled HLO by kind.

Processes: :func:`compile_in_subprocess` (the CLI side, any process) starts
``python -m engram_jax.tpu_compile`` with its own environment (``JAX_PLATFORMS=cpu`` for the
host work, ``TPU_SKIP_MDS_QUERY=1``), so libtpu never loads into a CPU training or test
process. libtpu comes from the ``tpu`` extra, or from a directory given by
``ENGRAM_JAX_LIBTPU_DIR`` (``pip install --target DIR libtpu==0.0.42.1``) that only the child
sees on its ``PYTHONPATH``.

FLOPs. XLA's cost analysis counts a while-loop body once (JAX_NOTES). With
``model.scan_layers`` the blocks of a scanned run are one loop body: one block's forward and
backward is compiled alone on the same mesh and its FLOPs, bytes and ``optimal_seconds`` are
added once per further layer (``flops_source`` "xla + scanned blocks"); the HLO's
collectives are counted once per loop trip (:mod:`engram_jax.hlo`). The count is checked
against the analytic model FLOPs (6 x matmul parameters per token + attention scores); when it
is still lower, the analytic count (times the program's remat factor, 4/3) is used and
``flops_source`` says so. The step time is XLA's ``optimal_seconds`` when it gives one
(``est_source`` "xla"), else the roofline max(FLOPs / peak, bytes accessed / HBM bandwidth)
(``est_source`` "roofline": a lower bound). MFU = model FLOPs / (step time x chip bf16 peak).
Every report also holds the command's wall time, the host's load when it began and the
compiling process's peak resident memory (``host_peak_rss_bytes``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

GiB = 1024**3


@dataclass(frozen=True)
class Chip:
    hbm_bytes: int
    bf16_flops: float  # peak dense bf16 FLOP/s per chip
    hbm_bw: float  # bytes/s per chip


# Cloud TPU per-chip figures (Google Cloud TPU system architecture pages).
CHIPS = {
    "v4": Chip(32 * GiB, 275e12, 1.2e12),
    "v5e": Chip(16 * GiB, 197e12, 0.82e12),
    "v5p": Chip(95 * GiB, 459e12, 2.765e12),
    "v6e": Chip(32 * GiB, 918e12, 1.64e12),
}
_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):([1-9][0-9]*)x([1-9][0-9]*)(?:x([1-9][0-9]*))?$")
LIBTPU_DIR_ENV = "ENGRAM_JAX_LIBTPU_DIR"


def parse_topology(name: str) -> tuple[str, int]:
    """``"v5p:4x4x8"`` -> ``("v5p", 128)``; ValueError naming the accepted form otherwise."""
    m = _TOPOLOGY.match(name)
    if not m or (m.group(1) in ("v4", "v5p")) != (m.group(4) is not None):
        raise ValueError(
            f"--topology {name!r} is not a TPU slice name: use v4:AxBxC, v5p:AxBxC, v5e:AxB or "
            "v6e:AxB (chips per dimension), e.g. v5p:4x4x8 for v5p-256, v5e:16x16 for v5e-256"
        )
    dims = [int(g) for g in m.groups()[1:] if g]
    n = 1
    for d in dims:
        n *= d
    return m.group(1), n


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,fsdp=32"`` -> ``{"data": 2, "fsdp": 32}`` (axes not named keep the config's)."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, _, value = item.partition("=")
        if key not in ("data", "fsdp", "expert", "tensor") or not re.fullmatch(r"-?\d+", value):
            raise ValueError(
                f"--mesh {text!r}: expected comma-separated AXIS=SIZE with AXIS in "
                "data, fsdp, expert, tensor (one size may be -1), e.g. fsdp=64,tensor=2"
            )
        out[key] = int(value)
    return out


# ---------------------------------------------------------------------------------------------
# The CLI side: run the compile in a child process


def libtpu_path() -> str | None:
    """Where the child finds libtpu: ``""`` if this Python has it, the ENGRAM_JAX_LIBTPU_DIR
    directory if that holds it, else None."""
    import importlib.util

    extra = os.environ.get(LIBTPU_DIR_ENV, "")
    if extra and os.path.isdir(os.path.join(extra, "libtpu")):
        return extra
    return "" if importlib.util.find_spec("libtpu") is not None else None


def child_env(extra_path: str) -> dict[str, str]:
    env = dict(os.environ)
    # several compiles (or a compile next to a TPU job) may load libtpu at once
    env.update(
        JAX_PLATFORMS="cpu",
        TPU_SKIP_MDS_QUERY="1",
        ALLOW_MULTIPLE_LIBTPU_LOAD="1",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # compile-only TPU programs are not cached
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_path, env.get("PYTHONPATH")]))
    return env


def compile_in_subprocess(
    request: dict, timeout_s: float | None = None, libtpu_args: str | None = None
) -> dict:
    """Run :func:`compile_report` on ``request`` in a fresh process; return its report.

    ``request``: ``preset``, ``topology``, ``mesh`` (dict), ``sets`` (list), ``decode`` (bool).
    ``libtpu_args``: the TPU compiler's flags (``LIBTPU_INIT_ARGS``, as a TPU run sets them);
    default: this process's ``LIBTPU_INIT_ARGS``, if any. The report says which
    (``libtpu_init_args``): they change how collectives are lowered (BENCHMARKS.md, TPU profile).
    Raises ValueError with a one-line message on any
    problem the user can fix (libtpu missing, bad topology, mesh not dividing the chips)."""
    parse_topology(request["topology"])
    path = libtpu_path()
    if path is None:
        raise ValueError(
            "libtpu is not installed: pip install 'engram-jax[tpu]' (or point "
            f"{LIBTPU_DIR_ENV} at a directory made by pip install --target DIR libtpu==0.0.42.1)"
        )
    env = child_env(path)
    if libtpu_args is not None:
        env["LIBTPU_INIT_ARGS"] = libtpu_args
    start, load = time.time(), os.getloadavg()[0]
    proc = subprocess.run(
        [sys.executable, "-m", "engram_jax.tpu_compile", json.dumps(request)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if proc.returncode == 2:  # a user error, already one line
        raise ValueError(proc.stderr.strip().splitlines()[-1])
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"TPU compile process failed (exit {proc.returncode}):\n{tail}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # the whole command's time (state building, compiles) and the host's load when it began
    report.update(
        wall_s=round(time.time() - start, 1),
        load_at_start=round(load, 1),
        libtpu_init_args=env.get("LIBTPU_INIT_ARGS", ""),
    )
    return report


def _main(argv: list[str]) -> int:
    request = json.loads(argv[0])
    try:
        from engram_jax.tpu_report import compile_report

        report = compile_report(**request)
    except ValueError as e:
        print(str(e).splitlines()[0], file=sys.stderr)
        return 2
    import resource  # the compiler's host memory: what a machine needs to run this command

    report["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
