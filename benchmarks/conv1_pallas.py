"""conv1_1 + bias + ReLU as one Pallas (Triton) kernel, for ``throughput.py --variants
cand_conv1_pallas`` (benchmarks/NOTES.md, "Next levers").

Why: cuDNN runs conv1_1 (3 → 64 channels at 480×640) with an sm80 kernel at ~21 TFLOP/s,
1.5 ms of a 14.3 ms prediction step on the H200, and every formulation XLA would take (3
channels padded to 8, the 3×3 patches as a product or a 1×1 convolution) measured the same or
worse: XLA either keeps a slow small-K cuDNN call or writes the patches and then adds bias and
ReLU in a separate pass over the 1.26 GB output. This kernel reads the image's three shifted
column copies (``column_taps``: channel dx·3 + c, padded to 16, 0.3 GB) and, per output row,
makes three K = 16 tensor-core products, adds the bias and applies the ReLU before its only
write. What it should cost is the output's write: ~0.3–0.5 ms.

Training: with ``backward="xla"`` the backward pass stays in XLA (the ReLU's mask from the
kernel's output, then the convolution's gradients by autodiff of ``lax.conv_general_dilated``:
cuDNN's weight gradient; the image's gradient is never used, so XLA drops it). With
``backward="pallas"`` a second kernel reads the incoming gradient and the output once, masks,
and sums the bias gradient and the weight gradient (three K = pixels products against the
same column copies) per block of rows; XLA adds up the blocks' partial sums. That replaces
XLA's mask + bias-gradient pass (writes the masked gradient, 3.8 GB moved) and cuDNN's weight
gradient at ~44 TFLOP/s (0.77 ms).

Off a GPU the kernel runs in Pallas's interpreter, so the tests on a CPU check its sums; they
also lower it for CUDA, which checks the Triton program without compiling it for a card.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import linear as flax_linear
from jax.experimental import pallas as pl

CHANNELS = 16  # the products' K: 9 of the 16 are the 3 column taps × 3 colours
rewritten = 0  # conv1_1 calls this module took (throughput.patched fails a candidate at 0)
_FUSED: list = []  # outputs that already had their ReLU (``relu_unless_fused``)


def conv_bias_relu(x: jax.Array, kernel: jax.Array, bias: jax.Array, *,
                   backward: str = "xla", interpret: bool | None = None) -> jax.Array:
    """``relu(conv(x, kernel, 'SAME') + bias)`` for a 3×3 kernel over a 3-channel NHWC image,
    in ``x``'s dtype (float32 sums, one rounding). ``backward``: "xla" or "pallas" (module
    docstring). ``interpret``: None runs the kernels where there is a GPU and interprets them
    elsewhere."""
    if backward not in ("xla", "pallas"):
        raise ValueError(f"backward must be 'xla' or 'pallas', got {backward!r}")
    if interpret is None:
        interpret = jax.devices()[0].platform != "gpu"
    return _conv_bias_relu(x, kernel, bias, backward, interpret)


def fits(x: jax.Array, kernel: jax.Array) -> bool:
    """What the kernel handles: conv1_1's shapes with widths it can tile."""
    return (x.ndim == 4 and x.shape[3] == 3 and kernel.shape[:3] == (3, 3, 3)
            and _block_width(x.shape[2]) is not None and x.dtype in (jnp.bfloat16, jnp.float32))


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _conv_bias_relu(x, kernel, bias, backward, interpret):
    return _forward_kernel(x, kernel, bias, interpret)


def _conv_bias_relu_forward(x, kernel, bias, backward, interpret):
    y = _forward_kernel(x, kernel, bias, interpret)
    return y, (x, kernel, y)


def _conv_bias_relu_backward(backward, interpret, residuals, g):
    x, kernel, y = residuals
    masked = jnp.where(y > 0, g, jnp.zeros((), g.dtype))
    _, conv_vjp = jax.vjp(_reference_conv, x, kernel)
    dx, dkernel = conv_vjp(masked)  # with backward="pallas" only dx is kept, and never used
    if backward == "pallas":
        dkernel, dbias = _weight_grad_kernel(x, y, g, interpret)
    else:
        dbias = jnp.sum(masked, axis=(0, 1, 2), dtype=jnp.float32)
    return dx, dkernel.astype(kernel.dtype), dbias.astype(kernel.dtype)


_conv_bias_relu.defvjp(_conv_bias_relu_forward, _conv_bias_relu_backward)


def _reference_conv(x, kernel):
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


def _forward_kernel(x, kernel, bias, interpret):
    b, h, w, _ = x.shape
    out = kernel.shape[3]
    block_w, rows = _block_width(w), _divisor(h, (4, 2, 1))
    body = partial(_kernel, height=h, rows=rows, block_w=block_w,
                   precision=(jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None))
    return pl.pallas_call(
        body, out_shape=jax.ShapeDtypeStruct((b, h, w, out), x.dtype),
        grid=(b * h // rows, w // block_w),
        compiler_params=_triton_params(), interpret=interpret, name="conv1_1_bias_relu",
    )(column_taps(x), row_taps(kernel).astype(x.dtype), bias.astype(jnp.float32))


def _triton_params():
    from jax.experimental.pallas import triton as pallas_triton
    return pallas_triton.CompilerParams(num_warps=4, num_stages=1)


def _kernel(columns_ref, taps_ref, bias_ref, out_ref, *, height, rows, block_w, precision):
    """One program: ``rows`` output rows × ``block_w`` columns, from ``rows`` + 2 input rows."""
    i, j = pl.program_id(0), pl.program_id(1)
    per_image = height // rows
    image, top, left = i // per_image, (i % per_image) * rows, j * block_w
    inputs = [columns_ref[image, top + r, pl.ds(left, block_w), :] for r in range(rows + 2)]
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
    body = partial(_weight_grad_body, rows=rows, block_w=block_w,
                   precision=(jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None))
    taps, bias = pl.pallas_call(
        body, out_shape=(jax.ShapeDtypeStruct((*grid, 3, CHANNELS, out), jnp.float32),
                         jax.ShapeDtypeStruct((*grid, out), jnp.float32)),
        grid=grid, compiler_params=_triton_params(), interpret=interpret,
        name="conv1_1_weight_grad",
    )(column_taps(x), y, g)
    taps = jnp.sum(taps, axis=(0, 1, 2))[:, :9]  # (3, 9, O): rows dx·3 + c, as row_taps
    return taps.reshape(3, 3, 3, out), jnp.sum(bias, axis=(0, 1, 2))


def _weight_grad_body(columns_ref, y_ref, g_ref, taps_ref, bias_ref, *, rows, block_w,
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
            columns_ref[image, top + r + dy, pl.ds(left, block_w), :], masked,
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


class FirstConvBiasReLU(nn.Module):
    """``flax.linen.Conv`` for conv1_1 (the same parameters) that returns the ReLU's output
    from ``conv_bias_relu``; shapes the kernel does not take fall back to the plain sums."""

    features: int
    kernel_size: tuple
    backward: str = "xla"
    padding: str = "SAME"
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        global rewritten
        kernel = self.param("kernel", flax_linear.default_kernel_init,
                            (*self.kernel_size, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,),
                          self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if self.padding != "SAME" or not fits(x, kernel):
            return _reference_conv(x, kernel) + bias
        rewritten += 1
        y = conv_bias_relu(x, kernel, bias, backward=self.backward)
        _FUSED.append(y)
        return y


def conv(features, kernel_size, *, name=None, backward="xla", **options):
    """Stand-in for ``flax.linen.Conv``: conv1_1 becomes ``FirstConvBiasReLU``."""
    if name == "conv1_1":
        return FirstConvBiasReLU(features, tuple(kernel_size), backward, name=name, **options)
    return flax_linear.Conv(features, kernel_size, name=name, **options)


def conv_with_pallas_backward(features, kernel_size, **options):
    """``conv`` whose conv1_1 also takes its gradients from a Pallas kernel."""
    return conv(features, kernel_size, backward="pallas", **options)


def relu_unless_fused(x):
    """Stand-in for ``mlnet_jax.vgg.relu``: the identity on ``FirstConvBiasReLU``'s output."""
    from mlnet_jax.relu import relu
    for i, y in enumerate(_FUSED):
        if x is y:
            del _FUSED[i]
            return x
    return relu(x)
