"""Video frames in and out through PyAV (FFmpeg), the optional ``video`` extra.

Frames are read as RGB uint8 arrays as displayed: widened where pixels are not square
(anamorphic video) and turned upright (phone videos store a rotation that players apply; the
output has neither, so both are applied to the pixels), each with its time. Output is always
MP4/H.264 at the input's displayed size and frame times (a variable frame rate, as phones
record, keeps its timing); audio is not copied. PyAV is imported only when a video is opened,
so the rest of the package works without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

from mlnet_jax.atomic import atomic_path
from mlnet_jax.errors import UserError

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm"})
OUTPUT_SUFFIX = ".mp4"
OUR_COMMENT = "mlnet_jax"  # the container comment of every video written here
MISSING_EXTRA = "video input needs the video extra: pip install 'mlnet-jax[video]'"
_FALLBACK_RATE = Fraction(25)
#: The output's clock (MPEG's 90 kHz), made finer where the frame rate needs it to be exact.
TIME_BASE = Fraction(1, 90000)
#: How far (seconds) an input time may be from the nominal rate's grid and still be put on
#: it: Matroska's clock rounds to milliseconds.
SNAP = Fraction(1, 1000)


class VideoError(UserError):
    """A video that cannot be read or written; the message names the file."""


def is_video_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def require_av():
    """The ``av`` module, or a UserError saying which extra to install."""
    try:
        import av
    except ImportError:
        raise UserError(MISSING_EXTRA) from None
    return av


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What the output must match: displayed size and frame rate; the frame count and the
    duration in seconds (which follows an edit list, unlike the count) if the file says."""

    width: int
    height: int
    rate: Fraction
    frames: int | None
    duration: float | None = None


@contextlib.contextmanager
def open_video(path: str | os.PathLike) -> Iterator[tuple[VideoInfo, "Frames"]]:
    """``with open_video(p) as (info, frames)``: ``frames`` gives (time in seconds or None,
    upright H×W×3 uint8 RGB array), every one at the first one's size."""
    av = require_av()
    path = Path(path)
    try:
        if path.stat().st_size == 0:  # FFmpeg would say 'Invalid data found'
            raise VideoError(f"{path}: empty file (0 bytes)")
    except OSError:
        pass  # missing or unreadable: FFmpeg's own reason below names it
    try:  # absolute: FFmpeg reads a relative 'a:b.mp4' as a URL of protocol 'a'
        container = av.open(str(path.absolute()), mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"{path}: cannot open as a video ({_reason(e)})") from None
    frames = None
    try:
        stream = _main_video_stream(container, path)
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate or _FALLBACK_RATE
        frames = Frames(container, stream, path)
        # The first frame tells the displayed size (rotation is per frame in FFmpeg).
        width, height = frames.size()
        yield VideoInfo(width=width, height=height, rate=Fraction(rate),
                        frames=int(stream.frames) or None,
                        duration=_duration(container, stream)), frames
    finally:
        if frames is not None:
            frames.close()
        container.close()


def _duration(container, stream) -> float | None:
    """The video stream's duration in seconds: its own, else its ``DURATION`` tag (Matroska
    and WebM), else the file's when the video is its only stream (a cut-short .mkv is then
    still told from a whole one); None when unknown. The file's is its longest stream's: an
    audio track a little longer than the video made every such file look cut short. The tag
    and the file's duration are where the video ends on the file's clock, so a video that
    starts later (a segment cut from a longer recording) has its start taken off."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if stream.start_time is not None and stream.time_base:
        start = float(stream.start_time * stream.time_base)
    else:
        start = (container.start_time or 0) / 1_000_000  # AV_TIME_BASE
    tag = _DURATION_TAG.fullmatch(str((stream.metadata or {}).get("DURATION", "")).strip())
    if tag:
        hours, minutes, seconds = tag.groups()
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds) - start
    if len(container.streams) > 1 or not container.duration:
        return None
    return container.duration / 1_000_000 - start


#: Matroska's per-track duration tag, e.g. "00:00:02.000000000".
_DURATION_TAG = re.compile(r"(\d+):(\d{2}):(\d{2}(?:\.\d+)?)")


class Frames:
    """A video's (time, frame as displayed) pairs: non-square pixels (anamorphic video)
    widened to the display aspect, then turned upright as the first frame's display matrix
    says; a frame whose stored size differs from the first one's (a resolution change
    mid-stream) scaled to it, as players do.

    Packets that cannot be decoded (corrupt data; the frames before a stream's first
    keyframe, in a recording cut without re-encoding) are skipped, as players skip them, and
    ``stopped_by`` says how many and why (None when every packet decoded)."""

    def __init__(self, container, stream, path: Path):
        self.stopped_by: str | None = None
        #: The last frame's own duration in seconds, where the file gives one.
        self.last_duration: float | None = None
        self._path, self._first = path, None
        self._decoded = self._decode(container, stream, path, stream.sample_aspect_ratio)

    def size(self) -> tuple[int, int]:
        """(width, height) as displayed, from the first frame (kept for iteration)."""
        if self._first is None:
            self._first = next(self._decoded, None)
            if self._first is None:
                raise VideoError(f"{self._path}: has no frames")
        return self._first[1].shape[1], self._first[1].shape[0]

    def __iter__(self) -> Iterator[tuple[float | None, np.ndarray]]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        yield from self._decoded

    def close(self) -> None:
        self._decoded.close()

    def _decode(self, container, stream, path: Path, pixel_aspect: Fraction | None):
        av = require_av()
        size = None  # stored (width, height) every frame is converted to
        upright = None  # the turn and mirroring every frame gets
        skipped, error = 0, None
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.error.FFmpegError as e:  # the container itself: nothing after it
                skipped, error = skipped + 1, e
                break
            try:
                decoded = packet.decode()
            except av.error.FFmpegError as e:  # this packet: the next may decode
                skipped, error = skipped + 1, e
                continue
            for frame in decoded:
                if size is None:
                    width = frame.width
                    if pixel_aspect and pixel_aspect != 1:  # even where the width is ours to pick
                        width = max(2, 2 * round(frame.width * pixel_aspect / 2))
                    size = width, frame.height
                array = _as_rgb(frame, size)
                if upright is None:  # the first frame's turn for every frame, as FFmpeg does
                    upright = _upright_function(frame)
                duration = getattr(frame, "duration", None)  # PyAV ≥ 13
                self.last_duration = (float(duration * frame.time_base)
                                      if duration and frame.time_base else None)
                yield frame.time, upright(array)
        if error is not None:
            if size is None:
                raise VideoError(f"{path}: corrupt video data ({_reason(error)})")
            self.stopped_by = (f"{skipped} damaged packet{'s' * (skipped > 1)} skipped "
                               f"(corrupt video data: {_reason(error)})")


def _as_rgb(frame, size: tuple[int, int]) -> np.ndarray:
    """RGB uint8 at ``size``; transparency (PNG or ProRes 4444 video, say) put on white, as
    for images (``image_io.to_rgb``), not dropped to the colour underneath (often black)."""
    if len(frame.format.components) not in (2, 4):  # grey + alpha, colour + alpha
        return frame.to_ndarray(format="rgb24", width=size[0], height=size[1],
                                interpolation="BILINEAR")
    rgba = frame.to_ndarray(format="rgba", width=size[0], height=size[1],
                            interpolation="BILINEAR").astype(np.float32)
    alpha = rgba[..., 3:] / 255.0
    return np.rint(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def _main_video_stream(container, path: Path):
    """The video, not cover art: streams flagged as an attached picture (an album cover, a
    thumbnail) are passed over, and of the others FFmpeg's choice is taken."""
    av = require_av()
    attached = av.stream.Disposition.attached_pic
    videos = [s for s in container.streams.video if not s.disposition & attached]
    if not videos:
        only = " (only cover art)" if container.streams.video else ""
        raise VideoError(f"{path}: has no video stream{only}")
    try:
        best = container.streams.best("video")
    except Exception:  # noqa: BLE001 — FFmpeg finds none it prefers
        best = None
    return best if best in videos else videos[0]


def _upright_function(frame):
    """array → array as displayed, from ``frame``'s display matrix (or its rotation)."""
    matrix = _display_matrix(frame)
    if matrix is not None:
        return lambda array: _as_displayed(array, matrix)
    turns = _counter_clockwise_turns(frame.rotation)
    return lambda array: np.ascontiguousarray(np.rot90(array, turns)) if turns else array


def _display_matrix(frame) -> np.ndarray | None:
    """The frame's display matrix (9 int32, 16.16 fixed point), if it has one (looked up by
    type: iterating the side data gives the entries in PyAV 14–18, their types in 19)."""
    from av.sidedata.sidedata import Type  # noqa: PLC0415
    data = frame.side_data.get(Type.DISPLAYMATRIX)
    if data is None:
        return None
    values = np.frombuffer(bytes(data), "<i4")
    return values if values.size == 9 else None


def _as_displayed(array: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``array`` turned and mirrored as FFmpeg's own autorotate does (``fftools``: its
    quarter turns and flips; another angle, or a singular matrix, is left as stored)."""
    a, b, c, d = (float(v) / 65536 for v in matrix[[0, 1, 3, 4]])
    scale_x, scale_y = math.hypot(a, c), math.hypot(b, d)
    if scale_x == 0 or scale_y == 0:
        return array
    theta = round(math.degrees(math.atan2(b / scale_y, a / scale_x)))  # clockwise degrees
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)
    if abs(theta - 90) < 1:
        out = array.swapaxes(0, 1) if matrix[3] > 0 else np.rot90(array, -1)
    elif abs(theta - 180) < 1:
        out = array[:, ::-1] if matrix[0] < 0 else array
        out = out[::-1] if matrix[4] < 0 else out
    elif abs(theta - 270) < 1:
        out = np.rot90(array, -1)[::-1] if matrix[3] < 0 else np.rot90(array, 1)
    elif abs(theta) < 1:
        out = array[::-1] if matrix[4] < 0 else array
    else:
        out = array
    return out if out is array else np.ascontiguousarray(out)


def _counter_clockwise_turns(rotation) -> int:
    """Quarter turns for a frame's display rotation in degrees; none for what is no
    rotation (FFmpeg gives INT_MIN for a singular display matrix)."""
    if rotation is None or not -360 <= rotation <= 360:
        return 0
    return (round(rotation) // 90) % 4


def is_our_video(path: Path) -> bool:
    """Whether the video at ``path`` was written by :class:`VideoWriter`."""
    try:
        av = require_av()
        with av.open(str(Path(path).absolute())) as container:
            return container.metadata.get("comment") == OUR_COMMENT
    except Exception:  # noqa: BLE001 — unreadable, or no PyAV: not known to be ours
        return False


class VideoWriter:
    """H.264 MP4 writer for RGB frames at their times (or ``rate``); the file appears only
    when complete.

    Use as a context manager: on an exception the partial file is removed and any previous
    file at ``path`` is left as it was.
    """

    def __init__(self, path: str | os.PathLike, width: int, height: int, rate: Fraction,
                 crf: int = 18):
        self.path, self.width, self.height, self.rate, self.crf = Path(path), width, height, rate, crf
        self.time_base = output_time_base(rate)
        self._stack = contextlib.ExitStack()
        self._anchor = None  # (pts, input time, frames written) where the rate's grid starts
        self._written = self._last = 0
        self._last_time = self._end_time = None  # the last frame's input time; the input's end

    def __enter__(self) -> "VideoWriter":
        av = require_av()
        tmp = self._stack.enter_context(atomic_path(self.path))
        try:
            self._container = av.open(str(tmp), mode="w", format="mp4")
            self._container.metadata["comment"] = OUR_COMMENT  # how a rerun knows it
            # 4:2:0 chroma needs even sizes; odd ones keep their size with 4:4:4.
            even = self.width % 2 == 0 and self.height % 2 == 0
            self._stream = self._container.add_stream("libx264", rate=self.rate)
            self._stream.width, self._stream.height = self.width, self.height
            self._stream.pix_fmt = "yuv420p" if even else "yuv444p"
            self._stream.options = {"crf": str(self.crf), "preset": "veryfast"}
            self._stream.codec_context.time_base = self.time_base
            _tag_bt601(self._stream.codec_context)
        except Exception:
            self._stack.close()
            raise
        return self

    def write(self, rgb: np.ndarray, time: float | None = None) -> None:
        """Append a frame shown at ``time`` seconds (the input's clock; None: one frame
        after the previous one)."""
        av = require_av()
        if rgb.shape != (self.height, self.width, 3):
            raise ValueError(f"frame of shape {rgb.shape}, the video is {self.height}×{self.width}×3")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb, np.uint8), format="rgb24")
        frame.pts, frame.time_base = self._pts(time), self.time_base
        self._container.mux(self._stream.encode(frame))
        self._written += 1
        self._last_time = time

    def end_at(self, time: float) -> None:
        """Show the last frame until ``time`` (the input's clock): a video that ends on a
        still frame held for seconds keeps its length, rather than end one frame after it."""
        self._end_time = time

    def _pts(self, time: float | None) -> int:
        """The input's time on the output clock. A time within the input clock's rounding
        (``SNAP``) of the nominal rate's grid, counted from the last frame off it, is put on
        the grid, so a constant rate stays exact; any other keeps the input's time (a
        variable frame rate) and starts the grid again from there."""
        if self._anchor is None:
            self._anchor = (0, time, 0)
            return 0
        pts, start, index = self._anchor
        nominal = pts + round((self._written - index) / self.rate / self.time_base)
        if time is None or start is None:
            chosen = nominal
        else:
            actual = pts + round((Fraction(time) - Fraction(start)) / self.time_base)
            chosen = nominal if abs(actual - nominal) <= SNAP / self.time_base else actual
            if chosen != nominal:
                self._anchor = (max(chosen, self._last + 1), time, self._written)
        self._last = max(chosen, self._last + 1)  # times must increase
        return self._last

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                packets = self._stream.encode(None)  # flush delayed frames
                self._hold_last_frame(packets)
                self._container.mux(packets)
            self._container.close()
        except BaseException as e:
            self._stack.__exit__(type(e), e, e.__traceback__)
            raise
        # Renames the finished file into place, or removes the partial one after an error.
        self._stack.__exit__(exc_type, exc, tb)


    def _hold_last_frame(self, packets) -> None:
        """The video lasts until ``end_at``'s time. The MP4 muxer ends the track at the last
        packet's presentation time plus its duration, that packet being the last in decoding
        order (with B-frames, not the last frame shown): its duration is set to reach the
        end (where the encoder still held it)."""
        if self._end_time is None or self._last_time is None or not packets:
            return
        end = self._last + round((Fraction(self._end_time) - Fraction(self._last_time))
                                 / self.time_base)
        if end - self._last < 1.5 / self.rate / self.time_base:  # one frame on: the muxer's own
            return
        last = packets[-1]
        if last.pts is not None and end - last.pts > (last.duration or 0):
            last.duration = end - last.pts


def output_time_base(rate: Fraction) -> Fraction:
    """1/90000 s, or finer so that one frame at ``rate`` is a whole number of ticks: 90 kHz
    cannot hold 1001/24000 s (23.976 fps), whose frames then alternated 3753 and 3754 ticks
    and read as a variable frame rate. Left at 90 kHz for a rate that would need a clock over
    10 MHz."""
    ticks = math.lcm(TIME_BASE.denominator, Fraction(rate).numerator)
    return Fraction(1, ticks) if ticks <= 10_000_000 else TIME_BASE


def _tag_bt601(codec_context) -> None:
    """Say what the frames are: FFmpeg converts RGB to YUV with BT.601 (limited range), and
    players take untagged HD video for BT.709, which shifts its colours (pure green shown as
    (0, 209, 0)). Values are FFmpeg's enums (SMPTE 170M = 6, MPEG range = 1); a PyAV
    without these attributes writes the video untagged."""
    for attribute, value in (("colorspace", 6), ("color_primaries", 6), ("color_trc", 6),
                             ("color_range", 1)):
        try:
            setattr(codec_context, attribute, value)
        except (AttributeError, TypeError, ValueError):
            pass


def _reason(error: Exception) -> str:
    return getattr(error, "strerror", None) or str(error) or type(error).__name__
