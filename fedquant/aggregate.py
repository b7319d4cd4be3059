"""Aggregation rules: combine K clients' reconstructed tensors, one tensor at a time.

A rule is any callable ``rule(values, *, mse, num_examples) -> aggregate`` (see
:class:`AggregationRule`); one function is enough to add a new one, and
:func:`resolve_rule` finds it by registry name or ``"package.module:attr"``.
:func:`aggregate_tensors` applies a rule to every tensor of a round's replies and
checks what it returns. All arithmetic is in float64; results are float32.
"""

from __future__ import annotations

import importlib
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = [
    "DEFAULT_WEIGHT_CAP",
    "RULES",
    "AggregationRule",
    "CoordinateMedian",
    "ErrorWeighted",
    "OrderStatistic",
    "SampleWeighted",
    "TrimmedMean",
    "WeightedRule",
    "aggregate_tensors",
    "cap_shares",
    "coordinate_median",
    "norm_clip_scales",
    "plain_mean",
    "resolve_rule",
    "sample_weighted",
    "update_norm",
]

DEFAULT_WEIGHT_CAP = 2.0
"""Largest share of a tensor's weight one reply may get, as a multiple of the equal
share 1/K: what a reply claims (its MSE, its example count) buys it at most twice the
weight of an average client."""


@runtime_checkable
class AggregationRule(Protocol):
    """Combine one tensor across K clients.

    Args:
        values: ``(K, *tensor_shape)``, client i's reconstructed tensor in row i
            (float32 or float64).
        mse: ``(K,)``, client i's quantization MSE on this tensor (0 when unquantized).
        num_examples: ``(K,)``, client i's number of training examples.

    Returns:
        The aggregate, shape ``tensor_shape``, float32 (other float dtypes are cast).
    """

    def __call__(
        self, values: np.ndarray, *, mse: np.ndarray, num_examples: np.ndarray
    ) -> np.ndarray:
        """The aggregate of ``values`` over its first axis (see the class)."""
        ...


def _check_stack(values: np.ndarray, **per_client: np.ndarray) -> int:
    """Return K after checking ``values`` is (K, ...) with K >= 1 and each (K,)."""
    if values.ndim < 1 or values.shape[0] < 1:
        raise ValueError(f"`values` must have shape (K, ...) with K >= 1, got {values.shape}")
    k = int(values.shape[0])
    for label, array in per_client.items():
        if array.shape != (k,):
            raise ValueError(f"`{label}` must have shape ({k},), got {array.shape}")
    return k


def _weighted_sum(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``sum_i weights[i] * values[i]`` in float64, returned as float32."""
    total = np.tensordot(weights, values.astype(np.float64, copy=False), axes=(0, 0))
    return np.asarray(total, dtype=np.float32)  # (*tensor_shape)


def cap_shares(raw: np.ndarray, *, cap: float) -> np.ndarray:
    """Normalise non-negative weights to shares summing to 1, none above ``cap / K``.

    Water-filling: a share above the bound is set to it and the mass it loses goes to
    the others in proportion to their weights, until none exceeds it (at most K
    passes). ``cap >= 1`` keeps the bound feasible (``cap == 1``: equal shares,
    ``inf``: no cap);
    shares below the bound keep their ratios, so honest clients' relative weights are
    untouched unless one of them is above the bound itself.

    Raises:
        ValueError: ``raw`` not (K,) finite >= 0 with a positive sum, or ``cap`` < 1.
    """
    weights = np.asarray(raw, dtype=np.float64)
    if weights.ndim != 1 or weights.size == 0:
        raise ValueError(f"weights must have shape (K,) with K >= 1, got {weights.shape}")
    if not (np.isfinite(weights).all() and (weights >= 0).all() and weights.sum() > 0):
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {weights}")
    if not cap >= 1.0:  # also refuses NaN; inf: no cap
        raise ValueError(f"`cap` must be >= 1. Found `{cap!r}`.")
    bound = cap / weights.size
    shares: np.ndarray = weights / weights.sum()
    fixed = np.zeros(weights.size, dtype=bool)
    while (above := (shares > bound * (1 + 1e-12)) & ~fixed).any():
        fixed |= above
        free = weights * ~fixed
        shares = np.where(fixed, bound, 0.0)
        left = 1.0 - bound * fixed.sum()
        if free.sum() > 0:
            shares += left * free / free.sum()
        else:  # every client is at the bound: cap == 1, equal shares
            shares = np.full(weights.size, 1.0 / weights.size)
    return shares


def _check_cap(cap: object) -> None:
    if isinstance(cap, bool) or not isinstance(cap, int | float):
        raise ValueError(f"`cap` must be a float >= 1. Found `{cap!r}`.")
    if not cap >= 1.0:  # also refuses NaN; inf: no cap
        raise ValueError(f"`cap` must be >= 1. Found `{cap!r}`.")


@runtime_checkable
class WeightedRule(Protocol):
    """A weighted average ``sum_i share_i * w_i`` of what the replies claim, capped.

    The shares come from ``raw_weights`` (what the replies claim), capped at ``cap / K``
    (:func:`cap_shares`). The strategy uses ``raw_weights`` to count and log the
    replies the cap held back.
    """

    @property
    def cap(self) -> float:
        """Largest share of one reply, as a multiple of the equal share 1/K."""
        ...

    def raw_weights(self, *, mse: np.ndarray, num_examples: np.ndarray) -> np.ndarray:
        """``(K,)`` non-negative weights, not normalised, before the cap."""
        ...


def _capped_average(
    rule: WeightedRule, values: np.ndarray, *, mse: np.ndarray, num_examples: np.ndarray
) -> np.ndarray:
    """``sum_i share_i * values[i]`` with the rule's capped shares."""
    values = np.asarray(values)
    _check_stack(values, mse=np.asarray(mse), num_examples=np.asarray(num_examples))
    raw = rule.raw_weights(mse=mse, num_examples=num_examples)
    return _weighted_sum(values, cap_shares(raw, cap=rule.cap))


@dataclass(frozen=True)
class ErrorWeighted:
    """Aggregation by quantization error (paper B).

    Bozorgasl & Chen 2024, arXiv 2405.13365, "aggregation by quantization error":
    ``w = sum_i share_i * w_i`` with ``share_i ∝ 1 / e_i``, ``e_i = max(mse_i, floor)``,
    capped at ``cap / K`` (:func:`cap_shares`). Client data sizes are ignored. The
    floor guards a perfectly quantized (or unquantized, mse 0) tensor from a division
    by zero. Caveat: ``mse_i`` is what the client reports. The strategy raises it to
    the rounding error the server can compute from the declared clip and bits
    (``fedquant.codec.rounding_error_floor``) before it gets here, and the cap
    bounds what is left of an under-report: a reply gains at most ``cap`` times the
    equal share, however small the error it claims.
    """

    floor: float = 1e-12
    cap: float = DEFAULT_WEIGHT_CAP

    def __post_init__(self) -> None:
        if isinstance(self.floor, bool) or not isinstance(self.floor, int | float):
            raise ValueError(f"`floor` must be a positive float. Found `{self.floor!r}`.")
        if not (math.isfinite(self.floor) and self.floor > 0):
            raise ValueError(f"`floor` must be finite and > 0. Found `{self.floor!r}`.")
        _check_cap(self.cap)

    def raw_weights(self, *, mse: np.ndarray, num_examples: np.ndarray) -> np.ndarray:
        """``e_min / e_i``: every ratio in (0, 1], so no error overflows."""
        errors = np.asarray(mse, dtype=np.float64)
        if not (np.isfinite(errors).all() and (errors >= 0).all()):
            raise ValueError(f"`mse` must be finite and >= 0, got {errors}")
        errors = np.maximum(errors, self.floor)
        ratios: np.ndarray = errors.min() / errors
        return ratios

    def __call__(
        self, values: np.ndarray, *, mse: np.ndarray, num_examples: np.ndarray
    ) -> np.ndarray:
        """``sum_i share_i * values[i]``, ``share_i ∝ 1 / max(mse_i, floor)``, capped."""
        return _capped_average(self, values, mse=mse, num_examples=num_examples)


@dataclass(frozen=True)
class SampleWeighted:
    """FedAvg: ``w = sum_i (n_i / sum_k n_k) * w_i``, each share capped at ``cap / K``.

    McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
    Decentralized Data", Algorithm 1, with the shares capped by :func:`cap_shares`
    (``cap = K`` or more is the paper's rule). ``mse`` is ignored.

    Caveat: ``n_i`` is what the client claims; the server cannot count another
    machine's examples. The strategy rejects counts at or above ``max-num-examples``
    and the cap bounds what an inflated count buys: at most ``cap`` times the equal
    share.

    Raises:
        ValueError: a negative or non-finite ``n_i``, or ``sum_k n_k <= 0``.
    """

    cap: float = DEFAULT_WEIGHT_CAP

    def __post_init__(self) -> None:
        _check_cap(self.cap)

    def raw_weights(self, *, mse: np.ndarray, num_examples: np.ndarray) -> np.ndarray:
        """``n_i``, the claimed example counts."""
        counts = np.asarray(num_examples, dtype=np.float64)
        if not (np.isfinite(counts).all() and (counts >= 0).all()):
            raise ValueError(f"`num_examples` must be finite and >= 0, got {counts}")
        if counts.sum() <= 0:
            raise ValueError(f"`num_examples` must sum to > 0, got {counts}")
        return counts

    def __call__(
        self, values: np.ndarray, *, mse: np.ndarray, num_examples: np.ndarray
    ) -> np.ndarray:
        """``sum_i share_i * values[i]``, ``share_i ∝ n_i``, capped."""
        return _capped_average(self, values, mse=mse, num_examples=num_examples)


sample_weighted = SampleWeighted(cap=math.inf)
"""The paper's FedAvg, uncapped: every claimed example counts."""


def plain_mean(values: np.ndarray, *, mse: np.ndarray, num_examples: np.ndarray) -> np.ndarray:
    """Unweighted mean ``w = (1/K) sum_i w_i``; ``mse`` and ``num_examples`` are ignored."""
    values = np.asarray(values)
    k = _check_stack(values)
    return _weighted_sum(values, np.full(k, 1.0 / k))


class OrderStatistic:
    """Marks a rule built on per-coordinate order statistics (median, trimmed mean).

    Such a rule drops extreme values itself, so the strategy does not norm-clip updates
    before it (a hostile update scaled down to the median norm would sit inside the
    honest values' range, where the rule keeps it). Subclass it for such a rule.
    """


class CoordinateMedian(OrderStatistic):
    """Coordinate-wise median ``w[j] = median_i w_i[j]``.

    Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates", Definition 1. With even K it is the mean of the two middle
    values.

    Robust while fewer than half of the clients are hostile, at the price of
    ignoring ``mse`` and ``num_examples``: every client counts as one vote.
    """

    def __call__(
        self, values: np.ndarray, *, mse: np.ndarray, num_examples: np.ndarray
    ) -> np.ndarray:
        """The per-coordinate median of ``values`` over its first axis."""
        values = np.asarray(values)
        _check_stack(values)
        return np.median(values.astype(np.float64, copy=False), axis=0).astype(np.float32)


coordinate_median = CoordinateMedian()


@dataclass(frozen=True)
class TrimmedMean(OrderStatistic):
    """Coordinate-wise trimmed mean.

    Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
    Rates", Definition 2. Per coordinate, sort the K values, drop the ``b = byzantine``
    smallest and the ``b`` largest, and average the ``K - 2b`` left: up to ``b`` hostile
    values per coordinate cannot pull the result outside the honest values' range. It needs
    ``K >= 2b + 1``; with fewer replies (some were rejected) it cuts
    ``floor((K - 1) / 2)`` from each end, the most that leaves a value, which is the
    median for odd K. The run config checks ``2b + 1 <= sampled clients`` at start.
    ``mse`` and ``num_examples`` are ignored.
    """

    byzantine: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.byzantine, bool) or not isinstance(self.byzantine, int):
            raise ValueError(f"`byzantine` must be an int >= 0. Found `{self.byzantine!r}`.")
        if self.byzantine < 0:
            raise ValueError(f"`byzantine` must be >= 0. Found `{self.byzantine!r}`.")

    def cut(self, k: int) -> int:
        """Values cut from each end with K replies."""
        return min(self.byzantine, (k - 1) // 2)

    def __call__(
        self, values: np.ndarray, *, mse: np.ndarray, num_examples: np.ndarray
    ) -> np.ndarray:
        """Per coordinate, the mean of ``values`` without ``cut(K)`` values at each end."""
        values = np.asarray(values)
        k = _check_stack(values)
        cut = self.cut(k)
        ordered = np.sort(values.astype(np.float64, copy=False), axis=0)  # (K, *shape)
        return np.asarray(ordered[cut : k - cut].mean(axis=0), dtype=np.float32)


RULES: dict[str, AggregationRule] = {
    "error-weighted": ErrorWeighted(),
    "fedavg": SampleWeighted(),
    "mean": plain_mean,
    "median": coordinate_median,
    "trimmed-mean": TrimmedMean(),
}
"""Rules by name, for run configs (``aggregation = "error-weighted"``)."""


def resolve_rule(spec: str | AggregationRule) -> AggregationRule:
    """Turn a run-config value into a rule.

    ``spec`` is a name in :data:`RULES`, or ``"package.module:attr"`` where ``attr``
    (dots allowed, e.g. ``"Class.method"``) is a function, a class (instantiated
    with no arguments) or a callable instance; a callable passes through unchanged.

    Raises:
        ValueError: unknown name, module not importable, attribute missing, class
            not instantiable without arguments, or the result is not callable; the
            message names ``spec``.
        TypeError: ``spec`` is neither a str nor callable.
    """
    if not isinstance(spec, str):
        if callable(spec):
            return spec
        raise TypeError(f"aggregation rule must be a str or callable, got {spec!r}")
    if ":" not in spec:
        if spec in RULES:
            return RULES[spec]
        known = ", ".join(sorted(RULES))
        raise ValueError(
            f"unknown aggregation rule {spec!r}: use one of {known} or 'package.module:attr'"
        )

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"aggregation rule {spec!r}: expected 'package.module:attr'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any import failure is a config error
        raise ValueError(
            f"aggregation rule {spec!r}: cannot import module {module_name!r}: {err}"
        ) from err
    obj: object = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as err:
            raise ValueError(
                f"aggregation rule {spec!r}: {module_name!r} has no attribute {attr!r}"
            ) from err
    if isinstance(obj, type):
        try:
            obj = obj()
        except TypeError as err:
            raise ValueError(
                f"aggregation rule {spec!r}: class cannot be instantiated without arguments: {err}"
            ) from err
    if not callable(obj):
        raise ValueError(f"aggregation rule {spec!r}: {obj!r} is not callable")
    return obj  # callable; the signature is checked by use


def _rule_name(rule: object) -> str:
    name = getattr(rule, "__qualname__", None)
    return name if isinstance(name, str) else type(rule).__qualname__


def aggregate_tensors(
    clients: Sequence[Mapping[str, np.ndarray]],
    *,
    mse: Sequence[Mapping[str, float]],
    num_examples: Sequence[int],
    rule: AggregationRule,
) -> dict[str, np.ndarray]:
    """Aggregate each named tensor over the clients with ``rule``.

    For every tensor name, stacks the K clients' arrays to ``(K, *shape)`` and calls
    ``rule(values, mse=(K,) float64, num_examples=(K,) int64)``. Every client (and
    every ``mse`` mapping) must carry the same names and, per name, the same shape;
    no client is dropped silently. Names keep the first client's order.

    Returns:
        ``{name: float32 array of the tensor's shape}``.

    Raises:
        ValueError: K == 0; sequence lengths differ; names or shapes disagree;
            ``num_examples`` not integers; the rule returns the wrong shape, a
            non-numeric or a non-finite result (named with rule and tensor).
    """
    k = len(clients)
    if k == 0:
        raise ValueError("cannot aggregate zero clients")
    if len(mse) != k or len(num_examples) != k:
        raise ValueError(
            f"got {k} clients but {len(mse)} mse mappings and {len(num_examples)} num_examples"
        )
    try:
        counts = np.array([operator.index(n) for n in num_examples], dtype=np.int64)
    except (TypeError, OverflowError) as err:
        raise ValueError(f"`num_examples` must be ints, got {list(num_examples)}") from err

    names = list(clients[0].keys())
    wanted = set(names)
    for i in range(k):
        for label, mapping in (("tensors", clients[i]), ("mse", mse[i])):
            if set(mapping.keys()) != wanted:
                extra = sorted(set(mapping.keys()) - wanted)
                missing = sorted(wanted - set(mapping.keys()))
                raise ValueError(
                    f"client {i} {label}: names differ from client 0 "
                    f"(missing {missing}, extra {extra})"
                )

    rule_name = _rule_name(rule)
    result: dict[str, np.ndarray] = {}
    for name in names:
        arrays = [np.asarray(client[name]) for client in clients]
        shape = arrays[0].shape
        for i, array in enumerate(arrays):
            if array.shape != shape:
                raise ValueError(
                    f"tensor {name!r}: client {i} has shape {array.shape}, client 0 has {shape}"
                )
        values = np.stack(arrays)  # (K, *shape)
        if values.dtype not in (np.float32, np.float64):
            values = values.astype(np.float64)
        errors = np.array([float(m[name]) for m in mse], dtype=np.float64)  # (K,)
        try:
            out = rule(values, mse=errors, num_examples=counts.copy())
        except Exception as err:
            err.add_note(f"while aggregating tensor {name!r} with rule {rule_name}")
            raise
        out = np.asarray(out)
        if out.shape != shape:
            raise ValueError(
                f"rule {rule_name} returned shape {out.shape} for tensor {name!r}, expected {shape}"
            )
        if out.dtype.kind not in "fiu":
            raise ValueError(
                f"rule {rule_name} returned dtype {out.dtype} for tensor {name!r}, expected float"
            )
        out = out.astype(np.float32)
        if not np.isfinite(out).all():
            raise ValueError(f"rule {rule_name} returned non-finite values for tensor {name!r}")
        result[name] = out
    return result


def update_norm(update: Mapping[str, np.ndarray]) -> float:
    """L2 norm of a whole update, over all its tensors: ``sqrt(sum_t ||Δ_t||_2^2)``.

    In float64.
    """
    return math.sqrt(
        sum(float(np.sum(np.square(np.asarray(v, dtype=np.float64)))) for v in update.values())
    )


def norm_clip_scales(norms: Sequence[float], *, factor: float) -> tuple[np.ndarray, float]:
    """Scale factors that bound each update's L2 norm by ``factor`` x the median norm.

    ``bound = factor * median_i ||Δ_i||`` and ``scale_i = min(1, bound / ||Δ_i||)``,
    so ``scale_i * Δ_i`` has norm ``min(||Δ_i||, bound)``: norm clipping (Sun et al.
    2019, "Can You Really Backdoor Federated Learning?", norm thresholding of
    updates), with the threshold taken from the round itself so it needs no tuning
    to the model's scale. Caveat: the median is only robust while fewer than half of
    the updates are hostile; with one or two clients, a hostile one sets the bound.

    Returns:
        ``(scales, bound)``: ``(K,)`` float64 factors in ``[0, 1]``, and the bound.

    Raises:
        ValueError: no norms, a negative or non-finite norm, or ``factor`` not
            finite and > 0.
    """
    if isinstance(factor, bool) or not (
        isinstance(factor, int | float) and math.isfinite(factor) and factor > 0
    ):
        raise ValueError(f"`factor` must be finite and > 0. Found `{factor!r}`.")
    array = np.asarray(norms, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"`norms` must have shape (K,) with K >= 1, got {array.shape}")
    if not (np.isfinite(array).all() and (array >= 0).all()):
        raise ValueError(f"`norms` must be finite and >= 0, got {array}")
    bound = float(factor * np.median(array))
    above = array > bound
    scales = np.ones_like(array)
    scales[above] = bound / array[above]  # the norm is > bound >= 0 there
    return scales, bound
