"""Tests for fedquant.entropy: exact round trips, sizes against Shannon, strict decoding."""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedquant.entropy import (
    ANS_OVERHEAD_BITS,
    FORMAT_VERSION,
    _encode,
    _histogram,
    coded_size_estimate,
    decode_codes,
    encode_codes,
)
from fedquant.packing import packed_size

WIDTHS = range(1, 9)


def _gaussian(size: int, bits: int, seed: int, *, spread: float = 6.0) -> np.ndarray:
    """Codes of a rounded Gaussian: std ``L / spread`` around the middle level, clipped."""
    levels = 1 << bits
    rng = np.random.default_rng(seed)
    x = rng.normal(size=size) * levels / spread + (levels - 1) / 2
    return np.clip(np.round(x), 0, levels - 1).astype(np.uint8)


def _laplace(size: int, bits: int, seed: int) -> np.ndarray:
    levels = 1 << bits
    rng = np.random.default_rng(seed)
    x = rng.laplace(size=size) * levels / 12 + (levels - 1) / 2
    return np.clip(np.round(x), 0, levels - 1).astype(np.uint8)


def _uniform(size: int, bits: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1 << bits, size, dtype=np.uint8)


def _coded(codes: np.ndarray, bits: int) -> bytes:
    """The coded form whatever its size (``encode_codes`` may return None instead)."""
    flat = codes.reshape(-1)
    return _encode(flat, _histogram(flat, bits))


def _shannon_bits(codes: np.ndarray, bits: int) -> float:
    """N H = sum_s n_s log2(N / n_s), straight from the definition."""
    counts = np.bincount(codes.reshape(-1), minlength=1 << bits)
    total = int(counts.sum())
    return float(sum(n * math.log2(total / n) for n in counts.tolist() if n))


def _varint(value: int) -> bytes:
    """LEB128, written independently of the module's encoder."""
    groups = [(value >> (7 * i)) & 0x7F for i in range(max(1, -(-value.bit_length() // 7)))]
    return bytes([g | 0x80 for g in groups[:-1]] + [groups[-1]])


def _parts(data: bytes, bits: int) -> tuple[bytes, list[int], bytes]:
    """Split a valid encoding into (version + bitmap, counts, stream) with an oracle parser."""
    head = 1 + -(-(1 << bits) // 8)
    used = int(np.unpackbits(np.frombuffer(data[1:head], np.uint8)).sum())
    values, pos = [], head
    for _ in range(used + 1):  # the counts, then the stream size
        value, shift = 0, 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        values.append(value)
    assert pos + values[-1] == len(data)
    return data[:head], values[:-1], data[pos:]


def _join(head: bytes, counts: list[int], stream: bytes) -> bytes:
    return head + b"".join(_varint(n) for n in counts) + _varint(len(stream)) + stream


# ------------------------------------------------------------------------ round trips


DISTRIBUTIONS: dict[str, Callable[[int, int, int], np.ndarray]] = {
    "constant-0": lambda size, bits, seed: np.zeros(size, np.uint8),
    "constant-top": lambda size, bits, seed: np.full(size, (1 << bits) - 1, np.uint8),
    "two-symbols": lambda size, bits, seed: np.where(
        np.random.default_rng(seed).random(size) < 0.9, 0, (1 << bits) - 1
    ).astype(np.uint8),
    "uniform": _uniform,
    "gaussian": _gaussian,
    "narrow-gaussian": lambda size, bits, seed: _gaussian(size, bits, seed, spread=40.0),
    "laplace": _laplace,
    "reverse-sorted": lambda size, bits, seed: np.sort(_gaussian(size, bits, seed))[::-1].copy(),
}


@pytest.mark.parametrize("bits", WIDTHS)
def test_round_trip_exact(bits: int) -> None:
    for name, make in sorted(DISTRIBUTIONS.items()):
        for size in (1, 2, 7, 1000, 20_011):
            codes = make(size, bits, size + 31 * bits)
            data = _coded(codes, bits)  # also where encode_codes falls back to packing
            out = decode_codes(data, bits=bits, count=size)
            assert out.dtype == np.uint8 and out.shape == (size,)
            assert np.array_equal(out, codes), (name, size)
            public = encode_codes(codes, bits=bits)
            assert public is None or public == data


@pytest.mark.parametrize("bits", [3, 8])
def test_round_trip_large_and_any_layout(bits: int) -> None:
    codes = _gaussian(1_000_003, bits, seed=bits)
    data = encode_codes(codes, bits=bits)
    assert data is not None
    assert np.array_equal(decode_codes(data, bits=bits, count=codes.size), codes)
    grid = codes[:1_000_000].reshape(1000, 1000)
    for layout in (np.asfortranarray(grid), grid.T[:, ::-1]):
        expected = encode_codes(np.ascontiguousarray(layout).reshape(-1), bits=bits)
        assert encode_codes(layout, bits=bits) == expected  # C order of any layout
        assert expected is not None
        out = decode_codes(expected, bits=bits, count=layout.size)
        assert np.array_equal(out, layout.reshape(-1))


def test_empty_is_none() -> None:
    for bits in WIDTHS:
        assert encode_codes(np.zeros(0, np.uint8), bits=bits) is None
        assert encode_codes(np.zeros((3, 0), np.uint8), bits=bits) is None


def test_known_layout() -> None:
    # 1000 codes, all 5, at 4 bits: version, bitmap 0b0010_0000 0x00, count 1000
    # (LEB128 e8 07), stream size 0.
    data = encode_codes(np.full(1000, 5, np.uint8), bits=4)
    assert data == bytes([FORMAT_VERSION, 0x20, 0x00, 0xE8, 0x07, 0x00])
    assert np.array_equal(decode_codes(data, bits=4, count=1000), np.full(1000, 5))
    # Two symbols (0: 300 times, 3: 700 times) at 2 bits: bitmap 0b1001, counts
    # 300 (ac 02) and 700 (bc 05), then a nonempty stream ending in a nonzero byte.
    codes = np.repeat(np.array([3, 0], np.uint8), [700, 300])
    data = encode_codes(np.random.default_rng(0).permutation(codes), bits=2)
    assert data is not None
    assert data[:6] == bytes([FORMAT_VERSION, 0b1001, 0xAC, 0x02, 0xBC, 0x05])
    head, counts, stream = _parts(data, bits=2)
    assert counts == [300, 700] and len(stream) > 0 and stream[-1] != 0


def test_deterministic() -> None:
    codes = _gaussian(50_000, 5, seed=3)
    first = encode_codes(codes, bits=5)
    assert first is not None
    assert encode_codes(codes.copy(), bits=5) == first
    assert encode_codes(codes.reshape(50, 1000), bits=5) == first  # shape is not coded
    other = codes.copy()
    other[0] ^= 1
    assert encode_codes(other, bits=5) != first


# ------------------------------------------------------------------------------ sizes


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8])
def test_size_close_to_shannon_bound(bits: int) -> None:
    # Coded bits = 8 header bytes + N H + ANS overhead. The overhead is the coder's
    # state beyond the information content (at most its 64 bits) plus byte rounding
    # (< 8), and 24-bit probabilities add a relative KL(p || q) far below 0.1%. The
    # lower end: for codes in random order the stream never beats N H (measured: the
    # overhead is 9..31 bits).
    for kind in ("gaussian", "laplace", "narrow-gaussian", "two-symbols"):
        for size in (10_000, 200_000):
            codes = DISTRIBUTIONS[kind](size, bits, size + bits)
            data = _coded(codes, bits)
            _, counts, stream = _parts(data, bits)
            header_bits = 8 * (len(data) - len(stream))
            bound = _shannon_bits(codes, bits)
            real = 8 * len(data)
            if len(counts) == 1:
                assert stream == b""
                continue
            assert header_bits + bound <= real <= header_bits + bound * 1.001 + 64 + 8
            if bound > 5_000:  # N >= 10_000 and H >= 0.5 bit: "within a few percent"
                assert real <= 1.02 * (header_bits + bound)


def test_estimate_matches_real_size() -> None:
    # |estimate - real| <= 24 bits + 0.1%: the ANS overhead varies by about +-8 bits
    # around ANS_OVERHEAD_BITS (9..31 measured), byte rounding adds +-4, and the
    # estimated stream size may need a varint byte more or less than the real one (+-8);
    # 24-bit probabilities add < 0.1%. For N >= 1000 that is within a few percent.
    rng = np.random.default_rng(11)
    worst = 0.0
    for trial in range(120):
        bits = int(rng.integers(1, 9))
        size = int(10 ** rng.uniform(3, 5.3))
        kind = ("gaussian", "laplace", "narrow-gaussian", "two-symbols", "uniform")[trial % 5]
        codes = DISTRIBUTIONS[kind](size, bits, trial)
        real = 8 * len(_coded(codes, bits))
        estimate = coded_size_estimate(np.bincount(codes, minlength=1 << bits))
        assert abs(estimate - real) <= 24 + 1e-3 * real, (bits, size, kind, estimate, real)
        assert abs(estimate - real) <= 0.05 * real
        worst = max(worst, abs(estimate - real) / real)
    assert worst > 0  # the estimate is not accidentally computed by coding


def test_estimate_constant_tensor_is_exact() -> None:
    for bits in WIDTHS:
        for size in (1000, 2**20):
            histogram = np.zeros(1 << bits, np.int64)
            histogram[-1] = size
            real = encode_codes(np.full(size, (1 << bits) - 1, np.uint8), bits=bits)
            assert real is not None
            assert coded_size_estimate(histogram) == 8 * len(real)


def test_estimate_is_shannon_plus_overhead() -> None:
    histogram = np.array([0, 250, 500, 250], np.int64)  # H = 1.5 bits
    header = 1 + 1 + 2 + 2 + 2  # version, bitmap, three 2-byte counts
    stream = 1000 * 1.5 + ANS_OVERHEAD_BITS
    size_varint = 2  # ceil(stream / 8) = 191 > 127
    assert coded_size_estimate(histogram) == pytest.approx(8 * (header + size_varint) + stream)


@pytest.mark.parametrize("bits", WIDTHS)
def test_uniform_codes_fall_back_to_packing(bits: int) -> None:
    for size in (1, 5, 100, 10_000, 200_000):
        codes = _uniform(size, bits, size * 8 + bits)
        assert encode_codes(codes, bits=bits) is None
        assert len(_coded(codes, bits)) >= packed_size(size, bits=bits)  # the reason


def test_skewed_codes_are_smaller_than_packed() -> None:
    for bits in WIDTHS:
        for kind in ("two-symbols", "narrow-gaussian", "gaussian", "constant-0"):
            codes = DISTRIBUTIONS[kind](10_000, bits, bits)
            entropy = _shannon_bits(codes, bits) / codes.size
            data = encode_codes(codes, bits=bits)
            if entropy > bits - 0.05:  # nearly uniform: nothing to gain
                continue
            assert data is not None, (bits, kind)
            assert len(data) < packed_size(codes.size, bits=bits)
            assert np.array_equal(decode_codes(data, bits=bits, count=codes.size), codes)


# ------------------------------------------------------------------- hostile input


def _valid(bits: int = 4, size: int = 5000, seed: int = 0) -> tuple[np.ndarray, bytes]:
    codes = _gaussian(size, bits, seed=seed)
    data = encode_codes(codes, bits=bits)
    assert data is not None
    return codes, data


def _rejects(data: bytes, *, bits: int = 4, count: int = 5000, match: str = "") -> None:
    with pytest.raises(ValueError, match=match):
        decode_codes(data, bits=bits, count=count)


def test_every_truncation_is_rejected() -> None:
    _, data = _valid()
    head, counts, stream = _parts(data, 4)
    header_end = len(data) - len(stream)
    cuts = list(range(header_end + 8)) + list(range(header_end + 8, len(data), 37))
    cuts.append(len(data) - 1)
    for cut in cuts:
        _rejects(data[:cut])
    _rejects(data[:2], match="ends inside the bitmap")
    _rejects(data[: header_end - 1], match="ends inside the stream size")
    _rejects(data[:-1], match="declares a")


def test_truncated_stream_with_consistent_size_is_rejected() -> None:
    # The stream size is rewritten to match, so only the ANS checks can catch it.
    _, data = _valid()
    head, counts, stream = _parts(data, 4)
    for keep in (1, 4, len(stream) // 2, len(stream) - 4, len(stream) - 1):
        forged = _join(head, counts, stream[:keep].rstrip(b"\x00") or b"\x01")
        _rejects(forged, match="stream")


def test_appended_bytes_are_rejected() -> None:
    _, data = _valid()
    head, counts, stream = _parts(data, 4)
    for extra in (b"\x00", b"\x01", b"\xff\xff\xff\xff", bytes(100)):
        _rejects(data + extra, match="trailing bytes")
        if extra[-1]:  # the same bytes inside a stream whose size claims them
            _rejects(_join(head, counts, stream + extra), match="stream")
    _rejects(_join(head, counts, stream + b"\x00"), match="last byte is 0")


def test_flipped_stream_bits_are_rejected() -> None:
    codes, data = _valid()
    head, counts, stream = _parts(data, 4)
    rng = np.random.default_rng(5)
    for position in [0, 1, len(stream) // 2, len(stream) - 2, *rng.integers(0, len(stream), 20)]:
        damaged = bytearray(stream)
        damaged[int(position)] ^= 1 << int(rng.integers(8))
        if damaged[-1] == 0:
            continue
        _rejects(_join(head, counts, bytes(damaged)), match="stream")


def test_header_count_mismatches_are_rejected() -> None:
    _, data = _valid()
    head, counts, stream = _parts(data, 4)
    _rejects(_join(head, [*counts[:-1], counts[-1] - 1], stream), match="counts sum to 4999")
    _rejects(_join(head, [*counts[:-1], counts[-1] + 1], stream), match="past `count`")
    swapped = [counts[1], counts[0], *counts[2:]]  # right total, wrong histogram
    _rejects(_join(head, swapped, stream), match="decodes more than")
    _rejects(data, count=4999)
    _rejects(data, count=5001)
    _rejects(data, bits=3)
    _rejects(data, bits=5)
    zero = [0, *counts[1:]]
    _rejects(_join(head, zero, stream), match="is 0, but the bitmap")


def test_huge_claims_fail_fast_without_allocating() -> None:
    _, data = _valid()
    head, counts, stream = _parts(data, 4)
    count = 10**6  # what the caller declares: the output would be 1 MB
    huge_count = head + _varint(2**60) + data[len(head) :]
    near_count = head + _varint(2**34 - 1) + data[len(head) :]
    consistent = [count - sum(counts[1:]), *counts[1:]]  # sums to `count`
    huge_stream = head + b"".join(_varint(n) for n in consistent) + _varint(2**34 - 1)
    forged = [
        (huge_count, "more than 5 bytes"),
        (near_count, "past `count`"),
        (huge_stream, "declares a 17179869183-byte stream"),
    ]
    tracemalloc.start()
    try:
        for payload, match in forged:
            tracemalloc.reset_peak()
            with pytest.raises(ValueError, match=match):
                decode_codes(payload, bits=4, count=count)
            _, peak = tracemalloc.get_traced_memory()
            # Nothing of size `count` or of the claimed sizes: a few small arrays only.
            assert peak < 64 * 1024, (match, peak)
        # Control: a valid tensor of the same `count` does allocate about `count` bytes
        # (the output), and at most a small multiple of `count + len(data)`.
        codes = _gaussian(count, 4, seed=1)
        valid = encode_codes(codes, bits=4)
        assert valid is not None
        tracemalloc.reset_peak()
        decode_codes(valid, bits=4, count=count)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count <= peak <= 4 * (count + len(valid)) + (4 << 20)


def test_garbage_stream_for_a_big_count_fails_in_the_first_chunk() -> None:
    # A header consistent with count = 2**24 but a 4-byte stream: constriction decodes
    # garbage silently (an exhausted coder yields index 0 forever), and the per-chunk
    # histogram check stops it within the first chunk, at most 1 MB of memory later.
    count = 2**24
    forged = _join(bytes([FORMAT_VERSION, 0b11]), [1000, count - 1000], b"\x12\x34\x56\x78")
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="more than the declared 1000 codes of symbol 0"):
            decode_codes(forged, bits=1, count=count)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= count + (4 << 20)  # the output and one chunk's indices


def test_symbol_beyond_bits_is_rejected() -> None:
    for bits, bitmap in ((1, 0b0101), (2, 0b1_0001), (2, 0b1000_0000)):
        forged = _join(bytes([FORMAT_VERSION, bitmap]), [5] * bin(bitmap).count("1"), b"\x01")
        symbol = bitmap.bit_length() - 1
        with pytest.raises(ValueError, match=f"marks symbol {symbol}"):
            decode_codes(forged, bits=bits, count=10)


def test_malformed_headers_are_rejected() -> None:
    _, data = _valid()
    head, counts, stream = _parts(data, 4)
    _rejects(b"", match="ends inside the version byte")
    _rejects(bytes([FORMAT_VERSION + 1]) + data[1:], match="format version 2")
    _rejects(bytes([0]) + data[1:], match="format version 0")
    _rejects(bytes([FORMAT_VERSION, 0, 0, 0]), match="no used symbol")
    non_minimal = bytes([FORMAT_VERSION, 0b0001, 0x85, 0x00, 0x00])  # count 5 in 2 bytes
    with pytest.raises(ValueError, match="non-minimal varint"):
        decode_codes(non_minimal, bits=2, count=5)
    assert np.array_equal(decode_codes(bytes([1, 1, 5, 0]), bits=2, count=5), np.zeros(5))
    one = _join(bytes([FORMAT_VERSION, 0b1000, 0]), [5000], b"\x07")
    _rejects(one, match="one used symbol needs no stream")
    _rejects(_join(head, counts, b""), match="need a stream")


def test_invalid_arguments() -> None:
    _, data = _valid()
    for bits in (0, 9, True, 4.0, "4"):
        with pytest.raises(ValueError, match="`bits`"):
            decode_codes(data, bits=bits, count=5000)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="`bits`"):
            encode_codes(np.zeros(3, np.uint8), bits=bits)  # type: ignore[arg-type]
    for count in (0, -1, 2**31, True, 5000.0):
        with pytest.raises(ValueError, match="`count`"):
            decode_codes(data, bits=4, count=count)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bytes-like"):
        decode_codes(data.hex(), bits=4, count=5000)  # type: ignore[arg-type]
    codes = _valid()[0]
    for like in (bytearray(data), memoryview(data)):  # bytes-like input is accepted
        assert np.array_equal(decode_codes(like, bits=4, count=5000), codes)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dtype uint8"):
        encode_codes(np.zeros(3, np.int64), bits=4)
    with pytest.raises(ValueError, match="numpy.ndarray"):
        encode_codes([1, 2, 3], bits=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"< 2\*\*bits = 16. Found `16`"):
        encode_codes(np.array([0, 16, 3], np.uint8), bits=4)


def test_estimate_rejects_bad_histograms() -> None:
    bad = [
        ([1, 2, 3, 4], "numpy.ndarray"),
        (np.ones(4, np.float64), "integer dtype"),
        (np.ones(3, np.int64), "2\\*\\*bits entries"),
        (np.ones(512, np.int64), "2\\*\\*bits entries"),
        (np.ones((2, 2), np.int64), "2\\*\\*bits entries"),
        (np.array([1, -1], np.int64), ">= 0"),
        (np.zeros(16, np.int64), "all zero"),
    ]
    for histogram, match in bad:
        with pytest.raises(ValueError, match=match):
            coded_size_estimate(histogram)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=64), bits=st.integers(1, 8), count=st.integers(1, 300))
def test_any_bytes_decode_or_raise_value_error(data: bytes, bits: int, count: int) -> None:
    try:
        out = decode_codes(bytes([FORMAT_VERSION]) + data, bits=bits, count=count)
    except ValueError:
        return
    assert out.shape == (count,) and int(out.max()) < 1 << bits
    assert _coded(out, bits) == bytes([FORMAT_VERSION]) + data  # only canonical data passes


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    bits=st.integers(1, 8),
    position=st.floats(0, 1, exclude_max=True),
    mask=st.integers(1, 255),
)
def test_mutated_encodings_decode_or_raise(
    seed: int, bits: int, position: float, mask: int
) -> None:
    codes = _gaussian(500, bits, seed=seed, spread=12.0)
    data = bytearray(_coded(codes, bits))
    data[int(position * len(data))] ^= mask
    try:
        out = decode_codes(bytes(data), bits=bits, count=codes.size)
    except ValueError:
        return
    assert _coded(out, bits) == bytes(data)  # whatever passes is a canonical encoding
