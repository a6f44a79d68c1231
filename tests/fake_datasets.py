"""Tiny fake saliency datasets written in the exact official on-disk layouts (SPEC §3).

Each writer returns the ground truth it wrote, keyed by the record's ``file_name``, so tests can
check what the builders read back. Training tests use :func:`prepared_salicon` for a tiny
prepared SALICON.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

SALICON_FOLDERS = {"train": "train", "validation": "val", "test": "test"}
COCO_NAMES = {"train": "train2014", "validation": "val2014", "test": "test2014"}


def smooth_image(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A uint8 RGB image with low-frequency content (compresses well, survives JPEG)."""
    rows, cols = size
    small = rng.integers(0, 256, (max(rows // 8, 2), max(cols // 8, 2), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((cols, rows), Image.BILINEAR))


def blob_map(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A uint8 grey map with one Gaussian blob peaking at 255."""
    rows, cols = size
    r0, c0 = rng.uniform(0.2, 0.8) * rows, rng.uniform(0.2, 0.8) * cols
    yy, xx = np.mgrid[:rows, :cols]
    g = np.exp(-(((yy - r0) / (rows / 5)) ** 2 + ((xx - c0) / (cols / 5)) ** 2))
    return np.round(255 * g / g.max()).astype(np.uint8)


def save(array: np.ndarray, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def encode(array: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def random_points(rng: np.random.Generator, size: tuple[int, int], n: int) -> np.ndarray:
    """n distinct 0-based (row, col) pixels."""
    rows, cols = size
    flat = rng.choice(rows * cols, size=n, replace=False)
    return np.stack([flat // cols, flat % cols], axis=1)


def salicon_mat(path: Path, per_observer_xy: list[np.ndarray], size: tuple[int, int],
                fields: tuple[str, ...] = ("location", "timestamp", "fixations")) -> Path:
    """A SALICON fixation file: struct ``gaze`` (one element per observer) with 1-based (x, y)
    ``location`` and ``fixations``, plus ``image`` and ``resolution``."""
    gaze = np.empty((len(per_observer_xy), 1), dtype=[(f, object) for f in fields])
    for i, xy in enumerate(per_observer_xy):
        values = {"location": np.asarray(xy, np.float64), "timestamp": np.arange(len(xy)) * 10.0,
                  "fixations": np.asarray(xy, np.float64)}
        for f in fields:
            gaze[i, 0][f] = values[f]
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"image": path.stem, "resolution": np.asarray([size]),
                                 "gaze": gaze})
    return path


def write_salicon(root: Path, counts: dict[str, int] | None = None,
                  size: tuple[int, int] = (24, 32), seed: int = 0) -> dict[str, dict]:
    """SALICON layout: images/{train,val,test}, maps/{train,val}, fixations/{train,val}.

    Returns ``{split: {file_name: {"image": bytes, "map": uint8, "fixations": set[(r, c)]}}}``.
    """
    counts = counts or {"train": 6, "validation": 3, "test": 2}
    rng = np.random.default_rng(seed)
    truth: dict[str, dict] = {}
    for split, n in counts.items():
        folder = SALICON_FOLDERS[split]
        truth[split] = {}
        for i in range(n):
            stem = f"COCO_{COCO_NAMES[split]}_{i + 1:012d}"
            image = save(smooth_image(rng, size), root / "images" / folder / f"{stem}.jpg",
                         quality=90)
            entry = {"image": image.read_bytes(), "map": None, "fixations": set()}
            if split != "test":
                saliency = blob_map(rng, size)
                save(saliency, root / "maps" / folder / f"{stem}.png")
                points = random_points(rng, size, 5)  # distinct, so the union has 5
                rc_a, rc_b = points[:3], points[3:]
                observers = [rc[:, ::-1] + 1 for rc in (rc_a, rc_b)]  # → 1-based (x, y)
                salicon_mat(root / "fixations" / folder / f"{stem}.mat", observers, size)
                entry["map"] = saliency
                entry["fixations"] = {tuple(p) for p in np.concatenate([rc_a, rc_b]).tolist()}
            truth[split][f"{stem}.jpg"] = entry
    return truth


def write_mit1003(root: Path, n: int = 10, seed: int = 0) -> dict[str, dict]:
    """MIT1003 layout: ALLSTIMULI/<name>.jpeg, ALLFIXATIONMAPS/<name>_fixMap.jpg / _fixPts.jpg.

    Images alternate landscape and portrait sizes. Returns ``{file_name: {...}}`` where ``map`` is
    the map as PIL decodes the JPEG and ``fixations`` the pixels set in ``_fixPts``.
    """
    rng = np.random.default_rng(seed)
    truth = {}
    for i in range(n):
        size = (24, 32) if i % 2 == 0 else (40, 30)
        stem = f"i{i:04d}_scene"
        image = save(smooth_image(rng, size), root / "ALLSTIMULI" / f"{stem}.jpeg", quality=90)
        map_path = save(blob_map(rng, size), root / "ALLFIXATIONMAPS" / f"{stem}_fixMap.jpg",
                        quality=90)
        points = random_points(rng, size, 4)
        binary = np.zeros(size, np.uint8)
        binary[points[:, 0], points[:, 1]] = 255
        save(binary, root / "ALLFIXATIONMAPS" / f"{stem}_fixPts.jpg", quality=100)
        truth[image.name] = {"image": image.read_bytes(),
                             "map": np.asarray(Image.open(map_path).convert("L")),
                             "fixations": {tuple(p) for p in points.tolist()}}
    return truth


def write_cat2000(root: Path, categories: tuple[str, ...] = ("Action", "Affective", "Art"),
                  per_category: int = 4, size: tuple[int, int] = (27, 48),
                  seed: int = 0) -> dict[str, dict]:
    """CAT2000 layout: trainSet/{Stimuli,FIXATIONMAPS,FIXATIONLOCS}/<Category>/<NNN>.*"""
    rng = np.random.default_rng(seed)
    base = root / "trainSet"
    truth = {}
    for category in categories:
        for i in range(per_category):
            stem = f"{i + 1:03d}"
            image = save(smooth_image(rng, size), base / "Stimuli" / category / f"{stem}.jpg",
                         quality=90)
            map_path = save(blob_map(rng, size), base / "FIXATIONMAPS" / category / f"{stem}.jpg",
                            quality=90)
            points = random_points(rng, size, 5)
            locs = np.zeros(size, np.float64)
            locs[points[:, 0], points[:, 1]] = 1
            (base / "FIXATIONLOCS" / category).mkdir(parents=True, exist_ok=True)
            scipy.io.savemat(str(base / "FIXATIONLOCS" / category / f"{stem}.mat"),
                             {"fixLocs": locs})
            truth[f"{category}/{stem}.jpg"] = {
                "image": image.read_bytes(), "category": category,
                "map": np.asarray(Image.open(map_path).convert("L")),
                "fixations": {tuple(p) for p in points.tolist()}}
    return truth


def write_folder(root: Path, n: int = 5, size: tuple[int, int] = (24, 32),
                 fixations: str | None = "mat", seed: int = 0) -> dict[str, dict]:
    """folder layout: images/<stem>.png, maps/<stem>.png, fixations/<stem>.mat|.png."""
    rng = np.random.default_rng(seed)
    truth = {}
    for i in range(n):
        stem = f"img{i:02d}"
        image = save(smooth_image(rng, size), root / "images" / f"{stem}.png")
        saliency = blob_map(rng, size)
        save(saliency, root / "maps" / f"{stem}.png")
        points = random_points(rng, size, 3)
        if fixations == "mat":
            (root / "fixations").mkdir(parents=True, exist_ok=True)
            scipy.io.savemat(str(root / "fixations" / f"{stem}.mat"),
                             {"fixations": (points[:, ::-1] + 1).astype(np.float64)})
        elif fixations == "png":
            binary = np.zeros(size, np.uint8)
            binary[points[:, 0], points[:, 1]] = 255
            save(binary, root / "fixations" / f"{stem}.png")
        truth[image.name] = {"image": image.read_bytes(), "map": saliency,
                             "fixations": ({tuple(p) for p in points.tolist()}
                                           if fixations else set())}
    return truth


def prepared_salicon(tmp_path: Path, counts: dict[str, int] | None = None,
                     size: tuple[int, int] = (24, 32), name: str = "salicon2015") -> Path:
    """Write a fake SALICON under ``tmp_path/manual`` and prepare it; returns the data_dir
    (read it with ``mlnet_jax.input_pipeline.open_source(name, split, data_dir)``)."""
    from mlnet_jax.datasets.prepare import prepare

    manual, data_dir = tmp_path / "manual", tmp_path / "tfds"
    write_salicon(manual, counts, size)
    prepare(name, str(manual), str(data_dir), progress=False)
    return data_dir
