"""Saliency maps for images, folders and videos: ``python -m mlnet_jax.predict``.

    python -m mlnet_jax.predict --checkpoint DIR --input FILE_OR_DIR --output DIR
        [--overlay] [--map-video] [--batch-size N] [--blur SIGMA] [--max-pixels N] [--ignore-exif]
        [--compilation-cache DIR] [--workers N] [--debug]

Outputs mirror the input: ``--input photos`` with ``photos/a/b/x.jpg`` writes
``OUT/a/b/x.png`` (8-bit grey map at the image's size) and, with ``--overlay``,
``OUT/a/b/x_overlay.png`` (the image with a colour heatmap blended over it). A single file
writes ``OUT/<stem>.png``. A video ``clip.mp4`` writes ``OUT/clip_overlay.mp4`` (same frame
times and displayed size, H.264, no audio) and, with ``--map-video``, the grey map video ``OUT/clip.mp4``.
Hidden files and folders and the output folder itself (when inside the input) are skipped.
When two inputs would write the same file (``x.jpg`` and ``x.png`` in one folder; names are
compared ignoring case), the later one in sorted order is named after its full file name
(``x.png.png``, ``x.png_overlay.png``) and a note says so; the same happens to an output that
would replace an input, a folder another output needs, or any file this command did not write
(a photo ``x.png`` beside a single ``x.jpg`` predicted into its own folder, a user's own file
in the output folder; outputs are tagged ``mlnet_jax``, and only those are replaced). A folder
run skips the outputs of earlier runs it finds among its inputs, and files that are not
regular files (a named pipe would block its reader). ``--output`` equal to the input folder
is refused: a rerun would predict on its own maps.

A bad file never stops the run: each failure is one ``error: FILE: reason`` line, every good
file is written, and the exit status is 2 if anything failed. Every file is written under a
temporary name and renamed when complete, so an existing output is never left half-replaced.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import itertools
import os
import stat
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, PngImagePlugin

from mlnet_jax.atomic import atomic_path
from mlnet_jax.errors import UserError
from mlnet_jax.interrupts import sigterm_raises, stopped
from mlnet_jax.image_io import IMAGE_EXTENSIONS, MAX_PIXELS, ImageError, is_image_path, load_image
from mlnet_jax.overlay import blur_map, map_to_uint8, overlay
from mlnet_jax.preprocessing import letterbox, postprocess
from mlnet_jax.video import OUTPUT_SUFFIX as VIDEO_SUFFIX
from mlnet_jax.video import VIDEO_EXTENSIONS, is_video_path

DEFAULT_CACHE = "~/.cache/mlnet_jax/jax_cache"  # the training configs' default too
OVERLAY_SUFFIX = "_overlay"
SOFTWARE_TAG = "mlnet_jax"  # in every map and overlay PNG, and every video's comment
MAP_SUFFIX = ".png"
#: Pixels the worker threads decode and write at once (≈ 3 GB at the ~15 bytes a pixel of a
#: large photo's map, ≈ 4.6 GB at the ~23 of a map and overlay, measured on a 90-megapixel
#: PNG): sixteen 12-megapixel photos side by side, but one 150-megapixel image at a time.
PIXELS_AT_ONCE = 200_000_000
#: Larger images are decoded again to write their overlay instead of waiting in memory.
KEEP_FOR_OVERLAY = 4_000_000


@dataclasses.dataclass(frozen=True)
class Job:
    """One input and the files it writes."""

    source: Path
    is_video: bool
    map_path: Path | None        # grey map PNG; for a video only with --map-video
    overlay_path: Path | None    # overlay PNG with --overlay; always for a video
    renamed: bool = False        # named after the full file name (its stem's outputs were taken)


@dataclasses.dataclass
class Report:
    """What happened, for the summary line and the exit status."""

    done: int = 0
    failed: list[tuple[Path, str]] = dataclasses.field(default_factory=list)
    frames: int = 0

    def fail(self, source: Path, message: str, write=None) -> None:
        self.failed.append((source, message))
        line = f"error: {_one_line(message)}"
        (write or (lambda s: print(s, file=sys.stderr, flush=True)))(line)


# --------------------------------------------------------------------------- inputs and names

#: Why ``find_inputs`` skipped files, as the command's closing note says it.
NOT_MEDIA = "that are not images or videos by their extension"
NOT_FILES = "that are not regular files (pipes, sockets, devices: reading one can block)"
OURS = "that are maps, overlays or videos this command wrote"
#: Write errors that stop a folder run at once rather than fail every file after.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def find_inputs(input_path: Path, output_dir: Path) -> tuple[list[Path], dict[str, list[Path]]]:
    """(images and videos under ``input_path`` in sorted order, {reason: files skipped}).

    Hidden files and folders, and ``output_dir`` when it lies inside the input, are not
    walked, and outputs of an earlier run written elsewhere in the tree (beside a single
    input) are skipped, so a rerun never predicts on its own outputs; ``output_dir`` equal to
    the input folder is refused for the same reason. Symbolic links to folders are followed,
    each real folder walked once (a link back up the tree is not a loop).
    """
    if input_path.is_file():
        return [input_path], {}
    if not input_path.is_dir():
        what = "not a file or folder" if input_path.exists() else "no such file or folder"
        try:
            input_path.stat()
        except OSError as e:
            if e.errno == errno.ELOOP:
                what = "a loop of symbolic links"
        raise UserError(f"--input {input_path}: {what}")
    out_resolved = output_dir.resolve()
    if out_resolved == input_path.resolve():
        raise UserError(f"--output {output_dir}: is the --input folder itself, so a rerun would "
                        "predict on its own maps; name another folder (one inside the input is "
                        f"fine, e.g. {output_dir / 'maps'})")
    found, skipped = [], collections.defaultdict(list)
    walked = {input_path.resolve()}
    for folder, dirs, files in os.walk(input_path, followlinks=True):
        kept = []
        for name in sorted(dirs):
            real = (Path(folder) / name).resolve()
            if not name.startswith(".") and real != out_resolved and real not in walked:
                walked.add(real)
                kept.append(name)
        dirs[:] = kept
        for name in sorted(files):
            path = Path(folder) / name
            if name.startswith("."):
                continue
            if not (is_image_path(path) or is_video_path(path)):
                skipped[NOT_MEDIA].append(path)
            elif not _regular_file(path):
                skipped[NOT_FILES].append(path)
            elif path.suffix.lower() in (MAP_SUFFIX, VIDEO_SUFFIX) and is_our_output(path):
                skipped[OURS].append(path)
            else:
                found.append(path)
    return found, dict(skipped)


def _regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:  # a broken link: reading it says why, in the run's error lines
        return True


def plan_outputs(sources: Iterable[Path], root: Path, output_dir: Path, overlay: bool,
                 map_video: bool) -> list[Job]:
    """Output paths mirroring each source's path relative to ``root``.

    A source whose outputs are already claimed by an earlier source, would replace an input
    file, a folder another output needs, or any file this command did not write (a photo
    beside a single input, a user's file in the output folder), is named after its full file
    name instead (names compared ignoring case, as on macOS and Windows file systems).
    """
    sources = list(sources)
    claimed = {_key(s) for s in sources}
    folders = {(source.relative_to(root) if source != root else Path(source.name)).parent
               for source in sources}
    for folder in {parent for f in folders for parent in (f, *f.parents)}:
        claimed.add(_key(output_dir / folder))  # a folder outputs go into is no output file

    def taken(path: Path) -> bool:
        """Claimed by this run, a folder, or a file this command did not write (a photo
        ``x.png`` beside ``x.jpg``, or one a user keeps in the output folder): none of them
        is replaced."""
        if _key(path) in claimed:
            return True
        try:
            return path.is_dir() or (path.exists() and not is_our_output(path))
        except OSError:  # e.g. a name too long for the file system: its write will say so
            return False

    jobs = []
    for source in sources:
        relative = source.relative_to(root) if source != root else Path(source.name)
        video = is_video_path(source)
        suffix = VIDEO_SUFFIX if video else MAP_SUFFIX
        want_map = map_video if video else True
        want_overlay = True if video else overlay
        folder = output_dir / relative.parent
        for attempt in itertools.count():
            base = (relative.stem, relative.name)[attempt] if attempt < 2 else f"{relative.name}~{attempt}"
            map_path = folder / f"{base}{suffix}" if want_map else None
            overlay_path = folder / f"{base}{OVERLAY_SUFFIX}{suffix}" if want_overlay else None
            outputs = [p for p in (map_path, overlay_path) if p is not None]
            if not any(taken(p) for p in outputs):
                claimed |= {_key(p) for p in outputs}
                jobs.append(Job(source, video, map_path, overlay_path, renamed=attempt > 0))
                break
    return jobs


def _listed(extensions) -> str:
    return " ".join(sorted(extensions))


def _key(path: Path) -> str:
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
        resolved = Path(os.path.abspath(path))  # reading it will say so, in its error line
    return str(resolved).casefold()


def check_output_dir(output_dir: Path) -> None:
    """Create ``output_dir`` and prove it is writable now, rather than failing on every file."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output {output_dir}: cannot create the folder "
                        f"({e.strerror or e})") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".mlnet_write_test.", dir=output_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"--output {output_dir}: the folder is not writable "
                        f"({e.strerror or e})") from None


# --------------------------------------------------------------------------- images

def write_png(path: Path, array: np.ndarray) -> None:
    """PNG written under a temporary name, renamed into place when complete. zlib level 1:
    encoding is the costliest host step of a folder run (a smooth 640×480 map: 7 ms and 79 kB
    at level 1, 11 ms and 66 kB at level 4, 30 ms at PIL's default 6)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", SOFTWARE_TAG)  # how a rerun tells its own outputs from photos
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", compress_level=1, pnginfo=info)


def is_our_output(path: Path) -> bool:
    """Whether ``path`` is an output of this command (so a rerun may replace it): a PNG with
    our ``Software`` text (read from the chunks before the pixels, without decoding), or a
    video with our ``comment``."""
    if path.suffix.lower() == VIDEO_SUFFIX:
        from mlnet_jax.video import is_our_video  # noqa: PLC0415
        return is_our_video(path)
    wanted = b"Software\0" + SOFTWARE_TAG.encode()
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return False
            while len(header := f.read(8)) == 8:
                length, kind = int.from_bytes(header[:4], "big"), header[4:]
                if kind in (b"IDAT", b"IEND"):
                    return False
                data = f.read(length)
                if kind == b"tEXt" and data == wanted:
                    return True
                f.seek(4, os.SEEK_CUR)  # the chunk's CRC
    except OSError:
        return False
    return False


def full_size_map(raw: np.ndarray, size: tuple[int, int], blur: float = 0.0) -> np.ndarray:
    """Model-resolution map → [0, 1] map at ``size`` (rows, cols), optionally blurred."""
    saliency = postprocess(raw, size)
    return blur_map(saliency, blur) if blur > 0 else saliency


class PixelBudget:
    """Pixels being decoded or written at once, over all worker threads (each pixel costs
    15–23 bytes there: the decoded RGB, the float32 map, its grey levels, the overlay, PNG
    rows; float temporaries are made a band of rows at a time). A task waits for the budget
    before it starts and holds it only while it runs, never while waiting on another, so it
    cannot deadlock; an image larger than the whole budget runs alone."""

    def __init__(self, limit: int):
        self.limit, self.used, self.peak = limit, 0, 0
        self._free = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = min(pixels, self.limit)
        with self._free:
            self._free.wait_for(lambda: self.used == 0 or self.used + pixels <= self.limit)
            self.used += pixels
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._free:
                self.used -= pixels
                self._free.notify_all()


def _header_pixels(path: Path) -> int:
    """Width × height from the file's header (0 if unreadable: decoding will say why)."""
    try:
        with Image.open(path) as image:
            return image.size[0] * image.size[1]
    except Exception:  # noqa: BLE001
        return 0


@dataclasses.dataclass(frozen=True)
class _Decoded:
    """What writing needs of a decoded image: its size, and its pixels only for an overlay
    of a photo of up to KEEP_FOR_OVERLAY pixels (larger ones are decoded again to write the
    overlay, so that no more than the queues' count of small images waits in memory)."""

    size: tuple[int, int]
    image: np.ndarray | None


def _finish_image(job: Job, decoded: _Decoded, raw: np.ndarray, blur: float,
                  max_pixels: int, exif: bool) -> None:
    saliency = full_size_map(raw, decoded.size, blur)
    if job.map_path is not None:
        write_png(job.map_path, map_to_uint8(saliency))
    if job.overlay_path is not None:
        image = decoded.image if decoded.image is not None else load_image(
            job.source, max_pixels, exif=exif)
        write_png(job.overlay_path, overlay(image, saliency))


def _batched(predictor, items: Iterable[tuple]) -> Iterator[tuple]:
    """(key, image, letterboxed) in order → (key, image, raw map), through the device in padded
    batches of ``predictor.batch_size`` (one compilation for every image size; see
    ``Predictor.whole_batches``), the next batch gathered while the device computes this one
    (``Predictor.stream``)."""
    for (key, image, _), raw in predictor.stream(items, lambda item: item[2]):
        yield key, image, raw


def predict_images(predictor, jobs: list[Job], *, report: Report, blur: float = 0.0,
                   max_pixels: int = MAX_PIXELS, workers: int = 4, progress: bool = True,
                   pixels_at_once: int = PIXELS_AT_ONCE, exif: bool = True) -> None:
    """Decode and letterbox in ``workers`` threads ahead of the device, predict in padded
    batches, then resize, blur, colour and write in the threads; the device thread only feeds
    the device. Failures go to ``report``, one line each. ``exif=False``: images as stored."""
    from tqdm import tqdm

    if not jobs:
        return
    workers = max(1, workers)
    size = predictor.info.input_size

    budget = PixelBudget(pixels_at_once)

    def load(job: Job) -> tuple[_Decoded, np.ndarray]:
        with budget.hold(_header_pixels(job.source)):
            image = load_image(job.source, max_pixels, exif=exif)
            keep = job.overlay_path is not None and image.shape[0] * image.shape[1] <= \
                KEEP_FOR_OVERLAY
            return _Decoded(image.shape[:2], image if keep else None), letterbox(image, size)

    def write(job: Job, decoded: _Decoded, raw: np.ndarray) -> None:
        with budget.hold(decoded.size[0] * decoded.size[1]):
            _finish_image(job, decoded, raw, blur, max_pixels, exif)

    with concurrent.futures.ThreadPoolExecutor(workers) as pool, \
            tqdm(total=len(jobs), unit="img", disable=not progress, dynamic_ncols=True,
                 file=sys.stderr) as bar:

        def say(line: str) -> None:  # above the progress bar, on stderr like the bar
            bar.write(line, file=sys.stderr)

        def decoded() -> Iterator[tuple]:
            for job, future in _prefetch(pool, jobs, load, 2 * predictor.batch_size + workers):
                try:
                    image, boxed = future.result()  # image: a _Decoded
                except ImageError as e:
                    hint = "" if is_image_path(job.source) else \
                        f" (videos are read by extension: {_listed(VIDEO_EXTENSIONS)})"
                    report.fail(job.source, f"{e}{hint}", say)
                    bar.update(1)
                    continue
                except Exception as e:  # noqa: BLE001 — one bad file must not stop the run
                    report.fail(job.source, f"{job.source}: {type(e).__name__}: {e}", say)
                    bar.update(1)
                    continue
                yield job, image, boxed

        def finish(job: Job, future: concurrent.futures.Future) -> None:
            try:
                future.result()
                report.done += 1
            except OSError as e:
                if e.errno in DISK_FULL:  # every later write would fail the same way
                    # The writes still in flight ran in other threads, some before this one.
                    written = report.done + sum(f.exception() is None for _, f in writes)
                    raise UserError(f"{job.source}: cannot write its output ({_os_reason(e)}); "
                                    f"stopped, with {written} maps written (each complete): "
                                    "free space and rerun") from None
                report.fail(job.source, f"{job.source}: cannot write its output "
                                        f"({_os_reason(e)})", say)
            except Exception as e:  # noqa: BLE001 — resizing, blurring or colouring the map
                report.fail(job.source, f"{job.source}: cannot make its map "
                                        f"({type(e).__name__}: {e})", say)
            bar.update(1)

        writes: collections.deque[tuple[Job, concurrent.futures.Future]] = collections.deque()
        for job, image, raw in _batched(predictor, decoded()):
            writes.append((job, pool.submit(write, job, image, raw)))
            while writes and (writes[0][1].done() or len(writes) > 2 * workers):
                finish(*writes.popleft())
        while writes:
            finish(*writes.popleft())


def _prefetch(pool, items: list, fn, depth: int) -> Iterator[tuple]:
    """(item, future of fn(item)) in order, keeping ``depth`` calls in flight."""
    queue: collections.deque = collections.deque()
    iterator = iter(items)
    for item in itertools.islice(iterator, depth):
        queue.append((item, pool.submit(fn, item)))
    while queue:
        item, future = queue.popleft()
        following = next(iterator, None)
        if following is not None:
            queue.append((following, pool.submit(fn, following)))
        yield item, future


# --------------------------------------------------------------------------- videos

def _video_frames(frame: np.ndarray, raw: np.ndarray, blur: float, want_map: bool):
    """(overlay frame, grey map frame or None) for one video frame."""
    saliency = full_size_map(raw, frame.shape[:2], blur)
    grey = np.repeat(map_to_uint8(saliency)[..., None], 3, axis=-1) if want_map else None
    return overlay(frame, saliency), grey


def predict_video(predictor, job: Job, *, report: Report, blur: float = 0.0,
                  progress: bool = True, workers: int = 4) -> None:
    """Overlay video (and grey map video) at the input's rate and size. Frames go through the
    device in batches; resizing and colouring run in ``workers`` threads; frames are encoded
    in order."""
    from tqdm import tqdm

    from mlnet_jax.video import VideoWriter, open_video

    start = time.perf_counter()
    count = 0
    first_s = span = None  # the first frame's time; the last one's after it (seconds)
    short = False
    size = predictor.info.input_size
    workers = max(1, workers)
    try:
        with contextlib.ExitStack() as stack:
            info, frames = stack.enter_context(open_video(job.source))
            overlay_writer, map_writer = (
                stack.enter_context(VideoWriter(path, info.width, info.height, info.rate))
                if path is not None else None for path in (job.overlay_path, job.map_path))
            bar = stack.enter_context(tqdm(total=info.frames, unit="frame", disable=not progress,
                                           dynamic_ncols=True, file=sys.stderr,
                                           desc=_one_line(job.source.name)))
            pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(workers))
            pending: collections.deque[tuple] = collections.deque()  # (time, future)

            def encode_oldest() -> None:
                nonlocal count, first_s, span
                time_s, future = pending.popleft()
                if time_s is not None:
                    first_s = time_s if first_s is None else first_s
                    span = time_s - first_s
                blended, grey = future.result()
                if overlay_writer is not None:
                    overlay_writer.write(blended, time_s)
                if map_writer is not None:
                    map_writer.write(grey, time_s)
                count += 1
                bar.update(1)

            boxed = ((time_s, frame, letterbox(frame, size)) for time_s, frame in frames)
            for time_s, frame, raw in _batched(predictor, boxed):
                pending.append((time_s, pool.submit(_video_frames, frame, raw, blur,
                                                    map_writer is not None)))
                while len(pending) > 2 * max(workers, predictor.batch_size):
                    encode_oldest()
            while pending:
                encode_oldest()
            short = _cut_short(info, frames, count, first_s, span)
            if first_s is not None and info.duration and not (short or frames.stopped_by):
                for writer in (overlay_writer, map_writer):
                    if writer is not None:  # the last frame is shown until the input ends
                        writer.end_at(first_s + info.duration)
    except UserError as e:
        report.fail(job.source, str(e) if str(job.source) in str(e) else f"{job.source}: {e}")
        return
    except Exception as e:  # noqa: BLE001 — FFmpeg errors, a frame size change, a full disk
        outputs = [p for p in (job.overlay_path, job.map_path) if p is not None]
        if isinstance(e, OSError) and e.filename and any(
                Path(e.filename) == p or Path(e.filename) in p.parents for p in outputs):
            report.fail(job.source, f"{job.source}: cannot write its output ({_os_reason(e)})")
            return
        report.fail(job.source, f"{job.source}: {type(e).__name__}: {e}")
        return
    seconds = time.perf_counter() - start
    report.frames += count
    if frames.stopped_by or short:
        listed = f" of the {info.frames} its container lists" if info.frames else ""
        report.fail(job.source, f"{job.source}: {frames.stopped_by or 'cut short?'}: {count} "
                                f"frames{listed} decoded; the output has those")
        return
    report.done += 1
    print(_one_line(f"{job.source}: {count} frames in {seconds:.1f} s "
                    f"({count / max(seconds, 1e-9):.1f} frames/s) → {job.overlay_path}"
                    + (f", {job.map_path}" if job.map_path else ""), limit=10_000), file=sys.stderr,
          flush=True)


def _cut_short(info, frames, count: int, first_s: float | None, span: float | None) -> bool:
    """Decoding ended well before the stream's duration (which, unlike the frame count,
    follows an edit list): the file is cut short; PyAV's threaded decoding ends such a file
    quietly. Not when every frame the container lists was decoded, or the last frame's own
    duration reaches the end (a video ending on a still frame held for seconds)."""
    if info.duration is None or span is None:
        return False
    frame_s = float(1 / info.rate)
    shown = span + max(frame_s, frames.last_duration or 0)
    return (shown < 0.99 * info.duration - 2 * frame_s
            and not (info.frames and count >= info.frames))


# --------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlnet_jax.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="training workdir, checkpoint directory or converted full-model .npz")
    p.add_argument("--input", required=True, metavar="FILE_OR_DIR", help="an image, a video, or a folder (walked recursively)")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the outputs (created if missing)")
    p.add_argument("--overlay", action="store_true",
                   help="also write each image with the heatmap blended over it (<stem>_overlay.png)")
    p.add_argument("--map-video", action="store_true",
                   help="for videos, also write the grey map video (<stem>.mp4)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="images per batch, split over all devices (rounded up to a multiple of "
                        "the device count; default 8)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype (default float32, as trained and evaluated; bfloat16 is "
                        "much faster on a GPU or TPU, its maps within a few grey levels)")
    # first_conv.FIRST_CONV_MODES, named here so that --help does not import JAX
    p.add_argument("--first-conv", choices=("auto", "xla", "pallas"), default="auto",
                   help="where the Pallas kernels run (conv1_1's, and the others adopted): auto "
                        "(default: in bfloat16 on one Hopper GPU, XLA's operations "
                        "elsewhere), xla, or pallas (off a GPU in Pallas's slow interpreter)")
    p.add_argument("--blur", type=float, default=0.0, metavar="SIGMA",
                   help="Gaussian blur of the maps, sigma in pixels of the original image "
                        "(default 0: none, as the original)")
    p.add_argument("--ignore-exif", action="store_true",
                   help="use images as stored, not turned as their EXIF orientation says: how "
                        "MATLAB and the saliency benchmarks read stimuli (for submissions)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                   help=f"refuse images with more pixels than this (decompression bombs; "
                        f"default {MAX_PIXELS:,})")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), metavar="N",
                   help="threads decoding and writing images (default: CPU count, at most 8)")
    p.add_argument("--compilation-cache", default=DEFAULT_CACHE, metavar="DIR",
                   help=f"persistent XLA compilation cache (default {DEFAULT_CACHE}; '' disables)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p


def run(args: argparse.Namespace) -> int:
    """The command without its error handling; returns the exit status."""
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not 0 <= args.blur < float("inf"):  # NaN too
        raise UserError(f"--blur must be a finite number ≥ 0, got {args.blur}")
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if args.max_pixels < 1:
        raise UserError(f"--max-pixels must be at least 1, got {args.max_pixels}")
    from mlnet_jax.compute_dtype import compute_dtype

    dtype = compute_dtype(args.dtype, "--dtype")
    input_path, output_dir = Path(args.input).expanduser(), Path(args.output).expanduser()
    sources, skipped = find_inputs(input_path, output_dir)
    if not sources:
        raise UserError(f"--input {input_path}: no images or videos found (extensions: "
                        f"images {_listed(IMAGE_EXTENSIONS)}, videos {_listed(VIDEO_EXTENSIONS)})")
    root = input_path if input_path.is_dir() else input_path.parent
    jobs = plan_outputs(sources, root, output_dir, args.overlay, args.map_video)
    check_output_dir(output_dir)
    if input_path.is_dir() and output_dir.resolve().is_relative_to(input_path.resolve()):
        print(_one_line(f"note: the output folder {output_dir} lies inside the input; files in "
                        "it are not read as inputs"), file=sys.stderr)
    with _pillow_bomb_check_left_to_us(args.max_pixels):
        return _predict_jobs(args, dtype, jobs, skipped, output_dir)


@contextlib.contextmanager
def _pillow_bomb_check_left_to_us(max_pixels: int) -> Iterator[None]:
    """While the command runs, Pillow's own bomb check neither refuses what --max-pixels allows
    (its limit is raised) nor warns about what --max-pixels refuses in one line (its warning is
    ignored here, for the whole run: ``load_image``'s own ``catch_warnings`` is not thread-safe,
    and one decoding thread leaving it can undo another's). Both are restored after, since
    ``main`` may run inside a user's program."""
    previous = Image.MAX_IMAGE_PIXELS
    if previous is not None and previous < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _predict_jobs(args: argparse.Namespace, dtype, jobs: list[Job],
                  skipped: dict[str, list[Path]], output_dir: Path) -> int:
    from mlnet_jax.inference import Predictor
    from mlnet_jax.compilation_cache import enable_compilation_cache

    enable_compilation_cache(args.compilation_cache, "--compilation-cache")
    predictor = Predictor.load(Path(args.checkpoint).expanduser(), batch_size=args.batch_size,
                               dtype=dtype, first_conv=args.first_conv)
    # One compilation per run: several inputs all go in whole batches; one image (or one short
    # video) alone is computed as the next power of two, not as a batch of --batch-size.
    predictor.whole_batches = len(jobs) > 1
    report = Report()
    image_jobs = [j for j in jobs if not j.is_video]
    video_jobs = [j for j in jobs if j.is_video]
    start = time.perf_counter()
    predict_images(predictor, image_jobs, report=report, blur=args.blur,
                   max_pixels=args.max_pixels, workers=args.workers,
                   progress=not args.no_progress, exif=not args.ignore_exif)
    seconds = time.perf_counter() - start
    if image_jobs:
        images_ok = report.done
        print(f"{images_ok} of {len(image_jobs)} images in {seconds:.1f} s "
              f"({images_ok / max(seconds, 1e-9):.1f} images/s) → {output_dir}",
              file=sys.stderr, flush=True)
    for job in video_jobs:
        predict_video(predictor, job, report=report, blur=args.blur, progress=not args.no_progress,
                      workers=args.workers)
    for reason, files in skipped.items():
        if reason == NOT_MEDIA:
            kinds = sorted({p.suffix.lower() or "(none)" for p in files})
            which = f"{', '.join(kinds[:8])}{', …' if len(kinds) > 8 else ''}"
        else:
            which = f"{files[0]}{', …' if len(files) > 1 else ''}"
        print(_one_line(f"skipped {len(files)} file(s) {reason} ({which})"), file=sys.stderr)
    failed = {source for source, _ in report.failed}  # they wrote nothing under any name
    for job in (j for j in jobs if j.renamed and j.source not in failed):
        print(_one_line(f"note: {job.source}'s outputs would replace another input's, a folder "
                        "or a file this command did not write; they are named "
                        f"{(job.map_path or job.overlay_path).name}"), file=sys.stderr)
    if report.failed:
        print(f"{len(report.failed)} of {len(jobs)} inputs failed", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with sigterm_raises():
            return run(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if args.debug:
            raise
        return stopped(e, "finished outputs are complete, none is half-written")
    except Exception as e:  # noqa: BLE001 — one line for people; --debug for the traceback
        if args.debug:
            raise
        if not (isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e)):  # host, device
            print(f"error: {type(e).__name__}: {_one_line(str(e))} (rerun with --debug for the "
                  "traceback)", file=sys.stderr)
            return 1
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(_one_line(f"error: out of memory ({reason}); a batch holds --batch-size "
                        f"{args.batch_size} images at the model's input size on the host and "
                        "the device: use a smaller --batch-size"), file=sys.stderr)
        return 2


def _os_reason(error: OSError) -> str:
    """'reason: path' (the output, or the file standing where its folder should be)."""
    reason = error.strerror or str(error)
    return f"{reason}: {error.filename}" if error.filename else reason


def _one_line(text: str, limit: int = 400) -> str:
    """One line: control characters (a newline inside a file name, in an exception's text) are
    escaped, so the line names the right file."""
    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return line if len(line) <= limit else line[:limit - 1] + "…"


if __name__ == "__main__":
    sys.exit(main())
