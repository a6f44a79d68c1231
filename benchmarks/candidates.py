"""Levers not yet adopted, ready for ``throughput.py --variants cand_*``.

Levers that rewrite XLA's own operations live here until a measurement says they help
(benchmarks/NOTES.md, "Next levers"); Pallas kernels live in the package behind switches that
stay off until then ("The candidates in the package"). The ones that helped are in the package
now (``mlnet_jax/relu.py``, the pooling gradient in ``mlnet_jax/vgg.py``, conv1_1 as a Pallas
kernel in ``mlnet_jax/first_conv.py``);
the ones that lost are recorded in NOTES and deleted (the split head; conv1_1 over its 3×3
patches as a product or a 1×1 convolution, 2026-11-27; conv1_1 over groups of 2, 4 or 8
columns, 2026-11-28).
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
