"""Scoring a split at ground-truth resolution, on every device: used by training and by
``python -m mlnet_jax.evaluate``.

Predictions come from the jit-compiled ``eval_step`` (batch split over the mesh; the next batch
is dispatched before the current one is scored, so the devices work while the host scores);
each map is resized back to its image's original size and scored against the full-resolution
ground truth, as the MIT/SALICON benchmarks do. Instead of (or beside) the model, a baseline
map (:mod:`mlnet_jax.baselines`) can be scored. Multi-process runs score their own shard and
sum.

Per image and map: CC, KLD and SIM against the continuous map; NSS, AUC-Judd and AUC-Borji
against the fixation map (the recorded fixations, each pixel once); sAUC with negatives from
other images (:func:`other_fixation_map`). An image without fixations gets NaN for the
fixation metrics, one without a continuous map NaN for CC/KLD/SIM; means, standard deviations
and counts ``n`` are over the finite values only.

Two metric backends: ``numpy`` (:mod:`mlnet_jax.metrics` per image, float64, MATLAB's draws)
and ``jax`` (the ``batched_*`` functions on the default device, images grouped by size;
float32, random parts equal in distribution). In both the random metrics are seeded per image
from (seed, image index), so their results do not depend on the batch size or the device or
process count; the ``jax`` backend's float32 sums for CC/KLD/NSS/SIM do, in their last digits
(the padded batch shapes change XLA's reduction order: ~1e-7 relative). ``auto`` picks ``jax`` on accelerators and ``numpy`` on CPU, where both cost about the
same.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from mlnet_jax.errors import UserError
from mlnet_jax.inference import ModelInfo

#: What training scores every epoch (cheap, deterministic).
FAST_METRICS: tuple[str, ...] = ("cc", "kld", "nss", "sim")
#: The benchmark's metrics, in the order tables show them.
ALL_METRICS: tuple[str, ...] = ("cc", "kld", "nss", "sim", "auc_judd", "auc_borji",
                                "auc_shuffled")
#: Metrics against the continuous map; the others use fixations.
CONTINUOUS_METRICS = frozenset({"cc", "kld", "sim"})
#: Other images whose fixations form an image's sAUC negatives (the MIT benchmark uses 10).
SAUC_OTHER_IMAGES = 10
BACKENDS = ("auto", "numpy", "jax")


def _host_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order."""
    if jax.process_count() == 1:
        return np.asarray(x)
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    unique = {s.index[0].start: s for s in shards}
    return np.concatenate([np.asarray(unique[k].data) for k in sorted(unique)])


def fixation_map(fixations: np.ndarray, size) -> np.ndarray:
    """Binary float32 map of ``size`` (rows, cols) with 1 at each 0-based (row, col) fixation;
    points outside the image are ignored."""
    out = np.zeros(tuple(int(s) for s in size), np.float32)
    points = np.asarray(fixations, np.int64).reshape(-1, 2)
    inside = ((points >= 0) & (points < np.asarray(out.shape))).all(axis=1)
    points = points[inside]
    if len(points):
        out[points[:, 0], points[:, 1]] = 1.0
    return out


# --------------------------------------------------------------------------- sAUC negatives

def _record_size(record: dict) -> tuple[int, int]:
    if record.get("image_size") is not None:
        rows, cols = (int(v) for v in np.asarray(record["image_size"]).reshape(2))
        return rows, cols
    import io  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415
    with Image.open(io.BytesIO(record["image"])) as pil:  # reads the header only
        return pil.height, pil.width


class FixationTable:
    """Every image's fixations and size in a split, to draw sAUC negatives from other images.

    Reads each record once (no image decoding unless a record lacks ``image_size``).
    """

    def __init__(self, source):
        from mlnet_jax.input_pipeline import as_source  # noqa: PLC0415
        src = as_source(source)
        self.fixations: list[np.ndarray] = []
        self.sizes: list[tuple[int, int]] = []
        for j in range(len(src)):
            record = src[j]
            self.fixations.append(np.asarray(record["fixations"], np.int64).reshape(-1, 2))
            self.sizes.append(_record_size(record))
        self.with_fixations = np.asarray(
            [j for j, f in enumerate(self.fixations) if len(f)], np.int64)

    def others(self, index: int, n_others: int, seed: int) -> np.ndarray:
        """Indices of up to ``n_others`` distinct other images with fixations, drawn uniformly
        without replacement by ``default_rng([seed, index])`` (fixed per image)."""
        pool = self.with_fixations[self.with_fixations != index]
        k = min(int(n_others), len(pool))
        if k == 0:
            return np.zeros(0, np.int64)
        return np.sort(np.random.default_rng([int(seed), int(index)]).choice(
            pool, size=k, replace=False))

    def other_fixation_map(self, index: int, size, n_others: int = SAUC_OTHER_IMAGES,
                           seed: int = 0) -> np.ndarray:
        """The union of the fixations of :meth:`others` as a binary map of ``size``.

        Each fixation (r, c) of an image of size (R', C') lands on pixel
        (⌊(r + ½)·R/R'⌋, ⌊(c + ½)·C/C'⌋) of this image's (R, C): positions are scaled
        relative to the image, which is the identity for same-size images (e.g. SALICON).
        """
        rows, cols = (int(s) for s in size)
        out = np.zeros((rows, cols), np.float32)
        for j in self.others(index, n_others, seed):
            points = self.fixations[j].astype(np.float64)
            r_other, c_other = self.sizes[j]
            r = np.clip(np.floor((points[:, 0] + 0.5) * rows / r_other), 0, rows - 1)
            c = np.clip(np.floor((points[:, 1] + 0.5) * cols / c_other), 0, cols - 1)
            out[r.astype(np.int64), c.astype(np.int64)] = 1.0
        return out


# --------------------------------------------------------------------------- scoring

def _per_image_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


@dataclasses.dataclass
class _Item:
    """One image to score: its maps at ground-truth size (the model's and/or baselines')."""
    row: dict
    truth: np.ndarray | None
    fixations: np.ndarray
    others: np.ndarray | None
    maps: dict[str, np.ndarray]


def _score_numpy(items: list[_Item], metric_names: Sequence[str], seed: int) -> None:
    from mlnet_jax import metrics  # noqa: PLC0415
    for item in items:
        s = _per_image_seed(seed, item.row["index"])
        for prefix, saliency in item.maps.items():
            for name in metric_names:
                if name in CONTINUOUS_METRICS:
                    value = (float("nan") if item.truth is None
                             else getattr(metrics, name)(saliency, item.truth))
                elif name == "nss":
                    value = metrics.nss(saliency, item.fixations)
                elif name == "auc_shuffled":
                    value = metrics.auc_shuffled(saliency, item.fixations, item.others, seed=s)
                else:
                    value = getattr(metrics, name)(saliency, item.fixations, seed=s)
                item.row[prefix + name] = value


def _score_jax(items: list[_Item], metric_names: Sequence[str], seed: int) -> None:
    """Batched metrics per group of same-size images; groups are padded to a power of two
    (zero maps, results dropped) so each image size compiles a few shapes only. Each image
    draws from its own key (the seed and its index), as the NumPy backend does, so the random
    metrics do not depend on the batch size or the device count (the float32 sums of the
    others do, in their last digits)."""
    from mlnet_jax import metrics  # noqa: PLC0415
    groups: dict[tuple[int, int], list[_Item]] = {}
    for item in items:
        groups.setdefault(item.fixations.shape, []).append(item)
    for shape, group in sorted(groups.items()):
        n = len(group)
        padded = 1 << max(n - 1, 0).bit_length()

        def stack(arrays):
            out = np.zeros((padded,) + shape, np.float32)
            for i, a in enumerate(arrays):
                if a is not None:
                    out[i] = a
            return out

        truths = stack([it.truth for it in group])
        fixations = stack([it.fixations for it in group])
        others = stack([it.others for it in group]) if "auc_shuffled" in metric_names else None
        has_truth = np.asarray([it.truth is not None for it in group])
        seeds = [_per_image_seed(seed, it.row["index"]) for it in group]
        keys = jax.vmap(jax.random.key)(np.asarray(seeds + [0] * (padded - n), np.uint32))
        for prefix in group[0].maps:
            preds = stack([it.maps[prefix] for it in group])
            k = keys
            results = {}
            for name in metric_names:
                if name in CONTINUOUS_METRICS:
                    results[name] = getattr(metrics, f"batched_{name}")(preds, truths)
                elif name == "nss":
                    results[name] = metrics.batched_nss(preds, fixations)
                elif name == "auc_shuffled":
                    results[name] = metrics.batched_auc_shuffled(preds, fixations, others, k)
                else:
                    results[name] = getattr(metrics, f"batched_{name}")(preds, fixations, k)
            results = jax.device_get(results)
            for name, values in results.items():
                values = np.asarray(values, np.float64)[:n]
                if name in CONTINUOUS_METRICS:
                    values = np.where(has_truth, values, np.nan)
                for it, v in zip(group, values):
                    it.row[prefix + name] = float(v)


@dataclasses.dataclass
class SplitScores:
    """Per-image rows (this process's images) and the summary over every process.

    ``rows``: dicts with ``index`` (in the split), ``file_name``, ``num_fixations``, ``loss``
    and ``blank_map`` (with a model: 1.0 where its map is zero everywhere) and one value per
    scored column (``<prefix><metric>``; NaN where
    undefined). ``summary``: per column ``{"mean", "std", "n"}`` over finite values (std with
    ddof 0). ``num_images``: images scored.
    """
    rows: list[dict]
    summary: dict[str, dict]
    num_images: int
    columns: list[str]


def _summarise(rows: list[dict], columns: list[str], num_local: int) -> tuple[dict, int]:
    """Mean/std/n per column from (sum, sum of squares, count), summed over processes."""
    totals = np.zeros((len(columns) + 1, 3), np.float64)
    for c, column in enumerate(columns):
        values = np.asarray([row[column] for row in rows], np.float64)
        finite = values[np.isfinite(values)]
        totals[c] = (finite.sum(), np.square(finite).sum(), finite.size)
    totals[-1] = (num_local, 0, 0)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415
        totals = np.asarray(multihost_utils.process_allgather(totals)).sum(axis=0)
    summary = {}
    for c, column in enumerate(columns):
        total, squares, n = totals[c]
        if n:
            mean = total / n
            std = math.sqrt(max(squares / n - mean * mean, 0.0))
        else:
            mean = std = float("nan")
        summary[column] = {"mean": float(mean), "std": float(std), "n": int(n)}
    return summary, int(totals[-1, 0])


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"metrics backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "numpy" if jax.default_backend() == "cpu" else "jax"
    return backend


class EvaluationStopped(Exception):
    """``score_split``'s ``should_stop`` said so between two batches."""


def check_field_types(config) -> None:
    """Each field holds its default's type, as one line naming it: a config file may set
    anything (ml_collections lets None through), which the range checks would then meet as a
    TypeError of their own."""
    import difflib  # noqa: PLC0415

    from mlnet_jax.configs import default  # noqa: PLC0415 — ml_collections where configs are

    fields = default.get_config()
    for field in config.keys():  # a typo in Python code: saved with the run, never read
        if field not in fields:
            guess = difflib.get_close_matches(field, list(fields.keys()), n=1)
            hint = f" (did you mean {guess[0]}?)" if guess else ""
            raise UserError(f"config.{field}: the config has no field {field!r}{hint}")
    for field, reference in fields.items():
        value = config.get(field, reference)
        if isinstance(reference, bool):
            ok, expected = isinstance(value, bool), "True or False"
        elif isinstance(reference, int):
            ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif isinstance(reference, float):
            ok, expected = (isinstance(value, int | float) and not isinstance(value, bool),
                            "a number")
        elif isinstance(reference, str):
            ok, expected = isinstance(value, str), "a string"
        else:  # input_size
            ok, expected = isinstance(value, tuple | list), "a (rows, cols) pair"
        if not ok:
            raise UserError(f"config.{field} must be {expected}, got {value!r}")


def check_data_fields(config) -> None:
    """The config fields both training and ``evaluate`` read data with, as one line naming
    the field: before anything is opened or compiled."""
    from mlnet_jax.datasets import DATASET_NAMES  # noqa: PLC0415 — no TFDS imported

    check_field_types(config)
    if config.dataset not in (*DATASET_NAMES, "synthetic"):
        raise UserError(f"config.dataset must be one of {', '.join(DATASET_NAMES)} or "
                        f"synthetic, got {config.dataset!r}")
    if config.eval_batch_size < 1:
        raise UserError(f"config.eval_batch_size must be at least 1, got {config.eval_batch_size}")


def require_ground_truth(source, count: int, name: str) -> None:
    """UserError unless one of the first ``count`` records has a map or fixations: checked
    before predicting, so a test split fails at once (the first record answers for every
    split that has ground truth)."""
    if count and not any(bool(source[i]["saliency_map"]) or len(source[i]["fixations"]) > 0
                         for i in range(count)):
        raise UserError(f"{name} has no ground truth (saliency maps or fixations): nothing to "
                        "score (a test split?)")


class _Head:
    """The first ``n`` records of a source."""

    def __init__(self, source, n: int):
        self._source, self._n = source, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int):
        if not 0 <= index < self._n:
            raise IndexError(index)
        return self._source[index]


def score_split(source, *, model_size: Sequence[int], batch_size: int,
                predict: Callable[[dict], dict] | None = None,
                baselines: dict[str, str] | None = None,
                metric_names: Sequence[str] = FAST_METRICS, max_images: int = -1,
                sauc_others: int = SAUC_OTHER_IMAGES, seed: int = 0, backend: str = "auto",
                grid: tuple[Path, int] | None = None,
                progress: Callable[[int], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> SplitScores:
    """Score every image of ``source`` (this process's shard), model and/or baselines.

    ``predict(batch)`` returns ``{"pred": (B, h, w), "loss": (B,)}`` batch-sharded global
    arrays for the padded eval batch (its result is only read after the next batch has been
    dispatched); without it only ``baselines`` (``{column prefix: baseline name}``) are
    scored. ``batch_size`` is per process. ``max_images`` ≥ 0 scores the split's first that many
    images (the same ones with any number of processes). ``grid=(path, n)`` saves the first n images, truths and model
    maps as a PNG grid. ``progress(n)`` is called with each batch's image count;
    ``should_stop()``, asked before each batch, raises :class:`EvaluationStopped` when true.
    """
    from mlnet_jax.baselines import baseline_map  # noqa: PLC0415
    from mlnet_jax.input_pipeline import (RecordSource, as_source, decode_image,  # noqa: PLC0415
                                          eval_batches, shard_range)
    from mlnet_jax.preprocessing import postprocess  # noqa: PLC0415

    unknown = sorted(set(metric_names) - set(ALL_METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known: {', '.join(ALL_METRICS)}")
    backend = resolve_backend(backend)
    baselines = dict(baselines or {})
    prefixes = ([""] if predict is not None else []) + list(baselines)
    if not prefixes:
        raise ValueError("nothing to score: pass predict and/or baselines")
    src = as_source(source)
    table = FixationTable(src) if "auc_shuffled" in metric_names else None  # the whole split's
    if 0 <= max_images < len(src):  # the first images of the split, however many processes
        src = RecordSource(_Head(src, max_images), f"the first {max_images} of {src!r}")
    start, _ = shard_range(len(src), jax.process_index(), jax.process_count())
    needs_pixels = "spectral_residual" in baselines.values()
    rows: list[dict] = []
    grid_lists: tuple[list, list, list] = ([], [], [])
    if jax.process_index() != 0:
        grid = None  # only process 0 writes it

    def score(batch: dict, out: dict | None, batch_number: int) -> None:
        preds = losses = None
        if out is not None:
            preds, losses = _host_rows(out["pred"]), _host_rows(out["loss"])
        items = []
        for i, size in enumerate(batch["image_size"]):
            size = (int(size[0]), int(size[1]))
            index = start + batch_number * batch_size + i
            truth = batch["saliency_map_full"][i]
            fixations = fixation_map(batch["fixations"][i], size)
            row = {"index": index, "file_name": batch["file_name"][i],
                   "num_fixations": int(fixations.sum())}
            maps = {}
            if preds is not None:
                maps[""] = postprocess(preds[i], size)
                row["loss"] = float(losses[i]) if truth is not None else float("nan")
                row["blank_map"] = float(not preds[i].max() > 0)  # every ReLU dead: no map
            image = (np.asarray(decode_image(src[index]))
                     if needs_pixels or (grid and len(grid_lists[0]) < grid[1]) else None)
            for prefix, name in baselines.items():
                maps[prefix] = baseline_map(name, image, size)
            others = (table.other_fixation_map(index, size, sauc_others, seed)
                      if table is not None else None)
            items.append(_Item(row, truth, fixations, others, maps))
            if grid and "" in maps and len(grid_lists[0]) < grid[1] and truth is not None:
                grid_lists[0].append(image)
                grid_lists[1].append(truth)
                grid_lists[2].append(maps[""])
        if backend == "numpy":
            _score_numpy(items, metric_names, seed)
        else:
            _score_jax(items, metric_names, seed)
        rows.extend(item.row for item in items)
        if progress is not None:
            progress(len(items))

    pending: tuple[dict, dict | None, int] | None = None
    for number, batch in enumerate(eval_batches(src, model_size=model_size,
                                                batch_size=batch_size)):
        if should_stop is not None and should_stop():
            raise EvaluationStopped
        out = predict(batch) if predict is not None else None  # dispatched, not awaited
        if pending is not None:
            score(*pending)
        pending = (batch, out, number)
    if pending is not None:
        score(*pending)

    columns = (["loss", "blank_map"] if predict is not None else []) + [
        prefix + name for prefix in prefixes for name in metric_names]
    summary, num_images = _summarise(rows, columns, len(rows))
    if grid is not None and jax.process_index() == 0 and grid_lists[0]:
        from mlnet_jax.reporting import save_prediction_grid  # noqa: PLC0415
        save_prediction_grid(grid[0], *grid_lists)
    return SplitScores(rows=rows, summary=summary, num_images=num_images, columns=columns)


def model_predictor(params, evaluate_fn, mesh) -> Callable[[dict], dict]:
    """``predict(batch)`` for :func:`score_split` from train's jit-compiled ``eval_step``."""
    from mlnet_jax.sharding import shard_batch  # noqa: PLC0415

    def predict(batch: dict) -> dict:
        return evaluate_fn(params, shard_batch({"image": batch["image"],
                                                "target": batch["target"]}, mesh))
    return predict


def per_process_batch(eval_batch_size: int) -> int:
    """``config.eval_batch_size`` rounded up to a multiple of the local devices: the batch each
    process feeds (every device gets the same number of rows)."""
    local = jax.local_device_count()
    return -(-int(eval_batch_size) // local) * local


def evaluate_split(params, evaluate_fn, source, config, info: ModelInfo, mesh, *,
                   centre_bias: bool = False, grid_path: Path | None = None,
                   metric_names: Sequence[str] = FAST_METRICS,
                   should_stop: Callable[[], bool] | None = None) -> dict:
    """Mean validation loss and CC/KLD/NSS/SIM at ground-truth resolution (plus, with
    ``centre_bias``, the same metrics of a Gaussian centre-bias map as ``centre_bias_*``)
    and ``num_images``; what training logs each epoch and writes to final_metrics.json."""
    scores = score_split(
        source, model_size=info.input_size,
        batch_size=per_process_batch(config.eval_batch_size),
        predict=model_predictor(params, evaluate_fn, mesh),
        baselines={"centre_bias_": "centre"} if centre_bias else None,
        metric_names=metric_names, max_images=config.eval_max_images, seed=config.seed,
        grid=(grid_path, config.grid_images) if grid_path is not None else None,
        should_stop=should_stop)
    result = {k: v["mean"] for k, v in scores.summary.items() if k != "blank_map"}
    result["num_images"] = scores.summary["loss"]["n"]
    blank = scores.summary["blank_map"]
    result["blank_maps"] = round(blank["mean"] * blank["n"])  # their CC and NSS are NaN, unmeaned
    return result
