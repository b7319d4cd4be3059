"""Numba kernels behind ``fedquant.codec`` and ``fedquant.packing`` (private).

numba is a required dependency (pyproject pins numba==0.68.1): these kernels are the
only implementation of the quantizer, OCTAV's search and the packer. Each kernel is one
pass over its input, compiled on first use for the dtypes it meets and cached on disk
(``cache=True``), with ``fastmath=False`` (the rounding below relies on exact IEEE
arithmetic). Signatures are kept few because compilation costs seconds: 1-D
contiguous arrays, float constants passed as a small array of the input's dtype
(``consts``), int64 and uint64 scalars. Indices are cast to unsigned so that numba emits
no negative-index wrap-around, which would stop LLVM from vectorizing the loops.

Quantizer (``quantize_nearest``, ``quantize_stochastic``, ``quantize_dithered``), with
u = x a, a = n / (2 s), n = 2**B - 1; in u-units code c has the level c - n/2, and
uc = clip(u, -n/2, n/2)::

    NEAREST      g = floor(uc),  c = g + (n + 1)/2          (= floor(n y + 1/2))
    STOCHASTIC   t = uc + n/2 in [0, n],  T = rint(t 2**24)  (uint32: T < 2**32)
                 c = (T + k) >> 24,  k uniform on 0..2**24 - 1
                   = floor(t' + k 2**-24)  with t' = T 2**-24  (= floor(n y + U))
    DITHERED     the codes of STOCHASTIC, and the level minus the dither:
                 level_u = c - n/2 - d,  d = U - 1/2,  U = (k + 1/2) 2**-24

t 2**24 is exact in floating point; T equals it whenever t is a multiple of 2**-24
(every float32 t >= 1/2), else t' is t rounded to 24 fractional bits (error <= 2**-25
of a step). So E[c] = t' and P(c rounds up) = frac(t') exactly: the 24-bit dither adds
no bias beyond that rounding, and a value on the grid keeps its code.

DITHERED (subtractive dither, Roberts 1962; Schuchman 1964) subtracts U, the midpoint
of the dither cell [k 2**-24, (k + 1) 2**-24) that selected the code: t' + k 2**-24 lies
on the 2**-24 grid, so floor(t' + U) = c as well, and the error in steps is::

    t - c + U - 1/2 = (t - t') + frac(t' + U) - 1/2
    frac(t' + U) = ((T + k) mod 2**24 + 1/2) 2**-24

uniform over the 2**24 cell midpoints whatever t' is: mean exactly t - t' (0 for float32
t >= 1/2; k 2**-24 itself would leave a bias of -2**-25 steps), variance
(1 - 2**-48) / 12 steps**2. d = (2 k + 1 - 2**24) 2**-25 is exact in float32 (an integer
below 2**24 times a power of two), so encoder (``quantize_dithered``) and decoder
(``dequantize_dithered``) subtract the same value, from the same words k
(``dither_words``).

Random bits (a counter-based stream: the codes depend only on the key and the element's
index, so a prefix of an array gets the codes it gets inside the whole array): the
element with index 64 r + j (row r, lane j) gets::

    (hi_r, lo_r) = halves of splitmix64(key + 64 r gamma64)     one 64-bit hash per row
    k = (lowbias32(lo_r + j gamma32 mod 2**32) xor hi_r) >> 8    one 32-bit hash each

splitmix64 (Steele, Lea & Flood 2014) gives every row an independent 64-bit key;
lowbias32 (Wellons 2018) is a bijection of uint32, so the 64 lanes of a row get distinct,
well-mixed words. 32-bit lanes keep the loop in 8-wide vectors: a 64-bit hash per
element (vpmullq) made the stochastic kernel about 1.5x slower. The stream is defined
once, by ``_lane_offsets``, ``_row_words`` and ``_word24``, which every kernel that
draws from it calls. Two keys share a row only if they differ by 64 m gamma64 (mod
2**64) for a row offset m, a multiple of 64: nearby keys (consecutive seeds) never do,
and two random keys share one of their first ``rows`` rows with probability about
2 rows / 2**64.

The squared error (u - level)**2 is computed in the working precision and summed over
blocks of _ROWS elements per lane into _LANES partial sums of that precision, which
are flushed into float64 accumulators after each block (a fixed order that vectorizes
without reassociation).
"""

from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError as e:  # pinned in pyproject.toml; there is no numpy fallback
    raise ImportError(
        "fedquant's quantize and pack kernels need numba: pip install numba==0.68.1"
    ) from e

__all__ = [
    "MSE_DITHERED",
    "MSE_NEAREST",
    "MSE_STOCHASTIC",
    "abs_max_bits",
    "dequantize_dithered",
    "dither_words",
    "gather_abs",
    "octav_solve",
    "pack_words",
    "quantize_dithered",
    "quantize_nearest",
    "quantize_stochastic",
]

# Error models of ``octav_solve`` (its ``mode``): the MSE that OCTAV's search minimizes.
MSE_NEAREST = 0  # realized MSE of nearest rounding
MSE_STOCHASTIC = 1  # expected MSE of stochastic rounding, over the dither
MSE_DITHERED = 2  # expected MSE of subtractive dither, over the dither

_LANES = 64  # partial sums (one per position in a row of _LANES elements)
_ROWS = 16  # rows per block: each working-precision partial sum holds _ROWS terms
_BLOCK = _LANES * _ROWS  # elements per block of working-precision partial sums

_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # splitmix64 increment (2**64 / golden ratio)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S24 = np.uint32(24)
_S27 = np.uint64(27)
_S30 = np.uint64(30)
_S31 = np.uint64(31)
_S32 = np.uint64(32)
_LOW32 = np.uint64(0xFFFFFFFF)
_GAMMA32 = np.uint64(0x9E3779B9)  # 2**32 / golden ratio (odd): lane offsets in a row
_HMUL1 = np.uint32(0x7FEB352D)  # lowbias32 multipliers
_HMUL2 = np.uint32(0x846CA68B)
_H8 = np.uint32(8)  # 32 - 24: keep the top 24 bits of the hash
_H15 = np.uint32(15)
_H16 = np.uint32(16)

_jit = numba.njit(cache=True, fastmath=False)
_inline = numba.njit(cache=True, fastmath=False, inline="always")


# ----------------------------------------------------------------------------- max |x|


@_jit
def abs_max_bits(words, mask):  # type: ignore[no-untyped-def]
    """max(words & mask) over a uint32/uint64 view of float32/float64 values.

    With the sign bit masked off, IEEE order equals integer order, so the result is the
    bit pattern of max|x|; one at or above the pattern of +inf means NaN or inf.
    """
    acc = np.zeros(_LANES, words.dtype)
    size = words.size
    whole = size - size % _LANES
    for i in range(0, whole, _LANES):
        for j in range(_LANES):
            v = words[np.uint64(i + j)] & mask
            acc[j] = v if v > acc[j] else acc[j]
    for i in range(whole, size):
        v = words[np.uint64(i)] & mask
        acc[0] = v if v > acc[0] else acc[0]
    best = acc[0]
    for j in range(1, _LANES):
        best = acc[j] if acc[j] > best else best
    return best


@_inline
def _total(acc):  # type: ignore[no-untyped-def]
    """acc[0] + acc[1] + ... in order (cheaper to compile than ndarray.sum)."""
    total = 0.0
    for j in range(acc.size):
        total += acc[j]
    return total


# ----------------------------------------------------------------------------- quantizer


@_inline
def _nearest_one(xv, a, half, p5):  # type: ignore[no-untyped-def]
    """(floor(uc), (u - level)**2) for one element, in the working precision."""
    u = xv * a
    g = np.floor(min(max(u, -half), half))
    e = u - (g + p5)
    return g, e * e


@_jit
def quantize_nearest(x, codes, consts, offset):  # type: ignore[no-untyped-def]
    """Nearest rounding: ``c = floor(clip(x a)) + offset``; returns sum((u - level)**2).

    The sum is in u-units. ``consts`` = (a, n/2, 1/2) in x's dtype, ``offset`` =
    (n + 1)/2, so that c = floor(n y + 1/2) (module docstring).
    """
    a = consts[0]
    half = consts[1]
    p5 = consts[2]
    off = np.int32(offset)
    acc = np.zeros(_LANES, np.float64)
    part = np.zeros(_LANES, x.dtype)
    size = x.size
    whole = size - size % _LANES
    for block in range(0, whole, _BLOCK):
        part.fill(0)
        for i in range(block, min(block + _BLOCK, whole), _LANES):
            for j in range(_LANES):
                p = np.uint64(i + j)
                g, e2 = _nearest_one(x[p], a, half, p5)
                codes[p] = np.int32(g) + off
                part[j] += e2
        for j in range(_LANES):
            acc[j] += part[j]
    for i in range(whole, size):
        p = np.uint64(i)
        g, e2 = _nearest_one(x[p], a, half, p5)
        codes[p] = np.int32(g) + off
        acc[i - whole] += e2
    return _total(acc)


@_inline
def _mix64(z):  # type: ignore[no-untyped-def]
    """splitmix64 output function (Steele, Lea & Flood, OOPSLA 2014)."""
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


@_inline
def _lowbias32(z):  # type: ignore[no-untyped-def]
    """32-bit integer hash ``lowbias32`` (C. Wellons, "Prospecting for hash functions", 2018).

    A bijection of uint32 with low avalanche bias; explicit uint32 casts keep numba from
    widening the arithmetic.
    """
    z = np.uint32(z ^ (z >> _H16))
    z = np.uint32(z * _HMUL1)
    z = np.uint32(z ^ (z >> _H15))
    z = np.uint32(z * _HMUL2)
    return np.uint32(z ^ (z >> _H16))


@_inline
def _lane_offsets():  # type: ignore[no-untyped-def]
    """Lane j's offset j gamma32 (mod 2**32) within a row of the stream, j < _LANES."""
    weyl = np.empty(_LANES, np.uint32)
    for j in range(_LANES):
        weyl[j] = np.uint32(np.uint64(j) * _GAMMA32)
    return weyl


@_inline
def _row_words(base, start):  # type: ignore[no-untyped-def]
    """(lo_r, hi_r): the halves of splitmix64(key + start gamma64), row from index start."""
    row = _mix64(base + np.uint64(start) * _GAMMA)
    return np.uint32(row & _LOW32), np.uint32(row >> _S32)


@_inline
def _word24(lo, hi, offset):  # type: ignore[no-untyped-def]
    """The 24-bit word k of the lane with ``offset`` (``_lane_offsets``) in row (lo, hi)."""
    return np.uint32(_lowbias32(np.uint32(lo + offset)) ^ hi) >> _H8


@_inline
def _stochastic_one(xv, a, half, scale, k, unit, shift, subtract):  # type: ignore[no-untyped-def]
    """(code, squared error) for one element with the 24-bit word k.

    The error is u - level (STOCHASTIC) or u - (level - d) with the dither
    d = k unit + shift = U - 1/2 (DITHERED, ``subtract``; exact, module docstring), in
    u's precision.
    """
    u = xv * a
    t = min(max(u, -half), half) + half  # in [0, n]
    c = np.uint32(np.uint32(np.rint(t * scale)) + k) >> _S24
    e = u - (np.float32(c) - half)  # level c - n/2, exact (c <= 255); u's precision
    if subtract:
        e = e + (np.float32(np.int32(k)) * unit + shift)  # + (U - 1/2): exact, k < 2**24
    return c, e * e


@_inline
def _stochastic_pass(x, codes, consts, key, subtract):  # type: ignore[no-untyped-def]
    """The loop of ``quantize_stochastic`` and ``quantize_dithered`` (``subtract``).

    ``subtract`` is a literal in each caller, so LLVM folds the branch away.
    """
    a = consts[0]
    half = consts[1]
    scale = consts[2]
    unit = consts[3]
    shift = consts[4]
    base = np.uint64(key)
    weyl = _lane_offsets()
    acc = np.zeros(_LANES, np.float64)
    part = np.zeros(_LANES, x.dtype)
    size = x.size
    whole = size - size % _LANES
    for block in range(0, whole, _BLOCK):
        part.fill(0)
        for i in range(block, min(block + _BLOCK, whole), _LANES):
            lo, hi = _row_words(base, i)  # one 64-bit hash per row
            for j in range(_LANES):
                p = np.uint64(i + j)
                k = _word24(lo, hi, weyl[j])
                c, e2 = _stochastic_one(x[p], a, half, scale, k, unit, shift, subtract)
                codes[p] = c
                part[j] += e2
        for j in range(_LANES):
            acc[j] += part[j]
    lo, hi = _row_words(base, whole)
    for j in range(size - whole):
        p = np.uint64(whole + j)
        k = _word24(lo, hi, weyl[j])
        c, e2 = _stochastic_one(x[p], a, half, scale, k, unit, shift, subtract)
        codes[p] = c
        acc[j] += e2
    return _total(acc)


@_jit
def quantize_stochastic(x, codes, consts, key):  # type: ignore[no-untyped-def]
    """Stochastic rounding: ``c = (rint(t 2**24) + k) >> 24``; returns sum((u - level)**2).

    t = clip(x a) + n/2 = n y, k the 24-bit dither of element i from the counter-based
    stream ``key`` (module docstring), so c = floor(n y + U) with E[c] = n y up to the
    24-bit rounding of t; the sum is in u-units. ``consts`` = (a, n/2, 2**24, 2**-24,
    2**-25 - 1/2) in x's dtype (the last two unused here); ``key`` a uint64.
    """
    return _stochastic_pass(x, codes, consts, key, False)


@_jit
def quantize_dithered(x, codes, consts, key):  # type: ignore[no-untyped-def]
    """Subtractive dither: the codes of ``quantize_stochastic``, and the dithered error.

    Writes the same codes as ``quantize_stochastic`` with the same ``key`` and
    ``consts``; returns sum((u - (c - n/2 - d))**2), d = k 2**-24 + 2**-25 - 1/2 = U - 1/2
    (module docstring), in u-units: the error of ``dequantize_dithered``'s values.
    """
    return _stochastic_pass(x, codes, consts, key, True)


@_jit
def dither_words(out, key):  # type: ignore[no-untyped-def]
    """Write the 24-bit words k_i of the stream ``key`` (uint64) into ``out`` (uint32).

    The k that ``quantize_stochastic`` and ``quantize_dithered`` use for element i.
    """
    base = np.uint64(key)
    weyl = _lane_offsets()
    size = out.size
    for i in range(0, size, _LANES):
        lo, hi = _row_words(base, i)
        for j in range(min(_LANES, size - i)):
            out[np.uint64(i + j)] = _word24(lo, hi, weyl[j])


@_inline
def _dithered_level(c, k, r, n, unit, shift):  # type: ignore[no-untyped-def]
    """float32(((2c - n) - (2U - 1)) r), 2U - 1 = k unit + shift; exact up to the product."""
    v = (2.0 * np.float64(c) - n) - (np.float64(k) * unit + shift)
    return np.float32(v * r)


@_jit
def dequantize_dithered(codes, out, consts, key):  # type: ignore[no-untyped-def]
    """x_hat_i = s (2 c_i / n - 1) - (U_i - 1/2) Delta into ``out`` (float32); returns OR of codes.

    Evaluated as ``((2c - n) - (2U - 1)) (s / n)`` in float64 and rounded once to float32:
    2c - n - (2U - 1) is exact (an integer minus a multiple of 2**-24 below 1 in
    magnitude). U_i = (k_i + 1/2) 2**-24 from the stream ``key`` (module docstring), the
    same words as the encoder's. ``consts`` = (s / n, n, 2**-23, 2**-24 - 1) in float64
    (2U - 1 = k 2**-23 + 2**-24 - 1). The OR of all codes exceeds n = 2**B - 1 iff a
    code does (range check).
    """
    r = consts[0]
    n = consts[1]
    unit = consts[2]
    shift = consts[3]
    base = np.uint64(key)
    weyl = _lane_offsets()
    seen = np.uint8(0)
    size = codes.size
    whole = size - size % _LANES
    for i in range(0, whole, _LANES):
        lo, hi = _row_words(base, i)
        for j in range(_LANES):
            p = np.uint64(i + j)
            c = codes[p]
            seen |= c
            out[p] = _dithered_level(c, _word24(lo, hi, weyl[j]), r, n, unit, shift)
    lo, hi = _row_words(base, whole)
    for j in range(size - whole):
        p = np.uint64(whole + j)
        c = codes[p]
        seen |= c
        out[p] = _dithered_level(c, _word24(lo, hi, weyl[j]), r, n, unit, shift)
    return seen


# ----------------------------------------------------------------------------- packing


@_jit
def pack_words(codes, out, bits, steps):  # type: ignore[no-untyped-def]
    """Pack uint8 codes (length a multiple of 64) into ``bits`` uint64 words per 64 codes.

    Code i lands in bits [B i, B (i + 1)) of the stream of words, word q holding stream
    bits [64 q, 64 (q + 1)): the layout of ``fedquant.packing`` once the words are
    written little-endian. Width 4 writes the bytes of ``out`` directly (already in that
    layout on any host). Returns the OR of all code bytes (as a uint64 of 8 byte lanes)
    for the range check.

    8 codes are read as one little-endian uint64 and compressed to their 8 * bits
    payload bits by the three mask-and-shift ``steps`` (shift, low, high) of
    ``packing._lane_masks``; the payloads are then concatenated into 64-bit words.
    Width 4 takes a direct path (two codes per byte).
    """
    seen = np.uint64(0)
    groups = codes.size // 64
    if bits == 4:
        dst = out.view(np.uint8)
        seen8 = np.uint8(0)
        for i in range(groups * 32):
            lo = codes[np.uint64(2 * i)]
            hi = codes[np.uint64(2 * i + 1)]
            seen8 |= lo | hi
            dst[np.uint64(i)] = lo | (hi << np.uint8(4))
        return np.uint64(seen8)
    width = 8 * bits  # payload bits per 8 codes
    s0 = np.uint64(steps[0])
    s1 = np.uint64(steps[3])
    s2 = np.uint64(steps[6])
    for group in range(groups):
        word = np.uint64(0)
        filled = 0
        q = group * bits
        for j in range(8):
            first = 64 * group + 8 * j
            w = np.uint64(0)
            for b in range(8):
                w |= np.uint64(codes[np.uint64(first + b)]) << np.uint64(8 * b)
            seen |= w
            w = (w & steps[1]) | ((w & steps[2]) >> s0)
            w = (w & steps[4]) | ((w & steps[5]) >> s1)
            w = (w & steps[7]) | ((w & steps[8]) >> s2)
            word |= w << np.uint64(filled)
            filled += width
            if filled >= 64:
                out[np.uint64(q)] = word
                q += 1
                filled -= 64
                word = (w >> np.uint64(width - filled)) if filled > 0 else np.uint64(0)
    return seen


# ----------------------------------------------------------------------------- OCTAV


@_jit
def gather_abs(flat, starts, run):  # type: ignore[no-untyped-def]
    """|flat[s:s + run]| for every s in ``starts``, concatenated (flat's dtype)."""
    out = np.empty(starts.size * run, flat.dtype)
    for r in range(starts.size):
        s = starts[r]
        for j in range(run):
            out[np.uint64(r * run + j)] = abs(flat[np.uint64(s + j)])
    return out


@_inline
def _search(a, v, right):  # type: ignore[no-untyped-def]
    """``np.searchsorted(a, v, side="right" if right else "left")`` for sorted a.

    A plain binary search: much cheaper to compile than numba's generic searchsorted.
    """
    lo = 0
    hi = a.size
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < v or (right and a[mid] == v):
            lo = mid + 1
        else:
            hi = mid
    return lo


@_jit
def _octav_mse(a, p1, p2, s, n, mode):  # type: ignore[no-untyped-def]
    """Exact MSE at threshold s of sorted magnitudes a, from prefix sums p1 (a), p2 (a**2).

    The level set is symmetric, so |x| has the error of x; the nonnegative levels are
    l_k = (k + 1/2) Delta, k = 0..(n-1)/2, Delta = 2 s / n, the top one s. ``mode``:
    MSE_NEAREST (realized MSE): bin [k Delta, (k+1) Delta) goes to l_k, the top bin
    reaches inf (clipping). MSE_STOCHASTIC (expected MSE over the dither): between levels
    lo < a < hi the error is (a - lo)(hi - a) (Bernoulli), above s it is (a - s)**2.
    MSE_DITHERED (expected MSE of subtractive dither): Delta**2 / 12 for every element
    (the dither's error is independent of a, clipped or not, and has mean 0) plus
    (a - s)**2 above s. Each bin's sum of (a - l)**2 is s2 - 2 l s1 + l**2 cnt from the
    prefix sums.
    """
    m = a.size
    step = 2.0 * s / n
    if mode == MSE_DITHERED:  # E (a - s + (U - 1/2) Delta)**2 = (a - s)_+**2 + Delta**2/12
        lo_idx = _search(a, s, True)
        cnt = np.float64(m - lo_idx)
        s1 = p1[m] - p1[lo_idx]
        s2 = p2[m] - p2[lo_idx]
        return max(s2 - 2.0 * s * s1 + s * s * cnt, 0.0) / m + step * step / 12.0
    nearest = mode == MSE_NEAREST
    top = (n - 1) // 2
    total = 0.0
    lo_idx = 0
    for k in range(top + 1):
        if nearest:
            # bins [k step, (k+1) step) -> level (k + 1/2) step; the last one reaches inf
            hi_idx = m if k == top else _search(a, step * (k + 1), False)
            cnt = np.float64(hi_idx - lo_idx)
            s1 = p1[hi_idx] - p1[lo_idx]
            s2 = p2[hi_idx] - p2[lo_idx]
            level = step * (k + 0.5)
            total += s2 - 2.0 * level * s1 + level * level * cnt
        else:
            # between levels lo < a < hi: E err**2 = (a - lo)(hi - a)
            hi_idx = _search(a, step * (k + 0.5), False)
            cnt = np.float64(hi_idx - lo_idx)
            s1 = p1[hi_idx] - p1[lo_idx]
            s2 = p2[hi_idx] - p2[lo_idx]
            hi = step * (k + 0.5)
            lo = -hi if k == 0 else step * (k - 0.5)
            total += -s2 + (lo + hi) * s1 - lo * hi * cnt
        lo_idx = hi_idx
    if not nearest:  # above s: (a - s)**2
        cnt = np.float64(m - lo_idx)
        s1 = p1[m] - p1[lo_idx]
        s2 = p2[m] - p2[lo_idx]
        total += s2 - 2.0 * s * s1 + s * s * cnt
    return max(total, 0.0) / m


@_jit
def octav_solve(a, n, mode, kappa, max_iter, tol):  # type: ignore[no-untyped-def]
    """OCTAV (Sakr et al., ICML 2022, Eq. 5) on sorted magnitudes a (float64, max 1).

    Fixed point ``s <- sum a 1{a > s} / (kappa #{a <= s} + #{a > s})`` from s = mean a,
    with ``kappa m`` (m = a.size) in place of ``kappa #{a <= s}`` for ``mode``
    MSE_DITHERED (stopping at relative change <= tol, after max_iter steps, or at s = 1
    once no a exceeds s), then a 21-point scan of [s/2, min(3s/2, 1)] and a
    golden-section search (relative width 1e-3) around its first minimum on the exact
    MSE of ``mode`` (``_octav_mse``); returns s in (0, 1]. The formulas are documented
    in ``fedquant.codec.octav_clip``.
    """
    m = a.size
    p1 = np.zeros(m + 1)
    p2 = np.zeros(m + 1)
    for i in range(m):
        p1[i + 1] = p1[i] + a[i]
        p2[i + 1] = p2[i] + a[i] * a[i]
    s = p1[m] / m
    for _ in range(max_iter):
        i = _search(a, s, True)
        above = m - i
        noisy = m if mode == MSE_DITHERED else i  # elements that pay kappa s**2
        s_next = (p1[m] - p1[i]) / (kappa * noisy + above)
        if above == 0:
            s = 1.0
            break
        done = abs(s_next - s) <= tol * s
        s = s_next
        if done:
            break
    s = min(s, 1.0)

    # 21-point scan of [s/2, min(3s/2, 1)] (np.linspace's points), first minimum
    grid = np.empty(21)
    first = 0.5 * s
    last = min(1.5 * s, 1.0)
    for g in range(20):
        grid[g] = g * ((last - first) / 20) + first
    grid[20] = last
    best = 0
    best_value = np.inf
    for g in range(21):
        value = _octav_mse(a, p1, p2, grid[g], n, mode)
        if value < best_value:
            best, best_value = g, value
    lo = grid[max(best - 1, 0)]
    hi = grid[min(best + 1, 20)]

    inv_phi = (np.sqrt(5.0) - 1.0) / 2.0  # golden-section search on [lo, hi]
    c = hi - inv_phi * (hi - lo)
    d = lo + inv_phi * (hi - lo)
    fc = _octav_mse(a, p1, p2, c, n, mode)
    fd = _octav_mse(a, p1, p2, d, n, mode)
    while hi - lo > 1e-3 * hi:
        if fc <= fd:
            hi, d, fd = d, c, fc
            c = hi - inv_phi * (hi - lo)
            fc = _octav_mse(a, p1, p2, c, n, mode)
        else:
            lo, c, fc = c, d, fd
            d = lo + inv_phi * (hi - lo)
            fd = _octav_mse(a, p1, p2, d, n, mode)
    polished = c if fc <= fd else d
    if _octav_mse(a, p1, p2, polished, n, mode) <= best_value:
        return polished
    return grid[best]
