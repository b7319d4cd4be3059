"""What a training round reports: its metric names, counts, ``MetricRecord`` and log lines.

``QuantizedStrategy.aggregate_train`` counts the round's replies in a
:class:`RoundCounts` (logging each failure, rejection and exhausted budget), and returns
one :class:`RoundMetrics` as a ``MetricRecord`` (:meth:`RoundMetrics.to_record`); the
ServerApp writes them to ``results.json`` and ``rounds.csv`` (``sims.app.report``). The
``log_*`` functions are the strategy's other warnings, one per decision it takes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import MetricRecord
from flwr.supercore import log

from fedquant.reply import BUDGET_EXHAUSTED, NUM_EXAMPLES, SPEEDUP, ClientReply

ACCEPTED = "accepted"
REJECTED = "rejected"
FAILED = "failed"
MISSING = "missing"
NORM_CLIPPED = "norm-clipped"
DOWN_WEIGHTED = "down-weighted"
SKIPPED = "skipped"
DISCARDED = "discarded"
STEP_NORM = "step-norm"
EPSILON_MAX = "epsilon-max"
EPSILON_CLIENTS = "epsilon-clients"
EPSILON_MAX_RUN = "epsilon-max-run"
QUANTIZED_LAYER_FRACTION = "quantized-layer-fraction"
UPLINK_BYTES = "uplink-bytes"
DOWNLINK_BYTES = "downlink-bytes"
UPLINK_FLOAT32_BYTES = "uplink-float32-bytes"
DOWNLINK_FLOAT32_BYTES = "downlink-float32-bytes"
UPLINK_BITS = "uplink-bits-per-coordinate"
DOWNLINK_BITS = "downlink-bits-per-coordinate"
MSE_MEAN = "mse-mean"
MSE_MAX = "mse-max"
# Also reply metric names (fedquant.reply): summed or averaged over the round's replies.
__all__ = [
    "ACCEPTED",
    "BUDGET_EXHAUSTED",
    "DISCARDED",
    "DOWNLINK_BITS",
    "DOWNLINK_BYTES",
    "DOWNLINK_FLOAT32_BYTES",
    "DOWN_WEIGHTED",
    "EPSILON_CLIENTS",
    "EPSILON_MAX",
    "EPSILON_MAX_RUN",
    "FAILED",
    "MISSING",
    "MSE_MAX",
    "MSE_MEAN",
    "NORM_CLIPPED",
    "NUM_EXAMPLES",
    "QUANTIZED_LAYER_FRACTION",
    "REJECTED",
    "SKIPPED",
    "SPEEDUP",
    "STEP_NORM",
    "UPLINK_BITS",
    "UPLINK_BYTES",
    "UPLINK_FLOAT32_BYTES",
    "RoundCounts",
    "RoundMetrics",
    "log_discarded",
    "log_down_weighted",
    "log_norm_bound",
    "log_skipped",
    "log_trimmed_short",
]

NORM_WARNING_BELOW = 0.5
"""The norm bound logs a warning for each reply it scales by less than this."""


@dataclass
class RoundCounts:
    """What became of a round's replies, counted (and logged) as they are decoded."""

    server_round: int
    received: int = 0
    failed: int = 0
    rejected: int = 0
    exhausted: int = 0
    accepted: list[ClientReply] = field(default_factory=list)

    def fail(self, node: int, reason: str | None) -> None:
        """``node``'s ClientApp failed (an error message instead of a reply)."""
        self.failed += 1
        log(WARNING, "Round %d: node %d failed: %s", self.server_round, node, reason)

    def reject(self, node: int, error: Exception) -> None:
        """``node``'s reply is malformed or claims more than the run allows."""
        self.rejected += 1
        log(WARNING, "Round %d: rejected reply from node %d: %s", self.server_round, node, error)

    def exhaust(self, node: int, epsilon: float) -> None:
        """``node`` stopped training to stay within its privacy budget."""
        self.exhausted += 1
        log(
            INFO,
            "Round %d: node %d has spent its privacy budget (epsilon %.3f)",
            self.server_round,
            node,
            epsilon,
        )


@dataclass
class RoundMetrics:
    """One round's metrics; :meth:`to_record` gives them under their metric names.

    ``skipped`` (too few replies), ``discarded`` (an absurd aggregate) and ``step_norm``
    (``||w_new - w_global||`` of an applied round) are set once the round's outcome is
    known.
    """

    accepted: int
    rejected: int
    failed: int
    budget_exhausted: int
    missing: int
    norm_clipped: int
    down_weighted: int
    epsilon_max: float
    epsilon_clients: list[float]
    epsilon_max_run: float
    speedup: float
    quantized_layer_fraction: list[float]
    num_examples: int
    uplink_bytes: int
    downlink_bytes: int
    uplink_float32_bytes: int
    downlink_float32_bytes: int
    uplink_bits: float
    downlink_bits: float
    mse_mean: float
    mse_max: float
    skipped: int = 0
    discarded: int = 0
    step_norm: float = 0.0

    @classmethod
    def of_round(
        cls,
        counts: RoundCounts,
        accepted: Sequence[ClientReply],
        *,
        sent: int,
        clipped: int,
        down_weighted: int,
        epsilon_by_node: Mapping[int, float],
        downlink_bytes: int,
        float32_reply_bytes: int,
        coordinates: int = 0,
    ) -> RoundMetrics:
        """The metrics of a round from its replies and counts.

        Args:
            counts: the round's replies by outcome (``counts.received`` of ``sent``
                train messages got a reply; the rest are ``missing``).
            accepted: the accepted replies, after the norm bound.
            sent: train messages sent this round.
            clipped: replies the norm bound scaled down.
            down_weighted: replies left with less than half their claimed weight.
            epsilon_by_node: every client's cumulative ε so far.
            downlink_bytes: bytes of this round's instructions (the float32 model to
                every sampled client).
            float32_reply_bytes: bytes of one reply carrying the float32 model, the
                reference of the uplink's compression (and, one per message sent, of
                the downlink's).
            coordinates: the model's parameter count; bits per coordinate are the
                bytes actually sent (with every header) x 8 over coordinates x messages.
        """
        uplink_bytes = sum(r.uplink_bytes for r in accepted)
        mses = [m for r in accepted for m in r.claimed_mse.values()]
        epsilons = [r.epsilon for r in accepted if r.epsilon is not None]
        return cls(
            accepted=len(accepted),
            rejected=counts.rejected,
            failed=counts.failed,
            budget_exhausted=counts.exhausted,
            missing=sent - counts.received,
            norm_clipped=clipped,
            down_weighted=down_weighted,
            epsilon_max=max(epsilons, default=0.0),
            epsilon_clients=[e for _, e in sorted(epsilon_by_node.items())],
            epsilon_max_run=max(epsilon_by_node.values(), default=0.0),
            speedup=float(np.mean([r.speedup for r in accepted])) if accepted else 1.0,
            quantized_layer_fraction=_layer_fraction(accepted),
            num_examples=sum(r.num_examples for r in accepted),
            uplink_bytes=uplink_bytes,
            downlink_bytes=downlink_bytes,
            uplink_float32_bytes=float32_reply_bytes * len(accepted),
            downlink_float32_bytes=float32_reply_bytes * sent,
            uplink_bits=_per_coordinate(uplink_bytes, coordinates * len(accepted)),
            downlink_bits=_per_coordinate(downlink_bytes, coordinates * sent),
            mse_mean=float(np.mean(mses)) if mses else 0.0,
            mse_max=float(np.max(mses)) if mses else 0.0,
        )

    def to_record(self) -> MetricRecord:
        """The metrics under their names (the keys of ``rounds.csv``)."""
        return MetricRecord(
            {
                ACCEPTED: self.accepted,
                REJECTED: self.rejected,
                FAILED: self.failed,
                BUDGET_EXHAUSTED: self.budget_exhausted,
                MISSING: self.missing,
                NORM_CLIPPED: self.norm_clipped,
                DOWN_WEIGHTED: self.down_weighted,
                SKIPPED: self.skipped,
                DISCARDED: self.discarded,
                STEP_NORM: self.step_norm,
                EPSILON_MAX: self.epsilon_max,
                EPSILON_CLIENTS: list(self.epsilon_clients),
                EPSILON_MAX_RUN: self.epsilon_max_run,
                SPEEDUP: self.speedup,
                QUANTIZED_LAYER_FRACTION: list(self.quantized_layer_fraction),
                NUM_EXAMPLES: self.num_examples,
                UPLINK_BYTES: self.uplink_bytes,
                DOWNLINK_BYTES: self.downlink_bytes,
                UPLINK_FLOAT32_BYTES: self.uplink_float32_bytes,
                DOWNLINK_FLOAT32_BYTES: self.downlink_float32_bytes,
                UPLINK_BITS: self.uplink_bits,
                DOWNLINK_BITS: self.downlink_bits,
                MSE_MEAN: self.mse_mean,
                MSE_MAX: self.mse_max,
            }
        )


def _per_coordinate(num_bytes: int, coordinates: int) -> float:
    """Bits per coordinate, 0.0 when nothing was sent."""
    return 8.0 * num_bytes / coordinates if coordinates else 0.0


def _layer_fraction(accepted: Sequence[ClientReply]) -> list[float]:
    """Per quantizable layer, the fraction of the round's local epochs it ran quantized.

    Empty when the replies disagree on the layer count or have none.
    """
    widths = {len(r.quantized_epochs) for r in accepted}
    if len(widths) != 1 or (width := widths.pop()) == 0:
        return []
    epochs = sum(r.local_epochs for r in accepted)
    return [sum(r.quantized_epochs[i] for r in accepted) / max(epochs, 1) for i in range(width)]


def log_norm_bound(
    server_round: int,
    *,
    bound: float,
    factor: float,
    clipped: Sequence[tuple[int, float, float]],
) -> None:
    """Log the replies the norm bound scaled: ``(node, norm, scale)`` each.

    One INFO line for the round, and a WARNING for each reply scaled by less than
    :data:`NORM_WARNING_BELOW`.
    """
    for node, norm, scale in clipped:
        if scale < NORM_WARNING_BELOW:
            log(
                WARNING,
                "Round %d: node %d's update norm %.6g is %.3g x the bound %.6g "
                "(%g x the round's median); scaled down by x%.3g",
                server_round,
                node,
                norm,
                1 / scale,
                bound,
                factor,
                scale,
            )
    if clipped:
        scaled = ", ".join(f"node {node} x{scale:.3g}" for node, _, scale in clipped)
        log(
            INFO,
            "Round %d: norm bound %.6g (%g x the median update norm) scaled %s",
            server_round,
            bound,
            factor,
            scaled,
        )


def log_down_weighted(server_round: int, held: Sequence[tuple[int, float]]) -> None:
    """Log each ``(node, factor)`` left with ``factor`` of the weight it claimed."""
    for node, factor in held:
        log(
            WARNING,
            "Round %d: node %d down-weighted to x%.3g of the weight its reported MSE "
            "and example count claim (server-checked MSE floor and share cap)",
            server_round,
            node,
            factor,
        )


def log_skipped(server_round: int, *, accepted: int, minimum: int) -> None:
    """Log a round skipped for too few accepted replies."""
    log(
        WARNING,
        "Round %d: skipped, the global model is unchanged: %d accepted replies, "
        "fewer than the minimum of %d",
        server_round,
        accepted,
        minimum,
    )


def log_trimmed_short(server_round: int, *, accepted: int, cut: int, byzantine: int) -> None:
    """Log a trimmed mean that cuts fewer values than the Byzantine clients it expects."""
    log(
        WARNING,
        "Round %d: only %d replies accepted; trimmed-mean cuts %d from each end, "
        "fewer than the %d Byzantine clients it is configured for",
        server_round,
        accepted,
        cut,
        byzantine,
    )


def log_discarded(server_round: int, reason: str) -> None:
    """Log a round whose aggregate was not applied, with why."""
    log(WARNING, "Round %d: discarded, the global model is unchanged: %s", server_round, reason)
