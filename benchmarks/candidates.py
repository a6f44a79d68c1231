"""Levers not yet measured on a GPU, ready for ``throughput.py --variants cand_*``.

They live here, not in the package, until a measurement says they help (benchmarks/NOTES.md,
"Next levers"). Each computes exactly what the package computes: values and gradients equal
JAX's own (tests/test_benchmarks.py).

The idea: autodiff of ``max(x, 0)`` keeps the pre-activation ``x`` for the backward pass, so
XLA cannot fold the ReLU into cuDNN's conv+bias+activation call when training, and a
reshape-and-max pool's autodiff builds argmax masks in the forward pass and stores them.
Gradients computed from the ReLU's *output* need neither. A first try (v2, 2026-11-26) with
plain ``custom_vjp`` compiled to the very same program: XLA's simplifier rewrote
``max(x, 0) > 0`` back into ``x > 0``. Here the saved tensors pass through
``optimization_barrier``, which the simplifier cannot see through.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def relu(x: jax.Array) -> jax.Array:
    """``max(x, 0)``; its gradient is masked by ``output > 0`` (0 at x = 0, as jax.nn.relu)."""
    return jnp.maximum(x, 0)


def _relu_fwd(x):
    y = jnp.maximum(x, 0)
    return y, jax.lax.optimization_barrier(y)


def _relu_bwd(y, g):
    return (jnp.where(y > 0, g, jnp.zeros_like(g)),)


relu.defvjp(_relu_fwd, _relu_bwd)


def _windows(x: jax.Array) -> jax.Array:
    b, rows, cols, c = x.shape
    return x.reshape(b, rows // 2, 2, cols // 2, 2, c)


@jax.custom_vjp
def max_pool_2x2_stride_2(x: jax.Array) -> jax.Array:
    """2×2 max pooling, stride 2, of an NHWC input with even rows and columns."""
    return jnp.max(_windows(x), axis=(2, 4))


def _pool_fwd(x):
    y = jnp.max(_windows(x), axis=(2, 4))
    return y, jax.lax.optimization_barrier((x, y))


def _pool_bwd(residuals, g):
    x, y = residuals
    hits = _windows(x) == y[:, :, None, :, None, :]
    share = g / jnp.sum(hits, axis=(2, 4), dtype=g.dtype)  # ties share, as jnp.max's gradient
    grad = jnp.where(hits, share[:, :, None, :, None, :], jnp.zeros((), g.dtype))
    return (grad.reshape(x.shape),)


max_pool_2x2_stride_2.defvjp(_pool_fwd, _pool_bwd)
