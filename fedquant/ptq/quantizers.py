"""Uniform affine quantizers of post-training quantization: the math, and the activation quantizer.

A ``bits``-bit affine quantizer with step ``s > 0`` and integer zero point ``z`` in
``[0, n]``, ``n = 2**bits - 1``, maps a real x to the code and back

    q(x) = clamp(round(x / s) + z, 0, n)            (quantize_affine; uint8 codes)
    x̂   = s · (q(x) - z)                            (dequantize_affine)

so it represents the ``n + 1`` values ``s · (k - z)``, k = 0..n, an interval
``[-s z, s (n - z)]`` that always contains 0 exactly (zero padding and ReLU zeros are
exact). ``round`` is torch's round-half-to-even. This is the asymmetric ("affine") scheme
of Jacob et al. (CVPR 2018, Eq. 1) and of torchao's ``MappingType.ASYMMETRIC``.

Why asymmetric for the weights too: per-output-channel weight ranges of small trained
layers are often lopsided (a channel of mostly positive weights); the asymmetric grid
spends all ``2**bits`` codes on ``[min, max]``, where a symmetric one wastes up to half
of them (at 2 bits: 4 levels instead of 3). The zero point costs one byte per channel
in the export and nothing at inference time in this float simulation.

Ranges are chosen by mean squared error, as in BRECQ's and QDrop's ``mse`` range search
(which use an L_2.4 norm; here plain L2): for each shrink factor a in
:data:`SHRINK_GRID` (1.00, 0.99, ..., 0.21) the range ``[a · min(x, 0), a · max(x, 0)]``
gives (s, z), and the (s, z) with the lowest ``||x - x̂||²`` wins: per output channel
for weights (:func:`mse_weight_params`), per tensor for activations
(:func:`mse_activation_params`).

Nothing here is DPQuant's training-time fake quantization (``fedquant.fakequant``:
symmetric INT8/INT4/FP4, per-tensor or per-sample scale, no zero point, straight-through
for Opacus); the two share no code and no classes.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "SHRINK_GRID",
    "ActivationQuantizer",
    "affine_params",
    "dequantize_affine",
    "fake_quantize_affine",
    "max_code",
    "mse_activation_params",
    "mse_weight_params",
    "quantize_affine",
    "round_ste",
]

SHRINK_GRID = tuple(1.0 - 0.01 * i for i in range(80))
"""Shrink factors of the [min, max] range tried by the MSE search (BRECQ's 80-point grid)."""

MIN_STEP = 1e-8
"""Smallest step; an all-zero channel or tensor gets it (and codes equal to the zero point)."""

_MAX_SEARCH_ELEMENTS = 1 << 20  # activation MSE evaluated on at most ~this many elements


def max_code(bits: int) -> int:
    """The largest code ``n = 2**bits - 1`` of a ``bits``-bit quantizer (2 <= bits <= 8)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"`bits` must be an integer in 1..8. Found `{bits!r}`.")
    return (1 << bits) - 1


def affine_params(
    lo: torch.Tensor, hi: torch.Tensor, *, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step and zero point of the grid over ``[min(lo, 0), max(hi, 0)]`` (elementwise).

    ``s = (hi - lo) / n`` (at least :data:`MIN_STEP`), ``z = clamp(round(-lo / s), 0, n)``;
    z is returned as a float tensor holding integers. Rounding z moves the grid by less
    than s/2, so the range's ends may fall just outside it and saturate.
    """
    n = max_code(bits)
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    step = ((hi - lo) / n).clamp_min(MIN_STEP)
    zero_point = torch.round(-lo / step).clamp(0, n)
    return step, zero_point


def quantize_affine(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, *, bits: int
) -> torch.Tensor:
    """Codes ``clamp(round(x / s) + z, 0, n)`` as uint8 (``scale``/``zero_point`` broadcast)."""
    n = max_code(bits)
    codes = (torch.round(x / scale) + zero_point).clamp(0, n)
    return codes.to(torch.uint8)


def dequantize_affine(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
) -> torch.Tensor:
    """Values ``s · (q - z)`` of uint8 codes q, float32."""
    return (codes.to(torch.float32) - zero_point) * scale


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` in the forward pass, identity gradient (straight-through, Bengio et al. 2013).

    ``x + (round(x) - x)`` equals ``round(x)`` bit for bit: ``round(x) - x`` is exact
    (Sterbenz: the two are within a factor of two of each other, or round(x) is 0) and the
    sum is then the representable round(x).
    """
    return x + (torch.round(x) - x).detach()


def fake_quantize_affine(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, *, bits: int
) -> torch.Tensor:
    """``dequantize_affine(quantize_affine(x))`` in one differentiable pass.

    Computed as ``s · clamp(round(x / s), -z, n - z)`` with a straight-through round,
    so the gradient reaches x inside the range and the step s everywhere (LSQ, Esser et
    al. ICLR 2020, Eq. 3: d x̂ / d s = round(x/s) - x/s inside, the clamp bound outside).
    Its values equal ``dequantize_affine(quantize_affine(x, ...), ...)`` exactly: all
    intermediate integers are exact in float32 (torchao's fake-quant property).
    """
    n = max_code(bits)
    integer = round_ste(x / scale)
    clamped = torch.maximum(torch.minimum(integer, n - zero_point), -zero_point)
    return clamped * scale


def _weight_rows(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().reshape(weight.shape[0], -1)  # (C_out, fan_in)


def mse_weight_params(weight: torch.Tensor, *, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel (step, zero point) of lowest ``||W_c - Ŵ_c||²`` over :data:`SHRINK_GRID`.

    Returns two (C_out,) tensors; reshape them to broadcast against the weight.
    Ties go to the wider range (the first grid point reaching the minimum).
    """
    rows = _weight_rows(weight)  # (C, K)
    lo, hi = rows.amin(dim=1), rows.amax(dim=1)  # (C,)
    best_err = torch.full_like(lo, torch.inf)
    best_step, best_zero = torch.zeros_like(lo), torch.zeros_like(lo)
    for shrink in SHRINK_GRID:
        step, zero = affine_params(lo * shrink, hi * shrink, bits=bits)  # (C,)
        fq = fake_quantize_affine(rows, step[:, None], zero[:, None], bits=bits)
        err = (rows - fq).square().sum(dim=1)  # (C,)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_step = torch.where(better, step, best_step)
        best_zero = torch.where(better, zero, best_zero)
    return best_step, best_zero


def mse_activation_params(x: torch.Tensor, *, bits: int) -> tuple[float, float]:
    """Per-tensor (step, zero point) of lowest ``||x - x̂||²`` over :data:`SHRINK_GRID`.

    min and max come from all of ``x``; the error is evaluated on an evenly strided
    subsample of at most ~2**20 elements (deterministic), which changes the chosen grid
    point only where two candidates are within sampling noise of each other.
    """
    flat = x.detach().reshape(-1)  # (numel,)
    lo, hi = flat.min(), flat.max()
    sample = flat[:: max(1, flat.numel() // _MAX_SEARCH_ELEMENTS)]
    best = (torch.inf, 1.0, 0.0)
    for shrink in SHRINK_GRID:
        step, zero = affine_params(lo * shrink, hi * shrink, bits=bits)
        err = float((sample - fake_quantize_affine(sample, step, zero, bits=bits)).square().sum())
        if err < best[0]:
            best = (err, float(step), float(zero))
    return best[1], best[2]


class ActivationQuantizer(nn.Module):
    """Per-tensor affine quantizer of a layer's input, with a learnable step (LSQ-style).

    ``forward(x) = s · clamp(round(x / s), -z, n - z)`` (:func:`fake_quantize_affine`);
    s is a parameter (BRECQ/MRECG learn it during reconstruction, Li et al. ICLR 2021,
    Sec. 4; QDrop, Wei et al. ICLR 2022), z is fixed when calibrated. Build it with
    :meth:`calibrated` (MSE range search on calibration inputs) or from saved values.
    """

    def __init__(self, *, bits: int, step: float, zero_point: float) -> None:
        super().__init__()
        max_code(bits)
        if not step > 0:
            raise ValueError(f"`step` must be positive. Found `{step!r}`.")
        self.bits = bits
        self.zero_point: torch.Tensor
        self.step = nn.Parameter(torch.tensor(step, dtype=torch.float32), requires_grad=False)
        self.register_buffer("zero_point", torch.tensor(zero_point, dtype=torch.float32))

    @classmethod
    def calibrated(cls, inputs: torch.Tensor, *, bits: int) -> ActivationQuantizer:
        """A quantizer whose range minimizes the squared error on ``inputs``."""
        step, zero_point = mse_activation_params(inputs, bits=bits)
        return cls(bits=bits, step=step, zero_point=zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The fake-quantized input (same shape)."""
        zero_point: torch.Tensor = self.zero_point
        step = self.step.clamp_min(MIN_STEP)  # Adam may push a learned step through 0
        return fake_quantize_affine(x, step, zero_point, bits=self.bits)

    def extra_repr(self) -> str:
        """Bits, step and zero point, for ``repr``."""
        zero_point = int(self.zero_point.item())
        return f"bits={self.bits}, step={float(self.step):.4g}, zero_point={zero_point}"
