"""Levers not yet adopted, ready for ``throughput.py --variants cand_*``.

They live here, not in the package, until a measurement says they help (benchmarks/NOTES.md,
"Next levers"). The ones that did are in the package now (``mlnet_jax/relu.py``, the pooling
gradient in ``mlnet_jax/vgg.py``); the ones that lost are recorded in NOTES and deleted.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp


def conv_with_padded_colour_channels(conv, channels: int = 8):
    """``conv`` (``lax.conv_general_dilated``'s signature) with a 3-channel input, the image
    into conv1_1, zero-padded to ``channels`` channels, and its kernel alike: the same sums
    plus zero products. cuDNN's fast tensor-core kernels want channel counts divisible by 8;
    XLA hands conv1_1 to cuDNN with 3 (in the H200 HLO: bf16[32,480,640,3] and a 157 MB
    workspace). Which is faster is a measurement.
    """
    def padded(a: dict):
        lhs, rhs = a["lhs"], a["rhs"]
        dims = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, a["dimension_numbers"])
        lhs_axis, rhs_axis = dims.lhs_spec[1], dims.rhs_spec[1]
        if lhs.shape[lhs_axis] != 3 or rhs.shape[rhs_axis] != 3 or a["feature_group_count"] != 1:
            return None
        return conv(**{**a, "lhs": _pad_axis(lhs, lhs_axis, channels - 3),
                       "rhs": _pad_axis(rhs, rhs_axis, channels - 3)})

    return _intercept(conv, padded)


def conv_as_patch_matmul(conv):
    """``conv`` (``lax.conv_general_dilated``'s signature) with the 3-channel convolution, conv1_1,
    computed as one matrix product: the 3×3 neighbourhoods of the image stacked on channels
    (B, H, W, 27) times the kernel reshaped to (27, 64). Every other call goes to ``conv``.

    The H200 profile (2026-11-26, levers run) has cuDNN run conv1_1 with an sm80 kernel at
    20 TFLOP/s: 1.5–1.7 ms per 32×480×640 forward (11 % of prediction) and 0.77 ms for its
    weight gradient, for 34 GFLOP each. As a product it is bound by memory instead: the
    27-channel patches (0.53 GB) written and read, the 1.26 GB output written once with bias
    and ReLU fused after it, ≈ 0.5–0.7 ms; the weight gradient reads the patches and the
    output gradient once, ≈ 0.4 ms. Only NHWC/HWIO, stride 1, no dilation, one group.
    """
    def product(a: dict):
        if not _plain_colour_conv(a):
            return None
        patches, kernel = _patches_and_kernel(a, channels=None)
        return jax.lax.dot_general(
            patches, kernel, (((3,), (0,)), ((), ())),
            precision=a["precision"], preferred_element_type=a["preferred_element_type"])

    return _intercept(conv, product)


def conv_as_patch_conv1x1(conv, channels: int = 32):
    """``conv`` with conv1_1 computed as a 1×1 convolution over its 3×3 patches, zero-padded from
    27 to ``channels`` channels: the same memory-bound shape as ``conv_as_patch_matmul``, but
    still a convolution, so XLA hands cuDNN conv + bias + ReLU as one fused call (as it does
    every other layer) instead of relying on a GEMM epilogue for the bias and the ReLU; 32
    channels keep every patch row 64-byte aligned for the tensor cores. Every other call goes
    to ``conv``.
    """
    def pointwise(a: dict):
        if not _plain_colour_conv(a):
            return None
        patches, kernel = _patches_and_kernel(a, channels=channels)
        return conv(**{**a, "lhs": patches, "rhs": kernel[None, None], "window_strides": (1, 1),
                       "padding": ((0, 0), (0, 0)), "lhs_dilation": None, "rhs_dilation": None})

    return _intercept(conv, pointwise)


def _patches_and_kernel(a: dict, channels: int | None):
    """conv1_1's 3×3 neighbourhoods stacked on channels, (B, H, W, kh·kw·cin) in (row, column,
    colour) order, zero-padded to ``channels`` if given, and its HWIO kernel reshaped to match
    as (kh·kw·cin [padded], cout)."""
    lhs, rhs = a["lhs"], a["rhs"]
    kh, kw, cin, cout = rhs.shape
    pads = a["padding"]
    if isinstance(pads, str):  # 'SAME' as XLA pads it: the extra row/column at the end
        pads = [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in (kh, kw)]
    x = jnp.pad(lhs, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
    rows, cols = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    views = [x[:, i:i + rows, j:j + cols, :] for i in range(kh) for j in range(kw)]
    kernel = rhs.reshape(kh * kw * cin, cout)
    extra = 0 if channels is None else channels - kh * kw * cin
    if extra > 0:
        views.append(jnp.zeros((*views[0].shape[:3], extra), lhs.dtype))
        kernel = _pad_axis(kernel, 0, extra)
    return jnp.concatenate(views, axis=-1), kernel


def _intercept(conv, rewrite):
    """``conv`` whose calls first go to ``rewrite`` with their bound arguments (by name);
    it returns the result, or None to leave the call to ``conv``."""
    signature = inspect.signature(conv)

    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        out = rewrite(dict(bound.arguments))
        return conv(*bound.args, **bound.kwargs) if out is None else out

    return call


def _plain_colour_conv(a: dict) -> bool:
    """A 3-input-channel NHWC/HWIO convolution, stride 1, no dilation, one group."""
    lhs, rhs = a["lhs"], a["rhs"]
    if lhs.ndim != 4 or a["dimension_numbers"] is None:
        return False
    dims = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, a["dimension_numbers"])
    return (tuple(dims) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)) and lhs.shape[-1] == 3
            and rhs.shape[2] == 3 and a["feature_group_count"] == 1
            and a["batch_group_count"] == 1 and all(s == 1 for s in a["window_strides"])
            and not any(d not in (None, 1) for d in (*(a["lhs_dilation"] or ()),
                                                     *(a["rhs_dilation"] or ()))))


def _pad_axis(x: jax.Array, axis: int, extra: int) -> jax.Array:
    return jnp.pad(x, [(0, extra if i == axis else 0) for i in range(x.ndim)])
