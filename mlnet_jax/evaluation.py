"""Scoring a model on an evaluation split at ground-truth resolution, on every device.

Predictions come from the jit-compiled ``eval_step`` (batch split over the mesh); each map is
resized back to its image's original size and scored against the full-resolution ground
truth, as the MIT/SALICON benchmarks do. Multi-process runs score their own shard and sum.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from mlnet_jax.inference import ModelInfo

def _host_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order."""
    if jax.process_count() == 1:
        return np.asarray(x)
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    unique = {s.index[0].start: s for s in shards}
    return np.concatenate([np.asarray(unique[k].data) for k in sorted(unique)])


def fixation_map(fixations: np.ndarray, size) -> np.ndarray:
    out = np.zeros(tuple(int(s) for s in size), np.float32)
    if len(fixations):
        out[fixations[:, 0], fixations[:, 1]] = 1.0
    return out


def evaluate_split(params, evaluate_fn, source, config, info: ModelInfo, mesh, *,
             centre_bias: bool = False, grid_path: Path | None = None) -> dict:
    """Mean validation loss and CC/KLD/NSS/SIM at ground-truth resolution (plus, with
    ``centre_bias``, the same metrics of a Gaussian centre-bias map)."""
    from mlnet_jax import metrics
    from mlnet_jax.baselines import centre_bias_map
    from mlnet_jax.input_pipeline import eval_batches
    from mlnet_jax.preprocessing import postprocess
    from mlnet_jax.sharding import shard_batch

    per_process = -(-config.eval_batch_size // jax.local_device_count()) * jax.local_device_count()
    scores: dict[str, list[float]] = {}
    grid: tuple[list, list, list] = ([], [], [])
    seen = 0
    for batch in eval_batches(source, model_size=info.input_size, batch_size=per_process):
        if 0 <= config.eval_max_images <= seen * jax.process_count():
            break
        out = evaluate_fn(params, shard_batch({"image": batch["image"], "target": batch["target"]}, mesh))
        preds, losses = _host_rows(out["pred"]), _host_rows(out["loss"])
        for i, size in enumerate(batch["image_size"]):
            truth = batch["saliency_map_full"][i]
            fix = fixation_map(batch["fixations"][i], size)
            pred = postprocess(preds[i], tuple(size))
            candidates = [("", pred)] + ([("centre_bias_", centre_bias_map(*size))] if centre_bias else [])
            for prefix, saliency in candidates:
                for name in ("cc", "kld", "sim"):
                    scores.setdefault(prefix + name, []).append(getattr(metrics, name)(saliency, truth))
                scores.setdefault(prefix + "nss", []).append(metrics.nss(saliency, fix) if fix.any() else np.nan)
            scores.setdefault("loss", []).append(float(losses[i]))
            if grid_path is not None and len(grid[0]) < config.grid_images:
                from mlnet_jax.input_pipeline import decode_image
                grid[0].append(np.asarray(decode_image(source[seen + i]).convert("RGB")))
                grid[1].append(truth)
                grid[2].append(pred)
        seen += len(batch["image_size"])
    totals = {k: (np.nansum(v), np.sum(np.isfinite(v))) for k, v in scores.items()}
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        keys = sorted(totals)
        gathered = multihost_utils.process_allgather(np.asarray([totals[k] for k in keys]))
        totals = dict(zip(keys, gathered.sum(axis=0)))
    result = {k: float(s / n) if n else float("nan") for k, (s, n) in totals.items()}
    result["num_images"] = int(sum(int(n) for n in [totals["loss"][1]]))
    if grid_path is not None and jax.process_index() == 0 and grid[0]:
        from mlnet_jax.reporting import save_prediction_grid
        save_prediction_grid(grid_path, *grid)
    return result
