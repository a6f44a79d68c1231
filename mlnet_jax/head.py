"""ML-Net's multi-level head as pure functions of its parameters.

pool3 (256) + pool4 (512) + conv5_3 (512) are concatenated on channels, dropped out
(training only), then a 3×3 conv to 64 with ReLU and a 1×1 conv to 1 with ReLU.
Pure functions keep the head easy to port from other frameworks and to test in isolation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from mlnet_jax.relu import relu

HEAD_FEATURES = ("pool3", "pool4", "conv5_3")
HEAD_CHANNELS = 64

# Glorot normal, untruncated, as Keras 1 'glorot_normal' (the original's init).
_glorot_normal = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")


def init_head_params(rng: jax.Array, in_channels: int = 1280) -> dict:
    """Float32 parameters: ``conv`` (3×3, in→64) and ``readout`` (1×1, 64→1), zero biases."""
    conv_rng, readout_rng = jax.random.split(rng)
    return {
        "conv": {"kernel": _glorot_normal(conv_rng, (3, 3, in_channels, HEAD_CHANNELS), jnp.float32),
                 "bias": jnp.zeros((HEAD_CHANNELS,), jnp.float32)},
        "readout": {"kernel": _glorot_normal(readout_rng, (1, 1, HEAD_CHANNELS, 1), jnp.float32),
                    "bias": jnp.zeros((1,), jnp.float32)},
    }


def _conv_same(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), window_strides=(1, 1), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias.astype(x.dtype)


def dropout_keep_mask(rng: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
    """Boolean keep mask, each element kept independently with probability 1 − ``rate``.

    At ML-Net's rate 0.5 every random bit is one element's coin (32 elements per 32-bit word):
    exact, and 32× less random-number work than ``bernoulli``'s one word per element, which
    matters at 32 × 60 × 80 × 1280 elements per step.
    """
    if rate == 0.5 and shape[-1] % 32 == 0:
        words = jax.random.bits(rng, (*shape[:-1], shape[-1] // 32), jnp.uint32)
        bits = (words[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
        return bits.reshape(shape).astype(bool)
    return jax.random.bernoulli(rng, 1.0 - rate, shape)


def multilevel_head(params: dict, features: dict[str, jax.Array], *,
                    dropout_rng: jax.Array | None = None, dropout_rate: float = 0.5) -> jax.Array:
    """Saliency map before the prior, (B, h/8, w/8, 1), in the features' dtype.

    Dropout is applied only when ``dropout_rng`` is given (i.e. when training).
    """
    x = jnp.concatenate([features[name] for name in HEAD_FEATURES], axis=-1)
    if dropout_rng is not None and dropout_rate > 0.0:
        keep = dropout_keep_mask(dropout_rng, dropout_rate, x.shape)
        x = jnp.where(keep, x / (1.0 - dropout_rate), jnp.zeros_like(x))
    x = relu(_conv_same(x, params["conv"]["kernel"], params["conv"]["bias"]))
    return relu(_conv_same(x, params["readout"]["kernel"], params["readout"]["bias"]))
