"""The authors' Keras 1.1 / Theano ML-Net file runs with the original's semantics (issue 9)."""

import numpy as np
import pytest
from PIL import Image

import reference_numpy as ref
from mlnet_jax import load_model
from mlnet_jax.convert_weights import main as convert_main
from mlnet_jax.inference import Predictor
from mlnet_jax.preprocessing import letterbox, normalize

h5py = pytest.importorskip("h5py")
INPUT = (160, 240)  # 20×30 maps: a 2×3 prior grid, so the (i − 4)/10 grid is exercised


def random_mlnet_keras1(rng, prior_shape=(2, 3)):
    convs, cin = [], 3
    for cout in ref.VGG_WIDTHS:
        convs.append((rng.normal(0, np.sqrt(2 / (9 * cin)), (cout, cin, 3, 3)).astype(np.float32),
                      rng.normal(0, 0.05, cout).astype(np.float32)))
        cin = cout
    head = (rng.normal(0, 0.02, (64, 1280, 3, 3)).astype(np.float32),
            rng.uniform(0, 0.1, 64).astype(np.float32))
    readout = (np.abs(rng.normal(0, 0.2, (1, 64, 1, 1))).astype(np.float32), np.full(1, 0.3, np.float32))
    prior = rng.normal(0, 0.5, prior_shape).astype(np.float32)
    return convs, head, readout, prior


def write_keras11_mlnet(path, convs, head, readout, prior):
    """Keras 1.1 save_weights: root layer_names; each layer's weight_names; <layer>_W/_b."""
    layers = ["input_1"]
    weights = {}
    pools = {1: "maxpooling2d_1", 3: "maxpooling2d_2", 6: "maxpooling2d_3", 9: "maxpooling2d_4"}
    for i, (w, b) in enumerate(convs):
        name = f"convolution2d_{i + 1}"
        layers.append(name)
        weights[name] = [(f"{name}_W", w), (f"{name}_b", b)]
        if i in pools:
            layers.append(pools[i])
    layers += ["merge_1", "dropout_1", "convolution2d_14", "convolution2d_15",
               "eltwiseproduct_1", "activation_1"]
    weights["convolution2d_14"] = [("convolution2d_14_W", head[0]), ("convolution2d_14_b", head[1])]
    weights["convolution2d_15"] = [("convolution2d_15_W", readout[0]), ("convolution2d_15_b", readout[1])]
    weights["eltwiseproduct_1"] = [("eltwiseproduct_1_W", prior)]
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [n.encode() for n in layers]
        for name in layers:
            g = f.create_group(name)
            g.attrs["weight_names"] = [w.encode() for w, _ in weights.get(name, [])]
            for w, value in weights.get(name, []):
                g[w] = value


@pytest.fixture(scope="module")
def released_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlnet")
    parts = random_mlnet_keras1(np.random.default_rng(0))
    src = tmp / "mlnet_salicon_weights.pkl"  # the released file is HDF5 named .pkl
    write_keras11_mlnet(src, *parts)
    dst = tmp / "mlnet_salicon.npz"
    assert convert_main([str(src), str(dst), "--format", "mlnet-keras1"]) == 0
    return parts, dst, src


def test_auto_detects_the_released_file(released_model, tmp_path):
    _, _, src = released_model
    assert convert_main([str(src), str(tmp_path / "auto.npz")]) == 0
    _, _, info = load_model(tmp_path / "auto.npz")
    assert info.pooling == "keras1" and info.preprocessing == "caffe" and info.prior


def test_forward_matches_numpy_transcription_of_the_original(released_model):
    (convs, head, readout, prior), dst, _ = released_model
    model, variables, info = load_model(dst)
    assert info.input_size == INPUT
    x = np.random.default_rng(1).normal(0, 60, (1, *INPUT, 3)).astype(np.float32)
    got = np.asarray(model.apply(variables, x, train=False))[0, ..., 0]
    want = ref.mlnet_forward(x[0], convs, head, readout, prior, "keras1", true_conv=True)
    assert want.max() > 0 and (want == 0).mean() < 0.9
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("size", [(90, 300), (300, 110)])
def test_predict_matches_the_original_postprocessing(released_model, size):
    (convs, head, readout, prior), dst, _ = released_model
    predictor = Predictor.load(dst, batch_size=2)
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    saliency = predictor(Image.fromarray(image))
    assert saliency.shape == size
    # The original: caffe preprocessing of the letterboxed image, forward, postprocess.
    boxed = letterbox(image, INPUT)
    x = np.asarray(normalize(boxed[None], "caffe"))[0]
    raw = ref.mlnet_forward(x, convs, head, readout, prior, "keras1", true_conv=True)
    want = ref.original_postprocess(raw, *size)
    np.testing.assert_allclose(saliency, want, atol=2e-5)


def test_a_different_model_is_refused_with_the_layer_named(tmp_path):
    convs, head, readout, prior = random_mlnet_keras1(np.random.default_rng(3))
    head = (np.zeros((64, 512, 3, 3), np.float32), head[1])  # e.g. a single-level head
    src = tmp_path / "other.h5"
    write_keras11_mlnet(src, convs, head, readout, prior)
    import subprocess, sys
    result = subprocess.run([sys.executable, "-m", "mlnet_jax.convert_weights", str(src),
                             str(tmp_path / "o.npz"), "--format", "mlnet-keras1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert ("convolution2d_14 kernel (head 3x3 conv) has shape (64, 512, 3, 3), "
            "expected (64, 1280, 3, 3)") in result.stderr


def test_layers_after_the_prior_or_an_empty_prior_are_refused(tmp_path, capsys):
    """A file of another model (a layer after the prior: it was dropped silently) or an empty
    prior is refused at conversion, naming the layer."""
    convs, head, readout, prior = random_mlnet_keras1(np.random.default_rng(4))
    src = tmp_path / "extra.h5"
    write_keras11_mlnet(src, convs, head, readout, prior)
    with h5py.File(src, "a") as f:
        f.attrs["layer_names"] = [n if isinstance(n, bytes) else n.encode() for n in
                                  f.attrs["layer_names"]] + [b"dense_1"]
        g = f.create_group("dense_1")
        g.attrs["weight_names"] = [b"dense_1_W"]
        g["dense_1_W"] = np.ones((4, 2), np.float32)
    assert convert_main([str(src), str(tmp_path / "o.npz"), "--format", "mlnet-keras1"]) == 2
    assert "layer dense_1 follows the prior; ML-Net has 16 layers with weights" in \
        capsys.readouterr().err
    src = tmp_path / "empty_prior.h5"
    write_keras11_mlnet(src, convs, head, readout, np.zeros((0, 8), np.float32))
    assert convert_main([str(src), str(tmp_path / "o.npz"), "--format", "mlnet-keras1"]) == 2
    assert "eltwiseproduct_1 should be the prior W (one non-empty 2-D array), got shapes " \
           "[(0, 8)]" in capsys.readouterr().err
    # Integer values are no weights (they converted without a word, as float32).
    for name, layers in (("int_prior.h5", (convs, head, readout, prior.astype(np.int32))),
                         ("int_head.h5", (convs, (head[0].astype(np.int64), head[1]), readout,
                                          prior))):
        write_keras11_mlnet(tmp_path / name, *layers)
        assert convert_main([str(tmp_path / name), str(tmp_path / "o.npz")]) == 2
        err = capsys.readouterr().err
        assert ("eltwiseproduct_1 (the prior W) holds int32 values" if name == "int_prior.h5"
                else "convolution2d_14 kernel (head 3x3 conv) holds int64 values") in err
    assert not (tmp_path / "o.npz").exists()
