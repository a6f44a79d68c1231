"""Reference saliency maps that need no training, so users see the model's gap at a glance.

- :func:`centre_bias_map`: a Gaussian on the image centre. It uses no image content, only the
  photographers' and viewers' tendency to look at the middle; a model has to beat it.
- :func:`spectral_residual_map`: the classic bottom-up model of Hou & Zhang (CVPR 2007), as
  OpenCV's ``saliency.StaticSaliencySpectralResidual`` computes it (what the seed report
  compared against). Pure NumPy, so no OpenCV is needed.
"""

from __future__ import annotations

import numpy as np

from mlnet_jax.resize import resize_bilinear

#: OpenCV's working resolution for the spectral residual (``resImWidth = resImHeight = 64``):
#: the method looks for "unexpected" structure at a coarse scale, where the log spectrum of
#: natural images is close to its local average.
SPECTRAL_RESIDUAL_SIZE = (64, 64)
#: Side of the box filter that estimates the "expected" log amplitude (Hou & Zhang's h_n, n=3).
SPECTRAL_RESIDUAL_BOX = 3
#: Side and σ (pixels of the 64×64 map) of OpenCV's final Gaussian blur (``Size(5, 5), 8``);
#: with σ = 8 ≫ 2 the 5-tap kernel is almost a box filter.
SPECTRAL_RESIDUAL_BLUR = (5, 8.0)
#: OpenCV's BGR2GRAY for 8-bit images: Y = 0.299 R + 0.587 G + 0.114 B in 14-bit fixed point.
_GREY_WEIGHTS_Q14 = (4899, 9617, 1868)


def centre_bias_map(rows: int, cols: int, sigma_fraction: float = 0.25) -> np.ndarray:
    """Anisotropic Gaussian centred on the image, σ = ``sigma_fraction`` of each side, max 1."""
    y = (np.arange(rows) - (rows - 1) / 2) / (sigma_fraction * rows)
    x = (np.arange(cols) - (cols - 1) / 2) / (sigma_fraction * cols)
    return np.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2)).astype(np.float32)


def _grey_uint8(image: np.ndarray) -> np.ndarray:
    """OpenCV's ``cvtColor(BGR2GRAY)`` of an RGB uint8 image (a 2-D image is already grey)."""
    a = np.asarray(image)
    if a.ndim == 2:
        return a.astype(np.uint8)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"expected an H×W or H×W×3 image, got shape {a.shape}")
    rgb = a[..., :3].astype(np.int64)
    wr, wg, wb = _GREY_WEIGHTS_Q14
    return ((rgb[..., 0] * wr + rgb[..., 1] * wg + rgb[..., 2] * wb + (1 << 13)) >> 14).astype(
        np.uint8)


def _reflect101_filter(a: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable correlation with a 1-D odd ``kernel`` on both axes, OpenCV's BORDER_DEFAULT
    (reflect-101: ``gfedcb|abcdefgh|gfedcba``, NumPy's ``reflect``)."""
    r = len(kernel) // 2
    padded = np.pad(a, r, mode="reflect")
    rows = sum(k * padded[i:i + a.shape[0], :] for i, k in enumerate(kernel))
    return sum(k * rows[:, i:i + a.shape[1]] for i, k in enumerate(kernel))


def _gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """OpenCV's ``getGaussianKernel(size, sigma)`` for sigma > 0: sampled, sums to 1."""
    x = np.arange(size) - (size - 1) / 2
    k = np.exp(-(x ** 2) / (2 * sigma ** 2))
    return k / k.sum()


def spectral_residual_map(image_rgb_uint8: np.ndarray) -> np.ndarray:
    """Spectral-residual saliency (Hou & Zhang 2007) of an H×W×3 RGB (or H×W grey) uint8 image.

    The steps and constants of OpenCV's ``StaticSaliencySpectralResidual`` (opencv_contrib,
    ``computeSaliencyImpl``):

    1. greyscale (BGR2GRAY weights), resized to 64×64 (bilinear, half-pixel centres, no
       antialias, rounded to uint8 as ``INTER_LINEAR_EXACT``);
    2. the 2-D DFT; log amplitude L = log(1 + |F|) (OpenCV adds 1 so a zero coefficient is
       finite) and phase P;
    3. spectral residual R = L − box3×3(L) (border reflect-101);
    4. inverse DFT of exp(R + iP) (the original phase), magnitude |·|;
    5. Gaussian blur 5×5, σ = 8 (reflect-101), then squared (OpenCV blurs before squaring,
       the paper after);
    6. divided by its maximum, resized back to H×W (bilinear, half-pixel centres).

    Returns float32 in [0, 1] with maximum 1. Differences to OpenCV are rounding only: its
    8-bit resize uses fixed-point weights (a grey level may differ by 1) and its
    ``cartToPolar`` angle is an approximation of atan2.
    """
    grey = _grey_uint8(image_rgb_uint8)
    rows, cols = grey.shape
    if rows < 1 or cols < 1:
        raise ValueError(f"empty image, shape {grey.shape}")
    small = np.clip(np.round(resize_bilinear(grey.astype(np.float64), SPECTRAL_RESIDUAL_SIZE)),
                    0, 255)
    spectrum = np.fft.fft2(small)
    log_amplitude = np.log1p(np.abs(spectrum))
    phase = np.angle(spectrum)
    box = np.full(SPECTRAL_RESIDUAL_BOX, 1.0 / SPECTRAL_RESIDUAL_BOX)
    residual = log_amplitude - _reflect101_filter(log_amplitude, box)
    magnitude = np.abs(np.fft.ifft2(np.exp(residual + 1j * phase)))
    size, sigma = SPECTRAL_RESIDUAL_BLUR
    saliency = _reflect101_filter(magnitude, _gaussian_kernel(size, sigma)) ** 2
    saliency = saliency / saliency.max()  # > 0: exp(R) > 0, so the spectrum is never all zero
    return np.clip(resize_bilinear(saliency, (rows, cols)), 0, 1).astype(np.float32)


BASELINES = {"centre": "Gaussian centre bias (σ = 1/4 of each side)",
             "spectral_residual": "spectral residual (Hou & Zhang 2007, as OpenCV)"}


def baseline_map(name: str, image_rgb_uint8: np.ndarray | None, size: tuple[int, int]
                 ) -> np.ndarray:
    """The baseline ``name`` for an image of ``size`` (rows, cols); the centre bias needs no
    pixels (``image_rgb_uint8`` may be None)."""
    if name == "centre":
        return centre_bias_map(int(size[0]), int(size[1]))
    if name == "spectral_residual":
        if image_rgb_uint8 is None:
            raise ValueError("the spectral residual baseline needs the image")
        return spectral_residual_map(image_rgb_uint8)
    raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
