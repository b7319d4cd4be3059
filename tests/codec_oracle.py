"""Slow, obvious numpy oracles for ``fedquant.codec``: the documented math, no kernels.

Each function restates a formula of ``fedquant.codec`` elementwise, with no prefix sums,
bins or working-precision tricks, so that a test can compare the shipped numba kernels
against it: exactly where the math is deterministic (nearest codes, OCTAV's search),
through the expected error where it is random (stochastic rounding). The dither stream
is restated in vectorized numpy (splitmix64 rows, lowbias32 lanes), so that the codes and
the subtracted dither of ``Rounding.DITHERED`` can be compared bit for bit.
"""

from __future__ import annotations

import math

import numpy as np

from fedquant.codec import Rounding

OCTAV_SAMPLE = 1 << 16  # magnitudes OCTAV looks at, at most (``octav_clip`` docstring)
OCTAV_RUN = 64  # consecutive elements per stratum of the subsample
OCTAV_SAMPLE_SEED = 0x0C7A5  # the fixed seed ``fedquant.codec`` draws the strata with

LANES = 64  # elements per row of the dither stream
GAMMA64 = np.uint64(0x9E3779B97F4A7C15)  # splitmix64 increment
GAMMA32 = 0x9E3779B9  # lane offsets within a row


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's output function on uint64 (wrapping) arrays."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _lowbias32(z: np.ndarray) -> np.ndarray:
    """Wellons' lowbias32 on uint32 (wrapping) arrays."""
    z = z ^ (z >> np.uint32(16))
    z = z * np.uint32(0x7FEB352D)
    z = z ^ (z >> np.uint32(15))
    z = z * np.uint32(0x846CA68B)
    return z ^ (z >> np.uint32(16))


def dither_words(key: int, count: int) -> np.ndarray:
    """The 24-bit words k_i, i < count, of the counter-based stream ``key`` (uint32).

    Element 64 r + j: (hi, lo) = halves of splitmix64(key + 64 r gamma64 mod 2**64),
    k = (lowbias32(lo + j gamma32 mod 2**32) xor hi) >> 8 (``fedquant._kernels``).
    """
    rows = -(-count // LANES)
    starts = np.arange(rows, dtype=np.uint64) * np.uint64(LANES)
    row = _splitmix64(np.uint64(key) + starts * GAMMA64)  # (rows,)
    lo = (row & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    hi = (row >> np.uint64(32)).astype(np.uint32)
    lanes = (np.arange(LANES, dtype=np.uint64) * np.uint64(GAMMA32)) & np.uint64(0xFFFFFFFF)
    words = _lowbias32(lo[:, None] + lanes.astype(np.uint32)[None, :]) ^ hi[:, None]  # (rows, 64)
    return (words >> np.uint32(8)).reshape(-1)[:count]


def dither_offsets(key: int, count: int) -> np.ndarray:
    """U_i = (k_i + 1/2) 2**-24 in float64: the midpoint of the dither cell of word k_i."""
    return (dither_words(key, count).astype(np.float64) + 0.5) * 2.0**-24


def stochastic_codes(x: np.ndarray, *, bits: int, s: float, key: int) -> np.ndarray:
    """Codes of STOCHASTIC (and DITHERED) rounding with the stream ``key``, in x's dtype.

    u = x a (a = n / (2 s) in x's dtype), t = clip(u, -n/2, n/2) + n/2, T = rint(t 2**24),
    c = (T + k) >> 24 in integers (= floor(t' + k 2**-24), t' = T 2**-24).
    """
    n = 2**bits - 1
    dtype = x.dtype.type
    a = dtype(0.5 * n / s)
    half = dtype(0.5 * n)
    t = np.clip(x * a, -half, half) + half
    big = np.rint(t * dtype(2.0**24)).astype(np.uint64)
    words = dither_words(key, x.size).astype(np.uint64)
    return ((big + words) >> np.uint64(24)).astype(np.uint8)


def dithered_values(codes: np.ndarray, *, bits: int, s: float, offsets: np.ndarray) -> np.ndarray:
    """x_hat = s (2c/n - 1) - (U - 1/2) Delta, Delta = 2 s / n, in float64 (the formula)."""
    n = 2**bits - 1
    step = 2.0 * s / n
    return s * (2.0 * codes.astype(np.float64) / n - 1.0) - (offsets - 0.5) * step


def nearest_codes(x: np.ndarray, *, bits: int, s: float, exact_max: bool = False) -> np.ndarray:
    """Nearest codes by the documented arithmetic, in x's dtype (float32 or float64).

    u = x a with a = n / (2 s), c = floor(clip(u, -n/2, n/2)) + (n + 1)/2 (= floor(n y +
    1/2)). ``exact_max`` (``ClipRule.MAX``): a is first rounded down, one float at a time,
    until fl(s a) <= n/2.
    """
    n = 2**bits - 1
    dtype = x.dtype.type
    a = dtype(0.5 * n / s)
    if exact_max:
        while dtype(s) * a > dtype(0.5 * n):
            a = np.nextafter(a, dtype(0))
    u = np.clip(x * a, -0.5 * n, 0.5 * n)
    return (np.floor(u) + (n + 1) // 2).astype(np.uint8)


def mse_at(x: np.ndarray, *, n: int, s: float, rounding: Rounding) -> float:
    """Exact MSE of the quantizer at threshold s, elementwise in float64.

    Levels -s + i Delta, i = 0..n, Delta = 2 s / n; c = clip(x, -s, s), t = (c + s) / Delta,
    f = t - floor(t). NEAREST (realized): (x - level nearest to c)**2 (ties go up).
    STOCHASTIC (expected over the dither): (x - c)**2 + f (1 - f) Delta**2.
    DITHERED (expected over the dither): (x - c)**2 + Delta**2 / 12.
    """
    x = np.asarray(x, dtype=np.float64)
    step = 2.0 * s / n
    c = np.clip(x, -s, s)
    if rounding is Rounding.DITHERED:
        return float(np.mean((x - c) ** 2)) + step * step / 12.0
    t = (c + s) / step
    if rounding is Rounding.NEAREST:
        level = -s + np.minimum(np.floor(t + 0.5), n) * step
        return float(np.mean((x - level) ** 2))
    f = t - np.floor(t)
    return float(np.mean((x - c) ** 2 + f * (1.0 - f) * step * step))


def octav_subsample(flat: np.ndarray) -> np.ndarray:
    """The elements OCTAV looks at: all, or 1024 runs of 64 at fixed-seed random offsets.

    Above 2**16 elements the array is cut into 1024 strata of equal width and one run of
    64 consecutive elements is taken from each, at offset ``floor(k width + U_k (width -
    64))``, U_k from ``np.random.default_rng(seed).random(1024)``.
    """
    if flat.size <= OCTAV_SAMPLE:
        return flat
    strata = OCTAV_SAMPLE // OCTAV_RUN
    width = flat.size / strata
    draws = np.random.default_rng(OCTAV_SAMPLE_SEED).random(strata)
    runs = []
    for k in range(strata):
        start = int(k * width + draws[k] * (width - OCTAV_RUN))
        runs.append(flat[start : start + OCTAV_RUN])
    return np.concatenate(runs)


def octav_clip(
    x: np.ndarray, *, bits: int, rounding: Rounding, max_iter: int = 30, tol: float = 1e-4
) -> float:
    """OCTAV as ``fedquant.codec.octav_clip`` documents it, with elementwise sums.

    On a = |x| / max|x| (subsampled): the fixed point (Sakr et al. 2022, Eq. 5)
    ``s <- sum a 1{a > s} / (kappa #{a <= s} + #{a > s})`` from s = mean a, kappa =
    1 / (3 n**2) (NEAREST, DITHERED) or 2 / (3 n**2) (STOCHASTIC), and for DITHERED
    ``kappa #a`` (every element) in place of ``kappa #{a <= s}``; then the first minimum of
    ``mse_at`` over ``np.linspace(s/2, min(3s/2, 1), 21)`` and a golden-section search
    between its neighbours down to a relative width of 1e-3; the better of the two.
    """
    n = 2**bits - 1
    flat = x.reshape(-1)
    if flat.size == 0:
        return 0.0
    amax = float(np.max(np.abs(flat)))
    if amax == 0.0:
        return 0.0
    a = np.abs(octav_subsample(flat)).astype(np.float64) / amax
    kappa = (2.0 if rounding is Rounding.STOCHASTIC else 1.0) / (3.0 * n * n)

    s = float(np.mean(a))
    for _ in range(max_iter):
        above = a > s
        if not above.any():  # s >= max a: only rounding noise left, J grows with s
            s = 1.0
            break
        noisy = a.size if rounding is Rounding.DITHERED else int(np.sum(~above))
        s_next = float(np.sum(a[above])) / (kappa * noisy + int(np.sum(above)))
        done = abs(s_next - s) <= tol * s
        s = s_next
        if done:
            break
    s = min(s, 1.0)

    def objective(v: float) -> float:
        return mse_at(a, n=n, s=v, rounding=rounding)

    grid = np.linspace(0.5 * s, min(1.5 * s, 1.0), 21)
    values = [objective(float(v)) for v in grid]
    best = int(np.argmin(values))
    lo = float(grid[max(best - 1, 0)])
    hi = float(grid[min(best + 1, 20)])
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = hi - inv_phi * (hi - lo), lo + inv_phi * (hi - lo)
    fc, fd = objective(c), objective(d)
    while hi - lo > 1e-3 * hi:
        if fc <= fd:
            hi, d, fd = d, c, fc
            c = hi - inv_phi * (hi - lo)
            fc = objective(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + inv_phi * (hi - lo)
            fd = objective(d)
    polished = c if fc <= fd else d
    s = polished if objective(polished) <= values[best] else float(grid[best])
    return min(s * amax, amax)
