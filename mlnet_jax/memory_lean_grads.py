"""ReLU and 2×2/2 max pooling whose gradients read their outputs, not extra saved tensors.

Autodiff of ``max(x, 0)`` keeps the pre-activation ``x`` for the backward pass, so XLA cannot
fuse the ReLU into cuDNN's conv+bias+activation kernel when training: it writes ``x``, then
reads it again to apply the ReLU, a full extra pass over every activation (1.26 GB per
32 × 480×640 step at conv1). Autodiff of a reshape-and-max pool builds its argmax masks in the
forward pass and stores them. Both gradients can be computed from tensors the backward pass
already has: ``relu'(x) = [y > 0]`` with ``y`` the ReLU's output, and the pool's argmax is
where its input equals its output. Values and gradients are JAX's own (ties in a pooling
window share the gradient equally, as ``jnp.max``'s derivative does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def relu(x: jax.Array) -> jax.Array:
    """``max(x, 0)``; the gradient is masked by ``output > 0`` (0 at x = 0, as jax.nn.relu)."""
    return jnp.maximum(x, 0)


def _relu_fwd(x):
    y = jnp.maximum(x, 0)
    return y, y


def _relu_bwd(y, g):
    return (jnp.where(y > 0, g, jnp.zeros_like(g)),)


relu.defvjp(_relu_fwd, _relu_bwd)


def _windows(x: jax.Array) -> jax.Array:
    b, rows, cols, c = x.shape
    return x.reshape(b, rows // 2, 2, cols // 2, 2, c)


@jax.custom_vjp
def max_pool_2x2_stride_2(x: jax.Array) -> jax.Array:
    """2×2 max pooling with stride 2 of an NHWC input with even rows and columns."""
    return jnp.max(_windows(x), axis=(2, 4))


def _pool_fwd(x):
    y = jnp.max(_windows(x), axis=(2, 4))
    return y, (x, y)


def _pool_bwd(residuals, g):
    x, y = residuals
    hits = _windows(x) == y[:, :, None, :, None, :]
    share = g / jnp.sum(hits, axis=(2, 4), dtype=g.dtype)  # ties split the gradient equally
    grad = jnp.where(hits, share[:, :, None, :, None, :], jnp.zeros((), g.dtype))
    return (grad.reshape(x.shape),)


max_pool_2x2_stride_2.defvjp(_pool_fwd, _pool_bwd)
