"""The reply format: a client's whole training reply <-> Flower records.

:mod:`fedquant.payload` is the tensor codec (packed codes plus per-tensor bits, clip and
MSE); this module owns everything around it: the record keys of both directions, every
metric name a reply may carry, the budget-exhausted status reply, and the strict decode
of a whole reply into a typed :class:`ClientReply` or :class:`BudgetExhausted`, checked
against what the run allows (:class:`ReplyLimits`). A reply is untrusted input to the
server: :func:`decode_reply` raises :class:`ReplyError` on anything malformed or out of
bounds, and no other exception escapes it.

Layout of a training reply (``RecordDict``):

- ``CODES_KEY`` / ``META_KEY`` (and ``CODEC_KEY`` with a rotation or dither): the
  update as :func:`fedquant.payload.encode_update` writes it;
- ``METRICS_KEY``: a ``MetricRecord`` with the names in :data:`REPLY_METRICS`
  (``num-examples`` and ``server-round`` required, the rest optional; ``epsilon``
  required under DP and forbidden without it).

A client that stopped to stay within its privacy budget sends only ``METRICS_KEY``,
holding ``budget-exhausted = 1``, ``server-round`` and ``epsilon``
(:data:`STATUS_METRICS`). The server's instruction holds the float32 model under
``ARRAYS_KEY`` and a ``ConfigRecord`` with ``server-round`` under ``CONFIG_KEY``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    Message,
    MessageType,
    MetricRecord,
    MetricRecordValues,
    RecordDict,
)

from fedquant.codec import rounding_error_floor
from fedquant.config import ClipRule, PayloadMode, Rotation, Rounding, RunConfig
from fedquant.payload import (
    CODEC_KEY,
    CODES_KEY,
    FLOAT_BITS,
    META_KEY,
    DecodedTensor,
    PayloadError,
    decode_update,
    encode_update,
    needs_seed,
    serialized_size,
)

__all__ = [
    "ARRAYS_KEY",
    "BUDGET_EXHAUSTED",
    "CODES_KEY",
    "CONFIG_KEY",
    "EPSILON",
    "EPSILON_TOLERANCE",
    "LOCAL_EPOCHS",
    "MAX_LAYERS",
    "MAX_NUM_EXAMPLES",
    "META_KEY",
    "METRICS_KEY",
    "NOISE_MULTIPLIER",
    "NUM_EXAMPLES",
    "QUANTIZED_EPOCHS",
    "REPLY_METRICS",
    "SERVER_ROUND",
    "SPEEDUP",
    "STATUS_METRICS",
    "BudgetExhausted",
    "ClientReply",
    "ReplyError",
    "ReplyLimits",
    "as_float32_reply",
    "checked_mse",
    "decode_reply",
    "encode_budget_exhausted",
    "encode_reply",
    "is_budget_exhausted",
]

# Record keys ---------------------------------------------------------------------------

ARRAYS_KEY = "arrays"
"""Instruction record (``ArrayRecord``) with the float32 global model; also the key of a
stock float32 reply's weights."""
CONFIG_KEY = "config"
"""Instruction record (``ConfigRecord``) with the round's config (``server-round``)."""
METRICS_KEY = "metrics"
"""Reply record (``MetricRecord``) with the metrics in :data:`REPLY_METRICS`."""

# Metric names --------------------------------------------------------------------------

NUM_EXAMPLES = "num-examples"
"""The client's partition size (int; public by design, the weight of FedAvg)."""
SERVER_ROUND = "server-round"
"""The round a reply answers (int); also the instruction's config key."""
SPEEDUP = "speedup"
"""Theoretical speedup of the round's low-precision layers (paper A's formula)."""
LOCAL_EPOCHS = "local-epochs"
"""Local epochs trained this round (int)."""
QUANTIZED_EPOCHS = "quantized-epochs"
"""Per quantizable layer, the epochs it ran in low precision (list of int)."""
EPSILON = "epsilon"
"""The client's cumulative ε so far (under DP only)."""
NOISE_MULTIPLIER = "noise-multiplier"
"""The client's DP-SGD noise multiplier (under DP only)."""
BUDGET_EXHAUSTED = "budget-exhausted"
"""1 in a status reply: the client stopped training to stay within its budget."""

REPLY_METRICS = frozenset(
    {NUM_EXAMPLES, SERVER_ROUND, SPEEDUP, LOCAL_EPOCHS, QUANTIZED_EPOCHS, EPSILON, NOISE_MULTIPLIER}
)
"""Every metric a training reply may carry; the server rejects a reply with any other.
Partition size is public by design; the rest is derived from the plan, the DPQuant
schedule (post-processing of DP estimates) and the privacy ledger."""
STATUS_METRICS = frozenset({SERVER_ROUND, BUDGET_EXHAUSTED, EPSILON})
"""Every metric of a budget-exhausted status reply (all required)."""

# Limits --------------------------------------------------------------------------------

MAX_NUM_EXAMPLES = 10**6
"""Default exclusive limit on a reply's ``num-examples`` (run config ``max-num-examples``)."""
EPSILON_TOLERANCE = 0.01
"""A reported ε may exceed the budget by this fraction (the accountant's numerical error)."""
MAX_LAYERS = 1024
"""Most entries of ``quantized-epochs`` (one per quantizable layer)."""
MAX_LOCAL_EPOCHS = 10**6
"""Exclusive limit on ``local-epochs``."""
MAX_NOISE_MULTIPLIER = 1e6
"""Exclusive limit on ``noise-multiplier``."""

MetricValues = Mapping[str, MetricRecordValues]


class ReplyError(PayloadError):
    """A reply that is malformed or claims more than the run allows.

    Every failure of :func:`decode_reply` is one, with ``field`` the record key, metric
    name or tensor field at fault and ``tensor`` the tensor's name (``None`` for the reply
    as a whole); ``str(err)`` reads ``"field 'epsilon': must be in [0, 8.08] ..."``.
    """


@dataclass(frozen=True)
class ReplyLimits:
    """What a run allows a reply to claim.

    Args:
        max_epsilon: the run's ε budget under DP; None when DP is off, and then a reply
            carrying ``epsilon`` or ``noise-multiplier`` (or a budget-exhausted status)
            is rejected.
        max_num_examples: exclusive upper limit on ``num-examples``.
        max_speedup: largest theoretical speedup a reply may report (the run's
            ``low-precision-speedup``: all layers in low precision).
        max_clip: largest clip threshold a tensor may declare (``max-clip``).
        rotation: the run's rotation (the server inverts it; ``rotation``).
        rounding: the run's rounding (``Rounding.DITHERED``: the server subtracts the
            dither; ``rounding``).

    Raises:
        ValueError: a limit that is not finite and in range, naming it.
    """

    max_epsilon: float | None = None
    max_num_examples: int = MAX_NUM_EXAMPLES
    max_speedup: float = 32.0
    max_clip: float = 1e4
    rotation: Rotation = Rotation.NONE
    rounding: Rounding = Rounding.STOCHASTIC

    def __post_init__(self) -> None:
        if self.max_epsilon is not None and not (
            math.isfinite(self.max_epsilon) and self.max_epsilon > 0
        ):
            raise ValueError(f"`max_epsilon` must be finite and > 0. Found `{self.max_epsilon!r}`.")
        if isinstance(self.max_num_examples, bool) or not (
            isinstance(self.max_num_examples, int) and self.max_num_examples > 1
        ):
            raise ValueError(
                f"`max_num_examples` must be an int > 1. Found `{self.max_num_examples!r}`."
            )
        if not (math.isfinite(self.max_speedup) and self.max_speedup >= 1):
            raise ValueError(
                f"`max_speedup` must be finite and >= 1. Found `{self.max_speedup!r}`."
            )
        if not (math.isfinite(self.max_clip) and self.max_clip > 0):
            raise ValueError(f"`max_clip` must be finite and > 0. Found `{self.max_clip!r}`.")

    @classmethod
    def from_config(cls, cfg: RunConfig) -> ReplyLimits:
        """The limits of a run: its ε budget under DP, example cap, speedup and clip."""
        return cls(
            max_epsilon=cfg.dp.target_epsilon if cfg.dp.enabled else None,
            max_num_examples=cfg.robust.max_num_examples,
            max_speedup=cfg.dpquant.low_precision_speedup,
            max_clip=cfg.codec.max_clip,
            rotation=cfg.codec.rotation,
            rounding=cfg.codec.rounding,
        )


@dataclass(frozen=True)
class ClientReply:
    """A validated training reply.

    ``update`` is the client's update Δ, so that its local weights are ``w_global + Δ``
    (Δ̂ as decoded for updates; ŵ − w_global, in float64, for weights). ``mse`` is the
    error the aggregation rules see: each tensor's reported MSE raised to the rounding
    error of its declared clip and bits (:func:`checked_mse`); ``claimed_mse`` is what
    the client reported. ``uplink_bytes`` is the reply's size as Flower serializes it,
    measured once, when it is decoded.
    """

    node_id: int
    update: dict[str, np.ndarray]
    mse: dict[str, float]
    claimed_mse: dict[str, float]
    num_examples: int
    uplink_bytes: int
    epsilon: float | None
    speedup: float
    local_epochs: int
    quantized_epochs: tuple[int, ...]

    def weights(self, global_arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The client's local weights ``w_global + Δ``."""
        return {k: global_arrays[k] + v for k, v in self.update.items()}


@dataclass(frozen=True)
class BudgetExhausted:
    """A validated status reply: the client did not train, to stay within its budget.

    ``epsilon`` is the ε it has spent (cumulative, within the run's (ε, δ) budget).
    """

    node_id: int
    epsilon: float


# ----------------------------------------------------------------------------- encode


def encode_reply(
    update: Mapping[str, torch.Tensor],
    metrics: MetricValues,
    *,
    bits: int,
    clip: ClipRule = ClipRule.OCTAV,
    rounding: Rounding = Rounding.STOCHASTIC,
    generator: torch.Generator | None = None,
    rotation: Rotation = Rotation.NONE,
    unbiased_scale: bool = False,
    entropy_coding: bool = False,
    seed: int | None = None,
) -> RecordDict:
    """A client's training reply: ``update`` encoded (:func:`encode_update`) plus metrics.

    Raises:
        ValueError: a metric name not in :data:`REPLY_METRICS` (a client bug: the server
            would reject the reply), or what :func:`encode_update` raises.
    """
    unknown = sorted(set(metrics) - REPLY_METRICS)
    if unknown:
        raise ValueError(f"not reply metrics: {unknown}; a reply may carry {sorted(REPLY_METRICS)}")
    content = encode_update(
        update,
        bits=bits,
        clip=clip,
        rounding=rounding,
        generator=generator,
        rotation=rotation,
        unbiased_scale=unbiased_scale,
        entropy_coding=entropy_coding,
        seed=seed,
    )
    content[METRICS_KEY] = MetricRecord(dict(metrics))
    return content


def encode_budget_exhausted(*, server_round: int, epsilon: float) -> RecordDict:
    """The status reply of a client that stopped to stay within its budget."""
    metrics = MetricRecord({SERVER_ROUND: server_round, BUDGET_EXHAUSTED: 1, EPSILON: epsilon})
    return RecordDict({METRICS_KEY: metrics})


def as_float32_reply(
    weights: Mapping[str, np.ndarray], *, num_examples: int, node_id: int
) -> Message:
    """A stock float32 training reply: ``ARRAYS_KEY`` plus ``num-examples``.

    As Flower's strategies expect it, e.g. to hand a validated reply to a wrapped
    ``FedAdam``.
    """
    content = RecordDict(
        {
            ARRAYS_KEY: ArrayRecord(
                {k: Array(np.asarray(v, np.float32)) for k, v in weights.items()}
            ),
            METRICS_KEY: MetricRecord({NUM_EXAMPLES: num_examples}),
        }
    )
    return Message(content=content, dst_node_id=node_id, message_type=MessageType.TRAIN)


# ----------------------------------------------------------------------------- decode


def is_budget_exhausted(content: RecordDict) -> bool:
    """Whether ``content`` is shaped as a status reply.

    Only ``METRICS_KEY``, with ``budget-exhausted == 1``; its other fields are checked
    by :func:`decode_reply`.
    """
    metrics = content.get(METRICS_KEY)
    return (
        set(content.keys()) == {METRICS_KEY}
        and isinstance(metrics, MetricRecord)
        and metrics.get(BUDGET_EXHAUSTED) == 1
    )


def decode_reply(
    reply: Message | RecordDict,
    *,
    server_round: int,
    global_arrays: Mapping[str, np.ndarray],
    payload: PayloadMode = PayloadMode.UPDATE,
    limits: ReplyLimits | None = None,
    node_id: int = 0,
) -> ClientReply | BudgetExhausted:
    """Validate a whole reply to round ``server_round``; return it typed.

    A status reply (:func:`is_budget_exhausted`) must carry exactly
    :data:`STATUS_METRICS`, be for this round, come from a run with a privacy budget,
    and report an ε within it. Any other reply is a training reply: exactly the records
    ``CODES_KEY``, ``META_KEY``, ``METRICS_KEY``; only :data:`REPLY_METRICS`;
    ``num-examples`` an int in ``1..max_num_examples - 1``; ``server-round`` equal to
    ``server_round``; ε required under DP, within ``max_epsilon · (1 +
    EPSILON_TOLERANCE)``, and forbidden (with ``noise-multiplier``) without DP;
    ``speedup`` in ``(0, max_speedup]`` (below 1 when DPQuant's estimator costs more than
    quantization saves); ``local-epochs`` an int in ``0..MAX_LOCAL_EPOCHS - 1``;
    ``quantized-epochs`` at most ``MAX_LAYERS`` ints in ``0..local-epochs``; then the
    tensors (:func:`fedquant.payload.decode_update`), whose names and shapes must be
    those of ``global_arrays`` and whose clip may not exceed ``max_clip``.

    Args:
        reply: the reply, as a ``Message`` (its sender's node id is kept) or its content.
        server_round: the round being aggregated.
        global_arrays: the global model the reply's round started from.
        payload: whether the tensors are updates Δ or weights w (then Δ = ŵ − w_global).
        limits: what the run allows (default: ``ReplyLimits()``, no DP).
        node_id: the sender, when ``reply`` is a bare ``RecordDict``.

    Raises:
        ReplyError: any of the above, naming the field (and tensor).
    """
    limits = limits if limits is not None else ReplyLimits()
    if isinstance(reply, Message):
        if reply.has_error():
            raise ReplyError(tensor=None, field="content", reason="the message carries an error")
        node_id = reply.metadata.src_node_id
        content = reply.content
    else:
        content = reply
    if not isinstance(content, RecordDict):
        got = type(content).__name__
        raise ReplyError(tensor=None, field="content", reason=f"must be a RecordDict, got {got}")
    try:
        if is_budget_exhausted(content):
            return _decode_status(content, server_round=server_round, limits=limits, node=node_id)
        return _decode_training(
            content,
            server_round=server_round,
            global_arrays=global_arrays,
            payload=payload,
            limits=limits,
            node=node_id,
        )
    except ReplyError:
        raise
    except PayloadError as err:  # the tensor codec's: keep its tensor and field
        raise ReplyError(tensor=err.tensor, field=err.field, reason=err.reason) from err


def checked_mse(tensor: DecodedTensor) -> float:
    """The reported MSE, raised to the rounding error of the declared grid.

    ``max(mse, Δ²/12)`` with ``Δ = 2 s / (2^B − 1)``
    (:func:`fedquant.codec.rounding_error_floor`): a reply cannot claim a smaller error
    than its own clip and bits allow, so error weighting (Bozorgasl & Chen 2024) cannot
    be won by under-reporting. Unquantized tensors keep 0.
    """
    if tensor.bits == FLOAT_BITS:
        return tensor.mse
    return max(tensor.mse, rounding_error_floor(bits=tensor.bits, clip=tensor.clip))


def _decode_status(
    content: RecordDict, *, server_round: int, limits: ReplyLimits, node: int
) -> BudgetExhausted:
    metrics = content[METRICS_KEY]
    assert isinstance(metrics, MetricRecord)  # is_budget_exhausted checked it
    unknown = sorted(set(metrics.keys()) - STATUS_METRICS)
    if unknown:
        raise ReplyError(tensor=None, field=unknown[0], reason="not a status metric")
    _check_round(metrics, server_round)
    if limits.max_epsilon is None:
        raise ReplyError(
            tensor=None, field=BUDGET_EXHAUSTED, reason="this run has no privacy budget"
        )
    epsilon = _privacy_metrics(metrics, limits)
    assert epsilon is not None  # required under DP
    return BudgetExhausted(node_id=node, epsilon=epsilon)


def _decode_training(
    content: RecordDict,
    *,
    server_round: int,
    global_arrays: Mapping[str, np.ndarray],
    payload: PayloadMode,
    limits: ReplyLimits,
    node: int,
) -> ClientReply:
    records = {CODES_KEY, META_KEY, METRICS_KEY}
    if needs_seed(rotation=limits.rotation, rounding=limits.rounding):
        records.add(CODEC_KEY)
    if set(content.keys()) != records:
        reason = f"unexpected records {sorted(content.keys())}"
        raise ReplyError(tensor=None, field="records", reason=reason)
    metrics = content[METRICS_KEY]
    if not isinstance(metrics, MetricRecord):
        raise ReplyError(tensor=None, field=METRICS_KEY, reason="not a MetricRecord")
    unknown = sorted(set(metrics.keys()) - REPLY_METRICS)
    if unknown:
        raise ReplyError(tensor=None, field=unknown[0], reason="not a reply metric")
    num_examples = _int_metric(metrics, NUM_EXAMPLES)
    limit = limits.max_num_examples
    if not 0 < num_examples < limit:
        reason = f"must be in 1..{limit - 1} (max-num-examples {limit}), got {num_examples}"
        raise ReplyError(tensor=None, field=NUM_EXAMPLES, reason=reason)
    _check_round(metrics, server_round)
    epsilon = _privacy_metrics(metrics, limits)
    speedup = _float_metric(metrics, SPEEDUP) if SPEEDUP in metrics else 1.0
    if not 0.0 < speedup <= limits.max_speedup:
        reason = f"must be in (0, {limits.max_speedup:g}], got {speedup}"
        raise ReplyError(tensor=None, field=SPEEDUP, reason=reason)
    local_epochs = _int_metric(metrics, LOCAL_EPOCHS) if LOCAL_EPOCHS in metrics else 0
    if not 0 <= local_epochs < MAX_LOCAL_EPOCHS:
        reason = f"must be in 0..{MAX_LOCAL_EPOCHS - 1}, got {local_epochs}"
        raise ReplyError(tensor=None, field=LOCAL_EPOCHS, reason=reason)
    quantized = metrics.get(QUANTIZED_EPOCHS, [])
    if not (
        isinstance(quantized, list)
        and len(quantized) <= MAX_LAYERS
        and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= local_epochs
            for v in quantized
        )
    ):
        reason = f"must be a list of at most {MAX_LAYERS} ints in 0..local-epochs"
        raise ReplyError(tensor=None, field=QUANTIZED_EPOCHS, reason=reason)
    decoded = decode_update(
        content,
        expected={k: tuple(v.shape) for k, v in global_arrays.items()},
        max_clip=limits.max_clip,
        rotation=limits.rotation,
        rounding=limits.rounding,
    )
    return ClientReply(
        node_id=node,
        update=_update(decoded, global_arrays, payload),
        mse={k: checked_mse(t) for k, t in decoded.items()},
        claimed_mse={k: t.mse for k, t in decoded.items()},
        num_examples=num_examples,
        uplink_bytes=serialized_size(content),
        epsilon=epsilon,
        speedup=speedup,
        local_epochs=local_epochs,
        quantized_epochs=tuple(int(v) for v in quantized),
    )


def _update(
    decoded: Mapping[str, DecodedTensor],
    global_arrays: Mapping[str, np.ndarray],
    payload: PayloadMode,
) -> dict[str, np.ndarray]:
    """Δ from the decoded tensors: as they are for updates, ŵ − w_global for weights."""
    if payload is PayloadMode.UPDATE:
        return {k: t.values for k, t in decoded.items()}
    # In float64, where a difference of two float32 values is exact (unless their
    # magnitudes are 2^29 apart), so w_global + Δ gives ŵ back.
    return {k: t.values.astype(np.float64) - global_arrays[k] for k, t in decoded.items()}


def _check_round(metrics: MetricRecord, server_round: int) -> None:
    reply_round = _int_metric(metrics, SERVER_ROUND)
    if reply_round != server_round:
        reason = f"reply is for round {reply_round}, not {server_round}"
        raise ReplyError(tensor=None, field=SERVER_ROUND, reason=reason)


def _privacy_metrics(metrics: MetricRecord, limits: ReplyLimits) -> float | None:
    """The reply's ε, checked against the run's budget.

    Required under DP, within the budget (plus the accountant's numerical error);
    forbidden without DP, as is a noise multiplier.
    """
    budget = limits.max_epsilon
    if budget is None:
        for key in (EPSILON, NOISE_MULTIPLIER):
            if key in metrics:
                raise ReplyError(tensor=None, field=key, reason="this run has no DP")
        return None
    epsilon = _float_metric(metrics, EPSILON)
    allowed = budget * (1 + EPSILON_TOLERANCE)
    if not 0 <= epsilon <= allowed:
        reason = f"must be in [0, {allowed:g}] (the run's budget {budget:g}), got {epsilon}"
        raise ReplyError(tensor=None, field=EPSILON, reason=reason)
    if NOISE_MULTIPLIER in metrics:
        noise = _float_metric(metrics, NOISE_MULTIPLIER)
        if not 0 < noise < MAX_NOISE_MULTIPLIER:
            reason = f"must be in (0, {MAX_NOISE_MULTIPLIER:g}), got {noise}"
            raise ReplyError(tensor=None, field=NOISE_MULTIPLIER, reason=reason)
    return epsilon


def _number(metrics: MetricRecord, key: str) -> Any:
    if key not in metrics:
        raise ReplyError(tensor=None, field=key, reason="missing")
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReplyError(tensor=None, field=key, reason=f"must be a number, got {value!r}")
    return value


def _int_metric(metrics: MetricRecord, key: str) -> int:
    """An int metric (Python ints are exact; the caller checks the range)."""
    value = _number(metrics, key)
    if not isinstance(value, int):
        raise ReplyError(tensor=None, field=key, reason=f"must be an integer, got {value!r}")
    return value


def _float_metric(metrics: MetricRecord, key: str) -> float:
    """A numeric metric as a finite float."""
    value = _number(metrics, key)
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range; math.isfinite would raise too
        raise ReplyError(tensor=None, field=key, reason="int out of float range") from None
    if not math.isfinite(number):
        raise ReplyError(tensor=None, field=key, reason=f"must be finite, got {value!r}")
    return number
