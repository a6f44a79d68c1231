"""Prediction core: load a model, a jit-compiled batch predictor, and a friendly wrapper.

One compilation serves images of every size: images are letterboxed on the host to the
model's input size, batches are padded to a fixed batch size, and maps are resized back to
each image's original size on the host (SPEC §1, test time).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mlnet_jax.compute_dtype import check_backend_computes
from mlnet_jax.errors import WeightsError
from mlnet_jax.image_io import MAX_PIXELS, as_displayed, load_image, to_rgb, wide_to_uint8
from mlnet_jax.models import MLNet
from mlnet_jax.preprocessing import letterbox, normalize, postprocess
from mlnet_jax.sharding import batch_sharding, data_mesh, replicated
from mlnet_jax.weights_file import check_param_shapes, read_weights

T = TypeVar("T")
BYTES_ADVICE = ("got bytes: pass a file path, or PIL.Image.open(io.BytesIO(data)) for an encoded "
                "image's bytes")


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a saved model expects: input size (rows, cols), preprocessing and architecture."""

    input_size: tuple[int, int] = (480, 640)
    preprocessing: str = "caffe"
    pooling: str = "standard"
    prior: bool = True
    source: str = ""
    width_multiplier: float = 1.0

    @classmethod
    def from_metadata(cls, metadata: dict) -> "ModelInfo":
        return cls(input_size=tuple(metadata.get("input_size", (480, 640))),
                   preprocessing=metadata["preprocessing"], pooling=metadata["pooling"],
                   prior=bool(metadata.get("prior", True)), source=metadata.get("source", ""),
                   width_multiplier=float(metadata.get("width_multiplier", 1.0)))

    def to_metadata(self) -> dict:
        return {"model": "mlnet", **dataclasses.asdict(self), "input_size": list(self.input_size)}

    def build(self, dtype=jnp.float32, first_conv: str = "auto") -> MLNet:
        """The model; ``first_conv`` says where conv1_1 runs (``mlnet_jax.first_conv``)."""
        return MLNet(prior=self.prior, pooling=self.pooling, dtype=dtype,
                     width_multiplier=self.width_multiplier, first_conv=first_conv)


def load_model(path: str | os.PathLike, dtype=jnp.float32,
               first_conv: str = "auto") -> tuple[MLNet, dict, ModelInfo]:
    """(model, variables, info) from a converted full-model ``.npz`` or an Orbax checkpoint.

    ``path`` may be a training workdir (its best, else latest, checkpoint), one checkpoint
    directory, or the output of ``convert_weights`` for a full ML-Net. ``dtype`` bfloat16 is
    refused on a CPU backend that computes it wrongly (``compute_dtype``). ``first_conv``:
    ``MLNet.first_conv``.
    """
    check_backend_computes(dtype)
    path = Path(path)
    if path.is_dir():
        from mlnet_jax.checkpointing import restore_for_inference  # Orbax only when needed
        params, metadata = restore_for_inference(path)
    elif path.is_file():
        params, metadata = read_weights(path)
        if metadata.get("model") != "mlnet":
            raise WeightsError(f"{path}: holds {metadata.get('model', 'unknown')} weights, not a "
                               "full ML-Net; train a model (config.init_weights) to predict with it")
    else:
        raise WeightsError(f"{path}: no such file or directory")
    info = ModelInfo.from_metadata(metadata)
    model = info.build(dtype, first_conv)
    variables = {"params": jax.tree.map(jnp.asarray, params)}
    rows, cols = info.input_size
    expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, rows, cols, 3)))
    check_param_shapes(expected["params"], variables["params"], str(path))
    return model, variables, info


def make_predict_fn(model: MLNet, preprocessing: str, mesh=None) -> "BatchPredictFn":
    """jit-compiled ``fn(variables, images) -> maps (B, h/8, w/8)`` in float32.

    ``images`` are letterboxed NHWC RGB uint8 (normalised on the device with ``preprocessing``)
    or already-normalised float32. The batch is split over all devices of ``mesh``; any batch
    size works (padded to a multiple of the device count), as does an array on one device.
    """
    mesh = data_mesh() if mesh is None else mesh

    def predict(variables, images):
        if images.dtype == jnp.uint8:
            images = normalize(images, preprocessing)
        return model.apply(variables, images, train=False)[..., 0]

    return BatchPredictFn(jax.jit(predict, in_shardings=(replicated(mesh), batch_sharding(mesh)),
                                  out_shardings=batch_sharding(mesh)), mesh)


class BatchPredictFn:
    """:func:`make_predict_fn`'s function. ``jitted`` is the compiled function itself, which
    takes only batches that divide over the mesh and arrays placed on it (``lower`` is its)."""

    def __init__(self, jitted, mesh):
        self.jitted, self.mesh = jitted, mesh
        self._data = batch_sharding(mesh)

    def __call__(self, variables, images):
        n = images.shape[0]
        pad = -n % self.mesh.size
        if pad and isinstance(images, jax.core.Tracer):  # inside an outer jit
            images = jnp.concatenate([images, jnp.zeros((pad,) + images.shape[1:],
                                                        images.dtype)])
        elif pad:  # rare (a batch the devices do not divide): done on the host
            images = _padded(np.asarray(images), n + pad)
        elif _committed(images) and not images.sharding.is_equivalent_to(self._data,
                                                                           images.ndim):
            images = jax.device_put(images, self._data)  # e.g. placed on one device
        maps = self.jitted(variables, images)
        return maps[:n] if pad else maps

    def lower(self, *args, **kwargs):
        return self.jitted.lower(*args, **kwargs)


def _committed(images) -> bool:
    """Whether ``images`` is a JAX array placed on given devices (a tracer has no placement)."""
    if not isinstance(images, jax.Array):
        return False
    try:
        return bool(images.committed)
    except jax.errors.ConcretizationTypeError:  # traced (jax.make_jaxpr, an outer jit)
        return False


def to_rgb_array(image, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """uint8 H×W×3 RGB from a file path, a PIL image or an array (NumPy, JAX or anything
    ``np.asarray`` takes: greyscale, RGB or RGBA).

    Paths are read by :func:`mlnet_jax.image_io.load_image`, as the command reads files; PIL
    images are turned as their EXIF orientation says, then go through
    :func:`mlnet_jax.image_io.to_rgb` (16-bit scaled, not clipped; transparency on white).
    Arrays: uint16 is scaled from 0–65535, other integers as a 16-bit PIL image is (0–255 if
    they fit, else 0–65535; negative or larger values are refused); floats are 0–1 when their
    maximum is at most 1, else 0–255 (values outside 0–255 are refused, not clipped); RGBA is
    put on white. ``max_pixels`` bounds a file's size, as ``load_image``'s.
    """
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, max_pixels)
    if isinstance(image, (bytes, bytearray, memoryview)):
        raise TypeError(BYTES_ADVICE)
    if isinstance(image, Image.Image):
        return to_rgb(as_displayed(image))
    array = np.asarray(image)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        raise ValueError(f"expected an H×W, H×W×3 or H×W×4 image, got shape {array.shape}")
    if 0 in array.shape[:2]:
        raise ValueError(f"empty image: shape {array.shape}")
    if array.dtype.kind not in "biuf":
        raise ValueError(f"expected an image of numbers, got an array of dtype {array.dtype}")
    if array.dtype.kind in "iu" and array.dtype != np.uint8:
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 65535:
            raise ValueError(f"image values run from {low} to {high}; integer images are "
                             "expected in 0–255 or 0–65535 (values outside are refused, not "
                             "clipped)")
        array = wide_to_uint8(array, "I;16" if array.dtype == np.uint16 else "I")
    elif array.dtype != np.uint8:
        if not np.isfinite(array).all():
            raise ValueError("image array contains NaN or Inf values; expected finite pixel values")
        low, high = float(array.min()), float(array.max())
        if low < 0 or high > 255:
            raise ValueError(f"image values run from {low:g} to {high:g}; expected 0–1 or 0–255 "
                             "(undo any normalisation first: the model normalises itself)")
        scale = 255.0 if high <= 1.0 else 1.0
        array = np.clip(np.round(array.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == 4:
        return to_rgb(Image.fromarray(array, "RGBA"))
    return np.ascontiguousarray(np.broadcast_to(array, array.shape[:2] + (3,)))


class Predictor:
    """Load once, call many times: ``Predictor.load(dir)(images) -> list of maps``.

    Maps are float32 in [0, 1] at each image's original size. Batches are padded to
    ``batch_size`` so one compilation serves every image size; a call with fewer images than
    that pads to the next power of two instead (one image costs one image's compute, not a
    batch's: 0.8 s against 7.6 s on a 2-core CPU at 480×640), compiling once per such size,
    unless ``whole_batches`` (the command sets it for a run of several inputs: one
    compilation for the run). Files larger than ``max_pixels`` are refused (decompression
    bombs), as the command's ``--max-pixels`` does.
    """

    def __init__(self, model: MLNet, variables: dict, info: ModelInfo, batch_size: int = 8,
                 mesh=None, max_pixels: int = MAX_PIXELS):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        mesh = data_mesh() if mesh is None else mesh
        if model.first_conv == "auto" and any(d.platform != "gpu" for d in mesh.devices.flat):
            model = model.clone(first_conv="xla")  # the GPU kernel cannot run off the GPU
        self.info, self.max_pixels = info, max_pixels
        self.batch_size = -(-batch_size // mesh.size) * mesh.size
        self._devices = mesh.size
        self.whole_batches = False
        self._variables = jax.device_put(variables, replicated(mesh))
        self._predict = make_predict_fn(model, info.preprocessing, mesh)

    @classmethod
    def load(cls, path: str | os.PathLike, batch_size: int = 8, dtype=jnp.float32,
             max_pixels: int = MAX_PIXELS, first_conv: str = "auto") -> "Predictor":
        model, variables, info = load_model(path, dtype, first_conv)
        return cls(model, variables, info, batch_size, max_pixels=max_pixels)

    @property
    def num_compilations(self) -> int:
        """How many times the batch function was compiled: 1 after any number of image sizes,
        plus one for each smaller power of two that calls with fewer images padded to."""
        return self._predict.jitted._cache_size()

    def padded_size(self, n: int) -> int:
        """The batch ``n`` images are computed as when they are all there is: a power of two
        per device, at most ``batch_size``."""
        per_device = -(-n // self._devices)
        return min(self.batch_size, self._devices << max(per_device - 1, 0).bit_length())

    def predict_letterboxed(self, batch: np.ndarray) -> np.ndarray:
        """Raw maps (n, h/8, w/8) for n ≤ batch_size letterboxed uint8 images."""
        return np.asarray(self.dispatch_letterboxed(batch))[:len(batch)]

    def dispatch_letterboxed(self, batch: np.ndarray) -> jax.Array:
        """Start the maps of n ≤ batch_size letterboxed uint8 images on the device and return
        at once: (padded_size(n), h/8, w/8), the first n rows theirs."""
        batch = np.asarray(batch)
        if batch.dtype != np.uint8:  # copied into uint8, a 0–1 float batch would be black
            raise TypeError(f"letterboxed batches are uint8 (letterbox() makes them), got "
                            f"{batch.dtype}")
        return self._predict(self._variables, _padded(batch, self.padded_size(len(batch))))

    def stream(self, items: Iterable[T], letterboxed: Callable[[T], np.ndarray]
               ) -> Iterator[tuple[T, np.ndarray]]:
        """(item, raw map) for every item, in order, in batches of ``batch_size``. Each batch is
        dispatched before the previous one's maps are fetched, so the device computes while
        the caller gathers (decodes, letterboxes) the next batch. The last batch is padded to
        ``batch_size`` (no second compilation), unless it is the only one and not
        ``whole_batches`` (then :meth:`padded_size`)."""
        pending = None  # (items, maps still on the device)
        iterator, error = iter(items), None
        while error is None:
            chunk = []
            try:  # an item that cannot be made ends the stream after the ones before it
                chunk.extend(itertools.islice(iterator, self.batch_size))
            except Exception as e:  # noqa: BLE001 — raised again once they are out
                error = e
            if not chunk:
                break
            batch = np.stack([letterboxed(i) for i in chunk])
            if pending is not None or self.whole_batches:  # the program compiled for the run
                batch = _padded(batch, self.batch_size)
            started = chunk, self.dispatch_letterboxed(batch)
            if pending is not None:
                yield from _fetched(*pending)
            pending = started
        if pending is not None:
            yield from _fetched(*pending)
        if error is not None:
            raise error

    def __call__(self, images: Sequence | np.ndarray | Image.Image) -> list[np.ndarray] | np.ndarray:
        """Maps at original size: one image (a file path, PIL, H×W or H×W×C array) → one map;
        a list or an N×H×W×C array (NumPy, JAX, anything ``np.asarray`` takes) → a list."""
        if isinstance(images, (Image.Image, str, os.PathLike)):
            single, items = True, [images]
        elif isinstance(images, (bytes, bytearray, memoryview)):  # else 1 image per byte
            raise TypeError(BYTES_ADVICE)
        elif isinstance(images, (dict, set, frozenset)) or not (
                hasattr(images, "__array__") or isinstance(images, Iterable)):
            raise TypeError(f"got an object of type {type(images).__name__}: pass an image (a "
                            "file path, a PIL image, an array), a list of them (in order) or an "
                            "N×H×W×C array")
        elif isinstance(images, (list, tuple)) or not hasattr(images, "__array__"):
            single, items = False, list(images)
        else:
            array = np.asarray(images)
            if array.ndim > 4:
                raise ValueError(f"expected an image or an N×H×W×C batch, got shape {array.shape}")
            single = array.ndim <= 3
            items = [array] if single else list(array)
        maps = list(self.iter_maps(items))
        return maps[0] if single else maps

    def iter_maps(self, images: Iterable) -> Iterator[np.ndarray]:
        """Stream maps for an iterable of images, batch by batch. An image that cannot be
        read raises after the maps of the images before it (its index in the message)."""
        size = self.info.input_size
        for image, raw in self.stream((self._rgb(i, index) for index, i in enumerate(images)),
                                      lambda image: letterbox(image, size)):
            yield postprocess(raw, image.shape[:2])

    def _rgb(self, image, index: int) -> np.ndarray:
        try:
            return to_rgb_array(image, self.max_pixels)
        except (ValueError, TypeError) as e:  # an array's problem (a file's names the file)
            raise type(e)(f"image {index}: {e}") from None


def _padded(batch: np.ndarray, size: int) -> np.ndarray:
    """``batch`` followed by zero images up to ``size`` (itself when it has that many)."""
    if len(batch) == size:
        return batch
    padded = np.zeros((size,) + batch.shape[1:], batch.dtype)
    padded[:len(batch)] = batch
    return padded


def _fetched(items: list[T], maps: jax.Array) -> Iterator[tuple[T, np.ndarray]]:
    """(item, its raw map), waiting for the device once."""
    return zip(items, np.asarray(maps)[:len(items)])
