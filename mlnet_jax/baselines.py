"""Reference saliency maps that need no training, so users see the model's gap at a glance."""

from __future__ import annotations

import numpy as np


def centre_bias_map(rows: int, cols: int, sigma_fraction: float = 0.25) -> np.ndarray:
    """Anisotropic Gaussian centred on the image, σ = ``sigma_fraction`` of each side, max 1."""
    y = (np.arange(rows) - (rows - 1) / 2) / (sigma_fraction * rows)
    x = (np.arange(cols) - (cols - 1) / 2) / (sigma_fraction * cols)
    return np.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2)).astype(np.float32)
