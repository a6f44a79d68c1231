"""Video prediction: a generated clip round-trips with the same frame count, size and rate;
frames go through the model in batches; without PyAV a one-line message names the extra."""

import sys
from fractions import Fraction

import numpy as np
import pytest

from mlnet_jax.inference import Predictor
from mlnet_jax.predict import Report, main, plan_outputs, predict_video
from mlnet_jax.video import MISSING_EXTRA, open_video
from test_predict_cli import model_file  # noqa: F401 — the shared tiny model fixture


def _needs_av():
    return pytest.importorskip("av", reason="the video extra (PyAV) is not installed")


def _write_clip(path, frames, rate, codec="mpeg4", width=64, height=48, rotation=0,
                pixel_aspect=None):
    """A clip of a bright square moving over a dark gradient, written with PyAV directly."""
    av = _needs_av()
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        if pixel_aspect:
            stream.codec_context.sample_aspect_ratio = pixel_aspect
        for i in range(frames):
            image = np.tile(np.linspace(0, 80, width, dtype=np.uint8), (height, 1))[..., None]
            image = np.repeat(image, 3, axis=-1)
            x = (i * 3) % (width - 12)
            image[10:22, x:x + 12] = (250, 240, 30)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def _read_clip(path):
    av = _needs_av()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return frames, stream.average_rate, (stream.codec_context.height, stream.codec_context.width)


@pytest.mark.parametrize("name, codec, rate, count", [
    ("clip.avi", "mpeg4", Fraction(15), 12),
    ("clip.mkv", "libx264", Fraction(30000, 1001), 40),  # long enough for reordered B-frames
])
def test_a_video_round_trips(model_file, tmp_path, capsys, name, codec, rate, count):  # noqa: F811
    _write_clip(tmp_path / name, count, rate, codec)
    out = tmp_path / "out"
    code = main(["--checkpoint", str(model_file), "--input", str(tmp_path / name), "--output", str(out),
                 "--map-video", "--batch-size", "5", "--compilation-cache", ""])
    assert code == 0
    assert f"{count} frames in" in capsys.readouterr().err  # with frames/s
    for output in ("clip_overlay.mp4", "clip.mp4"):
        frames, out_rate, size = _read_clip(out / output)
        assert len(frames) == count and out_rate == rate and size == (48, 64), output
    maps, _, _ = _read_clip(out / "clip.mp4")
    assert max(float(m.std()) for m in maps) > 5  # a real map, not a blank video
    source, _, _ = _read_clip(tmp_path / name)
    overlays, _, _ = _read_clip(out / "clip_overlay.mp4")
    assert np.abs(overlays[0].astype(int) - source[0]).mean() > 3  # the heatmap is blended in


def test_frames_go_through_the_model_in_batches_and_rotation_is_applied(model_file, tmp_path):  # noqa: F811
    _write_clip(tmp_path / "phone.mp4", 10, Fraction(24), "libx264", width=64, height=32, rotation=90)
    predictor = Predictor.load(model_file, batch_size=4)
    calls = []
    original = predictor.dispatch_letterboxed
    predictor.dispatch_letterboxed = lambda batch: calls.append(len(batch)) or original(batch)
    [job] = plan_outputs([tmp_path / "phone.mp4"], tmp_path, tmp_path / "out", overlay=False,
                         map_video=False)
    report = Report()
    predict_video(predictor, job, report=report, progress=False)
    assert not report.failed and report.frames == 10
    assert calls == [4, 4, 2]
    frames, rate, size = _read_clip(job.overlay_path)
    assert len(frames) == 10 and rate == 24 and size == (64, 32)  # displayed upright


def test_an_anamorphic_video_is_seen_and_written_at_its_display_aspect(model_file, tmp_path):  # noqa: F811
    # Stored 64×48 with pixels 4/3 wide: displayed 85×48 (16:9).
    _write_clip(tmp_path / "wide.mp4", 6, Fraction(24), "libx264", pixel_aspect=Fraction(4, 3))
    with open_video(tmp_path / "wide.mp4") as (info, frames):
        first = next(frames)
    assert (info.width, info.height) == (85, 48) and first.shape == (48, 85, 3)
    # The square (stored columns x..x+12 of 64) spans 4/3 as many displayed columns.
    bright = np.flatnonzero(first[16, :, 0] > 160)
    assert bright.size == pytest.approx(12 * 4 / 3, abs=2)
    predictor = Predictor.load(model_file, batch_size=4)
    [job] = plan_outputs([tmp_path / "wide.mp4"], tmp_path, tmp_path / "out", overlay=False,
                         map_video=True)
    report = Report()
    predict_video(predictor, job, report=report, progress=False)
    assert not report.failed and report.frames == 6
    for path in (job.overlay_path, job.map_path):
        assert _read_clip(path)[2] == (48, 85)


def test_a_bad_video_is_one_line_and_keeps_the_previous_output(model_file, tmp_path, capsys):  # noqa: F811
    _needs_av()
    (tmp_path / "broken.mp4").write_text("not a video")
    out = tmp_path / "out"
    out.mkdir()
    (out / "broken_overlay.mp4").write_bytes(b"previous")
    code = main(["--checkpoint", str(model_file), "--input", str(tmp_path / "broken.mp4"),
                 "--output", str(out), "--compilation-cache", ""])
    err = capsys.readouterr().err
    assert code == 2
    lines = [l for l in err.splitlines() if "broken.mp4" in l]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
    assert (out / "broken_overlay.mp4").read_bytes() == b"previous"
    assert sorted(p.name for p in out.iterdir()) == ["broken_overlay.mp4"]


def test_without_the_extra_the_message_names_it(model_file, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ImportError
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)
    code = main(["--checkpoint", str(model_file), "--input", str(tmp_path / "clip.mp4"),
                 "--output", str(tmp_path / "out"), "--compilation-cache", ""])
    err = capsys.readouterr().err
    assert code == 2 and MISSING_EXTRA in err and "clip.mp4" in err and "Traceback" not in err
