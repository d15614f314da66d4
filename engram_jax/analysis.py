"""The paper's analyses of a trained model (ENGRAM_SPEC section 9), as pure functions.

- :func:`logit_lens`: per block l, ``KL(p_final || p_l)`` where ``p_l`` is block l's residual
  stream read out through the final norm and LM head (``EngramLM.readout``), averaged over
  tokens. The last block's KL is 0 by construction.
- :func:`cka_matrix`: linear-kernel CKA between every block of two models, from the unbiased
  HSIC estimator (Song et al. 2012) averaged over minibatches (Nguyen et al. 2021):
  ``CKA = mean HSIC_1(K, L) / sqrt(mean HSIC_1(K, K) mean HSIC_1(L, L))``, where per minibatch
  of n tokens, with K~ and L~ the Gram matrices with zeroed diagonals,
  ``HSIC_1 = [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))``.
  A block's representation of a token is its branch-mean residual stream (what the readout
  sees), so models with different mHC widths compare.
- :func:`soft_alignment`: for each block i of the first model, the CKA-weighted mean (1-based)
  index of the top-k most similar blocks of the second.
- :func:`gates`: Engram's alpha for every token, Engram layer and branch.
- :func:`engram_sensitivity`: loss with every Engram output zeroed vs normal. Zeroing W_V and
  b_V zeroes the output exactly: v = 0, so V~ = 0, RMSNorm(0) = 0, SiLU(conv(0)) = 0.

Plots (matplotlib, Agg backend) are in :mod:`engram_jax.analysis_plots`; data loading for a
trained workdir is :func:`validation_batches`.

Shape legend: B batch, T sequence, M mHC branches, D d_model, V vocabulary, L blocks, n tokens
per minibatch, H hash heads.
"""

from __future__ import annotations

import dataclasses
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _ids(batch: dict) -> dict:
    return {int(k): jnp.asarray(v) for k, v in batch.get("engram_ids", {}).items()}


@nnx.jit
def _forward_hidden(model, tokens_BxT, ids):
    logits_BxTxV, aux = model(tokens_BxT, engram_ids=ids, collect=True)
    return logits_BxTxV, aux["hidden"], aux["engram_gates"]


# ---------------------------------------------------------------------------------------------
# LogitLens


@nnx.jit
def _lens_sums(model, tokens_BxT, ids):
    """Sum over tokens of KL(p_final || p_l) for every block l: float32 [L]."""
    logits_BxTxV, aux = model(tokens_BxT, engram_ids=ids, collect=True)
    logp_final = jax.nn.log_softmax(logits_BxTxV, axis=-1)
    p_final = jnp.exp(logp_final)
    kls = []
    for i in range(len(model.blocks)):
        logp_l = jax.nn.log_softmax(model.readout(aux["hidden"][i]), axis=-1)
        kls.append(jnp.sum(p_final * (logp_final - logp_l)))
    return jnp.stack(kls)


def logit_lens(model, batches) -> dict:
    """``{"kl": [L] mean KL per token, "tokens": n}`` over ``batches`` (dicts with ``inputs``
    and ``engram_ids``)."""
    total, n = np.zeros(len(model.blocks)), 0
    for batch in batches:
        inputs = jnp.asarray(batch["inputs"])
        total += np.asarray(_lens_sums(model, inputs, _ids(batch)), np.float64)
        n += inputs.size
    return {"kl": (total / max(n, 1)).tolist(), "tokens": n}


# ---------------------------------------------------------------------------------------------
# CKA


def unbiased_hsic(k_AxNxN: jax.Array, l_BxNxN: jax.Array) -> jax.Array:
    """HSIC_1 (Song et al. 2012) between every Gram matrix of ``k`` and of ``l``: [A, B].

    Needs n >= 4 samples."""
    n = k_AxNxN.shape[-1]
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 samples, got {n}")
    off_1xNxN = (1.0 - jnp.eye(n, dtype=k_AxNxN.dtype))[None]
    k_AxNxN, l_BxNxN = k_AxNxN * off_1xNxN, l_BxNxN * off_1xNxN
    trace_AxB = jnp.einsum("aij,bij->ab", k_AxNxN, l_BxNxN)  # K~ and L~ are symmetric
    ksum_AxN, lsum_BxN = jnp.sum(k_AxNxN, axis=-1), jnp.sum(l_BxNxN, axis=-1)
    total_AxB = jnp.sum(ksum_AxN, axis=-1)[:, None] * jnp.sum(lsum_BxN, axis=-1)[None, :]
    cross_AxB = jnp.einsum("an,bn->ab", ksum_AxN, lsum_BxN)
    return (trace_AxB + total_AxB / ((n - 1) * (n - 2)) - 2.0 * cross_AxB / (n - 2)) / (n * (n - 3))


@jax.jit
def _hsic_terms(x_AxNxD, y_BxNxE):
    """Per-minibatch HSIC_1 of linear kernels: (K-L [A,B], K-K [A], L-L [B])."""
    x_AxNxD = x_AxNxD.astype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
    y_BxNxE = y_BxNxE.astype(x_AxNxD.dtype)
    k_AxNxN = jnp.einsum("and,amd->anm", x_AxNxD, x_AxNxD)
    l_BxNxN = jnp.einsum("bne,bme->bnm", y_BxNxE, y_BxNxE)
    kl = unbiased_hsic(k_AxNxN, l_BxNxN)
    kk = jax.vmap(lambda k: unbiased_hsic(k[None], k[None])[0, 0])(k_AxNxN)
    ll = jax.vmap(lambda l_: unbiased_hsic(l_[None], l_[None])[0, 0])(l_BxNxN)
    return kl, kk, ll


def linear_cka(x_NxD, y_NxE) -> float:
    """Linear CKA with the unbiased HSIC between two representations of the same n samples."""
    kl, kk, ll = _hsic_terms(jnp.asarray(x_NxD)[None], jnp.asarray(y_NxE)[None])
    return float(kl[0, 0] / jnp.sqrt(kk[0] * ll[0]))


class CKAAccumulator:
    """Minibatch CKA between every layer of two models: add ``[A, n, D]`` and ``[B, n, E]``
    features of the same n tokens per call, then :meth:`result` -> CKA [A, B]."""

    def __init__(self):
        self.kl = self.kk = self.ll = None
        self.batches = 0

    def add(self, x_AxNxD, y_BxNxE) -> None:
        kl, kk, ll = (np.asarray(t, np.float64) for t in _hsic_terms(x_AxNxD, y_BxNxE))
        if self.kl is None:
            self.kl, self.kk, self.ll = kl, kk, ll
        else:
            self.kl, self.kk, self.ll = self.kl + kl, self.kk + kk, self.ll + ll
        self.batches += 1

    def result(self) -> np.ndarray:
        denom = np.sqrt(np.maximum(self.kk[:, None] * self.ll[None, :], 1e-300))
        return self.kl / denom


def layer_features(model, batch: dict, max_tokens: int | None = None) -> jax.Array:
    """Branch-mean residual stream after every block for the tokens of a batch: [L, n, D]."""
    _, hidden, _ = _forward_hidden(model, jnp.asarray(batch["inputs"]), _ids(batch))
    feats = [jnp.mean(hidden[i].astype(jnp.float32), axis=2) for i in range(len(model.blocks))]
    x_LxNxD = jnp.stack([f.reshape(-1, f.shape[-1]) for f in feats])
    return x_LxNxD if max_tokens is None else x_LxNxD[:, :max_tokens]


def cka_matrix(model_a, model_b, batches_a, batches_b, *, max_tokens: int = 1024) -> np.ndarray:
    """CKA [L_a, L_b] between the blocks of two models over paired batches (the same tokens,
    each with its own model's hash ids), minibatched: one minibatch per batch."""
    acc = CKAAccumulator()
    for ba, bb in zip(batches_a, batches_b):
        acc.add(layer_features(model_a, ba, max_tokens), layer_features(model_b, bb, max_tokens))
    if acc.batches == 0:
        raise ValueError("no batches to compute CKA on")
    return acc.result()


def soft_alignment(cka_AxB: np.ndarray, top_k: int = 5) -> np.ndarray:
    """For each row i: sum_j s_ij * (j+1) / sum_j s_ij over the top-k columns j by s_ij."""
    cka_AxB = np.asarray(cka_AxB, np.float64)
    k = min(top_k, cka_AxB.shape[1])
    top_AxK = np.argsort(-cka_AxB, axis=1, kind="stable")[:, :k]
    s_AxK = np.take_along_axis(cka_AxB, top_AxK, axis=1)
    return (s_AxK * (top_AxK + 1)).sum(axis=1) / s_AxK.sum(axis=1)


# ---------------------------------------------------------------------------------------------
# Gates and sensitivity


def gates(model, tokens_BxT, engram_ids: dict) -> dict:
    """``{layer: alpha [B, T, M]}`` (float32, in (0, 1)) for every Engram layer."""
    _, _, g = _forward_hidden(
        model, jnp.asarray(tokens_BxT), {int(k): jnp.asarray(v) for k, v in engram_ids.items()}
    )
    return {int(k): np.asarray(v) for k, v in g.items()}


@nnx.jit
def _loss_sum(model, inputs_BxT, targets_BxT, ids):
    logits_BxTxV, _ = model(inputs_BxT, engram_ids=ids)
    logp = jax.nn.log_softmax(logits_BxTxV, axis=-1)
    return -jnp.sum(jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1))


def mean_loss(model, batches) -> float:
    total, n = 0.0, 0
    for b in batches:
        total += float(
            _loss_sum(model, jnp.asarray(b["inputs"]), jnp.asarray(b["targets"]), _ids(b))
        )
        n += int(np.asarray(b["targets"]).size)
    return total / max(n, 1)


def without_engram(model):
    """A copy of ``model`` whose Engram layers output exactly zero (W_V = 0, b_V = 0)."""
    graphdef, state = nnx.split(model)
    clone = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
    for i in clone.engram_layers:
        eng = clone.blocks[i].engram
        eng.value_kernel.set_value(jnp.zeros_like(eng.value_kernel[...]))
        eng.value_bias.set_value(jnp.zeros_like(eng.value_bias[...]))
    return clone


def engram_sensitivity(model, batches) -> dict:
    """Loss normally and with Engram zeroed; ``retained`` is exp(-loss_zeroed)/exp(-loss), the
    share of the per-token likelihood that survives (1: Engram does not matter)."""
    batches = list(batches)
    normal, zeroed = mean_loss(model, batches), mean_loss(without_engram(model), batches)
    return {
        "loss": normal,
        "loss_engram_zeroed": zeroed,
        "delta": zeroed - normal,
        "retained": float(np.exp(normal - zeroed)),
    }


# ---------------------------------------------------------------------------------------------
# Trained workdirs


def tokenizer_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def validation_batches(cfg, workdir, num_batches: int, *, data: str | None = None):
    """The run's validation batches (or those of ``data``), tokenized with the run's own
    tokenizer: ``(batches, tokenizer_path)``."""
    from engram_jax.data import build_data
    from engram_jax.workdir import Workdir

    wd = Workdir(workdir)
    tok = wd.tokenizer()
    data_cfg = dataclasses.replace(
        cfg.data, tokenizer=tok, path=cfg.data.path if data is None else data
    )
    wd.pull_data()
    bundle = build_data(dataclasses.replace(cfg, data=data_cfg), wd.data_root())
    return bundle.val_batches(num_batches), tok


def rehash(batches, cfg, tokenizer_path: str) -> list[dict]:
    """The same token batches with the hash ids of another model's Engram config."""
    from engram_jax.tokenizer import build_compression, load_tokenizer

    if not cfg.engram.enabled:
        return [dict(b, engram_ids={}) for b in batches]
    comp = build_compression(load_tokenizer(tokenizer_path), enabled=cfg.engram.compress_tokenizer)
    hasher = comp.hasher(cfg.engram, out_dtype=np.int32)
    return [dict(b, engram_ids=hasher(comp.lookup[np.asarray(b["inputs"])])) for b in batches]
