"""The train step's cross-entropy against optax's, value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from engram_jax.step import cross_entropy


def _oracle(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: logits far from 0, softmax near one-hot
def test_cross_entropy_value_and_gradient_equal_optax(scale):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 5, 37)) * scale, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 37, (3, 5)), jnp.int32)
    got, g_got = jax.value_and_grad(cross_entropy)(logits, targets)
    ref, g_ref = jax.value_and_grad(_oracle)(logits, targets)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    np.testing.assert_allclose(g_got, g_ref, rtol=1e-5, atol=1e-8)
    # under a scaled upstream cotangent and jit too
    g2 = jax.jit(jax.grad(lambda x: 2.5 * cross_entropy(x, targets)))(logits)
    np.testing.assert_allclose(g2, 2.5 * g_ref, rtol=1e-5, atol=1e-8)
