"""Readers for the VGG-16 / ML-Net weight files users have, into mlnet_jax's parameter tree.

Each reader returns ``(params, metadata)`` where params is ``{'backbone': {conv1_1: {kernel,
bias}, …}}`` (plus ``head`` and ``prior`` for a full ML-Net) with HWIO kernels, and metadata
names the source, the preprocessing convention the weights expect and the pooling alignment.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np

from mlnet_jax.errors import WeightsError
from mlnet_jax.vgg import VGG16_CONVS, VGG16_CONV_NAMES
from mlnet_jax.weights_file import is_weights_archive

FORMATS = ("torchvision", "safetensors", "keras", "keras1", "mlnet-keras1")
# Indices of the convolutions in torchvision's ``vgg16().features``.
TORCHVISION_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
# Layer ids of the convolutions in the Keras-0/1 Sequential VGG-16 file the original loads.
KERAS1_VGG_LAYER_IDS = (1, 3, 6, 8, 11, 13, 15, 18, 20, 22, 25, 27, 29)
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _vgg_shapes(layout: str) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Expected (kernel, bias) shapes per conv in a source layout: 'oihw' or 'hwio'."""
    shapes, cin = [], 3
    for _, cout in VGG16_CONVS:
        kernel = (cout, cin, 3, 3) if layout == "oihw" else (3, 3, cin, cout)
        shapes.append((kernel, (cout,)))
        cin = cout
    return shapes


def _check_shape(where: str, key: str, array: np.ndarray, expected: tuple[int, ...]) -> None:
    """Shape and floating-point values of one array read from an HDF5 file."""
    if tuple(array.shape) != tuple(expected):
        raise WeightsError(f"{where}: {key} has shape {tuple(array.shape)}, expected {tuple(expected)}")
    _check_floating(where, key, array)


def _check_floating(where: str, key: str, array: np.ndarray) -> None:
    if array.dtype.kind != "f":
        raise WeightsError(f"{where}: {key} holds {array.dtype} values, expected floating-point "
                           "weights")


def _oihw_to_hwio(kernel: np.ndarray, flip: bool = False) -> np.ndarray:
    """PyTorch/Theano OIHW → Flax HWIO; ``flip`` undoes Theano's true convolution."""
    if flip:
        kernel = kernel[:, :, ::-1, ::-1]
    return np.ascontiguousarray(np.transpose(kernel, (2, 3, 1, 0)), dtype=np.float32)


def _conv(kernel: np.ndarray, bias: np.ndarray) -> dict:
    return {"kernel": np.asarray(kernel, np.float32), "bias": np.asarray(bias, np.float32)}


def _from_torchvision_state(state: dict, where: str) -> dict:
    backbone = {}
    for name, index, (k_shape, b_shape) in zip(VGG16_CONV_NAMES, TORCHVISION_CONV_INDICES,
                                               _vgg_shapes("oihw")):
        arrays = []
        for leaf, shape in (("weight", k_shape), ("bias", b_shape)):
            key = f"features.{index}.{leaf}"
            if key not in state:
                first = ", ".join(list(state)[:3]) or "none"
                raise WeightsError(f"{where}: missing key {key} (expected shape {shape}); "
                                   f"not a torchvision VGG-16 state_dict (first keys: {first})")
            array = np.asarray(state[key], np.float32)
            _check_shape(where, key, array, shape)
            arrays.append(array)
        backbone[name] = _conv(_oihw_to_hwio(arrays[0]), arrays[1])
    return backbone


def require_torch(where: str):
    """The ``torch`` module, or one line saying that reading a .pth file needs it."""
    try:
        import torch
    except ImportError:
        raise WeightsError(f"{where}: reading a PyTorch .pth file needs torch (pip install torch); "
                           "the timm .safetensors file needs no torch") from None
    return torch


def read_torchvision(path: str | os.PathLike) -> tuple[dict, dict]:
    """A torchvision ``vgg16`` (or ``vgg16_bn``-free VGG) state_dict saved with torch.save."""
    torch = require_torch(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise WeightsError(f"{path}: not a readable PyTorch file ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(state, dict):  # a training script's checkpoint holds the state_dict
        state = next((state[k] for k in ("state_dict", "model") if isinstance(state.get(k), dict)),
                     state)
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state_dict (dict of tensors), got {type(state).__name__}")
    floats = {str(k).removeprefix("module."): v for k, v in state.items() if hasattr(v, "numpy")}
    for key, tensor in floats.items():
        if not tensor.is_floating_point():
            raise WeightsError(f"{path}: {key} holds {str(tensor.dtype).removeprefix('torch.')} "
                               "values, expected floating-point weights")
    state = {k: v.float().numpy() for k, v in floats.items()}
    return {"backbone": _from_torchvision_state(state, str(path))}, {
        "source": "torchvision", "preprocessing": "torch", "pooling": "standard"}


_SAFETENSORS_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16}


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Parse a .safetensors file with NumPy only (F32, F64, F16 and BF16 tensors)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise WeightsError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + header_len])
    except (struct.error, ValueError, UnicodeDecodeError):
        raise WeightsError(f"{path}: not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: not a safetensors file (bad header)")
    base, tensors = 8 + header_len, {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            raw = data[base + start:base + end]
            if len(raw) != end - start:
                raise WeightsError(f"{path}: truncated file (tensor {key} ends past the end of "
                                   "the file)")
            if info["dtype"] == "BF16":
                array = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
            elif info["dtype"] in _SAFETENSORS_DTYPES:
                array = np.frombuffer(raw, _SAFETENSORS_DTYPES[info["dtype"]])
            elif key.endswith((".weight", ".bias")):
                raise WeightsError(f"{path}: {key} holds {info['dtype']} values, expected "
                                   "floating-point weights")
            else:
                continue  # other integer buffers (a batch-norm's counter) are not weights
            tensors[key] = array.reshape(info["shape"])
        except (KeyError, TypeError, ValueError) as e:  # a header entry that does not fit
            raise WeightsError(f"{path}: malformed safetensors entry for tensor {key} "
                               f"({type(e).__name__}: {e})") from None
    return tensors


def read_safetensors(path: str | os.PathLike) -> tuple[dict, dict]:
    """timm ``vgg16.tv_in1k`` (torchvision keys) as .safetensors; no torch needed."""
    return {"backbone": _from_torchvision_state(load_safetensors(path), str(path))}, {
        "source": "safetensors", "preprocessing": "torch", "pooling": "standard"}


def _open_h5(path: str | os.PathLike):
    try:
        import h5py
    except ImportError:
        raise WeightsError(f"{path}: reading Keras .h5 files needs h5py "
                           "(pip install 'mlnet-jax[convert]')") from None
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise WeightsError(f"{path}: not a readable HDF5 file ({e})") from None


def _decode(names) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _keras_layers_with_weights(f) -> list[tuple[str, list[np.ndarray]]]:
    """[(layer name, [arrays in weight_names order])] for a Keras 1/2 save_weights file."""
    root = f["model_weights"] if "model_weights" in f else f
    layers = []
    for layer in _decode(root.attrs.get("layer_names", [])):
        if layer not in root:
            raise WeightsError(f"{f.filename}: layer {layer} is listed in layer_names but has "
                               "no group")
        group = root[layer]
        names = _decode(group.attrs.get("weight_names", []))
        missing = [n for n in names if n not in group]
        if missing:
            raise WeightsError(f"{f.filename}: layer {layer} lists weight {missing[0]}, which "
                               "the file does not hold")
        if names:
            layers.append((layer, [np.asarray(group[n]) for n in names]))
    return layers


def _backbone_from_layers(layers, where: str, *, layout: str, flip: bool) -> dict:
    convs = [(name, ws) for name, ws in layers if ws and ws[0].ndim == 4]
    if len(convs) < 13:
        first = convs[0][0] if convs else "none"
        raise WeightsError(f"{where}: found {len(convs)} convolution layers (first: {first}), "
                           "expected the 13 of VGG-16")
    backbone = {}
    for ours, (layer, weights), (k_shape, b_shape) in zip(VGG16_CONV_NAMES, convs, _vgg_shapes(layout)):
        if len(weights) != 2:
            raise WeightsError(f"{where}: layer {layer} has {len(weights)} weights, expected kernel and bias")
        _check_shape(where, f"{layer} kernel", weights[0], k_shape)
        _check_shape(where, f"{layer} bias", weights[1], b_shape)
        kernel = _oihw_to_hwio(weights[0], flip=flip) if layout == "oihw" else weights[0]
        backbone[ours] = _conv(kernel, weights[1])
    return backbone


def read_keras(path: str | os.PathLike) -> tuple[dict, dict]:
    """Keras 2 ``vgg16_weights_tf_dim_ordering_tf_kernels(_notop).h5`` (HWIO kernels)."""
    with _open_h5(path) as f:
        layers = _keras_layers_with_weights(f)
    return {"backbone": _backbone_from_layers(layers, str(path), layout="hwio", flip=False)}, {
        "source": "keras", "preprocessing": "caffe", "pooling": "standard"}


def read_keras1(path: str | os.PathLike) -> tuple[dict, dict]:
    """The Keras-0/1 Theano ``vgg16_weights.h5`` the original loads (``layer_{id}/param_{p}``).

    Kernels are OIHW and spatially flipped (Theano convolves). The weights were trained with
    Caffe (standard pooling windows), but ML-Net fine-tuned them through Theano's windows, so
    ``keras1`` is recorded: training from this file reproduces the original's run
    (``--config.pooling=standard`` gives Caffe's windows instead).
    """
    where = str(path)
    with _open_h5(path) as f:
        if "layer_1" not in f:
            if "layer_names" in f.attrs:  # a Keras 1 save_weights file of a VGG-16 model
                layers = _keras_layers_with_weights(f)
                backbone = _backbone_from_layers(layers, where, layout="oihw", flip=True)
                return {"backbone": backbone}, {"source": "keras1", "preprocessing": "caffe",
                                                "pooling": "keras1"}
            raise WeightsError(f"{where}: no group layer_1; expected the Keras 1 VGG-16 layout "
                               "layer_{id}/param_{p}")
        layers = []
        for layer_id in KERAS1_VGG_LAYER_IDS:
            key = f"layer_{layer_id}"
            if key not in f:
                raise WeightsError(f"{where}: missing group {key} (a VGG-16 convolution)")
            group = f[key]
            count = int(group.attrs.get("nb_params", len(group)))
            missing = [f"param_{p}" for p in range(count) if f"param_{p}" not in group]
            if missing:
                raise WeightsError(f"{where}: group {key} has nb_params={count} but no "
                                   f"{missing[0]}")
            layers.append((key, [np.asarray(group[f"param_{p}"]) for p in range(count)]))
    return {"backbone": _backbone_from_layers(layers, where, layout="oihw", flip=True)}, {
        "source": "keras1", "preprocessing": "caffe", "pooling": "keras1"}


def read_mlnet_keras1(path: str | os.PathLike) -> tuple[dict, dict]:
    """The authors' trained ML-Net (Keras 1.1 ``save_weights``; the released ``.pkl`` is HDF5).

    Weight-bearing layers in order: 13 VGG convolutions, the 3×3 and 1×1 head convolutions,
    the prior W. Kernels are Theano OIHW (flipped).
    """
    where = str(path)
    with _open_h5(path) as f:
        layers = _keras_layers_with_weights(f)
    if not layers:
        raise WeightsError(f"{where}: no layers with weights (root attribute layer_names missing "
                           "or empty); expected a Keras 1.1 save_weights file of ML-Net")
    backbone = _backbone_from_layers(layers[:13], where, layout="oihw", flip=True)
    rest = layers[13:]
    expected = [("head 3x3 conv", [(64, 1280, 3, 3), (64,)]),
                ("head 1x1 conv", [(1, 64, 1, 1), (1,)])]
    if len(rest) < 2:
        raise WeightsError(f"{where}: found {len(layers)} layers with weights, expected 16 "
                           "(13 VGG convs, 2 head convs, the prior)")
    head = {}
    for (label, shapes), (layer, weights), ours in zip(expected, rest[:2], ("conv", "readout")):
        if len(weights) != 2:
            raise WeightsError(f"{where}: layer {layer} ({label}) has {len(weights)} weights, expected 2")
        for key, array, shape in zip(("kernel", "bias"), weights, shapes):
            _check_shape(where, f"{layer} {key} ({label})", array, shape)
        head[ours] = _conv(_oihw_to_hwio(weights[0], flip=True), weights[1])
    params = {"backbone": backbone, "head": head}
    if len(rest) > 3:
        raise WeightsError(f"{where}: layer {rest[3][0]} follows the prior; ML-Net has 16 layers "
                           "with weights (13 VGG convs, 2 head convs, the prior), this file "
                           f"{len(layers)}: another model?")
    has_prior = len(rest) == 3
    if has_prior:
        layer, weights = rest[2]
        if len(weights) != 1 or weights[0].ndim != 2 or 0 in weights[0].shape:
            raise WeightsError(f"{where}: layer {layer} should be the prior W (one non-empty 2-D "
                               f"array), got shapes {[tuple(w.shape) for w in weights]}")
        _check_floating(where, f"{layer} (the prior W)", weights[0])
        params["prior"] = np.asarray(weights[0], np.float32)
    rows, cols = (params["prior"].shape if has_prior else (6, 8))
    return params, {"source": "mlnet-keras1", "preprocessing": "caffe", "pooling": "keras1",
                    "model": "mlnet", "prior": has_prior,
                    "input_size": [rows * 80, cols * 80]}


READERS = {"torchvision": read_torchvision, "safetensors": read_safetensors, "keras": read_keras,
           "keras1": read_keras1, "mlnet-keras1": read_mlnet_keras1}


def detect_format(path: str | os.PathLike) -> str:
    """Guess the source format from the file's contents (not its extension)."""
    head = _read_head(path, 16)
    if not head:
        raise WeightsError(f"{path}: empty file")
    if head.startswith(_HDF5_MAGIC):
        with _open_h5(path) as f:
            if "layer_1" in f and "layer_names" not in f.attrs:
                return "keras1"
            layers = _keras_layers_with_weights(f)
        if not layers:
            raise WeightsError(f"{path}: HDF5 file without Keras weights (no layer_names / layer_{{id}})")
        if layers[0][1][0].shape[:2] == (3, 3):  # HWIO kernels: Keras 2, with or without top
            return "keras"
        # OIHW (Theano): ML-Net if a convolution follows VGG's 13 (its head), where VGG-16 with
        # its top has the 2-D fc1.
        return "mlnet-keras1" if len(layers) > 13 and layers[13][1][0].ndim == 4 else "keras1"
    # np.savez writes only *.npy members; torch.save a folder with data.pkl.
    names = _zip_names(path) if head.startswith(b"PK") else []
    if names and all(n.endswith(".npy") for n in names):
        raise WeightsError(f"{path}: a NumPy .npz archive, not a source format"
                           + ("; it is already a converted mlnet_jax weights file: use it as it "
                              "is" if is_weights_archive(names) else ""))
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return "torchvision"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    raise WeightsError(f"{path}: unrecognised weights file (not HDF5, PyTorch or safetensors); "
                       f"pass --format, one of {', '.join(FORMATS)}")


def _read_head(path: str | os.PathLike, size: int) -> bytes:
    """The file's first ``size`` bytes, or one line saying why it cannot be read."""
    if Path(path).exists() and not (Path(path).is_file() or Path(path).is_dir()):
        raise WeightsError(f"{path}: not a regular file")  # a FIFO would block the read
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise WeightsError(f"{path}: is a directory, expected a weights file") from None
    except OSError as e:  # permission denied, a path through a file, an I/O error
        raise WeightsError(f"{path}: cannot read it ({e.strerror or e})") from None


def _zip_names(path: str | os.PathLike) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return []


def read_source(path: str | os.PathLike, fmt: str = "auto") -> tuple[dict, dict]:
    """Read ``path`` in ``fmt`` (or detect it) into (params, metadata)."""
    if fmt == "auto":
        fmt = detect_format(path)  # it reads the file's head, so it is readable
    elif fmt in READERS:
        _read_head(path, 1)
    if fmt not in READERS:
        raise WeightsError(f"--format must be auto or one of {', '.join(FORMATS)}, got {fmt!r}")
    return READERS[fmt](path)
