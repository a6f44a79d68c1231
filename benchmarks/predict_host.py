"""What the host lets ``python -m mlnet_jax.predict`` do on a folder of photos, by thread count.

The command's own ``predict_images`` (decode and letterbox in worker threads, batches stacked
and padded by ``Predictor.stream``, maps resized to each photo's size, turned to grey levels
and written as PNG files in the same threads) runs over fake 640×480 JPEG photos with a
device that answers at once: the images/s it reaches is the ceiling the host puts on a folder
run, whatever the accelerator. (On the 2026-11-27 H200 run the whole command reached 64
images/s against the device's 2244.)

    python benchmarks/predict_host.py [--images 96] [--workers 1 2 4 8] [--repeats 3]
        [--devices instant jax] [--output benchmarks/results/predict_host-<date>-cpu.json]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import importlib
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # benchmarks/ is no package
if str(HERE.parent) not in sys.path:  # run from a checkout without installing (the device machine)
    sys.path.insert(1, str(HERE.parent))
from input_pipeline import write_fake  # noqa: E402

from mlnet_jax.inference import Predictor  # noqa: E402


class InstantDevice:
    """A ``Predictor`` (its own ``stream`` and ``dispatch_letterboxed``: batches stacked and
    padded on the host) whose model returns at once the same smooth map of the model's output
    size for every image (smooth, as real maps are: PNG encoding depends on it)."""

    stream = Predictor.stream
    dispatch_letterboxed = Predictor.dispatch_letterboxed
    padded_size = Predictor.padded_size
    _devices, whole_batches = 1, False

    def __init__(self, input_size: tuple[int, int] = (480, 640), batch_size: int = 32):
        self.info = type("Info", (), {"input_size": input_size})()
        self.batch_size = batch_size
        rows, cols = input_size[0] // 8, input_size[1] // 8
        yy, xx = np.mgrid[:rows, :cols]
        raw = np.exp(-(((yy - rows / 2) / (rows / 4)) ** 2 + ((xx - cols / 3) / (cols / 5)) ** 2))
        self._raw, self._variables = raw.astype(np.float32), None
        self._predict = lambda _, padded: np.broadcast_to(raw, (len(padded), rows, cols))


class TransferDevice(InstantDevice):
    """:class:`InstantDevice` through JAX on its default device: each padded batch is sent to
    the device and read whole by a jitted function that returns the same maps, which are
    fetched back. Everything a real ``Predictor`` does but the model's compute, so that the
    GPU machine tells the host path apart from the device path (transfers, dispatch, fetch)."""

    def __init__(self, input_size: tuple[int, int] = (480, 640), batch_size: int = 32):
        super().__init__(input_size, batch_size)
        import jax
        import jax.numpy as jnp
        raw = jnp.asarray(self._raw)
        self._predict = jax.jit(lambda _, padded: raw[None] + 0 * jnp.mean(
            padded, axis=(1, 2, 3), dtype=jnp.float32)[:, None, None])


DEVICES = {"instant": InstantDevice, "jax": TransferDevice}


#: The folder path's stages: (module, function) → name. The first four run in the worker
#: threads; fetch runs in the thread that feeds the device, as does dispatch (a method of the
#: device, timed on it).
STAGES = {("mlnet_jax.predict", "_header_pixels"): "header",
          ("mlnet_jax.predict", "load_image"): "decode",
          ("mlnet_jax.predict", "letterbox"): "letterbox",
          ("mlnet_jax.predict", "_finish_image"): "write",
          ("mlnet_jax.inference", "_fetched"): "fetch"}
WORKER_STAGES = ("header", "decode", "letterbox", "write")


class StageClock:
    """Seconds spent in each stage of the folder path, summed over threads, so that a slow run
    says which one held it back: workers busy all the time (the host's work), or waiting on
    the thread that feeds the device (dispatch, fetch)."""

    def __init__(self):
        self.seconds = collections.Counter()
        self._lock = threading.Lock()

    def timed(self, name: str, fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.seconds[name] += time.perf_counter() - start
        return call

    @contextlib.contextmanager
    def installed(self, device):
        saved = [(device, "dispatch_letterboxed", device.__dict__.get("dispatch_letterboxed"))]
        device.dispatch_letterboxed = self.timed("dispatch", device.dispatch_letterboxed)
        for (module_name, name), stage in STAGES.items():
            module = importlib.import_module(module_name)
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, self.timed(stage, getattr(module, name)))
        try:
            yield
        finally:
            for owner, name, value in reversed(saved):
                if value is None:
                    delattr(owner, name)
                else:
                    setattr(owner, name, value)


def measure(images: Path, out_dir: Path, workers: int, repeats: int, device=None) -> dict:
    """One worker count: a warm-up into its own folder (it compiles a real ``device``), then
    ``repeats`` timed runs over every photo, each writing all its maps again into
    ``out_dir``/workers<N>, with the time in each stage (:class:`StageClock`).
    ``device``: a ``Predictor`` (default :class:`InstantDevice`)."""
    from mlnet_jax.predict import Report, plan_outputs, predict_images

    sources = sorted(images.glob("*.jpg"))
    device, rates = device or InstantDevice(), []
    device.whole_batches = True  # a folder run, as the command's: the warm-up compiles it
    warm_up = plan_outputs(sources[:8], images, out_dir / "warm-up", overlay=False,
                           map_video=False)
    predict_images(device, warm_up, report=Report(), workers=workers, progress=False)
    timed = out_dir / f"workers{workers}"
    jobs = plan_outputs(sources, images, timed, overlay=False, map_video=False)
    report, clock = Report(), StageClock()
    with clock.installed(device):
        for _ in range(repeats):
            start = time.perf_counter()
            predict_images(device, jobs, report=report, workers=workers, progress=False)
            rates.append(len(jobs) / (time.perf_counter() - start))
    if report.failed or report.done != repeats * len(jobs):
        raise RuntimeError(f"{report.done} of {repeats * len(jobs)} maps written; failed: "
                           f"{report.failed[:3]}")
    images_done, wall = repeats * len(jobs), sum(len(jobs) / r for r in rates)
    return {"workers": workers, "images_per_s": float(np.median(rates)), "repeats": rates,
            "maps_written": sum(1 for _ in timed.glob("*.png")),
            "stage_ms_per_image": {k: 1e3 * v / images_done for k, v in clock.seconds.items()},
            "workers_busy": sum(clock.seconds[k] for k in WORKER_STAGES) / (wall * workers)}


def stage_summary(row: dict) -> str:
    ms = row["stage_ms_per_image"]
    worker = " ".join(f"{k} {ms.get(k, 0):.1f}" for k in WORKER_STAGES)
    return (f"ms/image: {worker} (workers busy {100 * row['workers_busy']:.0f} %); "
            f"device thread: dispatch {ms.get('dispatch', 0):.2f} fetch {ms.get('fetch', 0):.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--devices", nargs="+", choices=tuple(DEVICES), default=["instant"],
                   help="instant: answers at once; jax: the batch through JAX's default device "
                        "(transfer, a jitted read of it, fetch), without the model")
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)

    print(f"predict command's host path, {args.images} fake 640x480 JPEGs, {os.cpu_count()} CPUs")
    print(f"{'device':>8} {'workers':>8} {'images/s':>9}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mlnet_predict_host_") as tmp:
        write_fake(Path(tmp), args.images)
        for name in args.devices:
            for n in args.workers:  # each row as it comes: a run cut short keeps those done
                row = measure(Path(tmp) / "images", Path(tmp) / "maps_out", n, args.repeats,
                              device=DEVICES[name]())
                rows.append({"device": name, **row})
                print(f"{name:>8} {n:>8} {row['images_per_s']:>9.1f}   {stage_summary(row)}",
                      flush=True)
    result = {"benchmark": "predict_host", "date": datetime.date.today().isoformat(),
              "platform": platform.platform(), "cpu_count": os.cpu_count(),
              "images": args.images, "image_size": [480, 640], "writes": "grey PNG maps",
              "results": rows}
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
