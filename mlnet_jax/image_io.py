"""Read any image a person may hand to the predictor as RGB uint8, or say in one line why not.

Prediction must not stop on one odd file, and a map must line up with the image as people see
it. So every PIL mode is converted with its real value range (16-bit and float images are
scaled, not clipped), transparency is flattened onto white as on a web page, EXIF orientation
is applied, and files that would decode to more than ``MAX_PIXELS`` pixels (decompression
bombs) are refused before they are decoded.
"""

from __future__ import annotations

import errno
import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mlnet_jax.errors import UserError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".webp", ".tif", ".tiff",
                              ".gif"})
# Default limit on width × height: 150 megapixels (e.g. 15000 × 10000), ~450 MB decoded as RGB.
MAX_PIXELS = 150_000_000


class ImageError(UserError):
    """An input file that cannot be used as an image; the message names the file."""


def is_image_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS, *,
               exif: bool = True) -> np.ndarray:
    """H×W×3 uint8 RGB of the file at ``path`` as displayed (EXIF orientation applied; as
    stored with ``exif=False``, as MATLAB and the saliency benchmarks read images).

    Multi-frame files (animated WebP/GIF, multi-page TIFF) give their first frame.
    Raises ImageError naming the file when it is empty, not an image, truncated or too large.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise ImageError(f"{path}: is a folder, not an image")
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: empty file (0 bytes)")
        with warnings.catch_warnings():
            # Our own limit below is the documented one; Pillow's may be raised by the caller.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageError(_too_large(path, f"{width}×{height} pixels", max_pixels))
                image.load()
                oriented = as_displayed(image) if exif else image
                try:
                    return to_rgb(oriented)
                except (ValueError, OSError) as e:
                    raise ImageError(f"{path}: cannot convert a {oriented.mode} image to RGB ({e})"
                                     ) from None
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        # Pillow's own limit (2 × Image.MAX_IMAGE_PIXELS) struck before ours.
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found.group(1)):,} pixels" if found else "the image size"
        limit = min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or max_pixels))
        raise ImageError(_too_large(path, size, limit)) from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file Pillow can read") from None
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageError(f"{path}: a loop of symbolic links") from None
        if e.errno is not None and e.filename is not None:  # the file system's, not the data's
            raise ImageError(f"{path}: cannot read it ({e.strerror})") from None
        raise ImageError(f"{path}: corrupt or truncated image ({e or type(e).__name__})") from None
    except (SyntaxError, ValueError, EOFError, MemoryError, TypeError, KeyError,
            IndexError, AttributeError, ZeroDivisionError) as e:
        # Pillow's decoders raise a variety of types on corrupt data.
        reason = str(e) or type(e).__name__
        raise ImageError(f"{path}: corrupt or truncated image ({reason})") from None


def _too_large(path: Path, size: str, limit: int) -> str:
    return (f"{path}: {size} is over the limit of {limit:,} pixels (a decompression bomb?); "
            "raise it if the file is trusted (--max-pixels; max_pixels= in Python)")


def as_displayed(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says; a broken EXIF block is ignored (the
    pixels are still fine, and a viewer would show them unturned too)."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 — malformed EXIF comes in many shapes
        return image


def to_rgb(image: Image.Image) -> np.ndarray:
    """H×W×3 uint8 RGB from a PIL image of any mode.

    16-bit and 32-bit integer images are scaled down from their range (Pillow's own
    ``convert('RGB')`` clips them to white); float images are taken as 0–1 when their maximum
    is at most 1, else as 0–255. Alpha is composited onto white.
    """
    mode = image.mode
    if mode in ("L", "RGB") and "transparency" in image.info:  # a PNG colour key
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGB",):
        return np.asarray(image, np.uint8).copy()
    if mode.startswith("I") or mode == "F":
        return _grey_to_rgb(wide_to_uint8(np.asarray(image), mode))
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = np.asarray(image.convert("RGBA"), np.float32)
        alpha = rgba[..., 3:4] / 255.0
        flat = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
        return np.clip(np.round(flat), 0, 255).astype(np.uint8)
    if image.mode == "RGB":
        return np.asarray(image, np.uint8).copy()
    return np.asarray(image.convert("RGB"), np.uint8).copy()


def wide_to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """16/32-bit integer or float grey levels → uint8 by their nominal range."""
    array = np.asarray(array)
    if mode == "F" or array.dtype.kind == "f":
        values = np.nan_to_num(array.astype(np.float64))
        peak = float(values.max()) if values.size else 0.0
        scale = 255.0 if peak <= 1.0 else 1.0
        return np.clip(np.round(values * scale), 0, 255).astype(np.uint8)
    values = array.astype(np.int64)
    if mode.startswith("I;16"):
        top = 65535
    else:  # mode "I": 32-bit; PNG/TIFF 16-bit data also arrive this way in some Pillow versions
        peak = int(values.max()) if values.size else 0
        top = 255 if peak <= 255 else 65535 if peak <= 65535 else peak
    values = np.clip(values, 0, top)
    return np.round(values * (255.0 / top)).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1))
