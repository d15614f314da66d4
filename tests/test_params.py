"""Parameter accounting: analytic counts equal the real modules; paper presets hit the paper."""

import json

import pytest
from flax import nnx

from engram_jax.cli import main
from engram_jax.config import override
from engram_jax.model import EngramLM
from engram_jax.params import COMPONENTS, count_module_params, count_params
from engram_jax.presets import get_preset

PAPER = ("dense-4b", "moe-27b", "engram-27b", "engram-40b", "ablation-3b")


def assert_counts_match(cfg, model):
    analytic, actual = count_params(cfg), count_module_params(model)
    assert {k: actual[k] for k in analytic["breakdown"]} == analytic["breakdown"]
    assert actual["total"] == analytic["total"]
    assert analytic["total"] == analytic["activated"] + analytic["sparse"]


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_analytic_equals_built_model(name):
    cfg = get_preset(name)
    assert_counts_match(cfg, EngramLM(cfg, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("name", PAPER)
def test_analytic_equals_abstract_model(name):
    cfg = get_preset(name)
    abstract = nnx.eval_shape(lambda: EngramLM(cfg, rngs=nnx.Rngs(0)))  # allocates nothing
    assert_counts_match(cfg, abstract)


@pytest.mark.parametrize(
    "sets",
    [
        ["model.attention=gqa", "model.tie_embeddings=true", "model.hc_mult=1"],
        [
            "model.hc_dynamic=false",
            "engram.use_gating=false",
            "engram.use_short_conv=false",
            "moe.n_shared_experts=0",
        ],
        ["engram.multi_branch=false", "model.q_lora_rank=0", "engram.layer_ids=[0,1]"],
    ],
)
def test_analytic_equals_abstract_model_variants(sets):
    cfg = override(get_preset("tiny"), ["model.attention=mla"] + sets)
    assert_counts_match(cfg, nnx.eval_shape(lambda: EngramLM(cfg, rngs=nnx.Rngs(0))))


def test_activated_counts_topk_experts_and_retrieved_rows():
    cfg = get_preset("tiny")
    c = count_params(cfg)
    b = c["breakdown"]
    expert = 3 * cfg.model.d_model * cfg.moe.expert_hidden
    n_moe = cfg.model.n_layers - cfg.model.n_dense_layers
    rows = len(cfg.engram.layer_ids) * cfg.engram.n_hash_heads * cfg.engram.d_head
    dense = sum(b[k] for k in COMPONENTS) - b["routed_experts"] - b["engram_tables"]
    assert c["activated"] == dense + n_moe * cfg.moe.top_k * expert + rows
    routed_sparse = (cfg.moe.n_routed_experts - cfg.moe.top_k) * expert * n_moe
    assert c["rho"] == pytest.approx(routed_sparse / c["sparse"])
    no_engram = count_params(override(cfg, ["engram.layer_ids=[]"]))
    assert no_engram["engram"] == 0 and no_engram["rho"] == 1.0


def cli_counts(name, capsys):
    assert main(["params", "--preset", name, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# (paper total, paper Engram params); totals count the input embedding (see presets.py)
TARGETS = {
    "dense-4b": (4.1e9, 0),
    "moe-27b": (26.7e9, 0),
    "engram-27b": (26.7e9, 5.7e9),
    "engram-40b": (39.5e9, 18.5e9),
}


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_params_cli_meets_paper_targets(name, capsys):
    c = cli_counts(name, capsys)
    total, engram = TARGETS[name]
    assert c["total_with_embedding"] == pytest.approx(total, rel=0.03)
    assert c["activated"] == pytest.approx(3.8e9, rel=0.05)
    assert c["engram"] == pytest.approx(engram, rel=0.03)
    assert {"total", "activated", "sparse", "engram", "rho"} <= set(c)
    if name != "dense-4b":  # P_tot proper (no embedding) is within 3% as well
        assert c["total"] == pytest.approx(total, rel=0.03)


def test_params_cli_ablation_and_text(capsys):
    c = cli_counts("ablation-3b", capsys)
    b = c["breakdown"]
    moe_total = c["total_with_embedding"] - c["engram"] - b["engram_fusion"]
    assert moe_total == pytest.approx(3.0e9, rel=0.05)
    assert c["activated"] == pytest.approx(0.56e9, rel=0.06)
    assert c["engram"] == pytest.approx(1.6e9, rel=0.03)
    assert main(["params", "--preset", "engram-27b", "--set", "moe.n_routed_experts=72"]) == 0
    out = capsys.readouterr().out
    assert "total (P_tot)" in out and "rho" in out and "routed_experts" in out and "B" in out
    assert main(["params", "--preset", "nope"]) == 2
    assert main(["params", "--preset", "tiny", "--set", "moe.n_routed=3"]) == 2
    assert "moe.n_routed_experts" in capsys.readouterr().err
