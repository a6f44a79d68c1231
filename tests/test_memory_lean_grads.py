"""The hand-written ReLU and pooling gradients equal JAX's own autodiff of the plain formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlnet_jax.memory_lean_grads import max_pool_2x2_stride_2, relu


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_relu_value_and_gradient_equal_jax_nn_relu(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 5, 7, 8)), dtype).at[0, 0, 0, :].set(0)  # exact zeros
    g = jnp.asarray(rng.normal(size=x.shape), dtype)
    y, vjp = jax.vjp(relu, x)
    y_ref, vjp_ref = jax.vjp(jax.nn.relu, x)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    np.testing.assert_array_equal(np.asarray(vjp(g)[0], np.float32),
                                  np.asarray(vjp_ref(g)[0], np.float32))
    assert vjp(g)[0].dtype == dtype


def _reference_pool(x):
    b, r, c, ch = x.shape
    return jnp.max(x.reshape(b, r // 2, 2, c // 2, 2, ch), axis=(2, 4))


@pytest.mark.parametrize("values", ["continuous", "many_ties"])
def test_pool_value_and_gradient_equal_autodiff_of_reshape_max(values):
    rng = np.random.default_rng(1)
    shape = (2, 6, 8, 5)
    x = rng.normal(size=shape) if values == "continuous" else rng.integers(0, 3, shape)
    x = jnp.asarray(x, jnp.float32)
    g = jnp.asarray(rng.normal(size=(2, 3, 4, 5)), jnp.float32)
    y, vjp = jax.vjp(max_pool_2x2_stride_2, x)
    y_ref, vjp_ref = jax.vjp(_reference_pool, x)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_allclose(vjp(g)[0], vjp_ref(g)[0], rtol=1e-6, atol=1e-7)
    # Every window passes on exactly its output's gradient, split among its maxima.
    sums = np.asarray(vjp(g)[0]).reshape(2, 3, 2, 4, 2, 5).sum(axis=(2, 4))
    np.testing.assert_allclose(sums, g, rtol=1e-6, atol=1e-7)

