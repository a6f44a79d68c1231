"""VGG-16 convolutional backbone with ML-Net's pooling (pool4 stride 1, no pool5).

Parameter names follow the VGG paper (``conv1_1`` … ``conv5_3``) so converted
weights from every source land in the same tree.
"""

from __future__ import annotations

from functools import partial, reduce
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlnet_jax import first_conv as first_conv_kernel
from mlnet_jax import bias_gradients, second_conv
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


PoolTies = Literal["all", "first"]


def scaled_width(features: int, width_multiplier: float) -> int:
    """A layer's channels in a VGG16 narrowed by ``width_multiplier`` (at least one)."""
    return max(1, round(features * width_multiplier))


def relu_max_pool_2x2(x: jax.Array, stride: int, alignment: PoolingAlignment,
                      ties: PoolTies = "first") -> jax.Array:
    """``max_pool_values(relu(x))``, 2×2 windows with 'same' output size ceil(n / stride),
    whose gradient needs only a 4-bit mask per window: which of its inputs take its gradient.

    The winners are the window's elements equal to its maximum, and none where the maximum is
    not positive (the ReLU's gradient is 0 there). ``ties="all"`` is the original ML-Net's
    Theano ``MaxPoolGrad``: every maximum receives the window's whole gradient. ``"first"``
    gives it to the first maximum in row-major order, as PyTorch and TensorFlow do (what
    ``standard`` weights were trained with), and keeps bfloat16's rounding from making ties
    the original never had (6 % of pool1's windows at random init, which inflated conv1's
    gradient by ~18 %).

    Why one operation: the backward pass then reads the pooled gradient and the mask (a
    quarter of the input's elements, one byte each) and writes the input's gradient, instead of
    keeping the ReLU's output for its mask and comparing it with the pooled output again
    (pool1 of a 32×480×640 step: 1.7 GB moved instead of 3.3 GB, and the 1.26 GB output need
    not be kept). JAX's own gradients split ties and store argmax masks with a tie count.
    """
    _check_pooling(alignment, ties)
    return _relu_max_pool(x, stride, alignment, ties, x.shape[1:3])


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _relu_max_pool(x, stride, alignment, ties, size):
    return max_pool_values(jnp.maximum(x, 0), stride, alignment)


def _relu_max_pool_forward(x, stride, alignment, ties, size):
    # The barrier keeps XLA's simplifier from rewriting comparisons of the ReLU's output into
    # ones of its input (``max(x, 0) > 0`` into ``x > 0``), which would need the pre-activation
    # written out instead of fused with the convolution in cuDNN (benchmarks/NOTES.md, v2a).
    views = _window_views(jax.lax.optimization_barrier(jnp.maximum(x, 0)), stride, alignment)
    y = reduce(jnp.maximum, views)
    winners, taken = jnp.zeros(y.shape, jnp.uint8), ~(y > 0)
    for bit, view in enumerate(views):
        wins = (view == y) & ~taken
        if ties == "first":
            taken = taken | wins
        winners = winners | (wins.astype(jnp.uint8) << bit)
    return y, winners


def _relu_max_pool_backward(stride, alignment, ties, size, winners, g):
    zero = jnp.zeros((), g.dtype)
    if _pairs_of_rows_and_columns(stride, size):
        b, h, w, c = g.shape
        bit = jnp.arange(4, dtype=jnp.uint8).reshape(1, 1, 2, 1, 2, 1)  # row-major in window
        wins = (winners[:, :, None, :, None, :] >> bit) & 1
        grad = jnp.where(wins == 1, g[:, :, None, :, None, :], zero).reshape(b, 2 * h, 2 * w, c)
        if alignment == "keras1":  # windows (2i − 1, 2i): undo the forward's shift
            grad = jnp.pad(grad[:, 1:, 1:], ((0, 0), (0, 1), (0, 1), (0, 0)))
        return (grad,)
    shape = (g.shape[0], *size, g.shape[3])
    grad = jnp.zeros(shape, g.dtype)
    for bit, offset in enumerate(_window_offsets(alignment)):
        wins = jnp.where(((winners >> bit) & 1) == 1, g, zero)
        grad = grad + _spread(wins, shape, stride, offset)
    return (grad,)


_relu_max_pool.defvjp(_relu_max_pool_forward, _relu_max_pool_backward)


def pool_ties(alignment: PoolingAlignment, dtype) -> PoolTies:
    """Theano's rule where the original's gradient is the reference (``keras1`` weights in
    float32); the first maximum otherwise."""
    return "all" if alignment == "keras1" and jnp.dtype(dtype) == jnp.float32 else "first"


def max_pool_values(x: jax.Array, stride: int, alignment: PoolingAlignment) -> jax.Array:
    """2×2 max pooling with 'same' output size ceil(n / stride) (autodiff's gradient).

    ``standard`` (torchvision/TF): output i covers x[s·i], x[s·i+1]; padding at the end.
    ``keras1`` (Theano, the original ML-Net): output i covers x[s·i−1], x[s·i]; one row and
    column of padding at the start. Inputs are post-ReLU, so −inf padding equals zero padding.
    """
    _check_pooling(alignment)
    rows, cols = x.shape[1:3]
    if _pairs_of_rows_and_columns(stride, (rows, cols)):
        # Reshape-and-max: exact for even sizes, and its gradient avoids XLA's select_and_scatter.
        if alignment == "keras1":  # windows (2i − 1, 2i): shift down/right by one, zero-filled
            x = _shift_down_right(x)
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


def _check_pooling(alignment: str, ties: str = "first") -> None:
    if alignment not in ("standard", "keras1"):
        raise ValueError(f"pooling alignment must be 'standard' or 'keras1', got {alignment!r}")
    if ties not in ("all", "first"):
        raise ValueError(f"pooling ties must be 'all' or 'first', got {ties!r}")


def _pairs_of_rows_and_columns(stride: int, size: tuple[int, int]) -> bool:
    """Stride-2 windows that tile an even-sized input: pooling by reshape, no padding."""
    return stride == 2 and size[0] % 2 == 0 and size[1] % 2 == 0


def _shift_down_right(x: jax.Array) -> jax.Array:
    return jnp.pad(x, ((0, 0), (1, 0), (1, 0), (0, 0)))[:, :x.shape[1], :x.shape[2]]


def _window_offsets(alignment: PoolingAlignment) -> list[tuple[int, int]]:
    """Where window i's four elements lie relative to stride·i, in row-major order."""
    start = -1 if alignment == "keras1" else 0
    return [(start + row, start + col) for row in (0, 1) for col in (0, 1)]


def _window_views(x: jax.Array, stride: int, alignment: PoolingAlignment) -> list[jax.Array]:
    """(B, h, w, C) each: for every window, its element at each of the four offsets
    (row-major), 0 where that falls outside ``x`` (x is post-ReLU: 0 never wins)."""
    rows, cols = x.shape[1:3]
    if _pairs_of_rows_and_columns(stride, (rows, cols)):
        if alignment == "keras1":
            x = _shift_down_right(x)
        b, _, _, c = x.shape
        pairs = x.reshape(b, rows // 2, 2, cols // 2, 2, c)
        return [pairs[:, :, row, :, col, :] for row in (0, 1) for col in (0, 1)]
    out_size = tuple(-(-n // stride) for n in (rows, cols))
    return [_window_element(x, out_size, stride, offset) for offset in _window_offsets(alignment)]


def _window_element(x: jax.Array, out_size: tuple[int, int], stride: int,
                    offset: tuple[int, int]) -> jax.Array:
    """(B, h, w, C): for each window (i, j), its element x[stride·i + offset[0], stride·j +
    offset[1]]; 0 where that falls outside ``x``."""
    config, starts, limits, strides = [(0, 0, 0)], [0], [x.shape[0]], [1]
    for axis, low, m in zip((1, 2), offset, out_size):
        n = x.shape[axis]
        last = low + (m - 1) * stride
        config.append((max(-low, 0), max(last + 1 - n, 0), 0))
        starts.append(low + max(-low, 0))
        limits.append(last + max(-low, 0) + 1)
        strides.append(stride)
    config.append((0, 0, 0))
    starts.append(0), limits.append(x.shape[3]), strides.append(1)
    padded = jax.lax.pad(x, jnp.zeros((), x.dtype), config)
    return jax.lax.slice(padded, starts, limits, strides)


def _spread(v: jax.Array, shape: tuple, stride: int, offset: tuple[int, int]) -> jax.Array:
    """``v`` (B, h, w, C) placed on an input grid of ``shape``: v[i, j] lands at
    (stride·i + offset[0], stride·j + offset[1]); other positions hold 0. Negative padding
    crops (window elements outside the input)."""
    config = [(0, 0, 0)]
    for axis, low in zip((1, 2), offset):
        n, m = shape[axis], v.shape[axis]
        config.append((low, n - (low + (m - 1) * stride + 1), stride - 1))
    config.append((0, 0, 0))
    return jax.lax.pad(v, jnp.zeros((), v.dtype), config)


class VGG16(nn.Module):
    """The 13 VGG-16 convolutions returning ``pool3``, ``pool4`` and ``conv5_3``.

    Parameters are float32 whatever ``dtype`` (the compute dtype) is, so bfloat16 runs keep
    float32 master weights. ``width_multiplier`` < 1 narrows every layer; it exists only for
    the CPU demo (converted VGG-16 weights need the real widths). ``first_conv`` says where
    conv1_1 and its ReLU run (``mlnet_jax.first_conv``: 'auto', 'xla' or 'pallas'), and the
    adopted parts of conv1_2 with pool1 (``mlnet_jax.second_conv``) and of the ReLUs' and
    pools' backward passes (``mlnet_jax.bias_gradients``); the parameters and the result are
    the same either way.
    """

    pooling: PoolingAlignment = "standard"
    dtype: jnp.dtype = jnp.float32
    width_multiplier: float = 1.0
    first_conv: first_conv_kernel.FirstConvMode = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        x = x.astype(self.dtype)
        outputs = {}
        for name, features in VGG16_CONVS:
            x = self.layer(name, scaled_width(features, self.width_multiplier), x)
            if name in ("conv3_3", "conv4_3"):
                outputs[f"pool{name[4]}"] = x
        outputs["conv5_3"] = x
        return outputs

    @nn.nowrap  # no scope of its own: the program's names stay those of one __call__
    def layer(self, name: str, features: int, x: jax.Array) -> jax.Array:
        """Convolution ``name`` with its ReLU, and the pool after it if one follows: by one of
        the package's Pallas kernels where ``first_conv``'s mode and the kernel's switch say,
        with the same parameters either way."""
        if name == "conv1_1" and first_conv_kernel.kernel_applies(
                self.first_conv, x.shape, self.dtype, features=features):
            return first_conv_kernel.ConvBiasReLU(features, dtype=self.dtype, name=name)(x)
        if name == "conv1_2" and second_conv.kernel_applies(
                self.first_conv, x.shape, self.dtype, features, self.pooling):
            return second_conv.ConvBiasReLUPool(features, dtype=self.dtype, name=name)(x)
        part = bias_gradients.layer_part(self.first_conv, name, x.shape, self.dtype, features,
                                         self.pooling)
        if part:
            ties = pool_ties(self.pooling, self.dtype) if part == "pooled" else None
            return bias_gradients.ConvWithKernel(features, ties, dtype=self.dtype, name=name)(x)
        x = nn.Conv(features, (3, 3), padding="SAME", dtype=self.dtype,
                    param_dtype=jnp.float32, name=name)(x)
        if name in _POOL_STRIDE_AFTER:
            return relu_max_pool_2x2(x, _POOL_STRIDE_AFTER[name], self.pooling,
                                     pool_ties(self.pooling, self.dtype))
        return relu(x)
