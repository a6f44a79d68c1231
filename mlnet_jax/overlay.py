"""Saliency maps for people: 8-bit grey maps, colour heatmaps blended over the image, and the
optional Gaussian blur (SPEC §1: the original applies none; blurring is a user's choice).

Blending weights every pixel by its saliency, so non-salient regions show the untouched photo
and the colour marks only where people are predicted to look.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image
from scipy import ndimage

from mlnet_jax.resize import BAND_PIXELS

DEFAULT_COLORMAP = "jet"
DEFAULT_OPACITY = 0.6
# Blur work is done on a copy at most this long, as the maps carry no finer detail
# (they are bilinear upsamplings of an h/8 × w/8 model output).
_BLUR_WORKING_SIZE = 512


@functools.cache
def _lut(colormap: str) -> np.ndarray:
    """256×3 uint8 colour table of a Matplotlib colormap (only the registry, no pyplot)."""
    import matplotlib

    try:
        cmap = matplotlib.colormaps[colormap]
    except KeyError:
        raise ValueError(f"unknown colormap {colormap!r}; any Matplotlib colormap name works") from None
    return np.round(cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


def map_to_uint8(saliency: np.ndarray) -> np.ndarray:
    """[0, 1] map → uint8 0–255 grey levels (what the map PNGs hold); one float32 copy,
    worked on in place (a huge photo's map)."""
    levels = _unit_interval(saliency)
    levels *= 255
    return np.round(levels, out=levels).astype(np.uint8)


def _unit_interval(saliency: np.ndarray) -> np.ndarray:
    """A float32 copy of ``saliency`` with NaN as 0, clipped to [0, 1]."""
    values = np.array(saliency, np.float32)
    np.nan_to_num(values, copy=False)
    return np.clip(values, 0, 1, out=values)


def heatmap(saliency: np.ndarray, colormap: str = DEFAULT_COLORMAP) -> np.ndarray:
    """[0, 1] map → H×W×3 uint8 colours of ``colormap``."""
    return _lut(colormap)[map_to_uint8(saliency)]


def overlay(image: np.ndarray, saliency: np.ndarray, opacity: float = DEFAULT_OPACITY,
            colormap: str = DEFAULT_COLORMAP) -> np.ndarray:
    """The RGB image with the heatmap blended over it, each pixel at ``opacity × saliency``.

    ``image`` is H×W×3 uint8; a map of another size is resized (bilinear) to the image's.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"overlay needs an H×W×3 uint8 image, got {image.shape} {image.dtype}")
    saliency = _unit_interval(saliency)
    if saliency.shape != image.shape[:2]:
        saliency = np.asarray(Image.fromarray(saliency).resize(
            (image.shape[1], image.shape[0]), Image.BILINEAR))
    out = np.empty_like(image)
    step = max(1, BAND_PIXELS // max(1, image.shape[1]))
    for start in range(0, image.shape[0], step):  # float32 temporaries a band at a time
        rows = slice(start, start + step)
        weight = (float(opacity) * saliency[rows])[..., None]
        blended = image[rows].astype(np.float32) * (1.0 - weight) + \
            heatmap(saliency[rows], colormap) * weight
        out[rows] = np.clip(np.round(blended), 0, 255)
    return out


def blur_map(saliency: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with standard deviation ``sigma`` in pixels of the map, rescaled to a
    maximum of 1 (an all-zero map stays zero). Borders repeat the edge value.

    Large maps are blurred on a reduced copy (long side 512) and resized back, which is
    indistinguishable for maps that are themselves upsampled, and keeps a 4000-pixel photo fast.
    """
    saliency = np.ascontiguousarray(saliency, np.float32)
    if saliency.ndim != 2:
        raise ValueError(f"expected an H×W map, got shape {saliency.shape}")
    if not 0 <= sigma < math.inf:  # NaN too
        raise ValueError(f"blur sigma must be a finite number ≥ 0, got {sigma}")
    if saliency.size == 0:
        return saliency
    rows, cols = saliency.shape
    # Wider than ten times the map, a Gaussian is flat over it to 0.5 %: the same blur, and a
    # kernel that fits in memory (σ = 1e30 asked for one of 10^31 taps).
    sigma = min(sigma, 10.0 * max(rows, cols))
    scale = _BLUR_WORKING_SIZE / max(rows, cols)
    if sigma == 0:  # rescaled all the same: σ = 0 is the limit of a narrowing blur
        out = saliency
    elif scale < 1 and sigma * scale >= 1:
        small_size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
        small = np.asarray(Image.fromarray(saliency).resize(small_size, Image.BILINEAR))
        blurred = ndimage.gaussian_filter(small, sigma * scale, mode="nearest")
        out = np.asarray(Image.fromarray(np.ascontiguousarray(blurred, np.float32)).resize(
            (cols, rows), Image.BILINEAR))
    else:
        out = ndimage.gaussian_filter(saliency, sigma, mode="nearest")
    out = np.clip(out, 0, None)
    peak = float(out.max())
    return (out / peak if peak > 0 else np.zeros_like(out)).astype(np.float32)
