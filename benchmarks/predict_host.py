"""What the host lets ``python -m mlnet_jax.predict`` do on a folder of photos, by thread count.

The command's own ``predict_images`` (decode and letterbox in worker threads, maps resized to
each photo's size, turned to grey levels and written as PNG files in the same threads) runs
over fake 640×480 JPEG photos with a stand-in for the device that answers at once: the
images/s it reaches is the ceiling the host puts on a folder run, whatever the accelerator.
(On the 2026-11-27 H200 run the whole command reached 64 images/s against the device's 2244.)

    python benchmarks/predict_host.py [--images 96] [--workers 1 2 4 8] [--repeats 3]
        [--output benchmarks/results/predict_host-<date>-cpu.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from input_pipeline import write_fake  # noqa: E402  (benchmarks/ is no package)


class InstantDevice:
    """``Predictor``'s interface for ``predict_images``, with maps of the model's output size
    made on the host at once (smooth, as real maps are: PNG encoding depends on it)."""

    def __init__(self, input_size: tuple[int, int] = (480, 640), batch_size: int = 32):
        self.info = type("Info", (), {"input_size": input_size})()
        self.batch_size = batch_size
        rows, cols = input_size[0] // 8, input_size[1] // 8
        yy, xx = np.mgrid[:rows, :cols]
        self.raw = np.exp(-(((yy - rows / 2) / (rows / 4)) ** 2 + ((xx - cols / 3) / (cols / 5)) ** 2))

    def stream(self, items, letterboxed):
        for item in items:
            letterboxed(item)
            yield item, self.raw


def measure(images: Path, out_dir: Path, workers: int, repeats: int) -> dict:
    from mlnet_jax.predict import Report, plan_outputs, predict_images

    sources = sorted(images.glob("*.jpg"))
    jobs = plan_outputs(sources, images, out_dir, overlay=False, map_video=False)
    device, report, rates = InstantDevice(), Report(), []
    predict_images(device, jobs[:8], report=report, workers=workers, progress=False)  # warm-up
    for _ in range(repeats):
        start = time.perf_counter()
        predict_images(device, jobs, report=report, workers=workers, progress=False)
        rates.append(len(jobs) / (time.perf_counter() - start))
    if report.failed:
        raise RuntimeError(f"{len(report.failed)} photos failed: {report.failed[:3]}")
    written = sum(1 for _ in out_dir.glob("*.png"))
    return {"workers": workers, "images_per_s": float(np.median(rates)), "repeats": rates,
            "maps_written": written}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="mlnet_predict_host_") as tmp:
        write_fake(Path(tmp), args.images)
        rows = [measure(Path(tmp) / "images", Path(tmp) / "maps_out", n, args.repeats)
                for n in args.workers]
    result = {"benchmark": "predict_host", "date": datetime.date.today().isoformat(),
              "platform": platform.platform(), "cpu_count": os.cpu_count(),
              "images": args.images, "image_size": [480, 640], "writes": "grey PNG maps",
              "results": rows}
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"predict command's host path, {args.images} fake 640x480 JPEGs, {os.cpu_count()} CPUs")
    print(f"{'workers':>8} {'images/s':>9}")
    for row in rows:
        print(f"{row['workers']:>8} {row['images_per_s']:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
