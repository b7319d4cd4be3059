"""Dense bit packing of B-bit codes (1 <= B <= 8) into bytes.

Layout: codes are flattened in C order; code i occupies bits ``[B*i, B*(i+1))`` of the
output read as one little-endian integer, i.e. bit k of the stream is bit ``k % 8`` of
byte ``k // 8`` (LSB first; the layout of ``np.packbits(..., bitorder="little")`` applied
to the codes' bits, low bit first). ``packed_size(count) = ceil(count * B / 8)``. Pad bits
in the last byte are written as zero; ``unpack_codes`` ignores them.

8 codes (a uint64 of 8 bytes) hold 8*B payload bits, so packing is a compress of byte
lanes inside each uint64 in three halving steps (bytes -> 16-bit -> 32-bit -> 64-bit
lanes), after which the payloads are concatenated. ``pack_codes`` runs this in one pass
in the numba kernel ``fedquant._kernels.pack_words`` (which also checks the code range;
numba is a required dependency); width 8 is a plain copy. ``unpack_codes`` runs the
inverse expand, vectorized with numpy (widths 1, 2 and 4 take shorter special cases).
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import torch

from fedquant import _kernels

__all__ = ["pack_codes", "packed_size", "unpack_codes"]

_GROUP = 8  # codes per uint64 group
_CHUNK = 1 << 16  # codes per block unpacked at once (a multiple of _GROUP; cache-sized)
_SUPER = 64  # codes per group of the numba packer (8 * bits bytes, i.e. bits uint64 words)
_SCRATCH_WORDS = 1 << 19  # largest per-thread scratch kept between calls (4 MiB)
_scratch = threading.local()


def _check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"`bits` must be an integer in 1..8. Found `{bits!r}`.")
    return bits


def _check_count(count: object) -> int:
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"`count` must be an integer >= 0. Found `{count!r}`.")
    return int(count)


def packed_size(count: int, *, bits: int) -> int:
    """Bytes needed for ``count`` codes of ``bits`` bits: ``ceil(count * bits / 8)``."""
    count = _check_count(count)
    return (count * _check_bits(bits) + 7) // 8


def _lane_masks(bits: int) -> list[tuple[int, int, int]]:
    """(shift, keep-low mask, keep-high mask) of the three compress steps for ``bits``.

    Step w (lane width L = 16, 32, 64): each L-bit lane holds two L/2-bit halves, each
    with ``bits * L / 16`` payload bits at its bottom; the high half moves down by
    ``L/2 - bits*L/16`` to sit right above the low half.
    """
    steps = []
    for lane in (16, 32, 64):
        half = lane // 2
        payload = bits * lane // 16  # payload bits per half
        low = 0
        high = 0
        for start in range(0, 64, lane):
            low |= ((1 << payload) - 1) << start
            high |= ((1 << payload) - 1) << (start + half)
        steps.append((half - payload, low, high))
    return steps


def _to_flat_uint8(codes: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(codes, torch.Tensor):
        if codes.dtype != torch.uint8:
            raise ValueError(f"`codes` must have dtype uint8. Found `{codes.dtype}`.")
        return codes.detach().cpu().reshape(-1).contiguous().numpy()
    if isinstance(codes, np.ndarray):
        if codes.dtype != np.uint8:
            raise ValueError(f"`codes` must have dtype uint8. Found `{codes.dtype}`.")
        return np.ascontiguousarray(codes).reshape(-1)
    raise ValueError(
        f"`codes` must be a torch.Tensor or numpy.ndarray. Found `{type(codes).__name__}`."
    )


def pack_codes(codes: torch.Tensor | np.ndarray, *, bits: int) -> bytes:
    """Pack uint8 codes (each < 2**bits) densely, ``packed_size(codes.size)`` bytes.

    Code i occupies bits ``[B i, B (i + 1))`` of the little-endian bit stream (module
    docstring). ValueError if ``bits`` is not in 1..8, the dtype is not uint8, or a code
    is too large.
    """
    bits = _check_bits(bits)
    flat = _to_flat_uint8(codes)
    if flat.size == 0:
        return b""
    if bits == 8:
        return flat.tobytes()
    return _pack_words(flat, bits)


@functools.cache
def _compress_steps(bits: int) -> np.ndarray:
    """``_lane_masks(bits)`` flattened to (shift, low, high) * 3 as uint64."""
    steps = np.array([v for step in _lane_masks(bits) for v in step], np.uint64)
    steps.flags.writeable = False
    return steps


def _words_buffer(size: int) -> np.ndarray:
    """A uint64 scratch array of ``size`` words, reused by the calling thread when small.

    Packing fills it and copies it into the returned ``bytes``; a fresh array per call
    would give two large allocations per call, and the allocator then returns memory
    to the OS and faults it back in (several times the cost of packing itself).
    """
    if size > _SCRATCH_WORDS:
        return np.empty(size, np.uint64)
    buffer = getattr(_scratch, "words", None)
    if buffer is None or buffer.size < size:
        buffer = np.empty(max(size, 1 << 12), np.uint64)
        _scratch.words = buffer
    return buffer[:size]


def _pack_words(flat: np.ndarray, bits: int) -> bytes:
    """``pack_codes`` for bits < 8: 64 codes -> ``bits`` uint64 words (``pack_words``).

    The last partial group is zero-padded, so the pad bits are zero.
    """
    count = flat.size
    whole = count - count % _SUPER
    words = _words_buffer(-(-count // _SUPER) * bits)
    steps = _compress_steps(bits)
    seen = int(_kernels.pack_words(flat[:whole], words, bits, steps))
    if whole < count:  # zero-padded tail: the pad bits are zero
        tail = np.zeros(_SUPER, np.uint8)
        tail[: count - whole] = flat[whole:]
        seen |= int(_kernels.pack_words(tail, words[whole // _SUPER * bits :], bits, steps))
    if seen & ~(0x0101010101010101 * ((1 << bits) - 1)):
        top = int(flat.max())
        raise ValueError(f"`codes` must be < 2**bits = {1 << bits}. Found `{top}`.")
    raw = words.view(np.uint8) if bits == 4 else _le_bytes(words)  # width 4 writes bytes
    return raw[: packed_size(count, bits=bits)].tobytes()


def _padded(flat: np.ndarray, multiple: int) -> np.ndarray:
    """``flat`` zero-padded to a multiple of ``multiple`` (a copy only when padding)."""
    rest = -flat.size % multiple
    if rest == 0:
        return flat
    out = np.zeros(flat.size + rest, np.uint8)
    out[: flat.size] = flat
    return out


def _le_bytes(words: np.ndarray) -> np.ndarray:
    """Bytes of an unsigned integer array in little-endian order (a view when native)."""
    return words.astype(words.dtype.newbyteorder("<"), copy=False).view(np.uint8)


def unpack_codes(data: bytes, *, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_codes``: ``count`` codes as a new 1-D uint8 array.

    ``data`` must be bytes-like of exactly ``packed_size(count, bits=bits)`` bytes, else
    ValueError naming ``data``. Nonzero pad bits in the last byte are ignored.
    """
    bits = _check_bits(bits)
    count = _check_count(count)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"`data` must be bytes-like. Found `{type(data).__name__}`.")
    raw = np.frombuffer(data, dtype=np.uint8)
    expected = packed_size(count, bits=bits)
    if raw.size != expected:
        raise ValueError(
            f"`data` must hold packed_size({count}, bits={bits}) = {expected} bytes. "
            f"Found `{raw.size}`."
        )
    if count == 0:
        return np.zeros(0, np.uint8)
    if bits == 8:
        return raw.copy()
    if bits == 1:
        return np.unpackbits(raw, count=count, bitorder="little")
    groups_count = -(-count // _GROUP)
    # ceil(ceil(count*bits/8) / bits) == ceil(count/8): padding gives whole groups.
    body = _padded(raw, bits)  # (G * bits,)
    out = np.empty(groups_count * _GROUP, np.uint8)
    for start in range(0, out.size, _CHUNK):
        stop = min(start + _CHUNK, out.size)
        _unpack_block(body[start * bits // 8 : stop * bits // 8], out[start:stop], bits)
    return out[:count]


def _unpack_block(block: np.ndarray, out: np.ndarray, bits: int) -> None:
    """Expand ``block`` (len(out) * bits / 8 bytes) into the codes ``out``.

    Widths 4 and 2 spread the codes of a byte over 16- and 32-bit lanes; other widths
    copy each group's ``bits`` bytes into a uint64 and undo the three compress steps of
    ``_lane_masks`` in reverse.
    """
    if bits == 4:
        words = block.astype(np.uint16)  # c0 | c1 << 4
        words |= words << np.uint16(4)
        words &= np.uint16(0x0F0F)  # byte 0: c0, byte 1: c1
        out[:] = _le_bytes(words)
        return
    if bits == 2:
        words = block.astype(np.uint32)  # c0 | c1 << 2 | c2 << 4 | c3 << 6
        words |= words << np.uint32(12)
        words &= np.uint32(0x000F000F)  # 16-bit lanes: c_even | c_odd << 2
        words |= words << np.uint32(6)
        words &= np.uint32(0x03030303)
        out[:] = _le_bytes(words)
        return
    narrow = block.reshape(-1, bits)  # (G, bits)
    wide = np.zeros((narrow.shape[0], _GROUP), np.uint8)  # (G, 8)
    for j in range(bits):
        wide[:, j] = narrow[:, j]
    groups = wide.reshape(-1).view("<u8")
    for shift, low, high in reversed(_lane_masks(bits)):
        groups = (groups & np.uint64(low)) | ((groups << np.uint64(shift)) & np.uint64(high))
    out[:] = _le_bytes(groups)
