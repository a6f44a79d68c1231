"""Throughput of the training input pipeline on SALICON-sized fake data, by worker count.

Writes N fake 640×480 JPEG images with PNG maps in the ``folder`` layout, prepares them with the
TFDS builder (array_record), and times ``train_loader`` (TFDS read → decode → letterbox to
480×640 → ground truth at 60×80 → batch) after a warm-up. CPU time of the process and its worker
processes gives images per CPU-second ("per core").

    python benchmarks/input_pipeline.py [--images 64] [--workers 0 1 2] [--batches 30]
        [--output benchmarks/results/input_pipeline-<date>-cpu.json]
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image


def _fake_photo(rng: np.random.Generator, rows: int = 480, cols: int = 640) -> np.ndarray:
    """Smooth colour regions plus texture: ~130 kB at quality 90, like SALICON's COCO JPEGs."""
    coarse = rng.integers(0, 256, (rows // 16, cols // 16, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((cols, rows), Image.BICUBIC), np.int16)
    texture = rng.normal(0, 12, (rows, cols, 3))
    return np.clip(base + texture, 0, 255).astype(np.uint8)


def _fake_map(rng: np.random.Generator, rows: int = 480, cols: int = 640) -> np.ndarray:
    yy, xx = np.mgrid[:rows, :cols]
    out = np.zeros((rows, cols))
    for _ in range(rng.integers(2, 6)):
        r0, c0 = rng.uniform(0, rows), rng.uniform(0, cols)
        out += np.exp(-(((yy - r0) / 60.0) ** 2 + ((xx - c0) / 60.0) ** 2))
    return np.round(255 * out / out.max()).astype(np.uint8)


def write_fake(root: Path, n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "maps").mkdir(parents=True)
    jpeg_bytes = png_bytes = 0
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(_fake_photo(rng)).save(buf, format="JPEG", quality=90)
        (root / "images" / f"img{i:05d}.jpg").write_bytes(buf.getvalue())
        jpeg_bytes += len(buf.getvalue())
        buf = io.BytesIO()
        Image.fromarray(_fake_map(rng)).save(buf, format="PNG")
        (root / "maps" / f"img{i:05d}.png").write_bytes(buf.getvalue())
        png_bytes += len(buf.getvalue())
    return {"mean_jpeg_kb": jpeg_bytes / n / 1024, "mean_png_kb": png_bytes / n / 1024}


def _cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU time of this process and its live children (grain's workers)."""
    total = sum(proc.cpu_times()[:2])
    for child in proc.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def time_loader(source, workers: int, batches: int, batch_size: int, warmup: int,
                model_size=(480, 640)) -> dict:
    from mlnet_jax.input_pipeline import _threads, train_loader

    it = train_loader(source, model_size=model_size, global_batch_size=batch_size, seed=0,
                      shard_index=0, shard_count=1, worker_count=workers)
    for _ in range(warmup):  # worker start-up, first reads
        next(it)
    proc = psutil.Process()
    cpu0, t0 = _cpu_seconds(proc), time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds(proc) - cpu0
    assert batch["image"].shape == (batch_size, *model_size, 3)
    images = batches * batch_size
    del it
    return {"workers": workers, "read_threads": _threads(None, workers), "images": images,
            "seconds": round(wall, 3),
            "images_per_s": round(images / wall, 1), "cpu_seconds": round(cpu, 3),
            "images_per_cpu_s": round(images / cpu, 1) if cpu > 0 else None}


def time_stages(source, n: int = 16, model_size=(480, 640)) -> dict:
    """Milliseconds per image of each step, single-threaded."""
    from mlnet_jax.input_pipeline import decode_image, decode_map
    from mlnet_jax.preprocessing import ground_truth_map, letterbox

    records = [source[i] for i in range(n)]
    out = {}
    t = time.perf_counter()
    images = [decode_image(r) for r in records]
    out["decode_jpeg_ms"] = (time.perf_counter() - t) / n * 1e3
    t = time.perf_counter()
    maps = [decode_map(r, im.size) for r, im in zip(records, images)]
    out["decode_png_ms"] = (time.perf_counter() - t) / n * 1e3
    t = time.perf_counter()
    for im in images:
        letterbox(im, model_size)
    out["letterbox_ms"] = (time.perf_counter() - t) / n * 1e3
    t = time.perf_counter()
    for m in maps:
        ground_truth_map(m, model_size, (model_size[0] // 8, model_size[1] // 8))
    out["ground_truth_ms"] = (time.perf_counter() - t) / n * 1e3
    return {k: round(v, 2) for k, v in out.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--batch_size", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--output", default=None, help="JSON result path (default: print only)")
    args = p.parse_args(argv)

    from mlnet_jax.datasets.prepare import prepare
    from mlnet_jax.input_pipeline import open_source

    load_before = os.getloadavg()[0]  # other jobs on a shared machine slow the wall clock

    with tempfile.TemporaryDirectory() as tmp:
        data = write_fake(Path(tmp) / "manual", args.images)
        prepare("folder", str(Path(tmp) / "manual"), str(Path(tmp) / "tfds"),
                validation_fraction=0.0, progress=False)
        source = open_source("folder", "train", str(Path(tmp) / "tfds"))
        stages = time_stages(source)
        runs = [time_loader(source, w, args.batches, args.batch_size, args.warmup)
                for w in args.workers]
    cpu_model = next((line.split(":", 1)[1].strip() for line in
                      Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor()) \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    result = {
        "benchmark": "input_pipeline",
        "date": datetime.date.today().isoformat(),
        "machine": {"cpu": cpu_model, "cores": os.cpu_count(),
                    "python": sys.version.split()[0], "platform": platform.platform(),
                    "load_average_1min_before": round(load_before, 2),
                    "load_average_1min_after": round(os.getloadavg()[0], 2)},
        "setup": {"images": args.images, "image_size": [480, 640], "model_size": [480, 640],
                  "batch_size": args.batch_size, "timed_batches": args.batches,
                  "warmup_batches": args.warmup, **{k: round(v, 1) for k, v in data.items()}},
        "stages_ms_per_image": stages,
        "runs": runs,
    }
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
