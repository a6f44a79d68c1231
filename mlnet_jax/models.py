"""ML-Net: VGG-16 backbone + multi-level head + learned prior (Cornia et al., ICPR 2016)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlnet_jax import head_kernel
from mlnet_jax.first_conv import FirstConvMode
from mlnet_jax.head import init_head_params, multilevel_head
from mlnet_jax.prior import PRIOR_FACTOR, apply_prior, prior_shape
from mlnet_jax.vgg import VGG16, PoolingAlignment

OUTPUT_STRIDE = 8


class MLNet(nn.Module):
    """Maps NHWC preprocessed images (h, w divisible by 8) to saliency (B, h/8, w/8, 1).

    Parameters: ``backbone`` (VGG16 convs), ``head`` (``conv``, ``readout``) and, with
    ``prior=True``, ``prior`` (the W grid, zero-initialised, shape set by the input size).
    Compute runs in ``dtype``; parameters and the returned map are float32.
    Dropout needs a ``'dropout'`` RNG and is active only with ``train=True``.
    """

    prior: bool = True
    pooling: PoolingAlignment = "standard"
    dtype: jnp.dtype = jnp.float32
    dropout_rate: float = 0.5
    width_multiplier: float = 1.0  # < 1 only for the CPU demo
    first_conv: FirstConvMode = "auto"  # the Pallas kernels: first_conv, and those adopted

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        rows, cols = x.shape[1:3]
        if rows % OUTPUT_STRIDE or cols % OUTPUT_STRIDE:
            raise ValueError(f"MLNet input height and width must be divisible by {OUTPUT_STRIDE}, "
                             f"got {rows}x{cols}")
        features = VGG16(pooling=self.pooling, dtype=self.dtype,
                         width_multiplier=self.width_multiplier, first_conv=self.first_conv,
                         name="backbone")(x)
        in_channels = sum(features[k].shape[-1] for k in ("pool3", "pool4", "conv5_3"))
        head_params = self.param("head", init_head_params, in_channels)
        dropout_rng = self.make_rng("dropout") if train and self.dropout_rate > 0 else None
        if head_kernel.kernel_applies(self.first_conv, features, self.dtype,
                                      dropout=dropout_rng is not None):
            saliency = head_kernel.multilevel_head(head_params, features)
        else:
            saliency = multilevel_head(head_params, features, dropout_rng=dropout_rng,
                                       dropout_rate=self.dropout_rate)
        saliency = saliency.astype(jnp.float32)
        if self.prior:
            shape = prior_shape(rows // OUTPUT_STRIDE, cols // OUTPUT_STRIDE)
            if self.has_variable("params", "prior"):
                _check_prior_fits(self.get_variable("params", "prior").shape, shape, rows, cols)
            w = self.param("prior", nn.initializers.zeros_init(), shape, jnp.float32)
            saliency = apply_prior(w, saliency)
        return saliency


def _check_prior_fits(learned: tuple[int, ...], needed: tuple[int, int], rows: int, cols: int):
    """The prior is a grid learned for one input size: images of another size (a Python caller
    skipping the letterbox) got Flax's ScopeParamShapeError about a parameter's shape."""
    if tuple(learned) != needed:
        cell = OUTPUT_STRIDE * PRIOR_FACTOR  # input pixels per prior cell
        raise ValueError(
            f"images of {rows}x{cols} do not fit this model's prior, a {learned[0]}x{learned[1]} "
            f"grid learned for inputs of about {learned[0] * cell}x{learned[1] * cell}: letterbox "
            f"them to the input size load_model's info names (mlnet_jax.preprocessing.letterbox)")
