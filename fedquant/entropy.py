"""Entropy coding of quantizer codes: ANS under the tensor's own static histogram.

A tensor's codes ``c_i in 0..L-1`` (``L = 2**bits``) are far from uniform (a rounded
Gaussian with standard deviation ``L / 6`` has 3.46 bits of entropy at ``bits = 4``, 5.45
at ``bits = 6``), so instead of packing them at ``bits`` bits each (:mod:`fedquant.packing`)
they can be coded at close to their empirical entropy

    H = -sum_s (n_s / N) log2(n_s / N)   bits per code,

with ``n_s`` the number of codes equal to ``s`` and ``N = sum_s n_s``. The model is the
histogram itself (a static, per-tensor categorical model), sent as integers in the header;
the codes are coded with the asymmetric numeral systems coder of ``constriction``
(``constriction.stream.stack.AnsCoder``; Duda et al. 2015, "The use of asymmetric numeral
systems as an accurate replacement for Huffman coding"). The stream then takes
``N H + 23`` bits on average (:data:`ANS_OVERHEAD_BITS`); :func:`encode_codes` returns ``None`` when
header plus stream would not be smaller than the packed codes.

Model. The alphabet is the ``k`` *used* symbols only (``n_s > 0``), in increasing order;
symbol ``s`` is coded as its index ``j`` in that list under
``constriction.stream.model.Categorical(n.astype(float64), perfect=False)``, where ``n``
holds the ``k`` counts. constriction turns these into 24-bit fixed-point probabilities
(each at least ``2**-24``) by a deterministic function of the float64 input, so the
decoder, which rebuilds the same float64 array from the same integers, gets a
bit-identical model. Caveat: that function belongs to constriction 0.5.0 (pinned); a
version that quantizes differently needs a new :data:`FORMAT_VERSION`. Over the used symbols
only, every decodable index is a symbol that occurs, so the decoder can require the
decoded histogram to equal the header's counts exactly; over all ``L`` levels, each
unused level would also cost constriction's minimum probability ``2**-24`` of mass.
A tensor with one used symbol (``k = 1``) needs no stream at all.

Byte layout (version 1; multi-byte integers are unsigned LEB128 varints: 7 bits per byte,
low group first, high bit set on all but the last byte, minimal length, at most 5 bytes):

======================  ===================================================================
``version``             1 byte, :data:`FORMAT_VERSION` (1)
``bitmap``              ``ceil(L / 8)`` bytes: bit ``s % 8`` of byte ``s // 8`` (LSB first)
                        is set iff symbol ``s`` occurs; the pad bits ``>= L`` are zero
``counts``              ``k`` varints: ``n_s >= 1`` for each set bit, by increasing ``s``;
                        they sum to ``N`` (the caller's ``count``)
``stream_size``         varint: ``S``, the bytes that follow (0 iff ``k == 1``)
``stream``              ``S`` bytes: ``AnsCoder.get_compressed()`` (uint32 words) as
                        little-endian bytes, less the zero high bytes of the last word,
                        so that the last byte is nonzero
======================  ===================================================================

The decoder (:func:`decode_codes`) treats ``data`` as untrusted: any deviation from this
layout, including a non-minimal varint or trailing bytes, raises ``ValueError``.

constriction on bad streams (checked for 0.5.0): decoding never fails on garbage or on a
truncated stream; the coder keeps producing symbols from whatever state it holds (an
exhausted coder decodes index 0 forever). ``AnsCoder(words)`` raises ``ValueError`` only
when the last word is zero. The only checks are therefore ours: the decoded histogram must
equal the header's counts (checked after every chunk, so garbage usually fails early) and
the coder must be empty (``AnsCoder.is_empty()``) after ``N`` symbols. Caveat: encoding
starts from the empty state, in which index 0 costs nothing, so a tensor that *ends* in a
run of its smallest used symbol has those codes for free; a valid stream can thus be
shorter than ``N H`` bits, and the decoder does not bound ``N`` by the stream size.
"""

from __future__ import annotations

import math
from typing import Final

import constriction
import numpy as np

from fedquant.checks import is_int
from fedquant.config import MAX_CODE_BITS
from fedquant.packing import packed_size

__all__ = [
    "ANS_OVERHEAD_BITS",
    "FORMAT_VERSION",
    "MAX_COUNT",
    "coded_size_estimate",
    "decode_codes",
    "encode_codes",
]

FORMAT_VERSION: Final = 1
"""First byte of every coded tensor; a later layout gets a new number."""
MAX_COUNT: Final = 2**31 - 1
"""Most codes one tensor may hold (``fedquant.payload.MAX_ELEMENTS``)."""
ANS_OVERHEAD_BITS: Final = 23.0
"""Mean of ``8 S - N H`` for codes in random order (``S`` the stream bytes, ``k >= 2``).

Measured over 1,000 Gaussian, Laplace, geometric and uniform histograms (``bits`` 1..8,
``N`` 10^3..10^6): mean 22.7 bits, standard deviation 3.4, range 9..31. Of it, about 18
bits are the coder's final 64-bit state beyond the information content
(``AnsCoder.num_valid_bits() - N H``: 10..23 measured), the rest byte rounding.
"""

_VARINT_MAX_BYTES: Final = 5  # 35 bits: any count <= MAX_COUNT and any stream size
_CHUNK: Final = 1 << 18  # codes decoded per constriction call: 1 MiB of int32 indices


# ----------------------------------------------------------------------------- public


def encode_codes(codes: np.ndarray, *, bits: int) -> bytes | None:
    """ANS-code ``codes`` under their own histogram, or ``None`` when that saves nothing.

    ``codes`` (uint8, any shape, read in C order, each ``< 2**bits``) are coded as laid
    out in the module docstring. The result is ``None`` for an empty array and when
    ``len(result) >= fedquant.packing.packed_size(codes.size, bits=bits)``: the caller
    then sends the packed codes. The output is a function of the codes alone
    (deterministic).

    Raises:
        ValueError: ``bits`` not in 1..8, ``codes`` not a uint8 numpy array, a code
            ``>= 2**bits``, or more than :data:`MAX_COUNT` codes.
    """
    bits = _check_bits(bits)
    if not isinstance(codes, np.ndarray):
        raise ValueError(f"`codes` must be a numpy.ndarray. Found `{type(codes).__name__}`.")
    if codes.dtype != np.uint8:
        raise ValueError(f"`codes` must have dtype uint8. Found `{codes.dtype}`.")
    if codes.size > MAX_COUNT:
        raise ValueError(f"`codes` must hold at most {MAX_COUNT} codes. Found `{codes.size}`.")
    if codes.size == 0:
        return None
    flat = np.ascontiguousarray(codes).reshape(-1)  # (N,)
    histogram = _histogram(flat, bits)
    limit = packed_size(flat.size, bits=bits)
    if _header_size(histogram) + 1 >= limit:  # + the stream-size varint: no saving
        return None
    data = _encode(flat, histogram)
    return data if len(data) < limit else None


def decode_codes(data: bytes, *, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`encode_codes`: exactly ``count`` codes as a new 1-D uint8 array.

    ``data`` is untrusted. It must follow the module docstring's layout exactly: version
    byte, bitmap with zero pad bits and at least one used symbol, one minimal varint count
    ``>= 1`` per used symbol summing to ``count``, a stream size equal to the bytes left,
    no stream iff one symbol is used, a last stream byte that is nonzero, a stream that
    decodes to exactly the header's histogram and leaves the ANS coder empty. Everything
    the header declares is checked against ``count`` and ``len(data)`` before anything is
    allocated; memory stays ``O(count + len(data))`` (the output, ``len(data)`` for the
    stream words, 1 MiB of indices per decoded chunk). Time is ``O(count)`` even for a
    few bytes of ``data``: a valid stream may be that short (module docstring).

    Raises:
        ValueError: any of the above (the message names the part of ``data`` at fault),
            ``bits`` not in 1..8, ``count`` not an integer in 1..MAX_COUNT (no tensor
            of 0 codes is ever coded), ``data`` not bytes-like.
    """
    bits = _check_bits(bits)
    if not is_int(count) or not 0 <= count <= MAX_COUNT:
        raise ValueError(f"`count` must be an integer in 0..{MAX_COUNT}. Found `{count!r}`.")
    count = int(count)
    if count == 0:
        raise ValueError("`count` is 0, but encode_codes never codes an empty tensor.")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"`data` must be bytes-like. Found `{type(data).__name__}`.")
    reader = _Reader(np.frombuffer(data, dtype=np.uint8))
    levels = 1 << bits

    version = reader.byte("the version byte")
    if version != FORMAT_VERSION:
        raise _bad(f"format version {version}, expected {FORMAT_VERSION}")
    bitmap = reader.take(-(-levels // 8), "the bitmap of used symbols")
    flags = np.unpackbits(bitmap, bitorder="little")  # (8 ceil(L/8),)
    if flags[levels:].any():
        symbol = levels + int(np.flatnonzero(flags[levels:])[0])
        raise _bad(f"bitmap marks symbol {symbol}, but codes of {bits} bits are < {levels}")
    used = np.flatnonzero(flags).astype(np.uint8)  # (k,) symbols, increasing
    if used.size == 0:
        raise _bad("bitmap marks no used symbol")

    counts = np.empty(used.size, np.int64)  # (k,)
    total = 0
    for j, symbol in enumerate(used.tolist()):
        where = f"the count of symbol {symbol}"
        n = reader.varint(where)
        if n == 0:
            raise _bad(f"{where} is 0, but the bitmap marks the symbol as used")
        if n > count - total:  # fails fast: no claim beyond `count` is ever acted on
            raise _bad(f"{where} ({n}) takes the counts past `count` = {count}")
        counts[j] = n
        total += n
    if total != count:
        raise _bad(f"counts sum to {total}, expected `count` = {count}")

    size = reader.varint("the stream size")
    left = reader.remaining
    if size > left:
        raise _bad(f"declares a {size}-byte stream, but only {left} bytes follow")
    if size < left:
        raise _bad(f"{left - size} trailing bytes after the {size}-byte stream")
    stream = reader.take(size, "the stream")
    if used.size == 1:
        if size != 0:
            raise _bad(f"one used symbol needs no stream, found {size} bytes")
        return np.full(count, used[0], np.uint8)
    if size == 0:
        raise _bad(f"{used.size} used symbols need a stream, found none")
    if stream[-1] == 0:
        raise _bad("the stream's last byte is 0 (an encoder drops zero high bytes)")
    return _ans_decode(stream, used, counts)


def coded_size_estimate(histogram: np.ndarray) -> float:
    """Estimated size in bits of ``encode_codes``'s output for codes with ``histogram``.

    ``histogram[s] = n_s`` over all ``L = len(histogram) = 2**bits`` levels. The estimate is

        8 * header_bytes + N H + ANS_OVERHEAD_BITS   (the last two only when k >= 2),

    with ``N H = sum_s n_s log2(N / n_s)`` (Shannon) and the header computed exactly
    (its stream-size varint from the estimated stream). Cheap: no coding, O(L) work. For
    codes in random order its error is at most 24 bits (the ANS overhead's spread, 9..31
    bits around 23, byte rounding, a stream-size varint one byte off; +-14 bits measured)
    plus 0.1% (24-bit probabilities), within a few percent for ``N >= 1000``. A tensor
    that ends in a long run of its smallest symbol codes smaller (module docstring).
    This is the size of the coded form even where it exceeds the packed size and
    :func:`encode_codes` would return ``None``: the caller takes the minimum with
    ``8 * packed_size(N, bits=bits)``.

    Raises:
        ValueError: ``histogram`` not a 1-D integer array of length 2..256 (a power of
            two), a negative entry, or all entries zero.
    """
    if not isinstance(histogram, np.ndarray):
        got = type(histogram).__name__
        raise ValueError(f"`histogram` must be a numpy.ndarray. Found `{got}`.")
    if histogram.dtype.kind not in "iu":
        raise ValueError(f"`histogram` must have an integer dtype. Found `{histogram.dtype}`.")
    levels = histogram.size
    if histogram.ndim != 1 or levels not in {1 << b for b in range(1, MAX_CODE_BITS + 1)}:
        raise ValueError(
            "`histogram` must be 1-D with 2**bits entries, bits in 1..8. "
            f"Found shape `{histogram.shape}`."
        )
    if (histogram < 0).any():
        raise ValueError("`histogram` must be >= 0. Found a negative count.")
    counts = [int(n) for n in histogram.tolist() if n > 0]
    if not counts:
        raise ValueError("`histogram` is all zero: encode_codes never codes an empty tensor.")
    header_bytes = _header_size(histogram)
    if len(counts) == 1:
        return 8.0 * (header_bytes + 1)
    total = sum(counts)
    shannon = sum(n * math.log2(total / n) for n in counts)
    stream_bits = shannon + ANS_OVERHEAD_BITS
    header_bytes += _varint_size(math.ceil(stream_bits / 8))
    return 8.0 * header_bytes + stream_bits


# ----------------------------------------------------------------------------- helpers


def _check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_CODE_BITS:
        raise ValueError(f"`bits` must be an integer in 1..{MAX_CODE_BITS}. Found `{bits!r}`.")
    return bits


def _bad(reason: str) -> ValueError:
    return ValueError(f"`data`: {reason}.")


def _histogram(flat: np.ndarray, bits: int) -> np.ndarray:
    """``n_s`` for ``s`` in ``0..2**bits - 1`` (int64); ValueError if a code is too large."""
    levels = 1 << bits
    histogram = np.bincount(flat, minlength=levels)  # (max(L, max code + 1),)
    if histogram.size > levels:
        top = int(flat.max())
        raise ValueError(f"`codes` must be < 2**bits = {levels}. Found `{top}`.")
    return histogram.astype(np.int64, copy=False)


def _encode(flat: np.ndarray, histogram: np.ndarray) -> bytes:
    """The coded form of ``flat`` (nonempty) whatever its size (module docstring)."""
    used = np.flatnonzero(histogram)  # (k,) the used symbols, increasing
    counts = histogram[used]  # (k,) n_s >= 1
    bitmap = np.packbits(histogram > 0, bitorder="little")  # (ceil(L/8),) zero pad bits
    header = bytes([FORMAT_VERSION]) + bitmap.tobytes()
    header += b"".join(_varint(n) for n in counts.tolist())
    stream = b"" if used.size == 1 else _ans_encode(flat, used, counts, levels=histogram.size)
    return header + _varint(len(stream)) + stream


def _header_size(histogram: np.ndarray) -> int:
    """Bytes before the stream-size varint: version, bitmap, counts."""
    counts = histogram[histogram > 0].tolist()
    return 1 + -(-histogram.size // 8) + sum(_varint_size(n) for n in counts)


def _varint(value: int) -> bytes:
    """Unsigned LEB128: 7 bits per byte, low group first, high bit = more follows."""
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _varint_size(value: int) -> int:
    """``len(_varint(value))``."""
    return max(1, -(-value.bit_length() // 7))


def _model(counts: np.ndarray) -> object:
    """The categorical model over ``k`` used symbols, from their integer counts.

    ``float64`` holds every count exactly (counts are < 2**31), so encoder and decoder
    pass constriction bit-identical input; ``perfect=False`` is its deterministic
    fixed-point quantization (to 24-bit probabilities, each at least ``2**-24``).
    """
    probabilities = counts.astype(np.float64)  # (k,)
    return constriction.stream.model.Categorical(probabilities, perfect=False)


def _ans_encode(flat: np.ndarray, used: np.ndarray, counts: np.ndarray, *, levels: int) -> bytes:
    """The stream: ``flat`` as indices into ``used``, ANS-coded, trimmed little-endian."""
    index_of = np.zeros(levels, np.int32)  # (L,) symbol -> index in `used`
    index_of[used] = np.arange(used.size, dtype=np.int32)
    indices = index_of[flat]  # (N,) int32, as constriction requires
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(indices, _model(counts))  # reversed: decoding runs forward
    words = np.asarray(coder.get_compressed(), dtype=np.uint32)  # (W,) last word nonzero
    raw = words.astype("<u4", copy=False).tobytes()
    return raw.rstrip(b"\x00")  # only the last word's zero high bytes: it is nonzero


def _ans_decode(stream: np.ndarray, used: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Decode ``counts.sum()`` codes from ``stream`` (nonempty, last byte nonzero).

    Chunk by chunk: each chunk's indices are counted and must not exceed ``counts``
    (garbage usually fails in the first chunk), then mapped to symbols. At the end the
    histogram equals ``counts`` (same total, none exceeded) and the coder must be empty.
    """
    count = int(counts.sum())
    padded = np.zeros(-(-stream.size // 4) * 4, np.uint8)  # (4W,) zero high bytes back
    padded[: stream.size] = stream
    words = padded.view("<u4").astype(np.uint32, copy=False)  # (W,) native, for constriction
    model = _model(counts)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
    except ValueError as err:  # constriction rejects a zero last word (excluded above)
        raise _bad(f"the stream is not valid ANS data ({err})") from None
    out = np.empty(count, np.uint8)  # (N,)
    seen = np.zeros(used.size, np.int64)  # (k,)
    for start in range(0, count, _CHUNK):
        stop = min(start + _CHUNK, count)
        indices = np.asarray(coder.decode(model, stop - start), dtype=np.int32)  # (stop-start,)
        if indices.shape != (stop - start,) or indices.min() < 0 or indices.max() >= used.size:
            raise _bad("the ANS coder returned out-of-range indices")  # constriction's contract
        seen += np.bincount(indices, minlength=used.size)  # (k,)
        over = np.flatnonzero(seen > counts)
        if over.size:
            j = int(over[0])
            raise _bad(
                f"the stream decodes more than the declared {counts[j]} codes "
                f"of symbol {used[j]} within its first {stop} codes"
            )
        np.take(used, indices, out=out[start:stop])
    if not coder.is_empty():
        raise _bad(f"the stream holds data beyond its {count} codes (ANS coder not empty)")
    return out


class _Reader:
    """Reads the header of ``data`` left to right; every short read is a ValueError."""

    def __init__(self, raw: np.ndarray) -> None:
        self._raw = raw  # (len(data),) uint8, read-only view
        self._pos = 0

    @property
    def remaining(self) -> int:
        return int(self._raw.size - self._pos)

    def take(self, size: int, what: str) -> np.ndarray:
        if size > self.remaining:
            raise _bad(
                f"ends inside {what} (needs {size} bytes at offset {self._pos}, "
                f"{self.remaining} left)"
            )
        chunk = self._raw[self._pos : self._pos + size]
        self._pos += size
        return chunk

    def byte(self, what: str) -> int:
        return int(self.take(1, what)[0])

    def varint(self, what: str) -> int:
        """An unsigned LEB128 varint of at most 5 bytes, minimal (no zero last group)."""
        start = self._pos
        value = 0
        for i in range(_VARINT_MAX_BYTES):
            byte = self.byte(what)
            value |= (byte & 0x7F) << (7 * i)
            if byte < 0x80:
                if byte == 0 and i > 0:
                    raise _bad(f"{what} at offset {start} is a non-minimal varint")
                return value
        raise _bad(f"{what} at offset {start} is a varint of more than {_VARINT_MAX_BYTES} bytes")
