"""Video prediction: a generated clip round-trips with the same frame count, size and rate;
frames go through the model in batches; without PyAV a one-line message names the extra."""

import re
import types
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


def _frame_image(i, width=64, height=48, noise=False):
    if noise:  # incompressible: packets spread evenly over the file
        return np.random.default_rng(i).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = np.tile(np.linspace(0, 80, width, dtype=np.uint8), (height, 1))[..., None]
    image = np.repeat(image, 3, axis=-1)
    x = (i * 3) % (width - 12)
    image[10:22, x:x + 12] = (250, 240, 30)
    return image


def _add_cover_art(av, container):
    """A one-frame MJPEG stream flagged as an attached picture (an album cover)."""
    stream = container.add_stream("mjpeg", rate=1)
    stream.width, stream.height, stream.pix_fmt = 32, 32, "yuvj420p"
    stream.disposition = av.stream.Disposition.attached_pic.value  # PyAV 14 takes only ints
    return stream, [av.VideoFrame.from_ndarray(np.full((32, 32, 3), 200, np.uint8),
                                               format="rgb24")]


def _write_clip(path, frames, rate, codec="mpeg4", width=64, height=48, rotation=0,
                pixel_aspect=None, times=None, cover_art=False, noise=False, options=None):
    """A clip of a bright square moving over a dark gradient, written with PyAV directly;
    ``times`` (seconds) for a variable frame rate, ``cover_art`` adds an attached picture as
    the first stream."""
    av = _needs_av()
    with av.open(str(path), mode="w", options=options or {}) as container:
        covers = [_add_cover_art(av, container)] if cover_art else []
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if rotation:
            if not hasattr(stream, "set_display_rotation"):
                pytest.skip("this PyAV cannot write a display rotation (PyAV 18 can)")
            stream.set_display_rotation(rotation)
        if pixel_aspect:
            stream.codec_context.sample_aspect_ratio = pixel_aspect
        if times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for cover, pictures in covers:
            for picture in pictures + [None]:
                for packet in cover.encode(picture):
                    container.mux(packet)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(_frame_image(i, width, height, noise),
                                               format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = round(times[i] * 1000), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def _frame_times(path):
    av = _needs_av()
    with av.open(str(path)) as container:
        return [float(f.time) for f in container.decode(container.streams.video[0])]


def _read_clip(path):
    av = _needs_av()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return frames, stream.average_rate, (stream.codec_context.height, stream.codec_context.width)


@pytest.mark.parametrize("name, codec, rate, count", [
    ("clip.avi", "mpeg4", Fraction(15), 12),
    ("clip.mkv", "libx264", Fraction(30000, 1001), 40),  # long enough for reordered B-frames
    # 23.976 fps: frames on 90 kHz ticks alternated 3753/3754, an average rate of 2700000/112613.
    ("clip.mp4", "libx264", Fraction(24000, 1001), 24),
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
    assert calls == [4, 4, 4]  # the last 2 frames padded to the batch already compiled
    frames, rate, size = _read_clip(job.overlay_path)
    assert len(frames) == 10 and rate == 24 and size == (64, 32)  # displayed upright


def test_a_command_run_compiles_once_and_a_lone_photo_is_computed_alone(model_file, tmp_path,  # noqa: F811
                                                                         monkeypatch):
    """Each input is its own stream: padded to its own power of two, 2 photos and videos of 5
    and 2 frames made 3 compilations in one run (one before). A run of several inputs uses
    whole batches; a run of one photo computes one image, not a batch of --batch-size."""
    from PIL import Image
    made, real_load = [], Predictor.load

    def load(*args, **kwargs):
        made.append(real_load(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(Predictor, "load", staticmethod(load))
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        Image.fromarray(np.full((20, 30 + i, 3), 60 * i, np.uint8)).save(src / f"p{i}.png")
    _write_clip(src / "a.mp4", 5, Fraction(25), "libx264")
    _write_clip(src / "b.mp4", 2, Fraction(25), "libx264")
    common = ["--checkpoint", str(model_file), "--batch-size", "8", "--no-progress",
              "--compilation-cache", ""]
    assert main([*common, "--input", str(src), "--output", str(tmp_path / "out")]) == 0
    assert made[-1].num_compilations == 1
    assert len(list((tmp_path / "out").iterdir())) == 4
    computed = []
    original = Predictor.dispatch_letterboxed
    monkeypatch.setattr(Predictor, "dispatch_letterboxed",
                        lambda self, batch: computed.append(len(batch)) or original(self, batch))
    assert main([*common, "--input", str(src / "p0.png"), "--output", str(tmp_path / "o1")]) == 0
    assert computed == [1] and made[-1].num_compilations == 1


def test_an_anamorphic_video_is_seen_and_written_at_its_display_aspect(model_file, tmp_path):  # noqa: F811
    # Stored 64×48 with pixels 4/3 wide: displayed 85×48 (16:9).
    _write_clip(tmp_path / "wide.mp4", 6, Fraction(24), "libx264", pixel_aspect=Fraction(4, 3))
    with open_video(tmp_path / "wide.mp4") as (info, frames):
        _, first = next(iter(frames))
    # 85.3 displayed columns, made even (86) for the 4:2:0 chroma players expect.
    assert (info.width, info.height) == (86, 48) and first.shape == (48, 86, 3)
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
        assert _read_clip(path)[2] == (48, 86)


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
    lines = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and "broken.mp4: cannot open as a video" in lines[0]
    assert "Traceback" not in err
    assert (out / "broken_overlay.mp4").read_bytes() == b"previous"
    assert sorted(p.name for p in out.iterdir()) == ["broken_overlay.mp4"]
    # An empty file is called that, as an empty image is (FFmpeg: 'Invalid data found').
    (tmp_path / "empty.mp4").write_bytes(b"")
    assert main(["--checkpoint", str(model_file), "--input", str(tmp_path / "empty.mp4"),
                 "--output", str(out), "--compilation-cache", ""]) == 2
    assert f"error: {tmp_path / 'empty.mp4'}: empty file (0 bytes)" in capsys.readouterr().err


def test_an_output_name_too_long_is_named_not_its_temporary_file(model_file, tmp_path, capsys):  # noqa: F811
    """A legal 250-byte video name whose overlay's name is over 255 bytes: the error named the
    hidden temporary file the overlay was written to, a name the user never asked for."""
    _needs_av()
    long = "v" * 246 + ".mp4"
    _write_clip(tmp_path / long, 3, Fraction(10), "libx264")
    out = tmp_path / "out"
    assert main(["--checkpoint", str(model_file), "--input", str(tmp_path / long),
                 "--output", str(out), "--compilation-cache", ""]) == 2
    err = capsys.readouterr().err
    (line,) = [l for l in err.splitlines() if l.startswith("error: ")]
    assert ": cannot write its output (File name too long: " in line and ".tmp" not in line
    assert list(out.iterdir()) == []


def test_without_the_extra_the_message_names_it(model_file, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ImportError
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)
    code = main(["--checkpoint", str(model_file), "--input", str(tmp_path / "clip.mp4"),
                 "--output", str(tmp_path / "out"), "--compilation-cache", ""])
    err = capsys.readouterr().err
    assert code == 2 and MISSING_EXTRA in err and "clip.mp4" in err and "Traceback" not in err


def test_cover_art_is_passed_over_and_alone_is_no_video(model_file, tmp_path, capsys):  # noqa: F811
    av = _needs_av()
    _write_clip(tmp_path / "clip.mkv", 8, Fraction(15), "libx264", cover_art=True)
    with av.open(str(tmp_path / "clip.mkv")) as container:  # the cover really comes first
        assert container.streams.video[0].codec_context.name == "mjpeg"
    with av.open(str(tmp_path / "song.mp4"), "w") as container:  # an audio file with a cover
        cover, pictures = _add_cover_art(av, container)
        audio = container.add_stream("aac", rate=44100)
        for picture in pictures + [None]:
            container.mux(cover.encode(picture))
        for i in range(8):
            samples = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                                 layout="mono")
            samples.sample_rate, samples.pts = 44100, i * 1024
            container.mux(audio.encode(samples))
        container.mux(audio.encode(None))
    out = tmp_path / "out"
    code = main(["--checkpoint", str(model_file), "--input", str(tmp_path), "--output", str(out),
                 "--compilation-cache", ""])
    err = capsys.readouterr().err
    assert code == 2 and f"error: {tmp_path / 'song.mp4'}: has no video stream (only cover " \
                         "art)" in err
    frames, rate, size = _read_clip(out / "clip_overlay.mp4")
    assert len(frames) == 8 and rate == 15 and size == (48, 64)


@pytest.mark.parametrize("name, times", [
    # 10 frames at 30 fps, a pause of two seconds, 10 more: as phones record in low light.
    ("vfr.mkv", [i / 30 for i in range(10)] + [2.3 + i / 30 for i in range(10)]),
    # A pause short enough that the average rate (MP4 gives it: 24 fps) lies between the
    # local rate and half of it, where frames snapped to its grid would judder.
    ("vfr.mp4", [i / 30 for i in range(30)] + [1.5 + i / 30 for i in range(30)])])
def test_a_variable_frame_rate_keeps_its_timing(model_file, tmp_path, name, times):  # noqa: F811
    _write_clip(tmp_path / name, len(times), Fraction(30), "libx264", times=times)
    source_times = _frame_times(tmp_path / name)
    half = len(times) // 2
    assert source_times[half] == pytest.approx(times[half])
    predictor = Predictor.load(model_file, batch_size=4)
    [job] = plan_outputs([tmp_path / name], tmp_path, tmp_path / "out", overlay=False,
                         map_video=True)
    report = Report()
    predict_video(predictor, job, report=report, progress=False)
    assert not report.failed and report.frames == len(times)
    # Within the input clock's milliseconds: frames on the nominal rate come out exactly on it.
    expected = np.subtract(source_times, source_times[0])
    for path in (job.overlay_path, job.map_path):
        got = _frame_times(path)
        np.testing.assert_allclose(got, expected, atol=1e-3)
        np.testing.assert_allclose(np.diff(got[:half]), 1 / 30, atol=1e-3)


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])  # Matroska records no stream duration
def test_a_file_cut_short_is_written_as_far_as_it_goes_and_named(model_file, tmp_path,  # noqa: F811
                                                                 capsys, suffix):
    whole = tmp_path / f"whole{suffix}"
    _write_clip(whole, 60, Fraction(15), "libx264", noise=True,
                options={"movflags": "faststart"} if suffix == ".mp4" else None)  # count first
    data = whole.read_bytes()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / f"cut{suffix}").write_bytes(data[:len(data) // 2])
    out = tmp_path / "out"
    code = main(["--checkpoint", str(model_file), "--input", str(tmp_path / "in"),
                 "--output", str(out), "--compilation-cache", ""])
    err = capsys.readouterr().err
    written = len(_read_clip(out / "cut_overlay.mp4")[0])
    assert code == 2 and 10 < written < 50
    # PyAV's threaded decoding ends quietly (cut short?), unthreaded on corrupt data.
    listed = " of the 60 its container lists" if suffix == ".mp4" else ""
    assert re.search(rf"error: {re.escape(str(tmp_path / 'in' / f'cut{suffix}'))}: "
                     rf"(cut short\?|corrupt video data \(.*\)): {written} frames{listed} "
                     "decoded; the output has those", err), err


def test_a_matroska_file_whose_audio_outlasts_its_video_is_complete(model_file, tmp_path,  # noqa: F811
                                                                    capsys):
    # Matroska records no stream duration, and the file's is its longest stream's: 90 ms more
    # audio (common in recordings) made every such file "cut short?", exit status 2.
    av = _needs_av()
    path = tmp_path / "talk.mkv"
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=15)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = container.add_stream("aac", rate=16000)
        for i in range(30):  # 2 s of video
            for packet in video.encode(av.VideoFrame.from_ndarray(_frame_image(i), format="rgb24")):
                container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)
        samples = np.zeros((1, 1024), np.float32)
        for i in range(3 * 16000 // 1024):  # 3 s of audio
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in audio.encode(frame):
                container.mux(packet)
        for packet in audio.encode(None):
            container.mux(packet)
    code = main(["--checkpoint", str(model_file), "--input", str(path), "--output",
                 str(tmp_path / "out"), "--compilation-cache", ""])
    assert code == 0, capsys.readouterr().err
    assert len(_read_clip(tmp_path / "out" / "talk_overlay.mp4")[0]) == 30


def _write_held_end(path, frames=20, hold_ms=5000):
    """``frames`` at 30 fps whose last one is shown for ``hold_ms`` (a screen recording that
    ends on a still screen): the packets' own durations say so."""
    av = _needs_av()
    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height, codec.pix_fmt = 64, 48, "yuv420p"
    codec.time_base, codec.framerate, codec.options = Fraction(1, 1000), Fraction(30), {"bf": "0"}
    packets = []
    for i in range(frames):
        frame = av.VideoFrame.from_ndarray(_frame_image(i), format="rgb24")
        frame.pts, frame.time_base = round(i * 1000 / 30), Fraction(1, 1000)
        packets += codec.encode(frame)
    packets += codec.encode(None)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("h264", rate=30)
        stream.width, stream.height, stream.time_base = 64, 48, Fraction(1, 1000)
        stream.codec_context.extradata = codec.extradata
        for j, encoded in enumerate(packets):
            packet = av.Packet(bytes(encoded))
            packet.stream, packet.time_base = stream, Fraction(1, 1000)
            packet.pts = packet.dts = round(j * 1000 / 30)
            packet.is_keyframe = encoded.is_keyframe
            packet.duration = hold_ms if j == len(packets) - 1 else 33
            container.mux(packet)


def _seconds(path):
    av = _needs_av()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return float(stream.duration * stream.time_base)


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_a_video_that_starts_late_or_ends_on_a_held_frame_is_complete(model_file, tmp_path,  # noqa: F811
                                                                      capsys, suffix):
    """A Matroska/WebM file starting after 0 s (every segment after the first of a split
    recording) was "cut short?", exit 2: its duration tag is where it ends, not its length. A
    last frame held for 5 s was "cut short?" too, and the output ended 1/30 s after it."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    _write_clip(inputs / f"late{suffix}", 30, Fraction(15), "libx264",
                times=[1.4 + i / 15 for i in range(30)])
    _write_held_end(inputs / f"held{suffix}")
    code = main(["--checkpoint", str(model_file), "--input", str(inputs), "--output",
                 str(tmp_path / "out"), "--compilation-cache", "", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert len(_read_clip(tmp_path / "out" / "late_overlay.mp4")[0]) == 30
    assert _seconds(tmp_path / "out" / "late_overlay.mp4") == pytest.approx(2.0, abs=0.002)
    assert len(_read_clip(tmp_path / "out" / "held_overlay.mp4")[0]) == 20
    assert _seconds(tmp_path / "out" / "held_overlay.mp4") == pytest.approx(19 / 30 + 5, abs=0.002)


def test_a_trimmed_file_whose_edit_list_hides_frames_is_complete(model_file, tmp_path,  # noqa: F811
                                                                  capsys):
    # What a trim without re-encoding writes: 60 frames stored, the first 20 hidden by the
    # edit list, so the container lists 60 and 40 are shown.
    av = _needs_av()
    with av.open(str(tmp_path / "trimmed.mp4"), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"bf": "0"}
        stream.codec_context.time_base = Fraction(1, 30)
        for i in range(60):
            frame = av.VideoFrame.from_ndarray(_frame_image(i), format="rgb24")
            frame.pts, frame.time_base = i - 20, Fraction(1, 30)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with av.open(str(tmp_path / "trimmed.mp4")) as container:
        assert container.streams.video[0].frames == 60
    code = main(["--checkpoint", str(model_file), "--input", str(tmp_path / "trimmed.mp4"),
                 "--output", str(tmp_path / "out"), "--compilation-cache", ""])
    shown = len(_read_clip(tmp_path / "out" / "trimmed_overlay.mp4")[0])
    assert code == 0 and "error" not in capsys.readouterr().err and 38 <= shown <= 42


def test_odd_names_size_changes_and_rotation_matrices(model_file, tmp_path, monkeypatch,  # noqa: F811
                                                      capsys):
    import io

    from mlnet_jax.video import _counter_clockwise_turns
    av = _needs_av()
    # A relative name whose first part holds a colon is a file, not an FFmpeg protocol.
    monkeypatch.chdir(tmp_path)
    _write_clip(tmp_path / "12:30 clip.mp4", 4, Fraction(10), "libx264")
    # A stream whose resolution changes midway (64×48, then 128×96): scaled to the first.
    raw = b""
    for width, height in ((64, 48), (128, 96)):
        buffer = io.BytesIO()
        with av.open(buffer, "w", format="h264") as container:
            stream = container.add_stream("libx264", rate=10)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for i in range(3):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(
                    _frame_image(i, width, height), format="rgb24")))
            container.mux(stream.encode(None))
        raw += buffer.getvalue()
    (tmp_path / "two_sizes.h264").write_bytes(raw)
    with av.open(str(tmp_path / "two_sizes.h264"), format="h264") as source, \
            av.open(str(tmp_path / "two_sizes.mkv"), "w") as target:
        stream = target.add_stream_from_template(source.streams.video[0])
        for i, packet in enumerate(p for p in source.demux(video=0) if p.size):
            packet.stream, packet.time_base = stream, Fraction(1, 1000)
            packet.pts = packet.dts = i * 100
            packet.duration = 100  # else the raw stream's, read in ms: a 120 s file, "cut short"
            target.mux(packet)
    assert [f.width for f in av.open(str(tmp_path / "two_sizes.mkv")).decode(video=0)] == \
        [64] * 3 + [128] * 3
    for name in ("12:30 clip.mp4", "two_sizes.mkv"):
        code = main(["--checkpoint", str(model_file), "--input", name, "--output", "out",
                     "--compilation-cache", ""])
        assert code == 0, capsys.readouterr().err
    assert len(_read_clip(tmp_path / "out" / "12:30 clip_overlay.mp4")[0]) == 4
    frames, _, size = _read_clip(tmp_path / "out" / "two_sizes_overlay.mp4")
    assert len(frames) == 6 and size == (48, 64)
    # FFmpeg's rotation of a singular display matrix (INT_MIN) is no rotation.
    assert [_counter_clockwise_turns(r) for r in (None, 0, 90, -90, 180, 270, -2**31)] == \
        [0, 0, 1, 3, 2, 3, 0]


def test_sigterm_removes_the_files_being_written(model_file, tmp_path, capsys, monkeypatch):  # noqa: F811
    import os
    import signal

    import mlnet_jax.predict as predict_module
    _write_clip(tmp_path / "long.mp4", 30, Fraction(15), "libx264")
    frames_made = []
    original = predict_module._video_frames

    def then_terminated(*args):
        frames_made.append(1)
        if len(frames_made) == 12:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args)

    monkeypatch.setattr(predict_module, "_video_frames", then_terminated)
    out = tmp_path / "out"
    code = main(["--checkpoint", str(model_file), "--input", str(tmp_path / "long.mp4"),
                 "--output", str(out), "--map-video", "--compilation-cache", "", "--workers", "1"])
    assert code == 128 + signal.SIGTERM
    assert "terminated; finished outputs are complete" in capsys.readouterr().err
    assert list(out.iterdir()) == []  # neither the videos nor their temporary files
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def _by_display_matrix(image, matrix):
    """Where FFmpeg's definition of a display matrix (libavutil/display.h) puts each pixel:
    (p', q') = (a·p + c·q, b·p + d·q) for the pixel at (p, q) = (column, row); the result
    shifted into the frame."""
    a, b, c, d = (float(v) / 65536 for v in np.asarray(matrix)[[0, 1, 3, 4]])
    rows, cols = np.indices(image.shape[:2])
    p, q = cols + 0.5, rows + 0.5
    new_cols, new_rows = a * p + c * q, b * p + d * q
    new_cols = np.floor(new_cols - new_cols.min()).astype(int)
    new_rows = np.floor(new_rows - new_rows.min()).astype(int)
    out = np.zeros((new_rows.max() + 1, new_cols.max() + 1, 3), image.dtype)
    out[new_rows, new_cols] = image
    return out


@pytest.mark.parametrize("degrees", [0, 90, 180, 270])
def test_turns_and_mirrors_follow_the_display_matrix(tmp_path, degrees):
    from mlnet_jax.video import _display_matrix
    av = _needs_av()
    for hflip, vflip in ((False, False), (True, False), (False, True)):
        path = tmp_path / f"turned_{hflip}_{vflip}.mp4"
        with av.open(str(path), mode="w") as container:
            stream = container.add_stream("libx264", rate=10)
            stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv444p"
            if not hasattr(stream, "set_display_rotation"):
                pytest.skip("this PyAV cannot write a display matrix (PyAV 18 can)")
            stream.set_display_rotation(degrees, hflip=hflip, vflip=vflip)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(
                _frame_image(0, 64, 32, noise=True), format="rgb24")))
            container.mux(stream.encode(None))
        with av.open(str(path)) as container:
            frame = next(container.decode(video=0))
            stored, matrix = frame.to_ndarray(format="rgb24"), _display_matrix(frame)
        with open_video(path) as (info, frames):
            _, shown = next(iter(frames))
        if matrix is None:  # no transformation stored at all
            assert degrees == 0 and not hflip and not vflip
            matrix = [65536, 0, 0, 0, 65536, 0, 0, 0, 1 << 30]
        np.testing.assert_array_equal(shown, _by_display_matrix(stored, matrix),
                                      err_msg=f"{degrees}° hflip={hflip} vflip={vflip}")
        assert (info.width, info.height) == shown.shape[1::-1]


def test_a_rotation_that_appears_on_a_later_frame_keeps_the_first_frames_shape():
    from pathlib import Path

    from mlnet_jax.video import Frames

    class Frame:  # what PyAV hands over, for a display orientation met only on frame 2
        def __init__(self, time, rotation):
            self.width, self.height, self.time, self.rotation = 64, 48, time, rotation
            self.side_data = {}  # no display matrix: the rotation field says it
            self.format = types.SimpleNamespace(components=(0, 1, 2))  # no alpha

        def to_ndarray(self, format, width, height, interpolation):
            return np.zeros((height, width, 3), np.uint8)

    class Packet:
        def __init__(self, *frames):
            self.frames = frames

        def decode(self):
            return list(self.frames)

    class Container:
        def demux(self, stream):
            yield Packet(Frame(0.0, 0))
            yield Packet(Frame(0.04, -90))

    class Stream:
        sample_aspect_ratio = None

    frames = Frames(Container(), Stream(), Path("clip.mp4"))
    assert frames.size() == (64, 48)
    assert [frame.shape for _, frame in frames] == [(48, 64, 3)] * 2


def test_a_video_beside_its_input_never_replaces_the_users_but_a_rerun_replaces_ours(
        model_file, tmp_path, capsys):  # noqa: F811
    _write_clip(tmp_path / "clip.mov", 4, Fraction(10), "libx264")
    _write_clip(tmp_path / "clip.mp4", 6, Fraction(10), "libx264")  # the user's, not a map
    theirs = (tmp_path / "clip.mp4").read_bytes()
    for _ in range(2):
        assert main(["--checkpoint", str(model_file), "--input", str(tmp_path / "clip.mov"),
                     "--output", str(tmp_path), "--map-video", "--compilation-cache", ""]) == 0
        assert (tmp_path / "clip.mp4").read_bytes() == theirs
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "clip.mov", "clip.mov.mp4", "clip.mov_overlay.mp4", "clip.mp4"]
    assert len(_read_clip(tmp_path / "clip.mov.mp4")[0]) == 4


def test_outputs_say_their_colours_are_bt601(tmp_path):
    """FFmpeg converts RGB to YUV with BT.601; untagged, players take an HD video for BT.709
    and show pure green as (0, 209, 0)."""
    av = _needs_av()
    from mlnet_jax.video import VideoWriter
    bars = np.zeros((720, 1280, 3), np.uint8)
    bars[:, :400, 0] = bars[:, 440:840, 1] = bars[:, 880:, 2] = 255
    with VideoWriter(tmp_path / "bars.mp4", 1280, 720, Fraction(10)) as writer:
        for i in range(2):
            writer.write(bars, i / 10)
    with av.open(str(tmp_path / "bars.mp4")) as container:
        stream = container.streams.video[0]
        frame = next(container.decode(stream))
    tags = stream.codec_context
    assert (int(tags.colorspace), int(tags.color_primaries), int(tags.color_trc),
            int(tags.color_range)) == (6, 6, 6, 1)  # SMPTE 170M (BT.601), limited range
    shown = frame.to_ndarray(format="rgb24")[360, [200, 640, 1080]].astype(int)
    np.testing.assert_allclose(shown, [[255, 0, 0], [0, 255, 0], [0, 0, 255]], atol=4)


def test_frame_times_that_repeat_or_go_back_still_give_increasing_times(tmp_path):
    """An input clock that repeats a time or steps back (a damaged or spliced file): each
    frame is put at least one tick after the previous one. Passed on as they are, the muxer
    would refuse the repeated timestamp or the file would show frames out of order."""
    _needs_av()
    from mlnet_jax.video import VideoWriter
    times = [0, .04, .04, .12, .10, .2]
    with VideoWriter(tmp_path / "back.mp4", 64, 48, Fraction(25)) as writer:
        for i, t in enumerate(times):
            writer.write(_frame_image(i), t)
    got = _frame_times(tmp_path / "back.mp4")
    assert len(got) == len(times)
    assert (np.diff(got) > 0).all(), got


def test_damaged_packets_are_skipped_as_players_skip_them(model_file, tmp_path, capsys):  # noqa: F811
    """A video whose first frames cannot be decoded (a recording cut without re-encoding,
    garbage at its start) got no output at all, and one damaged frame midway ended the output
    there, though players show the rest: the frames that decode are written, and the error
    line says how many packets were skipped."""
    av = _needs_av()
    path = tmp_path / "in" / "damaged.avi"
    path.parent.mkdir()
    codec = av.CodecContext.create("mjpeg", "w")
    codec.width, codec.height, codec.pix_fmt = 64, 48, "yuvj420p"
    codec.time_base = Fraction(1, 15)
    packets = []
    for i in range(12):
        frame = av.VideoFrame.from_ndarray(_frame_image(i), format="rgb24")
        frame.pts = i
        packets += codec.encode(frame)
    packets += codec.encode(None)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=15)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        for i, encoded in enumerate(packets):  # the first two frames and one midway: zeroed
            packet = av.Packet(bytes(len(bytes(encoded))) if i in (0, 1, 6) else bytes(encoded))
            packet.stream, packet.time_base, packet.pts = stream, Fraction(1, 15), i
            packet.dts, packet.is_keyframe = i, True
            container.mux(packet)
    out = tmp_path / "out"
    code = main(["--checkpoint", str(model_file), "--input", str(path.parent), "--output",
                 str(out), "--compilation-cache", "", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and re.search(
        rf"error: {re.escape(str(path))}: 3 damaged packets skipped \(corrupt video data: .+\): "
        "9 frames of the 12 its container lists decoded; the output has those", err), err
    times = _frame_times(out / "damaged_overlay.mp4")
    assert len(times) == 9  # frames 2-5 and 7-11, with frame 6's gap kept
    np.testing.assert_allclose(np.diff(times), [1 / 15] * 3 + [2 / 15] + [1 / 15] * 4,
                               atol=1e-3)


def test_transparent_video_frames_are_put_on_white_as_images_are(tmp_path):
    """A PNG-coded video's transparent pixels reached the model as (0, 0, 0): its colour
    underneath; an image's are put on white."""
    av = _needs_av()
    from mlnet_jax.video import open_video
    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 32:, 3] = 255  # left half transparent, right half opaque red
    rgba[:8, 32:, 3] = 128  # a half-transparent band
    with av.open(str(tmp_path / "alpha.mov"), "w") as container:
        stream = container.add_stream("png", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "rgba"
        for _ in range(2):
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgba, format="rgba")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with open_video(tmp_path / "alpha.mov") as (_, frames):
        first = next(iter(frames))[1]
    assert (first[:, :32] == 255).all()
    assert (first[8:, 32:] == (200, 0, 0)).all()
    np.testing.assert_allclose(first[:8, 32:].reshape(-1, 3), [[227, 127, 127]] * 8 * 32, atol=1)


def test_the_map_video_holds_each_frames_map_and_takes_blur(model_file, tmp_path):  # noqa: F811
    """Frame 0 of the grey map video is the map the Predictor gives the decoded source frame
    (as a map PNG would hold it), and with --blur 4 that map blurred: an inverted map (1 −
    saliency) or a blur ignored for videos would be far from it (H.264 allows small errors)."""
    from mlnet_jax.overlay import blur_map, map_to_uint8
    _write_clip(tmp_path / "clip.mp4", 6, Fraction(24), "libx264")
    source, _, _ = _read_clip(tmp_path / "clip.mp4")
    saliency = Predictor.load(model_file)(source[0])
    for blur in (0, 4):
        out = tmp_path / f"out{blur}"
        assert main(["--checkpoint", str(model_file), "--input", str(tmp_path / "clip.mp4"),
                     "--output", str(out), "--map-video", "--blur", str(blur),
                     "--compilation-cache", ""]) == 0
        maps, _, _ = _read_clip(out / "clip.mp4")
        got = maps[0].astype(np.float64).mean(axis=-1)
        want = map_to_uint8(blur_map(saliency, blur) if blur else saliency).astype(np.float64)
        other = map_to_uint8(saliency if blur else blur_map(saliency, 4)).astype(np.float64)
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.9, blur
        assert np.abs(got - want).mean() < 0.5 * np.abs(got - other).mean(), blur
