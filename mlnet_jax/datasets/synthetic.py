"""The embedded demo dataset: synthetic saliency data generated deterministically from a seed.

Each image is a textured, low-saturation background with one to three salient objects
(saturated colour, varied size, shape and position). The ground-truth map is a sum of
Gaussians on the objects (wider for larger objects, brighter for more contrasting ones), and
fixations are sampled from it. Objects are placed uniformly, so a centre-bias map explains
only part of the ground truth: a model has to find the objects to beat it.
Records follow the input pipeline's schema (encoded image and map, 0-based fixations).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}


def _encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _smooth_noise(rng: np.random.Generator, rows: int, cols: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    coarse = rng.uniform(0, 1, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((cols, rows), Image.BILINEAR))


def synthetic_example(rng: np.random.Generator, size: tuple[int, int], index: int,
                      num_fixations: int = 24) -> dict:
    """One record: RGB image, uint8 map and fixations for an image of ``size`` (rows, cols)."""
    rows, cols = size
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    # Background: greyish base colour, smooth blotches and faint stripes of random direction.
    base = rng.uniform(90, 170) + rng.uniform(-15, 15, 3)
    angle, freq = rng.uniform(0, np.pi), rng.uniform(0.15, 0.6)
    stripes = np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy))
    texture = 40 * (_smooth_noise(rng, rows, cols, rng.integers(3, 8)) - 0.5) + 10 * stripes
    image = base[None, None, :] + texture[..., None] + rng.normal(0, 6, (rows, cols, 3))
    saliency = np.zeros((rows, cols), np.float32)
    for _ in range(rng.integers(1, 4)):
        radius = rng.uniform(0.05, 0.16) * min(rows, cols)
        cy, cx = rng.uniform(radius, rows - radius), rng.uniform(radius, cols - radius)
        hue = rng.permutation([rng.uniform(200, 255), rng.uniform(0, 60), rng.uniform(0, 255)])
        aspect = rng.uniform(0.6, 1.6)
        dist = ((yy - cy) / (radius * aspect)) ** 2 + ((xx - cx) * aspect / radius) ** 2
        mask = (dist <= 1.0) if rng.uniform() < 0.5 else (
            (np.abs(yy - cy) <= radius * aspect) & (np.abs(xx - cx) <= radius / aspect))
        image[mask] = hue
        strength = rng.uniform(0.6, 1.0)
        sigma = 0.9 * radius + 0.02 * min(rows, cols)
        saliency += strength * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))
    saliency_map = np.round(255 * saliency / saliency.max()).astype(np.uint8)
    p = saliency.ravel() / saliency.sum()
    flat = rng.choice(rows * cols, size=num_fixations, p=p)
    fixations = np.unique(np.stack([flat // cols, flat % cols], axis=1), axis=0).astype(np.int32)
    return {"image": _encode_png(np.clip(image, 0, 255).astype(np.uint8)),
            "saliency_map": _encode_png(saliency_map),
            "fixations": fixations,
            "image_size": np.asarray([rows, cols], np.int32),
            "file_name": f"synthetic_{index:05d}.png",
            "category": ""}


def synthetic_dataset(split: str, num_examples: int, size: tuple[int, int], seed: int = 0) -> list[dict]:
    """``num_examples`` records of ``split``; the same (split, seed) always gives the same data."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"synthetic split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    rng = np.random.default_rng([seed, SPLIT_SEEDS[split]])
    return [synthetic_example(rng, size, i) for i in range(num_examples)]
