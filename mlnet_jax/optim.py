"""The original optimiser and layer freezing.

SGD with Nesterov momentum and Keras 1's time decay lr_t = lr / (1 + decay·t), t = update
count (a learning-rate schedule, not weight decay). Frozen layers are split out of the
parameters before differentiation, so they get no gradient, no backward pass and no
optimiser state.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax
from flax import traverse_util

from mlnet_jax.errors import UserError
from mlnet_jax.vgg import VGG16_CONV_NAMES


def keras1_decay_schedule(learning_rate: float, decay: float) -> optax.Schedule:
    return lambda step: learning_rate / (1.0 + decay * jnp.asarray(step, jnp.float32))


def make_optimizer(learning_rate: float, decay: float, momentum: float) -> optax.GradientTransformation:
    """Keras 1 SGD exactly: v = μ·v − lr_t·g; update = μ·v − lr_t·g.

    The learning rate scales the gradient *before* the momentum trace (``optax.sgd`` scales
    after it, which differs once lr_t changes over time).
    """
    return optax.chain(optax.scale_by_learning_rate(keras1_decay_schedule(learning_rate, decay)),
                       optax.trace(decay=momentum, nesterov=True))


def frozen_layer_names(frozen_convs: int) -> tuple[str, ...]:
    """The first ``frozen_convs`` VGG convolutions (10 = conv1_1…conv4_3, torchvision's first
    23 ``features`` modules)."""
    if not 0 <= frozen_convs <= len(VGG16_CONV_NAMES):
        raise UserError(f"config.frozen_convs must be in 0..{len(VGG16_CONV_NAMES)} (VGG-16 "
                        f"convolutions; the report's setup is 10), got {frozen_convs}")
    return VGG16_CONV_NAMES[:frozen_convs]


def split_frozen(params: dict, frozen_convs: int) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts; together they hold every parameter once."""
    frozen_names = set(frozen_layer_names(frozen_convs))
    trainable, frozen = {}, {}
    for path, value in traverse_util.flatten_dict(params).items():
        is_frozen = len(path) > 1 and path[0] == "backbone" and path[1] in frozen_names
        (frozen if is_frozen else trainable)[path] = value
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge_params(trainable: dict, frozen: dict) -> dict:
    flat = traverse_util.flatten_dict(trainable)
    flat.update(traverse_util.flatten_dict(frozen))
    return traverse_util.unflatten_dict(flat)
