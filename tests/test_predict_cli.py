"""``python -m mlnet_jax.predict`` on images and folders: sizes, modes, EXIF, mirrored paths,
overlays, bad files, limits, atomic outputs; and the image reading and overlay helpers."""

import contextlib
import errno
import io
import shutil
import struct
import subprocess
import sys
import types
import warnings
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mlnet_jax import MLNet
from mlnet_jax.compute_dtype import cpu_bfloat16_convolutions_work
from mlnet_jax.image_io import ImageError, load_image, to_rgb
from mlnet_jax.inference import Predictor
from mlnet_jax.overlay import blur_map, overlay
from mlnet_jax.predict import Report, main, plan_outputs, predict_images
from mlnet_jax.weights_file import save_weights

INPUT = (32, 32)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A full ML-Net (VGG ¼ wide, 32×32 input: quick to compile) with a positive readout bias
    so that maps are never all zero. Weights are drawn with NumPy (fan-average normal, zero
    biases and prior): compiling ``model.init`` costs ~20 s on a CPU."""
    model = MLNet(width_multiplier=0.25)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *INPUT, 3)))["params"]
    rng = np.random.default_rng(0)

    def draw(spec):
        if len(spec.shape) != 4:
            return np.zeros(spec.shape, np.float32)
        *window, fan_in, fan_out = spec.shape
        std = np.sqrt(2.0 / (np.prod(window) * (fan_in + fan_out)))
        return rng.normal(0.0, std, spec.shape).astype(np.float32)

    params = jax.tree.map(draw, shapes)
    params["head"]["readout"]["bias"] = np.full((1,), 0.1, np.float32)
    path = tmp_path_factory.mktemp("model") / "mlnet.npz"
    save_weights(path, params, {"model": "mlnet", "source": "test", "preprocessing": "caffe",
                                "pooling": "standard", "prior": True, "input_size": list(INPUT),
                                "width_multiplier": 0.25})
    return path


def _noise(rows, cols, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    shape = (rows, cols) if channels == 1 else (rows, cols, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _png_header_only(path: Path, width: int, height: int, text: bytes = b"") -> None:
    """A tiny PNG file that declares ``width`` × ``height`` 1-bit pixels (a decompression
    bomb), with a tEXt chunk if ``text``."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + (chunk(b"tEXt", text) if text else b"")
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _exif_rotated_jpeg(path: Path, rows: int, cols: int) -> None:
    """A JPEG stored as rows×cols whose EXIF orientation 6 says: display turned 90° (cols×rows)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_noise(rows, cols, seed=5)).save(path, format="JPEG", exif=exif.tobytes())


def _predict(model_file, input_path, output, *extra):
    return main(["--checkpoint", str(model_file), "--input", str(input_path), "--output", str(output),
                 "--batch-size", "4", "--compilation-cache", "", "--workers", "2", *extra])


# --------------------------------------------------------------------------- folders of images

def test_a_folder_of_modes_sizes_and_orientations(model_file, tmp_path, capsys):
    src, out = tmp_path / "photos", tmp_path / "maps"
    (src / "a" / "b").mkdir(parents=True)
    (src / "c").mkdir()
    expected = {}  # relative stem path → (rows, cols) as displayed

    def add(relative, image, size, **save):
        (src / relative).parent.mkdir(parents=True, exist_ok=True)
        image.save(src / relative, **save)
        expected[str(Path(relative).with_suffix(""))] = size

    add("rgb.jpg", Image.fromarray(_noise(30, 50)), (30, 50))
    add("a/grey.png", Image.fromarray(_noise(17, 9, 1)), (17, 9))
    add("a/b/rgba.png", Image.fromarray(_noise(24, 40, 4)), (24, 40))
    add("a/b/palette.gif", Image.fromarray(_noise(20, 20)).convert("P"), (20, 20))
    add("c/cmyk.jpg", Image.fromarray(_noise(16, 28)).convert("CMYK"), (16, 28))
    add("c/sixteen.png", Image.fromarray((_noise(21, 13, 1).astype(np.uint16) * 257)), (21, 13))
    add("c/photo.tiff", Image.fromarray(_noise(33, 12)), (33, 12))
    add("c/web.webp", Image.fromarray(_noise(14, 26)), (14, 26))
    add("tiny.bmp", Image.fromarray(_noise(1, 1)), (1, 1))
    _exif_rotated_jpeg(src / "a" / "turned.jpg", 20, 44)
    expected["a/turned"] = (44, 20)
    (src / "notes.txt").write_text("not an image, skipped by extension")
    # Hidden files and folders are not inputs: macOS's "._" resource forks (not images) would
    # be errors, and a hidden cache folder's pictures would get maps.
    (src / "._rgb.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble, not a JPEG")
    (src / ".cache").mkdir()
    Image.fromarray(_noise(8, 8)).save(src / ".cache" / "thumb.png")

    assert _predict(model_file, src, out, "--overlay") == 0
    err = capsys.readouterr().err
    assert "error" not in err and "skipped 1 file" in err

    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted([f"{k}.png" for k in expected] + [f"{k}_overlay.png" for k in expected])
    for stem, (rows, cols) in expected.items():
        saliency = Image.open(out / f"{stem}.png")
        assert saliency.mode == "L" and saliency.size == (cols, rows), stem
        values = np.asarray(saliency)
        if rows * cols > 1:
            assert values.max() > values.min(), f"{stem}: constant map"
        assert values.max() == 255, stem  # maps are scaled to a maximum of 1
        blended = Image.open(out / f"{stem}_overlay.png")
        assert blended.mode == "RGB" and blended.size == (cols, rows), stem
    # For a benchmark submission: the stimuli as stored, as MATLAB and the benchmarks read them
    # (an EXIF rotation was applied with no way to turn it off: a map of the wrong shape).
    assert _predict(model_file, src / "a" / "turned.jpg", tmp_path / "stored", "--overlay",
                    "--ignore-exif") == 0
    for name in ("turned.png", "turned_overlay.png"):
        assert Image.open(tmp_path / "stored" / name).size == (44, 20), name
    overlay = np.asarray(Image.open(tmp_path / "stored" / "turned_overlay.png"), np.float64)
    stored = np.asarray(Image.open(src / "a" / "turned.jpg"), np.float64)
    assert np.corrcoef(overlay.ravel(), stored.ravel())[0, 1] > 0.5  # the photo, not turned


def test_an_overlay_decoded_again_is_as_stored_with_ignore_exif(model_file, tmp_path,
                                                               monkeypatch):
    # A photo above KEEP_FOR_OVERLAY is decoded a second time to write its overlay: that
    # decoding must leave it unturned too, as the map was made (else the overlay is turned).
    import mlnet_jax.predict as predict_module
    _exif_rotated_jpeg(tmp_path / "turned.jpg", 20, 44)
    assert _predict(model_file, tmp_path / "turned.jpg", tmp_path / "kept", "--overlay",
                    "--ignore-exif") == 0
    monkeypatch.setattr(predict_module, "KEEP_FOR_OVERLAY", 0)
    assert _predict(model_file, tmp_path / "turned.jpg", tmp_path / "again", "--overlay",
                    "--ignore-exif") == 0
    for name in ("turned.png", "turned_overlay.png"):
        again = Image.open(tmp_path / "again" / name)
        assert again.size == (44, 20), name
        np.testing.assert_array_equal(np.asarray(again),
                                      np.asarray(Image.open(tmp_path / "kept" / name)), name)


def test_bfloat16_maps_are_computed_in_bfloat16_and_stay_close_to_float32(model_file, tmp_path):
    if not cpu_bfloat16_convolutions_work():
        pytest.skip(f"jax {jax.__version__}'s CPU backend returns NaN in bfloat16 (compute_dtype.py)")
    src = tmp_path / "photos"
    src.mkdir()
    for i, (rows, cols) in enumerate([(32, 32), (40, 24), (19, 57)]):
        Image.fromarray(_noise(rows, cols, seed=10 + i)).save(src / f"{i}.png")
    maps = {}
    for dtype in ("float32", "bfloat16"):
        assert _predict(model_file, src, tmp_path / dtype, "--dtype", dtype) == 0
        maps[dtype] = [np.asarray(Image.open(tmp_path / dtype / f"{i}.png"), np.int16)
                       for i in range(3)]
    differences = np.concatenate([np.abs(a - b).ravel()
                                  for a, b in zip(maps["float32"], maps["bfloat16"])])
    assert differences.max() > 0  # the bfloat16 run really computed in bfloat16
    assert differences.mean() < 1.5 and np.percentile(differences, 99) <= 10, (
        differences.mean(), np.percentile(differences, 99), differences.max())


def test_bfloat16_is_refused_with_the_reason_where_the_cpu_backend_gets_it_wrong(
        model_file, tmp_path, capsys, monkeypatch):
    import mlnet_jax.compute_dtype
    from mlnet_jax.errors import UserError

    monkeypatch.setattr(mlnet_jax.compute_dtype, "cpu_bfloat16_convolutions_work", lambda: False)
    Image.fromarray(_noise(32, 32)).save(tmp_path / "a.png")
    assert _predict(model_file, tmp_path / "a.png", tmp_path / "out", "--dtype", "bfloat16") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --dtype=bfloat16: this JAX's CPU backend") and "use float32" in line
    assert not (tmp_path / "out" / "a.png").exists()
    with pytest.raises(UserError, match="dtype=bfloat16: this JAX's CPU backend"):  # the Python API
        Predictor.load(model_file, dtype=jnp.bfloat16)
    assert Predictor.load(model_file, dtype=jnp.float32).info.input_size == INPUT


def test_the_cpu_bfloat16_probe_agrees_with_the_model_in_bfloat16(model_file):
    # The probe stands in for the model: where it is finite, so are the model's bfloat16 maps.
    from mlnet_jax.inference import load_model

    _, variables, info = load_model(model_file)
    model = info.build(jnp.bfloat16)
    images = jnp.asarray(np.stack([_noise(*INPUT, seed=s) for s in range(4)]), jnp.float32)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    finite = all(np.isfinite(np.asarray(apply(variables, images), np.float32)).all()
                 for _ in range(3))
    assert finite == cpu_bfloat16_convolutions_work()


def test_one_compilation_serves_every_size(model_file, tmp_path):
    predictor = Predictor.load(model_file, batch_size=3)
    sizes = [(30, 50), (7, 300), (300, 7), (1, 1), (64, 48), (32, 32), (5, 9)]
    sources = []
    for i, (rows, cols) in enumerate(sizes):
        sources.append(tmp_path / f"im{i}.png")
        Image.fromarray(_noise(rows, cols, seed=i)).save(sources[-1])
    jobs = plan_outputs(sources, tmp_path, tmp_path / "out", overlay=False, map_video=False)
    report = Report()
    predict_images(predictor, jobs, report=report, workers=2, progress=False)
    assert report.done == len(sizes) and not report.failed
    assert predictor.num_compilations == 1
    for job, (rows, cols) in zip(jobs, sizes):
        assert Image.open(job.map_path).size == (cols, rows)


def test_large_photos_are_decoded_and_written_a_pixel_budget_at_a_time(model_file, tmp_path,
                                                                        monkeypatch):
    import tracemalloc

    import mlnet_jax.predict as predict_module
    budgets = []

    class Recorded(predict_module.PixelBudget):
        def __init__(self, limit):
            super().__init__(limit)
            budgets.append(self)

    monkeypatch.setattr(predict_module, "PixelBudget", Recorded)
    predictor = Predictor.load(model_file, batch_size=4)
    rows, cols, n = 600, 800, 12
    decoded_mb = rows * cols * 3 / 1e6
    sources = []
    for i in range(n):
        sources.append(tmp_path / f"im{i:02d}.png")
        Image.fromarray(_noise(rows, cols, seed=i)).save(sources[-1])

    def run(out, overlay, **kwargs):
        jobs = plan_outputs(sources, tmp_path, tmp_path / out, overlay=overlay, map_video=False)
        report = Report()
        tracemalloc.start()
        predict_images(predictor, jobs, report=report, workers=4, progress=False, **kwargs)
        peak_mb = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()
        assert report.done == n and not report.failed
        outputs = [p.read_bytes() for job in jobs for p in (job.map_path, job.overlay_path) if p]
        return outputs, peak_mb

    run("warm", False)
    reference, _ = run("all_at_once", True, pixels_at_once=10**12)
    one = rows * cols
    # Maps only: the pixels are dropped once letterboxed, one image is decoded or written at
    # a time: far below the 12 decoded images the queues could hold.
    maps, peak_mb = run("maps", False, pixels_at_once=one)
    assert maps == reference[::2] and peak_mb < 10 * decoded_mb, peak_mb
    assert budgets[-1].peak == one
    # Overlays of photos above KEEP_FOR_OVERLAY are decoded again to be written, not kept.
    monkeypatch.setattr(predict_module, "KEEP_FOR_OVERLAY", one - 1)
    overlays, peak_mb = run("overlays", True, pixels_at_once=one)
    assert overlays == reference and peak_mb < 20 * decoded_mb, peak_mb
    # Two images fit a budget of 2.5: they run side by side, never three.
    run("two", False, pixels_at_once=5 * one // 2)
    assert budgets[-1].peak == 2 * one


def test_a_huge_photos_map_and_overlay_are_made_in_bands_of_rows(tmp_path):
    """Writing a 6-megapixel photo's map and overlay allocates under 24 bytes a pixel beyond
    the decoded photo (whole-image float64 and float32 passes took 48: 7 GB for a
    150-megapixel photo), with the values of the whole-image formulas."""
    import tracemalloc

    from mlnet_jax.predict import Job, _Decoded, _finish_image
    rows, cols = 2000, 3000
    image = _noise(rows, cols)
    raw = np.random.default_rng(1).random((4, 4)).astype(np.float32)
    job = Job(tmp_path / "x.jpg", False, tmp_path / "x.png", tmp_path / "x_overlay.png")
    tracemalloc.start()
    _finish_image(job, _Decoded((rows, cols), image), raw, 0.0, 10 ** 9, True)
    peak = tracemalloc.get_traced_memory()[1] / (rows * cols)
    tracemalloc.stop()
    assert peak < 24, peak
    # The same values as the formulas on the whole image (float64 resize, then float32).
    from mlnet_jax.resize import resize_bilinear
    whole = resize_bilinear(raw.astype(np.float64), (3000, 3000), (500, 0, 2000, 3000))
    whole = (whole / whole.max()).astype(np.float32)
    grey = np.asarray(Image.open(tmp_path / "x.png"), np.float32) / 255
    np.testing.assert_allclose(grey, whole, atol=0.5 / 255 + 1e-6)
    weight = (0.6 * np.clip(whole, 0, 1))[..., None]
    from mlnet_jax.overlay import heatmap
    want = np.clip(np.round(image * (1 - weight) + heatmap(whole) * weight), 0, 255)
    got = np.asarray(Image.open(tmp_path / "x_overlay.png"), np.float32)
    # (a map value one float32 step away can round to the next grey level, whose colour in
    # the colormap is a few levels off)
    assert np.abs(got - want).max() <= 3 and np.mean(got != want) < 1e-3


def test_bad_files_are_named_once_and_the_good_ones_written(model_file, tmp_path, capsys,
                                                          monkeypatch):
    # Spy on Predictor.load: a --batch-size not passed on would load the default batch of 8.
    loaded = []
    real_load = Predictor.load.__func__
    monkeypatch.setattr(Predictor, "load", classmethod(
        lambda cls, *args, **kwargs: loaded.append(real_load(cls, *args, **kwargs)) or loaded[-1]))
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.fromarray(_noise(20, 30)).save(src / "good1.jpg")
    Image.fromarray(_noise(12, 8)).save(src / "good2.png")
    buffer = io.BytesIO()
    Image.fromarray(_noise(64, 64)).save(buffer, format="JPEG")
    (src / "corrupt.jpg").write_bytes(buffer.getvalue()[:300])
    (src / "empty.png").write_bytes(b"")
    (src / "text.jpg").write_text("this is a text file with an image's name\n")

    assert _predict(model_file, src, out, "--batch-size", "3") == 2
    assert [p.batch_size for p in loaded] == [-(-3 // jax.device_count()) * jax.device_count()]
    err = capsys.readouterr().err
    # The summary counts the images written, not the jobs (counting every job as done would
    # say 5 of 5).
    images = [p for p in src.iterdir() if p.suffix in (".jpg", ".png")]
    good = sum(1 for p in images if p.name.startswith("good"))
    assert f"{good} of {len(images)} images in" in err, err
    for bad in ("corrupt.jpg", "empty.png", "text.jpg"):
        assert err.count(bad) == 1, (bad, err)
        line = next(l for l in err.splitlines() if bad in l)
        assert line.startswith("error: ") and str(src / bad) in line
    assert "Traceback" not in err and "3 of 5 inputs failed" in err
    assert sorted(p.name for p in out.iterdir()) == ["good1.png", "good2.png"]


def test_a_decompression_bomb_is_refused_by_the_limit(model_file, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    _png_header_only(src / "bomb.png", 30000, 30000)     # past Pillow's own limit too
    _png_header_only(src / "large.png", 13000, 12000)    # past ours (150 MP), not Pillow's
    Image.fromarray(_noise(10, 10)).save(src / "fine.png")
    assert _predict(model_file, src, tmp_path / "out") == 2
    err = capsys.readouterr().err
    for name, size in (("bomb.png", "900,000,000 pixels"), ("large.png", "13000×12000 pixels")):
        lines = [l for l in err.splitlines() if name in l]
        assert len(lines) == 1 and size in lines[0] and "150,000,000" in lines[0], err
    assert (tmp_path / "out" / "fine.png").is_file()
    # The limit is an option: a low one refuses an ordinary image.
    assert _predict(model_file, src / "fine.png", tmp_path / "out2", "--max-pixels", "99") == 2
    assert "over the limit of 99 pixels" in capsys.readouterr().err


def test_a_limit_above_pillows_own_applies_and_pillows_is_restored(model_file, tmp_path, capsys):
    pillows = Image.MAX_IMAGE_PIXELS
    beyond = 2 * pillows + 1  # Pillow refuses to open this many pixels under its own limit
    _png_header_only(tmp_path / "huge.png", beyond, 1)
    assert _predict(model_file, tmp_path / "huge.png", tmp_path / "out",
                    "--max-pixels", str(beyond)) == 2  # it opens, but holds no pixel data
    line = next(l for l in capsys.readouterr().err.splitlines() if "huge.png" in l)
    assert "over the limit" not in line and "truncated" in line, line
    assert Image.MAX_IMAGE_PIXELS == pillows  # a caller of main() keeps its own setting


def test_pillows_bomb_warning_never_escapes_a_run_even_when_a_thread_loses_its_filter(
        model_file, tmp_path, capsys, monkeypatch):
    import mlnet_jax.image_io as image_io

    # What a decoding thread sees when another thread leaves catch_warnings just before it
    # opens its file: its own "ignore" filter is gone.
    monkeypatch.setattr(image_io, "warnings", types.SimpleNamespace(
        catch_warnings=contextlib.nullcontext, simplefilter=lambda *args, **kwargs: None))
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):  # past the pixel count at which Pillow warns, not the one where it refuses
        _png_header_only(src / f"large{i}.png", 10000, 10000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _predict(model_file, src, tmp_path / "out", "--max-pixels", "1000") == 2
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    errors = [l for l in capsys.readouterr().err.splitlines() if "large" in l]
    assert len(errors) == 3 and all("over the limit of 1,000 pixels" in l for l in errors), errors


def test_same_stems_do_not_overwrite_and_outputs_inside_the_input_are_not_inputs(
        model_file, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_noise(10, 20)).save(src / "x.jpg")
    Image.fromarray(_noise(30, 6)).save(src / "x.png")
    out = src / "maps"
    for run in range(2):  # the second run must not treat the first run's maps as inputs
        assert _predict(model_file, src, out, "--overlay") == 0
        if run == 0:
            # Nor a photo the user put in the output folder: were that folder walked, the
            # photo would get a map (and an overlay) of its own, or be named in a note.
            Image.fromarray(_noise(8, 8, seed=3)).save(out / "mine.jpg")
    err = capsys.readouterr().err
    assert "mine" not in err, err
    assert sorted(p.name for p in out.rglob("mine*")) == ["mine.jpg"]
    (out / "mine.jpg").unlink()
    assert "note: " in err and "x.png.png" in err
    assert f"note: the output folder {out} lies inside the input; files in it are not read" in err
    assert sorted(p.name for p in out.rglob("*")) == [
        "x.png", "x.png.png", "x.png_overlay.png", "x_overlay.png"]
    assert Image.open(out / "x.png").size == (20, 10)
    assert Image.open(out / "x.png.png").size == (6, 30)
    # Names that differ only in case claim the same output on macOS and Windows (X.png and
    # x.jpg would both write x.png there): the later one is renamed.
    cased, cased_out = tmp_path / "cased", tmp_path / "cased_maps"
    cased.mkdir()
    Image.fromarray(_noise(10, 20)).save(cased / "X.png")
    Image.fromarray(_noise(30, 6)).save(cased / "x.jpg")
    assert _predict(model_file, cased, cased_out) == 0
    assert "they are named x.jpg.png" in capsys.readouterr().err
    assert sorted(p.name for p in cased_out.iterdir()) == ["X.png", "x.jpg.png"]
    assert Image.open(cased_out / "X.png").size == (20, 10)
    assert Image.open(cased_out / "x.jpg.png").size == (6, 30)


def test_no_output_replaces_a_photo_or_a_folder_and_odd_names_are_shown_escaped(
        model_file, tmp_path, capsys):
    # One photo predicted into its own folder, where another photo has its map's name.
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(_noise(10, 20)).save(folder / "x.jpg")
    Image.fromarray(_noise(30, 40, seed=1)).save(folder / "x.png")
    photo = (folder / "x.png").read_bytes()
    for _ in range(2):  # a rerun replaces its own map, never the photo
        assert _predict(model_file, folder / "x.jpg", folder) == 0
        assert (folder / "x.png").read_bytes() == photo
        assert sorted(p.name for p in folder.iterdir()) == ["x.jpg", "x.jpg.png", "x.png"]
    assert "they are named x.jpg.png" in capsys.readouterr().err
    # In an output folder of its own, a map of ours is replaced; a user's file of that name
    # is not (the map is named after the photo's full name instead, with a note).
    assert _predict(model_file, folder / "x.jpg", tmp_path / "maps") == 0
    assert _predict(model_file, folder / "x.jpg", tmp_path / "maps") == 0
    assert [p.name for p in (tmp_path / "maps").iterdir()] == ["x.png"]
    Image.fromarray(_noise(5, 5)).save(tmp_path / "maps" / "x.png")
    users = (tmp_path / "maps" / "x.png").read_bytes()
    capsys.readouterr()
    assert _predict(model_file, folder / "x.jpg", tmp_path / "maps") == 0
    assert (tmp_path / "maps" / "x.png").read_bytes() == users
    assert Image.open(tmp_path / "maps" / "x.jpg.png").size == (20, 10)
    assert "they are named x.jpg.png" in capsys.readouterr().err
    # An input that failed wrote nothing under either name: no note for it.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "y.jpg").write_bytes(b"\xff\xd8 cut short")
    (broken / "y.png").write_bytes(b"\x89PNG cut short")
    assert _predict(model_file, broken, tmp_path / "broken_maps") == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 2 and "note:" not in err, err
    # Our tag is read from the chunks, not by decoding: a huge map of ours is still ours.
    from mlnet_jax.predict import is_our_output
    _png_header_only(tmp_path / "huge.png", 30000, 30000, b"Software\0mlnet_jax")
    _png_header_only(tmp_path / "other.png", 30000, 30000, b"Software\0GIMP")
    assert is_our_output(tmp_path / "huge.png") and not is_our_output(tmp_path / "other.png")
    # A map whose name is a folder another output needs.
    src = tmp_path / "in"
    (src / "x.png").mkdir(parents=True)
    Image.fromarray(_noise(10, 20)).save(src / "x.jpg")
    Image.fromarray(_noise(12, 8)).save(src / "x.png" / "y.jpg")
    assert _predict(model_file, src, tmp_path / "out") == 0
    assert Image.open(tmp_path / "out" / "x.jpg.png").size == (20, 10)
    assert Image.open(tmp_path / "out" / "x.png" / "y.png").size == (8, 12)
    # A newline in a name is shown escaped, so the line names that file, not its neighbour.
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "bad\nname.jpg").write_bytes(b"")
    Image.fromarray(_noise(10, 20)).save(odd / "bad name.jpg")
    assert _predict(model_file, odd, tmp_path / "odd_out") == 2
    [line] = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error: ")]
    assert line == f"error: {odd}/bad\\nname.jpg: empty file (0 bytes)"
    # Something that exists but is neither a file nor a folder.
    assert main(["--checkpoint", str(model_file), "--input", "/dev/null", "--output",
                 str(tmp_path / "o")]) == 2
    assert "--input /dev/null: not a file or folder" in capsys.readouterr().err


@pytest.mark.timeout(120)  # the pipe blocked the run
def test_a_folder_run_skips_earlier_outputs_and_files_that_are_not_regular(model_file, tmp_path,
                                                                          capsys):
    """Maps written beside a single photo are outputs, not photos, to a later folder run; a
    named pipe with an image's name would block its reader (the run hung): both skipped, with
    a note each, every photo predicted."""
    import os
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_noise(10, 20)).save(src / "x.jpg")
    assert _predict(model_file, src / "x.jpg", src, "--overlay") == 0  # x.png, x_overlay.png
    Image.fromarray(_noise(12, 8, seed=2)).save(src / "y.png")  # a photo of the same kind
    os.mkfifo(src / "z.jpg")
    capsys.readouterr()
    assert _predict(model_file, src, tmp_path / "out") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.png", "y.png"]
    err = capsys.readouterr().err
    assert f"skipped 2 file(s) that are maps, overlays or videos this command wrote ({src / 'x.png'}, …)" in err
    assert f"skipped 1 file(s) that are not regular files (pipes, sockets, devices: reading one can block) ({src / 'z.jpg'})" in err


def test_a_name_too_long_for_its_overlay_fails_that_file_alone(model_file, tmp_path, capsys):
    """A legal 250-byte name whose overlay's name is over the file system's 255 bytes: looking
    for that output in an existing folder raised, and the whole run stopped before any file."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    long = "p" * 250
    for name, seed in (("a", 1), (long, 2)):
        Image.fromarray(_noise(10, 20, seed=seed)).save(src / f"{name}.png")
    assert _predict(model_file, src, out, "--overlay") == 2
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a_overlay.png", f"{long}.png"]
    err = capsys.readouterr().err
    assert f"error: {src / f'{long}.png'}: cannot write its output (File name too long: " in err


def test_a_file_where_an_output_folder_belongs_is_named(model_file, tmp_path, capsys):
    """A file in the output tree where a subfolder's outputs go: the line said only
    "cannot write its output (File exists)", naming neither the file nor the folder."""
    src, out = tmp_path / "in", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    out.mkdir()
    Image.fromarray(_noise(10, 20)).save(src / "sub" / "x.png")
    Image.fromarray(_noise(10, 20, seed=2)).save(src / "y.png")
    (out / "sub").write_bytes(b"the user's")
    assert _predict(model_file, src, out) == 2
    err = capsys.readouterr().err
    assert (f"error: {src / 'sub' / 'x.png'}: cannot write its output (a file is where a folder "
            f"is needed: {out / 'sub'})") in err
    assert (out / "y.png").exists() and (out / "sub").read_bytes() == b"the user's"


def test_the_python_api_names_folders_and_takes_its_own_pixel_limit(model_file, tmp_path):
    Image.fromarray(_noise(20, 30)).save(tmp_path / "x.png")
    with pytest.raises(ImageError, match=f"{tmp_path}: is a folder, not an image"):
        Predictor.load(model_file)(tmp_path)
    with pytest.raises(ImageError, match=r"30×20 pixels is over the limit of 599 pixels .*"
                                         r"\(--max-pixels; max_pixels= in Python\)"):
        Predictor.load(model_file, max_pixels=599)(tmp_path / "x.png")
    assert Predictor.load(model_file, max_pixels=600)(tmp_path / "x.png").shape == (20, 30)


def test_a_colour_key_transparency_is_put_on_white():
    from mlnet_jax.image_io import to_rgb
    for mode, key, colour in (("RGB", (10, 20, 30), (10, 20, 30)), ("L", 7, 7)):
        image = Image.new(mode, (4, 2), colour)
        image.info["transparency"] = key
        assert (to_rgb(image) == 255).all(), mode
        image.info.pop("transparency")
        assert not (to_rgb(image) == 255).any(), mode
    # A palette image's transparent entry is put on white as its RGBA conversion is (not left
    # as the palette colour, black here).
    palette = Image.new("P", (3, 1), 0)
    palette.putpalette([0, 0, 0, 200, 10, 20, 30, 40, 50] + [0] * (3 * 253))
    palette.putdata([0, 1, 2])
    palette.info["transparency"] = 0
    np.testing.assert_array_equal(to_rgb(palette), to_rgb(palette.convert("RGBA")))
    assert to_rgb(palette).tolist() == [[[255, 255, 255], [200, 10, 20], [30, 40, 50]]]


def test_linked_folders_are_walked_once_and_unknown_extensions_get_a_hint(model_file, tmp_path,
                                                                         capsys):
    src, elsewhere, out = tmp_path / "in", tmp_path / "elsewhere", tmp_path / "out"
    src.mkdir()
    elsewhere.mkdir()
    Image.fromarray(_noise(10, 20)).save(src / "real.jpg")
    Image.fromarray(_noise(12, 8)).save(elsewhere / "linked.jpg")
    (src / "link").symlink_to(elsewhere, target_is_directory=True)
    (src / "loop").symlink_to(src, target_is_directory=True)  # must not be walked forever
    assert _predict(model_file, src, out) == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == [
        "link/linked.png", "real.png"]
    assert Image.open(out / "link" / "linked.png").size == (8, 12)
    (tmp_path / "clip.mpg").write_bytes(b"\x00\x00\x01\xba not a picture")
    assert _predict(model_file, tmp_path / "clip.mpg", out) == 2
    assert "videos are read by extension: .avi .m4v .mkv .mov .mp4 .webm" in capsys.readouterr().err
    # Files linked in a loop (one to itself, two to each other) stopped the whole run, no map
    # written, at "Symlink loop" (Path.resolve on Python 3.11): each is an error line instead.
    (src / "self.jpg").symlink_to("self.jpg")
    (src / "a.jpg").symlink_to("b.jpg")
    (src / "b.jpg").symlink_to("a.jpg")
    shutil.rmtree(out)
    assert _predict(model_file, src, out) == 2
    err = capsys.readouterr().err
    for name in ("self.jpg", "a.jpg", "b.jpg"):
        assert f"error: {src / name}: a loop of symbolic links\n" in err
    assert _predict(model_file, src / "self.jpg", out) == 2  # given alone: was "no such file"
    assert capsys.readouterr().err.strip() == f"error: --input {src / 'self.jpg'}: a loop of symbolic links"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == [
        "link/linked.png", "real.png"]


def test_an_existing_output_survives_a_failed_write(model_file, tmp_path, capsys, monkeypatch):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    Image.fromarray(_noise(10, 10)).save(src / "x.png")
    (out / "x.png").write_bytes(b"previous map")
    real_save = Image.Image.save

    def disk_full(self, fp, *args, **kwargs):
        if Path(fp).name.startswith(".x.png."):
            Path(fp).write_bytes(b"\x89PNG half")
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", disk_full)
    assert _predict(model_file, src, out) == 2
    err = capsys.readouterr().err
    assert "x.png" in err and "No space left on device" in err and "Traceback" not in err
    assert (out / "x.png").read_bytes() == b"previous map"
    assert [p.name for p in out.iterdir()] == ["x.png"]  # no temporary file left behind


def test_a_map_that_cannot_be_made_is_not_called_a_write_failure(model_file, tmp_path, capsys,
                                                                 monkeypatch):
    import mlnet_jax.predict
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.fromarray(_noise(10, 10)).save(src / "x.png")
    Image.fromarray(_noise(10, 10)).save(src / "y.png")

    def out_of_memory(raw, size, blur=0.0):
        raise MemoryError("Unable to allocate 55.9 GiB")

    monkeypatch.setattr(mlnet_jax.predict, "full_size_map", out_of_memory)
    assert _predict(model_file, src, out) == 2
    err = capsys.readouterr().err
    assert "cannot make its map (MemoryError: Unable to allocate 55.9 GiB)" in err
    assert "cannot write" not in err and "Traceback" not in err


def test_blur_is_applied_to_the_map_at_image_size(model_file, tmp_path):
    src = tmp_path / "x.png"
    Image.fromarray(_noise(40, 60)).save(src)
    assert _predict(model_file, src, tmp_path / "sharp", "--no-progress") == 0
    assert _predict(model_file, src, tmp_path / "soft", "--blur", "6", "--no-progress") == 0
    sharp = np.asarray(Image.open(tmp_path / "sharp" / "x.png"), np.float32)
    soft = np.asarray(Image.open(tmp_path / "soft" / "x.png"), np.float32)
    assert soft.shape == sharp.shape == (40, 60)
    assert np.abs(soft - sharp).max() > 10
    np.testing.assert_allclose(soft, 255 * blur_map(sharp / 255, 6.0), atol=2)


# --------------------------------------------------------------------------- user errors

def test_an_unwritable_output_folder_is_one_line(model_file, tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.fromarray(_noise(8, 8)).save(image)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert _predict(model_file, image, blocker / "maps") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --output") and "a_file" in err


def test_a_full_disk_stops_a_folder_run_and_the_device_running_out_of_memory_is_named(
        model_file, tmp_path, capsys, monkeypatch):
    """A full disk gave one error line per remaining file (1488 for 1500 images); the device's
    RESOURCE_EXHAUSTED got the generic line without the --batch-size advice."""
    import mlnet_jax.predict as predict_module
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(6):
        Image.fromarray(_noise(8, 8 + i)).save(src / f"{i}.png")
    real_save, saved = Image.Image.save, []

    def disk_full_after_two(self, fp, *args, **kwargs):
        if len(saved) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(fp))
        saved.append(fp)
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", disk_full_after_two)
    assert _predict(model_file, src, out, "--no-progress") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert "; stopped, with 2 maps written (each complete): free space and rerun" in err[0]
    assert len(list(out.glob("*.png"))) == 2 and not list(out.glob(".*"))  # whichever two
    monkeypatch.setattr(Image.Image, "save", real_save)
    # A huge --batch-size costs nothing with few images: they are computed as a batch of 1.
    assert _predict(model_file, src / "0.png", tmp_path / "o1", "--batch-size", str(10 ** 9)) == 0
    assert Image.open(tmp_path / "o1" / "0.png").size == (8, 8)
    capsys.readouterr()

    class JaxRuntimeError(Exception):
        pass

    def exhausted(*args, **kwargs):
        raise JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 34406400000 bytes.")

    monkeypatch.setattr(predict_module, "predict_images", exhausted)
    assert _predict(model_file, src, tmp_path / "o2") == 2
    assert capsys.readouterr().err.strip() == (
        "error: out of memory (RESOURCE_EXHAUSTED: Out of memory allocating 34406400000 bytes.); "
        "a batch holds --batch-size 4 images at the model's input size on the host and the "
        "device: use a smaller --batch-size")

    def host_exhausted(*args, **kwargs):  # NumPy's, making a batch on the host
        raise MemoryError("Unable to allocate 29.3 GiB for an array with shape (10240, 32, 32, 3)")

    monkeypatch.setattr(predict_module, "predict_images", host_exhausted)
    assert _predict(model_file, src, tmp_path / "o3", "--batch-size", "10240") == 2
    assert capsys.readouterr().err.strip() == (
        "error: out of memory (Unable to allocate 29.3 GiB for an array with shape (10240, 32, "
        "32, 3)); a batch holds --batch-size 10240 images at the model's input size on the host "
        "and the device: use a smaller --batch-size")


@pytest.mark.parametrize("args, message", [
    (["--input", "{tmp}/missing"], "no such file or folder"),
    (["--input", "{tmp}/empty_dir"], "no images or videos found (extensions: images .bmp .gif "
                                     ".jpe .jpeg .jpg .png .tif .tiff .webp, videos .avi .m4v "
                                     ".mkv .mov .mp4 .webm)"),
    (["--input", "{tmp}/empty_dir", "--output", "{tmp}/empty_dir/."], "is the --input folder"),
    (["--input", "{tmp}/x.png", "--batch-size", "0"], "--batch-size"),
    (["--input", "{tmp}/x.png", "--blur", "nan"], "--blur must be a finite number ≥ 0, got nan"),
    (["--input", "{tmp}/x.png", "--blur", "inf"], "--blur must be a finite number ≥ 0, got inf"),
    (["--input", "{tmp}/x.png", "--workers", "0"], "--workers must be at least 1, got 0"),
])
def test_input_errors_are_one_line(model_file, tmp_path, capsys, args, message):
    (tmp_path / "empty_dir").mkdir()
    Image.fromarray(_noise(8, 8)).save(tmp_path / "x.png")
    args = [a.format(tmp=tmp_path) for a in args]
    assert main(["--checkpoint", str(model_file), "--output", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err


def test_the_module_runs_and_hides_tracebacks_unless_debug(tmp_path):
    Image.fromarray(_noise(8, 8)).save(tmp_path / "x.png")
    command = [sys.executable, "-m", "mlnet_jax.predict", "--checkpoint", str(tmp_path / "nope.npz"),
               "--input", str(tmp_path / "x.png"), "--output", str(tmp_path / "o"),
               "--compilation-cache", ""]
    quiet = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert quiet.stderr.strip().splitlines()[-1].startswith("error: ") and "nope.npz" in quiet.stderr
    loud = subprocess.run(command + ["--debug"], capture_output=True, text=True, timeout=120)
    assert loud.returncode != 0 and "Traceback" in loud.stderr


# --------------------------------------------------------------------------- helpers

def test_image_modes_keep_their_value_range():
    sixteen = Image.fromarray(np.full((2, 3), 40000, np.uint16))            # I;16
    assert (to_rgb(sixteen) == round(40000 / 257)).all()                    # not clipped to 255
    wide = Image.fromarray(np.full((2, 2), 1000, np.int32))                 # I, 16-bit data
    assert (to_rgb(wide) == round(1000 * 255 / 65535)).all()
    floats = Image.fromarray(np.full((2, 2), 0.5, np.float32))              # F in 0–1
    assert (to_rgb(floats) == 128).all()
    # A float image whose maximum is exactly 1 is 0–1 too (not 0–255: near black).
    unit = np.array([[0.0, 0.5, 1.0]], np.float32)
    np.testing.assert_array_equal(to_rgb(Image.fromarray(unit)),
                                  np.repeat(np.round(unit * 255)[..., None], 3, -1))
    # One whose maximum is over 1 is 0–255 already: scaled by 255 as well, it would be white.
    levels = np.array([[0.0, 100.0, 200.0]], np.float32)
    np.testing.assert_array_equal(to_rgb(Image.fromarray(levels)),
                                  np.repeat(levels[..., None], 3, -1))
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 1] = (10, 20, 30, 255)                                          # pixel 0 transparent
    assert to_rgb(Image.fromarray(rgba)).tolist() == [[[255, 255, 255], [10, 20, 30]]]
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))                      # pure red
    assert to_rgb(cmyk).tolist() == [[[255, 0, 0]]]
    binary = Image.new("1", (2, 1), 1)
    assert to_rgb(binary).shape == (1, 2, 3) and (to_rgb(binary) == 255).all()


def test_load_image_honours_exif_and_names_bad_files(tmp_path):
    _exif_rotated_jpeg(tmp_path / "turned.jpg", 10, 30)
    assert load_image(tmp_path / "turned.jpg").shape == (30, 10, 3)
    assert load_image(tmp_path / "turned.jpg", exif=False).shape == (10, 30, 3)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    for name, reason in (("empty.jpg", "empty file"), ("text.png", "not an image"),
                         ("absent.png", "no such file")):
        with pytest.raises(ImageError, match=reason) as caught:
            load_image(tmp_path / name)
        assert str(tmp_path / name) in str(caught.value) and "\n" not in str(caught.value)


def test_the_python_api_takes_pil_images_of_any_mode(model_file):
    predictor = Predictor.load(model_file, batch_size=2)
    sixteen = Image.fromarray((_noise(12, 20, 1).astype(np.uint16) * 257))
    maps = predictor([sixteen, _noise(9, 4)])
    assert [m.shape for m in maps] == [(12, 20), (9, 4)]
    # 16-bit input is scaled like its 8-bit twin, not clipped to white.
    twin = predictor(Image.fromarray(_noise(12, 20, 1)))
    np.testing.assert_allclose(maps[0], twin, atol=1e-5)


def test_the_python_api_reads_arrays_and_photos_as_the_command_does(model_file, tmp_path):
    predictor = Predictor.load(model_file, batch_size=2)
    image = _noise(12, 20)
    want = predictor(image)
    # A JAX array is one image, not a list of rows; uint16 is scaled from 0–65535, not clipped.
    np.testing.assert_allclose(predictor(jnp.asarray(image)), want, atol=1e-6)
    np.testing.assert_allclose(predictor(image.astype(np.uint16) * 257), want, atol=1e-6)
    # A dark uint16 array (maximum ≤ 255) is still 16-bit data, scaled from 0–65535 as its
    # 16-bit PNG is read, not taken as 8-bit levels (200 becomes 1, not 200).
    from mlnet_jax.inference import to_rgb_array
    dark = np.full((12, 20), 200, np.uint16)
    Image.fromarray(dark).save(tmp_path / "dark.png")
    np.testing.assert_array_equal(to_rgb_array(dark), load_image(tmp_path / "dark.png"))
    assert (to_rgb_array(dark) == round(200 * 255 / 65535)).all()
    assert len(predictor(jnp.stack([jnp.asarray(image)] * 3))) == 3
    # A phone photo opened with PIL is turned as its EXIF orientation says, as load_image does.
    _exif_rotated_jpeg(tmp_path / "turned.jpg", 10, 30)
    with Image.open(tmp_path / "turned.jpg") as photo:
        from_pil = predictor(photo)
    assert from_pil.shape == (30, 10)
    np.testing.assert_allclose(from_pil, predictor(load_image(tmp_path / "turned.jpg")), atol=1e-6)
    with pytest.raises(ValueError, match="batch_size"):
        Predictor.load(model_file, batch_size=0)
    # A path is read as the command reads it; one path is one image, not its characters.
    np.testing.assert_allclose(predictor(str(tmp_path / "turned.jpg")), from_pil, atol=1e-6)
    assert len(predictor([tmp_path / "turned.jpg", str(tmp_path / "turned.jpg")])) == 2
    # RGBA arrays are put on white, as PIL images and files are.
    rgba = np.dstack([image, np.where(np.arange(20) < 10, 0, 255).astype(np.uint8)[None]
                      .repeat(12, axis=0)])
    np.testing.assert_allclose(predictor(rgba), predictor(Image.fromarray(rgba, "RGBA")),
                               atol=1e-6)
    white_left = image.copy()
    white_left[:, :10] = 255
    np.testing.assert_allclose(predictor(rgba), predictor(white_left), atol=1e-6)
    # Floats are rounded as the command rounds a float image; outside 0–255 is refused.
    np.testing.assert_allclose(predictor(image / 255.0), want, atol=1e-6)
    for bad, message in ((image - 128.0, "from -128 to"), (image * 2.0, "expected 0–1 or 0–255"),
                         (np.zeros((0, 40, 3)), r"empty image: shape \(0, 40, 3\)"),
                         (np.zeros((1, 2, 30, 40, 3), np.uint8), r"shape \(1, 2, 30, 40, 3\)"),
                         # Integers too: negative, or past 16 bits, is refused, not clipped.
                         (image.astype(np.int16) - 50, "from -50 to 205; integer images"),
                         (image.astype(np.int64) * 1000, r"to \d+; integer images are expected"),
                         (np.full((3, 4), None, object), "an array of dtype object")):
        with pytest.raises(ValueError, match=message):
            predictor(bad)


def test_overlay_colours_only_where_salient():
    image = np.full((4, 6, 3), 100, np.uint8)
    saliency = np.zeros((4, 6), np.float32)
    saliency[1, 2] = 1.0
    out = overlay(image, saliency)
    assert out.shape == image.shape and out.dtype == np.uint8
    untouched = np.ones((4, 6), bool)
    untouched[1, 2] = False
    assert (out[untouched] == 100).all() and not (out[1, 2] == 100).all()
    # The colours are Matplotlib's jet at the map's grey level, blended at opacity × saliency
    # (a reversed table would colour the most salient pixel dark blue, not dark red).
    import matplotlib
    photo = np.random.default_rng(0).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    levels = np.linspace(0, 1, 24, dtype=np.float32).reshape(4, 6)
    colours = matplotlib.colormaps["jet"](np.round(levels.astype(np.float64) * 255) / 255)[..., :3]
    weight = 0.6 * levels.astype(np.float64)[..., None]
    want = np.round(photo * (1 - weight) + np.round(colours * 255) * weight)
    np.testing.assert_allclose(overlay(photo, levels), want, atol=1)
    hot = overlay(image, saliency)[1, 2]
    assert hot[0] > hot[2] and hot[0] > 100 > hot[2]  # red over the grey, not blue
    # A map at another size is resized to the image.
    assert overlay(image, np.ones((2, 3), np.float32)).shape == image.shape


def test_blur_map_is_a_gaussian_and_fast_path_agrees():
    delta = np.zeros((101, 101), np.float32)
    delta[50, 50] = 1
    blurred = blur_map(delta, 5.0)
    assert blurred.max() == pytest.approx(1.0)
    profile = blurred[50] / blurred[50].sum()
    spread = np.sqrt((profile * (np.arange(101) - 50) ** 2).sum())
    assert spread == pytest.approx(5.0, rel=0.02)
    # A large smooth map: the reduced-size path matches a full-size blur.
    yy, xx = np.mgrid[0:1200, 0:1600].astype(np.float32)
    smooth = np.exp(-((yy - 500) ** 2 + (xx - 900) ** 2) / (2 * 150.0 ** 2)).astype(np.float32)
    from scipy import ndimage
    full = ndimage.gaussian_filter(smooth, 40, mode="nearest")
    np.testing.assert_allclose(blur_map(smooth, 40), full / full.max(), atol=0.01)
    assert (blur_map(np.zeros((3, 3)), 2) == 0).all()
    # Borders repeat the edge value: a constant map stays constant, at the edges too, on the
    # full-size path and the reduced one (zero padding would darken the edges).
    for shape, sigma in (((20, 30), 3.0), ((600, 700), 40.0)):
        flat = blur_map(np.full(shape, 0.7, np.float32), sigma)
        np.testing.assert_allclose(flat, np.ones(shape), atol=1e-5, err_msg=str(shape))
    # σ = 0 returned the map as given (a uint8 map's 0–200), σ > 0 rescaled to a maximum of 1.
    grey = np.array([[0, 100], [200, 50]], np.uint8)
    np.testing.assert_allclose(blur_map(grey, 0), grey / 200)
    with pytest.raises(ValueError, match=r"expected an H×W map, got shape \(2, 2, 1\)"):
        blur_map(grey[..., None], 2)
    # Far wider than the map: as flat as a blur ten times its size, not a kernel of 1e31 taps.
    peaked = np.zeros((20, 30), np.float32)
    peaked[3, 4] = 1
    np.testing.assert_allclose(blur_map(peaked, 1e30), blur_map(peaked, 300.0), atol=1e-6)
    assert blur_map(peaked, 1e30).min() > 0.99
    with pytest.raises(ValueError, match="finite"):
        blur_map(peaked, float("inf"))


def test_first_conv_reaches_the_model_and_the_kernel_makes_the_same_maps(model_file, tmp_path,
                                                                        monkeypatch):
    # --first-conv is passed to the model Predictor loads (on this CPU 'auto' keeps XLA's
    # conv1_1; 'pallas' runs the kernel in Pallas's interpreter): the same map either way, and
    # the choices are the package's.
    from mlnet_jax import first_conv
    from mlnet_jax.predict import build_parser
    choices = next(a.choices for a in build_parser()._actions if a.dest == "first_conv")
    assert tuple(choices) == first_conv.FIRST_CONV_MODES
    calls, real = [], first_conv.conv_bias_relu
    monkeypatch.setattr(first_conv, "conv_bias_relu", lambda *a: calls.append(1) or real(*a))
    photo = tmp_path / "photo.png"
    Image.fromarray(_noise(24, 40, seed=7)).save(photo)
    maps = {}
    for mode in ("auto", "pallas"):
        assert _predict(model_file, photo, tmp_path / mode, "--first-conv", mode) == 0
        maps[mode] = np.asarray(Image.open(tmp_path / mode / "photo.png"), np.int16)
        assert bool(calls) == (mode == "pallas"), mode  # traced once, in the pallas run only
    assert np.abs(maps["pallas"] - maps["auto"]).max() <= 1 and maps["auto"].std() > 5
