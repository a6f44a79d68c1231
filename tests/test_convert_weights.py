"""Weight conversion from every supported source is exact (SPEC §2)."""

import json
import os
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_numpy as ref
from mlnet_jax import VGG16, load_vgg16
from mlnet_jax.convert_weights import main as convert_main
from mlnet_jax.errors import WeightsError
from mlnet_jax.weight_formats import KERAS1_VGG_LAYER_IDS, TORCHVISION_CONV_INDICES, detect_format
from mlnet_jax.weights_file import read_weights

h5py = pytest.importorskip("h5py")
SIZE = (32, 48)


def relative_error(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def random_oihw(rng) -> list[tuple[np.ndarray, np.ndarray]]:
    convs, cin = [], 3
    for cout in ref.VGG_WIDTHS:
        convs.append((rng.normal(0, np.sqrt(2 / (9 * cin)), (cout, cin, 3, 3)).astype(np.float32),
                      rng.normal(0, 0.1, cout).astype(np.float32)))
        cin = cout
    return convs


def convert(tmp_path, src, fmt="auto") -> str:
    dst = tmp_path / "converted.npz"
    assert convert_main([str(src), str(dst), "--format", fmt]) == 0
    return str(dst)


def features(dst, alignment="standard", x=None):
    x = np.random.default_rng(99).normal(0, 1, (1, *SIZE, 3)).astype(np.float32) if x is None else x
    return x, VGG16(pooling=alignment).apply(load_vgg16(dst), jnp.asarray(x))


# --- PyTorch layouts ------------------------------------------------------------------------

def torch_vgg16():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    layers, cin = [], 3
    for index, cout in enumerate(ref.VGG_WIDTHS):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]
        if index in (1, 3, 6, 9, 12):
            layers.append(nn.MaxPool2d(2, 2))
        cin = cout

    class VGG(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Linear(4, 2)  # extra keys, as in torchvision, are ignored

    torch.manual_seed(0)
    return VGG()


def torch_mlnet_features(model, x_nhwc):
    """pool3, pool4 (2×2 stride 1, padded bottom/right), conv5_3 with torch ops."""
    import torch
    import torch.nn.functional as F
    f = model.features
    x = torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2))
    out = {}
    with torch.no_grad():
        for i in range(30):  # up to conv5_3's ReLU; pool5 (index 30) is dropped
            layer = f[i]
            if i == 23:  # pool4: stride 1, size kept
                x = F.max_pool2d(F.pad(x, (0, 1, 0, 1)), 2, stride=1)
            else:
                x = layer(x)
            if i == 16:
                out["pool3"] = x
            if i == 23:
                out["pool4"] = x
        out["conv5_3"] = x
    return {k: v.numpy().transpose(0, 2, 3, 1) for k, v in out.items()}


@pytest.mark.parametrize("container", ["pth", "safetensors"])
def test_torchvision_layouts_convert_exactly(tmp_path, container):
    torch = pytest.importorskip("torch")
    model = torch_vgg16()
    assert [f"features.{i}.weight" for i in TORCHVISION_CONV_INDICES] == [
        k for k in model.state_dict() if k.startswith("features") and k.endswith("weight")]
    if container == "pth":
        src = tmp_path / "vgg16.pth"
        torch.save(model.state_dict(), src)
    else:
        safetensors_numpy = pytest.importorskip("safetensors.numpy")
        src = tmp_path / "model.safetensors"
        safetensors_numpy.save_file({k: v.numpy() for k, v in model.state_dict().items()}, str(src))
    dst = convert(tmp_path, src)
    _, metadata = read_weights(dst)
    assert metadata["preprocessing"] == "torch" and metadata["pooling"] == "standard"
    x, got = features(dst)
    want = torch_mlnet_features(model, x)
    for key in ("pool3", "pool4", "conv5_3"):
        assert relative_error(got[key], want[key]) <= 1e-5, key


def test_safetensors_bfloat16_is_read_without_torch(tmp_path):
    """The reader parses the format itself: a BF16 tensor decodes to the right float32 values."""
    values = np.array([1.0, -2.5, 0.15625], np.float32)
    raw = (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    header = json.dumps({"t": {"dtype": "BF16", "shape": [3], "data_offsets": [0, len(raw)]}}).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw)
    from mlnet_jax.weight_formats import load_safetensors
    np.testing.assert_array_equal(load_safetensors(path)["t"], values)


# --- Keras layouts --------------------------------------------------------------------------

def write_keras2(path, convs_hwio, top=False):
    """Keras save_weights layout; ``top`` adds the classifier's dense layers (shrunk shapes)."""
    with h5py.File(path, "w") as f:
        names = []
        for b, n in [(1, 2), (2, 2), (3, 3), (4, 3), (5, 3)]:
            for i in range(1, n + 1):
                names.append(f"block{b}_conv{i}")
                if i == n:
                    names.append(f"block{b}_pool")
        dense = {"fc1": (8, 4), "fc2": (4, 4), "predictions": (4, 3)} if top else {}
        names += ["flatten", *dense] if top else []
        f.attrs["layer_names"] = [n.encode() for n in names]
        convs = iter(convs_hwio)
        for name in names:
            g = f.create_group(name)
            if name in dense:
                weight_names = [f"{name}/kernel:0".encode(), f"{name}/bias:0".encode()]
                g.attrs["weight_names"] = weight_names
                g[weight_names[0].decode()] = np.ones(dense[name], np.float32)
                g[weight_names[1].decode()] = np.zeros(dense[name][1:], np.float32)
            elif "conv" in name:
                kernel, bias = next(convs)
                weight_names = [f"{name}/kernel:0".encode(), f"{name}/bias:0".encode()]
                g.attrs["weight_names"] = weight_names
                g[weight_names[0].decode()] = kernel
                g[weight_names[1].decode()] = bias
            else:
                g.attrs["weight_names"] = []


def write_keras1_vgg(path, convs_oihw):
    """The original's vgg16_weights.h5: layer_{id} groups, nb_params, param_0/param_1."""
    with h5py.File(path, "w") as f:
        f.attrs["nb_layers"] = 37
        convs = dict(zip(KERAS1_VGG_LAYER_IDS, convs_oihw))
        for layer_id in range(37):
            g = f.create_group(f"layer_{layer_id}")
            if layer_id in convs:
                g.attrs["nb_params"] = 2
                g["param_0"], g["param_1"] = convs[layer_id]
            else:
                g.attrs["nb_params"] = 0


@pytest.mark.parametrize("top", [False, True])
def test_keras2_layout_converts_exactly(tmp_path, top):
    rng = np.random.default_rng(1)
    convs = [(np.transpose(k, (2, 3, 1, 0)).copy(), b) for k, b in random_oihw(rng)]
    src = tmp_path / f"vgg16_weights_tf_dim_ordering_tf_kernels{'' if top else '_notop'}.h5"
    write_keras2(src, convs, top)
    assert detect_format(src) == "keras"
    dst = convert(tmp_path, src)
    _, metadata = read_weights(dst)
    assert metadata["preprocessing"] == "caffe"
    x, got = features(dst)
    want = ref.vgg_features(x[0], convs, "standard", true_conv=False)
    for key in ("pool3", "pool4", "conv5_3"):
        assert relative_error(got[key][0], want[key]) <= 1e-5, key


def test_keras1_theano_layout_converts_exactly(tmp_path):
    rng = np.random.default_rng(2)
    convs = random_oihw(rng)
    src = tmp_path / "vgg16_weights.h5"
    write_keras1_vgg(src, convs)
    assert detect_format(src) == "keras1"
    dst = convert(tmp_path, src)
    _, metadata = read_weights(dst)
    assert (metadata["preprocessing"], metadata["pooling"]) == ("caffe", "keras1")
    # The option between SRC and DST, as people type it, was "unrecognized arguments: DST".
    assert convert_main([str(src), "--format", "keras1", str(tmp_path / "again.npz")]) == 0
    again, first = read_weights(tmp_path / "again.npz")[0], read_weights(dst)[0]
    jax.tree.map(np.testing.assert_array_equal, again, first)
    x, got = features(dst, "keras1")
    # Reference: Theano's true convolution with the file's (unflipped) kernels.
    want = ref.vgg_features(x[0], convs, "keras1", true_conv=True)
    for key in ("pool3", "pool4", "conv5_3"):
        assert relative_error(got[key][0], want[key]) <= 1e-5, key


# --- Errors ---------------------------------------------------------------------------------

def test_a_keras1_vgg_with_its_top_is_not_taken_for_ml_net(tmp_path):
    """Keras 1's save_weights layout (layer_names, Theano OIHW kernels) of a whole VGG-16:
    detected as keras1 and converted with Theano's kernel flip, as the layer_{id} layout is."""
    src = tmp_path / "vgg16_keras1_top.h5"
    convs = random_oihw(np.random.default_rng(3))
    write_keras2(src, convs, top=True)  # OIHW kernels
    assert detect_format(src) == "keras1"
    x, got = features(convert(tmp_path, src), "keras1")
    want = ref.vgg_features(x[0], convs, "keras1", true_conv=True)
    for key in ("pool3", "pool4", "conv5_3"):
        assert relative_error(got[key][0], want[key]) <= 1e-5, key


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mlnet_jax.convert_weights", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_missing_key_is_named(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    state = {f"features.{i}.weight": k for i, (k, _) in zip(TORCHVISION_CONV_INDICES, random_oihw(np.random.default_rng(3)))}
    src = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(state, str(src))
    result = run_cli(src, tmp_path / "out.npz")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: {src}: missing key features.0.bias (expected shape (64,)); not a torchvision "
        "VGG-16 state_dict (first keys: features.0.weight, ")
    assert not (tmp_path / "out.npz").exists()


def test_wrong_shape_is_named_with_both_shapes(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    convs = random_oihw(np.random.default_rng(4))
    state = {}
    for i, (k, b) in zip(TORCHVISION_CONV_INDICES, convs):
        state[f"features.{i}.weight"], state[f"features.{i}.bias"] = k, b
    state["features.5.weight"] = np.zeros((128, 32, 3, 3), np.float32)
    src = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(state, str(src))
    result = run_cli(src, tmp_path / "out.npz")
    assert result.returncode == 2
    assert "features.5.weight has shape (128, 32, 3, 3), expected (128, 64, 3, 3)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_vgg_file_with_wrong_input_channels_is_refused_naming_both_shapes(tmp_path):
    # conv2_1 takes conv1_2's 64 channels: a kernel of the right output count but 32 inputs
    # would pass a check of output channels only and fail inside the first apply.
    from mlnet_jax.vgg import VGG16_CONVS
    from mlnet_jax.weights_file import save_weights
    expected = jax.eval_shape(VGG16().init, jax.random.key(0),
                              jnp.zeros((1, *SIZE, 3)))["params"]
    backbone = {name: {leaf: np.zeros(spec.shape, np.float32) for leaf, spec in layer.items()}
                for name, layer in expected.items()}
    assert list(backbone) == [name for name, _ in VGG16_CONVS]
    want = tuple(expected["conv2_1"]["kernel"].shape)
    backbone["conv2_1"]["kernel"] = np.zeros((3, 3, 32, 128), np.float32)
    path = tmp_path / "vgg.npz"
    save_weights(path, {"backbone": backbone}, {"model": "vgg16", "source": "test",
                                                "preprocessing": "torch", "pooling": "standard"})
    with pytest.raises(WeightsError) as caught:
        load_vgg16(path)
    assert str(caught.value) == (f"{path}: backbone/conv2_1/kernel has shape (3, 3, 32, 128), "
                                 f"expected {want}")


@pytest.mark.parametrize("content", [b"", b"hello, this is not a weights file\n"])
def test_not_a_weights_file(tmp_path, content):
    src = tmp_path / "vgg16.pth"
    src.write_bytes(content)
    result = run_cli(src, tmp_path / "out.npz")
    assert result.returncode == 2 and str(src) in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("header, reason", [
    ({"w": {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 16]}}, "ValueError"),
    ({"w": [0, 16]}, "TypeError"),
    ({"w": {"dtype": "F32", "shape": [4]}}, "KeyError"),
    ([1, 2], None),
])
def test_a_malformed_safetensors_header_is_one_line(tmp_path, capsys, header, reason):
    header = json.dumps(header).encode()
    src = tmp_path / "model.safetensors"
    src.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    assert convert_main([str(src), str(tmp_path / "out.npz"), "--format", "safetensors"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(src) in err
    assert (f"malformed safetensors entry for tensor w ({reason}" if reason else "bad header") in err


def test_an_unwritable_destination_and_an_unconverted_checkpoint_are_one_line(tmp_path, capsys):
    src = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    write_keras2(src, [(np.transpose(k, (2, 3, 1, 0)).copy(), b)
                       for k, b in random_oihw(np.random.default_rng(5))])
    (tmp_path / "a_folder").mkdir()
    assert convert_main([str(src), str(tmp_path / "a_folder")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'a_folder'}: cannot write the weights file (Is a directory)"
    assert list((tmp_path / "a_folder").iterdir()) == [] and sorted(
        p.name for p in tmp_path.iterdir()) == ["a_folder", src.name]  # no temporary file left
    with pytest.raises(WeightsError, match="not a converted mlnet_jax weights file; convert it "
                                           "first with python -m mlnet_jax.convert_weights"):
        read_weights(src)  # e.g. --checkpoint given the unconverted file


def test_truncated_safetensors_is_reported(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    src = tmp_path / "model.safetensors"
    safetensors_numpy.save_file({"features.0.weight": np.zeros((64, 3, 3, 3), np.float32)}, str(src))
    src.write_bytes(src.read_bytes()[:-100])
    result = run_cli(src, tmp_path / "out.npz")
    assert result.returncode == 2 and "truncated" in result.stderr


def test_existing_output_survives_a_failed_conversion(tmp_path):
    dst = tmp_path / "out.npz"
    dst.write_bytes(b"previous")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    result = run_cli(bad, dst)
    assert result.returncode == 2
    assert dst.read_bytes() == b"previous"


def test_download_offline_fails_with_a_clear_message(tmp_path, monkeypatch, capsys):
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv("MLNET_JAX_CACHE", str(tmp_path / "cache"))
    code = convert_main(["--download", "timm", str(tmp_path / "out.npz")])
    assert code == 2
    assert not (tmp_path / "out.npz").exists()
    # It names the URL and the exact cache path a copy fetched elsewhere must have.
    err = capsys.readouterr().err
    assert "https://huggingface.co/timm/vgg16.tv_in1k" in err
    assert f"save it as {tmp_path / 'cache' / 'vgg16.tv_in1k.safetensors'}," in err


def _sha256(path) -> str:
    with open(path, "rb") as f:
        return _sha256_bytes(f.read())


def _publish_as(monkeypatch, name, path, url=None):
    """Make ``path``'s SHA-256 (and ``url``) the published one of ``--download name``."""
    from mlnet_jax import download
    old_url, filename, fmt, _ = download.PUBLIC_WEIGHTS[name]
    monkeypatch.setitem(download.PUBLIC_WEIGHTS, name, (url or old_url, filename, fmt,
                                                        _sha256(path)))


def test_download_uses_a_local_copy_in_the_cache(tmp_path, monkeypatch, capsys):
    """A file put in the cache (e.g. copied from another machine) is used without network,
    once its SHA-256 is the published file's."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    from mlnet_jax import download
    import urllib.request
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("network used"))
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("MLNET_JAX_CACHE", str(cache))
    state = {}
    for i, (k, b) in zip(TORCHVISION_CONV_INDICES, random_oihw(np.random.default_rng(5))):
        state[f"features.{i}.weight"], state[f"features.{i}.bias"] = k, b
    cached = cache / download.PUBLIC_WEIGHTS["timm"][1]
    safetensors_numpy.save_file(state, str(cached))
    # Not the published file: refused (it was converted silently), whatever its content.
    assert convert_main(["--download", "timm", str(tmp_path / "out.npz")]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: {cached}: not the file published at https://huggingface.co/timm/vgg16.tv_in1k"
        f"/resolve/main/model.safetensors (its SHA-256 is {_sha256(cached)[:16]}…, expected "
        "57b026918159a6bf…): delete it to download it again, or put the right file there")
    assert not (tmp_path / "out.npz").exists()
    _publish_as(monkeypatch, "timm", cached)  # as if it were
    assert convert_main(["--download", "timm", str(tmp_path / "out.npz")]) == 0
    params, metadata = read_weights(tmp_path / "out.npz")
    np.testing.assert_array_equal(params["backbone"]["conv1_1"]["kernel"],
                                  np.transpose(state["features.0.weight"], (2, 3, 1, 0)))


def test_a_download_blames_the_cached_file_only_for_its_own_faults(tmp_path, monkeypatch,
                                                                   capsys):
    """DST's problems (a folder, the cached file itself) are DST's: the message told people to
    delete a good cached file and download it again. Without torch, ``--download torchvision``
    says so before fetching its 528 MB."""
    from mlnet_jax import download
    import urllib.request
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("network used"))
    monkeypatch.setenv("MLNET_JAX_CACHE", str(tmp_path / "cache"))
    cached = _save_safetensors(tmp_path, _torchvision_state())
    (tmp_path / "cache").mkdir()
    cached = cached.rename(tmp_path / "cache" / download.PUBLIC_WEIGHTS["timm"][1])
    _publish_as(monkeypatch, "timm", cached)
    (tmp_path / "a_folder").mkdir()
    for dst in (tmp_path / "a_folder", cached):
        assert convert_main(["--download", "timm", str(dst)]) == 2
        err = capsys.readouterr().err
        assert str(dst) in err and "the cached download" not in err, err
    assert convert_main(["--download", "timm", str(tmp_path / "out.npz")]) == 0  # it was good
    monkeypatch.setitem(sys.modules, "torch", None)  # torch not installed
    assert convert_main(["--download", "torchvision", str(tmp_path / "tv.npz")]) == 2
    assert capsys.readouterr().err.startswith("error: --download torchvision: reading a PyTorch "
                                              ".pth file needs torch (pip install torch)")


def _torchvision_state(seed=5) -> dict:
    state = {}
    for i, (k, b) in zip(TORCHVISION_CONV_INDICES, random_oihw(np.random.default_rng(seed))):
        state[f"features.{i}.weight"], state[f"features.{i}.bias"] = k, b
    return state


def test_converting_a_file_onto_itself_is_refused_and_keeps_it(tmp_path, capsys):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    src = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(_torchvision_state(), str(src))
    before = src.read_bytes()
    assert convert_main([str(src), str(tmp_path / "." / "model.safetensors")]) == 2
    assert "is SRC itself" in capsys.readouterr().err and src.read_bytes() == before


# Inf as well as NaN: counting NaN only would let an infinite weight through (NaN maps).
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_naming_the_parameter(tmp_path, capsys, bad):
    # A NaN weight made every map blank, exit status 0.
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    state = _torchvision_state()
    state["features.7.bias"][3] = bad
    src = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(state, str(src))
    assert convert_main([str(src), str(tmp_path / "out.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {src}: parameter backbone/conv2_2/bias has 1 values that are not "
                   "finite (NaN or Inf); a model with them predicts blank maps")
    assert not (tmp_path / "out.npz").exists()


def test_malformed_keras_files_and_odd_state_dicts_are_one_line(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    convs = [(np.transpose(k, (2, 3, 1, 0)).copy(), b) for k, b in random_oihw(np.random.default_rng(6))]
    cases = {}
    src = tmp_path / "no_group.h5"  # a listed layer without its group
    write_keras2(src, convs)
    with h5py.File(src, "a") as f:
        del f["block3_conv2"]
    cases[src] = "layer block3_conv2 is listed in layer_names but has no group"
    src = tmp_path / "no_dataset.h5"  # a listed weight without its dataset
    write_keras2(src, convs)
    with h5py.File(src, "a") as f:
        del f["block2_conv1"]["block2_conv1/bias:0"]
    cases[src] = "layer block2_conv1 lists weight block2_conv1/bias:0, which the file does not hold"
    src = tmp_path / "vgg16_weights.h5"  # Keras 1: nb_params says 2, param_1 missing
    write_keras1_vgg(src, random_oihw(np.random.default_rng(7)))
    with h5py.File(src, "a") as f:
        del f["layer_3"]["param_1"]
    cases[src] = "group layer_3 has nb_params=2 but no param_1"
    src = tmp_path / "int_keys.pth"
    torch.save({0: torch.zeros(3)}, src)
    cases[src] = "missing key features.0.weight"
    src = tmp_path / "ints.pth"
    torch.save({k: torch.from_numpy(v).to(torch.int32) for k, v in _torchvision_state().items()}, src)
    cases[src] = "features.0.weight holds int32 values, expected floating-point weights"
    src = tmp_path / "ints.h5"  # Keras kernels of integers converted as float32 without a word
    write_keras2(src, [(k.astype(np.int32), b) for k, b in convs])
    cases[src] = "block1_conv1 kernel holds int32 values, expected floating-point weights"
    (tmp_path / "a_file").write_bytes(b"")
    src = tmp_path / "a_file" / "vgg16.pth"  # a path through a file: NotADirectoryError
    cases[src] = "cannot read it (Not a directory)"
    src = tmp_path / "fifo.pth"  # reading it would wait for a writer forever
    os.mkfifo(src)
    cases[src] = "not a regular file"
    for src, message in cases.items():
        assert convert_main([str(src), str(tmp_path / "out.npz")]) == 2, src
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"error: {src}: ") and message in err
    # A training script's checkpoint holds the state_dict under "model": it converts.
    src = tmp_path / "checkpoint.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in _torchvision_state().items()},
                "epoch": 90}, src)
    assert convert_main([str(src), str(tmp_path / "out.npz")]) == 0
    # A named format reads the file the same way.
    src = tmp_path / "a_file" / "vgg16.safetensors"
    assert convert_main([str(src), str(tmp_path / "out.npz"), "--format", "safetensors"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {src}: cannot read it (Not a directory)"


def test_a_download_cut_short_is_not_cached(tmp_path, monkeypatch, capsys):
    """The server promised more bytes than arrived: the half file must not become the cached
    copy every later --download reads."""
    import http.server
    import threading

    from mlnet_jax import download

    class Half(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 500)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Half)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/model.safetensors"
        monkeypatch.setitem(download.PUBLIC_WEIGHTS, "timm",
                            (url, "cut.safetensors", "safetensors", "0" * 64))
        monkeypatch.setenv("MLNET_JAX_CACHE", str(tmp_path / "cache"))
        assert convert_main(["--download", "timm", str(tmp_path / "out.npz")]) == 2
    finally:
        server.shutdown()
    assert "(500 of 1,000 bytes arrived)" in capsys.readouterr().err
    assert not (tmp_path / "cache" / "cut.safetensors").exists()
    # A bad file in the cache (with the published checksum) is named, with what to do about it.
    (tmp_path / "cache" / "cut.safetensors").write_bytes(b"garbage" * 10)
    _publish_as(monkeypatch, "timm", tmp_path / "cache" / "cut.safetensors")
    assert convert_main(["--download", "timm", str(tmp_path / "out.npz")]) == 2
    assert f"(the cached download: delete {tmp_path / 'cache' / 'cut.safetensors'} to fetch it " \
           "again)" in capsys.readouterr().err


def test_a_download_that_is_not_the_published_file_is_refused_and_not_kept(tmp_path, monkeypatch,
                                                                          capsys):
    """Only the byte count was checked: a wrong, stale or tampered file of the right length
    was cached and converted, and reused by every later --download."""
    import http.server
    import threading

    from mlnet_jax import download
    good = _save_safetensors(tmp_path, _torchvision_state())
    body = {"bytes": good.read_bytes()[:-1] + b"!"}  # the right length, one byte changed

    class Serve(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body["bytes"])))
            self.end_headers()
            self.wfile.write(body["bytes"])

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Serve)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MLNET_JAX_CACHE", str(tmp_path / "cache"))
    url = f"http://127.0.0.1:{server.server_port}/model.safetensors"
    _publish_as(monkeypatch, "timm", good, url)
    cached = tmp_path / "cache" / download.PUBLIC_WEIGHTS["timm"][1]
    try:
        assert convert_main(["--download", "timm", str(tmp_path / "out.npz")]) == 2
        assert capsys.readouterr().err.strip() == (
            f"error: {url} sent a file whose SHA-256 is {_sha256_bytes(body['bytes'])[:16]}…, "
            f"not the published {_sha256(good)[:16]}…; it was not kept")
        assert not cached.exists() and not (tmp_path / "out.npz").exists()
        body["bytes"] = good.read_bytes()  # the server sends the right file
        assert convert_main(["--download", "timm", str(tmp_path / "out.npz")]) == 0
    finally:
        server.shutdown()
    assert cached.read_bytes() == good.read_bytes() and (tmp_path / "out.npz").exists()
    # torchvision's file name carries the start of its SHA-256, which is what is checked.
    assert download.PUBLIC_WEIGHTS["torchvision"][0].endswith(
        f"-{download.PUBLIC_WEIGHTS['torchvision'][3]}.pth")


def _sha256_bytes(data: bytes) -> str:
    import hashlib
    return hashlib.sha256(data).hexdigest()


def test_numpy_archives_and_integer_safetensors_are_named_for_what_they_are(tmp_path, capsys):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    converted = convert(tmp_path, _save_safetensors(tmp_path, _torchvision_state()))
    np.savez(tmp_path / "arrays.npz", a=np.zeros(3))
    state = _torchvision_state()
    state["features.0.weight"] = state["features.0.weight"].astype(np.int32)
    safetensors_numpy.save_file(state, str(tmp_path / "ints.safetensors"))
    for src, message in ((converted, "a NumPy .npz archive, not a source format; it is already "
                                     "a converted mlnet_jax weights file: use it as it is"),
                         (tmp_path / "arrays.npz", "a NumPy .npz archive, not a source format"),
                         (tmp_path / "ints.safetensors", "features.0.weight holds I32 values, "
                                                        "expected floating-point weights")):
        assert convert_main([str(src), str(tmp_path / "again.npz")]) == 2
        assert capsys.readouterr().err.strip() == f"error: {src}: {message}"


def _save_safetensors(tmp_path, state):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    src = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(state, str(src))
    return src
