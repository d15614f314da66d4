"""The child side of :mod:`engram_jax.tpu_compile`: build, compile and measure (needs libtpu).

:func:`compile_report` lowers the real train step (:func:`engram_jax.step.make_train_step`)
and a cached decode step on abstract arguments over a TPU slice's chips and reads the compiled
programs: ``memory_analysis()`` (per-chip argument / temporary / output bytes),
``cost_analysis()`` (FLOPs, the compiler's ``optimal_seconds``) and the HLO's collectives
(:mod:`engram_jax.hlo`, operand bytes per chip per step).
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import math
import re
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from engram_jax import hlo
from engram_jax import sharding as shd
from engram_jax.config import Config, override
from engram_jax.params import count_params
from engram_jax.tpu_compile import CHIPS, parse_topology

REMAT_FACTOR = 4 / 3  # forward recomputed once in the backward pass: (1 + 1 + 2) / (1 + 2)


def tpu_devices(topology: str) -> list:
    from jax.experimental import topologies

    parse_topology(topology)
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except Exception as e:  # e.g. a slice shape libtpu does not know
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"--topology {topology!r}: libtpu gave no devices for it ({first})"
        ) from None


def model_flops_per_step(cfg: Config) -> float:
    """Analytic training FLOPs of one step (no remat): 6 x matmul parameters a token touches x
    tokens, plus the attention scores and values over the full T x T matrix (computed masked)."""
    m, counts = cfg.model, count_params(cfg)
    engram_rows = len(cfg.engram.layer_ids) * cfg.engram.n_hash_heads * cfg.engram.d_head
    matmul_params = counts["activated"] - engram_rows + counts["breakdown"]["lm_head"]
    tokens = cfg.train.batch_size * cfg.train.seq_len
    qk = m.head_dim + (m.qk_rope_head_dim if m.attention == "mla" else 0)
    attn = 3 * 2 * m.n_layers * cfg.train.seq_len * m.n_heads * (qk + m.head_dim)
    return 6.0 * matmul_params * tokens + attn * tokens


def _shard_bytes(x) -> int:
    if not hasattr(x, "shape"):
        return 0
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return math.prod(shape) * jnp.dtype(x.dtype).itemsize


def bytes_per_chip(tree) -> int:
    return sum(_shard_bytes(x) for x in jax.tree.leaves(tree))


def collective_bytes(hlo_text: str, per_trip: bool = True) -> dict[str, int]:
    """Operand bytes per kind: per step (a collective in a loop body once per trip), or with
    ``per_trip=False`` each collective instruction once."""
    out: dict[str, int] = collections.Counter()
    for c in hlo.collectives(hlo_text):
        out[c.op] += c.step_bytes if per_trip else c.bytes
    return dict(sorted(out.items()))


def _memory(compiled) -> dict:
    ma = compiled.memory_analysis()
    device = (
        ma.argument_size_in_bytes
        + ma.output_size_in_bytes
        - ma.alias_size_in_bytes
        + ma.temp_size_in_bytes
        + ma.generated_code_size_in_bytes
    )
    return dict(hbm=int(device), temp=int(ma.temp_size_in_bytes))


def _cost(compiled) -> dict:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return {k: float(ca.get(k, 0.0)) for k in ("flops", "bytes accessed", "optimal_seconds")}


def _estimate(cost: dict, model_flops: float, chip, n_chips: int, scanned: dict) -> dict:
    """Per-chip FLOPs, step time and MFU. ``scanned`` (:func:`_scanned_blocks_cost`) holds
    what XLA's count misses of a scan over blocks: its body is counted once, so the other
    trips are added from a compile of the body alone. If the count is still below the
    analytic one (another loop), the analytic count (times the remat factor) is used."""
    xla = cost["flops"] + scanned.get("flops", 0.0)
    xla_s = cost["optimal_seconds"]  # < 0: XLA has no estimate for this program
    xla_s = xla_s + scanned.get("optimal_seconds", 0.0) if xla_s > 0 else xla_s
    accessed = cost["bytes accessed"] + scanned.get("bytes accessed", 0.0)
    analytic = model_flops / n_chips
    if xla >= analytic:
        flops, source = xla, "xla + scanned blocks" if scanned else "xla"
    else:
        flops, source = analytic * REMAT_FACTOR, "analytic"
    roofline = max(flops / chip.bf16_flops, accessed / chip.hbm_bw)
    # optimal_seconds covers a loop body once as well; scale it like the FLOPs
    step_s = xla_s * flops / xla if xla_s > 0 and xla > 0 else roofline
    return {
        "flops_per_chip": flops,
        "flops_source": source,
        "bytes_accessed_per_chip": accessed,
        "xla_flops_per_chip": xla,
        "model_flops_per_chip": analytic,
        "est_step_s": step_s,
        "est_source": "xla" if xla_s > 0 else "roofline",
        "est_mfu": analytic / (step_s * chip.bf16_flops) if step_s > 0 else 0.0,
    }


def _scanned_blocks_cost(cfg: Config, mesh, graphdef, state) -> dict:
    """FLOPs and ``optimal_seconds`` per chip that XLA's cost analysis of the train step
    misses with ``model.scan_layers``: a scan over n blocks is counted as one block, so add
    (n - 1) x the cost of one block's forward and backward (with remat: the forward twice),
    compiled alone on the same mesh. Empty without runs of scanned blocks."""
    from engram_jax.layer_stack import scanned_runs

    model = nnx.merge(graphdef, state["params"], state["tables"], state["rest"])
    extra: dict[int, int] = collections.Counter()  # first block of a structure -> extra trips
    firsts = {}
    for start, stop in scanned_runs(cfg):
        first = firsts.setdefault(nnx.graphdef(model.blocks[start]), start)
        extra[first] += stop - start - 1
    out = dict.fromkeys(("flops", "bytes accessed", "optimal_seconds"), 0.0)
    for first, trips in extra.items():
        cost = _cost(_compile_block(cfg, mesh, model.blocks[first]))
        for key in out:  # optimal_seconds < 0: XLA has no estimate
            out[key] += trips * max(cost[key], 0.0)
    return out if extra else {}


def _compile_block(cfg: Config, mesh, block):
    """One block's forward + backward (the scan body of the train step), compiled."""
    block_def, block_state = nnx.split(block)
    m = cfg.model
    shape = (cfg.train.batch_size, cfg.train.seq_len, m.hc_mult, m.d_model)
    h = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=shd.data_sharding(mesh))

    def fwd(state, h_BxTxMxD):
        out_BxTxMxD, load_E, _ = nnx.merge(block_def, state)(h_BxTxMxD)
        return shd.constrain_batch(out_BxTxMxD), load_E

    fwd = jax.checkpoint(fwd) if m.remat else fwd

    def fwd_bwd(state, h_BxTxMxD):
        out_BxTxMxD, vjp, load_E = jax.vjp(fwd, state, h_BxTxMxD, has_aux=True)
        return vjp(out_BxTxMxD), load_E

    return _compile(fwd_bwd, (block_state, h), (), mesh)[0]


# ---------------------------------------------------------------------------------------------
# Abstract arguments


def _sds(x, sharding):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def abstract_batch(cfg: Config, mesh) -> dict:
    b, t = cfg.train.batch_size, cfg.train.seq_len
    ds = shd.data_sharding(mesh)
    ids = jax.ShapeDtypeStruct((b, t, cfg.engram.n_hash_heads), jnp.int32, sharding=ds)
    tokens = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=ds)
    return dict(inputs=tokens, targets=tokens, engram_ids={i: ids for i in cfg.engram.layer_ids})


# ---------------------------------------------------------------------------------------------
# The steps


def make_decode_step(graphdef):
    """One cached decode step on device-resident tables: ``(model_state, tokens [B,1],
    ids {layer: [B,1,H]}, cache, pos) -> (next token [B], cache)``; greedy."""

    def step(model_state, tokens_Bx1, ids, cache, pos):
        model = nnx.merge(graphdef, *model_state)
        h_BxTxMxD = model.embed_tokens(tokens_Bx1)
        new = {}
        for i, block in enumerate(model.blocks):
            rows = block.engram.table.rows(ids[i]) if block.engram is not None else None
            h_BxTxMxD, new[i], _ = block.step(h_BxTxMxD, cache[i], pos, rows)
        logits_BxTxV = model.readout(h_BxTxMxD)
        return jnp.argmax(logits_BxTxV[:, -1], axis=-1).astype(jnp.int32), new

    return step


def _decode_args(cfg: Config, mesh, graphdef, state) -> tuple:
    from engram_jax.generate import init_cache

    b, s = cfg.train.batch_size, cfg.train.seq_len
    ds, rep = shd.data_sharding(mesh), NamedSharding(mesh, PartitionSpec())
    model_state = (state["params"], state["tables"], state["rest"])
    model = nnx.eval_shape(lambda: nnx.merge(graphdef, *model_state))
    cache = jax.eval_shape(lambda: init_cache(model, b, s))
    cache = jax.tree.map(lambda x: _sds(x, ds), cache)
    ids = jax.ShapeDtypeStruct((b, 1, cfg.engram.n_hash_heads), jnp.int32, sharding=ds)
    tokens = jax.ShapeDtypeStruct((b, 1), jnp.int32, sharding=ds)
    pos = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    return model_state, tokens, {i: ids for i in cfg.engram.layer_ids}, cache, pos


class DoesNotFit(Exception):
    """The TPU compiler refused the program: its temporaries exceed the chip's HBM."""

    def __init__(self, temp_bytes: int, seconds: float):
        super().__init__(temp_bytes)
        self.temp_bytes, self.seconds = temp_bytes, seconds


_OOM = re.compile(r"HLO temporaries \(([0-9.]+)([KMGT])\)")


def _compile(fn, args, donate, mesh):
    """``(compiled, seconds)``; raises :class:`DoesNotFit` when XLA runs out of HBM. The mesh
    context is for code that shard_maps over it (``moe.dispatch="ep"``)."""
    start = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:
        m = _OOM.search(str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not m:
            raise
        scale = 1024 ** "KMGT".index(m.group(2)) * 1024
        raise DoesNotFit(int(float(m.group(1)) * scale), time.perf_counter() - start) from None
    return compiled, time.perf_counter() - start


def _state_report(cfg, topology: str, n_chips: int, mesh_, state, chip) -> dict:
    """The report's entries known before compiling: the run's shape and the state's bytes."""
    from engram_jax.state import TABLE_STATE

    table_keys = ("tables", *TABLE_STATE)
    table_bytes = sum(bytes_per_chip(state[k]) for k in table_keys)
    return dict(
        preset=cfg.name,
        topology=topology,
        chips=n_chips,
        mesh=dict(mesh_.shape),
        moe_dispatch=cfg.moe.dispatch,
        batch_per_chip=cfg.train.batch_size / n_chips,
        global_batch=cfg.train.batch_size,
        seq_len=cfg.train.seq_len,
        param_bytes_per_chip=bytes_per_chip(state["params"]) + bytes_per_chip(state["rest"]),
        optimizer_bytes_per_chip=bytes_per_chip(state["opt"]),
        table_bytes_per_chip=table_bytes,
        hbm_capacity_bytes=chip.hbm_bytes,
    )


def compile_report(
    preset: str,
    topology: str,
    mesh: dict | None = None,
    sets: list | tuple = (),
    decode: bool = True,
) -> dict:
    """Compile ``preset`` (+ ``--set`` overrides, ``mesh`` axis sizes) for ``topology``; the
    report is a flat JSON-able dict (keys in the CLI's ``--json`` documentation)."""
    from engram_jax.optim import make_optimizer
    from engram_jax.presets import get_preset
    from engram_jax.state import abstract_train_state
    from engram_jax.step import make_train_step

    cfg = override(get_preset(preset), list(sets))
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, **(mesh or {})))
    gen, n_chips = parse_topology(topology)
    chip = CHIPS[gen]
    devices = tpu_devices(topology)
    mesh_ = shd.make_mesh(cfg.mesh, devices)
    shd.check_batch_split(mesh_, cfg.train.batch_size)
    host_ok = "pinned_host" in _memory_kinds(devices[0])

    tx = make_optimizer(cfg, cfg.train.steps)
    graphdef, state = abstract_train_state(cfg, mesh_, tx)
    report = _state_report(cfg, topology, n_chips, mesh_, state, chip)
    table_bytes = report["table_bytes_per_chip"]
    model_flops = model_flops_per_step(cfg)
    # the scanned block alone first: its compiler memory is freed before the big compile
    scanned = _scanned_blocks_cost(cfg, mesh_, graphdef, state)
    gc.collect()
    step = make_train_step(cfg, graphdef, tx, mesh_)
    try:
        compiled, compile_s = _compile(step, (state, abstract_batch(cfg, mesh_)), 0, mesh_)
    except DoesNotFit as e:
        return {**report, **_unfit(report, e, model_flops, chip, n_chips, host_ok)}
    memory, cost, text = _memory(compiled), _cost(compiled), compiled.as_text()
    del compiled
    report.update(
        activation_bytes_per_chip=memory["temp"],
        hbm_bytes_per_chip=memory["hbm"],
        fits=memory["hbm"] <= chip.hbm_bytes,
        **_host_tables(memory["hbm"], table_bytes, chip, host_ok),
        xla_optimal_seconds=cost["optimal_seconds"],
        collective_bytes=collective_bytes(text),
        collective_bytes_per_instruction=collective_bytes(text, per_trip=False),
        compile_s=round(compile_s, 1),
        **_estimate(cost, model_flops, chip, n_chips, scanned),
    )
    if decode:
        report["decode"] = _decode_report(cfg, mesh_, graphdef, state, chip)
    return report


def _host_tables(hbm: int, table_bytes: int, chip, host_ok: bool) -> dict:
    """HBM left when the tables and their moments (sharded, per chip) live in the host's
    pinned memory instead: the chips then hold only the rows a step looks up."""
    return dict(
        pinned_host_supported=host_ok,
        hbm_bytes_per_chip_tables_on_host=hbm - table_bytes,
        fits_with_tables_on_host=host_ok and hbm - table_bytes <= chip.hbm_bytes,
    )


def _unfit(report: dict, e: DoesNotFit, model_flops: float, chip, n_chips: int, host_ok) -> dict:
    """The report of a program XLA refused: temporaries from its message, analytic FLOPs."""
    args = sum(report[k] for k in report if k.endswith("_bytes_per_chip"))
    flops = model_flops / n_chips
    step_s = flops * REMAT_FACTOR / chip.bf16_flops
    return dict(
        activation_bytes_per_chip=e.temp_bytes,
        hbm_bytes_per_chip=args + e.temp_bytes,
        fits=False,
        **_host_tables(args + e.temp_bytes, report["table_bytes_per_chip"], chip, host_ok),
        collective_bytes={},
        compile_s=round(e.seconds, 1),
        flops_per_chip=flops * REMAT_FACTOR,
        flops_source="analytic (XLA refused the program: out of HBM)",
        model_flops_per_chip=flops,
        est_step_s=step_s,
        est_source="analytic lower bound",
        est_mfu=flops / (step_s * chip.bf16_flops),
    )


def _decode_report(cfg: Config, mesh, graphdef, state, chip) -> dict:
    args = _decode_args(cfg, mesh, graphdef, state)
    out = dict(batch=cfg.train.batch_size, cache_len=cfg.train.seq_len)
    try:
        dec, dec_s = _compile(make_decode_step(graphdef), args, (3,), mesh)
    except DoesNotFit as e:
        return {**out, "fits": False, "compile_s": round(e.seconds, 1)}
    mem, cost = _memory(dec), _cost(dec)
    return dict(
        out,
        hbm_bytes_per_chip=mem["hbm"],
        fits=mem["hbm"] <= chip.hbm_bytes,
        est_step_s=max(cost["flops"] / chip.bf16_flops, cost["bytes accessed"] / chip.hbm_bw),
        collective_bytes=collective_bytes(dec.as_text()),
        compile_s=round(dec_s, 1),
    )


def _memory_kinds(device) -> set[str]:
    try:
        return {m.kind for m in device.addressable_memories()}
    except Exception:  # a runtime without memory spaces
        return {"device"}
