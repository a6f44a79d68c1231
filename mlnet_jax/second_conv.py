"""conv1_2, its bias, its ReLU and pool1 as one Pallas (Triton) kernel, and conv1_2's input and
weight gradients as two more: a GPU path of VGG-16's second convolution, taken only once
measured faster (``ADOPTED``).

Why: the 64-channel layers are the only ones cuDNN runs with tiles 64 channels wide (the
committed H200 traces: ``fprop…256x64x32``, ``dgrad…256x64x32``, ``wgrad…64x64x64``), so every
Hopper tensor-core product is an m64n64k16 ``wgmma``, whose operand reads and tile loads exceed
what an SM's shared memory gives: at most ~61 % of peak. conv1_2 runs so at 470–540 TFLOP/s
(1.35 ms of a 14.5 ms prediction step at 32 × 480×640, 4.5 ms of a training step over its three
directions), and pool1 then reads its 1.26 GB output again. These kernels compute each product
the other way round, (64 output channels × up to 256 pixels): the channels are wgmma's M (64
per warp group), the pixels its N, m64n256k16, ~82 % of peak by the same count
(benchmarks/NOTES.md, "conv1_2's products transposed"). The forward kernel adds the bias,
applies the ReLU and takes the 2×2 maxima before its only write (a quarter of cuDNN's), and in
training writes the pool's winner mask instead of conv1_2's output, which only the pool read.

``ADOPTED`` names the parts that ``first_conv="auto"`` and ``"pallas"`` take: ``forward``
(the forward kernel; the two gradients need it), ``input_gradient``, ``weight_gradient``. It is
empty until a part is measured faster on a card beside the code (``benchmarks/throughput.py``'s
``cand_conv12t_*`` variants set it): each part compiles for the H200 and H100 without a
register spilled, and matches XLA's numbers in Pallas's interpreter, but none has run on a GPU
yet. Where it is taken: 'auto' on a lone Hopper GPU in bfloat16 (as ``mlnet_jax.first_conv``),
'pallas' anywhere (off a GPU in the interpreter: slow, for tests); ``standard`` pooling, even
heights, widths divisible by 64.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mlnet_jax import first_conv, vgg

PARTS: tuple[str, ...] = ("forward", "input_gradient", "weight_gradient")
ADOPTED: frozenset[str] = frozenset()  # the PARTS measured faster (benchmarks/NOTES.md)
FORWARD_STAGES = 3  # pipeline stages of the forward and input-gradient loops (~120 KB)
WGRAD_CHUNK = 32  # pixels per product (K) of the weight gradient, all in one row
WGRAD_MOST_PIXELS = 9600  # per program: 1024 programs at 32 × 480×640 (7.8 waves of 132)


def kernel_applies(mode: str, shape: tuple[int, ...], dtype, features: int,
                   pooling: str) -> bool:
    """Whether conv1_2 of an input of ``shape`` (NHWC), with ``features`` outputs and the pool
    after it, takes the forward kernel under ``mode`` (``first_conv``'s 'auto', 'xla' or
    'pallas'). Unlike conv1_1's, an unfit shape under 'pallas' keeps XLA's convolution."""
    if mode == "xla" or "forward" not in ADOPTED or not fits(shape, features, pooling):
        return False
    return mode == "pallas" or _auto_takes(dtype)


_auto_takes = first_conv.auto_takes  # its own name: tests fake a Hopper GPU per module


def fits(shape, features: int, pooling: str) -> bool:
    """Even rows, whole column blocks, channel counts Triton can block up to VGG-16's 64 (what
    the kernels were compiled for; a wider model keeps XLA's), ``standard`` pooling (windows
    from even rows and columns), one device (the kernels are not partitioned)."""
    if len(shape) != 4:
        return False
    _, rows, cols, channels = shape
    return (pooling == "standard" and rows % 2 == 0 and cols % 64 == 0
            and jax.device_count() == 1 and first_conv.triton_block(channels)
            and first_conv.triton_block(features) and max(channels, features) <= 64)


def _block_cols(width: int) -> int:
    """Columns per program: 2 rows × 128 columns = wgmma's largest N (256 pixels) where the
    width allows, else 64."""
    return 128 if width % 128 == 0 else 64


class ConvBiasReLUPool(nn.Module):
    """``relu_max_pool_2x2(flax.linen.Conv(features, (3, 3))(x), 2, 'standard')`` with the same
    parameters, by ``conv_bias_relu_pool``."""

    features: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return conv_bias_relu_pool(*first_conv.conv_parameters(self, x, self.features,
                                                               self.dtype))


def conv_bias_relu_pool(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """``max_pool_values(relu(conv(x, kernel, 'SAME') + bias), 2, 'standard')`` in ``x``'s dtype
    (float32 sums, one rounding), its gradient the package's (the first maximum of each window,
    ``vgg.relu_max_pool_2x2``) with the ``ADOPTED`` gradient kernels."""
    options = (("input_gradient", "input_gradient" in ADOPTED),
               ("interpret", first_conv.interpreted()),
               ("stages", FORWARD_STAGES),
               ("weight_gradient", "weight_gradient" in ADOPTED))
    return _conv_bias_relu_pool(x, kernel, bias, options)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _conv_bias_relu_pool(x, kernel, bias, options):
    return conv_relu_pool(x, kernel, bias, **_forward_options(options))


def _forward_options(options) -> dict:
    """``conv_relu_pool``'s keywords from ``options``, (name, value) pairs (hashable: a
    ``custom_vjp``'s static argument)."""
    options = dict(options)
    return {"num_stages": options["stages"], "interpret": options["interpret"]}


def _forward(x, kernel, bias, options):
    y, winners = conv_relu_pool(x, kernel, bias, winners=True, **_forward_options(options))
    return y, (x, kernel, bias, winners)


def _backward(options, residuals, g):
    x, kernel, bias, winners = residuals
    options = dict(options)
    (spread,) = vgg._relu_max_pool_backward(2, "standard", "first", x.shape[1:3], winners, g)
    if options["input_gradient"]:
        flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
        dx = conv_transposed(spread, flipped, num_stages=options["stages"],
                             interpret=options["interpret"])
    else:
        (dx,) = jax.vjp(lambda x: first_conv.reference_conv(x, kernel), x)[1](spread)
    if options["weight_gradient"]:
        dkernel = weight_gradient(x, spread, interpret=options["interpret"])
    else:
        (dkernel,) = jax.vjp(lambda k: first_conv.reference_conv(x, k), kernel)[1](spread)
    dbias = jnp.sum(spread, axis=(0, 1, 2), dtype=jnp.float32)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype), dbias.astype(bias.dtype)


_conv_bias_relu_pool.defvjp(_forward, _backward)


def conv_relu_pool(x, kernel, bias, *, num_warps=4, num_stages=3, interpret=False,
                   winners=False):
    """The forward kernel: ``max_pool_values(relu(conv(x, kernel, 'SAME') + bias), 2,
    'standard')`` in ``x``'s dtype (float32 sums); with ``winners`` also the pool's winner mask
    as ``vgg.relu_max_pool_2x2`` keeps it (bit 2·row + column of each window's first maximum,
    none where the maximum is 0)."""
    b, h, w, _ = x.shape
    cout = kernel.shape[3]
    block_cols = _block_cols(w)
    body = partial(_body_pool, height=h, width=w, block_cols=block_cols,
                   precision=first_conv._precision(x.dtype))
    pooled = jax.ShapeDtypeStruct((b, h // 2, w // 2, cout), x.dtype)
    out_shape = (pooled, jax.ShapeDtypeStruct(pooled.shape, jnp.uint8)) if winners else pooled
    return pl.pallas_call(
        body, out_shape=out_shape, grid=(b * h // 2, w // block_cols),
        compiler_params=first_conv.compiler_params(num_warps, num_stages, interpret),
        interpret=interpret, name="conv_bias_relu_pool_t",
    )(x, _transposed_taps(kernel, x.dtype), bias.astype(jnp.float32))


def _transposed_taps(kernel, dtype):
    """A 3×3 HWIO kernel as (tap, output, input channels): the transposed products' A."""
    cin, cout = kernel.shape[2:]
    return jnp.transpose(kernel.reshape(9, cin, cout), (0, 2, 1)).astype(dtype)


def _transposed_sums(x_ref, taps_ref, image, rows, cols, *, height, width, precision):
    """Σ over the nine taps of ``taps[t] · x[image, rows + dy − 1, cols + dx − 1, :]ᵀ``, zero
    outside the image: (output channels × pixels) in float32, one pixel per row of ``rows``
    and ``cols`` (both (pixels, 1)). Each tap's pixels are loaded as a 2-D (pixels, channels)
    tile, so that Triton's pipelined copy lands where the product reads it (a 4-D tile
    reshaped after the load made every tap's 32 KB take a round trip through registers and
    back to shared memory, in the compiled PTX)."""
    channels = x_ref.shape[3]
    channel = jax.lax.broadcasted_iota(jnp.int32, (1, channels), 1)

    def tap(t, sums):
        dy = jax.lax.div(t, 3)  # (lax.div: Triton lowers jnp.remainder badly)
        dx = t - 3 * dy
        tile = first_conv.load_padded(x_ref, image, rows + dy - 1, cols + dx - 1, channel, height=height,
                           width=width)
        return sums + jax.lax.dot_general(
            taps_ref[t], tile, (((1,), (1,)), ((), ())),
            precision=precision, preferred_element_type=jnp.float32)

    return jax.lax.fori_loop(0, 9, tap,
                             jnp.zeros((taps_ref.shape[1], rows.shape[0]), jnp.float32))


def _body_pool(x_ref, taps_ref, bias_ref, out_ref, winners_ref=None, *, height, width,
               block_cols, precision):
    """One program: output rows 2r, 2r + 1 × ``block_cols`` columns → one pooled row, the
    pixels ordered (pooled column, window row, window column) so that each pool window is four
    neighbours in the sums."""
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
    if winners_ref is not None:  # argmax takes the first maximum, as the package's mask
        first = jnp.argmax(y, axis=2).astype(jnp.uint8)
        winners_ref[image, row, columns, :] = jnp.where(
            pooled > 0, jnp.left_shift(jnp.uint8(1), first), jnp.uint8(0)).T


def conv_transposed(x, kernel, *, num_warps=4, num_stages=3, interpret=False):
    """``conv(x, kernel, 'SAME')`` in ``x``'s dtype (float32 sums) by ``_transposed_sums``,
    two rows × 128 (or 64) columns per program: conv1_2's input gradient (the spread gradient
    convolved with the kernel flipped, its channels swapped)."""
    b, h, w, _ = x.shape
    cout = kernel.shape[3]
    block_cols = _block_cols(w)
    body = partial(_body_conv_transposed, height=h, width=w, block_cols=block_cols,
                   precision=first_conv._precision(x.dtype))
    return pl.pallas_call(
        body, out_shape=jax.ShapeDtypeStruct((b, h, w, cout), x.dtype),
        grid=(b * h // 2, w // block_cols),
        compiler_params=first_conv.compiler_params(num_warps, num_stages, interpret),
        interpret=interpret, name="conv_transposed",
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


def weight_gradient(x, g, *, num_warps=8, num_stages=3, interpret=False):
    """The gradient of ``sum(conv(x, W, 'SAME') * g)`` with respect to the 3×3 kernel W,
    (3, 3, cin, cout) in float32, for the shapes ``fits`` admits (rows of whole 32-pixel
    chunks, at most 64 input channels: eight taps' sums in registers).

    The gradient is dWᵀ[output channel, (tap, input channel)] = Σ over the pixels p of
    g[p, ·]ᵀ x[p + tap, ·]: 64 rows (wgmma's M) by 9 × 64 columns, over K = every pixel of the
    batch. A program takes a run of 32-pixel chunks of one row each; per chunk it loads the
    output gradient (32 × 64) and the input pixels the first eight taps see side by side
    (32 × 512, masked to zero outside the image: the 'SAME' padding) and the ninth's (32 × 64),
    two products (N = 512 and 64, each split over two warp groups: m64n256k16, m64n32k16), then
    writes its float32 partial sums; XLA adds the programs' partials (a split-K reduction: 1024
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
    body = partial(_body_weight_gradient, height=h, width=w, per_program=per_program,
                   precision=first_conv._precision(x.dtype))
    programs = chunks // per_program
    eight, ninth = pl.pallas_call(
        body, out_shape=(jax.ShapeDtypeStruct((programs, cout, 8 * cin), jnp.float32),
                         jax.ShapeDtypeStruct((programs, cout, cin), jnp.float32)),
        grid=(programs,), compiler_params=first_conv.compiler_params(num_warps, num_stages, interpret),
        interpret=interpret, name="conv_weight_grad",
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
        return first_conv.load_padded(x_ref, image, row + dy - 1, left + pixel + dx - 1, channel,
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
