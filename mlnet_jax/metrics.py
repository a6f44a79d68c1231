"""Saliency metrics with the semantics of the MIT saliency benchmark MATLAB code.

Published SALICON / MIT300 numbers come from that code (``code_forMetrics`` of the MIT/Tuebingen
benchmark), so every choice below copies it; where it differs from textbook definitions, the
MATLAB behaviour wins. One image at a time (NumPy, float64): ``metric(saliency_2d, target_2d)``;
the prediction is first resized to the ground-truth size (bilinear, half-pixel centres, no
antialias, as ``cv2.resize``; the MATLAB code uses ``imresize``, whose default is bicubic with
antialias). Maps must be finite and, for KLD/SIM, non-negative; a fixation map is "fixated"
where it is > 0, each pixel counted once however many fixations landed on it.

- **CC**: Pearson correlation of prediction and continuous ground truth; NaN if either is constant.
- **KLD**: KL(GT ‖ pred) = Σ g·log(ε + g/(p + ε)) with g, p divided by their sums (a map with no
  non-zero pixel is left as is) and ε = 2.2204e-16 (MATLAB's ``eps``); all-zero GT gives 0.
- **NSS**: mean over fixated pixels of the prediction z-scored with its std (N−1); NaN for a
  constant map or no fixations.
- **SIM**: Σ min(p, g) after each map is min-max scaled to [0, 1] and divided by its sum; an
  all-zero map stays zero (SIM 0), a constant non-zero map gives NaN.
- **AUC-Judd**: ROC with one threshold per fixated pixel's value, negatives = all non-fixated
  pixels, area by trapezoids; uniform jitter in [0, 1e-7) (seeded) is added first to break ties
  (a constant map is then ranked at random); NaN with no fixations or no non-fixated pixel.
- **AUC-Borji**: mean over 100 splits of the AUC with thresholds 0:0.1:max (MATLAB colon) on
  the [0, 1]-scaled map, each split drawing as many uniformly random pixels (with replacement,
  anywhere, fixated ones included) as there are fixated pixels as negatives; NaN with ≤ 1
  fixated pixel or a constant map.
- **sAUC** (shuffled AUC): as AUC-Borji, but each split's negatives are
  min(#fixated, #other-fixated) pixels drawn *without* replacement (a fresh random permutation per
  split) from the fixated pixels of ``other_fixation_map`` (in the benchmark: the union of the
  fixation maps of other images, e.g. 10); NaN with no fixation, no other fixation or a
  constant map.
- **IG** (information gain): mean over fixated pixels of log2(ε + p) − log2(ε + b), p and b the
  prediction and a baseline map min-max scaled then divided by their sums; NaN if either is
  constant or there are no fixations.

The ``batched_*`` functions are jit-compiled JAX versions for stacks (B, H, W) of same-size maps
(resize beforehand), for evaluation on accelerators. They compute the same quantities in the
default float dtype (float32 unless x64 is enabled). Their random parts are equal in
distribution, not draw for draw: AUC-Judd orders exactly tied pixels by a seeded pseudo-random
per-pixel key instead of adding jitter (float32 cannot hold a 1e-7 jitter); AUC-Borji and sAUC
draw, per split, how many negatives fall in each threshold bin (multinomial, resp. sequential
draws without replacement), which gives the same ROC points as drawing the pixels themselves.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mlnet_jax.resize import resize_bilinear

__all__ = [
    "EPS", "JUDD_JITTER", "cc", "kld", "nss", "sim", "auc_judd", "auc_borji", "auc_shuffled",
    "info_gain", "batched_cc", "batched_kld", "batched_nss", "batched_sim", "batched_auc_judd",
    "batched_auc_borji", "batched_auc_shuffled", "matlab_colon",
]

#: MATLAB's ``eps`` as printed (2.220446…e-16 exactly; the difference is immaterial).
EPS = 2.2204e-16
#: Scale of the uniform jitter AUC-Judd adds (MATLAB: ``rand(size(map))/10000000``).
JUDD_JITTER = 1e-7


# --------------------------------------------------------------------------------------------
# Single image (NumPy, float64)
# --------------------------------------------------------------------------------------------

def _nan_for_non_finite(metric):
    """NaN where the prediction holds NaN or ±inf: no metric is defined there, and computed
    anyway one gave an AUC of −0.01 (the JAX backend, a SIM of 1)."""
    @functools.wraps(metric)
    def checked(saliency, *args, **kwargs):
        return metric(saliency, *args, **kwargs) if _finite(saliency) else float("nan")
    return checked


def _finite(saliency: Any) -> bool:
    a = np.asarray(saliency)  # no copy: an integer map is finite as it is
    return a.dtype.kind not in "fc" or bool(np.isfinite(a).all())


def _map2d(array: Any, name: str) -> np.ndarray:
    a = np.asarray(array, dtype=np.float64)
    if a.ndim != 2 or not a.size:
        raise ValueError(f"{name} must be a non-empty 2-D map, got shape {a.shape}")
    return a


def _prediction(saliency: Any, shape: tuple[int, ...]) -> np.ndarray:
    """The prediction at the ground-truth size: MATLAB resizes before every metric."""
    s = _map2d(saliency, "saliency")
    if s.shape != tuple(shape):
        s = resize_bilinear(s, (int(shape[0]), int(shape[1])))
    return s


def _fixated(fixation_map: Any) -> np.ndarray:
    return _map2d(fixation_map, "fixation_map") > 0


def _constant(a: np.ndarray) -> bool:
    return bool(a.max() == a.min())


def _minmax(a: np.ndarray) -> np.ndarray:
    """(a - min) / (max - min); all NaN for a constant map (MATLAB divides 0 by 0 too)."""
    lo, hi = a.min(), a.max()
    if hi == lo:
        return np.full_like(a, np.nan)
    return (a - lo) / (hi - lo)


def matlab_colon(a: float, d: float, b: float) -> np.ndarray:
    """``a:d:b`` built as MATLAB builds it (symmetric from both ends), for d > 0.

    Why: AUC-Borji/sAUC compare map values with ``>=`` against these thresholds, and maps read
    from 8-bit files hit values such as 0.6 exactly; MATLAB's 0.6 here is ``1 - 4*0.1`` (the
    double nearest 0.6), while ``6*0.1`` is one ulp above, which would change the counts.
    """
    if not d > 0:
        raise ValueError("step must be positive")
    if b < a:
        return np.zeros(0)
    tol = 2.0 * np.finfo(np.float64).eps * max(abs(a), abs(b))
    if a == math.floor(a) and d == 1:
        n = int(math.floor(b) - a)
    elif a == math.floor(a) and d == math.floor(d):
        q = math.floor(a / d)
        n = int(math.floor((b - (a - q * d)) / d) - q)
    else:
        n = int(math.floor((b - a) / d + 0.5))  # MATLAB's round: halves away from zero
        if a + n * d - b > tol:
            n -= 1
    last = a + n * d
    if last - b > -tol:
        last = b
    v = np.zeros(n + 1)
    k = np.arange(n // 2 + 1)
    v[k] = a + k * d
    v[n - k] = last - k * d
    if n % 2 == 0:
        v[n // 2] = (a + last) / 2
    return v


@_nan_for_non_finite
def cc(saliency: Any, ground_truth: Any) -> float:
    """Pearson correlation coefficient between the prediction and a continuous GT map.

    NaN if either map is constant (MATLAB divides by a zero std).
    """
    g = _map2d(ground_truth, "ground_truth")
    p = _prediction(saliency, g.shape)
    if _constant(p) or _constant(g):  # mean() rounding would leave a spurious ~1e-17 std
        return float("nan")
    p = p - p.mean()
    g = g - g.mean()
    return float(np.sum(p * g) / math.sqrt(float(np.sum(p * p)) * float(np.sum(g * g))))


@_nan_for_non_finite
def kld(saliency: Any, ground_truth: Any) -> float:
    """KL divergence of the prediction from the GT distribution, Σ g·log(ε + g/(p + ε)).

    Each map is divided by its sum only if it has a non-zero pixel (MATLAB's ``any``), so an
    all-zero GT gives 0.0 and an all-zero prediction gives the finite Σ g·log(ε + g/ε) ≈ 36·Σg.
    """
    g = _map2d(ground_truth, "ground_truth")
    p = _prediction(saliency, g.shape)
    if np.any(p):
        p = p / p.sum()
    if np.any(g):
        g = g / g.sum()
    return float(np.sum(g * np.log(EPS + g / (p + EPS))))


@_nan_for_non_finite
def nss(saliency: Any, fixation_map: Any) -> float:
    """Normalised scanpath saliency: mean z-scored prediction (std with N−1) at fixated pixels.

    NaN for a constant (or one-pixel) map or when no pixel is fixated.
    """
    f = _fixated(fixation_map)
    p = _prediction(saliency, f.shape)
    if p.size < 2 or not f.any() or _constant(p):
        return float("nan")
    return float(np.mean((p[f] - p.mean()) / np.std(p, ddof=1)))


@_nan_for_non_finite
def sim(saliency: Any, ground_truth: Any) -> float:
    """Similarity (histogram intersection) Σ min(p, g) of the min-max scaled, sum-normalised maps.

    An all-zero map is left at zero (SIM 0.0 against anything); a constant non-zero map
    becomes NaN under min-max scaling, so SIM is NaN (as in MATLAB).
    """
    g = _map2d(ground_truth, "ground_truth")
    p = _prediction(saliency, g.shape)
    out = []
    for m in (p, g):
        if np.any(m):
            m = _minmax(m)
            m = m / m.sum()
        out.append(m)
    p, g = out
    return float(np.sum(np.minimum(p, g)))


@_nan_for_non_finite
def auc_judd(saliency: Any, fixation_map: Any, *, jitter: bool = True, seed: int = 0) -> float:
    """AUC-Judd: ROC over thresholds at the fixated pixels' values, negatives = other pixels.

    As MATLAB: jitter ``default_rng(seed).random(shape) * 1e-7`` is added (breaks ties, e.g.
    in flat zero regions), the map is min-max scaled, and for the i-th largest fixated value
    ``tp = i/Nf`` and ``fp = (#pixels >= it - i)/(N - Nf)``; points (0,0) and (1,1) close the
    curve, area by trapezoids. With jitter a constant map is ranked at random: its expected
    score is (Nf/2 + 1)/(Nf + 1) (Judd's curve gives half credit between thresholds), without
    jitter it is NaN. NaN with no fixated pixel or no non-fixated pixel.
    """
    f = _fixated(fixation_map)
    s = _prediction(saliency, f.shape)
    if not f.any():
        return float("nan")
    if jitter:
        s = s + np.random.default_rng(seed).random(s.shape) * JUDD_JITTER
    s = _minmax(s)
    if np.all(np.isnan(s)):
        return float("nan")
    n_pixels, n_fix = s.size, int(f.sum())
    if n_pixels == n_fix:
        return float("nan")
    thresholds = np.sort(s[f])[::-1]
    above = n_pixels - np.searchsorted(np.sort(s.ravel()), thresholds, side="left")
    i = np.arange(1, n_fix + 1)
    tp = np.concatenate([[0.0], i / n_fix, [1.0]])
    fp = np.concatenate([[0.0], (above - i) / (n_pixels - n_fix), [1.0]])
    return float(np.trapezoid(tp, fp))


def _split_auc(s_fix_sorted: np.ndarray, negatives: np.ndarray, step: float) -> float:
    """One split of AUC-Borji/sAUC: thresholds ``0:step:max`` descending, as MATLAB."""
    top = max(float(s_fix_sorted[-1]), float(negatives.max()))
    thresholds = matlab_colon(0.0, step, top)[::-1]
    neg_sorted = np.sort(negatives)
    n_fix, n_neg = s_fix_sorted.size, neg_sorted.size
    tp = (n_fix - np.searchsorted(s_fix_sorted, thresholds, "left")) / n_fix
    fp = (n_neg - np.searchsorted(neg_sorted, thresholds, "left")) / n_neg
    tp = np.concatenate([[0.0], tp, [1.0]])
    fp = np.concatenate([[0.0], fp, [1.0]])
    return float(np.trapezoid(tp, fp))


def _scaled_values(saliency: Any, fixated: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(all values, sorted fixated values) of the min-max scaled prediction at the fixation
    map's size, or None for a constant map: what AUC-Borji and sAUC threshold."""
    s = _minmax(_prediction(saliency, fixated.shape))
    if np.all(np.isnan(s)):
        return None
    return s.ravel(), np.sort(s[fixated])


@_nan_for_non_finite
def auc_borji(saliency: Any, fixation_map: Any, *, n_splits: int = 100, step_size: float = 0.1,
              seed: int = 0) -> float:
    """AUC-Borji: mean AUC over ``n_splits`` sets of uniformly random negatives.

    Per split, Nf (= #fixated pixels) pixel indices are drawn uniformly with replacement from
    the whole map (``default_rng(seed).integers``, one (Nf, n_splits) draw as MATLAB's
    ``randi``); thresholds ``0:step_size:max(fixated ∪ drawn values)`` on the min-max scaled
    map. NaN with ≤ 1 fixated pixel (MATLAB's test) or a constant map.
    """
    f = _fixated(fixation_map)
    if int(f.sum()) <= 1:
        return float("nan")
    scaled = _scaled_values(saliency, f)
    if scaled is None:
        return float("nan")
    flat, s_fix = scaled
    r = np.random.default_rng(seed).integers(0, flat.size, size=(s_fix.size, n_splits))
    rand_values = flat[r]
    return float(np.mean([_split_auc(s_fix, rand_values[:, k], step_size)
                          for k in range(n_splits)]))


@_nan_for_non_finite
def auc_shuffled(saliency: Any, fixation_map: Any, other_fixation_map: Any, *,
                 n_splits: int = 100, step_size: float = 0.1, seed: int = 0) -> float:
    """Shuffled AUC: AUC-Borji whose negatives are fixated pixels of other images.

    ``other_fixation_map`` (same size as ``fixation_map``; in the benchmark the union of the
    fixation maps of other images) gives the candidate negatives: its pixels > 0, each once.
    Per split, ``default_rng(seed).permutation`` of them is drawn and the first
    m = min(Nf, N_other) are used (without replacement). NaN with no fixated pixel, no
    other-fixated pixel or a constant map.
    """
    f = _fixated(fixation_map)
    other = _fixated(other_fixation_map)
    if other.shape != f.shape:
        raise ValueError(f"other_fixation_map {other.shape} must match fixation_map {f.shape}")
    if not f.any():
        return float("nan")
    scaled = _scaled_values(saliency, f)
    if scaled is None:
        return float("nan")
    flat, s_fix = scaled
    candidates = np.flatnonzero(other.ravel())
    m = min(s_fix.size, candidates.size)
    if m == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    aucs = [_split_auc(s_fix, flat[candidates[rng.permutation(candidates.size)[:m]]], step_size)
            for _ in range(n_splits)]
    return float(np.mean(aucs))


@_nan_for_non_finite
def info_gain(saliency: Any, fixation_map: Any, baseline_map: Any) -> float:
    """Information gain (bits per fixation) of the prediction over a baseline map.

    Both maps are resized to the fixation map, min-max scaled and divided by their sums; the
    score is the mean over fixated pixels of log2(ε + p) − log2(ε + b). NaN if either map is
    constant or no pixel is fixated.
    """
    f = _fixated(fixation_map)
    p = _minmax(_prediction(saliency, f.shape))
    b = _minmax(_prediction(baseline_map, f.shape))
    if not f.any() or np.isnan(p).all() or np.isnan(b).all() or not _finite(baseline_map):
        return float("nan")
    p = p / p.sum()
    b = b / b.sum()
    return float(np.mean(np.log2(EPS + p[f]) - np.log2(EPS + b[f])))


# --------------------------------------------------------------------------------------------
# Batched (JAX, jit-compiled)
# --------------------------------------------------------------------------------------------

def _float(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _stack(x: Any, name: str) -> jax.Array:
    x = _float(x)
    if x.ndim != 3 or not (x.shape[1] and x.shape[2]):
        raise ValueError(f"{name} must be (B, H, W) with H, W > 0, got shape {x.shape}")
    return x


def _stacks(preds: Any, **others: Any) -> list[jax.Array]:
    """``preds`` and the maps scored against it, each (B, H, W) and all of one shape (no
    broadcasting of a batch of one, no resizing: :func:`cc` and the others resize)."""
    p = _stack(preds, "preds")
    stacked = [p]
    for name, maps in others.items():
        m = _stack(maps, name)
        if m.shape != p.shape:
            raise ValueError(f"{name} {tuple(m.shape)} must have the shape of preds "
                             f"{tuple(p.shape)}")
        stacked.append(m)
    return stacked


def _where_finite(p: jax.Array, scores: jax.Array) -> jax.Array:
    """NaN for the predictions holding NaN or ±inf (as the NumPy metrics)."""
    return jnp.where(jnp.isfinite(p).all(axis=(1, 2)), scores, jnp.nan)


def _sum(x: jax.Array) -> jax.Array:
    """Sum over (H, W) one axis at a time: shorter float32 accumulations, smaller error."""
    return x.sum(axis=-1).sum(axis=-1)


def _constant_j(m: jax.Array) -> jax.Array:
    return m.max(axis=(1, 2)) == m.min(axis=(1, 2))


def _keys(key: Any, batch: int) -> jax.Array:
    """(B,) keys, one per image: ``key`` is an int seed or one key (split into B), or already
    B keys (each image's draws then depend on its own key only, not on its batch)."""
    if isinstance(key, (int, np.integer)):
        key = jax.random.key(int(key))
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):  # raw uint32 data (PRNGKey)
        key = jax.random.wrap_key_data(key)
    if key.ndim == 0:
        return jax.random.split(key, batch)
    if key.shape != (batch,):
        raise ValueError(f"expected one key or {batch} keys, got keys of shape {key.shape}")
    return key


@jax.jit
def _cc(p: jax.Array, g: jax.Array) -> jax.Array:
    bad = _constant_j(p) | _constant_j(g)
    p = p - p.mean(axis=(1, 2), keepdims=True)
    g = g - g.mean(axis=(1, 2), keepdims=True)
    return jnp.where(bad, jnp.nan, _sum(p * g) / jnp.sqrt(_sum(p * p) * _sum(g * g)))


@jax.jit
def _kld(p: jax.Array, g: jax.Array) -> jax.Array:
    def norm(m):
        total = _sum(m)[:, None, None]
        return jnp.where(jnp.any(m != 0, axis=(1, 2), keepdims=True), m / total, m)
    p, g = norm(p), norm(g)
    return _sum(g * jnp.log(EPS + g / (p + EPS)))


@jax.jit
def _nss(p: jax.Array, fix: jax.Array) -> jax.Array:
    n = p.shape[1] * p.shape[2]
    centred = p - p.mean(axis=(1, 2), keepdims=True)
    sd = jnp.sqrt(_sum(centred * centred) / (n - 1))
    f = (fix > 0).astype(p.dtype)
    return jnp.where(_constant_j(p), jnp.nan, _sum(centred * f) / sd / _sum(f))


def _minmax_j(m: jax.Array) -> jax.Array:
    lo = m.min(axis=(1, 2), keepdims=True)
    hi = m.max(axis=(1, 2), keepdims=True)
    return (m - lo) / (hi - lo)


@jax.jit
def _sim(p: jax.Array, g: jax.Array) -> jax.Array:
    def norm(m):
        scaled = _minmax_j(m)
        scaled = scaled / _sum(scaled)[:, None, None]
        return jnp.where(jnp.any(m != 0, axis=(1, 2), keepdims=True), scaled, m)
    # A constant non-zero map is NaN, said explicitly: XLA:CPU's fused minimum-and-sum drops
    # the NaN that min-max scaling gives it (SIM came out 1.0 for a constant prediction).
    undefined = (_constant_j(p) & jnp.any(p != 0, axis=(1, 2))) | (
        _constant_j(g) & jnp.any(g != 0, axis=(1, 2)))
    return jnp.where(undefined, jnp.nan, _sum(jnp.minimum(norm(p), norm(g))))


def _hash32(x: jax.Array) -> jax.Array:
    """An integer hash (Wellons' lowbias32) of uint32: cheap per-pixel pseudo-random tie keys
    (``jax.random`` over every pixel costs more than the metric on CPU)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _take(table: jax.Array, index: jax.Array) -> jax.Array:
    return jnp.take_along_axis(table, index, axis=1)


def _search(lo: jax.Array, hi: jax.Array, greater: Any, size: int) -> jax.Array:
    """Per-element binary search on a descending table: the first index in [lo, hi) whose
    entry is not ``greater`` than the element (``greater(index)`` compares), i.e. how many
    entries exceed it. Runs as many halvings as the widest range needs."""
    def body(state):
        lo, hi = state
        mid = (lo + hi) // 2
        above = greater(jnp.minimum(mid, size - 1))
        active = lo < hi
        return jnp.where(active & above, mid + 1, lo), jnp.where(active & ~above, mid, hi)
    return jax.lax.while_loop(lambda st: jnp.any(st[0] < st[1]), body, (lo, hi))[0]


@functools.partial(jax.jit, static_argnames=("k", "n_buckets"))
def _auc_judd(p: jax.Array, fix: jax.Array, keys: jax.Array, k: int,
              n_buckets: int) -> jax.Array:
    b = p.shape[0]
    v = p.reshape(b, -1)
    n = v.shape[1]
    f = fix.reshape(b, -1) > 0
    n_fix = f.sum(axis=1)
    n_neg = n - n_fix
    rows = jnp.arange(b)[:, None]
    j = jnp.arange(k)
    # A pseudo-random key per pixel: MATLAB's jitter (key / 2**32 · 1e-7, added to the map:
    # it reorders values closer than that, e.g. a Gaussian's far tails, where float32 holds
    # it; near 1 its ulp of 6e-8 rounds it), then what is still tied ordered by the key.
    seed = _hash32(jax.vmap(lambda k: jax.random.bits(k, (), jnp.uint32))(keys))
    tie = _hash32(jnp.arange(n, dtype=jnp.uint32)[None, :] ^ seed[:, None])
    v = v + (tie.astype(jnp.float32) * (1e-7 / 2**32)).astype(v.dtype)
    # The fixated pixels (at most k), sorted by (value, tie key), descending.
    top, index = jax.lax.top_k(jnp.where(f, v, -jnp.inf), k)
    valid = j < n_fix[:, None]
    fv, ft = jax.lax.sort((jnp.where(valid, top, -jnp.inf),
                           jnp.where(valid, _take(tie, index), jnp.uint32(0))),
                          dimension=1, num_keys=2)
    fv, ft = fv[:, ::-1], ft[:, ::-1]
    # Their distinct values, and where each value's run starts (= #fixated strictly above).
    first = valid & ((j == 0) | (fv != jnp.roll(fv, 1, axis=1)))
    n_distinct = first.sum(axis=1, keepdims=True)
    slot = jnp.where(first, jnp.cumsum(first, axis=1) - 1, k)
    distinct = jnp.full((b, k), -jnp.inf, v.dtype).at[rows, slot].set(fv, mode="drop")
    run_start = jnp.broadcast_to(n_fix[:, None], (b, k + 1)).at[rows, slot].set(
        jnp.broadcast_to(j, (b, k)), mode="drop")
    # Value buckets (monotone in the value) narrow each pixel's search to a few candidates.
    lo_v = v.min(axis=1, keepdims=True)
    hi_v = v.max(axis=1, keepdims=True)
    scale = jnp.where(hi_v > lo_v, n_buckets / jnp.where(hi_v > lo_v, hi_v - lo_v, 1), 0)

    def bucket(x):
        return jnp.clip(jnp.floor((x - lo_v) * scale), 0, n_buckets - 1).astype(jnp.int32)

    is_distinct = j < n_distinct
    distinct_bucket = jnp.where(is_distinct, bucket(jnp.where(is_distinct, distinct, lo_v)),
                                n_buckets)
    per_bucket = jnp.zeros((b, n_buckets + 1), jnp.int32).at[rows, distinct_bucket].add(1)
    per_bucket = per_bucket[:, :n_buckets]
    higher = jnp.cumsum(per_bucket[:, ::-1], axis=1)[:, ::-1] - per_bucket
    pixel_bucket = bucket(v)
    lo = _take(higher, pixel_bucket)
    hi = lo + _take(per_bucket, pixel_bucket)
    # Distinct fixated values above each pixel → fixated strictly above it (c0); if its value
    # equals a fixated one, add the tied fixated pixels whose tie key is larger.
    d = _search(lo, hi, lambda m: _take(distinct, m) > v, k)
    c0 = _take(run_start, d)
    tied = (d < n_distinct) & (_take(distinct, jnp.minimum(d, k - 1)) == v)
    c1 = jnp.where(tied, _take(run_start, jnp.minimum(d + 1, k)), c0)
    above = _search(c0, c1, lambda m: _take(ft, m) > tie, k)
    # MATLAB's trapezoids credit each negative min((2·above + 1) / (2·Nf), 1): half a step
    # between two fixated thresholds, 1 below the last one.
    credit = jnp.minimum((2 * above + 1).astype(v.dtype) / (2 * n_fix[:, None]).astype(v.dtype),
                         1.0)
    credit = jnp.where(f, 0.0, credit).reshape(p.shape)
    auc = _sum(credit) / n_neg.astype(v.dtype)
    return jnp.where((n_fix == 0) | (n_neg == 0) | (n_fix > k), jnp.nan, auc)


def _threshold_bins(p: jax.Array, step_size: float) -> tuple[jax.Array, jax.Array, int]:
    """Per pixel, the index of the highest threshold of 0:step:1 it reaches on the min-max
    scaled map (so ``s >= t_k`` ⇔ bin >= k), and whether the map is non-constant."""
    thresholds = matlab_colon(0.0, step_size, 1.0)
    lo = p.min(axis=(1, 2), keepdims=True)
    hi = p.max(axis=(1, 2), keepdims=True)
    # A true division, as MATLAB's: XLA rewrites x / broadcast(d) into x · (1/d), which scales
    # some maxima to 0.99999994 (missing t = 1) and moves levels off their thresholds. The
    # barrier hides that the divisor is a broadcast.
    span = jax.lax.optimization_barrier(jnp.broadcast_to(jnp.where(hi > lo, hi - lo, 1), p.shape))
    s = (p - lo) / span
    bins = sum((s >= float(t)).astype(jnp.int32) for t in thresholds) - 1
    return bins.reshape(p.shape[0], -1), (hi > lo)[:, 0, 0], thresholds.size


def _histograms(bins: jax.Array, groups: list[jax.Array], n_bins: int) -> list[jax.Array]:
    """(B, n_bins) counts of ``bins`` over all pixels and over each boolean mask in
    ``groups``, from one scatter-add over a combined code (one pass over the pixels)."""
    b = bins.shape[0]
    code = bins
    for g, mask in enumerate(groups):
        code = code + mask.reshape(b, -1).astype(jnp.int32) * (n_bins << g)
    size = n_bins << len(groups)
    hist = jnp.zeros((b, size), jnp.int32).at[jnp.arange(b)[:, None], code].add(1)
    hist = hist.reshape(b, *([2] * len(groups)), n_bins)  # (B, [in g_last]..., [in g_0], bins)
    out = [hist.sum(axis=tuple(range(1, 1 + len(groups))))]
    for g in range(len(groups)):
        axis = len(groups) - g  # bit g of the code is axis ``len(groups) - g`` of ``hist``
        sel = jnp.take(hist, 1, axis=axis)
        out.append(sel.sum(axis=tuple(range(1, len(groups)))))
    return out


def _rate_at_or_above(counts: jax.Array, total: jax.Array) -> jax.Array:
    """Bin counts (..., T) → fraction at or above each threshold (reverse cumulative sum)."""
    return jnp.cumsum(counts[..., ::-1], axis=-1)[..., ::-1].astype(jnp.float32) / total


def _auc_from_rates(tp: jax.Array, fp: jax.Array) -> jax.Array:
    """Trapezoid AUC of the curve (0,0), thresholds from high to low, (1,1); inputs (..., T) in
    ascending-threshold order. Thresholds above the split's max give (0,0), adding no area,
    so one fixed grid 0:step:1 reproduces MATLAB's per-split grid 0:step:max."""
    zeros = jnp.zeros(tp.shape[:-1] + (1,), tp.dtype)
    ones = jnp.ones_like(zeros)
    x = jnp.concatenate([zeros, fp[..., ::-1], ones], axis=-1)
    y = jnp.concatenate([zeros, tp[..., ::-1], ones], axis=-1)
    return jnp.sum((x[..., 1:] - x[..., :-1]) * (y[..., 1:] + y[..., :-1]) / 2, axis=-1)


@functools.partial(jax.jit, static_argnames=("n_splits", "step_size"))
def _auc_borji(p: jax.Array, fix: jax.Array, keys: jax.Array, n_splits: int,
               step_size: float) -> jax.Array:
    bins, ok, n_t = _threshold_bins(p, step_size)
    every, fixated = _histograms(bins, [fix > 0], n_t)
    n_fix = fixated.sum(axis=1)
    n_pix = bins.shape[1]
    tp = _rate_at_or_above(fixated, n_fix[:, None])
    # Nf pixels drawn uniformly with replacement fall in the bins multinomially, each image
    # with its own key. Trials and probabilities come broadcast to (S,) and (S, T), not
    # through ``shape``, which means the whole result shape in JAX 0.10 and the shape without
    # the bins in 0.12.
    def draw(key, n, fractions):
        trials = jnp.broadcast_to(n.astype(jnp.float32), (n_splits,))
        probabilities = jnp.broadcast_to(fractions[None, :], (n_splits, n_t))
        return jax.random.multinomial(key, trials, probabilities, dtype=jnp.float32)

    draws = jax.vmap(draw)(keys, n_fix, every.astype(jnp.float32) / n_pix)
    fp = _rate_at_or_above(draws, n_fix[:, None, None])
    auc = _auc_from_rates(jnp.broadcast_to(tp[:, None, :], fp.shape), fp).mean(axis=1)
    return jnp.where((n_fix <= 1) | ~ok, jnp.nan, auc)


_DRAW_BLOCK = 32


def _draw_without_replacement(keys: jax.Array, counts: jax.Array, m: jax.Array,
                              n_splits: int) -> jax.Array:
    """(B, S, T) bin counts of m[b] items drawn without replacement from a population with
    ``counts[b]`` items per bin, for S independent splits: m sequential draws, each picking a
    uniformly random remaining item (random numbers made a block of draws at a time)."""
    b, n_t = counts.shape
    remaining = jnp.broadcast_to(counts[:, None, :], (b, n_splits, n_t)).astype(jnp.int32)
    n_blocks = (jnp.max(m) + _DRAW_BLOCK - 1) // _DRAW_BLOCK

    def block(state):
        i, remaining, chosen = state
        u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, i),
                                                  (_DRAW_BLOCK, n_splits)), out_axes=1)(keys)

        def draw(t, st):
            remaining, chosen = st
            total = remaining.sum(axis=-1)
            target = jnp.minimum(jnp.floor(u[t] * total.astype(jnp.float32)).astype(jnp.int32),
                                 total - 1)
            pick = jnp.sum(jnp.cumsum(remaining, axis=-1) <= target[..., None], axis=-1)
            live = (i * _DRAW_BLOCK + t < m)[:, None, None]
            hit = ((jnp.arange(n_t) == pick[..., None]) & live).astype(jnp.int32)
            return remaining - hit, chosen + hit

        remaining, chosen = jax.lax.fori_loop(0, _DRAW_BLOCK, draw, (remaining, chosen))
        return i + 1, remaining, chosen

    _, _, chosen = jax.lax.while_loop(lambda st: st[0] < n_blocks, block,
                                      (jnp.int32(0), remaining, jnp.zeros_like(remaining)))
    return chosen


@functools.partial(jax.jit, static_argnames=("n_splits", "step_size"))
def _auc_shuffled(p: jax.Array, fix: jax.Array, other: jax.Array, keys: jax.Array,
                  n_splits: int, step_size: float) -> jax.Array:
    bins, ok, n_t = _threshold_bins(p, step_size)
    _, fixated, others = _histograms(bins, [fix > 0, other > 0], n_t)
    n_fix = fixated.sum(axis=1)
    m = jnp.minimum(n_fix, others.sum(axis=1))
    tp = _rate_at_or_above(fixated, n_fix[:, None])
    chosen = _draw_without_replacement(keys, others, m, n_splits)
    fp = _rate_at_or_above(chosen, m[:, None, None])
    auc = _auc_from_rates(jnp.broadcast_to(tp[:, None, :], fp.shape), fp).mean(axis=1)
    return jnp.where((n_fix == 0) | (m == 0) | ~ok, jnp.nan, auc)


def batched_cc(preds: Any, gts: Any) -> jax.Array:
    """(B,) CC of each prediction with its continuous GT map; as :func:`cc`."""
    p, g = _stacks(preds, gts=gts)
    return _where_finite(p, _cc(p, g))


def batched_kld(preds: Any, gts: Any) -> jax.Array:
    """(B,) KLD(GT ‖ prediction); as :func:`kld`."""
    p, g = _stacks(preds, gts=gts)
    return _where_finite(p, _kld(p, g))


def batched_nss(preds: Any, fixation_maps: Any) -> jax.Array:
    """(B,) NSS at the fixated (> 0) pixels; as :func:`nss`."""
    p, f = _stacks(preds, fixation_maps=fixation_maps)
    return _where_finite(p, _nss(p, f))


def batched_sim(preds: Any, gts: Any) -> jax.Array:
    """(B,) SIM (histogram intersection); as :func:`sim`."""
    p, g = _stacks(preds, gts=gts)
    return _where_finite(p, _sim(p, g))


def _fixation_bound(fixation_maps: jax.Array, max_fixations: int | None) -> int:
    """Static bound on fixated pixels per map: given, or the batch's maximum rounded up to a
    power of two (so a new compilation is needed only when it doubles)."""
    n_pix = fixation_maps.shape[1] * fixation_maps.shape[2]
    if max_fixations is None:
        try:
            most = int(jnp.max(jnp.sum(fixation_maps > 0, axis=(1, 2))))
        except jax.errors.ConcretizationTypeError as e:
            raise ValueError("inside jit, pass max_fixations= (a static bound on the number "
                             "of fixated pixels per map)") from e
        max_fixations = 1 << max(most - 1, 0).bit_length()
    return int(min(max(max_fixations, 16), n_pix))


def batched_auc_judd(preds: Any, fixation_maps: Any, key: Any = 0, *,
                     max_fixations: int | None = None) -> jax.Array:
    """(B,) AUC-Judd; ``key`` is an int seed, a ``jax.random`` key, or (B,) keys, one per image.

    Sort-free rank formulation (sorting every pixel is slow outside GPUs): with MATLAB's
    thresholds each non-fixated pixel is credited min((2·#fixated above it + 1) / (2·Nf), 1),
    the AUC being the mean credit. "Above" compares values with MATLAB's jitter (a per-pixel
    pseudo-random key drawn from ``key``, times 1e-7 / 2**32, added in float32: it reorders
    values closer than 1e-7, as MATLAB's does; near 1, float32 rounds it), and what is still
    exactly tied by that key (a uniformly random order of tied pixels). Counting uses the sorted
    fixated values (at most ``max_fixations``: by default the batch's largest count, read back
    to the host, rounded up to a power of two; pass it explicitly inside ``jit``). Equals
    :func:`auc_judd` on maps whose values differ by more than 1e-7; in distribution otherwise.
    NaN with no fixated or no non-fixated pixel, or more fixated pixels than
    ``max_fixations``; a constant map is ranked at random (mean (Nf/2 + 1)/(Nf + 1)).
    """
    p, f = _stacks(preds, fixation_maps=fixation_maps)
    if not p.shape[0]:
        return jnp.zeros((0,), jnp.float32)
    k = _fixation_bound(f, max_fixations)
    return _where_finite(p, _auc_judd(p, f, _keys(key, p.shape[0]), k=k,
                                      n_buckets=max(1024, 4 * k)))


def batched_auc_borji(preds: Any, fixation_maps: Any, key: Any = 0, *, n_splits: int = 100,
                      step_size: float = 0.1) -> jax.Array:
    """(B,) AUC-Borji; ``key`` is an int seed, a ``jax.random`` key, or (B,) keys, one per
    image.

    Fixed-size: only how many negatives land at or above each threshold matters, so each split
    draws the per-bin counts of Nf uniform pixels (multinomial over the bins' pixel fractions),
    the same distribution as :func:`auc_borji`'s draws. NaN with ≤ 1 fixated pixel or a
    constant map.
    """
    p, f = _stacks(preds, fixation_maps=fixation_maps)
    if not p.shape[0]:  # the splits' reshapes would divide by zero
        return jnp.zeros((0,), jnp.float32)
    return _where_finite(p, _auc_borji(p, f, _keys(key, p.shape[0]), n_splits=int(n_splits),
                                       step_size=float(step_size)))


def batched_auc_shuffled(preds: Any, fixation_maps: Any, other_fixation_maps: Any,
                         key: Any = 0, *, n_splits: int = 100,
                         step_size: float = 0.1) -> jax.Array:
    """(B,) shuffled AUC; ``key`` is an int seed, a ``jax.random`` key, or (B,) keys, one per
    image.

    Per split, m = min(Nf, N_other) of the pixels > 0 of ``other_fixation_maps`` are drawn
    without replacement (as :func:`auc_shuffled`), tracked as per-threshold-bin counts in a loop
    of max(m) steps. NaN with no fixated pixel, no other-fixated pixel or a constant map.
    """
    p, f, other = _stacks(preds, fixation_maps=fixation_maps,
                          other_fixation_maps=other_fixation_maps)
    if not p.shape[0]:
        return jnp.zeros((0,), jnp.float32)
    return _where_finite(p, _auc_shuffled(p, f, other, _keys(key, p.shape[0]),
                                          n_splits=int(n_splits), step_size=float(step_size)))
