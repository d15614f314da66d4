"""What a TPU compile costs on this host, one part of the program at a time.

Compiles, for a TPU slice on the CPU host (libtpu, as ``engram-jax compile``), either the
whole train step (``--part step``; without the scanned-block cost compile and the decode step
that ``engram-jax compile`` adds) or only its optimizer update (``--part optimizer``: the
optimizer's stacked view, the update and the unstacking, on gradients shaped like the
parameters), and prints one JSON line: compile seconds, this process's CPU seconds and peak
RSS, the number of fusion kernels of the compiled HLO, per-chip temporaries, XLA's FLOPs and
the collectives' bytes per step. ``--dump-hlo FILE`` also writes the compiled HLO text (its
collectives carry their shapes, replica groups and ``op_name`` metadata).
``--unrolled-ns`` compiles Muon with optax's default unrolled Newton-Schulz iterations (the
optimizer before it ran them as one scan), for comparison.

Run it the way the compile command runs its child (libtpu must not load into a CPU process):

    JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 python -m benchmarks.tpu_compile_probe \\
        --preset engram-27b --topology v5p:4x4x4 --mesh fsdp=64 --part optimizer \\
        --set moe.dispatch=ep --set train.batch_size=64

Figures and their load: BENCHMARKS.md, "What bounds the TPU compile of the 27B presets".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import time

from benchmarks.common import cpu_seconds


def _args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", required=True)
    ap.add_argument("--topology", required=True)
    ap.add_argument("--mesh", default="", help="e.g. fsdp=64")
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--part", choices=("step", "optimizer"), default="step")
    ap.add_argument("--unrolled-ns", action="store_true")
    ap.add_argument("--dump-hlo", default="", help="write the compiled HLO text to this file")
    return ap.parse_args()


def _program(cfg, mesh, part: str):
    """``(fn, args, donate)`` of the part to compile."""
    import optax

    from engram_jax.layer_stack import scanned_runs, stack_runs, unstack_runs
    from engram_jax.optim import make_optimizer
    from engram_jax.state import abstract_train_state
    from engram_jax.step import make_train_step
    from engram_jax.tpu_report import abstract_batch

    tx = make_optimizer(cfg, cfg.train.steps)
    graphdef, state = abstract_train_state(cfg, mesh, tx)
    if part == "step":
        return make_train_step(cfg, graphdef, tx, mesh), (state, abstract_batch(cfg, mesh)), 0
    runs = scanned_runs(cfg)

    def update(params, opt, grads):
        view = stack_runs(params, runs)
        updates, opt = tx.update(stack_runs(grads, runs), opt, view, table_sq_norm=0.0)
        return unstack_runs(optax.apply_updates(view, updates), params, runs), opt

    return update, (state["params"], state["opt"], state["params"]), (0, 1)


def main() -> None:
    a = _args()
    import jax

    from engram_jax import sharding as shd
    from engram_jax.config import override
    from engram_jax.presets import get_preset
    from engram_jax.tpu_compile import parse_mesh
    from engram_jax.tpu_report import _cost, _memory, collective_bytes, tpu_devices

    # --unrolled-ns: optax's default, the iterations unrolled (optim.muon_ns_scan=False)
    sets = [*a.sets, "optim.muon_ns_scan=False"] if a.unrolled_ns else a.sets
    cfg = override(get_preset(a.preset), sets)
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, **parse_mesh(a.mesh)))
    mesh = shd.make_mesh(cfg.mesh, tpu_devices(a.topology))
    load, cpu0 = os.getloadavg()[0], cpu_seconds()
    fn, args, donate = _program(cfg, mesh, a.part)
    with jax.set_mesh(mesh):
        lowered = jax.jit(fn, donate_argnums=donate).lower(*args)
        start = time.perf_counter()
        compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    memory, cost, text = _memory(compiled), _cost(compiled), compiled.as_text()
    if a.dump_hlo:
        with open(a.dump_hlo, "w") as f:
            f.write(text)
    out = dict(
        preset=a.preset,
        topology=a.topology,
        mesh=dict(mesh.shape),
        sets=a.sets,
        part=a.part,
        unrolled_ns=a.unrolled_ns,
        compile_s=round(compile_s, 1),
        cpu_s=round(cpu_seconds() - cpu0, 1),
        peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        fusions=text.count(" fusion("),
        temp_gib=round(memory["temp"] / 2**30, 2),
        xla_flops_per_chip=cost["flops"],
        xla_bytes_accessed_per_chip=cost["bytes accessed"],
        collective_bytes=collective_bytes(text),
        load_at_start=round(load, 1),
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
