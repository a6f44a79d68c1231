"""Image and map preprocessing shared by training, evaluation and prediction.

Letterboxing keeps the aspect ratio and centres the resized image on a zero canvas, with the
original code's integer geometry; test-time postprocessing undoes it (SPEC §1).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image

from mlnet_jax.resize import BAND_PIXELS, resize_bilinear

Convention = Literal["caffe", "torch"]
CONVENTIONS: tuple[str, ...] = ("caffe", "torch")
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
TORCH_STD_RGB = (0.229, 0.224, 0.225)


def letterbox_geometry(rows: int, cols: int, target: tuple[int, int]
                       ) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized_rows, resized_cols), (top, left)) of an image letterboxed into ``target``."""
    t_rows, t_cols = target
    if rows / t_rows > cols / t_cols:
        new_rows, new_cols = t_rows, min(max((cols * t_rows) // rows, 1), t_cols)
    else:
        new_rows, new_cols = min(max((rows * t_cols) // cols, 1), t_rows), t_cols
    return (new_rows, new_cols), ((t_rows - new_rows) // 2, (t_cols - new_cols) // 2)


def letterbox(image: np.ndarray | Image.Image, target: tuple[int, int]) -> np.ndarray:
    """uint8 image (H×W or H×W×C) resized with bilinear into ``target`` on a zero canvas.

    Resizing uses PIL's bilinear filter, which low-pass filters when shrinking (the original
    used OpenCV's, which aliases); the geometry is the original's.
    """
    if not isinstance(image, Image.Image):
        image = np.asarray(image)
        if image.dtype != np.uint8:  # PIL's own refusal does not say what it wants
            raise TypeError(f"letterbox takes uint8 images, got {image.dtype} (an image of "
                            "another type: mlnet_jax.inference.to_rgb_array converts it)")
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    (new_rows, new_cols), (top, left) = letterbox_geometry(pil.height, pil.width, target)
    resized = np.asarray(pil.resize((new_cols, new_rows), Image.BILINEAR))
    canvas = np.zeros(tuple(target) + resized.shape[2:], resized.dtype)
    canvas[top:top + new_rows, left:left + new_cols] = resized
    return canvas


def ground_truth_map(saliency_map: np.ndarray | Image.Image, model_size: tuple[int, int],
                     output_size: tuple[int, int]) -> np.ndarray:
    """float32 target in [0, 1] at the output resolution: letterboxed like the image, bilinearly
    resized to ``output_size``, divided by 255."""
    pil = saliency_map if isinstance(saliency_map, Image.Image) else Image.fromarray(
        np.asarray(saliency_map))
    boxed = letterbox(pil.convert("L"), model_size)
    small = Image.fromarray(boxed).resize((output_size[1], output_size[0]), Image.BILINEAR)
    return np.asarray(small, np.float32) / 255.0


def normalize(images, convention: Convention):
    """RGB uint8 (or float 0-255) NHWC → float32 model input. Works on NumPy and JAX arrays.

    ``caffe``: BGR, minus the ImageNet BGR mean, no scaling (the original, Keras/Caffe VGG).
    ``torch``: RGB / 255, minus mean, divided by std (torchvision VGG).
    """
    x = images.astype("float32")
    if convention == "caffe":
        return x[..., ::-1] - np.asarray(CAFFE_MEAN_BGR, np.float32)
    if convention == "torch":
        return (x / 255.0 - np.asarray(TORCH_MEAN_RGB, np.float32)) / np.asarray(
            TORCH_STD_RGB, np.float32)
    raise ValueError(f"preprocessing convention must be one of {CONVENTIONS}, got {convention!r}")


def postprocess(saliency: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
    """Map at model output resolution → map at ``original_size`` in [0, 1].

    As the original: bilinear resize so the map covers the image with its aspect kept, crop the
    centre (undoing the letterbox), divide by the maximum (an all-zero map stays zero).
    """
    saliency = np.asarray(saliency, np.float64)
    if saliency.ndim == 4 and saliency.shape[0] == 1:  # a batch of one: the model's output
        saliency = saliency[0]
    if saliency.ndim == 3 and saliency.shape[-1] == 1:  # (h, w, 1): not squeeze, which would
        saliency = saliency[..., 0]                     # take a map of one row to 1-D
    elif saliency.ndim == 3 and saliency.shape[0] == 1:  # (1, h, w): make_predict_fn's
        saliency = saliency[0]
    if saliency.ndim != 2:
        raise ValueError(f"expected one h×w map (or h×w×1, 1×h×w, 1×h×w×1), got shape "
                         f"{saliency.shape}")
    p_rows, p_cols = saliency.shape
    rows, cols = original_size
    if rows / p_rows > cols / p_cols:
        new_cols = (p_cols * rows) // p_rows
        shape, top, left = (rows, new_cols), 0, (new_cols - cols) // 2
    else:
        new_rows = (p_rows * cols) // p_cols
        shape, top, left = (new_rows, cols), (new_rows - rows) // 2, 0
    # Computed in float64 a band of rows at a time into the float32 map: a 100-megapixel
    # photo's map then needs 0.4 GB, not the 2.4 GB of whole float64 passes.
    out = np.empty((rows, cols), np.float32)
    peak, step = 0.0, max(1, BAND_PIXELS // cols)
    for start in range(0, rows, step):
        band = resize_bilinear(saliency, shape, (top + start, left, min(step, rows - start), cols))
        peak = max(peak, float(band.max()))
        out[start:start + len(band)] = band
    if not peak > 0:
        return np.zeros_like(out)
    out /= np.float32(peak)
    return out
