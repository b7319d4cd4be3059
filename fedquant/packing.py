"""Dense bit packing of B-bit codes (1 <= B <= 8) into bytes.

Layout: codes are flattened in C order; code i occupies bits ``[B*i, B*(i+1))`` of the
output read as one little-endian integer, i.e. bit k of the stream is bit ``k % 8`` of
byte ``k // 8`` (LSB first; the layout of ``np.packbits(..., bitorder="little")`` applied
to the codes' bits, low bit first). ``packed_size(count) = ceil(count * B / 8)``. Pad bits
in the last byte are written as zero; ``unpack_codes`` ignores them.

Vectorized with numpy: 8 codes (a uint64 of 8 bytes) hold 8*B payload bits, so packing
is a compress of byte lanes inside each uint64 in three halving steps (bytes -> 16-bit
-> 32-bit -> 64-bit lanes), after which the low B bytes of every group are kept.
Widths 1, 2, 4 and 8 use shorter special cases.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["pack_codes", "packed_size", "unpack_codes"]

_GROUP = 8  # codes per uint64 group


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

    ValueError if ``bits`` is not in 1..8, the dtype is not uint8, or a code is too large.
    """
    bits = _check_bits(bits)
    flat = _to_flat_uint8(codes)
    count = flat.size
    if count == 0:
        return b""
    if bits < 8:
        top = int(flat.max())
        if top >= 1 << bits:
            raise ValueError(f"`codes` must be < 2**bits = {1 << bits}. Found `{top}`.")
    if bits == 8:
        return flat.tobytes()
    if bits == 1:
        return np.packbits(flat, bitorder="little").tobytes()
    size = packed_size(count, bits=bits)
    if bits == 4:
        words = _padded(flat, 2).view("<u2")  # (c0 | c1 << 8) per word
        packed = (words | (words >> 4)).astype(np.uint8)  # low byte: c0 | c1 << 4
        return packed.tobytes()[:size]
    if bits == 2:
        words = _padded(flat, 4).view("<u4")  # c0 | c1 << 8 | c2 << 16 | c3 << 24
        words = words | (words >> 6)  # 16-bit lanes: c_even | c_odd << 2
        words |= words >> 12  # low byte: c0 | c1 << 2 | c2 << 4 | c3 << 6
        return words.astype(np.uint8).tobytes()[:size]  # low byte of each word
    groups = _padded(flat, _GROUP).view("<u8")  # (G,): byte j holds code 8g + j
    for shift, low, high in _lane_masks(bits):
        groups = (groups & np.uint64(low)) | ((groups & np.uint64(high)) >> np.uint64(shift))
    out = _le_bytes(groups).reshape(-1, _GROUP)[:, :bits]  # (G, bits), low bytes
    return out.tobytes()[:size]


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
    """Inverse of ``pack_codes``: ``count`` codes as a 1-D uint8 array (a fresh copy).

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
    if bits == 4:
        words = raw.astype(np.uint16)
        words = (words | (words << 4)) & np.uint16(0x0F0F)  # byte 0: c0, byte 1: c1
        return _le_bytes(words)[:count].copy()
    if bits == 2:
        words = raw.astype(np.uint32)
        words = (words | (words << 12)) & np.uint32(0x000F000F)
        words = (words | (words << 6)) & np.uint32(0x03030303)
        return _le_bytes(words)[:count].copy()
    groups_count = -(-count // _GROUP)
    # ceil(ceil(count*bits/8) / bits) == ceil(count/8): padding gives whole groups.
    body = _padded(raw, bits).reshape(groups_count, bits)  # (G, bits)
    wide = np.zeros((groups_count, _GROUP), np.uint8)  # (G, 8)
    wide[:, :bits] = body
    groups = wide.reshape(-1).view("<u8")
    for shift, low, high in reversed(_lane_masks(bits)):
        groups = (groups & np.uint64(low)) | ((groups << np.uint64(shift)) & np.uint64(high))
    return _le_bytes(groups)[:count].copy()
