"""``engram-jax compile``: the real train step compiled for a small TPU slice on this CPU host.

libtpu comes from a directory of its own (``pip install --target``, cached under
``~/.cache/engram-jax``) that only the compile subprocess sees (``ENGRAM_JAX_LIBTPU_DIR``):
this test process and the rest of the suite never load it. The tests skip only when the
package registry cannot be reached.

Oracles: per-chip parameter and table bytes from the analytic parameter count and the
sharding rule (tables split over every chip, everything else replicated on a data-parallel
mesh); the analytic model FLOPs as a floor for the compiled program's FLOPs; collective
bytes at 1x and 4x table rows (the CPU HLO test's property, on the TPU program).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEST_XLA_FLAGS, TINY

from engram_jax.config import override
from engram_jax.params import count_params, engram_table_rows
from engram_jax.presets import get_preset

LIBTPU = "libtpu==0.0.42.1"  # the one jax[tpu]==0.10.2 pins
TOPOLOGY = "v5p:2x2x1"  # 4 chips
# conftest's TINY at sequence length 32, without its schedule settings (warmup, steps)
SMALL = [
    *(s for s in TINY if not s.startswith(("train.seq_len", "train.steps", "optim."))),
    "train.seq_len=32",
]
_UNREACHABLE = ("No matching distribution", "Could not find a version", "connection", "resolve")


@pytest.fixture(scope="session")
def libtpu_dir() -> str:
    """A directory holding libtpu, installed once per machine outside every venv."""
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    target = home / "engram-jax" / LIBTPU.replace("==", "-")
    if not (target / "libtpu").is_dir():
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp)]
        r = subprocess.run([*cmd, LIBTPU], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            if any(s.lower() in r.stderr.lower() for s in _UNREACHABLE):
                pytest.skip(f"package registry unreachable, cannot install {LIBTPU}")
            raise RuntimeError(f"pip install {LIBTPU} failed:\n{r.stderr[-2000:]}")
        tmp.rename(target)
    return str(target)


def cli(*args, libtpu: str | None, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "ENGRAM_JAX_LIBTPU_DIR"}
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(TEST_XLA_FLAGS, "")  # as a real run
    if libtpu is not None:
        env["ENGRAM_JAX_LIBTPU_DIR"] = libtpu
    return subprocess.run(
        [sys.executable, "-m", "engram_jax.cli", "compile", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def compile_json(libtpu, *sets, extra=()):
    args = ["--preset", "tiny", "--topology", TOPOLOGY, "--json", *extra]
    for s in (*SMALL, *sets):
        args += ["--set", s]
    r = cli(*args, libtpu=libtpu)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def report(libtpu_dir):
    return compile_json(libtpu_dir)


@pytest.mark.slow
def test_report_keys_and_fit(report):
    for key in (
        "topology",
        "mesh",
        "fits",
        "hbm_bytes_per_chip",
        "hbm_capacity_bytes",
        "flops_per_chip",
        "est_step_s",
        "est_mfu",
        "collective_bytes",
        "table_bytes_per_chip",
    ):
        assert key in report, key
    assert report["topology"] == TOPOLOGY and report["chips"] == 4
    assert report["mesh"] == {"data": 4, "fsdp": 1, "expert": 1, "tensor": 1}
    assert report["hbm_capacity_bytes"] == 95 * 2**30 and report["fits"] is True
    assert isinstance(report["fits"], bool)
    assert report["decode"]["fits"] is True and report["decode"]["hbm_bytes_per_chip"] > 0


@pytest.mark.slow
def test_bytes_per_chip_match_the_parameter_count(report):
    cfg = override(get_preset("tiny"), SMALL)
    counts = count_params(cfg)
    b = counts["breakdown"]
    # data parallel: every backbone parameter (f32) and the router bias replicated on each chip
    n_moe = cfg.model.n_layers - cfg.model.n_dense_layers
    backbone = counts["total"] - counts["engram"] + b["embedding"] + b["lm_head"]
    assert report["param_bytes_per_chip"] == 4 * (backbone + n_moe * cfg.moe.n_routed_experts)
    # tables: rows padded to lcm(1024, 4 chips), split over the 4 chips; table, mu and nu
    # (float32 [rows, d]) and the step of each row's last update (int32 [rows])
    rows = sum(engram_table_rows(cfg.engram, math.lcm(1024, 4)).values())
    assert report["table_bytes_per_chip"] == (3 * 4 * cfg.engram.d_head + 4) * rows // 4
    # everything the step keeps lives in HBM next to its temporaries
    kept = sum(report[k] for k in ("param_bytes_per_chip", "optimizer_bytes_per_chip"))
    assert report["hbm_bytes_per_chip"] > kept + report["table_bytes_per_chip"]


@pytest.mark.slow
def test_flops_and_estimates(report):
    assert report["flops_per_chip"] >= report["model_flops_per_chip"] > 0
    assert report["est_step_s"] > 0
    peak = 459e12  # v5p bf16 FLOP/s per chip
    mfu = report["model_flops_per_chip"] / (report["est_step_s"] * peak)
    assert report["est_mfu"] == pytest.approx(mfu, rel=1e-6)
    # data parallel: gradients are summed over the chips
    assert report["collective_bytes"].get("all-reduce", 0) > 0


@pytest.mark.slow
def test_table_traffic_does_not_grow_with_the_table(libtpu_dir):
    one = compile_json(libtpu_dir, "engram.engram_vocab_size=[3000,3000]", extra=["--no-decode"])
    four = compile_json(libtpu_dir, "engram.engram_vocab_size=[12000,12000]", extra=["--no-decode"])
    assert four["table_bytes_per_chip"] >= 3.9 * one["table_bytes_per_chip"]
    assert one["collective_bytes"] == four["collective_bytes"]


@pytest.mark.slow
def test_scanned_blocks_are_counted_once_per_layer(libtpu_dir):
    """model.scan_layers: XLA's cost analysis and the HLO text hold the scanned block once;
    the report must count it per layer. Oracle: the unrolled program's own counts (6 blocks:
    dense, Engram, then a scanned run of 4)."""
    sets = ("model.n_layers=6", "model.remat=true")
    unrolled = compile_json(libtpu_dir, *sets, extra=["--no-decode"])
    scanned = compile_json(libtpu_dir, *sets, "model.scan_layers=true", extra=["--no-decode"])
    assert unrolled["flops_source"] == "xla"
    assert scanned["flops_source"] == "xla + scanned blocks"
    assert scanned["flops_per_chip"] == pytest.approx(unrolled["flops_per_chip"], rel=0.02)
    assert scanned["bytes_accessed_per_chip"] == pytest.approx(
        unrolled["bytes_accessed_per_chip"], rel=0.25
    )
    assert scanned["est_step_s"] == pytest.approx(unrolled["est_step_s"], rel=0.25)
    for kind in ("all-gather", "all-reduce"):
        assert scanned["collective_bytes"][kind] == pytest.approx(
            unrolled["collective_bytes"][kind], rel=0.25
        ), kind


@pytest.mark.slow
def test_human_report(libtpu_dir):
    args = ["--preset", "tiny", "--topology", TOPOLOGY, "--no-decode"]
    for s in SMALL:
        args += ["--set", s]
    r = cli(*args, libtpu=libtpu_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fits" in r.stdout and "MFU" in r.stdout and "all-reduce" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,needs_libtpu,message",
    [
        (["--topology", "v5p-128"], False, "not a TPU slice name"),
        (["--topology", "v5e:2x2x2"], False, "not a TPU slice name"),
        (["--topology", TOPOLOGY, "--mesh", "data=3"], True, "product"),
        (["--topology", TOPOLOGY, "--mesh", "pipeline=2"], False, "AXIS=SIZE"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, needs_libtpu, message, request):
    libtpu = request.getfixturevalue("libtpu_dir") if needs_libtpu else None
    r = cli("--preset", "tiny", *args, libtpu=libtpu)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr


@pytest.mark.slow
def test_missing_libtpu_is_one_line_exit_2(tmp_path):
    """A Python without libtpu (a venv of its own with engram-jax's path, no libtpu)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    probe = "import importlib.util,sys; sys.exit(importlib.util.find_spec('libtpu') is not None)"
    root = str(Path(__file__).resolve().parents[1])
    site = [p for p in sys.path if p.endswith("site-packages")]
    env = {k: v for k, v in os.environ.items() if k != "ENGRAM_JAX_LIBTPU_DIR"}
    env["PYTHONPATH"] = os.pathsep.join([root, *site])
    if subprocess.run([str(venv / "bin" / "python"), "-c", probe], env=env).returncode:
        pytest.skip("libtpu is installed in this test environment itself")
    r = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "engram_jax.cli", "compile", "--preset", "tiny"]
        + ["--topology", TOPOLOGY],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert r.returncode == 2 and "libtpu is not installed" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_remat_train_step_equals_the_plain_one():
    """The paper presets set model.remat=True: the REAL train step (tables split out of the
    model, merged inside the jit) must trace with it and give the same loss and update."""
    import jax
    import numpy as np
    from conftest import global_batch, tiny_cfg, train_steps

    from engram_jax import sharding as shd
    from engram_jax.config import MeshConfig

    mesh = shd.make_mesh(MeshConfig(data=2), jax.devices()[:2])
    out = []
    for remat in (False, True):
        cfg = tiny_cfg(f"model.remat={remat}")
        out += train_steps(cfg, mesh, [global_batch(cfg, mesh)])[2]
    # the gradient norm covers every gradient (backbone and table rows); parameters after the
    # update are not compared: Adam's first step divides by |g|, amplifying rounding in tiny g
    assert out[0].keys() == out[1].keys() and "grad_norm" in out[0]
    for key in out[0]:
        np.testing.assert_allclose(out[1][key], out[0][key], rtol=1e-5, err_msg=key)


@pytest.mark.slow
def test_expert_parallel_all_to_all_volume_on_tpu(libtpu_dir):
    """moe.dispatch=ep with 4 experts over a 4-chip expert axis: the compiled TPU step's
    all-to-all bytes equal the analytic volume (per MoE layer: tokens there and back,
    [n, C, D] float32 each, plus int32 slot ids, in the forward; the token exchanges again,
    transposed, in the backward) and nothing all-gathers all experts' weights."""
    r = compile_json(libtpu_dir, "moe.dispatch=ep", extra=["--mesh", "data=1,expert=4"])
    cfg = override(get_preset("tiny"), SMALL)
    n, k, d = 4, cfg.moe.top_k, cfg.model.d_model
    s = cfg.train.batch_size * cfg.train.seq_len // n  # tokens per chip's slice
    cap = math.ceil(cfg.moe.capacity_factor * s * k / n)
    rows = n * cap * d * 4
    moe_layers = cfg.model.n_layers - cfg.model.n_dense_layers
    assert r["collective_bytes"]["all-to-all"] == moe_layers * (4 * rows + n * cap * 4)
    assert r["mesh"]["expert"] == 4 and r["fits"]


@pytest.mark.parametrize("given, inherited", [("--xla_flag_a=1", "--other"), (None, "--other")])
def test_libtpu_args_reach_the_compiler_and_the_report(monkeypatch, given, inherited):
    """The compiler's flags (``LIBTPU_INIT_ARGS``: they change how libtpu lowers collectives)
    go to the compile process, given or inherited from this process, and the report says
    which. The compile process is replaced by one that prints the flags it received."""
    from engram_jax import tpu_compile

    seen = {}

    def child(cmd, env, **kwargs):
        seen.update(env)
        out = json.dumps({"fits": True, "flags_seen": env.get("LIBTPU_INIT_ARGS")})
        return subprocess.CompletedProcess(cmd, 0, stdout=out + "\n", stderr="")

    monkeypatch.setenv("LIBTPU_INIT_ARGS", inherited)
    monkeypatch.setattr(tpu_compile, "libtpu_path", lambda: "")
    monkeypatch.setattr(tpu_compile.subprocess, "run", child)
    request = dict(preset="tiny", topology=TOPOLOGY, mesh={}, sets=[], decode=False)
    report = tpu_compile.compile_in_subprocess(request, libtpu_args=given)
    want = inherited if given is None else given
    assert seen["LIBTPU_INIT_ARGS"] == report["flags_seen"] == want
    assert report["libtpu_init_args"] == want
