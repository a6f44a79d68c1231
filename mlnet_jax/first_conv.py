"""conv1_1, its bias and its ReLU as one Pallas (Triton) kernel, with its weight gradient as
another: the GPU path of VGG-16's first convolution.

Why: cuDNN runs conv1_1 (3 → 64 channels) with a slow small-K kernel (~21 TFLOP/s on an H200,
1.5 ms of a 14.5 ms prediction step at 32 × 480×640) and every formulation XLA takes measured
the same or worse (3 channels padded to 8, the patches as a product or a 1×1 convolution, the
columns in groups: benchmarks/NOTES.md). The forward kernel reads the image's three shifted
column copies (``column_taps``: channel dx·3 + c, padded to 16) and, per output row, makes
three K = 16 tensor-core products, adds the bias and applies the ReLU before its only write.
The backward kernel reads the incoming gradient and the output once, masks by the ReLU, and
sums the bias and weight gradients per block of rows. Measured on an H200 (2026-11-28, bf16,
32 × 480×640): prediction +6.4 %, training +2.8 to +3.1 %.

``mode="auto"`` (the default) takes the kernel only where it was measured: bfloat16 on a lone
Hopper GPU (NVIDIA compute capability 9.x). The kernel is not partitioned, so with several
devices (data parallelism) XLA keeps conv1_1. Pallas's Triton backend is deprecated from JAX
0.12 (it warns when lowering); where JAX no longer has it, ``auto`` keeps XLA's conv1_1.
Off a GPU the kernel runs in Pallas's interpreter (``mode="pallas"``, slow: for tests).
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

FirstConvMode = Literal["auto", "xla", "pallas"]
FIRST_CONV_MODES: tuple[str, ...] = ("auto", "xla", "pallas")
CHANNELS = 16  # the products' K: 9 of the 16 are the 3 column taps × 3 colours
NUM_WARPS, NUM_STAGES = 4, 1  # both kernels' Triton settings, as measured
# Whether the kernels read the image itself instead of XLA's column copies (``image_reader``):
# adopted once measured faster on a card (benchmarks' ``cand_conv1_direct``), not yet.
READS_THE_IMAGE = False


def kernel_applies(mode: str, shape: tuple[int, ...], dtype, features: int = 64) -> bool:
    """Whether conv1_1 of an input of ``shape`` (NHWC) computed in ``dtype`` with ``features``
    output channels takes the kernel. ``mode="pallas"`` on a shape it cannot take is an error,
    not a silent fallback."""
    if mode not in FIRST_CONV_MODES:
        raise ValueError(f"first_conv must be one of {', '.join(FIRST_CONV_MODES)}, got {mode!r}")
    if mode == "xla":
        return False
    reason = unfit_reason(shape, dtype, features)
    if mode == "pallas":
        if reason:
            raise ValueError(f"first_conv='pallas': {reason}")
        return True
    return not reason and auto_takes(dtype)


def auto_takes(dtype) -> bool:
    """Where 'auto' takes the package's Pallas kernels (this one and those adopted in
    ``second_conv``, ``bias_gradients`` and ``head_kernel``): bfloat16, where they were
    measured, on a lone Hopper GPU with Pallas's Triton backend."""
    return jnp.dtype(dtype) == jnp.bfloat16 and _lone_hopper_gpu() and _triton_available()


def unfit_reason(shape, dtype, features: int = 64) -> str:
    """Why the kernel cannot take conv1_1 of this input, or "" where it can."""
    if len(shape) != 4 or shape[3] != 3:
        return f"the kernel takes 3-channel NHWC images, got shape {tuple(shape)}"
    if _block_width(shape[2]) is None:
        return f"the kernel takes widths divisible by 16, got {shape[2]}"
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float32):
        return f"the kernel computes in bfloat16 or float32, got {jnp.dtype(dtype).name}"
    if not triton_block(features):
        return f"the kernel takes 16, 32, 64, ... output channels, got {features}"
    return ""


def triton_block(n: int) -> bool:
    """Whether a tensor dimension of ``n`` suits Triton's blocks and products: a power of two,
    16 or more."""
    return n >= 16 and not n & (n - 1)


def _lone_hopper_gpu() -> bool:
    """One device, a Hopper GPU, and computations placed on it (not on the CPU by
    ``jax.default_device``, where the Triton call cannot run)."""
    if jax.device_count() != 1 or jax.default_backend() != "gpu":
        return False
    placed = jax.config.jax_default_device
    if placed is not None and getattr(placed, "platform", placed) != "gpu":
        return False
    capability = str(getattr(jax.devices()[0], "compute_capability", ""))
    return capability.split(".")[0] == "9"


def _triton_available() -> bool:
    try:
        from jax.experimental.pallas import triton
    except ImportError:
        return False
    return hasattr(triton, "CompilerParams")  # what compiler_params needs


def interpreted() -> bool:
    """Whether the kernels run in Pallas's interpreter: everywhere but a GPU."""
    return jax.default_backend() != "gpu"


def conv_bias_relu(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """``relu(conv(x, kernel, 'SAME') + bias)`` for a 3×3 kernel over a 3-channel NHWC image
    whose width is divisible by 16, in ``x``'s dtype (float32 sums, one rounding)."""
    return _conv_bias_relu(x, kernel, bias, interpreted())


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _conv_bias_relu(x, kernel, bias, interpret):
    return _forward_kernel(x, kernel, bias, interpret)


def _conv_bias_relu_forward(x, kernel, bias, interpret):
    y = _forward_kernel(x, kernel, bias, interpret)
    return y, (x, kernel, bias, y)


def _conv_bias_relu_backward(interpret, residuals, g):
    x, kernel, bias, y = residuals
    dkernel, dbias = _weight_grad_kernel(x, y, g, interpret)
    # The image's gradient (XLA drops it where nothing uses it, as in training), in x's dtype
    # whatever the kernel's (lax's convolution takes one dtype).
    masked = jnp.where(y > 0, g, jnp.zeros((), g.dtype))
    _, image_vjp = jax.vjp(lambda image: reference_conv(image, kernel.astype(x.dtype)), x)
    (dx,) = image_vjp(masked)
    return dx, dkernel.astype(kernel.dtype), dbias.astype(bias.dtype)


_conv_bias_relu.defvjp(_conv_bias_relu_forward, _conv_bias_relu_backward)


def reference_conv(x, kernel):
    """flax.linen.Conv's sums for a 3×3 'SAME' NHWC convolution such as conv1_1."""
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def column_taps(x: jax.Array) -> jax.Array:
    """(B, H + 2, W, 16): at (b, r, x), the padded image's x + dx columns of row r, channel
    dx·3 + c (zeros past 9). One fused pass in XLA over the small 3-channel image."""
    b, h, w, _ = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    taps = [padded[:, :, dx:dx + w, :] for dx in range(3)]
    return jnp.concatenate([*taps, jnp.zeros((b, h + 2, w, CHANNELS - 9), x.dtype)], axis=-1)


def row_taps(kernel: jax.Array) -> jax.Array:
    """(3, 16, O): for each kernel row dy, the weights of the channels ``column_taps`` makes."""
    return jnp.pad(kernel.reshape(3, 9, kernel.shape[3]), ((0, 0), (0, CHANNELS - 9), (0, 0)))


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def compiler_params(num_warps: int, num_stages: int, interpret: bool):
    """Triton's settings for a Pallas call (the package's kernels'), none for Pallas's
    interpreter."""
    if interpret:
        return None
    from jax.experimental.pallas import triton as pallas_triton
    return pallas_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def load_padded(x_ref, image, rows, cols, channel, *, height, width):
    """``x[image, rows, cols, channel]`` (indices broadcast together), zero outside the image
    (a 3×3 convolution's 'SAME' padding without a padded copy): indices clipped to it, the
    load masked."""
    from jax.experimental.pallas import triton as pallas_triton
    shape = jnp.broadcast_shapes(jnp.shape(rows), jnp.shape(cols), jnp.shape(channel))
    inside = jnp.broadcast_to((rows >= 0) & (rows < height) & (cols >= 0) & (cols < width),
                              shape)
    return pallas_triton.load(
        x_ref.at[image, jnp.clip(rows, 0, height - 1), jnp.clip(cols, 0, width - 1), channel],
        mask=inside, other=0)


def _reader(x):
    """(what both kernels read for the image ``x``; ``load(ref, image, row, left, block_w)``,
    how a program takes from it the (block_w, 16) tile of row ``row`` of the padded image):
    ``column_taps``, or with ``READS_THE_IMAGE`` the image itself (``image_reader``)."""
    if READS_THE_IMAGE:
        return image_reader(x)
    return column_taps(x), _column_row


def _column_row(columns_ref, image, row, left, block_w):
    return columns_ref[image, row, pl.ds(left, block_w), :]


def image_reader(x):
    """``_reader`` for the image itself: its rows flattened to (B, H, 3W), each program's
    (block_w, 16) tile a masked load of overlapping windows of one row.

    Why: ``column_taps`` is five times the bf16 image (316 MB at 32 × 480×640), written by
    XLA, read 1.5 times over by the forward kernel (each program re-reads two rows), and kept
    live in training until the weight-gradient kernel reads it again (+0.24 GiB of executable
    memory). For output column x, channels dx·3 + c of the padded row are the 9 values of the
    flat (3W) row starting at (x − 1)·3: the same products and sums, ~0.7 GB less traffic per
    prediction step. Predicted (H200, bf16 32 × 480×640): +0.8 to +1.5 % prediction, +0.3 to
    +0.8 % training; the risk is Triton making the overlapping masked loads slower than the
    block loads they replace (benchmarks/NOTES.md, ``cand_conv1_direct``)."""
    b, h, w, _ = x.shape
    return x.reshape(b, h, w * 3), partial(_image_window, height=h, width=w)


def _image_window(flat_ref, image, row, left, block_w, *, height, width):
    """(block_w, 16) in the image's dtype: ``column_taps``' values at row ``row`` of the padded
    image (0 and ``height`` + 1 are the zero padding) for columns ``left`` … ``left + block_w``."""
    from jax.experimental.pallas import triton as pallas_triton
    row = row - 1  # the image's row
    column = jax.lax.broadcasted_iota(jnp.int32, (block_w, CHANNELS), 0)
    channel = jax.lax.broadcasted_iota(jnp.int32, (block_w, CHANNELS), 1)
    offset = (left + column) * 3 + channel - 3
    valid = ((channel < 9) & (offset >= 0) & (offset < width * 3)
             & (row >= 0) & (row < height))
    return pallas_triton.load(
        flat_ref.at[image, jnp.clip(row, 0, height - 1), jnp.where(valid, offset, 0)],
        mask=valid, other=0)


def _forward_kernel(x, kernel, bias, interpret):
    b, h, w, _ = x.shape
    out = kernel.shape[3]
    block_w, rows = _block_width(w), _divisor(h, (4, 2, 1))
    source, load = _reader(x)
    body = partial(_forward_body, height=h, rows=rows, block_w=block_w, load=load,
                   precision=_precision(x.dtype))
    return pl.pallas_call(
        body, out_shape=jax.ShapeDtypeStruct((b, h, w, out), x.dtype),
        grid=(b * h // rows, w // block_w),
        compiler_params=compiler_params(NUM_WARPS, NUM_STAGES, interpret), interpret=interpret,
        name="conv1_1_bias_relu",
    )(source, row_taps(kernel).astype(x.dtype), bias.astype(jnp.float32))


def _forward_body(columns_ref, taps_ref, bias_ref, out_ref, *, height, rows, block_w, load,
                  precision):
    """One program: ``rows`` output rows × ``block_w`` columns, from ``rows`` + 2 input rows."""
    i, j = pl.program_id(0), pl.program_id(1)
    per_image = height // rows
    image, top, left = i // per_image, (i % per_image) * rows, j * block_w
    inputs = [load(columns_ref, image, top + r, left, block_w) for r in range(rows + 2)]
    taps = [taps_ref[dy] for dy in range(3)]
    bias = bias_ref[...][None, :]
    for r in range(rows):
        sums = bias
        for dy in range(3):
            sums = sums + jax.lax.dot(inputs[r + dy], taps[dy], precision=precision,
                                      preferred_element_type=jnp.float32)
        out_ref[image, top + r, pl.ds(left, block_w), :] = jnp.maximum(sums, 0).astype(
            out_ref.dtype)


def _weight_grad_kernel(x, y, g, interpret):
    """(kernel's gradient (3, 3, 3, O), bias's gradient (O,)), both float32, from the image,
    the forward's output ``y`` (the ReLU's mask) and its incoming gradient ``g``."""
    b, h, w, _ = x.shape
    out = y.shape[3]
    block_w, rows = _block_width(w), _divisor(h, (32, 16, 8, 4, 2, 1))
    grid = (b, h // rows, w // block_w)
    source, load = _reader(x)
    body = partial(_weight_grad_body, rows=rows, block_w=block_w, load=load,
                   precision=_precision(x.dtype))
    taps, bias = pl.pallas_call(
        body, out_shape=(jax.ShapeDtypeStruct((*grid, 3, CHANNELS, out), jnp.float32),
                         jax.ShapeDtypeStruct((*grid, out), jnp.float32)),
        grid=grid, compiler_params=compiler_params(NUM_WARPS, NUM_STAGES, interpret),
        interpret=interpret, name="conv1_1_weight_grad",
    )(source, y, g)
    taps = jnp.sum(taps, axis=(0, 1, 2))[:, :9]  # (3, 9, O): rows dx·3 + c, as row_taps
    return taps.reshape(3, 3, 3, out), jnp.sum(bias, axis=(0, 1, 2))


def _weight_grad_body(columns_ref, y_ref, g_ref, taps_ref, bias_ref, *, rows, block_w, load,
                      precision):
    """One program: the partial sums of ``rows`` rows × ``block_w`` columns of one image."""
    image, chunk, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    top, left = chunk * rows, j * block_w
    out = y_ref.shape[3]

    def row(r, sums):
        y = y_ref[image, top + r, pl.ds(left, block_w), :]
        g = g_ref[image, top + r, pl.ds(left, block_w), :]
        masked = jnp.where(y > 0, g, jnp.zeros((), g.dtype))
        taps = [sums[dy] + jax.lax.dot_general(
            load(columns_ref, image, top + r + dy, left, block_w), masked,
            (((0,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)
            for dy in range(3)]
        return (*taps, sums[3] + jnp.sum(masked.astype(jnp.float32), axis=0))

    zeros = jnp.zeros((CHANNELS, out), jnp.float32)
    sums = jax.lax.fori_loop(0, rows, row, (zeros, zeros, zeros, jnp.zeros((out,), jnp.float32)))
    for dy in range(3):
        taps_ref[image, chunk, j, dy] = sums[dy]
    bias_ref[image, chunk, j] = sums[3]


def _block_width(width: int) -> int | None:
    """Columns per program: a power of two (Triton's blocks) from 16 (the products' M) to 128
    that divides the width."""
    return next((b for b in (128, 64, 32, 16) if width % b == 0), None)


def _divisor(n: int, choices: tuple[int, ...]) -> int:
    return next(c for c in choices if n % c == 0)


class ConvBiasReLU(nn.Module):
    """``relu(flax.linen.Conv(features, (3, 3))(x))`` for conv1_1 with the same parameters
    (``kernel`` with Conv's default initialiser, ``bias`` zeros), by ``conv_bias_relu``."""

    features: int
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return conv_bias_relu(*conv_parameters(self, x, self.features, self.dtype,
                                               self.param_dtype))


def conv_parameters(module: nn.Module, x: jax.Array, features: int, dtype,
                    param_dtype=jnp.float32) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(x, kernel, bias) in ``dtype``: ``flax.linen.Conv(features, (3, 3))``'s parameters
    (names, shapes, initialisers) declared on ``module``, for a module that computes the
    convolution another way and must load the same checkpoints."""
    kernel = module.param("kernel", nn.linear.default_kernel_init,
                          (3, 3, x.shape[-1], features), param_dtype)
    bias = module.param("bias", nn.initializers.zeros_init(), (features,), param_dtype)
    return nn.dtypes.promote_dtype(x, kernel, bias, dtype=dtype)
