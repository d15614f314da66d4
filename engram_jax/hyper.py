"""mHC: manifold-constrained hyper-connections (Xie et al., arXiv 2512.24880).

The residual stream is M parallel branches ``x_l`` [M, D]. Around a sublayer F (attention or
FFN; its pre-RMSNorm is part of F here):

    x_{l+1} = H_res x_l + H_post^T F(H_pre x_l)

- pre-mapping ``H_pre`` [1, M] = sigmoid(.): weights over branches forming the sublayer input;
- post-mapping ``H_post`` [M, 1] = 2 sigmoid(.): how much of F's output each branch receives;
- residual mapping ``H_res`` [M, M] = Sinkhorn(exp(.)): doubly stochastic (rows and columns sum
  to 1), so mixing branches preserves the mean of the stream and cannot amplify it.

Each logit is static + input-dependent, as in the paper: ``H~ = alpha * (x~' phi) + b`` with
``x~' = RMS(vec(x_l))`` over all M*D features (no learnable scale: phi absorbs it), one
``phi`` [M*D, 2M + M^2] per sublayer and three scalars ``alpha`` (init 0.01, so training starts
from the static mappings). ``ModelConfig.hc_dynamic=False`` keeps only the static ``b``.

Init (Hyper-Connections' choice, symmetry breaking): ``H_pre`` selects branch ``l mod M``
(sigmoid(+3) = 0.95 vs sigmoid(-3) = 0.05 elsewhere), ``H_post = 1`` (every branch receives
the full output), ``H_res`` near identity (diagonal logits 4, off-diagonal 0).

M = 1 is a plain residual stream ``x + F(x)`` with no parameters at all.

Shape legend: B batch, T sequence, M branches, D d_model, J = 2M + M^2 dynamic logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from engram_jax.layers import param


def sinkhorn(logits: jax.Array, iters: int) -> jax.Array:
    """Sinkhorn-Knopp on ``exp(logits)`` over the last two axes, in log space (float32).

    Alternates row and column normalization ``iters`` times; the result is exactly
    column-stochastic and row-stochastic up to the convergence of the iteration.

    The iteration runs on the matrices' entries moved to the front ([M, M, ...]): each
    logsumexp is then over a leading axis of size M, M-1 elementwise ops on long contiguous
    rows, which XLA CPU vectorizes; over the trailing [M, M] axes it reduces B*T separate
    M-element rows, many times slower (BENCHMARKS.md, study loop: what was changed). Same
    arithmetic in the same order.
    """
    log_p = jnp.moveaxis(logits.astype(jnp.float32), (-2, -1), (0, 1))

    def body(_, lp):
        lp = lp - jax.nn.logsumexp(lp, axis=1, keepdims=True)
        return lp - jax.nn.logsumexp(lp, axis=0, keepdims=True)

    log_p = jax.lax.fori_loop(0, iters, body, log_p)
    return jnp.moveaxis(jnp.exp(log_p), (0, 1), (-2, -1))


class HyperConnection(nnx.Module):
    """mHC around one sublayer: ``u, maps = hc.read(x)``; ``x = hc.write(x, F(u), maps)``."""

    def __init__(
        self,
        d_model: int,
        hc_mult: int,
        *,
        layer_index: int,
        sinkhorn_iters: int,
        dynamic: bool = True,
        eps: float = 1e-6,
        rngs: nnx.Rngs,
    ):
        m = self.m = hc_mult
        self.iters, self.eps = sinkhorn_iters, eps
        self.dynamic = dynamic and m > 1
        if m == 1:
            return
        self.pre_bias = param(jnp.where(jnp.arange(m) == layer_index % m, 3.0, -3.0), (None,))
        self.post_bias = param(jnp.zeros((m,)), (None,))
        self.res_bias = param(4.0 * jnp.eye(m), (None, None))
        if self.dynamic:
            j = 2 * m + m * m
            phi = (m * d_model) ** -0.5 * jax.random.normal(rngs.params(), (m * d_model, j))
            self.phi = param(phi, (None, None))
            self.alpha = param(jnp.full((3,), 0.01), (None,))

    def mappings(self, x_BxTxMxD: jax.Array):
        """-> (H_pre [B,T,M] or [M], H_post likewise, H_res [B,T,M,M] or [M,M]), float32."""
        m = self.m
        pre, post, res = self.pre_bias[...], self.post_bias[...], self.res_bias[...]
        if self.dynamic:
            b, t = x_BxTxMxD.shape[:2]
            x_BxTxMD = x_BxTxMxD.reshape(b, t, -1).astype(jnp.float32)
            x_BxTxMD = x_BxTxMD * jax.lax.rsqrt(
                jnp.mean(jnp.square(x_BxTxMD), axis=-1, keepdims=True) + self.eps
            )
            z_BxTxJ = x_BxTxMD @ self.phi[...]
            a = self.alpha[...]
            pre = a[0] * z_BxTxJ[..., :m] + pre[None, None]
            post = a[1] * z_BxTxJ[..., m : 2 * m] + post[None, None]
            res = a[2] * z_BxTxJ[..., 2 * m :].reshape(b, t, m, m) + res[None, None]
        return jax.nn.sigmoid(pre), 2.0 * jax.nn.sigmoid(post), sinkhorn(res, self.iters)

    def read(self, x_BxTxMxD: jax.Array):
        """Sublayer input ``H_pre x`` [B,T,D] (float32) and the maps for :meth:`write`."""
        if self.m == 1:
            return x_BxTxMxD[:, :, 0], None
        pre, post, res = self.mappings(x_BxTxMxD)
        eq = "btm,btmd->btd" if pre.ndim == 3 else "m,btmd->btd"
        return jnp.einsum(eq, pre, x_BxTxMxD.astype(jnp.float32)), (post, res)

    def write(self, x_BxTxMxD: jax.Array, y_BxTxD: jax.Array, maps) -> jax.Array:
        """``H_res x + H_post^T y``: the new stream [B,T,M,D] in x's dtype."""
        y_BxTxD = y_BxTxD.astype(x_BxTxMxD.dtype)
        if self.m == 1:
            return x_BxTxMxD + y_BxTxD[:, :, None, :]
        post, res = maps
        eq = "btmn,btnd->btmd" if res.ndim == 4 else "mn,btnd->btmd"
        mixed = jnp.einsum(eq, res, x_BxTxMxD.astype(jnp.float32))
        post = post if post.ndim == 3 else post[None, None]
        return (mixed + post[..., None] * y_BxTxD[:, :, None, :]).astype(x_BxTxMxD.dtype)


def hyper_params(d_model: int, hc_mult: int, dynamic: bool) -> int:
    """Analytic parameter count of one :class:`HyperConnection`."""
    m = hc_mult
    if m == 1:
        return 0
    return 2 * m + m * m + ((m * d_model * (2 * m + m * m) + 3) if dynamic else 0)
