"""Numba kernels behind ``fedquant.quantize`` and ``fedquant.packing`` (private).

Every kernel is one pass over its input, compiled once per dtype and cached on disk
(``cache=True``); ``nogil=True`` lets the callers split large arrays over a thread pool.
``fastmath`` is off: the rounding below relies on exact IEEE arithmetic.

Signatures are kept few (first-call compile time): 1-D contiguous arrays, float
constants passed as a small array of the input's dtype (``consts``), int64 scalars.

Quantizer, in u-units (u = x a, a = n / (2 s), n = 2**B - 1; the levels are the
half-integers -n/2, ..., n/2 and code c has level c - n/2)::

    uc = clip(u, -n/2, n/2)
    NEAREST:     g = floor(uc),        c = g + (n + 1)/2,         level = g + 1/2
    STOCHASTIC:  t = uc + 1/2, g = floor(t), f = t - g  (exact, f in [0, 1))
                 b = [U < f],          c = g + b + (n - 1)/2,     level = g + b - 1/2

The stochastic rule is ``c = floor(n y + U)`` written as ``floor(n y) + [U < frac(n y)]``
(n y = t + (n - 1)/2 has the fractional part f of t); comparing the dither with f
instead of adding it keeps every random bit: U = (k + 1/2) 2**-24 with k uniform on
0..2**24 - 1, compared in float64 (exact). Then P(b = 1) = f whenever f is a multiple
of 2**-24 (always for float32 u with |t| >= 1), else within 2**-25 of f; a point on the
grid (f = 0) keeps its code. k is the top 24 bits of ``splitmix64(key + i * gamma)``
for the element's global index i (a counter-based stream: the codes do not depend on
how the array is split over threads).

The squared error (u - level)**2 is summed in float64 into _LANES independent
accumulators (a fixed summation order that vectorizes without reassociation).
"""

from __future__ import annotations

import numba
import numpy as np

_LANES = 64  # float64 partial sums of the squared error (vectorizable, fixed order)
_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # splitmix64 increment (golden ratio)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S40 = np.uint64(40)  # 64 - 24: keep the top 24 bits
_DITHER_SCALE = 2.0**-24

_jit = numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")


@_jit
def mix64(z: np.uint64) -> np.uint64:
    """splitmix64 output function (Steele, Lea & Flood 2014; Stafford's mix 13)."""
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


@_jit
def abs_max_bits(words, mask):  # type: ignore[no-untyped-def]
    """max(words & mask): for the bit patterns of floats with the sign masked off this is
    the bit pattern of max|x| (IEEE order equals integer order for nonnegative floats);
    a result >= the pattern of +inf means NaN or inf was present."""
    m0 = words.dtype.type(0)
    acc = np.zeros(_LANES, words.dtype)
    size = words.size
    whole = size - size % _LANES
    for i in range(0, whole, _LANES):
        for j in range(_LANES):
            v = words[i + j] & mask
            if v > acc[j]:
                acc[j] = v
    best = m0
    for j in range(_LANES):
        if acc[j] > best:
            best = acc[j]
    for i in range(whole, size):
        v = words[i] & mask
        if v > best:
            best = v
    return best


@_jit
def quantize_nearest(x, codes, consts, offset):  # type: ignore[no-untyped-def]
    """codes[i] = floor(clip(x[i] a)) + offset; returns sum((u - level)**2) in u-units.

    ``consts`` = (a, n/2, 1/2) in x's dtype; ``offset`` = (n + 1)/2.
    """
    a = consts[0]
    half = consts[1]
    p5 = consts[2]
    acc = np.zeros(_LANES, np.float64)
    size = x.size
    whole = size - size % _LANES
    for i in range(0, whole, _LANES):
        for j in range(_LANES):
            u = x[i + j] * a
            uc = min(max(u, -half), half)
            g = np.floor(uc)
            codes[i + j] = np.int64(g) + offset
            e = np.float64(u) - np.float64(g + p5)
            acc[j] += e * e
    for i in range(whole, size):
        u = x[i] * a
        uc = min(max(u, -half), half)
        g = np.floor(uc)
        codes[i] = np.int64(g) + offset
        e = np.float64(u) - np.float64(g + p5)
        acc[i - whole] += e * e
    return acc.sum()


@_jit
def quantize_stochastic(x, codes, consts, offset, key, start):  # type: ignore[no-untyped-def]
    """Stochastic rounding of x (global indices start, start + 1, ...); see module doc.

    ``consts`` = (a, n/2, 1/2) in x's dtype; ``offset`` = (n - 1)/2; ``key`` a uint64.
    Returns sum((u - level)**2) in u-units.
    """
    a = consts[0]
    half = consts[1]
    p5 = consts[2]
    acc = np.zeros(_LANES, np.float64)
    size = x.size
    whole = size - size % _LANES
    base = np.uint64(key) + np.uint64(start) * _GAMMA
    for i in range(0, whole, _LANES):
        for j in range(_LANES):
            u = x[i + j] * a
            uc = min(max(u, -half), half)
            t = uc + p5
            g = np.floor(t)
            f = np.float64(t - g)
            k = mix64(base + np.uint64(i + j) * _GAMMA) >> _S40
            dither = (np.float64(k) + 0.5) * _DITHER_SCALE
            lev = np.float64(g) + (1.0 if dither < f else 0.0)
            codes[i + j] = np.int64(lev) + offset
            e = np.float64(u) - (lev - 0.5)
            acc[j] += e * e
    for i in range(whole, size):
        u = x[i] * a
        uc = min(max(u, -half), half)
        t = uc + p5
        g = np.floor(t)
        f = np.float64(t - g)
        k = mix64(base + np.uint64(i) * _GAMMA) >> _S40
        dither = (np.float64(k) + 0.5) * _DITHER_SCALE
        lev = np.float64(g) + (1.0 if dither < f else 0.0)
        codes[i] = np.int64(lev) + offset
        e = np.float64(u) - (lev - 0.5)
        acc[i - whole] += e * e
    return acc.sum()
