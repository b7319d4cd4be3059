"""Bounds on what well-formed but hostile replies can do to the model: pure functions.

A reply that decodes may still be hostile. The server strategy applies, in order:

1. :func:`bound_update_norms`: each update's L2 norm is clipped to ``factor`` x the
   round's median (Sun et al. 2019), except before an order-statistic rule;
2. :func:`kept_weight_fractions`: how much of the weight its claims asked for each reply
   keeps under a weighted rule, after the server's MSE check and the share cap (the
   strategy logs and counts those below :data:`DOWN_WEIGHTED_BELOW`);
3. :func:`discard_reason`: a round whose aggregate step is non-finite or absurd against
   the last rounds' is not applied.

All arithmetic is in float64; nothing here imports Flower.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedquant.aggregate import WeightedRule, cap_shares, norm_clip_scales, update_norm

__all__ = [
    "DOWN_WEIGHTED_BELOW",
    "RECENT_ROUNDS",
    "NormBound",
    "bound_update_norms",
    "check_norm_factor",
    "discard_reason",
    "kept_weight_fractions",
    "remember_step",
    "step_norm",
]

DOWN_WEIGHTED_BELOW = 0.5
"""A reply keeping less than this fraction of the weight its claims asked for is counted
and logged as down-weighted (smaller corrections are routine)."""
RECENT_ROUNDS = 5
"""Applied rounds whose aggregate step norms :func:`discard_reason` compares against."""


def check_norm_factor(factor: object, *, name: str) -> float:
    """``factor`` as a float that is 0 (off) or finite and >= 1; ValueError naming ``name``.

    Below 1 even the median update (or the median round) would be cut.
    """
    if isinstance(factor, bool) or not (
        isinstance(factor, int | float) and (factor == 0 or 1 <= factor < math.inf)
    ):
        raise ValueError(f"`{name}` must be 0 (off) or finite and >= 1. Found `{factor!r}`.")
    return float(factor)


@dataclass(frozen=True)
class NormBound:
    """The result of :func:`bound_update_norms`.

    ``updates[i]`` is ``scales[i] * Δ_i`` (in float64 where scaled, untouched where
    ``scales[i] == 1``); ``norms[i]`` is ``||Δ_i||`` before scaling; ``bound`` is
    ``factor * median_i ||Δ_i||``.
    """

    updates: list[dict[str, np.ndarray]]
    norms: np.ndarray
    scales: np.ndarray
    bound: float

    @property
    def clipped(self) -> list[int]:
        """Indices of the updates that were scaled down."""
        return [i for i, s in enumerate(self.scales) if s < 1.0]


def bound_update_norms(updates: Sequence[Mapping[str, np.ndarray]], *, factor: float) -> NormBound:
    """Scale each update whose L2 norm exceeds ``factor`` x the median down to that bound.

    ``bound = factor * median_i ||Δ_i||``, ``Δ_i <- min(1, bound / ||Δ_i||) Δ_i`` with
    ``||Δ||`` over all tensors (:func:`fedquant.aggregate.update_norm`): norm clipping
    (Sun et al. 2019, "Can You Really Backdoor Federated Learning?", norm thresholding),
    with the threshold taken from the round so that it needs no tuning to the model's
    scale. At ``factor`` 1 no update moves the model more than the median one. Caveat:
    the median is only robust while fewer than half of the updates are hostile.

    Raises:
        ValueError: no updates, or ``factor`` not finite and > 0
            (:func:`fedquant.aggregate.norm_clip_scales`).
    """
    norms = [update_norm(u) for u in updates]
    scales, bound = norm_clip_scales(norms, factor=factor)
    bounded = [
        {k: np.asarray(v, np.float64) * scale for k, v in update.items()}
        if scale < 1.0
        else dict(update)
        for update, scale in zip(updates, scales, strict=True)
    ]
    return NormBound(updates=bounded, norms=np.asarray(norms), scales=scales, bound=bound)


def kept_weight_fractions(
    rule: WeightedRule,
    *,
    claimed_mse: Sequence[Mapping[str, float]],
    checked_mse: Sequence[Mapping[str, float]],
    num_examples: Sequence[int],
    sizes: Mapping[str, int],
) -> np.ndarray:
    """Per reply, the fraction of the weight its claims asked for that it keeps.

    Over the whole model, each tensor t weighted by its size n_t:
    ``f_i = Σ_t n_t · given_{t,i} / Σ_t n_t · claimed_{t,i}``, where ``claimed_{t,i}`` is
    the reply's share of ``rule.raw_weights`` computed from what it reported (MSE,
    example count), uncapped, and ``given_{t,i}`` its share after the server raised the
    MSE to its grid's rounding error and capped shares at ``cap / K``
    (:func:`fedquant.aggregate.cap_shares`). Per tensor, an honest reply's MSE on a
    10-element bias can fall far below its grid's by chance; over the model it cannot.

    Returns:
        ``(K,)`` float64 factors (1: kept all it claimed).
    """
    counts = np.array(num_examples, dtype=np.float64)
    given_total = np.zeros(len(counts))
    claimed_total = np.zeros(len(counts))
    for name, size in sizes.items():
        claimed = rule.raw_weights(
            mse=np.array([m[name] for m in claimed_mse]), num_examples=counts
        )
        checked = rule.raw_weights(
            mse=np.array([m[name] for m in checked_mse]), num_examples=counts
        )
        claimed_total += size * claimed / claimed.sum()
        given_total += size * cap_shares(checked, cap=rule.cap)
    factors: np.ndarray = given_total / claimed_total
    return factors


def step_norm(new: Mapping[str, np.ndarray], old: Mapping[str, np.ndarray]) -> float:
    """``||w_new − w_old||`` over all tensors of ``old``, in float64."""
    return update_norm({k: np.asarray(new[k]).astype(np.float64) - old[k] for k in old})


def discard_reason(step: float, recent_steps: Sequence[float], *, factor: float) -> str | None:
    """Why a round with aggregate step norm ``step`` must not be applied, or None.

    A non-finite step is always discarded; so is one above ``factor`` x the median of
    ``recent_steps`` (the last rounds applied; ``factor`` 0 turns this comparison off).
    A median of a few rounds tolerates one absurd round among them.
    """
    if not math.isfinite(step):
        return "its aggregate is not finite"
    if factor and recent_steps:
        typical = statistics.median(recent_steps)
        if step > factor * typical:
            return (
                f"its aggregate step norm {step:.6g} exceeds {factor:g} x"
                f" the median {typical:.6g} of the last {len(recent_steps)} rounds"
            )
    return None


def remember_step(recent_steps: Sequence[float], step: float) -> list[float]:
    """The last :data:`RECENT_ROUNDS` step norms after applying a round with ``step``."""
    return [*recent_steps, step][-RECENT_ROUNDS:]
