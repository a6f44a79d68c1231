"""ML-Net's training objective.

L = mean over pixels and images of (ŷ / max ŷ − y)² / (α − y), α = 1.1, with ŷ normalised
by its own per-image spatial maximum. The original divides without an epsilon; here a map
whose maximum is 0 (every ReLU dead) is divided by 1 instead, so ŷ/max ŷ = 0, the loss is
finite and its gradient is defined (it flows through ŷ only, not through the guard).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ALPHA = 1.1


def mlnet_loss(pred: jax.Array, target: jax.Array, alpha: float = ALPHA) -> jax.Array:
    """Scalar loss for (B, h, w, 1) predictions and targets in [0, 1]; no prior penalty.

    Computed in float32 whatever the input dtype.
    """
    if pred.shape != target.shape or pred.ndim != 4:  # broadcasting would give a wrong loss
        raise ValueError(f"mlnet_loss needs predictions and targets of one (B, h, w, 1) shape, "
                         f"got {pred.shape} and {target.shape}")
    pred = pred.astype(jnp.float32)
    target = target.astype(jnp.float32)
    peak = jnp.max(pred, axis=(1, 2, 3), keepdims=True)
    safe_peak = jnp.where(peak > 0, peak, jnp.ones_like(peak))
    return jnp.mean(jnp.square(pred / safe_peak - target) / (alpha - target))
