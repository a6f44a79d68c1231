"""Candidates ``cand_conv12_pool`` (``_m256``, ``_l1``) and ``cand_conv12t_*``: conv1_2, its
bias, ReLU and pool1 as one Pallas (Triton) kernel that writes only the pooled output (and in
training the pool's winner mask); the transposed ones also conv1_2's gradients.

Why: in prediction cuDNN runs conv1_2 (64 → 64 channels at 480×640) at 535 TFLOP/s (1.354 ms
on the H200, 2026-11-28, v3 profile), the slowest of the wide convolutions, and pool1 then
reads its 1.26 GB output again (0.367 ms): 1.72 ms, 13 % of the step. In training the forward
is 1.486 ms (488 TFLOP/s) plus pool1's two fusions (0.79 ms), and nothing but the pool reads
conv1_2's output. The kernel is an implicit GEMM: each program takes two output rows ×
``block_cols`` columns (the M of the products) and all 64 output channels (N), sums the nine
taps' K = 64 products over a ``fori_loop`` that Triton can pipeline (``num_stages=3``), loading
each tap's input tile by row and column indices clipped to the image and masked to zero
outside it (the 'SAME' padding, without a padded copy), then adds the bias, applies the ReLU
and takes the 2×2 maxima (and their first argmax for the mask) before its only writes. Same
sums in float32, one rounding; the same mask as ``vgg.relu_max_pool_2x2``'s, whose backward
pass (XLA's) it keeps. Predicted (H200, bf16 32 × 480×640): the products at 450–600 TFLOP/s,
1.2–1.6 ms for what took 1.72 in prediction (−0.8 to +3.8 %) and 2.28 in training (+1.5 to
+2.5 %); a loss if Triton's products stay under ~470 TFLOP/s. ``_m256`` takes 128 columns
(M = 256, cuDNN's tile for this layer) with 8 warps.

``_l1`` does not pipeline the loop (``num_stages=1``). Compiled for an H200 without one
(``deviceless.py``, 2026-11-28), the pipelined kernel's products are Hopper's wgmma, but its
loads are ``cp.async.cg``, which bypass L1: each program fetches its (2, 64, 64) input tile nine
times from L2 (once per tap, shifted by a row or a column) with a tap's weights, ~44 FLOP per
byte; at the several TB/s an H200's L2 gives that may hold the products well under cuDNN's
535 TFLOP/s. Unpipelined, the loads are plain ``ld.global``, which L1 keeps: the four input rows
a program reads (33 KB) are fetched from L2 about once, and other programs on the SM hide the
latency the pipeline would have. Which wins is for the card to say.

``transposed`` (``cand_conv12t_pool``, third session of 2026-11-28) computes each program's
products the other way round, (64 channels × 256 pixels), because the N = 64 of the
(pixels × channels) form makes every product an m64n64k16 wgmma, whose operand reads and the
tile loads exceed what shared memory gives (cuDNN's conv1_2 runs so, at 535 TFLOP/s):
``_transposed_sums``. ``conv_transposed`` and ``weight_gradient`` take the same form for
conv1_2's input gradient (``cand_conv12t_dgrad``) and weight gradient (``cand_conv12t_bwd``).
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mlnet_jax import first_conv, vgg

rewritten = 0  # layers traced with the kernel, for throughput.py's check


def fits(shape, features: int, block_cols: int) -> bool:
    """Even rows, whole column blocks, channels Triton can block, one device (the kernel is
    not partitioned)."""
    _, rows, cols, channels = shape
    return (rows % 2 == 0 and cols % block_cols == 0 and jax.device_count() == 1
            and first_conv.triton_block(channels) and first_conv.triton_block(features))


def conv_relu_pool(x, kernel, bias, *, block_cols=64, num_warps=4, num_stages=3,
                   interpret=False, winners=False, transposed=False):
    """``max_pool_values(relu(conv(x, kernel, 'SAME') + bias), 2, 'standard')`` in ``x``'s
    dtype (float32 sums); with ``winners`` also the pool's winner mask as
    ``vgg.relu_max_pool_2x2`` keeps it (bit 2·row + column of each window's first maximum,
    none where the maximum is 0). ``transposed`` computes each program's products as
    (channels × pixels) instead of (pixels × channels)."""
    b, h, w, cin = x.shape
    cout = kernel.shape[3]
    taps = (_transposed_taps(kernel, x.dtype) if transposed
            else kernel.reshape(9, cin, cout).astype(x.dtype))
    body = partial(_body_transposed if transposed else _body, height=h, width=w,
                   block_cols=block_cols, precision=first_conv._precision(x.dtype))
    params = _compiler_params(num_warps, num_stages, interpret)
    pooled = jax.ShapeDtypeStruct((b, h // 2, w // 2, cout), x.dtype)
    out_shape = (pooled, jax.ShapeDtypeStruct(pooled.shape, jnp.uint8)) if winners else pooled
    return pl.pallas_call(
        body, out_shape=out_shape, grid=(b * h // 2, w // block_cols), compiler_params=params,
        interpret=interpret,
        name="conv_bias_relu_pool_t" if transposed else "conv_bias_relu_pool",
    )(x, taps, bias.astype(jnp.float32))


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def trainable_conv_relu_pool(x, kernel, bias, options):
    """``conv_relu_pool`` with a gradient, ``options`` its keywords and the backward pass's
    (``dgrad``, ``wgrad``) as (name, value) pairs (hashable): the forward pass also writes
    the winner mask (not conv1_2's 1.26 GB output, which only the pool needed), the backward
    pass is the package's (the pool's spread and the bias gradient by XLA, then cuDNN's two
    gradients; with ``dgrad`` the input gradient by ``conv_transposed``, with ``wgrad`` the
    weight gradient by ``weight_gradient``)."""
    return conv_relu_pool(x, kernel, bias, **_forward_options(options))


def _forward_options(options) -> dict:
    """``conv_relu_pool``'s keywords among ``options`` (``dgrad``, ``wgrad``: the backward
    pass's)."""
    return {k: v for k, v in options if k not in ("dgrad", "wgrad")}


def _forward(x, kernel, bias, options):
    y, winners = conv_relu_pool(x, kernel, bias, winners=True, **_forward_options(options))
    return y, (x, kernel, winners)


def _backward(options, residuals, g):
    x, kernel, winners = residuals
    options = dict(options)
    (spread,) = vgg._relu_max_pool_backward(2, "standard", "first", x.shape[1:3], winners, g)
    if options.get("dgrad"):  # with the forward kernel's tiling
        flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
        dx = conv_transposed(spread, flipped, **{k: options[k] for k in (
            "block_cols", "num_warps", "num_stages", "interpret")}).astype(x.dtype)
    else:
        (dx,) = jax.vjp(lambda x: first_conv.reference_conv(x, kernel), x)[1](spread)
    if options.get("wgrad") and weight_gradient_fits(x.shape, kernel.shape[3]):
        dkernel = weight_gradient(x, spread, interpret=options["interpret"]).astype(kernel.dtype)
    else:
        (dkernel,) = jax.vjp(lambda k: first_conv.reference_conv(x, k), kernel)[1](spread)
    return dx, dkernel, jnp.sum(spread, axis=(0, 1, 2)).astype(kernel.dtype)


trainable_conv_relu_pool.defvjp(_forward, _backward)


def _compiler_params(num_warps: int, num_stages: int, interpret: bool):
    """Triton's settings for a call, none for Pallas's interpreter."""
    if interpret:
        return None
    from jax.experimental.pallas import triton as pallas_triton
    return pallas_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _load_padded(x_ref, image, rows, cols, channel, *, height, width):
    """``x[image, rows, cols, channel]`` (indices broadcast together), zero outside the image
    (the 'SAME' padding without a padded copy): indices clipped to it, the load masked."""
    from jax.experimental.pallas import triton as pallas_triton
    shape = jnp.broadcast_shapes(jnp.shape(rows), jnp.shape(cols), jnp.shape(channel))
    inside = jnp.broadcast_to((rows >= 0) & (rows < height) & (cols >= 0) & (cols < width),
                              shape)
    return pallas_triton.load(
        x_ref.at[image, jnp.clip(rows, 0, height - 1), jnp.clip(cols, 0, width - 1), channel],
        mask=inside, other=0)


def _transposed_taps(kernel, dtype):
    """A 3×3 HWIO kernel as (tap, output, input channels): the transposed products' A."""
    cin, cout = kernel.shape[2:]
    return jnp.transpose(kernel.reshape(9, cin, cout), (0, 2, 1)).astype(dtype)


def _body(x_ref, taps_ref, bias_ref, out_ref, winners_ref=None, *, height, width, block_cols,
          precision):
    """One program: output rows 2r, 2r + 1 × ``block_cols`` columns → one pooled row."""
    i, j = pl.program_id(0), pl.program_id(1)
    pooled_rows = height // 2
    image, row, left = i // pooled_rows, i % pooled_rows, j * block_cols
    channels, features = x_ref.shape[3], taps_ref.shape[2]

    def tap(t, sums):
        dy = jax.lax.div(t, 3)  # (lax.div: Triton lowers jnp.remainder badly)
        dx = t - 3 * dy
        rows = 2 * row + dy - 1 + jax.lax.broadcasted_iota(jnp.int32, (2, 1, 1), 0)
        cols = left + dx - 1 + jax.lax.broadcasted_iota(jnp.int32, (1, block_cols, 1), 1)
        channel = jax.lax.broadcasted_iota(jnp.int32, (1, 1, channels), 2)
        tile = _load_padded(x_ref, image, rows, cols, channel, height=height, width=width)
        return sums + jax.lax.dot(tile.reshape(2 * block_cols, channels), taps_ref[t],
                                  precision=precision, preferred_element_type=jnp.float32)

    sums = jax.lax.fori_loop(0, 9, tap, jnp.zeros((2 * block_cols, features), jnp.float32))
    y = jnp.maximum(sums + bias_ref[...][None, :], 0).astype(out_ref.dtype)
    columns = pl.ds(left // 2, block_cols // 2)
    if winners_ref is None:
        y = jnp.max(y.reshape(2, block_cols, features), axis=0)
        out_ref[image, row, columns, :] = jnp.max(y.reshape(block_cols // 2, 2, features),
                                                  axis=1)
        return
    # (windows, channels, 4): each window's elements in row-major order, as the package's
    # mask numbers them; argmax takes the first maximum.
    windows = jnp.transpose(y.reshape(2, block_cols // 2, 2, features), (1, 3, 0, 2)).reshape(
        block_cols // 2, features, 4)
    pooled = jnp.max(windows, axis=2)
    first = jnp.argmax(windows, axis=2).astype(jnp.uint8)
    out_ref[image, row, columns, :] = pooled
    winners_ref[image, row, columns, :] = jnp.where(
        pooled > 0, jnp.left_shift(jnp.uint8(1), first), jnp.uint8(0))


def _transposed_sums(x_ref, taps_ref, image, rows, cols, *, height, width, precision):
    """Σ over the nine taps of ``taps[t] · x[image, rows + dy − 1, cols + dx − 1, :]ᵀ``, zero
    outside the image: (output channels × pixels) in float32, one pixel per row of ``rows``
    and ``cols`` (both (pixels, 1)). As (channels × pixels) the 64 channels are the M of
    Hopper's wgmma (64 per warp group, exactly) and up to 256 pixels its N: m64n256k16, a
    quarter of m64n64k16's shared-memory operand reads per product. Each tap's pixels are
    loaded as a 2-D (pixels, channels) tile, so that Triton's pipelined copy lands where the
    product reads it (a 4-D tile reshaped after the load made every tap's 32 KB take a
    round trip through registers and back to shared memory, in the compiled PTX)."""
    channels = x_ref.shape[3]
    channel = jax.lax.broadcasted_iota(jnp.int32, (1, channels), 1)

    def tap(t, sums):
        dy = jax.lax.div(t, 3)
        dx = t - 3 * dy
        tile = _load_padded(x_ref, image, rows + dy - 1, cols + dx - 1, channel, height=height,
                            width=width)
        return sums + jax.lax.dot_general(
            taps_ref[t], tile, (((1,), (1,)), ((), ())),
            precision=precision, preferred_element_type=jnp.float32)

    return jax.lax.fori_loop(0, 9, tap,
                             jnp.zeros((taps_ref.shape[1], rows.shape[0]), jnp.float32))


def _body_transposed(x_ref, taps_ref, bias_ref, out_ref, winners_ref=None, *, height, width,
                     block_cols, precision):
    """``_body`` by ``_transposed_sums``, the pixels ordered (pooled column, window row,
    window column) so that each pool window is four neighbours in the sums."""
    i, j = pl.program_id(0), pl.program_id(1)
    pooled_rows, windows = height // 2, block_cols // 2
    image, row, left = i // pooled_rows, i % pooled_rows, j * block_cols
    pixel = jax.lax.broadcasted_iota(jnp.int32, (4 * windows, 1), 0)
    window = jax.lax.div(pixel, 4)
    within = pixel - 4 * window  # 2 · window row + window column
    window_row = jax.lax.div(within, 2)
    rows = 2 * row + window_row
    cols = left + 2 * window + within - 2 * window_row
    sums = _transposed_sums(x_ref, taps_ref, image, rows, cols, height=height, width=width,
                            precision=precision)
    y = jnp.maximum(sums + bias_ref[...][:, None], 0).astype(out_ref.dtype)
    y = y.reshape(taps_ref.shape[1], windows, 4)
    pooled = jnp.max(y, axis=2)
    columns = pl.ds(left // 2, windows)
    out_ref[image, row, columns, :] = pooled.T
    if winners_ref is not None:
        first = jnp.argmax(y, axis=2).astype(jnp.uint8)
        winners_ref[image, row, columns, :] = jnp.where(
            pooled > 0, jnp.left_shift(jnp.uint8(1), first), jnp.uint8(0)).T


def conv_transposed(x, kernel, *, block_cols=128, num_warps=4, num_stages=3, interpret=False):
    """``conv(x, kernel, 'SAME')`` in ``x``'s dtype (float32 sums) by ``_transposed_sums``,
    two rows × ``block_cols`` columns per program: conv1_2's input gradient (the spread
    gradient convolved with the kernel flipped, its channels swapped)."""
    b, h, w, _ = x.shape
    cout = kernel.shape[3]
    params = _compiler_params(num_warps, num_stages, interpret)
    body = partial(_body_conv_transposed, height=h, width=w, block_cols=block_cols,
                   precision=first_conv._precision(x.dtype))
    return pl.pallas_call(
        body, out_shape=jax.ShapeDtypeStruct((b, h, w, cout), x.dtype),
        grid=(b * h // 2, w // block_cols), compiler_params=params, interpret=interpret,
        name="conv_transposed",
    )(x, _transposed_taps(kernel, x.dtype))


def _body_conv_transposed(x_ref, taps_ref, out_ref, *, height, width, block_cols, precision):
    """One program of ``conv_transposed``: output rows 2r, 2r + 1 × ``block_cols`` columns."""
    i, j = pl.program_id(0), pl.program_id(1)
    image, row, left = i // (height // 2), i % (height // 2), j * block_cols
    pixel = jax.lax.broadcasted_iota(jnp.int32, (2 * block_cols, 1), 0)
    second_row = jax.lax.div(pixel, block_cols)
    rows = 2 * row + second_row
    cols = left + pixel - block_cols * second_row
    sums = _transposed_sums(x_ref, taps_ref, image, rows, cols, height=height, width=width,
                            precision=precision)
    out_ref[image, pl.ds(2 * row, 2), pl.ds(left, block_cols), :] = (
        sums.astype(out_ref.dtype).T.reshape(2, block_cols, taps_ref.shape[1]))


WGRAD_CHUNK = 32  # pixels per product (K) of the weight gradient, all in one row
WGRAD_MOST_PIXELS = 9600  # per program: 1024 programs at 32 × 480×640 (7.8 waves of 132)


def weight_gradient_fits(x_shape, channels_out: int) -> bool:
    """Whether ``weight_gradient`` takes these shapes: rows of whole chunks, channel counts
    Triton can block, at most 64 input channels (eight taps' sums in registers)."""
    cin = x_shape[3]
    return (x_shape[2] % WGRAD_CHUNK == 0 and first_conv.triton_block(cin)
            and first_conv.triton_block(channels_out) and cin <= 64)


def weight_gradient(x, g, *, num_warps=8, num_stages=3, interpret=False):
    """The gradient of ``sum(conv(x, W, 'SAME') * g)`` with respect to the 3×3 kernel W,
    (3, 3, cin, cout) in float32.

    Why: cuDNN computes conv1_2's with ``wgrad…tilesize64x64x64`` at 471 TFLOP/s (1.54 ms
    per training step in the v3 trace, 725 GFLOP), the 64-channel shape again (m64n64
    products). The gradient is dWᵀ[output channel, (tap, input channel)] = Σ over the pixels
    p of g[p, ·]ᵀ x[p + tap, ·]: 64 rows (wgmma's M) by 9 × 64 columns, over K = every pixel of
    the batch. A program takes a run of 32-pixel chunks of one row each; per chunk it loads
    the output gradient (32 × 64) and the input pixels the first eight taps see side by side
    (32 × 512, masked to zero outside the image: the 'SAME' padding) and the ninth's (32 × 64),
    two products (N = 512 and 64, each split over two warp groups: m64n256k16, m64n32k16),
    then writes its float32 partial sums; XLA adds the programs' partials (a split-K reduction: 1024
    programs × 147 KB at 32 × 480×640, ~6 % of the bytes the kernel reads). The ninth tap has
    its own product because 9 × 64 columns are no power of two; in a call of its own it would
    read both inputs again (+2.5 GB). 8 warps, 3 stages: 190 registers, none spilled (4 warps
    spilled 5 KB; 64-pixel chunks need 240 KB of shared memory at 3 stages).
    """
    b, h, w, cin = x.shape
    cout = g.shape[3]
    chunks = b * h * w // WGRAD_CHUNK
    per_program = max(d for d in range(1, WGRAD_MOST_PIXELS // WGRAD_CHUNK + 1)
                      if chunks % d == 0)
    params = _compiler_params(num_warps, num_stages, interpret)
    body = partial(_body_weight_gradient, height=h, width=w, per_program=per_program,
                   precision=first_conv._precision(x.dtype))
    programs = chunks // per_program
    eight, ninth = pl.pallas_call(
        body, out_shape=(jax.ShapeDtypeStruct((programs, cout, 8 * cin), jnp.float32),
                         jax.ShapeDtypeStruct((programs, cout, cin), jnp.float32)),
        grid=(programs,), compiler_params=params, interpret=interpret,
        name="conv_weight_grad",
    )(x, g)
    transposed = jnp.concatenate([jnp.sum(eight, axis=0), jnp.sum(ninth, axis=0)], axis=1)
    return transposed.reshape(cout, 9, cin).transpose(1, 2, 0).reshape(3, 3, cin, cout)


def _body_weight_gradient(x_ref, g_ref, eight_ref, ninth_ref, *, height, width, per_program,
                          precision):
    """One program: ``per_program`` chunks, all nine taps. The pixels the first eight taps see
    are loaded side by side as one 2-D (pixels, 8 × channels) tile (column j: tap j // cin,
    channel j % cin), so that Triton's pipelined copy lands where the product reads it."""
    i = pl.program_id(0)
    cin, cout = x_ref.shape[3], g_ref.shape[3]
    pixel = jax.lax.broadcasted_iota(jnp.int32, (WGRAD_CHUNK, 1), 0)
    column = jax.lax.broadcasted_iota(jnp.int32, (1, 8 * cin), 1)
    tap = jax.lax.div(column, cin)
    eight_channels = column - cin * tap
    eight_dy = jax.lax.div(tap, 3)
    eight_dx = tap - 3 * eight_dy
    ninth_channels = jax.lax.broadcasted_iota(jnp.int32, (1, cin), 1)

    def seen(image, row, left, dy, dx, channel):
        return _load_padded(x_ref, image, row + dy - 1, left + pixel + dx - 1, channel,
                            height=height, width=width)

    def product(gradient, pixels):
        return jax.lax.dot_general(gradient, pixels, (((0,), (0,)), ((), ())),
                                   precision=precision, preferred_element_type=jnp.float32)

    def step(k, sums):
        start = (i * per_program + k) * WGRAD_CHUNK
        image = jax.lax.div(start, height * width)
        within = start - image * (height * width)
        row = jax.lax.div(within, width)
        left = within - row * width
        gradient = g_ref[image, row, pl.ds(left, WGRAD_CHUNK), :]
        return (sums[0] + product(gradient, seen(image, row, left, eight_dy, eight_dx,
                                                 eight_channels)),
                sums[1] + product(gradient, seen(image, row, left, 2, 2, ninth_channels)))

    eight, ninth = jax.lax.fori_loop(0, per_program, step,
                                     (jnp.zeros((cout, 8 * cin), jnp.float32),
                                      jnp.zeros((cout, cin), jnp.float32)))
    eight_ref[i, :, :] = eight
    ninth_ref[i, :, :] = ninth


class VGG16(vgg.VGG16):
    """``vgg.VGG16`` with conv1_2 + ReLU + pool1 as one kernel where it fits; with ``m256`` in
    blocks of 128 columns and 8 warps, with ``num_stages`` 1 its loop not pipelined,
    ``transposed`` in blocks of 128 columns where the width allows."""

    m256: bool = False
    num_stages: int = 3
    transposed: bool = False
    dgrad: bool = False  # the input gradient by ``conv_transposed`` too
    wgrad: bool = False  # the weight gradient by ``weight_gradient`` too

    @nn.nowrap
    def layer(self, name, features, x):
        block_cols, warps = (128, 8) if self.m256 else (64, 4)
        if self.transposed and x.shape[2] % 128 == 0:  # N = 256 pixels (else 128)
            block_cols = 128
        if name == "conv1_2" and self.pooling == "standard" and fits(x.shape, features,
                                                                     block_cols):
            options = (("block_cols", block_cols), ("dgrad", self.dgrad),
                       ("num_stages", self.num_stages), ("num_warps", warps),
                       ("transposed", self.transposed), ("wgrad", self.wgrad))
            return ConvReLUPool(features, options, dtype=self.dtype, name=name)(x)
        return super().layer(name, features, x)


class ConvReLUPool(nn.Module):
    """``flax.linen.Conv(features, (3, 3))``'s parameters; ``trainable_conv_relu_pool``'s
    values with ``options`` ((name, value) pairs; ``interpret`` added when traced)."""

    features: int
    options: tuple
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        global rewritten
        rewritten += 1
        x, kernel, bias = first_conv.conv_parameters(self, x, self.features, self.dtype)
        return trainable_conv_relu_pool(
            x, kernel, bias, (*self.options, ("interpret", first_conv.interpreted())))


def vgg16_m256(**fields) -> VGG16:
    """``cand_conv12_pool_m256``'s backbone."""
    return VGG16(m256=True, **fields)


def vgg16_l1(**fields) -> VGG16:
    """``cand_conv12_pool_l1``'s backbone."""
    return VGG16(num_stages=1, **fields)


def vgg16_transposed(**fields) -> VGG16:
    """``cand_conv12t_pool``'s backbone."""
    return VGG16(transposed=True, **fields)


def vgg16_transposed_dgrad(**fields) -> VGG16:
    """``cand_conv12t_dgrad``'s backbone."""
    return VGG16(transposed=True, dgrad=True, **fields)


def vgg16_transposed_backward(**fields) -> VGG16:
    """``cand_conv12t_bwd``'s backbone: forward, input and weight gradients by Pallas."""
    return VGG16(transposed=True, dgrad=True, wgrad=True, **fields)


def vgg16_transposed_s2(**fields) -> VGG16:
    """``cand_conv12t_pool_s2``'s backbone: two pipeline stages, ~80 KB of shared memory
    instead of ~120, so that two programs fit on an SM."""
    return VGG16(transposed=True, num_stages=2, **fields)
