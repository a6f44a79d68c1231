"""Earlier versions of the package's levers, re-created for ``throughput.py --variants v*``.

Each replaces one function of the package while the step is traced, so an adopted lever can
be measured against what it replaced in the same run on the same card (benchmarks/NOTES.md,
"Versions"). v3: conv1_1 by cuDNN with its ReLU apart, not ``mlnet_jax/first_conv.py``'s
Pallas kernel (the code measured on 2026-11-28; every earlier version is v3 at conv1_1).
v2.1: the ReLU (``mlnet_jax/relu.py``) and the pool as two operations, the pool's gradient
compared the ReLU's saved output with the pooled output, ties to the first maximum except for
Theano's rule where ``pool_ties`` asks for it (the code measured on 2026-11-27; v2, measured on
2026-11-26, gave every tie the gradient). v1: autodiff's gradients for both. v0: v1 with pool4
by reduce_window and one random word per dropout element.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def v3_kernel_applies(mode, shape, dtype, features=64):
    """v3: conv1_1 never takes the Pallas kernel (``first_conv.kernel_applies``)."""
    return False


def v2_1_relu_max_pool(x, stride, alignment, ties="first"):
    """v2.1: ``relu`` (output-masked gradient), then a pool whose gradient compares its input,
    the ReLU's saved output, with its own output in the backward pass."""
    from mlnet_jax import vgg
    return _v2_1_max_pool(vgg.relu(x), stride, alignment, ties)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _v2_1_max_pool(x, stride, alignment, ties):
    from mlnet_jax.vgg import max_pool_values
    return max_pool_values(x, stride, alignment)


def _v2_1_max_pool_forward(x, stride, alignment, ties):
    from mlnet_jax.vgg import max_pool_values
    y = max_pool_values(x, stride, alignment)
    return y, (x, y)


def _v2_1_max_pool_backward(stride, alignment, ties, residuals, g):
    from mlnet_jax.vgg import _spread, _window_element, _window_offsets
    x, y = residuals
    grad, zero, taken = jnp.zeros_like(x), jnp.zeros((), g.dtype), None
    for offset in _window_offsets(alignment):
        # v2.1 padded with NaN where a window passes the edge (keras1, stride 1, odd sizes), this
        # with 0: the same gradients after the ReLU, a 0 equalling the maximum only where that
        # is 0, and those windows pass none. The headline case (standard, stride 2, even) pads
        # nothing either way.
        is_max = _window_element(x, y.shape[1:3], stride, offset) == y
        if ties == "first":
            is_max, taken = (is_max, is_max) if taken is None else (is_max & ~taken,
                                                                    taken | is_max)
        grad = grad + _spread(jnp.where(is_max, g, zero), x.shape, stride, offset)
    return (grad,)


_v2_1_max_pool.defvjp(_v2_1_max_pool_forward, _v2_1_max_pool_backward)


def v1_relu(x):
    """v1's ReLU: ``jax.nn.relu``, whose gradient keeps the pre-activation."""
    return jax.nn.relu(x)


def v1_relu_max_pool(x, stride, alignment, ties=None):
    """v1's pools: the same values, autodiff's gradient (argmax masks with a tie count)."""
    from mlnet_jax.vgg import max_pool_values
    return max_pool_values(jax.nn.relu(x), stride, alignment)


def v0_relu_max_pool(x, stride, alignment, ties=None):
    """v0's pool4: reduce_window, whose gradient is XLA's select_and_scatter."""
    import flax.linen as nn
    if stride != 1:
        return v1_relu_max_pool(x, stride, alignment)
    return nn.max_pool(jax.nn.relu(x), (2, 2), strides=(1, 1),
                       padding=((1, 0), (1, 0)) if alignment == "keras1" else ((0, 1), (0, 1)))


def v0_dropout_keep_mask(rng, rate, shape):
    """v0's dropout mask: one random word per element."""
    return jax.random.bernoulli(rng, 1.0 - rate, shape)
