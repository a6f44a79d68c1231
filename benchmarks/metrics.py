"""Saliency metrics on CPU: batched, jit-compiled JAX versus a per-image NumPy loop.

Times the seven benchmark metrics (CC, KLD, NSS, SIM, AUC-Judd, AUC-Borji, sAUC) of
``mlnet_jax.metrics`` on N synthetic maps at the ground-truth size: the NumPy single-image
functions in a plain loop (on the first ``--numpy-maps`` maps, as ms per map: the loop is the
slow side) and the ``batched_*`` JAX functions on all N maps in chunks (data already on the
device, as in an evaluation loop; compilation timed separately). Also reports how far the two
agree on the maps both computed.

Synthetic data: smooth positive predictions and ground-truth maps (sums of Gaussians), a
fixation map of ``--fixations`` distinct pixels drawn from the ground truth, and for sAUC the
union of the fixation maps of ``--other-images`` other maps. Maps are cycled from a pool of
``--pool`` distinct ones (timing does not depend on which maps are used).

    python benchmarks/metrics.py [--num-maps 5000] [--height 480] [--width 640]
        [--numpy-maps 500] [--chunk 16] [--output benchmarks/results/metrics-<date>-cpu.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlnet_jax import metrics as M  # noqa: E402

METRICS = ["cc", "kld", "nss", "sim", "auc_judd", "auc_borji", "auc_shuffled"]
RANDOM = {"auc_judd", "auc_borji", "auc_shuffled"}


def _blobs(rng: np.random.Generator, rows: int, cols: int, n: int) -> np.ndarray:
    yy = np.arange(rows)[:, None]
    xx = np.arange(cols)[None, :]
    out = np.zeros((rows, cols))
    for _ in range(n):
        r0, c0 = rng.uniform(0, rows), rng.uniform(0, cols)
        sr, sc = rng.uniform(0.05, 0.2) * rows, rng.uniform(0.05, 0.2) * cols
        weight = rng.uniform(0.3, 1.0)
        out += weight * np.exp(-((yy - r0) / sr) ** 2) * np.exp(-((xx - c0) / sc) ** 2)
    return out / out.max()


def make_pool(size: int, rows: int, cols: int, n_fix: int, n_other: int,
              seed: int) -> dict[str, np.ndarray]:
    """``size`` (prediction, GT map, fixation map, other-images fixation map) quadruples."""
    rng = np.random.default_rng(seed)
    preds = np.zeros((size, rows, cols), np.float32)
    gts = np.zeros((size, rows, cols), np.float32)
    fixs = np.zeros((size, rows, cols), np.float32)
    for i in range(size):
        gt = _blobs(rng, rows, cols, int(rng.integers(2, 6)))
        gt[gt < 0.05] = 0.0  # fixation density maps have exact zeros
        gts[i] = gt
        # A prediction that partly agrees with the GT, with a soft noise floor.
        preds[i] = 0.6 * gt + 0.4 * _blobs(rng, rows, cols, 3) + 0.01 * rng.random((rows, cols))
        prob = gt.ravel() / gt.sum()
        picked: np.ndarray = np.zeros(0, np.int64)
        while picked.size < n_fix:
            picked = np.unique(np.concatenate([picked, rng.choice(prob.size, 2 * n_fix, p=prob)]))
        fixs[i].ravel()[rng.permutation(picked)[:n_fix]] = 1.0
    others = np.zeros_like(fixs)
    for i in range(size):
        idx = [(i + 1 + k) % size for k in range(min(n_other, size - 1))]
        others[i] = (fixs[idx].sum(axis=0) > 0).astype(np.float32)
    return {"preds": preds, "gts": gts, "fixs": fixs, "others": others}


def numpy_call(name: str, pool: dict[str, np.ndarray], i: int) -> float:
    pred = pool["preds"][i]
    if name in ("cc", "kld", "sim"):
        return getattr(M, name)(pred, pool["gts"][i])
    if name == "auc_shuffled":
        return M.auc_shuffled(pred, pool["fixs"][i], pool["others"][i], seed=i)
    if name in ("auc_judd", "auc_borji"):
        return getattr(M, name)(pred, pool["fixs"][i], seed=i)
    return M.nss(pred, pool["fixs"][i])


def jax_call(name: str, dev: dict[str, jax.Array], lo: int, hi: int, key: jax.Array) -> jax.Array:
    preds = dev["preds"][lo:hi]
    fn = getattr(M, "batched_" + name)
    if name in ("cc", "kld", "sim"):
        return fn(preds, dev["gts"][lo:hi])
    if name == "nss":
        return fn(preds, dev["fixs"][lo:hi])
    if name == "auc_shuffled":
        return fn(preds, dev["fixs"][lo:hi], dev["others"][lo:hi], key)
    return fn(preds, dev["fixs"][lo:hi], key)


def _machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "jax": jax.__version__, "numpy": np.__version__,
            "jax_device": str(jax.devices()[0])}


def main(argv: list[str] | None = None) -> dict:
    today = datetime.date.today().isoformat()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-maps", type=int, default=5000, help="maps for the JAX side")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--numpy-maps", type=int, default=500,
                    help="maps timed in the NumPy loop (at most --num-maps)")
    ap.add_argument("--chunk", type=int, default=16, help="maps per batched JAX call")
    ap.add_argument("--pool", type=int, default=32, help="distinct synthetic maps, cycled")
    ap.add_argument("--fixations", type=int, default=500, help="fixated pixels per map")
    ap.add_argument("--other-images", type=int, default=10,
                    help="fixation maps united into the sAUC negatives' map")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results"
                    / f"metrics-{today}-cpu.json")
    args = ap.parse_args(argv)
    n_maps = args.num_maps
    n_numpy = min(args.numpy_maps, n_maps)
    chunk = min(args.chunk, n_maps)
    pool_size = max(chunk, (args.pool // chunk) * chunk)  # whole chunks: contiguous slices

    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    pool = make_pool(pool_size, args.height, args.width, args.fixations, args.other_images,
                     args.seed)
    print(f"pool of {pool_size} synthetic {args.height}x{args.width} maps in "
          f"{time.perf_counter() - t0:.1f} s; {int(pool['fixs'][0].sum())} fixated pixels, "
          f"{int(pool['others'][0].sum())} other-image fixated pixels per map", flush=True)
    dev = {k: jax.device_put(jnp.asarray(v)) for k, v in pool.items()}
    n_chunks = -(-n_maps // chunk)
    base_key = jax.random.key(args.seed)

    results = {}
    for name in METRICS:
        # NumPy: plain per-image loop.
        t = time.perf_counter()
        np_vals = [numpy_call(name, pool, i % pool_size) for i in range(n_numpy)]
        np_ms = (time.perf_counter() - t) / n_numpy * 1e3
        # JAX: compile (first call), then all chunks.
        t = time.perf_counter()
        jax.block_until_ready(jax_call(name, dev, 0, chunk, base_key))
        compile_s = time.perf_counter() - t
        outs = []
        t = time.perf_counter()
        for c in range(n_chunks):
            lo = (c * chunk) % pool_size
            outs.append(jax_call(name, dev, lo, lo + chunk, jax.random.fold_in(base_key, c)))
        jax.block_until_ready(outs)
        jax_ms = (time.perf_counter() - t) / (n_chunks * chunk) * 1e3
        # Agreement on the maps both sides computed (random metrics: different draws).
        jax_vals = np.concatenate([np.asarray(o) for o in outs])[:n_numpy]
        diff = np.abs(jax_vals - np.asarray(np_vals))
        results[name] = {
            "numpy_ms_per_map": round(np_ms, 3), "numpy_maps_timed": n_numpy,
            "jax_ms_per_map": round(jax_ms, 3), "jax_maps_timed": n_chunks * chunk,
            "jax_compile_s": round(compile_s, 2), "speedup": round(np_ms / jax_ms, 2),
            "mean_value_numpy": float(np.mean(np_vals)), "mean_value_jax": float(np.mean(jax_vals)),
            "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "random": name in RANDOM,
        }
        r = results[name]
        print(f"{name:13s} numpy {np_ms:8.2f} ms/map   jax {jax_ms:8.2f} ms/map   "
              f"x{r['speedup']:.2f}   (compile {compile_s:.1f} s, max |diff| "
              f"{r['max_abs_diff']:.2e})", flush=True)

    total_np = sum(r["numpy_ms_per_map"] for r in results.values())
    total_jax = sum(r["jax_ms_per_map"] for r in results.values())
    lines = ["| metric | numpy ms/map | jax ms/map | speedup |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['numpy_ms_per_map']:.2f} | {r['jax_ms_per_map']:.2f} | "
                     f"{r['speedup']:.2f}x |")
    lines.append(f"| all seven | {total_np:.2f} | {total_jax:.2f} | {total_np / total_jax:.2f}x |")
    print("\n" + "\n".join(lines))

    report = {
        "benchmark": "metrics",
        "date": today,
        "command": "python benchmarks/metrics.py "
                   + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {**_machine(), "load_average_1min_before": round(load_before, 2),
                    "load_average_1min_after": round(os.getloadavg()[0], 2)},
        "setup": {"num_maps": n_maps, "map_size": [args.height, args.width],
                  "numpy_maps_timed": n_numpy, "chunk": chunk, "pool": pool_size,
                  "fixated_pixels_per_map": args.fixations, "other_images": args.other_images,
                  "n_splits": 100, "dtype_numpy": "float64", "dtype_jax": "float32"},
        "notes": [
            "numpy: per-image loop over the single-image functions on the first numpy_maps_timed "
            "maps; ms/map is that loop's average (the loop is linear in N).",
            "jax: batched_* on all num_maps maps in chunks of `chunk`, inputs already on the "
            "device, block_until_ready at the end; compilation (first call) is excluded and "
            "reported as jax_compile_s.",
            "maps are cycled from `pool` distinct synthetic maps.",
            "random metrics use different draws on each side, so their diffs are sampling "
            "noise, not error.",
        ],
        "results": results,
        "total_ms_per_map": {"numpy": round(total_np, 3), "jax": round(total_jax, 3)},
        "table_markdown": "\n".join(lines),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return report


if __name__ == "__main__":
    main()
