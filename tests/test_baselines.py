"""Baselines: the centre-bias Gaussian and the spectral residual (Hou & Zhang 2007, as OpenCV's
StaticSaliencySpectralResidual), checked against an independent transcription."""

import numpy as np
import pytest
from scipy import ndimage

from mlnet_jax.baselines import baseline_map, centre_bias_map, spectral_residual_map


def test_centre_bias_peaks_in_the_middle():
    m = centre_bias_map(31, 41)
    assert m.shape == (31, 41) and m.dtype == np.float32
    assert np.unravel_index(np.argmax(m), m.shape) == (15, 20) and m.max() == pytest.approx(1)
    np.testing.assert_allclose(m, m[::-1, ::-1], rtol=1e-6)
    # The README's definition: σ = ¼ of each side, exp(−r²/2), centred between the middle pixels.
    i, j = np.mgrid[:21, :80]
    want = np.exp(-0.5 * (((i - 10) / (0.25 * 21)) ** 2 + ((j - 39.5) / (0.25 * 80)) ** 2))
    np.testing.assert_allclose(centre_bias_map(21, 80), want, rtol=1e-6)


def _bilinear_reference(a: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """cv2.resize INTER_LINEAR: source coordinate (i + 0.5)·scale − 0.5, clamped to the edge,
    interpolated between its two neighbours (written per axis with gathers)."""
    def axis_weights(n_out, n_in):
        x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.floor(x).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, x - i0
    r0, r1, fr = axis_weights(rows, a.shape[0])
    c0, c1, fc = axis_weights(cols, a.shape[1])
    extra = (1,) * (a.ndim - 2)  # channels
    fr, fc = fr.reshape((-1, 1) + extra), fc.reshape((-1,) + extra)
    top = a[r0][:, c0] * (1 - fc) + a[r0][:, c1] * fc
    bottom = a[r1][:, c0] * (1 - fc) + a[r1][:, c1] * fc
    return top * (1 - fr) + bottom * fr


def _spectral_residual_reference(rgb: np.ndarray) -> np.ndarray:
    """OpenCV's computeSaliencyImpl step by step, with SciPy filters ('mirror' is OpenCV's
    BORDER_REFLECT_101) and complex arithmetic written out as cartToPolar/polarToCart."""
    grey = np.rint(rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114)
    small = np.clip(np.rint(_bilinear_reference(grey, 64, 64)), 0, 255)
    dft = np.fft.fft2(small)
    re, im = dft.real, dft.imag
    magnitude, angle = np.hypot(re, im), np.arctan2(im, re)
    log_amplitude = np.log(magnitude + 1)
    blurred = ndimage.uniform_filter(log_amplitude, size=3, mode="mirror")
    magnitude = np.exp(log_amplitude - blurred)
    back = np.fft.ifft2(magnitude * np.cos(angle) + 1j * magnitude * np.sin(angle))
    magnitude = np.hypot(back.real, back.imag)
    taps = np.exp(-np.arange(-2, 3) ** 2 / (2 * 8.0 ** 2))
    kernel = np.outer(taps, taps) / taps.sum() ** 2
    magnitude = ndimage.correlate(magnitude, kernel, mode="mirror") ** 2
    magnitude /= magnitude.max()
    return _bilinear_reference(magnitude, *rgb.shape[:2])


@pytest.mark.parametrize("size", [(48, 64), (120, 90), (64, 64), (20, 30)])
def test_spectral_residual_matches_a_transcription_of_opencv(size):
    """Grey content in three channels, so both greyscale conversions give the same levels
    (the colour weights are checked separately: OpenCV rounds in fixed point)."""
    rng = np.random.default_rng(size[0])
    coarse = rng.integers(0, 256, (size[0] // 4 + 1, size[1] // 4 + 1)).astype(np.float64)
    grey = np.clip(_bilinear_reference(coarse, *size) + rng.normal(0, 10, size), 0, 255)
    image = np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1)
    got = spectral_residual_map(image)
    assert got.shape == size and got.dtype == np.float32
    assert got.min() >= 0 and 0.5 < got.max() <= 1  # max 1 at 64×64, then interpolated
    np.testing.assert_allclose(got, _spectral_residual_reference(image), atol=1e-5)


def test_colour_to_grey_uses_the_bt601_weights():
    from mlnet_jax.baselines import _grey_uint8
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    expected = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    got = _grey_uint8(rgb).astype(np.float64)
    # Rounded to the nearest level; the 14-bit weights are within 2e-5 of the decimals.
    assert np.abs(got - expected).max() <= 0.5 + 0.01


def test_spectral_residual_of_a_grey_image_equals_its_rgb_copy():
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    np.testing.assert_allclose(spectral_residual_map(grey),
                               spectral_residual_map(np.repeat(grey[..., None], 3, -1)),
                               atol=1e-6)


@pytest.mark.parametrize("size,centre", [((128, 192), (32, 38)), ((128, 192), (90, 150)),
                                         ((256, 256), (128, 140)), ((96, 128), (77, 19))])
def test_spectral_residual_peaks_at_the_odd_patch_on_a_uniform_texture(size, centre):
    """A bright square on a texture of random grey blocks pops out (Hou & Zhang's Fig. 4)."""
    rows, cols = size
    rng = np.random.default_rng(rows + cols)
    blocks = rng.integers(60, 200, (rows // 2, cols // 2))
    texture = np.repeat(np.repeat(blocks, 2, axis=0), 2, axis=1)
    yy, xx = np.mgrid[:rows, :cols]
    r, c = centre
    patch = (np.abs(yy - r) <= rows // 14) & (np.abs(xx - c) <= rows // 14)
    texture[patch] = 255
    image = np.repeat(texture.astype(np.uint8)[..., None], 3, axis=-1)
    saliency = spectral_residual_map(image)
    peak = np.unravel_index(np.argmax(saliency), saliency.shape)
    assert abs(peak[0] - r) <= 0.08 * rows and abs(peak[1] - c) <= 0.08 * cols, (peak, centre)
    assert saliency[patch].mean() > 2 * saliency[~patch].mean()


def test_baseline_map_dispatches_and_rejects_unknown_names():
    image = np.zeros((10, 12, 3), np.uint8)
    assert baseline_map("centre", None, (10, 12)).shape == (10, 12)
    assert baseline_map("spectral_residual", image, (10, 12)).shape == (10, 12)
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline_map("itti", image, (10, 12))
