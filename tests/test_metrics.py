"""Saliency metrics: MIT-benchmark semantics, batched JAX == single image, degenerate inputs.

The reference functions below are an independent transcription of the MATLAB files of the MIT
saliency benchmark (``code_forMetrics``: CC.m, KLdiv.m, NSS.m, similarity.m, AUC_Judd.m,
AUC_Borji.m, AUC_shuffled.m, InfoGain.m), written as plain loops over pixel lists with Python's
own ``random`` module, so they share no code and no random stream with ``mlnet_jax.metrics``.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from mlnet_jax import metrics as M
from mlnet_jax.resize import resize_bilinear

MATLAB_EPS = 2.2204e-16


# ------------------------------------------------------------------------------------------
# Independent reference (loops, as the MATLAB code reads)
# ------------------------------------------------------------------------------------------

def _flat(a) -> list[float]:
    return [float(v) for v in np.asarray(a, dtype=np.float64).ravel()]


def _mean(xs):
    return math.fsum(xs) / len(xs)


def _std(xs):  # MATLAB std: N - 1
    m = _mean(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _normalize_range(xs):
    lo, hi = min(xs), max(xs)
    return [(x - lo) / (hi - lo) for x in xs]


def _trapz(x, y):
    return math.fsum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(len(x) - 1))


def ref_cc(s, g):
    a, b = _flat(s), _flat(g)
    ma, sa, mb, sb = _mean(a), _std(a), _mean(b), _std(b)
    za = [(x - ma) / sa for x in a]
    zb = [(x - mb) / sb for x in b]
    # corr2(zb, za)
    mza, mzb = _mean(za), _mean(zb)
    num = math.fsum((x - mza) * (y - mzb) for x, y in zip(za, zb))
    den = math.sqrt(math.fsum((x - mza) ** 2 for x in za) * math.fsum((y - mzb) ** 2 for y in zb))
    return num / den


def ref_kld(s, g):
    m1, m2 = _flat(s), _flat(g)
    if any(v != 0 for v in m1):
        t = math.fsum(m1)
        m1 = [v / t for v in m1]
    if any(v != 0 for v in m2):
        t = math.fsum(m2)
        m2 = [v / t for v in m2]
    return math.fsum(q * math.log(MATLAB_EPS + q / (p + MATLAB_EPS)) for p, q in zip(m1, m2))


def ref_nss(s, f):
    m = _flat(s)
    mu, sd = _mean(m), _std(m)
    vals = [(v - mu) / sd for v, fx in zip(m, _flat(f)) if fx != 0]
    return _mean(vals)


def ref_sim(s, g):
    maps = []
    for m in (_flat(s), _flat(g)):
        if any(v != 0 for v in m):
            m = _normalize_range(m)
            t = math.fsum(m)
            m = [v / t for v in m]
        maps.append(m)
    return math.fsum(min(p, q) for p, q in zip(*maps))


def ref_auc_judd(s, f, jitter_values=None):
    S = _flat(s)
    if jitter_values is not None:
        S = [v + j for v, j in zip(S, _flat(jitter_values))]
    S = _normalize_range(S)
    F = _flat(f)
    sth = [v for v, fx in zip(S, F) if fx > 0]
    nfix, npix = len(sth), len(S)
    threshes = sorted(sth, reverse=True)
    tp, fp = [0.0], [0.0]
    for i in range(1, nfix + 1):
        thresh = threshes[i - 1]
        aboveth = sum(1 for v in S if v >= thresh)
        tp.append(i / nfix)
        fp.append((aboveth - i) / (npix - nfix))
    tp.append(1.0)
    fp.append(1.0)
    return _trapz(fp, tp)


def _ref_split(sth, curfix, step):
    top = max(sth + curfix)
    threshes = [k * step for k in range(int(math.floor(top / step + 1e-9)) + 1)][::-1]
    tp, fp = [0.0], [0.0]
    for t in threshes:
        tp.append(sum(1 for v in sth if v >= t) / len(sth))
        fp.append(sum(1 for v in curfix if v >= t) / len(curfix))
    tp.append(1.0)
    fp.append(1.0)
    return _trapz(fp, tp)


def ref_auc_borji(s, f, seed, n_splits=100, step=0.1):
    S = _normalize_range(_flat(s))
    sth = [v for v, fx in zip(S, _flat(f)) if fx > 0]
    rnd = random.Random(seed)
    aucs = []
    for _ in range(n_splits):
        curfix = [S[rnd.randrange(len(S))] for _ in range(len(sth))]
        aucs.append(_ref_split(sth, curfix, step))
    return _mean(aucs)


def ref_auc_shuffled(s, f, other, seed, n_splits=100, step=0.1):
    S = _normalize_range(_flat(s))
    sth = [v for v, fx in zip(S, _flat(f)) if fx > 0]
    ind = [i for i, o in enumerate(_flat(other)) if o > 0]
    n_oth = min(len(sth), len(ind))
    rnd = random.Random(seed)
    aucs = []
    for _ in range(n_splits):
        curfix = [S[i] for i in rnd.sample(ind, n_oth)]
        aucs.append(_ref_split(sth, curfix, step))
    return _mean(aucs)


def ref_info_gain(s, f, b):
    m1 = _normalize_range(_flat(s))
    mb = _normalize_range(_flat(b))
    t1, tb = math.fsum(m1), math.fsum(mb)
    m1 = [v / t1 for v in m1]
    mb = [v / tb for v in mb]
    vals = [math.log2(MATLAB_EPS + p) - math.log2(MATLAB_EPS + q)
            for p, q, fx in zip(m1, mb, _flat(f)) if fx != 0]
    return _mean(vals)


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------

H, W = 16, 20


def _blobs(rng, h=H, w=W, n=3):
    """A smooth positive map (sum of Gaussians), like a saliency prediction."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((h, w))
    for _ in range(n):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        sg = rng.uniform(1.5, 5)
        out += rng.uniform(0.3, 1) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sg ** 2))
    return out + 0.01 * rng.random((h, w))


def _case(seed, h=H, w=W, n_fix=25, n_other=60):
    rng = np.random.default_rng(seed)
    pred = _blobs(rng, h, w)
    gt = _blobs(rng, h, w)
    gt[gt < 0.2 * gt.max()] = 0  # exact zeros, as in real fixation density maps
    fix = np.zeros(h * w)
    fix[rng.choice(h * w, n_fix, replace=False, p=(gt.ravel() + 1e-3) / (gt + 1e-3).sum())] = 1
    other = np.zeros(h * w)
    other[rng.choice(h * w, n_other, replace=False)] = 1
    return pred, gt, fix.reshape(h, w), other.reshape(h, w)


CASES = [_case(s) for s in range(4)]


def _expected_split_auc(s, fix, negatives_mask, step=0.1):
    """E[AUC-Borji/sAUC]: the split AUC is linear in the negatives' fp rates, so its mean is
    the AUC at the expected rates (fraction of candidate pixels >= each threshold)."""
    sc = (s - s.min()) / (s.max() - s.min())
    th = M.matlab_colon(0.0, step, 1.0)[::-1]
    sth, neg = sc[fix > 0], sc[negatives_mask]
    tp = [0.0] + [float(np.mean(sth >= t)) for t in th] + [1.0]
    fp = [0.0] + [float(np.mean(neg >= t)) for t in th] + [1.0]
    return _trapz(fp, tp)


# ------------------------------------------------------------------------------------------
# Independent reference vs implementation
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("i", range(len(CASES)))
def test_deterministic_metrics_match_matlab_transcription(i):
    pred, gt, fix, _ = CASES[i]
    baseline = _blobs(np.random.default_rng(100 + i))
    for ours, ref in [(M.cc(pred, gt), ref_cc(pred, gt)), (M.kld(pred, gt), ref_kld(pred, gt)),
                      (M.nss(pred, fix), ref_nss(pred, fix)), (M.sim(pred, gt), ref_sim(pred, gt)),
                      (M.info_gain(pred, fix, baseline), ref_info_gain(pred, fix, baseline))]:
        assert ours == pytest.approx(ref, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("i", range(len(CASES)))
def test_auc_judd_matches_matlab_transcription(i):
    pred, _, fix, _ = CASES[i]
    # Without jitter the metric is deterministic: exact agreement.
    assert M.auc_judd(pred, fix, jitter=False) == pytest.approx(ref_auc_judd(pred, fix), abs=1e-12)
    # With jitter: the documented jitter is default_rng(seed).random(shape) * 1e-7.
    jit = np.random.default_rng(7).random(pred.shape) * 1e-7
    assert M.auc_judd(pred, fix, seed=7) == pytest.approx(ref_auc_judd(pred, fix, jit), abs=1e-12)


def test_auc_judd_with_ties_matches_transcription_in_spread():
    # Quantised map with a large flat zero region: jitter decides the order of the ties.
    pred, _, fix, _ = CASES[0]
    q = np.floor(pred / pred.max() * 4)
    ours = [M.auc_judd(q, fix, seed=s) for s in range(20)]
    refs = [ref_auc_judd(q, fix, np.random.default_rng(1000 + s).random(q.shape) * 1e-7)
            for s in range(20)]
    spread = np.std(refs) + np.std(ours)
    assert spread > 0  # ties really are broken at random
    assert abs(np.mean(ours) - np.mean(refs)) < 3 * spread / math.sqrt(20) + 1e-9


@pytest.mark.parametrize("i", [0, 1])
def test_auc_borji_matches_transcription_within_split_spread(i):
    pred, _, fix, _ = CASES[i]
    ours = np.array([M.auc_borji(pred, fix, seed=s) for s in range(12)])
    refs = np.array([ref_auc_borji(pred, fix, seed=s) for s in range(12)])
    sd = math.sqrt((ours.var(ddof=1) + refs.var(ddof=1)) / 12)
    assert 0 < refs.std()  # random splits really vary
    assert abs(ours.mean() - refs.mean()) < 4 * sd
    # Both agree with the exact expectation (linearity in the negatives' rates).
    expected = _expected_split_auc(pred, fix, np.ones_like(fix, bool))
    assert abs(ours.mean() - expected) < 4 * ours.std(ddof=1) / math.sqrt(12) + 1e-9
    assert abs(refs.mean() - expected) < 4 * refs.std(ddof=1) / math.sqrt(12) + 1e-9


@pytest.mark.parametrize("i", [0, 1])
def test_auc_shuffled_matches_transcription_within_split_spread(i):
    pred, _, fix, other = CASES[i]
    ours = np.array([M.auc_shuffled(pred, fix, other, seed=s) for s in range(12)])
    refs = np.array([ref_auc_shuffled(pred, fix, other, seed=s) for s in range(12)])
    sd = math.sqrt((ours.var(ddof=1) + refs.var(ddof=1)) / 12)
    assert 0 < refs.std()
    assert abs(ours.mean() - refs.mean()) < 4 * sd
    expected = _expected_split_auc(pred, fix, other > 0)
    assert abs(ours.mean() - expected) < 4 * ours.std(ddof=1) / math.sqrt(12) + 1e-9


def test_auc_borji_many_splits_converges_to_expectation():
    pred, _, fix, other = CASES[2]
    expected = _expected_split_auc(pred, fix, np.ones_like(fix, bool))
    assert M.auc_borji(pred, fix, n_splits=4000, seed=3) == pytest.approx(expected, abs=2e-3)
    expected_s = _expected_split_auc(pred, fix, other > 0)
    assert M.auc_shuffled(pred, fix, other, n_splits=4000, seed=3) == pytest.approx(expected_s,
                                                                                  abs=2e-3)
    assert abs(expected - expected_s) > 5e-3  # the two metrics really use different negatives


# ------------------------------------------------------------------------------------------
# Hand-computed values
# ------------------------------------------------------------------------------------------

def test_hand_computed_values():
    p = np.array([[1.0, 2.0], [3.0, 4.0]])
    # CC with g = [[0,0],[0,1]]: p - 2.5 = [-1.5,-.5,.5,1.5], g - .25 = [-.25,-.25,-.25,.75];
    # Σ products = .375+.125-.125+1.125 = 1.5; Σp² = 5, Σg² = .75 → 1.5/sqrt(3.75).
    assert M.cc(p, [[0, 0], [0, 1]]) == pytest.approx(1.5 / math.sqrt(3.75), rel=1e-12)
    # NSS, fixation on the 4: std(N-1) of 1..4 = sqrt(5/3); (4 - 2.5)/sqrt(5/3).
    assert M.nss(p, [[0, 0], [0, 1]]) == pytest.approx(1.5 / math.sqrt(5 / 3), rel=1e-12)
    # ... fixations on the 1 and the 4: z-scores -1.5/sd and +1.5/sd average to 0.
    assert M.nss(p, [[1, 0], [0, 1]]) == pytest.approx(0.0, abs=1e-12)
    # KLD: uniform prediction (.25 each) vs GT [[.5,0],[0,.5]]: 2 · .5·log(.5/.25) = log 2.
    assert M.kld(np.ones((2, 2)), [[1, 0], [0, 1]]) == pytest.approx(math.log(2), rel=1e-12)
    # SIM: [[0,1],[2,3]] → [0,1/3,2/3,1]/2 = [0,1/6,1/3,1/2]; GT [[1,0],[0,1]] → [.5,0,0,.5];
    # Σ min = 0 + 0 + 0 + .5.
    assert M.sim([[0, 1], [2, 3]], [[1, 0], [0, 1]]) == pytest.approx(0.5, rel=1e-12)
    # AUC-Judd, map [[4,3],[2,1]], fixation on the 3 (Nf=1, 3 negatives): threshold = the 3's
    # value, 2 pixels >= it → tp=1, fp=(2-1)/3; curve (0,0),(1/3,1),(1,1):
    # area 1/3·(0+1)/2 + 2/3·(1+1)/2 = 1/6 + 2/3 = 5/6.
    assert M.auc_judd([[4, 3], [2, 1]], [[0, 1], [0, 0]], jitter=False) == pytest.approx(5 / 6)
    assert M.auc_judd([[4, 3], [2, 1]], [[0, 1], [0, 0]], seed=5) == pytest.approx(5 / 6, abs=1e-6)
    # sAUC, map [[0,.25],[.5,1]] (already [0,1]), fixations on .5 and 1, other fixations on
    # .25 and 1 (m = min(2,2) = 2: every split takes both, so it is deterministic).
    # Thresholds 1..0.6: tp=.5, fp=.5; 0.5..0.3: tp=1, fp=.5; 0.2, 0.1, 0: tp=1, fp=1.
    # Curve (0,0),(.5,.5),(.5,1),(1,1): .5·.5/2 + 0 + .5·1 = .625.
    s = np.array([[0.0, 0.25], [0.5, 1.0]])
    fx = np.array([[0, 0], [1, 1]])
    oth = np.array([[0, 1], [0, 1]])
    assert M.auc_shuffled(s, fx, oth, seed=1) == pytest.approx(0.625, abs=1e-12)
    assert float(M.batched_auc_shuffled(s[None], fx[None], oth[None], 1)[0]) == pytest.approx(0.625)
    # Negatives above every fixated value: the thresholds run up to the negatives' maximum
    # too (stopping at the fixations' would skip the points where only negatives pass).
    s = np.array([[0.0, 0.3], [0.35, 1.0]])
    fx, oth = np.array([[0, 1], [1, 0]]), np.array([[1, 0], [0, 1]])
    want = _ref_split([0.3, 0.35], [0.0, 1.0], 0.1)
    assert M.auc_shuffled(s, fx, oth, seed=1) == pytest.approx(want, abs=1e-12)
    assert float(M.batched_auc_shuffled(s[None], fx[None], oth[None], 1)[0]) == pytest.approx(want)
    # AUC-Borji, map [[1,1],[0,0]] with both 1s fixated: a split whose 2 random pixels contain
    # a fraction q of 1s has curve (0,0),(q,1),(1,1), area 1 - q/2; E[q] = 1/2 → 0.75.
    assert M.auc_borji([[1, 1], [0, 0]], [[1, 1], [0, 0]], n_splits=20000) == pytest.approx(
        0.75, abs=0.005)
    # IG, saliency [[0,1],[2,3]] → [0,1/6,1/3,1/2], baseline [[3,2],[1,0]] → [1/2,1/3,1/6,0];
    # fixation at (0,1): log2(1/6) - log2(1/3) = -1.
    assert M.info_gain([[0, 1], [2, 3]], [[0, 1], [0, 0]], [[3, 2], [1, 0]]) == pytest.approx(
        -1.0, rel=1e-9)


def test_matlab_colon_endpoints():
    # MATLAB: (0:0.1:1)(7) == 0.6 is true (built as 1 - 4*0.1), while 6*0.1 is one ulp above;
    # 0:0.1:0.3 ends exactly at 0.3; (0:0.1:0.3)(3) = 0.3 - 0.1 = 0.19999999999999998.
    v = M.matlab_colon(0.0, 0.1, 1.0)
    assert len(v) == 11 and v[6] == 0.6 and v[3] == 3 * 0.1 and v[-1] == 1.0
    assert M.matlab_colon(0.0, 0.1, 0.3).tolist() == [0.0, 0.1, 0.3 - 0.1, 0.3]
    assert len(M.matlab_colon(0.0, 0.1, 0.95)) == 10
    # The difference matters for maps from 8-bit files: 153/255 == 0.6 is counted at t = 0.6.
    s = np.array([[0.0, 153.0], [255.0, 10.0]]) / 255
    fx = np.array([[0, 1], [1, 0]])
    oth = np.array([[1, 0], [0, 1]])
    # Thresholds 1: tp=.5, fp=0; .9-.6 (0.6 included): tp=1, fp=0; so AUC = 1.
    assert M.auc_shuffled(s, fx, oth) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------
# Identities and invariances
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("i", range(len(CASES)))
def test_identities(i):
    pred, gt, fix, other = CASES[i]
    assert M.cc(pred, pred) == pytest.approx(1.0, abs=1e-12)
    assert M.sim(gt, gt) == pytest.approx(1.0, abs=1e-12)
    assert abs(M.kld(gt, gt)) < 1e-12
    assert M.kld(pred, gt) > 0.01 and M.sim(pred, gt) < 0.99 and M.cc(pred, gt) < 0.99
    # A map equal to the fixations ranks them all first.
    assert M.auc_judd(fix, fix) == pytest.approx(1.0, abs=1e-12)
    disjoint = other * (fix == 0)
    assert M.auc_shuffled(fix, fix, disjoint) == pytest.approx(1.0, abs=1e-12)
    # Borji's negatives may land on fixations (prob Nf/N each): E[AUC] = 1 - Nf/(2N).
    nf, n = fix.sum(), fix.size
    assert M.auc_borji(fix, fix, n_splits=2000) == pytest.approx(1 - nf / (2 * n), abs=3e-3)
    # NSS of the binary fixation map itself: (1 - k/N) / sqrt(k(N-k)/(N(N-1)))
    # = sqrt((N-k)(N-1)/(N k)).
    assert M.nss(fix, fix) == pytest.approx(math.sqrt((n - nf) * (n - 1) / (n * nf)), rel=1e-12)


@pytest.mark.parametrize("i", [0, 3])
def test_affine_invariance(i):
    pred, gt, fix, other = CASES[i]
    moved = 3.7 * pred + 2.5
    assert M.cc(moved, gt) == pytest.approx(M.cc(pred, gt), rel=1e-10)
    assert M.nss(moved, fix) == pytest.approx(M.nss(pred, fix), rel=1e-10)
    assert M.auc_judd(moved, fix, jitter=False) == pytest.approx(
        M.auc_judd(pred, fix, jitter=False), abs=1e-12)
    assert M.auc_judd(moved, fix) == pytest.approx(M.auc_judd(pred, fix), abs=1e-6)
    assert M.auc_borji(moved, fix, seed=4) == pytest.approx(M.auc_borji(pred, fix, seed=4),
                                                            abs=1e-12)
    assert M.auc_shuffled(moved, fix, other, seed=4) == pytest.approx(
        M.auc_shuffled(pred, fix, other, seed=4), abs=1e-12)
    # ... and not invariant to a non-affine (but monotone) change for CC/NSS:
    assert M.cc(pred ** 3, gt) != pytest.approx(M.cc(pred, gt), rel=1e-3)


def test_random_metrics_are_reproducible_and_seeded():
    pred, _, fix, other = CASES[1]
    assert M.auc_borji(pred, fix, seed=11) == M.auc_borji(pred, fix, seed=11)
    assert M.auc_borji(pred, fix, seed=11) != M.auc_borji(pred, fix, seed=12)
    assert M.auc_shuffled(pred, fix, other, seed=11) == M.auc_shuffled(pred, fix, other, seed=11)
    assert M.auc_shuffled(pred, fix, other, seed=11) != M.auc_shuffled(pred, fix, other, seed=12)
    q = np.round(pred * 2)  # ties
    assert M.auc_judd(q, fix, seed=11) == M.auc_judd(q, fix, seed=11)
    assert np.array_equal(M.batched_auc_borji(PREDS, FIXS, 3), M.batched_auc_borji(PREDS, FIXS, 3))
    assert not np.array_equal(M.batched_auc_borji(PREDS, FIXS, 3),
                              M.batched_auc_borji(PREDS, FIXS, 4))


def test_prediction_is_resized_to_ground_truth():
    pred, gt, fix, other = CASES[0]
    small = pred[::2, ::2]
    big = resize_bilinear(small, gt.shape)
    assert M.cc(small, gt) == M.cc(big, gt)
    assert M.kld(small, gt) == M.kld(big, gt)
    assert M.nss(small, fix) == M.nss(big, fix)
    assert M.sim(small, gt) == M.sim(big, gt)
    assert M.auc_judd(small, fix) == M.auc_judd(big, fix)
    assert M.auc_borji(small, fix) == M.auc_borji(big, fix)
    assert M.auc_shuffled(small, fix, other) == M.auc_shuffled(big, fix, other)
    assert M.cc(small, gt) != pytest.approx(M.cc(pred, gt), rel=1e-6)


# ------------------------------------------------------------------------------------------
# Degenerate inputs
# ------------------------------------------------------------------------------------------

def _degenerate_maps():
    """CASES[0] plus a constant map, an all-zero map and a single fixation."""
    pred, gt, fix, other = CASES[0]
    one_fix = np.zeros((H, W))
    one_fix[3, 4] = 1
    return pred, gt, fix, other, np.full((H, W), 0.3), np.zeros((H, W)), one_fix


def test_degenerate_inputs_single():
    pred, gt, fix, other, const, zeros, one_fix = _degenerate_maps()
    nan = math.isnan
    assert nan(M.cc(const, gt)) and nan(M.cc(pred, const))
    assert nan(M.nss(const, fix)) and nan(M.nss(pred, zeros))
    assert nan(M.sim(const, gt)) and M.sim(zeros, gt) == 0.0 and M.sim(pred, zeros) == 0.0
    assert M.kld(pred, zeros) == 0.0
    g = gt / gt.sum()
    assert M.kld(zeros, gt) == pytest.approx(float(np.sum(g * np.log(MATLAB_EPS + g / MATLAB_EPS))))
    assert math.isfinite(M.kld(zeros, gt))
    assert nan(M.auc_judd(pred, zeros)) and nan(M.auc_judd(const, fix, jitter=False))
    assert nan(M.auc_judd(pred, np.ones((H, W))))  # no negatives
    # Constant map with jitter: ranked at random, expected (Nf/2 + 1)/(Nf + 1).
    nf = fix.sum()
    judd_const = np.mean([M.auc_judd(const, fix, seed=s) for s in range(40)])
    assert judd_const == pytest.approx((nf / 2 + 1) / (nf + 1), abs=0.03)
    assert nan(M.auc_borji(pred, zeros)) and nan(M.auc_borji(pred, one_fix))
    assert nan(M.auc_borji(const, fix))
    assert nan(M.auc_shuffled(pred, zeros, other)) and nan(M.auc_shuffled(pred, fix, zeros))
    assert nan(M.auc_shuffled(const, fix, other))
    assert not nan(M.auc_shuffled(pred, one_fix, other))  # one fixation is enough for sAUC
    assert nan(M.info_gain(pred, zeros, gt)) and nan(M.info_gain(pred, fix, const))
    assert nan(M.info_gain(const, fix, gt))
    with pytest.raises(ValueError):
        M.cc(pred[None], gt)
    # An empty map is named (numpy's zero-size reduction, an IndexError or a ZeroDivisionError).
    for name in ("cc", "kld", "nss", "sim", "auc_judd", "auc_borji"):
        for p_shape, g_shape, which in (((0, 0), (4, 4), "saliency"),
                                        ((4, 4), (0, 5), "ground_truth|fixation_map")):
            with pytest.raises(ValueError, match=f"({which}) must be a non-empty 2-D map"):
                getattr(M, name)(np.ones(p_shape), np.ones(g_shape))
    with pytest.raises(ValueError, match=r"preds must be \(B, H, W\) with H, W > 0"):
        M.batched_cc(np.ones((2, 0, 3)), np.ones((2, 0, 3)))


def test_degenerate_inputs_batched():
    pred, gt, fix, other, const, zeros, one_fix = _degenerate_maps()
    p = np.stack([pred, const, pred, zeros])
    g = np.stack([gt, gt, zeros, gt])
    f = np.stack([fix, fix, zeros, fix])
    o = np.stack([other, other, other, zeros])
    cc = np.asarray(M.batched_cc(p, g))
    assert not np.isnan(cc[0]) and np.isnan(cc[1:]).all()
    nss = np.asarray(M.batched_nss(p, f))
    assert not np.isnan(nss[0]) and np.isnan(nss[1:]).all()
    sim = np.asarray(M.batched_sim(p, g))
    assert np.isnan(sim[1]) and sim[2] == 0.0 and sim[3] == 0.0
    # At sizes where XLA:CPU fuses the minimum into the sum (which drops NaN), too.
    smooth = np.random.default_rng(0).random((2, 100, 100)).astype(np.float32)
    flat = np.full((2, 100, 100), 0.5, np.float32)
    assert np.isnan(np.asarray(M.batched_sim(flat, smooth))).all()
    assert np.isnan(np.asarray(M.batched_sim(smooth, flat))).all()
    kld = np.asarray(M.batched_kld(p, g))
    assert kld[2] == 0.0
    gn = gt / gt.sum()
    assert kld[3] == pytest.approx(float(np.sum(gn * np.log(MATLAB_EPS + gn / MATLAB_EPS))),
                                   rel=1e-5)
    judd = np.asarray(M.batched_auc_judd(p, np.stack([fix, fix, zeros, np.ones((H, W))])))
    assert not np.isnan(judd[0]) and 0.3 < judd[1] < 0.8
    assert np.isnan(judd[2]) and np.isnan(judd[3])  # no fixation; no non-fixated pixel
    borji = np.asarray(M.batched_auc_borji(np.stack([pred, const, pred, pred]),
                                           np.stack([fix, fix, zeros, one_fix])))
    assert not np.isnan(borji[0]) and np.isnan(borji[1:]).all()
    sauc = np.asarray(M.batched_auc_shuffled(p, f, o))
    assert not np.isnan(sauc[0]) and np.isnan(sauc[1:]).all()


# ------------------------------------------------------------------------------------------
# Batched JAX == single image
# ------------------------------------------------------------------------------------------

PREDS = np.stack([c[0] for c in CASES])
GTS = np.stack([c[1] for c in CASES])
FIXS = np.stack([c[2] for c in CASES])
OTHERS = np.stack([c[3] for c in CASES])


@pytest.mark.parametrize("name", ["cc", "kld", "sim", "nss"])
def test_batched_deterministic_equals_single(name):
    target = FIXS if name == "nss" else GTS
    batched = np.asarray(getattr(M, "batched_" + name)(PREDS, target))
    single = np.array([getattr(M, name)(p, t) for p, t in zip(PREDS, target)])
    assert batched.shape == (len(CASES),)
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-6)


def test_batched_auc_judd_equals_single():
    # Tie-free maps: the order is fixed, so the two formulations must agree closely.
    batched = np.asarray(M.batched_auc_judd(PREDS, FIXS, 0))
    single = np.array([M.auc_judd(p, f, jitter=False) for p, f in zip(PREDS, FIXS)])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    # Tied maps: random tie order; the means across seeds agree within their spread.
    tied = np.floor(PREDS / PREDS.max(axis=(1, 2), keepdims=True) * 3)
    b = np.array([np.asarray(M.batched_auc_judd(tied, FIXS, s)) for s in range(20)])
    s = np.array([[M.auc_judd(t, f, seed=k) for t, f in zip(tied, FIXS)] for k in range(20)])
    spread = np.sqrt((b.var(0, ddof=1) + s.var(0, ddof=1)) / 20)
    assert (spread > 0).all()
    assert (np.abs(b.mean(0) - s.mean(0)) < 4 * spread).all()


def test_batched_auc_judd_jitters_near_ties_as_matlab():
    # A narrow Gaussian's far tails differ by less than MATLAB's 1e-7 jitter, which shuffles
    # them; ordering them exactly (only exact ties at random) scored 0.589 against 0.546.
    yy, xx = np.mgrid[:48, :64]
    pred = np.exp(-((yy - 24) ** 2 + (xx - 32) ** 2) / 18.0).astype(np.float32)
    fix = np.zeros((48, 64))
    fix.flat[np.random.default_rng(6).integers(0, pred.size, 40)] = 1
    n = 32
    ours = np.asarray(M.batched_auc_judd(np.repeat(pred[None], n, 0), np.repeat(fix[None], n, 0),
                                         0))
    refs = np.array([ref_auc_judd(pred.astype(np.float64), fix,
                                  np.random.default_rng(s).random(pred.shape) * 1e-7)
                     for s in range(n)])
    spread = math.sqrt((ours.var(ddof=1) + refs.var(ddof=1)) / n)
    assert refs.std() > 0.01 and ours.std() > 0.01  # the tails really are shuffled
    assert abs(ours.mean() - refs.mean()) < 4 * spread


def test_batched_auc_judd_constant_map_and_fixation_bound():
    import jax
    const = np.full(PREDS.shape, 0.3)
    nf = FIXS.sum(axis=(1, 2))
    vals = np.array([np.asarray(M.batched_auc_judd(const, FIXS, s)) for s in range(10)])
    assert (vals.std(axis=0) > 0).all()  # tie order really is random
    # 40 draws in all (4 maps × 10 seeds) around the expected (Nf/2 + 1)/(Nf + 1).
    assert (vals - (nf / 2 + 1) / (nf + 1)).mean() == pytest.approx(0.0, abs=0.03)
    # An explicit bound gives the same numbers and works under jit; too small a bound is NaN.
    default = np.asarray(M.batched_auc_judd(PREDS, FIXS, 2))
    explicit = jax.jit(lambda p, f: M.batched_auc_judd(p, f, 2, max_fixations=64))(PREDS, FIXS)
    np.testing.assert_array_equal(default, np.asarray(explicit))
    assert np.isnan(np.asarray(M.batched_auc_judd(PREDS, FIXS, 2, max_fixations=16))).all()
    # The default bound (the largest count rounded up to a power of two) must hold a batch
    # whose largest count is just past a power of two: rounding 17, 33, 65 down to 16, 32, 64
    # would score NaN instead of the single-image AUC-Judd.
    for n_fix in (17, 33, 65):
        cases = [_case(n_fix, n_fix=n_fix), _case(n_fix + 1, n_fix=n_fix - 8)]
        p, f = np.stack([c[0] for c in cases]), np.stack([c[2] for c in cases])
        single = [M.auc_judd(a, b, jitter=False) for a, b in zip(p, f)]
        np.testing.assert_allclose(np.asarray(M.batched_auc_judd(p, f, 0)), single, atol=1e-5,
                                   err_msg=f"largest count {n_fix}")


def test_batched_auc_borji_and_shuffled_equal_single_in_distribution():
    n = 10
    b = np.array([np.asarray(M.batched_auc_borji(PREDS, FIXS, k)) for k in range(n)])
    s = np.array([[M.auc_borji(p, f, seed=k) for p, f in zip(PREDS, FIXS)] for k in range(n)])
    spread = np.sqrt((b.var(0, ddof=1) + s.var(0, ddof=1)) / n)
    assert (spread > 0).all()
    assert (np.abs(b.mean(0) - s.mean(0)) < 4.5 * spread).all()
    # Same spread across seeds, too (the batched draw is not, e.g., a single split).
    assert (b.std(0) < 3 * s.std(0)).all() and (s.std(0) < 3 * b.std(0)).all()

    b = np.array([np.asarray(M.batched_auc_shuffled(PREDS, FIXS, OTHERS, k)) for k in range(n)])
    s = np.array([[M.auc_shuffled(p, f, o, seed=k) for p, f, o in zip(PREDS, FIXS, OTHERS)]
                  for k in range(n)])
    spread = np.sqrt((b.var(0, ddof=1) + s.var(0, ddof=1)) / n)
    assert (spread > 0).all()
    assert (np.abs(b.mean(0) - s.mean(0)) < 4.5 * spread).all()
    assert (b.std(0) < 3 * s.std(0)).all() and (s.std(0) < 3 * b.std(0)).all()


def test_batched_auc_shuffled_with_fewer_other_fixations_equals_single():
    # With fewer other-image fixations than own, every split takes all of them (m = N_other):
    # no randomness is left, so the batched score must equal the single-image one exactly.
    # Drawing m = Nf instead would draw past the exhausted pool and divide by the wrong count.
    cases = [_case(s, n_fix=60, n_other=20) for s in range(2)]
    p, f, o = (np.stack([c[i] for c in cases]) for i in (0, 2, 3))
    single = np.array([M.auc_shuffled(*c, seed=0) for c in zip(p, f, o)])
    np.testing.assert_allclose(np.asarray(M.batched_auc_shuffled(p, f, o, 3)), single,
                               atol=1e-5)


def test_batched_random_metrics_converge_to_expectation():
    # 40 seeds × 100 splits = 4000 splits per map.
    b = np.mean([np.asarray(M.batched_auc_borji(PREDS, FIXS, s)) for s in range(40)], axis=0)
    e = [_expected_split_auc(p, f, np.ones_like(f, bool)) for p, f in zip(PREDS, FIXS)]
    np.testing.assert_allclose(b, e, atol=2e-3)
    b = np.mean([np.asarray(M.batched_auc_shuffled(PREDS, FIXS, OTHERS, s)) for s in range(40)],
                axis=0)
    e = [_expected_split_auc(p, f, o > 0) for p, f, o in zip(PREDS, FIXS, OTHERS)]
    np.testing.assert_allclose(b, e, atol=2e-3)


def test_batched_accepts_key_or_seed():
    import jax
    a = np.asarray(M.batched_auc_borji(PREDS, FIXS, jax.random.key(9)))
    assert np.array_equal(a, np.asarray(M.batched_auc_borji(PREDS, FIXS, 9)))
    assert np.array_equal(a, np.asarray(M.batched_auc_borji(PREDS, FIXS, jax.random.PRNGKey(9))))


def test_with_a_key_per_image_its_result_does_not_depend_on_its_batch():
    import jax
    keys = jax.random.split(jax.random.key(5), len(PREDS))
    order = np.arange(len(PREDS))[::-1]
    tied = np.round(PREDS * 4) / 4  # ties, so AUC-Judd's tie order is drawn too
    for name, args in (("auc_judd", (tied, FIXS)), ("auc_borji", (PREDS, FIXS)),
                       ("auc_shuffled", (PREDS, FIXS, OTHERS))):
        fn = getattr(M, f"batched_{name}")
        whole = np.asarray(fn(*args, keys))
        reversed_ = np.asarray(fn(*(a[order] for a in args), keys[order]))[order]
        np.testing.assert_array_equal(whole, reversed_, err_msg=name)
        alone = np.asarray(fn(*(a[1:2] for a in args), keys[1:2]))
        np.testing.assert_allclose(alone, whole[1:2], rtol=1e-6, err_msg=name)


# ------------------------------------------------------------------------------------------
# Resize
# ------------------------------------------------------------------------------------------

def _ref_resize(a, rows, cols):
    """cv2.resize INTER_LINEAR (half-pixel centres, edge clamp, no antialias), pixel by pixel."""
    h, w = a.shape
    out = np.zeros((rows, cols))
    for i in range(rows):
        y = min(max((i + 0.5) * h / rows - 0.5, 0.0), h - 1)
        y0 = int(math.floor(y))
        y1 = min(y0 + 1, h - 1)
        wy = y - y0
        for j in range(cols):
            x = min(max((j + 0.5) * w / cols - 0.5, 0.0), w - 1)
            x0 = int(math.floor(x))
            x1 = min(x0 + 1, w - 1)
            wx = x - x0
            out[i, j] = ((1 - wy) * ((1 - wx) * a[y0, x0] + wx * a[y0, x1])
                         + wy * ((1 - wx) * a[y1, x0] + wx * a[y1, x1]))
    return out


@pytest.mark.parametrize("src,dst", [((3, 5), (7, 11)), ((9, 13), (4, 5)), ((6, 8), (6, 8)),
                                     ((5, 4), (12, 3))])
def test_resize_bilinear_matches_loop_reference(src, dst):
    a = np.random.default_rng(sum(src)).random(src)
    np.testing.assert_allclose(resize_bilinear(a, dst), _ref_resize(a, *dst), rtol=0, atol=1e-12)


@pytest.mark.parametrize("channels", [(), (2,)])
def test_resize_bilinear_window_is_the_crop_of_the_whole(channels):
    a = np.random.default_rng(3).random((6, 8) + channels)
    whole = resize_bilinear(a, (45, 17))
    window = resize_bilinear(a, (45, 17), (30, 4, 11, 9))
    np.testing.assert_array_equal(window, whole[30:41, 4:13])


def test_batched_thresholds_scale_by_true_division_as_matlab():
    import jax
    # A map whose min-max scaling by a reciprocal multiply gives its maximum 0.99999994:
    # levels 0, .5, .95, 1 with fixations on .95 and 1, other fixations on .5 and .95 (m = 2:
    # deterministic). MATLAB's curve (0,0),(0,.5),(.5,1),(1,1) has area .875; dropping the
    # maximum below t = 1 gives .75.
    lo, hi = np.float32(3.5755613), np.float32(923.9032)
    p = np.array([[lo, 460.0], [lo + np.float32(0.95) * (hi - lo), hi]], np.float32)
    fixations, others = np.array([[0, 0], [1, 1]]), np.array([[0, 1], [1, 0]])
    assert M.auc_shuffled(p, fixations, others) == pytest.approx(0.875)
    assert float(M.batched_auc_shuffled(p[None], fixations[None], others[None], 0)[0]) == \
        pytest.approx(0.875)
    # Every map's maximum reaches t = 1 and every pixel has NumPy's float32-division bin.
    rng = np.random.default_rng(0)
    maps = (rng.random((200, 7, 9)) * rng.uniform(1e-3, 1e3, (200, 1, 1))
            + rng.uniform(-5, 5, (200, 1, 1))).astype(np.float32)
    bins = np.asarray(jax.jit(M._threshold_bins, static_argnums=1)(maps, 0.1)[0])
    lo, hi = maps.min(axis=(1, 2), keepdims=True), maps.max(axis=(1, 2), keepdims=True)
    scaled = (maps - lo) / (hi - lo)
    want = sum((scaled >= np.float32(t)).astype(int) for t in M.matlab_colon(0.0, 0.1, 1.0)) - 1
    np.testing.assert_array_equal(bins, want.reshape(200, -1))


@pytest.mark.parametrize("window", [(0, 0, 2, 100_000), (0, 0, 75_000, 2)])
def test_resize_bilinear_window_of_a_huge_output_takes_the_cheaper_way(window):
    # A strip of a 75000×100000 map: megabytes, whichever way the strip runs (the other pass
    # order would hold input rows × 100000 columns, ~100 MB).
    import tracemalloc
    a = np.random.default_rng(0).uniform(size=(60, 80))
    tracemalloc.start()
    out = resize_bilinear(a, (75_000, 100_000), window)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.shape == window[2:] and peak < 20e6


def test_resize_bilinear_hand_values():
    # [[0, 1]] to 4 columns: source x = (j + .5)/2 - .5 = -.25, .25, .75, 1.25, clamped to
    # [0, 1] → 0, .25, .75, 1 (what cv2.resize gives).
    np.testing.assert_allclose(resize_bilinear(np.array([[0.0, 1.0]]), (1, 4)),
                               [[0, 0.25, 0.75, 1]], atol=1e-15)
    # Halving [0,1,2,3] samples x = 0.5 and 2.5: 0.5 and 2.5 (no antialias blur).
    np.testing.assert_allclose(resize_bilinear(np.array([[0.0, 1, 2, 3]]), (1, 2)),
                               [[0.5, 2.5]], atol=1e-15)


def test_a_prediction_with_nan_or_inf_scores_nan_in_both_backends():
    """Nothing checked it: the JAX backend (the default on GPU/TPU) gave SIM ≈ 1 and plausible
    AUCs for a map with one NaN pixel, and NumPy's AUC-Judd −0.0117 for one with +inf."""
    from mlnet_jax import metrics
    rng = np.random.default_rng(0)
    preds = rng.random((3, 20, 24))
    gts = rng.random((3, 20, 24))
    fix = (rng.random((3, 20, 24)) > 0.9).astype(np.float32)
    other = (rng.random((3, 20, 24)) > 0.8).astype(np.float32)
    preds[1, 3, 4], preds[2, 5, 6] = np.nan, np.inf
    batched = {
        "cc": metrics.batched_cc(preds, gts), "kld": metrics.batched_kld(preds, gts),
        "sim": metrics.batched_sim(preds, gts), "nss": metrics.batched_nss(preds, fix),
        "auc_judd": metrics.batched_auc_judd(preds, fix),
        "auc_borji": metrics.batched_auc_borji(preds, fix),
        "auc_shuffled": metrics.batched_auc_shuffled(preds, fix, other)}
    single = {
        "cc": lambda i: metrics.cc(preds[i], gts[i]), "kld": lambda i: metrics.kld(preds[i], gts[i]),
        "sim": lambda i: metrics.sim(preds[i], gts[i]), "nss": lambda i: metrics.nss(preds[i], fix[i]),
        "auc_judd": lambda i: metrics.auc_judd(preds[i], fix[i]),
        "auc_borji": lambda i: metrics.auc_borji(preds[i], fix[i]),
        "auc_shuffled": lambda i: metrics.auc_shuffled(preds[i], fix[i], other[i])}
    for name, scores in batched.items():
        assert np.isfinite(scores[0]) and np.isnan(scores[1:]).all(), (name, scores)
        assert np.isfinite(single[name](0)) and np.isnan([single[name](1), single[name](2)]).all()
    assert np.isnan(metrics.info_gain(gts[0], fix[0], baseline_map=preds[1]))


def test_batched_metrics_name_mismatched_shapes_and_take_an_empty_batch():
    from mlnet_jax import metrics
    three, two = np.ones((3, 8, 8)), np.ones((2, 8, 8))
    with pytest.raises(ValueError, match=r"^gts \(2, 8, 8\) must have the shape of preds \(3, 8, 8\)"):
        metrics.batched_cc(three, two)
    with pytest.raises(ValueError, match=r"^fixation_maps \(1, 8, 8\) must have the shape"):
        metrics.batched_nss(three, np.ones((1, 8, 8)))  # was broadcast against all three
    with pytest.raises(ValueError, match=r"^gts \(3, 8, 9\) must have the shape"):
        metrics.batched_sim(three, np.ones((3, 8, 9)))
    empty = np.ones((0, 8, 8))  # Borji's and sAUC's splits divided by zero
    for name in ("cc", "kld", "nss", "sim", "auc_judd", "auc_borji"):
        assert getattr(metrics, f"batched_{name}")(empty, empty).shape == (0,), name
    assert metrics.batched_auc_shuffled(empty, empty, empty).shape == (0,)
