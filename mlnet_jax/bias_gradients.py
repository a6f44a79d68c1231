"""The backward passes of VGG's ReLUs (and of the stride-2 pools after them) with their
convolutions' bias gradients as Pallas (Triton) kernels instead of XLA's reduction fusions,
taken only once measured faster (``ADOPTED``).

Why: in the v3 training profile on the H200 (2026-11-28, committed trace and HLO) the three
reduction fusions that spread each stride-2 pool's gradient to its winners and sum the bias
gradient ran at 1.95, 2.06 and 1.76 TB/s (0.887 + 0.420 + 0.246 ms for 3.03 GB), and those of
the 256- and 512-wide layers that no pool follows at 2.3–2.6 TB/s (1.45 ms for 3.76 GB), where
plain element-wise passes of the same step ran at 4–5 TB/s: XLA tiles the bias's column
reduction poorly. ``spread_and_bias_grad`` reads the pooled gradient and the winner mask once
per window and writes the input's gradient as four strided stores, summing the bias gradient
per program; ``mask_and_bias_grad`` reads the incoming gradient and the ReLU's output once.
XLA adds the partial sums; cuDNN keeps both convolution gradients. Same values: the same
winners, float32 sums. Predicted (H200, bf16 32 × 480×640): ``pooled`` −0.6 to −0.75 ms per
step (+1.4 to +1.8 % training), ``unpooled`` another −0.35 to −0.45 ms; prediction unchanged
(no backward pass). conv5_3 is left to XLA: its incoming gradient is a slice of the head's
concatenated, dropout-masked gradient, which XLA fuses into its own reduction but would have to
write out whole for a kernel (0.58 GB per step, seen compiled for an H200).

``ADOPTED`` names the parts that ``first_conv="auto"`` and ``"pallas"`` take: ``pooled``
(conv1_2, conv2_2 and conv3_3 with their pools, where ``mlnet_jax.second_conv`` does not take
conv1_2) and ``unpooled`` (conv3_1, conv3_2, conv4_1, conv4_2, conv5_1, conv5_2). It is empty
until a part is measured faster on a card beside the code (``benchmarks/throughput.py``'s
``cand_pooled_bias`` and ``cand_bias_kernels`` set it). 'auto' takes them in bfloat16 on a lone
Hopper GPU, 'pallas' anywhere (off a GPU in the interpreter).
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mlnet_jax import first_conv, vgg

PARTS: tuple[str, ...] = ("pooled", "unpooled")
ADOPTED: frozenset[str] = frozenset()  # the PARTS measured faster (benchmarks/NOTES.md)


def layer_part(mode: str, name: str, shape: tuple[int, ...], dtype, features: int,
               pooling: str) -> str | None:
    """Which adopted part takes layer ``name`` (its input ``shape``, NHWC, ``features``
    outputs) under ``mode`` (``first_conv``'s 'auto', 'xla' or 'pallas'): 'pooled',
    'unpooled' or None (the package's layer)."""
    if mode == "xla" or (mode == "auto" and not _auto_takes(dtype)):
        return None
    stride = vgg._POOL_STRIDE_AFTER.get(name)
    if stride:
        fits = "pooled" in ADOPTED and pool_kernel_fits(shape, stride, pooling, features)
        return "pooled" if fits else None
    if ("unpooled" in ADOPTED and name not in ("conv1_1", vgg.VGG16_CONV_NAMES[-1])
            and relu_kernel_fits(shape, features)):
        return "unpooled"
    return None


_auto_takes = first_conv.auto_takes  # its own name: tests fake a Hopper GPU per module


def pool_kernel_fits(shape, stride: int, alignment: str, channels: int) -> bool:
    """Stride-2 standard windows tiling an even input whose channels Triton can block, on
    one device (the kernel is not partitioned)."""
    return (alignment == "standard" and vgg._pairs_of_rows_and_columns(stride, shape[1:3])
            and first_conv.triton_block(channels) and jax.device_count() == 1
            and first_conv._block_width(shape[2] // 2) is not None)


def relu_kernel_fits(shape, channels: int) -> bool:
    """A layer (its input or output ``shape``: the same pixels) of ``channels`` outputs wide
    enough that XLA's reduction was slow, in blocks Triton can take, on one device."""
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
    return y, (x, kernel, bias, winners)


def _backward(ties, interpret, residuals, g):
    x, kernel, bias, winners = residuals
    return _with_conv_gradients(x, kernel, bias, *spread_and_bias_grad(g, winners, interpret))


def _with_conv_gradients(x, kernel, bias, g, dbias):
    """(x's gradient, kernel's, bias's) for the pre-activation's gradient ``g``: cuDNN's two
    backward convolutions on a GPU."""
    conv, conv_vjp = jax.vjp(first_conv.reference_conv, x, kernel)
    return (*conv_vjp(g.astype(conv.dtype)), dbias.astype(bias.dtype))


conv_relu_pool.defvjp(_forward, _backward)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def conv_relu(x, kernel, bias, interpret):
    """``relu(conv(x, kernel) + bias)``."""
    return jnp.maximum(first_conv.reference_conv(x, kernel) + bias, 0)


def _relu_forward(x, kernel, bias, interpret):
    y = jnp.maximum(first_conv.reference_conv(x, kernel) + bias, 0)
    # As mlnet_jax/relu.py: keeps XLA from turning the mask on y back into one on the
    # pre-activation, which cuDNN's fused conv + bias + ReLU does not write.
    return y, (x, kernel, bias, jax.lax.optimization_barrier(y))


def _relu_backward(interpret, residuals, g):
    x, kernel, bias, y = residuals
    return _with_conv_gradients(x, kernel, bias, *mask_and_bias_grad(g, y, interpret))


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
        grid=grid, compiler_params=first_conv.compiler_params(4, 1, interpret),
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
        grid=grid, compiler_params=first_conv.compiler_params(4, 1, interpret),
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
        x, kernel, bias = first_conv.conv_parameters(self, x, self.features, self.dtype)
        if self.ties:
            return conv_relu_pool(x, kernel, bias, self.ties, first_conv.interpreted())
        return conv_relu(x, kernel, bias, first_conv.interpreted())
