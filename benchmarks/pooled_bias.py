"""Candidate ``cand_pooled_bias``: the backward pass of conv1_2, conv2_2 and conv3_3's bias,
ReLU and 2×2 pool as one Pallas (Triton) kernel.

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
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mlnet_jax import first_conv, vgg

rewritten = 0  # layers traced with the kernel, for throughput.py's check


def kernel_fits(shape, stride: int, alignment: str, channels: int) -> bool:
    """Stride-2 standard windows tiling an even input whose channels Triton can block."""
    return (stride == 2 and alignment == "standard" and vgg._pairs_of_rows_and_columns(
        stride, shape[1:3]) and channels >= 16 and not channels & (channels - 1)
        and first_conv._block_width(shape[2] // 2) is not None)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def conv_relu_pool(x, kernel, bias, ties, interpret):
    """``relu_max_pool_2x2(conv(x, kernel) + bias, 2, 'standard', ties)``."""
    return vgg.relu_max_pool_2x2(_conv(x, kernel) + bias, 2, "standard", ties)


def _conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _forward(x, kernel, bias, ties, interpret):
    pre = _conv(x, kernel) + bias
    y, winners = vgg._relu_max_pool_forward(pre, 2, "standard", ties, pre.shape[1:3])
    return y, (x, kernel, winners)


def _backward(ties, interpret, residuals, g):
    x, kernel, winners = residuals
    spread, dbias = spread_and_bias_grad(g, winners, interpret)
    _, conv_vjp = jax.vjp(_conv, x, kernel)
    dx, dkernel = conv_vjp(spread)
    return dx, dkernel, dbias.astype(kernel.dtype)


conv_relu_pool.defvjp(_forward, _backward)


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


class ConvReLUPool(nn.Module):
    """``relu_max_pool_2x2(flax.linen.Conv(features, (3, 3))(x), 2, 'standard', ties)`` with
    Conv's parameters, by ``conv_relu_pool``."""

    features: int
    ties: str
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        global rewritten
        rewritten += 1
        kernel = self.param("kernel", nn.linear.default_kernel_init,
                            (3, 3, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return conv_relu_pool(x, kernel, bias, self.ties, first_conv.interpreted())


class VGG16(vgg.VGG16):
    """``vgg.VGG16`` whose stride-2 pools take their conv with them into ``ConvReLUPool``
    where the kernel fits; every other layer as the package builds it."""

    @nn.compact
    def __call__(self, x):
        x = x.astype(self.dtype)
        outputs = {}
        for name, features in vgg.VGG16_CONVS:
            features = vgg.scaled_width(features, self.width_multiplier)
            stride = vgg._POOL_STRIDE_AFTER.get(name)
            if stride and kernel_fits(x.shape, stride, self.pooling, features):
                x = ConvReLUPool(features, vgg.pool_ties(self.pooling, self.dtype),
                                 dtype=self.dtype, name=name)(x)
            elif name == "conv1_1" and first_conv.kernel_applies(
                    self.first_conv, x.shape, self.dtype, features=features):
                x = first_conv.ConvBiasReLU(features, dtype=self.dtype, name=name)(x)
                continue
            else:
                x = nn.Conv(features, (3, 3), padding="SAME", dtype=self.dtype,
                            param_dtype=jnp.float32, name=name)(x)
                x = (vgg.relu_max_pool_2x2(x, stride, self.pooling,
                                           vgg.pool_ties(self.pooling, self.dtype))
                     if stride else vgg.relu(x))
            if name in ("conv3_3", "conv4_3"):
                outputs[f"pool{name[4]}"] = x
        outputs["conv5_3"] = x
        return outputs
