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

from mlnet_jax import first_conv as fc

rewritten = 0  # kernels traced, for throughput.py's check that the variant changed the program


def image_reader(x):
    """``first_conv._reader`` for the image itself: its rows flattened to (B, H, 3W)."""
    global rewritten
    rewritten += 1
    b, h, w, _ = x.shape
    return x.reshape(b, h, w * 3), partial(_window, height=h, width=w)


def _window(flat_ref, image, row, left, block_w, *, height, width):
    """(block_w, 16) in the image's dtype: ``column_taps``' values at row ``row`` of the padded
    image (0 and ``height`` + 1 are the zero padding) for columns ``left`` … ``left + block_w``."""
    from jax.experimental.pallas import triton as pallas_triton
    row = row - 1  # the image's row
    column = jax.lax.broadcasted_iota(jnp.int32, (block_w, fc.CHANNELS), 0)
    channel = jax.lax.broadcasted_iota(jnp.int32, (block_w, fc.CHANNELS), 1)
    offset = (left + column) * 3 + channel - 3
    valid = ((channel < 9) & (offset >= 0) & (offset < width * 3)
             & (row >= 0) & (row < height))
    return pallas_triton.load(
        flat_ref.at[image, jnp.clip(row, 0, height - 1), jnp.where(valid, offset, 0)],
        mask=valid, other=0)
