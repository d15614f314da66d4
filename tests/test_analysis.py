"""Analyses: CKA against a written-out unbiased HSIC oracle and its invariances; LogitLens;
gates; Engram zeroing; plots."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_cfg
from flax import nnx

from engram_jax import analysis as an
from engram_jax.analysis_plots import plot_cka, plot_gates, plot_logit_lens, token_label
from engram_jax.hashing import NgramHasher
from engram_jax.model import EngramLM

V = 128


def hsic1_oracle(x, y):
    """Song et al. (2012) eq. 5, term by term in float64 loops over the Gram matrices."""
    n = x.shape[0]
    k = [[float(x[i] @ x[j]) if i != j else 0.0 for j in range(n)] for i in range(n)]
    l_ = [[float(y[i] @ y[j]) if i != j else 0.0 for j in range(n)] for i in range(n)]
    trace = sum(k[i][j] * l_[j][i] for i in range(n) for j in range(n))
    sum_k = sum(map(sum, k))
    sum_l = sum(map(sum, l_))
    one_kl_one = sum(k[i][j] * l_[j][m] for i in range(n) for j in range(n) for m in range(n))
    return (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * one_kl_one) / (
        n * (n - 3)
    )


def test_unbiased_hsic_and_cka_match_oracle():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 3))
    y = x @ rng.standard_normal((3, 2)) + 0.5 * rng.standard_normal((7, 2))
    hsic = an.unbiased_hsic(jnp.asarray(x @ x.T)[None], jnp.asarray(y @ y.T)[None])[0, 0]
    np.testing.assert_allclose(float(hsic), hsic1_oracle(x, y), rtol=1e-4)
    oracle_cka = hsic1_oracle(x, y) / np.sqrt(hsic1_oracle(x, x) * hsic1_oracle(y, y))
    np.testing.assert_allclose(an.linear_cka(x, y), oracle_cka, rtol=1e-4)


def test_cka_self_is_one_and_invariances():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    q, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    assert an.linear_cka(x, x) == pytest.approx(1.0, abs=1e-5)
    y = np.tanh(x @ rng.standard_normal((16, 8))).astype(np.float32)
    base = an.linear_cka(x, y)
    assert 0.0 < base < 1.0
    assert an.linear_cka(x @ q.astype(np.float32), y) == pytest.approx(base, abs=1e-5)
    assert an.linear_cka(3.7 * x, y) == pytest.approx(base, abs=1e-5)
    assert an.linear_cka(x, 0.01 * y) == pytest.approx(base, abs=1e-5)
    assert an.linear_cka(x + 2.0, y) == pytest.approx(base, abs=1e-3)  # HSIC_1 needs no centering


def test_minibatch_cka_accumulates_hsic_terms():
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((2, 20, 5)).astype(np.float32) for _ in range(3)]
    ys = [np.concatenate([x[:1], rng.standard_normal((1, 20, 5)).astype(np.float32)]) for x in xs]
    acc = an.CKAAccumulator()
    for x, y in zip(xs, ys):
        acc.add(x, y)
    cka = acc.result()
    assert cka.shape == (2, 2)
    assert cka[0, 0] == pytest.approx(1.0, abs=1e-5)
    kl = sum(hsic1_oracle(x[1].astype(np.float64), y[1].astype(np.float64)) for x, y in zip(xs, ys))
    kk = sum(hsic1_oracle(x[1].astype(np.float64), x[1].astype(np.float64)) for x in xs)
    ll = sum(hsic1_oracle(y[1].astype(np.float64), y[1].astype(np.float64)) for y in ys)
    assert cka[1, 1] == pytest.approx(kl / np.sqrt(kk * ll), rel=1e-4)


def test_soft_alignment():
    cka = np.array([[1.0, 0.5, 0.1], [0.2, 0.4, 0.9]])
    np.testing.assert_allclose(
        an.soft_alignment(cka, top_k=2), [(1 * 1.0 + 2 * 0.5) / 1.5, (3 * 0.9 + 2 * 0.4) / 1.3]
    )
    np.testing.assert_allclose(an.soft_alignment(np.eye(4), top_k=1), [1, 2, 3, 4])


@pytest.fixture(scope="module")
def model_and_batch():
    cfg = tiny_cfg(
        f"model.vocab_size={V}",
        "model.n_layers=3",
        "model.n_dense_layers=3",
        "model.n_kv_heads=2",
        "engram.engram_vocab_size=[200,200]",
        "engram.layer_ids=[1]",
    )
    model = nnx.jit(lambda: EngramLM(cfg, rngs=nnx.Rngs(0)))()
    conv = model.blocks[1].engram.conv_kernel
    conv.set_value(0.3 * jax.random.normal(jax.random.key(1), conv[...].shape))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, (2, 17)).astype(np.int32)
    hasher = NgramHasher(cfg.engram, V, cfg.engram.pad_id, out_dtype=np.int32)
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "engram_ids": hasher(tokens[:, :-1]),
    }
    return model, batch


def test_logit_lens_last_layer_is_zero(model_and_batch):
    model, batch = model_and_batch
    lens = an.logit_lens(model, [batch, batch])
    assert lens["tokens"] == 2 * batch["inputs"].size
    assert len(lens["kl"]) == 3
    assert abs(lens["kl"][-1]) < 1e-6
    assert all(k > 1e-4 for k in lens["kl"][:-1])


def test_model_cka_with_itself(model_and_batch):
    model, batch = model_and_batch
    cka = an.cka_matrix(model, model, [batch], [batch])
    np.testing.assert_allclose(np.diag(cka), 1.0, atol=1e-5)
    np.testing.assert_allclose(cka, cka.T, atol=1e-5)
    np.testing.assert_allclose(an.soft_alignment(cka, top_k=1), [1, 2, 3])


def test_gates_in_open_unit_interval(model_and_batch):
    model, batch = model_and_batch
    g = an.gates(model, batch["inputs"], batch["engram_ids"])
    assert set(g) == {1} and g[1].shape == batch["inputs"].shape + (2,)
    assert np.all(g[1] > 0) and np.all(g[1] < 1)


def test_zeroed_engram_outputs_zero_and_changes_loss(model_and_batch):
    model, batch = model_and_batch
    zeroed = an.without_engram(model)
    eng = zeroed.blocks[1].engram
    h = jax.random.normal(jax.random.key(0), batch["inputs"].shape + (2, 32))
    ids = jnp.asarray(batch["engram_ids"][1])
    assert float(jnp.max(jnp.abs(eng(h, ids=ids)))) == 0.0
    assert float(jnp.max(jnp.abs(model.blocks[1].engram(h, ids=ids)))) > 0  # original intact
    result = an.engram_sensitivity(model, [batch])
    assert np.isfinite(result["loss"]) and result["delta"] != 0.0
    assert result["retained"] == pytest.approx(np.exp(-result["delta"]))


def test_plots_write_png(tmp_path):
    plot_logit_lens({"a": [1.0, 0.5, 0.0], "b": [0.8, 0.2, 0.0]}, str(tmp_path / "lens.png"))
    plot_cka(np.eye(3), np.array([1.0, 2.0, 3.0]), str(tmp_path / "cka.png"))
    plot_gates(
        {1: np.random.default_rng(0).uniform(size=(5, 2))},
        [token_label(t) for t in ["By", " the", " way", "\n", ""]],
        str(tmp_path / "gates.png"),
    )
    for name in ("lens", "cka", "gates"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
