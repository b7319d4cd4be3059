"""Tests for fedquant.rotation: an explicit numpy oracle, orthogonality, typed errors.

Rounding tolerances: the kernel computes y in float32 in L + 2 steps that each round
with relative error <= u = 2**-24: the float32 constant 1/sqrt(b) (exact for even L),
the product with x, then L = log2(b) butterfly passes of sums and differences. A pass
errs by at most u times the norm of its output, and the later passes, orthogonal up to
a factor sqrt(2) each, scale that error as they scale the signal, so normwise
|y_computed - y| <= ((1 + u)**(L + 2) - 1) |x| <= gamma(L + 2) |x|, gamma(k) =
k u / (1 - k u) (Higham, "Accuracy and Stability of Numerical Algorithms", Lemma 3.1).
unrotate rounds in the same L + 2 steps.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pytest
import torch

from fedquant import _rotation_kernels
from fedquant.rotation import ROTATION_BLOCK, block_size, rotate, rotated_length, unrotate
from sims.bench.throughput import rotation_throughput

B = ROTATION_BLOCK
U = 2.0**-24  # unit roundoff of float32
MASK = (1 << 64) - 1
SIZES = [1, 2, 3, 5, 64, 1000, B - 1, B, B + 1, 3 * B + 17]


def _gamma(steps: int) -> float:
    return steps * U / (1 - steps * U)


def _steps(count: int) -> int:
    """Rounded steps of one transform of ``count`` elements: L + 2 (module docstring)."""
    return block_size(count).bit_length() - 1 + 2


def _splitmix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def _oracle_signs(count: int, seed: int) -> np.ndarray:
    """D as documented in fedquant._rotation_kernels, in Python integers."""
    key = _splitmix64(seed ^ int.from_bytes(b"fq-rht-1", "little"))
    words = [_splitmix64((key + row * 0x9E3779B97F4A7C15) & MASK) for row in range(count // 64 + 1)]
    bits = [(words[i >> 6] >> (i & 63)) & 1 for i in range(count)]
    return 1.0 - 2.0 * np.array(bits, dtype=np.float64)


@cache
def _hadamard(b: int) -> np.ndarray:
    """Sylvester's recursion H_{2m} = [[H_m, H_m], [H_m, -H_m]], float64."""
    h = np.ones((1, 1))
    while h.shape[0] < b:
        h = np.block([[h, h], [h, -h]])
    h.flags.writeable = False
    return h


def _oracle_rotate(x: np.ndarray, seed: int) -> np.ndarray:
    """H D x / sqrt(b) per block in float64, x zero-padded to rotated_length."""
    b = block_size(x.size)
    padded = np.zeros(rotated_length(x.size))
    padded[: x.size] = x
    signed = _oracle_signs(padded.size, seed) * padded
    return (signed.reshape(-1, b) @ _hadamard(b)).reshape(-1) / math.sqrt(b)  # H symmetric


def _kernel_signs(count: int, seed: int) -> np.ndarray:
    """The kernel's D for a multiple of the block: d = H y / sqrt(b) for y = rotate(1)."""
    b = block_size(count)
    y = rotate(np.ones(count, np.float32), seed).astype(np.float64)
    d = (y.reshape(-1, b) @ _hadamard(b)).reshape(-1) / math.sqrt(b)
    assert np.all(np.abs(np.abs(d) - 1.0) < 1e-3)
    return np.sign(d)


def _gaussian(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(count).astype(np.float32)


def _norm(v: np.ndarray) -> float:
    return float(np.linalg.norm(v.astype(np.float64)))


# ----------------------------------------------------------------------------- sizes


def test_block_size_and_rotated_length() -> None:
    assert [block_size(n) for n in (0, 1, 2, 3, 4, 5, 1000, 1025)] == [1, 1, 2, 4, 4, 8, 1024, 2048]
    assert block_size(B) == block_size(B + 1) == block_size(10**7) == B
    assert [rotated_length(n) for n in (0, 1, 2, 3, 5, 1000)] == [0, 1, 2, 4, 8, 1024]
    assert rotated_length(B + 1) == 2 * B
    assert rotated_length(3 * B + 17) == 4 * B
    assert rotated_length(np.int64(7)) == 8


def test_rotation_block_fits_the_kernel_schedule() -> None:
    assert B & (B - 1) == 0
    assert 1 < B <= 1 << _rotation_kernels.MAX_LOG_BLOCK


# ----------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("count", SIZES)
def test_matches_numpy_oracle(count: int) -> None:
    seed = 1000 + count
    x = _gaussian(count, seed)
    y = rotate(x, seed)
    assert y.dtype == np.float32 and y.shape == (rotated_length(count),)
    ref = _oracle_rotate(x.astype(np.float64), seed)
    assert _norm(y - ref) <= _gamma(_steps(count)) * _norm(x)


def test_oracle_is_sensitive_to_the_signs_and_the_order() -> None:
    # The tolerance above is far below what a wrong sign or a permuted H would cost.
    x = _gaussian(B, 7)
    y = rotate(x, 7).astype(np.float64)
    tol = _gamma(_steps(B)) * _norm(x)
    assert _norm(y - _oracle_rotate(x.astype(np.float64), 8)) > 1000 * tol
    assert _norm(y[::-1] - _oracle_rotate(x.astype(np.float64), 7)) > 1000 * tol


# ----------------------------------------------------------------------------- orthogonality


@pytest.mark.parametrize("count", [1, 3, 100, B, 5 * B + 3])
def test_norm_and_inner_products_are_preserved(count: int) -> None:
    x = _gaussian(count, 2 * count)
    z = _gaussian(count, 2 * count + 1)
    y, w = rotate(x, 11), rotate(z, 11)
    g = _gamma(_steps(count))
    nx, nz = _norm(x), _norm(z)
    assert abs(_norm(y) - nx) <= g * nx
    # <y, w> - <x, z> = <y - Hx, w> + <Hx, w - Hz>: both terms bounded as above
    inner = float(np.dot(y.astype(np.float64), w.astype(np.float64)))
    exact = float(np.dot(x.astype(np.float64), z.astype(np.float64)))
    assert abs(inner - exact) <= (2 * g + g * g) * nx * nz


@pytest.mark.parametrize("count", [0, 1, 2, 3, 7, 64, 100, B - 1, B, B + 1, 5 * B + 3])
def test_unrotate_inverts_rotate(count: int) -> None:
    x = _gaussian(count, 3 * count)
    seed = 2**64 - 1 - count
    back = unrotate(rotate(x, seed), count, seed)
    assert back.dtype == np.float32 and back.shape == (count,)
    # two transforms of L + 1 rounded steps each
    assert _norm(back - x) <= _gamma(2 * _steps(count)) * _norm(x)


def test_unrotate_is_the_oracle_transpose() -> None:
    count = 2 * B + 5
    y = _gaussian(rotated_length(count), 4)
    b = block_size(count)
    ref = (
        _oracle_signs(y.size, 9)
        * (y.astype(np.float64).reshape(-1, b) @ _hadamard(b)).reshape(-1)
        / math.sqrt(b)
    )
    x = unrotate(y, count, 9)
    assert _norm(x - ref[:count]) <= _gamma(_steps(count)) * _norm(y)


def test_float64_input_is_rounded_to_float32_first() -> None:
    x = np.random.default_rng(5).standard_normal(B + 9)
    assert np.array_equal(rotate(x, 3), rotate(x.astype(np.float32), 3))
    y = rotate(x, 3)
    assert np.array_equal(unrotate(y.astype(np.float64), x.size, 3), unrotate(y, x.size, 3))


def test_strided_input_and_inputs_untouched() -> None:
    base = _gaussian(2 * B, 6)
    view = base[::2]
    assert np.array_equal(rotate(view, 4), rotate(view.copy(), 4))
    before = base.copy()
    y = rotate(base, 4)
    y_before = y.copy()
    unrotate(y, base.size, 4)
    assert np.array_equal(base, before) and np.array_equal(y, y_before)


def test_read_only_and_unaligned_inputs_share_one_compiled_kernel() -> None:
    x = _gaussian(B + 9, 8)
    read_only = x.copy()
    read_only.flags.writeable = False
    raw = np.zeros(4 * x.size + 1, np.uint8)
    unaligned = np.frombuffer(raw.data, np.float32, count=x.size, offset=1)
    unaligned[:] = x
    assert not unaligned.flags.aligned
    y = rotate(x, 2)
    y_read_only = y.copy()
    y_read_only.flags.writeable = False
    for variant in (read_only, unaligned):
        assert np.array_equal(rotate(variant, 2), y)
    assert np.array_equal(unrotate(y_read_only, x.size, 2), unrotate(y, x.size, 2))
    # numba would compile (seconds) a separate kernel per array type it meets
    assert len(_rotation_kernels.rotate_blocks.signatures) == 1
    assert len(_rotation_kernels.unrotate_blocks.signatures) == 1


def test_spike_spreads_evenly_over_its_block() -> None:
    # x = A e_i: its block becomes d_i A H[:, i] / sqrt(b), every entry of size A / sqrt(b)
    count = 3 * B
    x = np.zeros(count, np.float32)
    x[B + 123] = 1000.0
    y = rotate(x, 12)
    block = y[B : 2 * B]
    assert np.allclose(np.abs(block), 1000.0 / math.sqrt(B), rtol=_gamma(_steps(count)))
    assert not np.any(y[:B]) and not np.any(y[2 * B :])


# ----------------------------------------------------------------------------- signs


def test_same_seed_same_output_and_signs_depend_only_on_seed_and_index() -> None:
    x = _gaussian(3 * B + 17, 1)
    assert np.array_equal(rotate(x, 123), rotate(x.copy(), 123))
    assert not np.array_equal(rotate(x, 123), rotate(x, 124))
    # a longer tensor with the same block gets the same signs on the common prefix
    assert np.array_equal(_kernel_signs(2 * B, 77), _kernel_signs(8 * B, 77)[: 2 * B])
    assert np.array_equal(_kernel_signs(2 * B, 77), _oracle_signs(2 * B, 77))


@pytest.mark.parametrize("seed", [0, 1, 2**63, 2**64 - 1])
def test_signs_are_balanced_and_uncorrelated(seed: int) -> None:
    # Fair, independent signs: the count of -1 is Binomial(n, 1/2), sd sqrt(n)/2; the
    # agreement with another seed's signs is Binomial(n, 1/2) too; the lag-1 and lag-64
    # products d_i d_(i+k) have mean 0 and sd 1/sqrt(n). All within 4 sd (a fair
    # generator fails one of these 16 checks with probability about 1e-3).
    n = 32 * B
    d = _kernel_signs(n, seed)
    other = _kernel_signs(n, seed ^ 1)
    sd = math.sqrt(n) / 2
    assert abs(np.count_nonzero(d < 0) - n / 2) <= 4 * sd
    assert abs(np.count_nonzero(d == other) - n / 2) <= 4 * sd
    for lag in (1, 64):
        assert abs(float(np.mean(d[:-lag] * d[lag:]))) <= 4 / math.sqrt(n - lag)


# ----------------------------------------------------------------------------- Gaussianization


def _excess_kurtosis(v: np.ndarray) -> float:
    c = v.astype(np.float64) - v.mean(dtype=np.float64)
    return float(np.mean(c**4) / np.mean(c**2) ** 2 - 3.0)


def test_heavy_tails_become_gaussian() -> None:
    """Student-t with 3 dof (infinite kurtosis) has excess kurtosis near 0 after rotation.

    Given x, a rotated coordinate of block k is sum_j e_j x_j / sqrt(b) over the block,
    with independent fair signs e_j, so E y^4 = 3 s_k^2 - 2 sum_k x^4 / b^2 with
    s_k = |x_k|^2 / b, and over all blocks the expected excess kurtosis is
    mean(3 s_k^2 - 2 sum_k x^4 / b^2) / mean(s_k)^2 - 3 (blocks of unequal norm add a
    positive term). The sample value
    for n near-Gaussian values deviates from it by about sqrt(24 / n) (over 300 sign
    seeds for this x: sd 0.0145, theory 0.0135, mean deviation 1e-4); allowed: 5 of that.
    """
    n = 64 * B
    x = np.random.default_rng(2024).standard_t(3, n).astype(np.float32)
    assert _excess_kurtosis(x) > 20
    y = rotate(x, 99)
    blocks = x.astype(np.float64).reshape(-1, B)
    s = (blocks**2).sum(axis=1) / B
    fourth = 3 * s**2 - 2 * (blocks**4).sum(axis=1) / B**2
    predicted = float(fourth.mean() / s.mean() ** 2 - 3)
    assert abs(predicted) < 0.3
    assert abs(_excess_kurtosis(y) - predicted) <= 5 * math.sqrt(24 / n)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("x", "found"),
    [
        (np.zeros(4, np.int64), "int64"),
        (np.zeros(4, np.float16), "float16"),
        (np.zeros(4, np.complex64), "complex64"),
        (np.zeros((2, 2), np.float32), "(2, 2)"),
        (np.float32(1.0), "float32"),
        (np.zeros((), np.float32), "()"),
        ([1.0, 2.0], "list"),
        (torch.zeros(4), "Tensor"),
    ],
)
def test_rotate_rejects_wrong_arrays(x: object, found: str) -> None:
    with pytest.raises(ValueError, match="`x`") as info:
        rotate(x, 0)  # type: ignore[arg-type]
    assert found in str(info.value)
    with pytest.raises(ValueError, match="`y`") as info:
        unrotate(x, 4, 0)  # type: ignore[arg-type]
    assert found in str(info.value)


@pytest.mark.parametrize("seed", [-1, 2**64, True, 1.0, None, "1"])
def test_invalid_seed(seed: object) -> None:
    x = np.zeros(4, np.float32)
    for call in (lambda: rotate(x, seed), lambda: unrotate(x, 4, seed)):  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="`seed`") as info:
            call()
        assert repr(seed) in str(info.value)


def test_numpy_integer_seed_and_count() -> None:
    x = _gaussian(100, 0)
    y = rotate(x, np.uint64(2**64 - 1))
    assert np.array_equal(y, rotate(x, 2**64 - 1))
    assert np.array_equal(
        unrotate(y, np.int64(100), np.uint64(2**64 - 1)), unrotate(y, 100, 2**64 - 1)
    )


@pytest.mark.parametrize("count", [-1, True, 3.0, None])
def test_invalid_count(count: object) -> None:
    for call in (
        lambda: block_size(count),  # type: ignore[arg-type]
        lambda: rotated_length(count),  # type: ignore[arg-type]
        lambda: unrotate(np.zeros(4, np.float32), count, 0),  # type: ignore[arg-type]
    ):
        with pytest.raises(ValueError, match="`count`") as info:
            call()
        assert repr(count) in str(info.value)


@pytest.mark.parametrize(("size", "count"), [(4, 5), (8, 4), (0, 1), (1, 0), (B, B + 1)])
def test_unrotate_rejects_length_mismatch(size: int, count: int) -> None:
    with pytest.raises(ValueError, match="`y` must have") as info:
        unrotate(np.zeros(size, np.float32), count, 0)
    assert f"Found `{size}`" in str(info.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e39])
def test_non_finite_values_rejected(bad: float) -> None:
    x = np.zeros(2 * B + 3, np.float64)
    x[B + 5] = bad
    with pytest.raises(ValueError, match="`x` must contain only finite"):
        rotate(x, 0)
    y = np.zeros(rotated_length(x.size), np.float32)
    y[-1] = np.float32(bad)  # in the padding of the last block: still every output there
    with pytest.raises(ValueError, match="`y` must contain only finite"):
        unrotate(y, x.size, 0)


def test_overflow_rejected() -> None:
    x = np.full(B, 3e38, np.float32)  # finite, but the block's sum is not
    with pytest.raises(ValueError, match="`x` must contain only finite"):
        rotate(x, 0)


# ----------------------------------------------------------------------------- benchmark


def test_rotation_throughput_rows_smoke() -> None:
    rows = rotation_throughput(numel=20_000, repeats=1)
    assert [row["method"].split()[0] for row in rows] == ["quantize+pack", "rotate", "unrotate"]
    for row in rows:
        assert set(row) == {"method", "mb_per_s", "ratio_vs_quantize_pack"}
        assert row["mb_per_s"] > 0
    assert rows[0]["ratio_vs_quantize_pack"] == 1.0
