"""Numba kernels behind ``fedquant.rotation`` (private).

Same conventions as ``fedquant._kernels``: ``numba.njit(cache=True, fastmath=False)``,
1-D contiguous arrays, indices cast to uint64 so that numba emits no negative-index
wrap-around (which would stop LLVM from vectorizing). numba is a required dependency.

Signs (part of the wire format: the server regenerates them, so this must not change).
Element i of a tensor rotated with ``seed`` gets the sign ``(-1)**bit`` with::

    key  = splitmix64(seed xor DOMAIN)                    DOMAIN = b"fq-rht-1", little-endian
    word = splitmix64(key + (i >> 6) gamma  mod 2**64)    one 64-bit hash per 64 elements
    bit  = (word >> (i & 63)) & 1

splitmix64 is the output function of Steele, Lea & Flood (OOPSLA 2014), gamma its
increment. ``DOMAIN`` separates this stream from the quantizer's dither
(``fedquant._kernels``) when a caller uses one seed for both. The constants and the
function are repeated here rather than imported: the quantizer may change its stream,
this one may not.

Fast Walsh-Hadamard transform (FWHT) of one block of b = 2**L elements, in place: one
butterfly pass per bit of the index (natural, Sylvester order; the passes commute),
L b additions in all. The pass at bit k (h = 2**k) maps each pair (y[j], y[j + h]),
j with bit k clear, to (y[j] + y[j + h], y[j] - y[j + h]); a radix-4 pass does bits k
and k + 1 at once (half the loads and stores). Each pass loops over contiguous runs of
h elements, with h a literal at its call site in ``_fwht``: LLVM then knows the
distance between the two halves and vectorizes without a run-time overlap check. (With
h a run-time value, LLVM 22 as shipped with llvmlite 0.50 hoists that check out of the
loop over runs, where it always fails, and the pass runs scalar.) What LLVM makes of
the passes on AVX-512 (1M float32 elements): bits 0-1 (radix 4, h = 1) and bit 2
(h = 4) become shuffles of interleaved groups, about 0.14 ms each; bits 3-4 (radix 4,
h = 8) stay scalar, 0.29 ms (LLVM unrolls the 8-element runs and finds no profitable
vector form); every pass from bit 5 up runs on 16-lane vectors, under 0.05 ms per bit.
A block of up to 4096 float32 (16 KiB) stays in L1 across its passes, 2**14 in L2.
"""

from __future__ import annotations

import numpy as np

# splitmix64 (Steele, Lea & Flood 2014): the quantizer's own mixer and increment.
from fedquant._kernels import _GAMMA, _mix64

try:
    import numba
except ImportError as e:  # pinned in pyproject.toml; there is no numpy fallback
    raise ImportError("fedquant's rotation kernels need numba: pip install numba==0.68.1") from e

__all__ = ["MAX_LOG_BLOCK", "rotate_blocks", "unrotate_blocks"]

MAX_LOG_BLOCK = 14  # the pass schedule of ``_fwht`` covers blocks up to 2**14 elements

_DOMAIN = np.uint64(int.from_bytes(b"fq-rht-1", "little"))
_S6 = np.uint64(6)
_ONE = np.uint64(1)
_ROW = 64  # elements per 64-bit word of signs

_jit = numba.njit(cache=True, fastmath=False)
_inline = numba.njit(cache=True, fastmath=False, inline="always")


# ----------------------------------------------------------------------------- signs


@_jit
def _sign_key(seed):  # type: ignore[no-untyped-def]
    """``splitmix64(seed xor DOMAIN)`` for a uint64 seed (module docstring)."""
    return _mix64(np.uint64(seed) ^ _DOMAIN)


@_inline
def _sign_word(key, index):  # type: ignore[no-untyped-def]
    """The 64 sign bits of elements ``64 r .. 64 r + 63``, r = index >> 6."""
    return _mix64(key + (np.uint64(index) >> _S6) * _GAMMA)


@_inline
def _signed(scale, word, lane):  # type: ignore[no-untyped-def]
    """``scale`` times the sign in bit ``lane`` (0..63) of ``word``: set -> ``-scale``."""
    return -scale if (word >> np.uint64(lane)) & _ONE else scale


@_inline
def _load_signed(x, y, start, stop, key, scale):  # type: ignore[no-untyped-def]
    """``y[p] = sign(p) scale x[p]`` for p in [start, stop); 0 where p >= x.size.

    [start, stop) is a block: a power of two in size, aligned to it, so that each run
    of up to 64 elements below lies in one word of signs.
    """
    count = x.size
    for first in range(start, stop, _ROW):
        word = _sign_word(key, first)
        lane = first & (_ROW - 1)
        lanes = min(_ROW, stop - first)
        filled = max(0, min(lanes, count - first))  # lanes with data; the rest is padding
        for j in range(filled):
            p = np.uint64(first + j)
            y[p] = x[p] * _signed(scale, word, lane + j)
        for j in range(filled, lanes):
            y[np.uint64(first + j)] = 0
    return


@_inline
def _apply_signs(y, offset, size, first, key, scale):  # type: ignore[no-untyped-def]
    """``y[offset + k] *= sign(first + k) scale`` for k in [0, size), in place.

    [first, first + size) is a block, as in ``_load_signed``.
    """
    for row in range(0, size, _ROW):
        word = _sign_word(key, first + row)
        lane = (first + row) & (_ROW - 1)
        lanes = min(_ROW, size - row)
        for j in range(lanes):
            p = np.uint64(offset + row + j)
            y[p] = y[p] * _signed(scale, word, lane + j)
    return


# ----------------------------------------------------------------------------- FWHT


@_inline
def _radix2(y, start, stop, h):  # type: ignore[no-untyped-def]
    """Butterflies on bit log2(h) of the index, over y[start:stop] (h constant)."""
    for i in range(start, stop, 2 * h):
        for j in range(i, i + h):
            p = np.uint64(j)
            q = np.uint64(j + h)
            a = y[p]
            c = y[q]
            y[p] = a + c
            y[q] = a - c
    return


@_inline
def _radix4(y, start, stop, h):  # type: ignore[no-untyped-def]
    """Butterflies on bits log2(h) and log2(h) + 1 at once (H_4 on 4 runs of h)."""
    for i in range(start, stop, 4 * h):
        for j in range(i, i + h):
            p0 = np.uint64(j)
            p1 = np.uint64(j + h)
            p2 = np.uint64(j + 2 * h)
            p3 = np.uint64(j + 3 * h)
            a0 = y[p0]
            a1 = y[p1]
            a2 = y[p2]
            a3 = y[p3]
            s01 = a0 + a1
            d01 = a0 - a1
            s23 = a2 + a3
            d23 = a2 - a3
            y[p0] = s01 + s23
            y[p1] = d01 + d23
            y[p2] = s01 - s23
            y[p3] = d01 - d23
    return


@_inline
def _pair(y, start, stop, h, bits_left):  # type: ignore[no-untyped-def]
    """Bits log2(h) and log2(h) + 1 if the block has both, bit log2(h) if only that."""
    if bits_left >= 2:
        _radix4(y, start, stop, h)
    elif bits_left == 1:
        _radix2(y, start, stop, h)
    return


@_jit
def _fwht(y, start, log_b):  # type: ignore[no-untyped-def]
    """Unnormalized Walsh-Hadamard transform of y[start:start + 2**log_b], in place.

    y <- H y with H[r, c] = (-1)**popcount(r & c) (Sylvester's H_{2b} = [[H, H],
    [H, -H]]), in log_b butterfly passes grouped as: bits 0-1, 2, 3-4, 5-6, ... . Every
    h below is a literal (module docstring); the schedule covers log_b <= MAX_LOG_BLOCK.
    """
    stop = start + (1 << log_b)
    _pair(y, start, stop, 1, log_b)
    if log_b >= 3:
        _radix2(y, start, stop, 4)
    _pair(y, start, stop, 8, log_b - 3)
    _pair(y, start, stop, 32, log_b - 5)
    _pair(y, start, stop, 128, log_b - 7)
    _pair(y, start, stop, 512, log_b - 9)
    _pair(y, start, stop, 2048, log_b - 11)
    _pair(y, start, stop, 8192, log_b - 13)
    return


# ----------------------------------------------------------------------------- transforms


@_jit
def rotate_blocks(x, y, seed, log_b, scale):  # type: ignore[no-untyped-def]
    """``y = H D x / sqrt(b)`` per block of b = 2**log_b (x zero-padded to y.size).

    x float32 (any size), y float32 with y.size a multiple of b and >= x.size, ``seed``
    a uint64, ``scale`` = 1 / sqrt(b) as float32. The signs and 1/sqrt(b) are applied
    while x is copied into y; the FWHT then runs in place, block by block.
    """
    if log_b > MAX_LOG_BLOCK:
        raise ValueError("block larger than the FWHT pass schedule")
    key = _sign_key(seed)
    b = 1 << log_b
    for start in range(0, y.size, b):
        _load_signed(x, y, start, start + b, key, scale)
        _fwht(y, start, log_b)


@_jit
def unrotate_blocks(y, x, seed, log_b, scale):  # type: ignore[no-untyped-def]
    """``x = D H y / sqrt(b)`` per block of b = 2**log_b, truncated to x.size.

    y float32 with y.size a multiple of b, x float32 with y.size - b < x.size <= y.size.
    Each block is copied into x (the last, partial one into a scratch block), transformed
    in place, then multiplied by its signs and 1/sqrt(b).
    """
    if log_b > MAX_LOG_BLOCK:
        raise ValueError("block larger than the FWHT pass schedule")
    key = _sign_key(seed)
    b = 1 << log_b
    count = x.size
    scratch = np.empty(b if y.size > count else 0, np.float32)  # for a partial last block
    for start in range(0, y.size, b):
        full = start + b <= count
        buf = x if full else scratch
        offset = start if full else 0
        for j in range(b):
            buf[np.uint64(offset + j)] = y[np.uint64(start + j)]
        _fwht(buf, offset, log_b)
        _apply_signs(buf, offset, b, start, key, scale)
        if not full:
            for j in range(count - start):
                x[np.uint64(start + j)] = scratch[np.uint64(j)]
