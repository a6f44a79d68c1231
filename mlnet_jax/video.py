"""Video frames in and out through PyAV (FFmpeg), the optional ``video`` extra.

Frames are read as RGB uint8 arrays as displayed: widened where pixels are not square
(anamorphic video) and turned upright (phone videos store a rotation that players apply; the
output has neither, so both are applied to the pixels). Output is always MP4/H.264 at the
input's frame rate and displayed size; audio is not copied. PyAV is imported only when a video
is opened, so the rest of the package works without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

from mlnet_jax.atomic import atomic_path
from mlnet_jax.errors import UserError

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm"})
OUTPUT_SUFFIX = ".mp4"
MISSING_EXTRA = "video input needs the video extra: pip install 'mlnet-jax[video]'"
_FALLBACK_RATE = Fraction(25)


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
    """What the output must match: displayed size, frame rate, and the frame count if known."""

    width: int
    height: int
    rate: Fraction
    frames: int | None


@contextlib.contextmanager
def open_video(path: str | os.PathLike) -> Iterator[tuple[VideoInfo, Iterator[np.ndarray]]]:
    """``with open_video(p) as (info, frames)``: frames are upright H×W×3 uint8 RGB arrays."""
    av = require_av()
    path = Path(path)
    try:
        container = av.open(str(path), mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"{path}: cannot open as a video ({_reason(e)})") from None
    try:
        if not container.streams.video:
            raise VideoError(f"{path}: has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate or _FALLBACK_RATE
        decoded = _upright_frames(container, stream, path, stream.sample_aspect_ratio)
        # The first frame tells the displayed size (rotation is per frame in FFmpeg).
        first = next(decoded, None)
        if first is None:
            raise VideoError(f"{path}: has no frames")
        info = VideoInfo(width=first.shape[1], height=first.shape[0], rate=Fraction(rate),
                         frames=int(stream.frames) or None)
        yield info, itertools.chain([first], decoded)
    finally:
        container.close()


def _upright_frames(container, stream, path: Path, pixel_aspect: Fraction | None
                    ) -> Iterator[np.ndarray]:
    """Frames as displayed: non-square pixels (anamorphic video, ``pixel_aspect`` ≠ 1) widened
    to the display aspect, then turned upright."""
    av = require_av()
    try:
        for frame in container.decode(stream):
            width = frame.width
            if pixel_aspect and pixel_aspect != 1:
                width = max(1, round(frame.width * pixel_aspect))
            array = frame.to_ndarray(format="rgb24", width=width, height=frame.height,
                                     interpolation="BILINEAR")
            turns = round(frame.rotation or 0) // 90  # counter-clockwise
            yield np.ascontiguousarray(np.rot90(array, turns)) if turns % 4 else array
    except av.error.FFmpegError as e:
        raise VideoError(f"{path}: corrupt video data ({_reason(e)})") from None


class VideoWriter:
    """H.264 MP4 writer for RGB frames at a fixed rate; the file appears only when complete.

    Use as a context manager: on an exception the partial file is removed and any previous
    file at ``path`` is left as it was.
    """

    def __init__(self, path: str | os.PathLike, width: int, height: int, rate: Fraction,
                 crf: int = 18):
        self.path, self.width, self.height, self.rate, self.crf = Path(path), width, height, rate, crf
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "VideoWriter":
        av = require_av()
        tmp = self._stack.enter_context(atomic_path(self.path))
        try:
            self._container = av.open(str(tmp), mode="w", format="mp4")
            # 4:2:0 chroma needs even sizes; odd ones keep their size with 4:4:4.
            even = self.width % 2 == 0 and self.height % 2 == 0
            self._stream = self._container.add_stream("libx264", rate=self.rate)
            self._stream.width, self._stream.height = self.width, self.height
            self._stream.pix_fmt = "yuv420p" if even else "yuv444p"
            self._stream.options = {"crf": str(self.crf), "preset": "veryfast"}
        except Exception:
            self._stack.close()
            raise
        return self

    def write(self, rgb: np.ndarray) -> None:
        av = require_av()
        if rgb.shape != (self.height, self.width, 3):
            raise ValueError(f"frame of shape {rgb.shape}, the video is {self.height}×{self.width}×3")
        # No pts: PyAV numbers frames at the stream rate (explicit pts at a 1/rate time base
        # upset the MP4 muxer once B-frames are reordered).
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb, np.uint8), format="rgb24")
        self._container.mux(self._stream.encode(frame))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._container.mux(self._stream.encode(None))  # flush delayed frames
            self._container.close()
        except BaseException as e:
            self._stack.__exit__(type(e), e, e.__traceback__)
            raise
        # Renames the finished file into place, or removes the partial one after an error.
        self._stack.__exit__(exc_type, exc, tb)


def _reason(error: Exception) -> str:
    return getattr(error, "strerror", None) or str(error) or type(error).__name__
