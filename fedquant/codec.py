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
  caller's ``torch.Generator``, element index). Details in ``fedquant._kernels``.
* The squared error sum((u - level_u)**2) is accumulated in float64 (from partial sums
  of 16 terms in the working precision) and ``mse = sum / (N a**2)``; a non-finite
  result falls back to an exact float64 pass.
* max|x|, the codes and their error, and OCTAV's search run in the numba kernels of
  ``fedquant._kernels`` (numba is a required dependency), on the calling thread: one
  pass over x for max|x| and one for codes and error.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from fedquant import _kernels
from fedquant.config import ClipRule, Rounding

__all__ = [
    "ClipRule",
    "QuantizedTensor",
    "Rounding",
    "dequantize",
    "octav_clip",
    "quantize",
    "rounding_error_floor",
]

_MIN_BITS = 1
_MAX_BITS = 8
_OCTAV_SAMPLE = 1 << 16  # OCTAV runs on at most this many |x| values
_OCTAV_RUN = 64  # consecutive elements per stratum of the OCTAV subsample
_OCTAV_SAMPLE_SEED = 0x0C7A5  # fixed seed of the OCTAV subsample (never the clock)
_DITHER_SCALE = 2.0**24  # 24-bit dither of the stochastic kernel


@dataclass(frozen=True)
class QuantizedTensor:
    """Codes of one quantized tensor plus what is needed to decode and weigh it.

    ``codes``: torch.uint8, shape of the input, values in ``0..2**bits - 1``.
    ``bits``: bit width B in 1..8. ``clip``: threshold s >= 0 (finite).
    ``mse``: ``mean((x - dequantize(codes))**2)`` over elements, 0.0 for empty tensors;
    the quantization error that error-weighted aggregation uses (PAPERS.md B), computed
    in the same pass as the codes. Validated here: types, ``bits``, ``clip``, ``mse``;
    the code range is not re-scanned (``dequantize`` and ``pack_codes`` check it).
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


def rounding_error_floor(*, bits: int, clip: float) -> float:
    """Mean squared error ``Delta**2 / 12`` of nearest rounding on the grid of ``bits``, ``clip``.

    ``Delta = 2 s / (2**B - 1)`` is the step of the grid; ``Delta**2 / 12`` is the mean
    squared error of rounding values spread over it to the nearest level. Stochastic
    rounding of such values errs by ``Delta**2 / 6`` on average (E f (1 - f) Delta**2
    with f ~ U[0, 1)) and nearest rounding by ``Delta**2 / 12``; clipping only adds error.
    So a reply that reports a smaller MSE for a tensor of ``bits`` and ``clip`` claims
    better than its grid allows for typical values, and the server computes this from the
    two declared fields alone, without trusting the reported MSE (issue: robust weighting).
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

    One pass of the ``abs_max_bits`` kernel: the integer max of the bit patterns with the
    sign masked off, which IEEE order makes the pattern of max|x| (NaN and inf sort above
    every finite value). Not torch.aminmax, whose OpenMP barrier stalls when another
    process holds one of the cores.
    """
    if flat.size == 0:
        return 0.0
    words = flat.view(f"u{flat.itemsize}")  # uint32 / uint64 bit patterns
    mask = words.dtype.type((1 << (8 * flat.itemsize - 1)) - 1)  # all bits but the sign
    top = int(_kernels.abs_max_bits(words, mask))
    amax = float(np.array(top, dtype=words.dtype).view(flat.dtype))
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


@functools.lru_cache(maxsize=64)
def _octav_starts(size: int) -> np.ndarray:
    """First indices of the _OCTAV_RUN-element runs of the OCTAV subsample (fixed seed).

    The tensor is cut into _OCTAV_SAMPLE / _OCTAV_RUN strata; from each, one run of
    _OCTAV_RUN consecutive elements at a uniformly drawn offset is taken (runs keep the
    gather cache-friendly; strata spread it over the whole tensor).
    """
    strata = _OCTAV_SAMPLE // _OCTAV_RUN
    width = size / strata  # > _OCTAV_RUN
    rng = np.random.default_rng(_OCTAV_SAMPLE_SEED)
    offsets = np.arange(strata) * width + rng.random(strata) * (width - _OCTAV_RUN)
    starts: np.ndarray = offsets.astype(np.int64)
    starts.flags.writeable = False
    return starts


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
    ``rounding`` picks the target; ``quantize`` with ``ClipRule.OCTAV`` uses the threshold
    for the mode it rounds with. The result never exceeds max|x|.

    Cost: the magnitudes are sorted once; with prefix sums of |x| and x**2 each fixed-point
    step is O(log m) and each exact MSE value O(n log m) (kernel ``octav_solve``). Tensors
    with more than 2**16 elements use a fixed-seed stratified subsample of 2**16
    magnitudes (1024 runs of 64 consecutive elements; deterministic; J is flat at its
    minimum, so the ~1% sampling error in s costs well under 1% MSE). Returns 0.0 for
    empty or all-zero tensors.
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
    """``octav_clip`` on a flat array with max|x| = ``amax`` > 0."""
    if flat.size > _OCTAV_SAMPLE:
        mags = _kernels.gather_abs(flat, _octav_starts(flat.size), _OCTAV_RUN)
    else:
        mags = np.abs(flat)
    mags.sort()  # in the input's dtype (faster); |x| / amax is monotone in |x|
    a = mags.astype(np.float64)
    a /= amax  # scale-normalize: no overflow/underflow for 1e-30 or 1e30 magnitudes
    nearest = rounding is Rounding.NEAREST
    s = float(_kernels.octav_solve(a, n, nearest, _kappa(n, rounding), max_iter, tol))
    return min(s * amax, amax)


# ----------------------------------------------------------------------------- quantizer


def _multiplier(s: float, n: int, dtype: type[np.floating], *, exact_max: bool) -> np.floating:
    """Multiplier a = n / (2 s) in ``dtype``; rounded down for MAX: fl(s * a) <= n / 2."""
    half = dtype(0.5 * n)
    a = dtype(0.5 * n / s)
    if exact_max:
        s_w = dtype(s)
        while s_w * a > half:
            a = np.nextafter(a, dtype(0))
    return a


def _quantize_flat(
    flat: np.ndarray, codes: np.ndarray, *, a: np.floating, n: int, seed: int | None
) -> float:
    """Write the codes into ``codes`` (uint8) and return sum((u - level_u)**2).

    ``seed`` None: nearest rounding (kernel ``quantize_nearest``), else stochastic
    rounding with the stream ``seed`` (kernel ``quantize_stochastic``).
    """
    dtype = flat.dtype.type
    if seed is None:
        consts = np.array([a, 0.5 * n, 0.5], dtype)
        return float(_kernels.quantize_nearest(flat, codes, consts, (n + 1) // 2))
    consts = np.array([a, 0.5 * n, _DITHER_SCALE], dtype)
    return float(_kernels.quantize_stochastic(flat, codes, consts, np.uint64(seed)))


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
    or ``floor(n y + 1/2)`` (NEAREST), ``x_hat = s (2c/n - 1)``, n = 2**bits - 1
    (Bozorgasl & Chen, arXiv 2405.13365, Sec. II).

    ``clip``: a ClipRule (MAX: s = max|x|; OCTAV: ``octav_clip`` targeting ``rounding``)
    or an explicit threshold s >= 0. With s = 0 every code is 2**(bits-1) and x_hat = 0.
    ``generator`` is required for STOCHASTIC rounding (randomness is never seeded from
    the clock); it advances by one draw per call. Computation runs on the CPU in float32
    (float64 for float64 input or when float32 would over/underflow). Returns the codes
    together with their error: ``codes`` is a CPU uint8 tensor of the input's shape and
    ``mse = mean((x - x_hat)**2)``, accumulated in the same pass as the codes.
    """
    n = 2 ** _check_bits(bits) - 1
    _check_rounding(rounding)
    if not isinstance(clip, ClipRule):
        clip = _check_clip_value(clip)
    if rounding is Rounding.STOCHASTIC and not isinstance(generator, torch.Generator):
        raise ValueError(
            f"`generator` must be a torch.Generator for Rounding.STOCHASTIC. Found `{generator!r}`."
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
        work_flat, s_work = _work_array(flat, s, amax, n)
        # MAX: round a down so that |u| <= n/2 holds without clipping
        a = _multiplier(s_work, n, work_flat.dtype.type, exact_max=clip is ClipRule.MAX)
        sse = _quantize_flat(work_flat, codes, a=a, n=n, seed=seed)
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

    The levels of the clipped uniform quantizer (Bozorgasl & Chen, arXiv 2405.13365),
    n = 2**bits - 1. Evaluated as ``(2c - n) * (s / n)`` in float64 and rounded once to
    float32, on the CPU. ValueError if ``codes`` is not a uint8 tensor or holds a value
    above 2**bits - 1.
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
    x_hat = (2.0 * flat.astype(np.float64) - n) * (s / n)  # float64
    return torch.from_numpy(x_hat.astype(np.float32)).reshape(codes.shape)
