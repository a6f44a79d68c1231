"""ML-Net's learned centre prior as pure functions.

A small grid W (h'/10 × w'/10 for an h'×w' map) is upsampled bilinearly and the map is
multiplied by (1 + W), then passed through ReLU. The original's Theano
``bilinear_upsampling`` samples the source at x = (i − 4)/10, clamped to [0, n − 1];
``jax.image.resize`` (half-pixel centres) would sample 0.05 source pixels away, so the
grid is reproduced exactly with two fixed interpolation matrices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PRIOR_FACTOR = 10


def prior_shape(map_rows: int, map_cols: int, factor: int = PRIOR_FACTOR) -> tuple[int, int]:
    """Shape of W for an h'×w' map: (h' // 10, w' // 10) as the original, at least 1×1."""
    return max(map_rows // factor, 1), max(map_cols // factor, 1)


def interpolation_matrix(n_out: int, n_src: int, factor: int = PRIOR_FACTOR) -> np.ndarray:
    """(n_out, n_src) matrix of linear interpolation at x = (i − (factor//2 − 1))/factor.

    For factor 10 that is x = (i − 4)/10, clamped to [0, n_src − 1].
    """
    x = (np.arange(n_out, dtype=np.float64) - (factor // 2 - 1)) / factor
    x = np.clip(x, 0.0, n_src - 1)
    left = np.floor(x).astype(np.int64)
    right = np.minimum(left + 1, n_src - 1)
    frac = x - left
    m = np.zeros((n_out, n_src), np.float64)
    m[np.arange(n_out), left] += 1.0 - frac
    m[np.arange(n_out), right] += frac
    return m.astype(np.float32)


def upsample_prior(w: jax.Array, map_rows: int, map_cols: int) -> jax.Array:
    """W upsampled to (map_rows, map_cols) on the original's grid."""
    ry = jnp.asarray(interpolation_matrix(map_rows, w.shape[0]))
    rx = jnp.asarray(interpolation_matrix(map_cols, w.shape[1]))
    return ry @ w.astype(jnp.float32) @ rx.T


def apply_prior(w: jax.Array, saliency: jax.Array) -> jax.Array:
    """ReLU(saliency · upsample(1 + W)) for saliency of shape (B, h', w', 1).

    Upsampling 1 + W equals 1 + upsample(W) because each interpolation row sums to 1.
    """
    rows, cols = saliency.shape[1:3]
    gain = 1.0 + upsample_prior(w, rows, cols)
    return jax.nn.relu(saliency * gain[None, :, :, None].astype(saliency.dtype))


def prior_penalty(w: jax.Array) -> jax.Array:
    """λ·ΣW² with λ = 1/(rows·cols of W) — the original's l2(1/(rows_elt·cols_elt))."""
    w = w.astype(jnp.float32)
    return jnp.sum(jnp.square(w)) / w.size
