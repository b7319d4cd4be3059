"""Clipped uniform quantizer with OCTAV clipping (PAPERS.md, section B).

Bozorgasl & Chen, "Communication-Efficient Federated Learning via Clipped Uniform
Quantization", arXiv 2405.13365 (CISS 2025), quantizer; Sakr et al., "Optimal Clipping
and Magnitude-aware Differentiation for Improved Quantization-aware Training", ICML 2022
(OCTAV), clip threshold.

For a tensor x, bit width B, clip threshold s > 0 and n = 2**B - 1::

    y    = clip(x, -s, s) / (2 s) + 1/2                 in [0, 1]
    c    = floor(n y + U),  U ~ U[0, 1)                  Rounding.STOCHASTIC (E[c] = n y)
    c    = floor(n y + 1/2)                              Rounding.NEAREST
    x_hat = s (2 c / n - 1)                              2**B levels, including +-s, no zero

Implementation notes (the arithmetic actually executed):

* Work is done on u = x * a with a = n / (2 s) (float32 for float32/float16/bfloat16
  input, float64 for float64 input or when float32 would overflow). In u-units the levels
  are the half-integers -n/2, ..., n/2. For ``ClipRule.MAX`` the float multiplier a is
  rounded down so that |u| <= n/2 holds in floating point.
* Nearest rounding is ``floor(clip(u)) + 1/2`` in u-units, the code
  c = floor(clip(u)) + (n + 1)/2.
* Stochastic rounding uses 24 random bits per element: with t = clip(u) + n/2 = n y
  rounded to 24 fractional bits (exact for float32 t >= 1/2), c = floor(t + k 2**-24),
  k uniform on 0..2**24 - 1, evaluated in uint32 as ``(t 2**24 + k) >> 24``. So
  E[c] = t exactly: the dither adds no bias beyond the float rounding of n y, and values
  on the grid keep their code. k comes from a counter-based hash of (one draw of the
  caller's ``torch.Generator``, element index): codes do not depend on the number of
  worker threads. Details in ``fedquant._kernels``.
* The squared error sum((u - level_u)**2) is accumulated in float64 (from partial sums
  of 16 terms in the working precision) and ``mse = sum / (N a**2)``; a non-finite
  result falls back to an exact float64 pass.
* max|x|, the codes and their error, and OCTAV's search run in numba kernels
  (``fedquant._kernels``): one pass over x for max|x| and one for codes and error.
  Without numba a numpy pipeline computes the same nearest codes and error (stochastic
  codes then come from a numpy SFC64 stream with a 16-bit dither, and differ).
* Large tensors are split over a small thread pool (the kernels release the GIL);
  sizes below 2**20 elements per worker run on the calling thread.
"""

from __future__ import annotations

import enum
import functools
import math
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from fedquant.backend import load_kernels

__all__ = [
    "ClipRule",
    "QuantizedTensor",
    "Rounding",
    "clip_threshold",
    "dequantize",
    "octav_clip",
    "quantize",
    "rounding_error_floor",
]

_MIN_BITS = 1
_MAX_BITS = 8
_CHUNK = 1 << 17  # elements per chunk; buffers of 512 KiB (float32) stay in L2
_RNG_BLOCK = 1 << 20  # elements per independent random stream (multiple of _CHUNK)
_PARALLEL_MIN = 1 << 20  # below this many elements per worker, stay single-threaded
_OCTAV_SAMPLE = 1 << 16  # OCTAV runs on at most this many |x| values
_OCTAV_RUN = 64  # consecutive elements per stratum of the OCTAV subsample
_OCTAV_SAMPLE_SEED = 0x0C7A5  # fixed seed of the OCTAV subsample (never the clock)
_RNG_BITS = 16  # random bits per element for stochastic rounding (numpy pipeline)
_DITHER_SCALE = 2.0**24  # 24-bit dither of the numba kernel
_CPUS = os.cpu_count() or 1


_kernels = load_kernels()  # None without numba


class Rounding(enum.Enum):
    """How n*y in [0, n] is rounded to an integer code c in 0..n.

    STOCHASTIC: ``c = floor(n*y + u)`` with ``u ~ U[0, 1)``; unbiased, E[c] = n*y
        (Bozorgasl & Chen 2024, Sec. II). The expected squared error of one element with
        fractional part f is ``f (1 - f) Delta**2`` (<= Delta**2 / 4), Delta = 2 s / n.
    NEAREST: ``c = round(n*y)``, computed as ``floor(n*y + 1/2)`` (ties go up);
        deterministic, error at most Delta / 2.
    """

    STOCHASTIC = "stochastic"
    NEAREST = "nearest"


class ClipRule(enum.Enum):
    """How the clip threshold s is chosen from the tensor.

    MAX: ``s = max|x|`` (no clipping; the "conventional" baseline).
    OCTAV: the s minimizing the mean squared error of this quantizer, see ``octav_clip``.
    """

    MAX = "max"
    OCTAV = "octav"


@dataclass(frozen=True)
class QuantizedTensor:
    """Codes of one quantized tensor plus what is needed to decode and weigh it.

    ``codes``: torch.uint8, shape of the input, values in ``0..2**bits - 1``.
    ``bits``: bit width B in 1..8. ``clip``: threshold s >= 0 (finite).
    ``mse``: ``mean((x - dequantize(codes))**2)`` over elements, 0.0 for empty tensors;
    the quantization error that error-weighted aggregation uses (PAPERS.md B).
    Validated here: types, ``bits``, ``clip``, ``mse``; the code range is not re-scanned
    (``dequantize`` and ``pack_codes`` check it).
    """

    codes: torch.Tensor
    bits: int
    clip: float
    mse: float

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        if not isinstance(self.codes, torch.Tensor) or self.codes.dtype != torch.uint8:
            found = self.codes.dtype if isinstance(self.codes, torch.Tensor) else type(self.codes)
            raise ValueError(f"`codes` must be a torch.uint8 tensor. Found `{found}`.")
        _check_clip_value(self.clip)
        if isinstance(self.mse, bool) or not isinstance(self.mse, (int, float)):
            raise ValueError(f"`mse` must be a float. Found `{self.mse!r}`.")
        if math.isnan(self.mse) or self.mse < 0:
            raise ValueError(f"`mse` must be >= 0. Found `{self.mse!r}`.")

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self) -> torch.Tensor:
        """Float32 reconstruction ``s (2 c / n - 1)``, same shape as ``codes``."""
        return dequantize(self.codes, bits=self.bits, clip=self.clip)


def rounding_error_floor(*, bits: int, clip: float) -> float:
    """``Delta^2 / 12`` with ``Delta = 2 s / (2^B - 1)``: the mean squared error of
    rounding values spread over the grid of step Delta to the nearest level.

    Stochastic rounding of such values errs by ``Delta^2 / 6`` on average and nearest
    rounding by ``Delta^2 / 12``; clipping only adds error. So a reply that reports a
    smaller MSE for a tensor of ``bits`` and ``clip`` claims better than its grid
    allows for typical values, and the server computes this from the two declared
    fields alone, without trusting the reported MSE (issue: robust weighting).
    """
    step = 2.0 * float(clip) / ((1 << _check_bits(bits)) - 1)
    return step * step / 12.0


# ----------------------------------------------------------------------------- validation


def _check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not _MIN_BITS <= bits <= _MAX_BITS:
        raise ValueError(
            f"`bits` must be an integer in {_MIN_BITS}..{_MAX_BITS}. Found `{bits!r}`."
        )
    return bits


def _check_clip_value(clip: object) -> float:
    if isinstance(clip, bool) or not isinstance(clip, (int, float)):
        raise ValueError(f"`clip` must be a ClipRule or a finite float >= 0. Found `{clip!r}`.")
    value = float(clip)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"`clip` must be a finite float >= 0. Found `{clip!r}`.")
    return value


def _check_rounding(rounding: object) -> Rounding:
    if not isinstance(rounding, Rounding):
        raise ValueError(f"`rounding` must be a Rounding. Found `{rounding!r}`.")
    return rounding


def _check_tensor(x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"`x` must be a torch.Tensor. Found `{type(x).__name__}`.")
    if not x.is_floating_point():
        raise ValueError(f"`x` must have a floating dtype. Found `{x.dtype}`.")
    return x


def _flat_numpy(x: torch.Tensor) -> np.ndarray:
    """Contiguous 1-D float32/float64 numpy view (a copy only when needed)."""
    flat = x.detach()
    if flat.device.type != "cpu":
        flat = flat.cpu()
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.to(torch.float32)
    return flat.reshape(-1).contiguous().numpy()


def _abs_max(flat: np.ndarray) -> float:
    """max|x| as a Python float; ValueError if x holds NaN or inf.

    One pass of the ``abs_max_bits`` kernel (integer max of the bit patterns with the
    sign masked off), or numpy's max/min without numba; split over the worker pool for
    large inputs. Not torch.aminmax, whose OpenMP barrier stalls when another process
    holds one of the cores.
    """
    if flat.size == 0:
        return 0.0
    if _kernels is not None:
        words = flat.view(f"u{flat.itemsize}")  # uint32 / uint64 bit patterns
        mask = words.dtype.type((1 << (8 * flat.itemsize - 1)) - 1)  # all bits but the sign

        def part_bits(lo: int, hi: int) -> float:
            return int(_kernels.abs_max_bits(words[lo:hi], mask))

        top = int(_run_parts(part_bits, flat.size, _CHUNK, reduce=max))
        amax = float(np.array(top, dtype=words.dtype).view(flat.dtype))
    else:

        def part(lo: int, hi: int) -> float:
            chunk = flat[lo:hi]
            return max(float(chunk.max()), -float(chunk.min()))

        amax = _run_parts(part, flat.size, _CHUNK, reduce=max)
    if not math.isfinite(amax):
        raise ValueError("`x` must contain only finite values. Found NaN or inf.")
    return amax


# ----------------------------------------------------------------------------- OCTAV


def _kappa(n: int, rounding: Rounding) -> float:
    """Rounding-noise coefficient: E[(x - x_hat)**2] = kappa * s**2 for |x| <= s.

    Step Delta = 2 s / n. Nearest rounding with uniform residuals: Delta**2 / 12
    = s**2 / (3 n**2). Stochastic rounding: E[f (1 - f)] Delta**2 = Delta**2 / 6
    = 2 s**2 / (3 n**2).
    """
    base = 1.0 / (3.0 * n * n)
    return base if rounding is Rounding.NEAREST else 2.0 * base


class _SortedMagnitudes:
    """Sorted magnitudes a (max 1) with prefix sums, for O(n log m) objective values."""

    def __init__(self, a: np.ndarray) -> None:
        self.a = np.sort(a)
        self.m = self.a.size
        self.p1 = np.concatenate(([0.0], np.cumsum(self.a)))
        self.p2 = np.concatenate(([0.0], np.cumsum(self.a * self.a)))

    def moments(self, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Count, sum a, sum a**2 of the bins [0, e_0), [e_0, e_1), ..., [e_last, inf)."""
        idx = np.concatenate(([0], np.searchsorted(self.a, edges, side="left"), [self.m]))
        return np.diff(idx).astype(np.float64), np.diff(self.p1[idx]), np.diff(self.p2[idx])

    def fixed_point_step(self, s: float, kappa: float) -> tuple[float, int]:
        """One OCTAV step; returns (s_next, #{a > s})."""
        i = int(np.searchsorted(self.a, s, side="right"))
        above = self.m - i
        sum_above = float(self.p1[-1] - self.p1[i])
        return sum_above / (kappa * i + above), above

    def mse(self, s: float, n: int, rounding: Rounding) -> float:
        """Exact MSE of this quantizer at threshold s (NEAREST: realized, STOCHASTIC:
        expected). The level set is symmetric, so |x| has the error of x; the
        nonnegative levels are l_k = (2k + 1) s / n, k = 0..(n-1)/2, the top one is s.
        """
        step = 2.0 * s / n
        top = (n - 1) // 2
        if rounding is Rounding.NEAREST:
            # bin k = [k step, (k+1) step) -> l_k (ties go up); the top bin is [top step,
            # inf) -> s, which covers clipping.
            edges = step * np.arange(1, top + 1)
            cnt, s1, s2 = self.moments(edges)
            levels = step * (np.arange(top + 1) + 0.5)
            total = float(np.sum(s2 - 2.0 * levels * s1 + levels * levels * cnt))
        else:
            # between levels lo < a < hi: E err**2 = (a - lo)(hi - a); above s: (a - s)**2.
            edges = step * (np.arange(top + 1) + 0.5)  # l_0..l_top (= s)
            cnt, s1, s2 = self.moments(edges)
            lo = np.concatenate(([-edges[0]], edges[:-1]))
            hi = edges
            inside = -s2[:-1] + (lo + hi) * s1[:-1] - lo * hi * cnt[:-1]
            clipped = s2[-1] - 2.0 * s * s1[-1] + s * s * cnt[-1]
            total = float(np.sum(inside)) + float(clipped)
        return max(total, 0.0) / self.m


def _golden_min(f: Callable[[float], float], lo: float, hi: float, *, rel_tol: float) -> float:
    """Golden-section search for a minimum of f on [lo, hi]."""
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    c = hi - inv_phi * (hi - lo)
    d = lo + inv_phi * (hi - lo)
    fc, fd = f(c), f(d)
    while hi - lo > rel_tol * hi:
        if fc <= fd:
            hi, d, fd = d, c, fc
            c = hi - inv_phi * (hi - lo)
            fc = f(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + inv_phi * (hi - lo)
            fd = f(d)
    return c if fc <= fd else d


@functools.lru_cache(maxsize=64)
def _octav_starts(size: int) -> np.ndarray:
    """First indices of the _OCTAV_RUN-element runs of the OCTAV subsample (fixed seed)."""
    strata = _OCTAV_SAMPLE // _OCTAV_RUN
    width = size / strata  # > _OCTAV_RUN
    rng = np.random.default_rng(_OCTAV_SAMPLE_SEED)
    starts = (np.arange(strata) * width + rng.random(strata) * (width - _OCTAV_RUN)).astype(
        np.int64
    )
    starts.flags.writeable = False
    return starts


def _octav_sample(flat: np.ndarray) -> np.ndarray:
    """|x| as float64; above _OCTAV_SAMPLE elements a fixed-seed stratified subsample.

    The tensor is cut into _OCTAV_SAMPLE / _OCTAV_RUN strata; from each, one run of
    _OCTAV_RUN consecutive elements at a uniformly drawn offset is taken (runs keep the
    gather cache-friendly; strata spread it over the whole tensor).
    """
    if flat.size > _OCTAV_SAMPLE:
        starts = _octav_starts(flat.size)
        idx = starts[:, None] + np.arange(_OCTAV_RUN)  # (strata, run)
        flat = flat[idx.reshape(-1)]
    return np.abs(flat, dtype=np.float64)


def _octav_normalized(
    a: np.ndarray, *, n: int, rounding: Rounding, max_iter: int, tol: float
) -> float:
    """OCTAV on magnitudes normalized to max(a) == 1; returns s in (0, 1]."""
    mags = _SortedMagnitudes(a)
    kappa = _kappa(n, rounding)
    s = float(mags.p1[-1]) / mags.m  # s_0 = mean|x| > 0 since max(a) == 1
    for _ in range(max_iter):
        s_next, above = mags.fixed_point_step(s, kappa)
        if above == 0:  # s >= max|x|: only rounding noise is left, J grows with s
            s = 1.0
            break
        done = abs(s_next - s) <= tol * s
        s = s_next
        if done:
            break
    s = min(s, 1.0)

    # Polish on the exact MSE of the quantizer actually used: the fixed point rests on
    # the uniform-residual noise model, which is off by up to ~15% in s at 1-2 bits.
    def objective(v: float) -> float:
        return mags.mse(v, n, rounding)

    grid = np.linspace(0.5 * s, min(1.5 * s, 1.0), 21)
    values = [objective(float(v)) for v in grid]
    best = int(np.argmin(values))
    lo = float(grid[max(best - 1, 0)])
    hi = float(grid[min(best + 1, grid.size - 1)])
    polished = _golden_min(objective, lo, hi, rel_tol=1e-3)
    return polished if objective(polished) <= values[best] else float(grid[best])


def octav_clip(
    x: torch.Tensor,
    *,
    bits: int,
    max_iter: int = 30,
    tol: float = 1e-4,
    rounding: Rounding = Rounding.NEAREST,
) -> float:
    """MSE-optimal clip threshold s for this quantizer (OCTAV, Sakr et al. ICML 2022).

    Objective, derived for the quantizer actually used (step Delta = 2 s / n, n = 2**B - 1,
    levels at +-s; not the 2 s / 2**B step of the paper's Eq. for J)::

        J(s) = kappa s**2 P(|X| <= s) + E[(|X| - s)**2 1{|X| > s}]
        kappa = 1 / (3 n**2)      (NEAREST: Delta**2 / 12)
        kappa = 2 / (3 n**2)      (STOCHASTIC: E f(1 - f) Delta**2 = Delta**2 / 6)

    Setting dJ/ds = 0 (dropping the density term, as OCTAV does) gives the fixed point
    (Sakr et al. 2022, Eq. 5, with our kappa)::

        s_{k+1} = sum |x| 1{|x| > s_k} / (kappa #{|x| <= s_k} + #{|x| > s_k}),  s_0 = mean|x|

    Deviations, all deliberate: zeros count in #{|x| <= s_k} because this grid has no zero
    level (x = 0 costs Delta**2 / 4 under nearest rounding); the fixed point is then
    polished by a 21-point scan over [0.5, 1.5] s_fp and a golden-section search on the
    exact MSE of this quantizer (realized MSE for NEAREST, expected MSE for STOCHASTIC),
    because the uniform-residual noise model is off by up to ~15% in s at 1-2 bits.
    ``rounding`` picks the target; ``quantize`` passes the mode it uses. The result never
    exceeds max|x|.

    Cost: the magnitudes are sorted once; with prefix sums of |x| and x**2 each fixed-point
    step is O(log m) and each exact MSE value O(n log m). Tensors with more than 2**16
    elements use a fixed-seed stratified subsample of 2**16 magnitudes (1024 runs of 64
    consecutive elements; deterministic; J is flat at its minimum, so the ~1% sampling
    error in s costs well under 1% MSE). Returns 0.0 for empty or all-zero tensors.
    """
    n = 2 ** _check_bits(bits) - 1
    _check_rounding(rounding)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"`max_iter` must be an integer >= 1. Found `{max_iter!r}`.")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (0 < tol < math.inf):
        raise ValueError(f"`tol` must be a finite float > 0. Found `{tol!r}`.")
    flat = _flat_numpy(_check_tensor(x))
    amax = _abs_max(flat)
    if amax == 0.0:
        return 0.0
    return _octav_from_flat(flat, amax, n=n, rounding=rounding, max_iter=max_iter, tol=tol)


def _octav_from_flat(
    flat: np.ndarray, amax: float, *, n: int, rounding: Rounding, max_iter: int, tol: float
) -> float:
    if _kernels is not None:
        if flat.size > _OCTAV_SAMPLE:
            mags = _kernels.gather_abs(flat, _octav_starts(flat.size), _OCTAV_RUN)
        else:
            mags = np.abs(flat)
        mags.sort()  # in the input's dtype (faster); |x| / amax is monotone in |x|
        a = mags.astype(np.float64)
        a /= amax  # scale-normalize: no overflow/underflow for 1e-30 or 1e30 magnitudes
        nearest = rounding is Rounding.NEAREST
        s = float(_kernels.octav_solve(a, n, nearest, _kappa(n, rounding), max_iter, tol))
    else:
        a = _octav_sample(flat)
        a /= amax
        s = _octav_normalized(a, n=n, rounding=rounding, max_iter=max_iter, tol=tol)
    return min(s * amax, amax)


def clip_threshold(
    x: torch.Tensor, *, bits: int, rule: ClipRule, rounding: Rounding = Rounding.NEAREST
) -> float:
    """Clip threshold s for ``x``: ``max|x|`` (MAX) or ``octav_clip`` (OCTAV).

    ``rounding`` only matters for OCTAV (which rounding error the threshold minimizes).
    Returns 0.0 for empty tensors.
    """
    _check_bits(bits)
    if not isinstance(rule, ClipRule):
        raise ValueError(f"`rule` must be a ClipRule. Found `{rule!r}`.")
    _check_rounding(rounding)
    if rule is ClipRule.OCTAV:
        return octav_clip(x, bits=bits, rounding=rounding)
    return _abs_max(_flat_numpy(_check_tensor(x)))


# ----------------------------------------------------------------------------- quantizer


@functools.cache
def _executor(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedquant-quantize")


def _worker_count(size: int) -> int:
    return max(1, min(torch.get_num_threads(), _CPUS, size // _PARALLEL_MIN))


def _run_parts(
    fn: Callable[[int, int], float],
    size: int,
    align: int,
    reduce: Callable[[Iterable[float]], float] = sum,
) -> float:
    """Split [0, size) into per-worker ranges aligned to ``align``; reduce fn's results."""
    workers = _worker_count(size)
    if workers == 1:
        return fn(0, size)
    blocks = -(-size // align)
    bounds = [min(size, (blocks * w // workers) * align) for w in range(workers + 1)]
    parts = [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True) if hi > lo]
    return reduce(_executor(workers).map(lambda p: fn(*p), parts))


def _multiplier(s: float, n: int, dtype: type[np.floating], *, exact_max: bool) -> np.floating:
    """a = n / (2 s) in ``dtype``; rounded down for MAX so that fl(s * a) <= n / 2."""
    half = dtype(0.5 * n)
    a = dtype(0.5 * n / s)
    if exact_max:
        s_w = dtype(s)
        while s_w * a > half:
            a = np.nextafter(a, dtype(0))
    return a


def _quantize_flat(
    flat: np.ndarray,
    codes: np.ndarray,
    *,
    a: np.floating,
    n: int,
    needs_clip: bool,
    seed: int | None,
) -> float:
    """Write the codes into ``codes`` (uint8) and return sum((u - level_u)**2).

    ``seed`` None: nearest rounding, else stochastic rounding with that stream. The numba
    kernels when available (they always clip, which costs nothing there), else numpy.
    """
    if _kernels is None:
        return _quantize_flat_numpy(flat, codes, a=a, n=n, needs_clip=needs_clip, seed=seed)
    dtype = flat.dtype.type
    if seed is None:
        consts = np.array([a, 0.5 * n, 0.5], dtype)
        offset = (n + 1) // 2

        def nearest(lo: int, hi: int) -> float:
            return float(_kernels.quantize_nearest(flat[lo:hi], codes[lo:hi], consts, offset))

        return _run_parts(nearest, flat.size, _kernels.BLOCK)
    consts = np.array([a, 0.5 * n, _DITHER_SCALE], dtype)
    key = np.uint64(seed)

    def stochastic(lo: int, hi: int) -> float:
        return float(_kernels.quantize_stochastic(flat[lo:hi], codes[lo:hi], consts, key, lo))

    return _run_parts(stochastic, flat.size, _kernels.BLOCK)


def _quantize_flat_numpy(
    flat: np.ndarray,
    codes: np.ndarray,
    *,
    a: np.floating,
    n: int,
    needs_clip: bool,
    seed: int | None,
) -> float:
    """``_quantize_flat`` in numpy (the fallback without numba), in cache-sized chunks.

    u = x * a; level_u = floor(z) + 1/2 with z = clip(u) (+ V for stochastic rounding).
    Stochastic rounding here uses 16 random bits per element: V = (k + 1/2) 2**-16 - 1/2,
    k from a numpy SFC64 stream per block of 2**20 elements, seeded from ``seed``.
    """
    dtype = flat.dtype.type
    half = dtype(0.5 * n)
    codes8 = codes.view(np.int8)
    point_five = dtype(0.5)
    offset = np.uint8((n + 1) // 2)
    noise_scale = dtype(2.0**-_RNG_BITS)
    noise_shift = dtype(2.0 ** -(_RNG_BITS + 1) - 0.5)  # V = (k + 1/2) 2**-16 - 1/2

    def work(lo: int, hi: int) -> float:
        size = min(_CHUNK, hi - lo)
        u_buf = np.empty(size, dtype)
        z_buf = np.empty(size, dtype)
        c_buf = np.empty(size, dtype) if needs_clip and seed is not None else None
        rng: np.random.SFC64 | None = None
        sse = 0.0
        for i in range(lo, hi, _CHUNK):
            j = min(i + _CHUNK, hi)
            u = u_buf[: j - i]
            z = z_buf[: j - i]
            np.multiply(flat[i:j], a, out=u)
            if seed is not None:
                if i % _RNG_BLOCK == 0 or rng is None:
                    block = i // _RNG_BLOCK
                    rng = np.random.SFC64(np.random.SeedSequence(seed, spawn_key=(block,)))
                words = -(-(j - i) * _RNG_BITS // 64)
                k = rng.random_raw(words).view(np.uint16)[: j - i]
                np.multiply(k, noise_scale, out=z)
                np.add(z, noise_shift, out=z)
                if c_buf is not None:
                    clipped = c_buf[: j - i]
                    np.clip(u, -half, half, out=clipped)
                    np.add(z, clipped, out=z)
                else:
                    np.add(z, u, out=z)
                src = z
            elif needs_clip:
                np.clip(u, -half, half, out=z)
                src = z
            else:
                src = u
            np.floor(src, out=z)
            np.copyto(codes8[i:j], z, casting="unsafe")
            # uint8 wrap-around: (c - (n+1)/2) mod 256 + (n+1)/2 = c
            np.add(codes[i:j], offset, out=codes[i:j])
            np.subtract(u, z, out=u)
            np.subtract(u, point_five, out=u)
            sse += float(np.dot(u, u))
        return sse

    return _run_parts(work, flat.size, _RNG_BLOCK if seed is not None else _CHUNK)


def _direct_mse(flat: np.ndarray, codes: np.ndarray, *, s: float, n: int) -> float:
    """mean((x - x_hat)**2) in float64, scale-normalized (slow path for extreme ranges)."""
    x = flat.astype(np.float64)
    scale = float(np.max(np.abs(x))) if x.size else 0.0
    scale = max(scale, s)
    if scale == 0.0:
        return 0.0
    x_hat = (codes.astype(np.float64) * (2.0 / n) - 1.0) * (s / scale)
    err = x / scale - x_hat
    return float(np.dot(err, err)) / x.size * scale * scale


def _seed_from(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator, dtype=torch.int64))


def quantize(
    x: torch.Tensor,
    *,
    bits: int,
    clip: ClipRule | float = ClipRule.OCTAV,
    rounding: Rounding = Rounding.STOCHASTIC,
    generator: torch.Generator | None = None,
) -> QuantizedTensor:
    """Quantize ``x`` to ``bits``-bit codes with clip threshold s (Bozorgasl & Chen 2024).

    ``y = clip(x, -s, s)/(2s) + 1/2``, ``c = floor(n y + U)`` (STOCHASTIC, U ~ U[0, 1))
    or ``floor(n y + 1/2)`` (NEAREST), ``x_hat = s (2c/n - 1)``, n = 2**bits - 1.

    ``clip``: a ClipRule (MAX: s = max|x|; OCTAV: ``octav_clip`` targeting ``rounding``)
    or an explicit threshold s >= 0. With s = 0 every code is 2**(bits-1) and x_hat = 0.
    ``generator`` is required for STOCHASTIC rounding (randomness is never seeded from
    the clock); it advances by one draw per call. Computation runs on the CPU in float32
    (float64 for float64 input or when float32 would over/underflow); ``codes`` is a CPU
    uint8 tensor of the input's shape and ``mse`` is ``mean((x - x_hat)**2)``.
    """
    n = 2 ** _check_bits(bits) - 1
    _check_rounding(rounding)
    if not isinstance(clip, ClipRule):
        clip = _check_clip_value(clip)
    if rounding is Rounding.STOCHASTIC and not isinstance(generator, torch.Generator):
        raise ValueError(
            "`generator` must be a torch.Generator for Rounding.STOCHASTIC. "
            f"Found `{generator!r}`."
        )
    x = _check_tensor(x)
    shape = x.shape
    flat = _flat_numpy(x)
    amax = _abs_max(flat)
    seed = None
    if rounding is Rounding.STOCHASTIC and isinstance(generator, torch.Generator):
        seed = _seed_from(generator)

    if clip is ClipRule.MAX:
        s = amax
    elif clip is ClipRule.OCTAV:
        s = (
            0.0
            if amax == 0.0
            else _octav_from_flat(flat, amax, n=n, rounding=rounding, max_iter=30, tol=1e-4)
        )
    else:
        s = float(clip)

    codes = np.empty(flat.size, np.uint8)
    if flat.size == 0:
        mse = 0.0
    elif s == 0.0:
        codes.fill((n + 1) // 2)
        mse = _direct_mse(flat, codes, s=0.0, n=n)
    else:
        exact_max = clip is ClipRule.MAX  # then |u| <= n/2 holds without clipping
        work_flat, s_work = _work_array(flat, s, amax, n)
        a = _multiplier(s_work, n, work_flat.dtype.type, exact_max=exact_max)
        sse = _quantize_flat(work_flat, codes, a=a, n=n, needs_clip=not exact_max, seed=seed)
        mse = sse / flat.size / float(a) / float(a) * (s / s_work) ** 2
        if not math.isfinite(mse):
            mse = _direct_mse(flat, codes, s=s, n=n)
    return QuantizedTensor(
        codes=torch.from_numpy(codes).reshape(shape), bits=bits, clip=float(s), mse=mse
    )


def _work_array(flat: np.ndarray, s: float, amax: float, n: int) -> tuple[np.ndarray, float]:
    """Choose the working precision so that u = x n / (2s) neither over- nor underflows.

    Returns the (possibly converted or power-of-two rescaled) array and the matching s.
    """
    a = 0.5 * n / s
    # float32 also needs (u - level)**2 finite: |u| <= amax * a < 1e18
    if flat.dtype == np.float32 and 1e-30 < a < 1e30 and amax * a < 1e18:
        return flat, s
    flat64 = flat.astype(np.float64, copy=False)
    if 1e-290 < a < 1e290 and amax * a < 1e290:
        return flat64, s
    # Extreme range: rescale by 2**k (exact) so that s lies in [0.5, 1).
    k = -math.frexp(s)[1]
    return np.ldexp(flat64, k), math.ldexp(s, k)


def dequantize(codes: torch.Tensor, *, bits: int, clip: float) -> torch.Tensor:
    """Reconstruction ``x_hat = s (2c/n - 1)`` as float32, same shape as ``codes``.

    Evaluated as ``(2c - n) * (s / n)`` in float64 and rounded once to float32, on the
    CPU. ValueError if ``codes`` is not a uint8 tensor or holds a value above 2**bits - 1.
    """
    n = 2 ** _check_bits(bits) - 1
    s = _check_clip_value(clip)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        found = codes.dtype if isinstance(codes, torch.Tensor) else type(codes)
        raise ValueError(f"`codes` must be a torch.uint8 tensor. Found `{found}`.")
    flat = codes.detach().cpu().reshape(-1).contiguous().numpy()
    top = int(flat.max()) if flat.size else 0
    if top > n:
        raise ValueError(f"`codes` must be <= {n} for bits={bits}. Found `{top}`.")
    out = np.empty(flat.size, np.float32)
    step = s / n

    def work(lo: int, hi: int) -> float:
        buf = np.empty(min(_CHUNK, hi - lo), np.float64)
        for i in range(lo, hi, _CHUNK):
            j = min(i + _CHUNK, hi)
            b = buf[: j - i]
            np.multiply(flat[i:j], 2.0, out=b)
            np.subtract(b, float(n), out=b)
            np.multiply(b, step, out=b)
            np.copyto(out[i:j], b, casting="same_kind")
        return 0.0

    _run_parts(work, flat.size, _CHUNK)
    return torch.from_numpy(out).reshape(codes.shape)
