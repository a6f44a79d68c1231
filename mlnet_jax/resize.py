"""Bilinear resizing with cv2/MATLAB-imresize-without-antialias semantics (NumPy only)."""

from __future__ import annotations

import numpy as np

#: Output pixels per band when a huge map is made a band of rows at a time (its float
#: temporaries then take megabytes, not gigabytes).
BAND_PIXELS = 1 << 20


def _taps(n_out: int, n_in: int, start: int = 0, count: int | None = None
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For outputs ``start:start + count`` of n_in → n_out: the two inputs each one blends
    (left, right) and the right one's weight."""
    count = n_out - start if count is None else count
    x = (np.arange(start, start + count) + 0.5) * (n_in / n_out) - 0.5
    x = np.clip(x, 0, n_in - 1)
    left = np.floor(x).astype(int)
    return left, np.minimum(left + 1, n_in - 1), x - left


def _along(a: np.ndarray, axis: int, taps: tuple[np.ndarray, np.ndarray, np.ndarray]
           ) -> np.ndarray:
    left, right, frac = taps
    frac = frac.reshape([-1 if i == axis else 1 for i in range(a.ndim)])
    low, out = np.take(a, left, axis=axis), np.take(a, right, axis=axis)
    out -= low  # in place: a 640×480 map's passes are memory-bound
    out *= frac
    out += low
    return out


def resize_bilinear(array: np.ndarray, shape: tuple[int, int],
                    window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Resize a 2-D (or H×W×C) array to ``shape`` with half-pixel bilinear interpolation.

    ``window=(top, left, rows, cols)`` computes only that crop of the result: the values of
    slicing the whole (to rounding: the passes may run in the other order), in memory for the
    crop and the smaller of the two ways through the input (a 2×100000 crop of a 75000×100000
    resize needs megabytes, not 56 GB).

    Two taps per output along each axis, in float64, without a matrix product: a product ran
    through the BLAS's own threads, which fought the predict command's worker threads (two
    threads resizing 640×480 maps made 35 a second on a 2-core machine, one alone 48).
    """
    a = np.asarray(array, np.float64)
    top, left, rows, cols = (0, 0, *shape) if window is None else window
    row_taps = _taps(shape[0], a.shape[0], top, rows)
    col_taps = _taps(shape[1], a.shape[1], left, cols)
    if a.shape[0] * cols <= rows * a.shape[1]:  # the smaller intermediate; rows last on a tie
        return _along(_along(a, 1, col_taps), 0, row_taps)
    return _along(_along(a, 0, row_taps), 1, col_taps)
