"""AdaRound: learned up-or-down rounding of weights (Nagel et al., ICML 2020, arXiv 2004.10568).

Each weight w on a grid (step s, zero point z, ``n = 2**bits - 1``) is rounded down or
up, chosen by a continuous variable V per weight (AdaRound Sec. 3.3):

    ŵ(V)  = s · clamp(floor(w / s) + h(V), -z, n - z)                    (Eq. 22)
    h(V)  = clamp(sigmoid(V) · (ζ - γ) + γ, 0, 1),  ζ = 1.1, γ = -0.1       (Eq. 23)
    f_reg = Σ 1 - |2 h(V) - 1|^β                                           (Eq. 24)

(the paper's ``clip(..., n, p)`` is the integer range; here it is ``[-z, n - z]`` of the
asymmetric grid of :mod:`fedquant.ptq.quantizers`). V starts where h(V) equals the
fractional part of w / s, so the soft weight starts at w itself (inside the range).
The loss is the reconstruction error plus λ f_reg, λ = :data:`REG_WEIGHT`; β is annealed
linearly from 20 to 2 after a warm-up of the first 20 % of the steps, during which the
regularizer is off (the schedule of the authors' and BRECQ's code). At the end the
rounding is made hard: up where V >= 0, i.e. h(V) >= 1/2.

Caveats: λ = 0.01 is the paper's ResNet value (0.1 for MobileNetV2); the regularizer is
a sum over weights, so its weight relative to the reconstruction term depends on how
that term is normalized (here: squared error summed over a sample's features, averaged
over the batch, as in BRECQ's ``lp_loss``). Equation numbers as in the arXiv version.
"""

from __future__ import annotations

import torch
from torch import nn

from fedquant.ptq.quantizers import max_code

__all__ = [
    "BETA_END",
    "BETA_START",
    "GAMMA",
    "REG_WEIGHT",
    "WARMUP",
    "ZETA",
    "AdaRoundWeight",
    "beta_at",
    "initial_logits",
    "rectified_sigmoid",
    "rounding_regularizer",
]

ZETA, GAMMA = 1.1, -0.1
"""Stretch of the rectified sigmoid (AdaRound Eq. 23, from Louizos et al. 2018's hard concrete)."""

REG_WEIGHT = 0.01
"""λ, the weight of the rounding regularizer (AdaRound/BRECQ on ResNets)."""

WARMUP = 0.2
"""Fraction of the steps without the regularizer, before β is annealed."""

BETA_START, BETA_END = 20.0, 2.0
"""β of the regularizer at the end of the warm-up and at the last step."""


def rectified_sigmoid(logits: torch.Tensor) -> torch.Tensor:
    """``h(V) = clamp(sigmoid(V) (ζ - γ) + γ, 0, 1)`` (AdaRound Eq. 23)."""
    return (torch.sigmoid(logits) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def initial_logits(fraction: torch.Tensor) -> torch.Tensor:
    """V with ``h(V) = fraction`` for fractions in [0, 1): ``V = logit((f - γ) / (ζ - γ))``."""
    p = (fraction - GAMMA) / (ZETA - GAMMA)  # in [1/12, 11/12): finite logits
    return torch.log(p) - torch.log1p(-p)


def rounding_regularizer(h: torch.Tensor, *, beta: float) -> torch.Tensor:
    """``Σ 1 - |2 h - 1|^β`` (AdaRound Eq. 24): 0 iff every h is 0 or 1."""
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


def beta_at(step: int, *, total: int) -> float | None:
    """β at 0-based ``step`` of ``total``: None during the warm-up, then 20 → 2 linearly.

    ``β = 2 + (20 - 2) · (1 - (step - w) / (total - w))`` with ``w = WARMUP · total``.
    """
    warmup = WARMUP * total
    if step < warmup:
        return None
    progress = (step - warmup) / max(total - warmup, 1.0)
    return BETA_END + (BETA_START - BETA_END) * max(0.0, 1.0 - progress)


class AdaRoundWeight(nn.Module):
    """The learnable rounding of one weight tensor on a fixed per-channel grid.

    ``scale`` and ``zero_point`` broadcast against ``weight`` (shape (C_out, 1, ...)).
    :meth:`soft_weight` is ŵ(V) (Eq. 22) for the optimizer; :meth:`hard_codes` the final
    uint8 codes ``clamp(floor(w / s) + [V >= 0] + z, 0, n)``.
    """

    floor: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(
        self, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, *, bits: int
    ) -> None:
        super().__init__()
        self.bits = bits
        ratio = weight.detach() / scale
        floor = torch.floor(ratio)
        self.register_buffer("floor", floor)
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("zero_point", zero_point.detach().clone())
        self.logits = nn.Parameter(initial_logits(ratio - floor))

    def _grid(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        floor: torch.Tensor = self.floor
        scale: torch.Tensor = self.scale
        zero_point: torch.Tensor = self.zero_point
        return floor, scale, zero_point

    def rounding(self) -> torch.Tensor:
        """h(V), in [0, 1], the soft round-up indicator of each weight."""
        return rectified_sigmoid(self.logits)

    def soft_weight(self) -> torch.Tensor:
        """``s · clamp(floor(w / s) + h(V), -z, n - z)`` (AdaRound Eq. 22), differentiable in V."""
        floor, scale, zero_point = self._grid()
        n = max_code(self.bits)
        integer = floor + self.rounding()
        return torch.maximum(torch.minimum(integer, n - zero_point), -zero_point) * scale

    def hard_codes(self) -> torch.Tensor:
        """The final codes ``clamp(floor(w / s) + [V >= 0] + z, 0, n)``, uint8.

        h(0) = 0.6 · 1.2 - 0.1 = 1/2, so V >= 0 is h(V) >= 1/2; at the initial V this is
        round-to-nearest (up from a fractional part of 1/2, where torch.round goes to even).
        """
        floor, _, zero_point = self._grid()
        up = (self.logits.detach() >= 0).to(floor.dtype)
        return (floor + up + zero_point).clamp(0, max_code(self.bits)).to(torch.uint8)

    def regularizer(self, *, beta: float) -> torch.Tensor:
        """f_reg of this tensor at β (Eq. 24)."""
        return rounding_regularizer(self.rounding(), beta=beta)

    def extra_repr(self) -> str:
        """Bits and weight count, for ``repr``."""
        return f"bits={self.bits}, weights={self.logits.numel()}"
