"""Candidates ``cand_pooled_bias`` and ``cand_bias_kernels``: the bias gradients of VGG's
convolutions, with the ReLU's mask and the pool's gradient before them, as Pallas (Triton)
kernels instead of XLA's reduction fusions.

``cand_pooled_bias``: the backward pass of conv1_2, conv2_2 and conv3_3's bias, ReLU and 2×2
pool as one kernel.

Why: in the v3 training profile on the H200 (2026-11-28, committed trace and HLO), the three
reduction fusions that spread each pool's gradient to its winners and sum the bias gradient
ran at 1.95, 2.06 and 1.76 TB/s (0.887 + 0.420 + 0.246 ms for 3.03 GB) where plain
element-wise passes of the same step ran at 4–5 TB/s: XLA tiles the bias's column reduction
over the (B, h, 2, w, 2, C) view poorly. The kernel reads the pooled gradient and the winner
mask once per window and writes the input's gradient as four strided stores of C channels,
summing the bias gradient per program (XLA adds the partial sums). Same values: the same
winners, float32 sums. Predicted (H200, bf16 32 × 480×640, standard pooling): those three
passes at ~3.5 TB/s, −0.6 to −0.75 ms per step, +1.4 to +1.8 % training; prediction unchanged
(no backward pass).

``cand_bias_kernels``: that, and the 256- and 512-wide layers that no pool follows (conv3_1,
conv3_2, conv4_1, conv4_2, conv5_1, conv5_2) with their ReLU's mask and bias gradient as one
kernel reading the incoming gradient and the ReLU's output once. Not conv5_3: its incoming
gradient is a slice of the head's concatenated, dropout-masked gradient, which XLA fuses into
its own reduction but must write out whole for a kernel (0.58 GB per step, seen in the program
compiled for an H200 by ``deviceless.py``, 2026-11-28). XLA's fusions for those ran at
2.3–2.6 TB/s in the same trace (1.45 ms for 3.76 GB with conv5_3's, ~11 % of them; the
128-wide conv2_1's at 3.96 TB/s is left to XLA). Predicted: another −0.35 to −0.45 ms, +0.9 to
+1.1 % training.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mlnet_jax import first_conv, second_conv, vgg

rewritten = 0  # layers traced with the kernel, for throughput.py's check


def pool_kernel_fits(shape, stride: int, alignment: str, channels: int) -> bool:
    """Stride-2 standard windows tiling an even input whose channels Triton can block, on
    one device (the kernel is not partitioned)."""
    return (alignment == "standard" and vgg._pairs_of_rows_and_columns(stride, shape[1:3])
            and first_conv.triton_block(channels) and jax.device_count() == 1
            and first_conv._block_width(shape[2] // 2) is not None)


def relu_kernel_fits(shape, channels: int) -> bool:
    """A layer wide enough that XLA's reduction was slow, in blocks Triton can take, on one
    device."""
    pixels = shape[0] * shape[1] * shape[2]
    return (channels >= 256 and first_conv.triton_block(channels) and jax.device_count() == 1
            and pixels % _rows(channels) == 0)


def _rows(channels: int) -> int:
    """Pixels per program of the ReLU kernel: 16 K elements."""
    return max(16, 16384 // channels)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def conv_relu_pool(x, kernel, bias, ties, interpret):
    """``relu_max_pool_2x2(conv(x, kernel) + bias, 2, 'standard', ties)``."""
    pre = first_conv.reference_conv(x, kernel) + bias
    return vgg.relu_max_pool_2x2(pre, 2, "standard", ties)


def _forward(x, kernel, bias, ties, interpret):
    pre = first_conv.reference_conv(x, kernel) + bias
    y, winners = vgg._relu_max_pool_forward(pre, 2, "standard", ties, pre.shape[1:3])
    return y, (x, kernel, winners)


def _backward(ties, interpret, residuals, g):
    x, kernel, winners = residuals
    return _with_conv_gradients(x, kernel, *spread_and_bias_grad(g, winners, interpret))


def _with_conv_gradients(x, kernel, g, dbias):
    """(x's gradient, kernel's, bias's) for the pre-activation's gradient ``g``: cuDNN's two
    backward convolutions on a GPU."""
    _, conv_vjp = jax.vjp(first_conv.reference_conv, x, kernel)
    return (*conv_vjp(g), dbias.astype(kernel.dtype))


conv_relu_pool.defvjp(_forward, _backward)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def conv_relu(x, kernel, bias, interpret):
    """``relu(conv(x, kernel) + bias)``."""
    return jnp.maximum(first_conv.reference_conv(x, kernel) + bias, 0)


def _relu_forward(x, kernel, bias, interpret):
    y = jnp.maximum(first_conv.reference_conv(x, kernel) + bias, 0)
    # As mlnet_jax/relu.py: keeps XLA from turning the mask on y back into one on the
    # pre-activation, which cuDNN's fused conv + bias + ReLU does not write.
    return y, (x, kernel, jax.lax.optimization_barrier(y))


def _relu_backward(interpret, residuals, g):
    x, kernel, y = residuals
    return _with_conv_gradients(x, kernel, *mask_and_bias_grad(g, y, interpret))


conv_relu.defvjp(_relu_forward, _relu_backward)


def mask_and_bias_grad(g, y, interpret):
    """(``g`` where ``y`` > 0, else 0; its sum over all but the channels in float32)."""
    shape, channels = g.shape, g.shape[-1]
    rows = _rows(channels)
    grid = (g.size // channels // rows,)
    masked, partial_sums = pl.pallas_call(
        partial(_mask_body, rows=rows),
        out_shape=(jax.ShapeDtypeStruct((g.size // channels, channels), g.dtype),
                   jax.ShapeDtypeStruct((*grid, channels), jnp.float32)),
        grid=grid, compiler_params=None if interpret else first_conv._triton_params(),
        interpret=interpret, name="relu_bias_grad",
    )(g.reshape(-1, channels), y.reshape(-1, channels))
    return masked.reshape(shape), jnp.sum(partial_sums, axis=0)


def _mask_body(g_ref, y_ref, masked_ref, sums_ref, *, rows):
    """One program: ``rows`` pixels, all channels."""
    i = pl.program_id(0)
    block = pl.ds(i * rows, rows)
    g = g_ref[block, :]
    masked = jnp.where(y_ref[block, :] > 0, g, jnp.zeros((), g.dtype))
    masked_ref[block, :] = masked
    sums_ref[i] = jnp.sum(masked.astype(jnp.float32), axis=0)


def spread_and_bias_grad(g, winners, interpret):
    """(the pool's input gradient (B, 2h, 2w, C) in ``g``'s dtype, its sum over all but the
    channels in float32) from the pooled gradient ``g`` (B, h, w, C) and the winner mask (bit
    2·row + column of each window, as ``vgg._relu_max_pool_forward`` makes it)."""
    b, h, w, c = g.shape
    block_w = first_conv._block_width(w)
    grid = (b * h, w // block_w)
    spread, partial_sums = pl.pallas_call(
        partial(_spread_body, rows=h, block_w=block_w, channels=c),
        out_shape=(jax.ShapeDtypeStruct((b, h, 2, w, 2 * c), g.dtype),
                   jax.ShapeDtypeStruct((*grid, c), jnp.float32)),
        grid=grid, compiler_params=None if interpret else first_conv._triton_params(),
        interpret=interpret, name="pool_relu_bias_grad",
    )(g, winners)
    return spread.reshape(b, 2 * h, 2 * w, c), jnp.sum(partial_sums, axis=(0, 1))


def _spread_body(g_ref, winners_ref, spread_ref, sums_ref, *, rows, block_w, channels):
    """One program: ``block_w`` windows of one row of windows, all channels."""
    i, j = pl.program_id(0), pl.program_id(1)
    image, row, left = i // rows, i % rows, j * block_w
    g = g_ref[image, row, pl.ds(left, block_w), :]
    winners = winners_ref[image, row, pl.ds(left, block_w), :]
    total = jnp.zeros((channels,), jnp.float32)
    for bit in range(4):
        part = jnp.where(((winners >> bit) & 1) == 1, g, jnp.zeros((), g.dtype))
        window_row, window_col = divmod(bit, 2)
        spread_ref[image, row, window_row, pl.ds(left, block_w),
                   pl.ds(window_col * channels, channels)] = part
        total = total + jnp.sum(part.astype(jnp.float32), axis=0)
    sums_ref[i, j] = total


class ConvWithKernel(nn.Module):
    """``flax.linen.Conv(features, (3, 3))`` with its parameters, followed by its ReLU and, with
    ``ties``, its stride-2 standard pool: ``conv_relu_pool`` or ``conv_relu``."""

    features: int
    ties: str | None = None
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        global rewritten
        rewritten += 1
        x, kernel, bias = first_conv.conv_parameters(self, x, self.features, self.dtype)
        if self.ties:
            return conv_relu_pool(x, kernel, bias, self.ties, first_conv.interpreted())
        return conv_relu(x, kernel, bias, first_conv.interpreted())


class VGG16(vgg.VGG16):
    """``vgg.VGG16`` whose stride-2 pools take their conv with them into ``ConvWithKernel``
    where the kernel fits (``cand_pooled_bias``), and with ``relu_kernels`` also the wide
    layers no pool follows (``cand_bias_kernels``); every other layer as the package's."""

    relu_kernels: bool = False

    @nn.nowrap
    def layer(self, name, features, x):
        if name == "conv1_2" and second_conv.kernel_applies(self.first_conv, x.shape,
                                                            self.dtype, features, self.pooling):
            return super().layer(name, features, x)  # the package's kernel, where adopted
        stride = vgg._POOL_STRIDE_AFTER.get(name)
        if stride and pool_kernel_fits(x.shape, stride, self.pooling, features):
            return ConvWithKernel(features, vgg.pool_ties(self.pooling, self.dtype),
                                  dtype=self.dtype, name=name)(x)
        last = vgg.VGG16_CONV_NAMES[-1]  # its gradient is a slice of the head's, left to XLA
        if (self.relu_kernels and not stride and name not in ("conv1_1", last)
                and relu_kernel_fits(x.shape, features)):
            return ConvWithKernel(features, dtype=self.dtype, name=name)(x)
        return super().layer(name, features, x)


def vgg16_with_every_kernel(**fields) -> VGG16:
    """``cand_bias_kernels``' backbone."""
    return VGG16(relu_kernels=True, **fields)
