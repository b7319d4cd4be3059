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

    c    = floor(n y + U),  U from ``dither_seed``       Rounding.DITHERED
    x_hat = s (2 c / n - 1) - (U - 1/2) Delta,  Delta = 2 s / n

DITHERED is subtractive dither (Roberts 1962; Schuchman 1964; for federated learning
Shlezinger et al., "UVeQFed", 2020): the codes are those of STOCHASTIC, and
the decoder, which regenerates U from the seed sent with the codes, subtracts it. Inside
the clip range the error x_hat - x is then uniform on [-Delta/2, Delta/2) whatever x is
(mean 0, variance Delta**2 / 12, half the Delta**2 / 6 of STOCHASTIC for values spread
over the grid); a clipped x errs by its clipping error plus that independent term.

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
  on the grid keep their code. k comes from a counter-based hash of (key, element index):
  the key is one draw of the caller's ``torch.Generator`` (STOCHASTIC) or the
  ``dither_seed`` itself (DITHERED), so DITHERED with ``dither_seed=key`` writes the codes
  STOCHASTIC writes with that key. Details in ``fedquant._kernels``.
* Dithered rounding subtracts U = (k + 1/2) 2**-24, the midpoint of the dither cell that
  selected the code (floor(t + U) = c still holds): the error is then uniform over the
  2**24 cell midpoints, exactly mean 0 (k 2**-24 would leave -2**-25 of a step). The
  encoder (kernel ``quantize_dithered``), ``dequantize`` (kernel ``dequantize_dithered``)
  and ``dither_offsets`` read the same words k, and U - 1/2 is exact in float32, so the
  decoder's values are the ones whose error the encoder reports.
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
    "dither_offsets",
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
_DITHER_UNIT = 2.0**-24  # U = (k + 1/2) 2**-24 for the 24-bit word k
_SEED_LIMIT = 1 << 64  # dither seeds are the uint64 keys of the stream
_MSE_MODE = {
    Rounding.NEAREST: _kernels.MSE_NEAREST,
    Rounding.STOCHASTIC: _kernels.MSE_STOCHASTIC,
    Rounding.DITHERED: _kernels.MSE_DITHERED,
}


@dataclass(frozen=True)
class QuantizedTensor:
    """Codes of one quantized tensor plus what is needed to decode and weigh it.

    ``codes``: torch.uint8, shape of the input, values in ``0..2**bits - 1``.
    ``bits``: bit width B in 1..8. ``clip``: threshold s >= 0 (finite).
    ``mse``: ``mean((x - dequantize(codes))**2)`` over elements, 0.0 for empty tensors;
    the quantization error that error-weighted aggregation uses (PAPERS.md B), computed
    in the same pass as the codes. For ``Rounding.DITHERED`` it is the error of the
    dithered reconstruction, ``dequantize(codes, dither_seed=...)``; the seed is the
    caller's (it is not stored here). Validated here: types, ``bits``, ``clip``, ``mse``;
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
    with f ~ U[0, 1)) and nearest rounding by ``Delta**2 / 12``; dithered rounding errs by
    ``Delta**2 / 12`` in expectation for every value, spread or not (subtractive dither:
    uniform error on [-Delta/2, Delta/2)); clipping only adds error. So a reply that
    reports a smaller MSE for a tensor of ``bits`` and ``clip`` claims better than its
    grid allows for typical values, and the server computes this from the two declared
    fields alone, without trusting the reported MSE (issue: robust weighting). Caveat: a
    realized MSE fluctuates around its expectation (for DITHERED with standard deviation
    ``Delta**2 / sqrt(180 N)`` over N elements), so a small tensor can honestly fall
    slightly below the floor.
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


def _check_seed(dither_seed: object) -> int:
    if (
        isinstance(dither_seed, bool)
        or not isinstance(dither_seed, (int, np.integer))
        or not 0 <= int(dither_seed) < _SEED_LIMIT
    ):
        raise ValueError(
            f"`dither_seed` must be an integer in [0, 2**64). Found `{dither_seed!r}`."
        )
    return int(dither_seed)


def _check_dither_seed(dither_seed: object, rounding: Rounding) -> int | None:
    """The key of the dither stream: required for DITHERED, None for the other modes."""
    if rounding is Rounding.DITHERED:
        if dither_seed is None:
            raise ValueError(
                "`dither_seed` must be an integer in [0, 2**64) for Rounding.DITHERED "
                "(the server regenerates the dither from it). Found `None`."
            )
        return _check_seed(dither_seed)
    if dither_seed is not None:
        raise ValueError(
            f"`dither_seed` must be None for {rounding}; only Rounding.DITHERED subtracts "
            f"a dither. Found `{dither_seed!r}`."
        )
    return None


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
    = 2 s**2 / (3 n**2). Dithered rounding: Delta**2 / 12 = s**2 / (3 n**2) exactly, for
    every x (also added to the clipping error of |x| > s).
    """
    base = 1.0 / (3.0 * n * n)
    return 2.0 * base if rounding is Rounding.STOCHASTIC else base


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

    DITHERED: the subtracted dither adds an error uniform on [-Delta/2, Delta/2) and
    independent of x to every element, clipped or not, so the objective is exact and has
    no density term::

        J(s) = kappa s**2 + E[(|X| - s)**2 1{|X| > s}],   kappa = 1 / (3 n**2)
        s_{k+1} = sum |x| 1{|x| > s_k} / (kappa N + #{|x| > s_k})     (N elements)

    Deviations, all deliberate: zeros count in #{|x| <= s_k} because this grid has no zero
    level (x = 0 costs Delta**2 / 4 under nearest rounding); the fixed point is then
    polished by a 21-point scan over [0.5, 1.5] s_fp and a golden-section search on the
    exact MSE of this quantizer (realized MSE for NEAREST, expected MSE over the dither for
    STOCHASTIC and DITHERED), because the uniform-residual noise model is off by up to
    ~15% in s at 1-2 bits (for DITHERED the polish only confirms the fixed point).
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
    mode = _MSE_MODE[rounding]
    s = float(_kernels.octav_solve(a, n, mode, _kappa(n, rounding), max_iter, tol))
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
    flat: np.ndarray,
    codes: np.ndarray,
    *,
    a: np.floating,
    n: int,
    rounding: Rounding,
    key: int | None,
) -> float:
    """Write the codes into ``codes`` (uint8) and return sum((u - level_u)**2).

    NEAREST: kernel ``quantize_nearest``; STOCHASTIC: ``quantize_stochastic``, DITHERED:
    ``quantize_dithered`` (level_u minus the dither), both with the stream ``key``.
    """
    dtype = flat.dtype.type
    if rounding is Rounding.NEAREST or key is None:  # key is None only for NEAREST
        consts = np.array([a, 0.5 * n, 0.5], dtype)
        return float(_kernels.quantize_nearest(flat, codes, consts, (n + 1) // 2))
    # (a, n/2, 2**24, 2**-24, 2**-25 - 1/2): U - 1/2 = k 2**-24 + 2**-25 - 1/2
    consts = np.array([a, 0.5 * n, _DITHER_SCALE, _DITHER_UNIT, 0.5 * _DITHER_UNIT - 0.5], dtype)
    if rounding is Rounding.DITHERED:
        return float(_kernels.quantize_dithered(flat, codes, consts, np.uint64(key)))
    return float(_kernels.quantize_stochastic(flat, codes, consts, np.uint64(key)))


def _direct_mse(
    flat: np.ndarray, codes: np.ndarray, *, s: float, n: int, dither_seed: int | None
) -> float:
    """mean((x - x_hat)**2) in float64, scale-normalized (slow path for extreme ranges)."""
    x = flat.astype(np.float64)
    scale = float(np.max(np.abs(x))) if x.size else 0.0
    scale = max(scale, s)
    if scale == 0.0:
        return 0.0
    steps = codes.astype(np.float64) * 2.0 - n  # 2c - n
    if dither_seed is not None:
        steps -= 2.0 * dither_offsets(dither_seed, x.size) - 1.0  # 2c - n - (2U - 1)
    err = x / scale - steps * (s / scale / n)
    return float(np.dot(err, err)) / x.size * scale * scale


def dither_offsets(seed: int, count: int) -> np.ndarray:
    """The dither U_i in (0, 1) of elements i = 0..count-1 (flat, C order) for ``seed``.

    ``U_i = (k_i + 1/2) 2**-24`` (float64, exact), k_i the 24-bit word of element i in the
    counter-based stream keyed by ``seed`` (``fedquant._kernels``): the U that
    ``quantize(..., rounding=Rounding.DITHERED, dither_seed=seed)`` rounds with
    (``c = floor(n y + U_i)``) and that ``dequantize(..., dither_seed=seed)`` subtracts.
    Element i's value depends on ``seed`` and i only, not on ``count``.
    """
    key = _check_seed(seed)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"`count` must be an integer >= 0. Found `{count!r}`.")
    words = np.empty(count, np.uint32)
    _kernels.dither_words(words, np.uint64(key))
    return (words + 0.5) * _DITHER_UNIT


def _seed_from(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator, dtype=torch.int64))


def quantize(
    x: torch.Tensor,
    *,
    bits: int,
    clip: ClipRule | float = ClipRule.OCTAV,
    rounding: Rounding = Rounding.STOCHASTIC,
    generator: torch.Generator | None = None,
    dither_seed: int | None = None,
) -> QuantizedTensor:
    """Quantize ``x`` to ``bits``-bit codes with clip threshold s (Bozorgasl & Chen 2024).

    ``y = clip(x, -s, s)/(2s) + 1/2``, ``c = floor(n y + U)`` (STOCHASTIC and DITHERED,
    U ~ U[0, 1)) or ``floor(n y + 1/2)`` (NEAREST), ``x_hat = s (2c/n - 1)``,
    n = 2**bits - 1 (Bozorgasl & Chen, arXiv 2405.13365, Sec. II); DITHERED reconstructs
    ``x_hat = s (2c/n - 1) - (U - 1/2) Delta``, Delta = 2 s / n (subtractive dither,
    Schuchman 1964; module docstring).

    ``clip``: a ClipRule (MAX: s = max|x|; OCTAV: ``octav_clip`` targeting ``rounding``)
    or an explicit threshold s >= 0. With s = 0 every code is 2**(bits-1) and x_hat = 0.
    ``generator`` is required for STOCHASTIC rounding (randomness is never seeded from
    the clock); it advances by one draw per call, ``torch.randint(0, 2**62, (1,))``,
    which keys the stream of U. ``dither_seed``, an integer in [0, 2**64), is required
    for DITHERED and must be None otherwise: it is the key of the stream itself (U_i =
    ``dither_offsets(dither_seed, x.numel())[i]``), public, and sent with the codes so
    that ``dequantize(codes, ..., dither_seed=dither_seed)`` subtracts the same U;
    ``generator`` is then not used (nor advanced). So DITHERED with ``dither_seed=k``
    writes the codes STOCHASTIC writes when its generator draws k. Use a fresh seed per
    tensor and round: equal seeds give equal U at equal indices. Computation runs on the
    CPU in float32 (float64 for float64 input or when float32 would over/underflow).
    Returns the codes together with their error: ``codes`` is a CPU uint8 tensor of the
    input's shape and ``mse = mean((x - x_hat)**2)`` (for DITHERED, of the dithered
    x_hat), accumulated in the same pass as the codes.
    """
    n = 2 ** _check_bits(bits) - 1
    _check_rounding(rounding)
    if not isinstance(clip, ClipRule):
        clip = _check_clip_value(clip)
    if rounding is Rounding.STOCHASTIC and not isinstance(generator, torch.Generator):
        raise ValueError(
            f"`generator` must be a torch.Generator for Rounding.STOCHASTIC. Found `{generator!r}`."
        )
    key = _check_dither_seed(dither_seed, rounding)
    x = _check_tensor(x)
    shape = x.shape
    flat = _flat_numpy(x)
    amax = _abs_max(flat)
    if rounding is Rounding.STOCHASTIC and isinstance(generator, torch.Generator):
        key = _seed_from(generator)

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
        mse = _direct_mse(flat, codes, s=0.0, n=n, dither_seed=None)  # Delta = 0: no dither
    else:
        work_flat, s_work = _work_array(flat, s, amax, n)
        # MAX: round a down so that |u| <= n/2 holds without clipping
        a = _multiplier(s_work, n, work_flat.dtype.type, exact_max=clip is ClipRule.MAX)
        sse = _quantize_flat(work_flat, codes, a=a, n=n, rounding=rounding, key=key)
        mse = sse / flat.size / float(a) / float(a) * (s / s_work) ** 2
        if not math.isfinite(mse):
            dithered = key if rounding is Rounding.DITHERED else None
            mse = _direct_mse(flat, codes, s=s, n=n, dither_seed=dithered)
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


def dequantize(
    codes: torch.Tensor, *, bits: int, clip: float, dither_seed: int | None = None
) -> torch.Tensor:
    """Reconstruction ``x_hat = s (2c/n - 1)`` as float32, same shape as ``codes``.

    The levels of the clipped uniform quantizer (Bozorgasl & Chen, arXiv 2405.13365),
    n = 2**bits - 1. Evaluated as ``(2c - n) * (s / n)`` in float64 and rounded once to
    float32, on the CPU. With ``dither_seed`` (codes of ``Rounding.DITHERED``, an integer
    in [0, 2**64)), the dither is subtracted: ``x_hat_i = s (2c_i/n - 1) - (U_i - 1/2)
    Delta``, Delta = 2 s / n, U_i = ``dither_offsets(dither_seed, codes.numel())[i]`` (i
    the flat C-order index), evaluated as ``((2c - n) - (2U - 1)) * (s / n)`` in float64
    (the difference is exact) and rounded once to float32, in one pass (kernel
    ``dequantize_dithered``). These are the values whose error ``quantize`` reported.
    ValueError if ``codes`` is not a uint8 tensor or holds a value above 2**bits - 1.
    """
    n = 2 ** _check_bits(bits) - 1
    s = _check_clip_value(clip)
    key = None if dither_seed is None else _check_seed(dither_seed)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        found = codes.dtype if isinstance(codes, torch.Tensor) else type(codes)
        raise ValueError(f"`codes` must be a torch.uint8 tensor. Found `{found}`.")
    flat = codes.detach().cpu().reshape(-1).contiguous().numpy()
    if key is not None:
        out = np.empty(flat.size, np.float32)
        # 2U - 1 = k 2**-23 + 2**-24 - 1 for U = (k + 1/2) 2**-24
        consts = np.array([s / n, n, 2.0 * _DITHER_UNIT, _DITHER_UNIT - 1.0], np.float64)
        if int(_kernels.dequantize_dithered(flat, out, consts, np.uint64(key))) > n:
            top = int(flat.max())
            raise ValueError(f"`codes` must be <= {n} for bits={bits}. Found `{top}`.")
        return torch.from_numpy(out).reshape(codes.shape)
    top = int(flat.max()) if flat.size else 0
    if top > n:
        raise ValueError(f"`codes` must be <= {n} for bits={bits}. Found `{top}`.")
    x_hat = (2.0 * flat.astype(np.float64) - n) * (s / n)  # float64
    return torch.from_numpy(x_hat.astype(np.float32)).reshape(codes.shape)
