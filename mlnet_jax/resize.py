"""Bilinear resizing with cv2/MATLAB-imresize-without-antialias semantics (NumPy only)."""

from __future__ import annotations

import numpy as np


def _matrix(n_out: int, n_in: int) -> np.ndarray:
    x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    x = np.clip(x, 0, n_in - 1)
    left = np.floor(x).astype(int)
    right = np.minimum(left + 1, n_in - 1)
    frac = x - left
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), left] += 1 - frac
    m[np.arange(n_out), right] += frac
    return m


def resize_bilinear(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D (or H×W×C) array to ``shape`` with half-pixel bilinear interpolation."""
    a = np.asarray(array, np.float64)
    ry, rx = _matrix(shape[0], a.shape[0]), _matrix(shape[1], a.shape[1])
    if a.ndim == 2:
        return ry @ a @ rx.T
    return np.einsum("ij,jkc,lk->ilc", ry, a, rx)
