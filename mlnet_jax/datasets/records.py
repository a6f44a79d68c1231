"""One dataset record from its files: checked image bytes, a grey PNG map, 0-based fixations.

Record schema (what the builders store and :mod:`mlnet_jax.input_pipeline` reads):
``image`` encoded JPEG/PNG bytes as distributed (other formats are re-encoded as PNG);
``image_size`` int32 (rows, cols); ``saliency_map`` PNG bytes of the uint8 grey map at the
image size (empty for splits without maps); ``fixations`` int32 (N, 2) of 0-based (row, col),
each fixated pixel once; ``file_name`` str; ``category`` str ('' when none).

Conversions: 1-based (x, y) → (row, col) = (round(y) − 1, round(x) − 1); points outside the
image are dropped with a warning. Binary fixation images (MIT1003 ``_fixPts``, which JPEG
compression blurs) count a pixel as fixated when its grey value is > 127 — the midpoint, which
keeps the centre of each compressed dot and drops its ringing.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mlnet_jax.datasets.layouts import Item
from mlnet_jax.errors import UserError
from mlnet_jax.image_io import to_rgb

log = logging.getLogger("mlnet_jax.datasets")

BINARY_THRESHOLD = 127
_KEPT_FORMATS = ("JPEG", "PNG")


def _open(path: Path, what: str) -> tuple[bytes, Image.Image]:
    """(raw bytes, fully decoded PIL image); truncated or corrupt files name themselves."""
    try:
        data = path.read_bytes()
        if not data:
            raise UserError(f"cannot read {what} {path}: empty file (0 bytes)")
        pil = Image.open(io.BytesIO(data))
        pil.load()
    except UnidentifiedImageError:
        raise UserError(f"cannot read {what} {path}: not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read {what} {path}: {e}") from None
    return data, pil


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def read_image(path: Path) -> tuple[bytes, tuple[int, int]]:
    """Encoded image bytes (kept as distributed when JPEG/PNG) and (rows, cols).

    The stored pixel grid is the one maps and fixations refer to: eye-tracking software
    (MATLAB, Psychtoolbox) shows images without applying EXIF orientation, so a turned image
    is kept as stored, and said so.
    """
    data, pil = _open(path, "image")
    orientation = _exif_orientation(pil)
    if orientation not in (None, 1):
        log.warning("%s: EXIF orientation %s ignored: the image, its map and its fixations are "
                    "taken as stored (%dx%d), as eye trackers show them", path, orientation,
                    pil.height, pil.width)
    if pil.format not in _KEPT_FORMATS:
        data = encode_png(to_rgb(pil))  # as prediction reads it: 16-bit scaled, alpha on white
    return data, (pil.height, pil.width)


def _exif_orientation(pil: Image.Image):
    try:
        return pil.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 — a malformed EXIF block is no orientation
        return None


#: Mean difference between colour channels (levels) above which a map is not grey: JPEG's
#: chroma noise on a grey map stays near 1; a colormap rendering (jet) is tens.
COLOUR_LEVELS = 8


def grey_map(pil: Image.Image, path: Path) -> np.ndarray:
    """uint8 grey map; 16-bit and float maps are scaled by their maximum, grey stored as RGB
    → its grey. A map in colour (a heatmap rendering) is refused: its luma is not saliency."""
    if pil.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(pil, np.float64)
        finite = np.isfinite(values)
        if not finite.all():  # NaN made the peak NaN, and the whole map zero
            log.warning("%s: %d map pixels are not finite numbers (NaN or Inf); taken as 0",
                        path, int((~finite).sum()))
            values = np.where(finite, values, 0.0)
        peak = values.max()
        return (np.clip(values / peak, 0, 1) * 255 + 0.5).astype(np.uint8) if peak > 0 else \
            np.zeros(values.shape, np.uint8)
    if pil.mode not in ("1", "L", "LA", "La"):
        rgb = np.asarray(pil.convert("RGB"), np.int16)
        spread = np.abs(np.diff(rgb, axis=-1)).mean()
        if spread > COLOUR_LEVELS:
            raise UserError(f"{path}: map is in colour (its channels differ by {spread:.0f} "
                            "levels on average; a heatmap rendering?); expected grey levels")
    return np.asarray(pil.convert("L"))


def read_map(path: Path, image_size: tuple[int, int]) -> bytes:
    """PNG bytes of the grey map at ``image_size`` (resized with a warning when it differs)."""
    data, pil = _open(path, "saliency map")
    grey = grey_map(pil, path)
    changed = pil.format != "PNG" or pil.mode != "L"
    if grey.shape != tuple(image_size):
        log.warning("%s: map is %dx%d but its image is %dx%d; resized (bilinear) to the image",
                    path, grey.shape[0], grey.shape[1], image_size[0], image_size[1])
        grey = np.asarray(Image.fromarray(grey).resize(
            (image_size[1], image_size[0]), Image.BILINEAR))
        changed = True
    if not grey.any():
        log.warning("%s: map is all zero; kept (it trains towards a blank map)", path)
    return encode_png(grey) if changed else data


def _numbers(values, path: Path, what: str) -> np.ndarray:
    """``values`` as float64, or a UserError naming the file (a cell array, text, complex)."""
    if np.iscomplexobj(values):
        raise UserError(f"{path}: {what} must be real numbers (1-based (x, y)), not complex")
    try:
        return np.asarray(values, np.float64)
    except (ValueError, TypeError):
        kind = np.asarray(values, dtype=object).dtype.kind if not isinstance(
            values, np.ndarray) else values.dtype.kind
        found = "text" if kind in "US" else "a cell array or mixed values"
        raise UserError(f"{path}: {what} must be a numeric N×2 array of 1-based (x, y), not "
                        f"{found}") from None


def xy1_to_rc0(points: np.ndarray, image_size: tuple[int, int], path: Path) -> np.ndarray:
    """1-based (x, y) points → unique 0-based (row, col) int32 inside the image."""
    points = _numbers(points, path, "fixations")
    if points.size == 0:
        return np.zeros((0, 2), np.int32)
    if points.ndim != 2 or points.shape[1] != 2:
        raise UserError(f"{path}: fixations must be an N×2 array of (x, y), got shape "
                        f"{points.shape}")
    finite = np.isfinite(points).all(axis=1)
    if not finite.all():
        log.warning("%s: %d fixations that are not finite numbers dropped", path,
                    int((~finite).sum()))
    points = points[finite]
    rc = np.rint(points[:, ::-1]).astype(np.int64) - 1
    return _inside(rc, image_size, path)


def _inside(rc: np.ndarray, image_size: tuple[int, int], path: Path) -> np.ndarray:
    rows, cols = image_size
    keep = (rc[:, 0] >= 0) & (rc[:, 0] < rows) & (rc[:, 1] >= 0) & (rc[:, 1] < cols)
    if not keep.all():
        log.warning("%s: %d fixations outside the %dx%d image dropped", path,
                    int((~keep).sum()), rows, cols)
    rc = rc[keep]
    if len(rc) == 0:
        return np.zeros((0, 2), np.int32)
    return np.unique(rc, axis=0).astype(np.int32)


def binary_to_rc0(mask: np.ndarray, image_size: tuple[int, int], path: Path) -> np.ndarray:
    """Fixated pixels of a binary map as (row, col); a map of another size is rescaled."""
    rc = np.argwhere(mask).astype(np.int64)
    if mask.shape != tuple(image_size):
        _check_same_aspect(mask.shape, image_size, path, "fixation map is")
        log.warning("%s: fixation map is %dx%d but its image is %dx%d; coordinates rescaled",
                    path, mask.shape[0], mask.shape[1], image_size[0], image_size[1])
        scale = np.asarray(image_size, np.float64) / np.asarray(mask.shape, np.float64)
        rc = np.floor((rc + 0.5) * scale).astype(np.int64)
    return _inside(rc, image_size, path)


def _check_same_aspect(size: tuple, image_size: tuple[int, int], path: Path, what: str) -> None:
    """Fixations of another size are rescaled only if that size is a resized copy's (within a
    pixel's rounding either way); another aspect ratio (a transposed matrix, another image's
    file) would put every point in the wrong place."""
    (rows, cols), (image_rows, image_cols) = size, image_size
    if abs(rows * image_cols - cols * image_rows) > 0.5 * max(rows + cols, image_rows + image_cols):
        raise UserError(f"{path}: {what} {rows:g}x{cols:g} but its image is {image_rows}x"
                        f"{image_cols}, another aspect ratio: not this image's fixations "
                        f"(transposed?)")


def _loadmat(path: Path) -> dict:
    import scipy.io  # noqa: PLC0415 — only preparation needs it

    try:
        return scipy.io.loadmat(str(path))
    except NotImplementedError as e:  # MATLAB v7.3 (HDF5) files
        raise UserError(f"cannot read fixations {path}: {e} (save it as a v7 .mat)") from None
    except Exception as e:  # noqa: BLE001 — scipy: MatReadError (empty), IndexError (cut)…
        raise UserError(f"cannot read fixations {path}: {str(e) or type(e).__name__}") from None


def gaze_points(mat: dict, path: Path) -> np.ndarray:
    """The union of every observer's ``gaze(i).fixations`` (1-based (x, y)) of a SALICON .mat."""
    if "gaze" not in mat:
        raise UserError(f"{path}: missing field 'gaze' (expected a SALICON fixations .mat "
                        f"with gaze(i).fixations)")
    gaze = np.asarray(mat["gaze"])
    names = gaze.dtype.names or ()
    if "fixations" not in names:
        raise UserError(f"{path}: missing field 'gaze.fixations' (gaze has fields: "
                        f"{', '.join(names) or 'none'})")
    chunks = []
    for observer in gaze.flat:
        points = _numbers(observer["fixations"], path, "gaze.fixations")
        if points.size == 0:
            continue
        if points.ndim != 2 or points.shape[1] != 2:
            raise UserError(f"{path}: gaze.fixations must be N×2 (x, y), got shape "
                            f"{points.shape}")
        chunks.append(points)
    return np.concatenate(chunks) if chunks else np.zeros((0, 2))


def at_image_size(points: np.ndarray, mat: dict, image_size: tuple[int, int],
                  path: Path) -> np.ndarray:
    """SALICON's 1-based (x, y) rescaled from the ``resolution`` (rows, cols) they were
    recorded at to the image's size, if the image is a resized copy (not clipped to it)."""
    try:
        resolution = np.asarray(mat.get("resolution", ()), np.float64).ravel()
    except (ValueError, TypeError):
        raise UserError(f"{path}: 'resolution' must be the numbers (rows, cols) the fixations "
                        "were recorded at, not text or a cell array") from None
    if (resolution.size != 2 or not np.isfinite(resolution).all() or (resolution <= 0).any()
            or tuple(resolution) == tuple(image_size) or points.size == 0):
        return points
    _check_same_aspect(tuple(resolution), image_size, path, "fixations were recorded at")
    log.warning("%s: fixations recorded at %dx%d, its image is %dx%d; coordinates rescaled",
                path, resolution[0], resolution[1], image_size[0], image_size[1])
    scale_xy = np.asarray(image_size[::-1], np.float64) / resolution[::-1]
    return (np.asarray(points, np.float64) - 0.5) * scale_xy + 0.5  # pixel k spans k ± 0.5


def read_fixations(item: Item, image_size: tuple[int, int]) -> np.ndarray:
    """0-based (row, col) int32 fixations of ``item`` in the format its layout names."""
    if item.fixations is None:
        return np.zeros((0, 2), np.int32)
    points = _read_fixations(item.fixations, item.fixation_format, image_size)
    if not len(points):
        log.warning("%s: no fixations; kept (this image's NSS and AUCs are NaN, left out of "
                    "their means)", item.fixations)
    return points


def _read_fixations(path: Path, fmt: str, image_size: tuple[int, int]) -> np.ndarray:
    if fmt == "gaze_mat":
        mat = _loadmat(path)
        return xy1_to_rc0(at_image_size(gaze_points(mat, path), mat, image_size, path),
                          image_size, path)
    if fmt == "points_mat":
        mat = _loadmat(path)
        if "fixations" in mat:
            return xy1_to_rc0(mat["fixations"], image_size, path)
        if "gaze" in mat:
            return xy1_to_rc0(at_image_size(gaze_points(mat, path), mat, image_size, path),
                              image_size, path)
        raise UserError(f"{path}: missing variable 'fixations' (an N×2 array of 1-based (x, y))")
    if fmt == "fixlocs_mat":
        mat = _loadmat(path)
        variables = [k for k in mat if not k.startswith("__")]
        name = "fixLocs" if "fixLocs" in mat else (variables[0] if len(variables) == 1 else None)
        if name is None:
            raise UserError(f"{path}: missing variable 'fixLocs' (a binary matrix of the image "
                            f"size); found: {', '.join(variables) or 'none'}")
        locs = mat[name].toarray() if hasattr(mat[name], "toarray") else np.asarray(mat[name])
        if locs.dtype.kind not in "biuf":  # (a MATLAB sparse matrix is read as scipy's)
            raise UserError(f"{path}: '{name}' must be a 2-D binary matrix, not "
                            f"{'text' if locs.dtype.kind in 'US' else 'a struct or cell array'}")
        if locs.ndim != 2:
            raise UserError(f"{path}: '{name}' must be a 2-D binary matrix, got shape "
                            f"{locs.shape}")
        return binary_to_rc0(locs > 0, image_size, path)
    if fmt == "binary_image":
        _, pil = _open(path, "fixation map")
        return binary_to_rc0(grey_map(pil, path) > BINARY_THRESHOLD, image_size, path)
    raise ValueError(f"unknown fixation format {fmt!r}")


def make_record(item: Item) -> dict:
    """The stored example of ``item`` (see the module docstring for the schema)."""
    image, size = read_image(item.image)
    return {
        "image": image,
        "image_size": np.asarray(size, np.int32),
        "saliency_map": read_map(item.saliency_map, size) if item.saliency_map else b"",
        "fixations": read_fixations(item, size),
        "file_name": item.file_name,
        "category": item.category,
    }
