"""Levers not yet measured on a GPU, ready for ``throughput.py --variants cand_*``.

They live here, not in the package, until a measurement says they help (benchmarks/NOTES.md,
"Next levers"). The ReLU computes exactly JAX's gradient; the pooling computes the original
ML-Net's (Theano's), which differs from JAX's only at ties (tests/test_benchmarks.py).

The idea: autodiff of ``max(x, 0)`` keeps the pre-activation ``x`` for the backward pass, so
XLA cannot fold the ReLU into cuDNN's conv+bias+activation call when training, and a
reshape-and-max pool's autodiff builds argmax masks in the forward pass, stores them (1 byte
per input element) and counts ties in the backward pass. Gradients computed from the ReLU's
*output* and the pool's input and output need neither. A first try (v2, 2026-11-26) with
plain ``custom_vjp`` compiled to the very same program: XLA's simplifier rewrote
``max(x, 0) > 0`` back into ``x > 0``. Here the ReLU's saved output passes through
``optimization_barrier``, which the simplifier cannot see through.
"""

from __future__ import annotations

import inspect
from functools import partial

import jax
import jax.numpy as jnp


@jax.custom_vjp
def relu(x: jax.Array) -> jax.Array:
    """``max(x, 0)``; its gradient is masked by ``output > 0`` (0 at x = 0, as jax.nn.relu)."""
    return jnp.maximum(x, 0)


def _relu_fwd(x):
    y = jnp.maximum(x, 0)
    return y, jax.lax.optimization_barrier(y)


def _relu_bwd(y, g):
    return (jnp.where(y > 0, g, jnp.zeros_like(g)),)


relu.defvjp(_relu_fwd, _relu_bwd)


def pool_with_original_gradient(pool):
    """``pool(x, stride, alignment)`` (the package's 2×2 max pooling) with the gradient of
    the original ML-Net's Theano ``MaxPoolGrad``: every input equal to its window's maximum
    receives that window's whole gradient, summed over the windows it belongs to.

    JAX's own gradients split ties instead (``jnp.max`` shares, ``jnp.maximum`` halves).
    After a ReLU the two differ only where two positive inputs tie for a maximum (all-zero
    windows are masked by the ReLU's gradient either way). This one needs no tie count: one
    compare-and-select per window offset, computed in the backward pass from ``x`` and the
    pooled ``y``, so no mask is built in the forward pass and stored.
    """

    @partial(jax.custom_vjp, nondiff_argnums=(1, 2))
    def pooled(x, stride, alignment):
        return pool(x, stride, alignment)

    def forward(x, stride, alignment):
        y = pool(x, stride, alignment)
        return y, (x, y)

    def backward(stride, alignment, residuals, g):
        x, y = residuals
        start = -1 if alignment == "keras1" else 0  # window i covers s·i + start + {0, 1}
        grad = jnp.zeros_like(x)
        for a in (0, 1):
            for b in (0, 1):
                y_ab = _spread(y, x.shape, stride, (start + a, start + b), jnp.nan)
                g_ab = _spread(g, x.shape, stride, (start + a, start + b), 0)
                grad = grad + jnp.where(x == y_ab, g_ab, jnp.zeros((), g.dtype))
        return (grad,)

    pooled.defvjp(forward, backward)
    return pooled


def _spread(v: jax.Array, shape: tuple, stride: int, offset: tuple[int, int], fill) -> jax.Array:
    """``v`` (B, h, w, C) placed on an input grid of ``shape``: v[i, j] lands at
    (stride·i + offset[0], stride·j + offset[1]); positions no window element maps to hold
    ``fill`` (NaN equals nothing, so they get no gradient)."""
    config = [(0, 0, 0)]
    for axis, low in zip((1, 2), offset):
        n, m = shape[axis], v.shape[axis]
        config.append((low, n - (low + (m - 1) * stride + 1), stride - 1))
    config.append((0, 0, 0))
    return jax.lax.pad(v, jnp.asarray(fill, v.dtype), config)


def conv_with_padded_colour_channels(conv, channels: int = 8):
    """``conv`` (``lax.conv_general_dilated``'s signature) with a 3-channel input, the image
    into conv1_1, zero-padded to ``channels`` channels, and its kernel alike: the same sums
    plus zero products. cuDNN's fast tensor-core kernels want channel counts divisible by 8;
    XLA hands conv1_1 to cuDNN with 3 (in the H200 HLO: bf16[32,480,640,3] and a 157 MB
    workspace). Which is faster is a measurement.
    """
    signature = inspect.signature(conv)

    def padded(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        a = call.arguments
        lhs, rhs = a["lhs"], a["rhs"]
        dims = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, a["dimension_numbers"])
        lhs_axis, rhs_axis = dims.lhs_spec[1], dims.rhs_spec[1]
        if lhs.shape[lhs_axis] == 3 and rhs.shape[rhs_axis] == 3 and a["feature_group_count"] == 1:
            a["lhs"] = _pad_axis(lhs, lhs_axis, channels - 3)
            a["rhs"] = _pad_axis(rhs, rhs_axis, channels - 3)
        return conv(*call.args, **call.kwargs)

    return padded


def _pad_axis(x: jax.Array, axis: int, extra: int) -> jax.Array:
    return jnp.pad(x, [(0, extra if i == axis else 0) for i in range(x.ndim)])


def split_multilevel_head(params: dict, features: dict, *, dropout_rng=None,
                          dropout_rate: float = 0.5) -> jax.Array:
    """``mlnet_jax.head.multilevel_head`` without the concatenation: the 3×3 conv over the
    1280 concatenated channels is the sum of one conv per input (pool3, pool4, conv5_3) with
    that input's slice of the kernel, summed in float32. The same dropout mask (drawn for the
    concatenated shape, then sliced), the same parameters.

    Saves writing and re-reading the 393 MB concatenation per 32×480×640 step, and in the
    frozen setup the input gradient of the 768 channels that reach no trainable weight.
    """
    from mlnet_jax import head

    parts = [features[name] for name in head.HEAD_FEATURES]
    widths = [p.shape[-1] for p in parts]
    keep = None
    if dropout_rng is not None and dropout_rate > 0.0:
        keep = head.dropout_keep_mask(dropout_rng, dropout_rate, (*parts[0].shape[:-1], sum(widths)))
    kernel, total, start = params["conv"]["kernel"], None, 0
    for part, width in zip(parts, widths):
        if keep is not None:
            part = jnp.where(keep[..., start:start + width], part / (1.0 - dropout_rate),
                             jnp.zeros_like(part))
        term = jax.lax.conv_general_dilated(
            part, kernel[:, :, start:start + width].astype(part.dtype), window_strides=(1, 1),
            padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
            preferred_element_type=jnp.float32)
        total = term if total is None else total + term
        start += width
    dtype = parts[0].dtype
    x = head.relu((total + params["conv"]["bias"]).astype(dtype))
    return head.relu(head._conv_same(x, params["readout"]["kernel"], params["readout"]["bias"]))
