"""Levers not yet adopted, ready for ``throughput.py --variants cand_*``.

They live here, not in the package, until a measurement says they help (benchmarks/NOTES.md,
"Next levers"). The ones that did are in the package now (``mlnet_jax/relu.py``, the pooling
gradient in ``mlnet_jax/vgg.py``); the ones that lost are recorded in NOTES and deleted (the
split head; conv1_1 over its 3×3 patches as a product or a 1×1 convolution, 2026-11-27).
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


def conv_over_column_groups(conv, group: int = 4, channels: int = 16):
    """``conv`` with conv1_1 (a 3-channel NHWC image, 3×3 'SAME', stride 1) computed on
    groups of ``group`` adjacent columns. The image as (B, H, W/g, 3g) is a free reshape; zero-
    padded to ``channels`` channels, it is convolved with a 3×3 kernel of g·O outputs whose
    column taps are the original's, shifted for each output column of the group, so the
    (B, H, W/g, g·O) output is the (B, H, W, O) one as it lies in memory: no patches written
    (the two patch formulations lost for that), no transposition, bias and ReLU still fused by
    cuDNN. The cost: about 3·channels/(3g)·g = ``channels`` / 3 times the products (5.3× at
    g = 4), in a call with K = 9·channels and N = g·O that tensor cores can fill, instead of
    the 3-channel call's sm80 kernel at 21 TFLOP/s (1.53 ms of a 14.3 ms prediction step on
    the H200). The weight gradient folds back through the kernel's construction (exact: each
    grouped tap is one original tap or zero).
    """
    import numpy as np

    taps = np.zeros((3, group, group, 3), np.float32)  # [grouped tap, in column, out column, tap]
    for grouped_tap in range(3):
        for p in range(group):
            for s in range(group):
                tap = (grouped_tap - 1) * group + p - s + 1
                if 0 <= tap <= 2:
                    taps[grouped_tap, p, s, tap] = 1

    def grouped(a: dict):
        lhs, rhs = a["lhs"], a["rhs"]
        dims = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, a["dimension_numbers"])
        b, h, w, c = lhs.shape if lhs.ndim == 4 else (0,) * 4
        if (lhs.ndim != 4 or tuple(dims.lhs_spec) != (0, 3, 1, 2)
                or tuple(dims.rhs_spec) != (3, 2, 0, 1) or tuple(dims.out_spec) != (0, 3, 1, 2)
                or c != 3 or rhs.shape[:3] != (3, 3, 3) or w % group
                or a["feature_group_count"] != 1 or a["batch_group_count"] != 1
                or tuple(a["window_strides"]) != (1, 1)
                or any(d not in (None, (1, 1), [1, 1]) for d in (a["lhs_dilation"],
                                                                 a["rhs_dilation"]))
                or a["padding"] not in ("SAME", ((1, 1), (1, 1)), [(1, 1), (1, 1)])):
            return None
        out = rhs.shape[3]
        kernel = jnp.einsum("xpsk,ykco->yxpcso", jnp.asarray(taps, rhs.dtype), rhs)
        kernel = kernel.reshape(3, 3, group * 3, group * out)
        image = lhs.reshape(b, h, w // group, group * 3)
        extra = max(channels - 3 * group, 0)
        y = conv(**{**a, "lhs": _pad_axis(image, 3, extra), "rhs": _pad_axis(kernel, 2, extra),
                    "padding": ((1, 1), (1, 1)), "lhs_dilation": None, "rhs_dilation": None})
        return y.reshape(b, h, w, out)

    return _intercept(conv, grouped)


def _intercept(conv, rewrite):
    """``conv`` whose calls first go to ``rewrite`` with their bound arguments (by name);
    it returns the result, or None to leave the call to ``conv``. ``call.rewritten`` counts
    the calls it took, so that a candidate matching nothing is not measured as the code."""
    signature = inspect.signature(conv)

    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        out = rewrite(dict(bound.arguments))
        if out is None:
            return conv(*bound.args, **bound.kwargs)
        call.rewritten += 1
        return out

    call.rewritten = 0
    return call


def _pad_axis(x: jax.Array, axis: int, extra: int) -> jax.Array:
    return jnp.pad(x, [(0, extra if i == axis else 0) for i in range(x.ndim)])
