"""The prediction core: maps at every image's original size from one compilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mlnet_jax import MLNet, load_model, make_predict_fn
from mlnet_jax.errors import WeightsError
from mlnet_jax.inference import Predictor
from mlnet_jax.preprocessing import (ground_truth_map, letterbox, letterbox_geometry, normalize,
                                     postprocess)
from mlnet_jax.weights_file import save_weights

INPUT = (48, 64)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    model = MLNet()
    params = model.init(jax.random.key(0), jnp.zeros((1, *INPUT, 3)))["params"]
    params = jax.tree.map(np.asarray, params)
    params["head"]["readout"]["bias"] = np.full((1,), 0.1, np.float32)
    path = tmp_path_factory.mktemp("model") / "mlnet.npz"
    save_weights(path, params, {"model": "mlnet", "source": "test", "preprocessing": "torch",
                                "pooling": "standard", "prior": True, "input_size": list(INPUT)})
    return path


def test_load_model_returns_what_the_interface_promises(model_file):
    model, variables, info = load_model(model_file)
    assert info.preprocessing == "torch" and info.input_size == INPUT
    x = np.asarray(normalize(np.zeros((2, *INPUT, 3), np.uint8), info.preprocessing))
    assert model.apply(variables, x, train=False).shape == (2, 6, 8, 1)


def test_predict_fn_normalises_uint8_on_device(model_file):
    model, variables, info = load_model(model_file)
    images = np.random.default_rng(0).integers(0, 256, (2, *INPUT, 3), dtype=np.uint8)
    predict = make_predict_fn(model, info.preprocessing)
    from_uint8 = np.asarray(predict(variables, images))
    from_float = np.asarray(predict(variables, np.asarray(normalize(images, "torch"))))
    np.testing.assert_allclose(from_uint8, from_float, rtol=1e-5, atol=1e-6)
    assert from_uint8.shape == (2, 6, 8)


@pytest.mark.timeout(300)
def test_predict_fn_takes_any_batch_and_placement_on_two_devices(model_file, tmp_path):
    import subprocess
    import sys
    images = np.random.default_rng(1).integers(0, 256, (3, *INPUT, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    script = (
        "import sys, jax, numpy as np; jax.config.update('jax_num_cpu_devices', 2)\n"
        "from mlnet_jax import load_model, make_predict_fn\n"
        "model, variables, info = load_model(sys.argv[1])\n"
        "predict = make_predict_fn(model, info.preprocessing)\n"
        "images = np.load(sys.argv[2])\n"
        "odd = np.asarray(predict(variables, images))\n"
        "one = np.asarray(predict(variables, images[:1]))\n"
        "placed = np.asarray(predict(variables, jax.device_put(images[1:], jax.devices()[0])))\n"
        "traced = np.asarray(jax.jit(predict)(variables, images))\n"
        "assert len(jax.devices()) == 2\n"
        "np.save(sys.argv[3], np.concatenate([odd, one, placed, traced]))\n")
    subprocess.run([sys.executable, "-c", script, str(model_file), str(tmp_path / "images.npy"),
                    str(tmp_path / "maps.npy")], check=True, timeout=240)
    model, variables, info = load_model(model_file)
    want = np.asarray(make_predict_fn(model, info.preprocessing)(variables, images))
    got = np.load(tmp_path / "maps.npy")
    np.testing.assert_allclose(got, np.concatenate([want, want[:1], want[1:], want]),
                               rtol=1e-5, atol=1e-6)


def test_maps_have_the_original_sizes_with_one_compilation(model_file):
    predictor = Predictor.load(model_file, batch_size=2)
    rng = np.random.default_rng(1)
    sizes = [(48, 64), (30, 100), (120, 40), (1, 1), (7, 301), (64, 64)]
    images = [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in sizes]
    images[1] = Image.fromarray(images[1][..., 0])          # greyscale PIL
    images[2] = np.concatenate([images[2], np.full((120, 40, 1), 255, np.uint8)], -1)  # RGBA
    maps = predictor(images)
    assert [m.shape for m in maps] == sizes
    for m in maps[:3]:
        assert m.dtype == np.float32 and m.min() >= 0 and m.max() == pytest.approx(1.0)
    assert predictor._predict.jitted._cache_size() == 1


def test_fewer_images_than_a_batch_are_computed_as_the_next_power_of_two(model_file):
    """One image was padded to a whole batch: 8 images' compute for one (7.6 s against 0.8 s
    on a 2-core CPU at 480×640). A run longer than a batch still compiles once."""
    predictor = Predictor.load(model_file, batch_size=8)
    computed = []
    original = predictor._predict
    predictor._predict = lambda v, batch: computed.append(len(batch)) or original(v, batch)
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (30 + i, 50, 3), dtype=np.uint8) for i in range(11)]
    one = predictor(images[0])
    three = predictor(images[:3])
    eleven = predictor(images)
    assert computed == [1, 4, 8, 8]  # the last 3 of 11 go in the batch already compiled
    predictor._predict = original
    assert predictor.num_compilations == 3
    for got, want in zip([one] + three, eleven[:1] + eleven[:3]):  # padding changes no map
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert [predictor.padded_size(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert Predictor.load(model_file, batch_size=10).padded_size(9) == 10
    # whole_batches (the command's runs of several inputs): one program for every call.
    predictor.whole_batches = True
    predictor._predict = lambda v, batch: computed.append(len(batch)) or original(v, batch)
    np.testing.assert_allclose(predictor(images[0]), one, rtol=1e-5, atol=1e-6)
    assert computed[-1] == 8


def test_the_next_batch_is_on_the_device_before_this_ones_maps_are_fetched(model_file):
    predictor = Predictor.load(model_file, batch_size=2)
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8) for _ in range(5)]
    events = []
    original = predictor.dispatch_letterboxed
    predictor.dispatch_letterboxed = lambda batch: events.append(("dispatch", len(batch))) or original(batch)

    def gathered():
        for i, image in enumerate(images):
            events.append(("gather", i))
            yield image

    streamed = []
    for image, raw in predictor.stream(gathered(), lambda image: letterbox(image, INPUT)):
        events.append(("map", len(streamed)))
        streamed.append((image, raw))
    assert events == [("gather", 0), ("gather", 1), ("dispatch", 2),
                      ("gather", 2), ("gather", 3), ("dispatch", 2), ("map", 0), ("map", 1),
                      ("gather", 4), ("dispatch", 2), ("map", 2), ("map", 3), ("map", 4)]
    assert all(image is original_image for (image, _), original_image in zip(streamed, images))
    for image, raw in streamed:  # the same maps as one image at a time
        alone = predictor.predict_letterboxed(letterbox(image, INPUT)[None])[0]
        np.testing.assert_allclose(raw, alone, rtol=1e-5, atol=1e-6)


def test_an_image_that_cannot_be_read_ends_the_stream_after_the_maps_before_it(model_file):
    """The maps of the good images before it were lost (the batch being assembled and the one
    held back), and an array's error did not say which item it was."""
    predictor = Predictor.load(model_file, batch_size=2)

    def images():
        for i in range(5):
            yield np.full((20, 20 + i, 3), 40 * i, np.uint8)
        yield np.full((4, 4), np.nan)
        yield np.zeros((20, 20, 3), np.uint8)

    got = []
    with pytest.raises(ValueError, match=r"^image 5: image array contains NaN or Inf values"):
        for saliency in predictor.iter_maps(images()):
            got.append(saliency)
    assert [m.shape for m in got] == [(20, 20 + i) for i in range(5)]
    with pytest.raises(TypeError, match="letterboxed batches are uint8"):  # was read as black
        predictor.predict_letterboxed(np.zeros((1, *INPUT, 3), np.float32))
    with pytest.raises(TypeError, match="letterbox takes uint8 images, got float32"):
        letterbox(np.zeros((10, 10, 3), np.float32), INPUT)  # PIL: "Cannot handle this data type"


def test_a_single_image_gives_a_single_map(model_file):
    predictor = Predictor.load(model_file, batch_size=1)
    out = predictor(np.zeros((20, 30, 3), np.uint8))
    assert isinstance(out, np.ndarray) and out.shape == (20, 30)
    # Bytes were 1 "image" per byte ("image 0: expected an H×W… got shape ()"), a dict its
    # keys, a number "int object is not iterable".
    with pytest.raises(TypeError, match=r"^got bytes: pass a file path, or PIL.Image.open"):
        predictor(b"photo.jpg")
    for wrong, name in [({"a": out}, "dict"), (7, "int"), ({"a.jpg"}, "set")]:
        with pytest.raises(TypeError, match=rf"^got an object of type {name}: pass an image \("):
            predictor(wrong)
    with pytest.raises(TypeError, match=r"^image 1: got bytes: pass a file path"):  # in a list
        predictor([out, b"photo.jpg"])
    assert [m.shape for m in predictor(iter([out, out[:5]]))] == [(20, 30), (5, 30)]


@pytest.mark.parametrize("size", [(480, 640), (300, 640), (640, 300), (1080, 1920), (5, 5)])
def test_letterbox_geometry_is_the_originals(size):
    (rows, cols), (top, left) = letterbox_geometry(*size, (480, 640))
    r, c = size
    if r / 480 > c / 640:
        assert (rows, cols) == (480, (c * 480) // r)
    else:
        assert (rows, cols) == ((r * 640) // c, 640)
    assert top == (480 - rows) // 2 and left == (640 - cols) // 2


def test_letterbox_centres_on_a_zero_canvas():
    image = np.full((10, 40, 3), 200, np.uint8)
    boxed = letterbox(image, (48, 64))
    # 10×40 → 16×64, rows 16..31 filled.
    assert boxed.shape == (48, 64, 3)
    assert (boxed[16:32] == 200).all() and (boxed[:16] == 0).all() and (boxed[32:] == 0).all()
    # Enlarged bilinearly (half-pixel centres, as PIL and OpenCV do), not by nearest pixels.
    ramp = np.broadcast_to(np.linspace(0, 250, 40), (10, 40)).round().astype(np.uint8)
    pos = np.clip((np.arange(64) + 0.5) * 40 / 64 - 0.5, 0, 39)
    lo = np.floor(pos).astype(int)
    hi, frac = np.minimum(lo + 1, 39), pos - lo
    want = ramp[0, lo] * (1 - frac) + ramp[0, hi] * frac
    got = letterbox(ramp, (48, 64))[16:32]
    assert np.abs(got - want).max() <= 1, np.abs(got - want).max()


def test_the_training_target_is_the_map_averaged_down_over_255():
    """A map at the model's size, shrunk 8× by PIL's bilinear filter (a triangle 8 pixels
    wide each side, rows then columns, rounded to bytes in between) and divided by 255: not
    by its own maximum (a map peaking at 128 stays at 128/255), not sampled by nearest pixel."""
    smap = np.random.default_rng(6).integers(0, 129, (48, 64)).astype(np.uint8)

    def shrink(a, axis, n_out):  # PIL's ImagingResample with the bilinear filter, per axis
        n_in = a.shape[axis]
        scale = n_in / n_out
        rows = []
        for i in range(n_out):
            centre = (i + 0.5) * scale
            x = np.arange(max(int(centre - scale + 0.5), 0), min(int(centre + scale + 0.5), n_in))
            w = np.maximum(1 - np.abs((x - centre + 0.5) / scale), 0)
            rows.append(np.tensordot(np.take(a, x, axis), w / w.sum(), ([axis], [0])))
        return np.clip(np.round(np.stack(rows, axis)), 0, 255)

    want = shrink(shrink(smap.astype(np.float64), 1, 8), 0, 6) / 255
    got = ground_truth_map(smap, (48, 64), (6, 8))
    assert got.dtype == np.float32 and got.shape == (6, 8)
    assert np.abs(got - want).max() <= 1 / 255 + 1e-7, np.abs(got - want).max() * 255


def test_normalize_is_the_conventions_of_the_weights():
    """caffe: BGR minus the ImageNet BGR means, unscaled; torch: RGB / 255, standardised."""
    rng = np.random.default_rng(4)
    x = (np.arange(3) * 60 + 10 + rng.integers(0, 50, (2, 4, 5, 3))).astype(np.uint8)
    caffe = np.stack([x[..., 2] - 103.939, x[..., 1] - 116.779, x[..., 0] - 123.68], -1)
    np.testing.assert_allclose(np.asarray(normalize(x, "caffe")), caffe, atol=1e-4)
    torch = np.stack([(x[..., c] / 255 - m) / s for c, m, s in
                      zip(range(3), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))], -1)
    np.testing.assert_allclose(np.asarray(normalize(jnp.asarray(x), "torch")), torch, atol=1e-5)


def test_postprocess_undoes_the_letterbox():
    """A map that is 1 exactly on the letterboxed image area comes back ~uniform."""
    (rows, cols), (top, left) = letterbox_geometry(30, 120, (48, 64))
    canvas = np.zeros((48, 64))
    canvas[top:top + rows, left:left + cols] = 1.0
    small = canvas.reshape(6, 8, 8, 8).mean(axis=(1, 3))
    out = postprocess(small, (30, 120))
    assert out.shape == (30, 120)
    assert out[7:-7].min() == pytest.approx(1.0)  # the zero bands are cropped away
    assert out.min() > 0.5


def test_postprocess_is_the_originals_for_tall_wide_and_one_row_maps():
    """A map of one row or column (an input 8 pixels high or wide) was squeezed to 1-D and
    crashed ("not enough values to unpack")."""
    from reference_numpy import original_postprocess
    rng = np.random.default_rng(5)
    for shape, size in [((6, 8), (120, 30)), ((6, 8), (30, 120)), ((1, 5), (8, 40)),
                        ((5, 1), (41, 9))]:
        small = rng.random(shape)
        want = original_postprocess(small, *size)
        np.testing.assert_allclose(postprocess(small, size), want, rtol=1e-6, atol=1e-7)
        # The model's shapes for one image, where they are not ambiguous ((1, 5, 1) is 1×5×1).
        for extra in (small[..., None], small[None], small[None, ..., None])[:3 if shape[1] > 1 else 1]:
            np.testing.assert_allclose(postprocess(extra, size), want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"expected one h×w map .*, got shape \(2, 6, 8\)"):
        postprocess(rng.random((2, 6, 8)), (10, 10))


def test_postprocess_of_a_long_strip_needs_memory_for_the_strip_only():
    import tracemalloc

    from reference_numpy import original_postprocess
    small = np.random.default_rng(0).random((60, 80))
    np.testing.assert_allclose(postprocess(small, (2, 4000)), original_postprocess(small, 2, 4000),
                               rtol=1e-6)
    tracemalloc.start()
    out = postprocess(small, (2, 100_000))  # the whole cover resize would be 75000 × 100000
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.shape == (2, 100_000) and peak < 200e6, peak


def test_metadata_round_trips_and_a_model_without_prior_loads_as_one(tmp_path):
    # Every metadata value is written, False, 0 and [] included: dropping falsy values would
    # read prior=False back as the default True (and build a model its file cannot fill).
    from mlnet_jax.weights_file import read_weights
    metadata = {"model": "mlnet", "source": "", "preprocessing": "torch", "pooling": "standard",
                "prior": False, "width_multiplier": 0.125, "input_size": list(INPUT),
                "empty": [], "zero": 0}
    model = MLNet(prior=False, width_multiplier=0.125)
    rng = np.random.default_rng(0)  # shapes only: init itself takes seconds on a CPU
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                          jax.eval_shape(model.init, jax.random.key(0),
                                         jnp.zeros((1, *INPUT, 3)))["params"])
    save_weights(tmp_path / "m.npz", params, metadata)
    read_params, read_metadata = read_weights(tmp_path / "m.npz")
    assert {k: read_metadata[k] for k in metadata} == metadata
    jax.tree.map(np.testing.assert_array_equal, read_params, params)
    _, _, info = load_model(tmp_path / "m.npz")
    assert info.prior is False and info.width_multiplier == 0.125


def test_a_vgg_only_file_is_not_a_model(tmp_path):
    path = tmp_path / "vgg.npz"
    save_weights(path, {"backbone": {}}, {"model": "vgg16", "source": "x",
                                          "preprocessing": "torch", "pooling": "standard"})
    with pytest.raises(WeightsError, match="not a full ML-Net"):
        load_model(path)
