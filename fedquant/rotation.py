"""Randomized Hadamard transform (RHT) of a flattened tensor, before quantization.

Suresh, Yu, Kumar & McMahan, "Distributed Mean Estimation with Limited Communication",
ICML 2017 (stochastic rotated quantization: the rotation H D before stochastic rounding
lowers the MSE of the mean of n d-dimensional vectors from O(d / n) to O(log d / n));
Vargaftik et al., DRIVE (NeurIPS 2021) and EDEN (ICML 2022), which use this transform
in place of a uniform random rotation. For x of ``count`` elements, zero-padded to
``rotated_length(count)``, and each block of b = ``block_size(count)`` consecutive
elements::

    y = H D x / sqrt(b)          rotate      (orthogonal: |y| = |x|, <y, y'> = <x, x'>)
    x = D H y / sqrt(b)          unrotate    (H = H^T, H H = b I, D D = I)

H is the Sylvester-ordered Walsh-Hadamard matrix, H[r, c] = (-1)**popcount(r & c), and
D = diag(+-1) the signs of a counter-based hash of (seed, element index), so that the
server regenerates D from the seed alone (the hash is specified in
``fedquant._rotation_kernels``). Each coordinate of y is a +-1-weighted sum of b
coordinates of x, so heavy tails and outliers spread over the block and y is close to
Gaussian, which a clipped uniform grid quantizes far better.

Caveats. One RHT is not a uniform random rotation: for adversarial x single
coordinates of y can stay far from Gaussian (a second RHT with independent signs is
the usual remedy; not done here). Blocks are rotated independently: y mixes nothing across
blocks, so a tensor whose blocks differ in norm stays a scale mixture, which one clip
threshold for the whole tensor still sees. The padding is quantized and sent too:
up to 2x for small tensors (count just above a power of two), under one block for
large ones.

Arithmetic: float32 throughout (float64 input is rounded to float32 first); 1/sqrt(b)
is applied once, with the signs, and is exact for even log2(b). The FWHT runs in place,
block by block, in the numba kernels of ``fedquant._rotation_kernels``; the first call
in a process compiles them (a few seconds) or loads them from numba's on-disk cache.
"""

from __future__ import annotations

import math

import numpy as np

from fedquant import _rotation_kernels

__all__ = ["ROTATION_BLOCK", "block_size", "rotate", "rotated_length", "unrotate"]

# The largest block, a power of two <= 2**_rotation_kernels.MAX_LOG_BLOCK. Speed barely
# depends on it (1M float32 elements on the 2-core dev box: about 1.0 ms at b = 256 and
# 1.2 ms at b = 16384, 2-2.5x the throughput of 4-bit quantize + pack), so it is chosen
# for the error. Measured on 20-step SGD updates of the MNIST CNN and ResNet (from
# initialization and after 200 steps; per-tensor excess kurtosis up to 395): relative
# squared error |x - x_hat|**2 / |x|**2 of 4-bit OCTAV stochastic quantization after
# the rotation, charged for the bits the padding costs (x 2**(8 p) for a padded
# fraction p at 4 bits; more bits per coordinate would buy that much):
#     b             none   1024   2048   4096   8192
#     CNN, init     0.085  0.031  0.030  0.031  0.033
#     CNN, 200      0.341  0.069  0.047  0.038  0.035
#     ResNet, init  0.049  0.024  0.030  0.043  0.097
#     ResNet, 200   0.045  0.026  0.031  0.044  0.100
# Larger blocks Gaussianize the structured CNN updates better (fc1 after 200 steps:
# kurtosis 395 -> 3.2 at b = 2048, 1.1 at 4096) but pad the ResNet's tensors of
# 9 x 2**k elements (2304 ... 36864) by up to 78%. 2048 has the lowest geometric mean
# of the four (0.034; 1024: 0.034, 4096: 0.039) and a worst case (0.047) within 7% of
# the best one (4096: 0.044).
ROTATION_BLOCK = 2048

_SEED_LIMIT = 1 << 64


def _check_count(count: object) -> int:
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"`count` must be an integer >= 0. Found `{count!r}`.")
    return int(count)


def _check_seed(seed: object) -> int:
    if (
        isinstance(seed, bool)
        or not isinstance(seed, (int, np.integer))
        or not 0 <= seed < _SEED_LIMIT
    ):
        raise ValueError(f"`seed` must be an integer in [0, 2**64). Found `{seed!r}`.")
    return int(seed)


def _check_vector(array: object, name: str) -> np.ndarray:
    """The 1-D float32/float64 numpy array as contiguous, aligned, writable float32.

    A copy only where the array is none of these: each kernel is then compiled for one
    array type (numba compiles read-only and unaligned arrays separately, in seconds).
    """
    if not isinstance(array, np.ndarray):
        raise ValueError(f"`{name}` must be a numpy.ndarray. Found `{type(array).__name__}`.")
    if array.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D. Found shape `{array.shape}`.")
    if array.dtype not in (np.float32, np.float64):
        raise ValueError(f"`{name}` must have dtype float32 or float64. Found `{array.dtype}`.")
    with np.errstate(over="ignore"):  # float64 beyond float32's range: inf, rejected later
        return np.require(array, np.float32, ["C", "A", "W"])


def _check_finite(result: np.ndarray, name: str) -> None:
    """ValueError unless every element is finite.

    A NaN or inf in a block of the input makes every output of that block NaN or inf;
    an output can also overflow when |input| is within a factor sqrt(b) of float32's
    range. Both show in the output, so it alone is checked.
    """
    if not np.isfinite(result).all():
        raise ValueError(
            f"`{name}` must contain only finite values within float32 range. "
            "Found NaN, inf, or a value whose transform overflows."
        )


def block_size(count: int) -> int:
    """Block size b of a tensor of ``count`` elements: min(ROTATION_BLOCK, 2**ceil(log2 count)).

    1 for count <= 1 (the rotation is then a sign flip).
    """
    count = _check_count(count)
    if count <= 1:
        return 1
    return min(ROTATION_BLOCK, 1 << (count - 1).bit_length())


def rotated_length(count: int) -> int:
    """``count`` rounded up to a multiple of ``block_size(count)`` (0 for 0)."""
    b = block_size(count)
    return -(-count // b) * b


def rotate(x: np.ndarray, seed: int) -> np.ndarray:
    """``y = H D x / sqrt(b)`` per block of b, x zero-padded to ``rotated_length(x.size)``.

    The rotation of Suresh et al. (ICML 2017); notation in the module docstring. ``x``: 1-D
    float32 or float64 numpy array (float64 is rounded to float32 first); ``seed``: an
    integer in [0, 2**64) that fixes the signs D. Returns a new float32 array; the
    rotation is orthogonal, so ``|y| = |x|`` up to float32 rounding. ValueError for a
    wrong type, shape, dtype or seed, and for NaN or inf in x (or an overflow).
    """
    flat = _check_vector(x, "x")
    seed = _check_seed(seed)
    b = block_size(flat.size)
    y = np.empty(rotated_length(flat.size), np.float32)
    scale = np.float32(1.0 / math.sqrt(b))
    _rotation_kernels.rotate_blocks(flat, y, np.uint64(seed), b.bit_length() - 1, scale)
    _check_finite(y, "x")
    return y


def unrotate(y: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``x = D H y / sqrt(b)`` per block of b, truncated to ``count``: the inverse of ``rotate``.

    ``y``: 1-D float32 or float64 numpy array of ``rotated_length(count)`` elements
    (float64 is rounded to float32 first), e.g. the dequantized codes of ``rotate(x,
    seed)``, or an average of rotations made with one seed (the transform is linear, so
    that unrotates to the average); ``seed``: the seed ``rotate`` used. Returns a new
    float32 array of ``count`` elements. ValueError for a wrong type, shape, dtype,
    length, count or seed, and for NaN or inf in y.
    """
    count = _check_count(count)
    flat = _check_vector(y, "y")
    seed = _check_seed(seed)
    expected = rotated_length(count)
    if flat.size != expected:
        raise ValueError(
            f"`y` must have rotated_length(count) = {expected} elements for count = {count}. "
            f"Found `{flat.size}`."
        )
    b = block_size(count)
    x = np.empty(count, np.float32)
    scale = np.float32(1.0 / math.sqrt(b))
    _rotation_kernels.unrotate_blocks(flat, x, np.uint64(seed), b.bit_length() - 1, scale)
    _check_finite(x, "y")
    return x
