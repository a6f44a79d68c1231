"""Candidate ``cand_conv1_direct``: conv1_1's two Pallas kernels (``mlnet_jax/first_conv.py``)
reading the image itself instead of its three shifted column copies.

Why: in ``first_conv`` XLA first writes ``column_taps`` (B, H + 2, W, 16), five times the bf16
image (316 MB at 32 × 480×640), which the forward kernel reads 1.5 times over (each program
re-reads two rows) and training keeps live until the weight-gradient kernel reads it again
(+0.24 GiB of executable memory). Here each kernel loads the 16 products' inputs itself: for
output column x, channels dx·3 + c of the padded row are the 9 values of the flat (W·3) row
starting at (x − 1)·3, so a (block_w, 16) tile is a masked load of overlapping windows of one
contiguous row, zero where it passes the image's edges and past the 9. Same products, same
sums; ~0.7 GB less traffic per prediction step. Predicted (H200, bf16 32 × 480×640): +0.8 to
+1.5 % prediction, +0.3 to +0.8 % training, −0.24 GiB training memory; the risk is that Triton
makes the overlapping masked loads slower than the plain block loads they replace.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mlnet_jax import first_conv as fc

rewritten = 0  # kernels traced, for throughput.py's check that the variant changed the program


def forward_kernel(x, kernel, bias, interpret):
    """``first_conv._forward_kernel`` with the image read directly."""
    global rewritten
    rewritten += 1
    b, h, w, _ = x.shape
    out = kernel.shape[3]
    block_w, rows = fc._block_width(w), fc._divisor(h, (4, 2, 1))
    body = partial(_forward_body, height=h, width=w, rows=rows, block_w=block_w,
                   precision=fc._precision(x.dtype))
    return pl.pallas_call(
        body, out_shape=jax.ShapeDtypeStruct((b, h, w, out), x.dtype),
        grid=(b * h // rows, w // block_w),
        compiler_params=None if interpret else fc._triton_params(), interpret=interpret,
        name="conv1_1_bias_relu_direct",
    )(x.reshape(b, h, w * 3), fc.row_taps(kernel).astype(x.dtype), bias.astype(jnp.float32))


def _forward_body(flat_ref, taps_ref, bias_ref, out_ref, *, height, width, rows, block_w,
                  precision):
    """One program: ``rows`` output rows × ``block_w`` columns, from ``rows`` + 2 image rows."""
    i, j = pl.program_id(0), pl.program_id(1)
    per_image = height // rows
    image, top, left = i // per_image, (i % per_image) * rows, j * block_w
    inputs = [_window(flat_ref, image, top + r - 1, left, height, width, block_w)
              for r in range(rows + 2)]
    taps = [taps_ref[dy] for dy in range(3)]
    bias = bias_ref[...][None, :]
    for r in range(rows):
        sums = bias
        for dy in range(3):
            sums = sums + jax.lax.dot(inputs[r + dy], taps[dy], precision=precision,
                                      preferred_element_type=jnp.float32)
        out_ref[image, top + r, pl.ds(left, block_w), :] = jnp.maximum(sums, 0).astype(
            out_ref.dtype)


def _window(flat_ref, image, row, left, height, width, block_w):
    """(block_w, 16) in the image's dtype: ``column_taps``' values at image row ``row``
    (−1 and ``height`` are the zero padding) for columns ``left`` … ``left + block_w``."""
    from jax.experimental.pallas import triton as pallas_triton
    column = jax.lax.broadcasted_iota(jnp.int32, (block_w, fc.CHANNELS), 0)
    channel = jax.lax.broadcasted_iota(jnp.int32, (block_w, fc.CHANNELS), 1)
    offset = (left + column) * 3 + channel - 3
    valid = ((channel < 9) & (offset >= 0) & (offset < width * 3)
             & (row >= 0) & (row < height))
    return pallas_triton.load(
        flat_ref.at[image, jnp.clip(row, 0, height - 1), jnp.where(valid, offset, 0)],
        mask=valid, other=0)


def weight_grad_kernel(x, y, g, interpret):
    """``first_conv._weight_grad_kernel`` with the image read directly."""
    global rewritten
    rewritten += 1
    b, h, w, _ = x.shape
    out = y.shape[3]
    block_w, rows = fc._block_width(w), fc._divisor(h, (32, 16, 8, 4, 2, 1))
    grid = (b, h // rows, w // block_w)
    body = partial(_weight_grad_body, height=h, width=w, rows=rows, block_w=block_w,
                   precision=fc._precision(x.dtype))
    taps, bias = pl.pallas_call(
        body, out_shape=(jax.ShapeDtypeStruct((*grid, 3, fc.CHANNELS, out), jnp.float32),
                         jax.ShapeDtypeStruct((*grid, out), jnp.float32)),
        grid=grid, compiler_params=None if interpret else fc._triton_params(),
        interpret=interpret, name="conv1_1_weight_grad_direct",
    )(x.reshape(b, h, w * 3), y, g)
    taps = jnp.sum(taps, axis=(0, 1, 2))[:, :9]  # (3, 9, O): rows dx·3 + c, as row_taps
    return taps.reshape(3, 3, 3, out), jnp.sum(bias, axis=(0, 1, 2))


def _weight_grad_body(flat_ref, y_ref, g_ref, taps_ref, bias_ref, *, height, width, rows,
                      block_w, precision):
    """One program: the partial sums of ``rows`` rows × ``block_w`` columns of one image."""
    image, chunk, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    top, left = chunk * rows, j * block_w
    out = y_ref.shape[3]

    def row(r, sums):
        y = y_ref[image, top + r, pl.ds(left, block_w), :]
        g = g_ref[image, top + r, pl.ds(left, block_w), :]
        masked = jnp.where(y > 0, g, jnp.zeros((), g.dtype))
        taps = [sums[dy] + jax.lax.dot_general(
            _window(flat_ref, image, top + r + dy - 1, left, height, width, block_w), masked,
            (((0,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)
            for dy in range(3)]
        return (*taps, sums[3] + jnp.sum(masked.astype(jnp.float32), axis=0))

    zeros = jnp.zeros((fc.CHANNELS, out), jnp.float32)
    sums = jax.lax.fori_loop(0, rows, row, (zeros, zeros, zeros, jnp.zeros((out,), jnp.float32)))
    for dy in range(3):
        taps_ref[image, chunk, j, dy] = sums[dy]
    bias_ref[image, chunk, j] = sums[3]
