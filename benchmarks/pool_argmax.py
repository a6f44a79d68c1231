"""Candidate ``cand_pool_argmax``: the pools' winner masks (``vgg.relu_max_pool_2x2``, ties to
the first maximum) by a pairwise argmax instead of a chain of comparisons with the maximum.

Why: in the v4 training step the H200 compiled (committed HLO, 2026-11-28) XLA split pool1's
forward into two fusions, each reading conv1_2's whole 1.26 GB output: one makes the maximum
and the second window's bit, the other the remaining bits from the inputs, the maximum and
that bit (0.427 + 0.362 ms, 3.6 GB moved; pool2 and pool3 were one fusion each). Here the
winner is the maximum's index from a tree of three strict comparisons (first of each pair,
then first pair on ties: the first maximum in row-major order), so the maximum and the mask
share every operation and should be one fusion reading the input once. Same maxima, same
masks. Predicted: pool1's forward 0.79 → ~0.43 ms, +0.7 to +0.9 % training; no change where
the pools were one fusion already or with ``ties="all"`` (float32 keras1 weights), which keep
the package's rule.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from mlnet_jax import vgg

rewritten = 0  # pools traced with the argmax, for throughput.py's check


def relu_max_pool_2x2(x, stride, alignment, ties="first"):
    """``vgg.relu_max_pool_2x2`` with the argmax mask where it can take it."""
    if ties != "first":  # not vgg.relu_max_pool_2x2: while patched in, that is this function
        vgg._check_pooling(alignment, ties)
        return vgg._relu_max_pool(x, stride, alignment, ties, x.shape[1:3])
    global rewritten
    rewritten += 1
    return _relu_max_pool(x, stride, alignment, x.shape[1:3])


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _relu_max_pool(x, stride, alignment, size):
    return vgg.max_pool_values(jnp.maximum(x, 0), stride, alignment)


def _forward(x, stride, alignment, size):
    v0, v1, v2, v3 = vgg._window_views(jax.lax.optimization_barrier(jnp.maximum(x, 0)),
                                       stride, alignment)
    top, bottom = jnp.maximum(v0, v1), jnp.maximum(v2, v3)
    top_index = jnp.where(v1 > v0, 1, 0).astype(jnp.uint8)
    bottom_index = jnp.where(v3 > v2, 3, 2).astype(jnp.uint8)
    y = jnp.maximum(top, bottom)
    index = jnp.where(bottom > top, bottom_index, top_index)
    winners = jnp.where(y > 0, jnp.left_shift(jnp.uint8(1), index), jnp.uint8(0))
    return y, winners


def _backward(stride, alignment, size, winners, g):
    return vgg._relu_max_pool_backward(stride, alignment, "first", size, winners, g)


_relu_max_pool.defvjp(_forward, _backward)
