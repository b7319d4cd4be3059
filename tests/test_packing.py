"""Tests for fedquant.packing: round trips, an independent oracle, typed errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedquant.packing import pack_codes, packed_size, unpack_codes

WIDTHS = range(1, 9)
SIZES = [0, 1, 7, 8, 9, 1000]


def _oracle_bits(codes: np.ndarray, bits: int) -> bytes:
    """Bit-string construction: code i -> bits B*i .. B*i+B-1, LSB first, via numpy."""
    stream = ((codes[:, None].astype(np.int64) >> np.arange(bits)) & 1).astype(np.uint8)
    return np.packbits(stream.reshape(-1), bitorder="little").tobytes()


def _oracle_int(codes: np.ndarray, bits: int) -> bytes:
    """Python big-int construction: sum(c_i << (B*i)) as little-endian bytes."""
    value = 0
    for i, code in enumerate(codes.tolist()):
        value |= code << (bits * i)
    return value.to_bytes((len(codes) * bits + 7) // 8, "little")


def _random_codes(size: int, bits: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**bits, size, dtype=np.uint8)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("size", SIZES)
def test_round_trip_random_and_all_max(bits: int, size: int) -> None:
    all_max = np.full(size, 2**bits - 1, np.uint8)
    for codes in (_random_codes(size, bits, seed=size * 8 + bits), all_max):
        data = pack_codes(codes, bits=bits)
        assert isinstance(data, bytes)
        assert len(data) == packed_size(size, bits=bits) == -(-size * bits // 8)
        out = unpack_codes(data, bits=bits, count=size)
        assert out.dtype == np.uint8 and out.shape == (size,)
        assert np.array_equal(out, codes)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("size", [1, 3, 8, 13, 63, 64, 65, 128, 257, 4_099])
def test_matches_independent_oracles(bits: int, size: int) -> None:
    codes = _random_codes(size, bits, seed=bits * 1000 + size)
    data = pack_codes(codes, bits=bits)
    assert data == _oracle_bits(codes, bits)
    assert data == _oracle_int(codes, bits)  # also: pad bits of the last byte are zero


def test_known_layout() -> None:
    # 3-bit codes 1, 2, 7: bits 001 | 010 | 111 from the LSB: 0b1_1101_0001 -> d1 01
    assert pack_codes(np.array([1, 2, 7], np.uint8), bits=3) == bytes([0xD1, 0x01])
    assert pack_codes(np.array([1, 2, 3, 0], np.uint8), bits=2) == bytes([0b00_11_10_01])
    assert pack_codes(np.array([0xA, 0x5], np.uint8), bits=4) == bytes([0x5A])


@pytest.mark.parametrize("bits", [1, 4, 6])
def test_torch_input_and_c_order(bits: int) -> None:
    codes = torch.from_numpy(_random_codes(60, bits, seed=bits)).reshape(3, 4, 5)
    expected = pack_codes(codes.numpy().reshape(-1), bits=bits)
    assert pack_codes(codes, bits=bits) == expected
    assert pack_codes(codes.numpy(), bits=bits) == expected
    transposed = codes.transpose(0, 2)  # non-contiguous: packed in its own C order
    assert pack_codes(transposed, bits=bits) == pack_codes(transposed.contiguous(), bits=bits)


def test_large_round_trip() -> None:
    for bits in WIDTHS:
        codes = _random_codes(1_000_003, bits, seed=bits)
        out = unpack_codes(pack_codes(codes, bits=bits), bits=bits, count=codes.size)
        assert np.array_equal(out, codes)


def test_unpack_ignores_nonzero_pad_bits() -> None:
    codes = np.array([5, 3, 6], np.uint8)  # 9 bits: 7 pad bits in the second byte
    data = bytearray(pack_codes(codes, bits=3))
    data[-1] |= 0xFE
    assert np.array_equal(unpack_codes(bytes(data), bits=3, count=3), codes)


def test_unpack_returns_owned_writable_array() -> None:
    data = pack_codes(np.arange(16, dtype=np.uint8), bits=8)
    out = unpack_codes(data, bits=8, count=16)
    out[0] = 99  # must not touch `data`
    assert data[0] == 0 and out.flags.writeable


@pytest.mark.parametrize("bits", [0, 9, -3, True, 2.0, None])
def test_invalid_bits(bits: object) -> None:
    with pytest.raises(ValueError, match="`bits`"):
        pack_codes(np.zeros(4, np.uint8), bits=bits)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`bits`"):
        unpack_codes(b"\x00", bits=bits, count=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`bits`"):
        packed_size(4, bits=bits)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "codes",
    [
        np.zeros(4, np.int64),
        np.zeros(4, np.float32),
        torch.zeros(4, dtype=torch.int32),
        [0, 1, 2],
    ],
)
def test_invalid_code_dtype(codes: object) -> None:
    with pytest.raises(ValueError, match="`codes`"):
        pack_codes(codes, bits=4)  # type: ignore[arg-type]


@pytest.mark.parametrize("bits", range(1, 8))
def test_code_too_large(bits: int) -> None:
    for size, bad in ((10, 7), (200, 3), (200, 150), (200, 199)):  # in a full group or the tail
        codes = np.zeros(size, np.uint8)
        codes[bad] = 2**bits
        with pytest.raises(ValueError, match=f"Found `{2**bits}`"):
            pack_codes(codes, bits=bits)
        codes[bad] = 255
        with pytest.raises(ValueError, match="Found `255`"):
            pack_codes(codes, bits=bits)


def test_invalid_unpack_arguments() -> None:
    with pytest.raises(ValueError, match="`data`"):
        unpack_codes(b"\x00\x00", bits=4, count=2)  # needs 1 byte
    with pytest.raises(ValueError, match="`data`"):
        unpack_codes(b"", bits=4, count=1)
    with pytest.raises(ValueError, match="`data`"):
        unpack_codes("ab", bits=4, count=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`count`"):
        unpack_codes(b"", bits=4, count=-1)
    with pytest.raises(ValueError, match="`count`"):
        unpack_codes(b"", bits=4, count=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`count`"):
        packed_size(-1, bits=3)
    assert unpack_codes(bytearray(b"\x21"), bits=4, count=2).tolist() == [1, 2]
    assert unpack_codes(memoryview(b"\x21"), bits=4, count=2).tolist() == [1, 2]


@st.composite
def _code_arrays(draw: st.DrawFn) -> tuple[int, np.ndarray]:
    bits = draw(st.integers(1, 8))
    values = draw(st.lists(st.integers(0, 2**bits - 1), max_size=300))
    return bits, np.array(values, dtype=np.uint8)


@given(_code_arrays())
@settings(max_examples=300, deadline=None)
def test_hypothesis_round_trip(case: tuple[int, np.ndarray]) -> None:
    bits, codes = case
    data = pack_codes(codes, bits=bits)
    assert data == _oracle_int(codes, bits)
    assert np.array_equal(unpack_codes(data, bits=bits, count=codes.size), codes)


@given(st.binary(max_size=64), st.integers(-2, 10), st.integers(-2, 600))
@settings(max_examples=300, deadline=None)
def test_hypothesis_any_bytes_decode_or_typed_error(data: bytes, bits: int, count: int) -> None:
    try:
        out = unpack_codes(data, bits=bits, count=count)
    except ValueError:
        return
    assert out.dtype == np.uint8 and out.shape == (count,)
    assert int(out.max(initial=0)) < 2**bits
    assert pack_codes(out, bits=bits) == _canonical(data, bits, count)


def _canonical(data: bytes, bits: int, count: int) -> bytes:
    """``data`` with its pad bits cleared (what pack_codes writes)."""
    used = count * bits
    value = int.from_bytes(data, "little") & ((1 << used) - 1)
    return value.to_bytes(len(data), "little")


def test_read_only_input() -> None:
    codes = _random_codes(1_001, 5, seed=3)
    frozen = np.frombuffer(codes.tobytes(), np.uint8)  # read-only view of bytes
    assert not frozen.flags.writeable
    assert pack_codes(frozen, bits=5) == _oracle_int(codes, 5)
