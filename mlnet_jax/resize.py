"""Bilinear resizing with cv2/MATLAB-imresize-without-antialias semantics (NumPy only)."""

from __future__ import annotations

import numpy as np


def _matrix(n_out: int, n_in: int, start: int = 0, count: int | None = None) -> np.ndarray:
    """Rows ``start:start + count`` of the (n_out, n_in) interpolation matrix."""
    count = n_out - start if count is None else count
    x = (np.arange(start, start + count) + 0.5) * (n_in / n_out) - 0.5
    x = np.clip(x, 0, n_in - 1)
    left = np.floor(x).astype(int)
    right = np.minimum(left + 1, n_in - 1)
    frac = x - left
    m = np.zeros((count, n_in))
    m[np.arange(count), left] += 1 - frac
    m[np.arange(count), right] += frac
    return m


def resize_bilinear(array: np.ndarray, shape: tuple[int, int],
                    window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Resize a 2-D (or H×W×C) array to ``shape`` with half-pixel bilinear interpolation.

    ``window=(top, left, rows, cols)`` computes only that crop of the result: the same values
    as slicing the whole, in memory for the crop alone (a 2×100000 crop of a 75000×100000
    resize needs kilobytes, not 56 GB).
    """
    a = np.asarray(array, np.float64)
    top, left, rows, cols = (0, 0, *shape) if window is None else window
    ry = _matrix(shape[0], a.shape[0], top, rows)
    rx = _matrix(shape[1], a.shape[1], left, cols)
    if a.ndim == 2:
        return ry @ a @ rx.T
    return np.einsum("ij,jkc,lk->ilc", ry, a, rx)
