"""The converted-weights file: one ``.npz`` holding Flax parameters and their metadata.

Keys are '/'-joined parameter paths (``backbone/conv1_1/kernel``); ``__metadata__`` holds a
JSON string with the source, the preprocessing convention and the pooling alignment, and for a
full ML-Net model the input size and whether it has the prior. NumPy reads it without pickle.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any

import numpy as np

from mlnet_jax.atomic import atomic_path
from mlnet_jax.errors import WeightsError
from mlnet_jax.vgg import VGG16_CONVS

FORMAT = "mlnet_jax.weights"
FORMAT_VERSION = 1
_METADATA_KEY = "__metadata__"


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, path + "/"))
        else:
            flat[path] = np.asarray(value)
    return flat


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def save_weights(path: str | os.PathLike, params: dict, metadata: dict[str, Any]) -> None:
    """Write ``params`` (nested dict of arrays) and ``metadata`` atomically to ``path``."""
    metadata = {"format": FORMAT, "version": FORMAT_VERSION, **metadata}
    arrays = {k: v.astype(np.float32) for k, v in flatten(params).items()}
    arrays[_METADATA_KEY] = np.asarray(json.dumps(metadata, sort_keys=True))
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
    except OSError as e:
        raise WeightsError(f"{path}: cannot write the weights file ({e.strerror or e})") from None


def read_weights(path: str | os.PathLike) -> tuple[dict, dict[str, Any]]:
    """(params, metadata) from a file written by :func:`save_weights`."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head and not head.startswith(b"PK"):  # not a zip, so not an .npz of ours
            raise WeightsError(
                f"{path}: not a converted mlnet_jax weights file; convert it first with python -m "
                "mlnet_jax.convert_weights SRC DST.npz (--format mlnet-keras1 for the authors' "
                "released ML-Net)")
        with np.load(path, allow_pickle=False) as data:
            if _METADATA_KEY not in data.files:
                raise WeightsError(f"{path}: not an mlnet_jax weights file (no {_METADATA_KEY}); "
                                   "convert it first with python -m mlnet_jax.convert_weights")
            metadata = json.loads(str(data[_METADATA_KEY]))
            flat = {k: data[k] for k in data.files if k != _METADATA_KEY}
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise WeightsError(f"{path}: not a readable mlnet_jax weights file ({e})") from None
    if metadata.get("format") != FORMAT:
        raise WeightsError(f"{path}: metadata format is {metadata.get('format')!r}, expected {FORMAT!r}")
    return unflatten(flat), metadata


def check_param_shapes(expected: dict, got: dict, where: str, *,
                       needs: str = "expected", hint: str = "") -> None:
    """One-line WeightsError naming the first parameter of ``expected`` (arrays or
    ShapeDtypeStructs) that ``got`` lacks or holds with another shape."""
    from flax import traverse_util

    got_flat = traverse_util.flatten_dict(got, sep="/")
    for name, spec in traverse_util.flatten_dict(expected, sep="/").items():
        shape = tuple(spec.shape)
        if name not in got_flat:
            raise WeightsError(f"{where}: missing parameter {name} (expected shape {shape})")
        got_shape = tuple(np.shape(got_flat[name]))
        if got_shape != shape:
            raise WeightsError(f"{where}: parameter {name} has shape {got_shape}, "
                               f"{needs} {shape}{hint}")


def check_vgg16_params(backbone: dict, where: str) -> None:
    """Raise a one-line WeightsError unless ``backbone`` holds the 13 convs with VGG-16 shapes."""
    in_channels = 3
    for name, out_channels in VGG16_CONVS:
        expected = {"kernel": (3, 3, in_channels, out_channels), "bias": (out_channels,)}
        for leaf, shape in expected.items():
            value = backbone.get(name, {}).get(leaf)
            if value is None:
                raise WeightsError(f"{where}: missing key backbone/{name}/{leaf} (expected shape {shape})")
            if tuple(value.shape) != shape:
                raise WeightsError(f"{where}: backbone/{name}/{leaf} has shape {tuple(value.shape)}, "
                                   f"expected {shape}")
        in_channels = out_channels


def check_finite(params: dict, where: str) -> None:
    """A NaN or Inf weight makes every map blank (or NaN): refused, naming the parameter."""
    for name, value in flatten(params).items():
        bad = int(value.size - np.isfinite(value).sum())
        if bad:
            raise WeightsError(f"{where}: parameter {name} has {bad} values that are not finite "
                               "(NaN or Inf); a model with them predicts blank maps")


def is_weights_archive(names: list[str]) -> bool:
    """Whether an ``.npz`` archive's member names are those of a file ``save_weights`` wrote."""
    return f"{_METADATA_KEY}.npy" in names


def load_vgg16(path: str | os.PathLike) -> dict:
    """Variables for ``VGG16().apply`` from a converted file (VGG-16 or full ML-Net)."""
    params, _ = read_weights(path)
    if "backbone" not in params:
        raise WeightsError(f"{path}: holds no 'backbone' parameters")
    check_vgg16_params(params["backbone"], str(path))
    return {"params": params["backbone"]}
