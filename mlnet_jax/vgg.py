"""VGG-16 convolutional backbone with ML-Net's pooling (pool4 stride 1, no pool5).

Parameter names follow the VGG paper (``conv1_1`` … ``conv5_3``) so converted
weights from every source land in the same tree.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlnet_jax.relu import relu

PoolingAlignment = Literal["standard", "keras1"]

# (name, output channels) in network order; a pool follows the last conv of blocks 1-4.
VGG16_CONVS: tuple[tuple[str, int], ...] = (
    ("conv1_1", 64), ("conv1_2", 64),
    ("conv2_1", 128), ("conv2_2", 128),
    ("conv3_1", 256), ("conv3_2", 256), ("conv3_3", 256),
    ("conv4_1", 512), ("conv4_2", 512), ("conv4_3", 512),
    ("conv5_1", 512), ("conv5_2", 512), ("conv5_3", 512),
)
VGG16_CONV_NAMES: tuple[str, ...] = tuple(name for name, _ in VGG16_CONVS)
_POOL_STRIDE_AFTER = {"conv1_2": 2, "conv2_2": 2, "conv3_3": 2, "conv4_3": 1}


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool_2x2(x: jax.Array, stride: int, alignment: PoolingAlignment) -> jax.Array:
    """2×2 max pooling with 'same' output size ceil(n / stride), and the gradient of the
    original ML-Net's Theano ``MaxPoolGrad``: every input equal to its window's maximum receives
    that window's whole gradient, summed over the windows it belongs to.

    JAX's own gradients split ties instead, and need a tie count, so XLA builds and stores an
    argmax mask per pool in the forward pass (629 MB at pool1 per 32×480×640 step). This one
    compares ``x`` with the pooled output in the backward pass: one compare-and-select per
    window offset, fused with the ReLU mask before it. After a ReLU the two gradients differ
    only where two positive inputs tie for a window's maximum.
    """
    return max_pool_values(x, stride, alignment)


def max_pool_values(x: jax.Array, stride: int, alignment: PoolingAlignment) -> jax.Array:
    """2×2 max pooling with 'same' output size ceil(n / stride) (autodiff's gradient).

    ``standard`` (torchvision/TF): output i covers x[s·i], x[s·i+1]; padding at the end.
    ``keras1`` (Theano, the original ML-Net): output i covers x[s·i−1], x[s·i]; one row and
    column of padding at the start. Inputs are post-ReLU, so −inf padding equals zero padding.
    """
    if alignment not in ("standard", "keras1"):
        raise ValueError(f"pooling alignment must be 'standard' or 'keras1', got {alignment!r}")
    rows, cols = x.shape[1:3]
    if stride == 2 and rows % 2 == 0 and cols % 2 == 0:
        # Reshape-and-max: exact for even sizes, and its gradient avoids XLA's select_and_scatter.
        if alignment == "keras1":  # windows (2i − 1, 2i): shift down/right by one, zero-filled
            x = jnp.pad(x, ((0, 0), (1, 0), (1, 0), (0, 0)))[:, :rows, :cols]
        b, _, _, c = x.shape
        return jnp.max(x.reshape(b, rows // 2, 2, cols // 2, 2, c), axis=(2, 4))
    if stride == 1:
        # Maximum of shifted views (rows, then columns): the same values as reduce_window, and a
        # gradient of fusable selects instead of XLA's select_and_scatter (pool4, 60×80×512).
        edge = (1, 0) if alignment == "keras1" else (0, 1)
        x = jnp.pad(x, ((0, 0), edge, edge, (0, 0)), constant_values=-jnp.inf)
        x = jnp.maximum(x[:, :-1], x[:, 1:])
        return jnp.maximum(x[:, :, :-1], x[:, :, 1:])
    if alignment == "keras1":
        pad = ((1, 0), (1, 0))
    else:
        pad = tuple((0, max((-(-n // stride) - 1) * stride + 2 - n, 0)) for n in (rows, cols))
    return nn.max_pool(x, (2, 2), strides=(stride, stride), padding=pad)


def _max_pool_forward(x, stride, alignment):
    y = max_pool_values(x, stride, alignment)
    return y, (x, y)


def _max_pool_backward(stride, alignment, residuals, g):
    x, y = residuals
    start = -1 if alignment == "keras1" else 0  # window i covers s·i + start + {0, 1}
    grad = jnp.zeros_like(x)
    for row in (0, 1):
        for col in (0, 1):
            offset = (start + row, start + col)
            y_at = _spread(y, x.shape, stride, offset, jnp.nan)
            g_at = _spread(g, x.shape, stride, offset, 0)
            grad = grad + jnp.where(x == y_at, g_at, jnp.zeros((), g.dtype))
    return (grad,)


max_pool_2x2.defvjp(_max_pool_forward, _max_pool_backward)


def _spread(v: jax.Array, shape: tuple, stride: int, offset: tuple[int, int], fill) -> jax.Array:
    """``v`` (B, h, w, C) placed on an input grid of ``shape``: v[i, j] lands at
    (stride·i + offset[0], stride·j + offset[1]); positions no window element maps to hold
    ``fill`` (NaN equals nothing, so they get no gradient). Negative padding crops."""
    config = [(0, 0, 0)]
    for axis, low in zip((1, 2), offset):
        n, m = shape[axis], v.shape[axis]
        config.append((low, n - (low + (m - 1) * stride + 1), stride - 1))
    config.append((0, 0, 0))
    return jax.lax.pad(v, jnp.asarray(fill, v.dtype), config)


class VGG16(nn.Module):
    """The 13 VGG-16 convolutions returning ``pool3``, ``pool4`` and ``conv5_3``.

    Parameters are float32 whatever ``dtype`` (the compute dtype) is, so bfloat16 runs keep
    float32 master weights. ``width_multiplier`` < 1 narrows every layer; it exists only for
    the CPU demo (converted VGG-16 weights need the real widths).
    """

    pooling: PoolingAlignment = "standard"
    dtype: jnp.dtype = jnp.float32
    width_multiplier: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        x = x.astype(self.dtype)
        outputs = {}
        for name, features in VGG16_CONVS:
            features = max(1, round(features * self.width_multiplier))
            x = nn.Conv(features, (3, 3), padding="SAME", dtype=self.dtype,
                        param_dtype=jnp.float32, name=name)(x)
            x = relu(x)
            if name in _POOL_STRIDE_AFTER:
                x = max_pool_2x2(x, _POOL_STRIDE_AFTER[name], self.pooling)
                if name in ("conv3_3", "conv4_3"):
                    outputs[f"pool{name[4]}"] = x
        outputs["conv5_3"] = x
        return outputs
