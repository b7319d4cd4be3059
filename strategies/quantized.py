"""Server strategy for quantized replies, on Flower's Message API strategies.

``QuantizedStrategy`` wraps a stock ``flwr.serverapp.strategy`` strategy (``base``)
that samples and configures clients. Each training reply is untrusted input: it is
validated field by field (records, round, example count, every tensor's bits, clip,
MSE, shape and byte count), dequantized, and turned back into the client's local
weights (w_global + Δ̂ for updates, ŵ for weights). Then either

- a per-tensor aggregation rule combines them (``fedquant.aggregate``: by
  quantization error, FedAvg, plain mean, or a user's function), or
- with ``rule=None``, the ``base`` strategy aggregates them as if they were ordinary
  float32 replies, so ``FedAvg``, ``FedAdam``, ... consume quantized replies unchanged.

A rejected reply is logged with its reason and counted in the round's metrics; the
round goes on with the valid replies and never changes the model because of a bad one.
A client that stopped to stay within its privacy budget replies with a
``budget-exhausted`` status: it is counted as such, not as a failure.

A reply that passes validation may still be hostile, so nothing it claims buys it
unbounded influence:

- its metrics must lie within what the run allows (:class:`ReplyLimits`: an epsilon
  only under DP and within the budget, example counts below a cap, ...);
- its reported MSE is raised to the rounding error the server computes from the
  declared clip and bits (``fedquant.codec.rounding_error_floor``), and the
  weighted rules cap any reply's share at ``cap / K`` (``fedquant.aggregate``);
  a reply left with less than half the weight its claims asked for is logged and
  counted as ``down-weighted``;
- its update's L2 norm is clipped to ``update_norm_factor`` x the round's median
  (default 1: no reply moves the model more than the median honest one), except
  under the order-statistic rules (median, trimmed mean), which drop outliers
  themselves;
- a round whose aggregate step is non-finite, or more than ``round_norm_factor``
  times the median step of the last rounds applied, is discarded (``discarded``).

A round with fewer than ``min_replies`` accepted replies leaves the model unchanged
(``skipped``). Train messages that got no reply at all are counted as missing.

Round metrics (returned by ``aggregate_train``) include ``accepted``, ``rejected``,
``failed``, ``budget-exhausted``, ``missing``, ``norm-clipped``, ``down-weighted``,
``skipped`` and ``discarded``.
"""

from __future__ import annotations

import base64
import copy
import logging
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategies
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.supercore import log

from fedquant.aggregate import (
    AggregationRule,
    ErrorWeighted,
    OrderStatistic,
    SampleWeighted,
    TrimmedMean,
    WeightedRule,
    aggregate_tensors,
    cap_shares,
    norm_clip_scales,
    resolve_rule,
    update_norm,
)
from fedquant.codec import rounding_error_floor
from fedquant.config import ConfigError, PayloadMode, RunConfig
from fedquant.payload import (
    CODES_KEY,
    FLOAT_BITS,
    META_KEY,
    REPLY_METRICS,
    DecodedTensor,
    PayloadError,
    decode_update,
    serialized_size,
)

METRICS_KEY = "metrics"
ARRAYS_KEY = "arrays"
# Default exclusive limit on a reply's example count (run config `max-num-examples`).
MAX_NUM_EXAMPLES = 10**6
# A reported epsilon may exceed the budget by the accountant's numerical error only.
EPSILON_TOLERANCE = 0.01
# Most entries of `quantized-epochs` (one per quantizable layer).
MAX_LAYERS = 1024
# A reply keeping less than this fraction of the weight its claims asked for is
# counted and logged as down-weighted (smaller corrections are routine).
DOWN_WEIGHTED_BELOW = 0.5
# The norm bound logs a warning for a reply scaled by less than this.
NORM_WARNING_BELOW = 0.5
# Applied rounds whose aggregate step norms the absurd-round check compares against.
RECENT_ROUNDS = 5
# Server-optimizer state of stateful stock strategies, saved by `state()`: the
# moments of the FedOpt family (FedAdam, FedYogi, FedAdagrad) and FedAvgM's momentum.
BASE_STATE_ATTRS = ("m_t", "v_t", "momentum_vector")


@dataclass(frozen=True)
class ReplyLimits:
    """What a run allows a training reply's metrics to claim.

    Args:
        max_epsilon: the run's ε budget under DP; None when DP is off, and then a
            reply carrying ``epsilon`` or ``noise-multiplier`` is rejected.
        max_num_examples: exclusive upper limit on ``num-examples``.
        max_speedup: largest theoretical speedup a reply may report (the run's
            ``low-precision-speedup``: all layers in low precision).
    """

    max_epsilon: float | None = None
    max_num_examples: int = MAX_NUM_EXAMPLES
    max_speedup: float = 32.0

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


@dataclass(frozen=True)
class ClientReply:
    """A validated training reply: the client's update Δ, its local weights being
    ``w_global + Δ`` (Δ̂ as decoded for updates, ŵ − w_global for weights).

    ``mse`` is the checked error the rules see, each tensor's reported MSE raised to
    the rounding error of its declared clip and bits; ``claimed_mse`` what it reported.
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


class QuantizedStrategy(Strategy):
    """Dequantize, validate and aggregate quantized replies (paper B pipeline).

    Args:
        base: Flower strategy used for sampling and configuring clients, and for
            aggregation when ``rule`` is None (e.g. ``FedAdam`` wrapped).
        rule: per-tensor aggregation rule: a name from ``fedquant.aggregate.RULES``,
            ``"package.module:attr"``, or a callable; None to let ``base`` aggregate.
        payload: whether replies carry updates Δ or weights.
        max_clip: largest clip value a reply may declare.
        min_replies: fewest accepted replies that may change the model; a round
            with fewer is skipped (the model stays as it was).
        update_norm_factor: an update whose L2 norm exceeds this times the median
            norm of the round's accepted updates is scaled down to that bound
            (``fedquant.aggregate.norm_clip_scales``); 0 disables the bound. At 1
            (the default) no reply moves the model more than the median one: a x9
            or x100 update, sign-flipped or not, counts as one median-sized vote.
        round_norm_factor: a round whose aggregate step ``||w_new - w_global||``
            exceeds this times the median step of the last ``RECENT_ROUNDS``
            rounds applied is discarded, as is one with a non-finite aggregate; 0
            disables the comparison (a non-finite aggregate is always discarded).
        limits: what a reply's metrics may claim (default: no DP, the default caps).

    Raises:
        ValueError: ``min_replies`` not an int >= 1, or ``update_norm_factor`` or
            ``round_norm_factor`` neither 0 nor finite and >= 1 (below 1 even the
            median update would be cut).
    """

    def __init__(
        self,
        *,
        base: Strategy | None = None,
        rule: AggregationRule | str | None = "error-weighted",
        payload: PayloadMode = PayloadMode.UPDATE,
        max_clip: float = 1e4,
        min_replies: int = 1,
        update_norm_factor: float = 1.0,
        round_norm_factor: float = 10.0,
        limits: ReplyLimits | None = None,
    ) -> None:
        if isinstance(min_replies, bool) or not isinstance(min_replies, int) or min_replies < 1:
            raise ValueError(f"`min_replies` must be an int >= 1. Found `{min_replies!r}`.")
        for name, factor in (
            ("update_norm_factor", update_norm_factor), ("round_norm_factor", round_norm_factor)
        ):
            if isinstance(factor, bool) or not (
                isinstance(factor, int | float) and (factor == 0 or 1 <= factor < math.inf)
            ):
                raise ValueError(
                    f"`{name}` must be 0 (off) or finite and >= 1. Found `{factor!r}`."
                )
        self.base = base if base is not None else central_evaluation(FedAvg)
        self.rule = resolve_rule(rule) if rule is not None else None
        self.payload = payload
        self.max_clip = max_clip
        self.min_replies = min_replies
        self.update_norm_factor = float(update_norm_factor)
        self.round_norm_factor = float(round_norm_factor)
        self.limits = limits if limits is not None else ReplyLimits()
        self.epsilon_by_node: dict[int, float] = {}
        self.sent_by_round: dict[int, int] = {}
        # Aggregate step norms of the last rounds applied, oldest first.
        self.recent_steps: list[float] = []
        self._global: ArrayRecord | None = None
        self._downlink = 0  # bytes the last configure_train sent

    def summary(self) -> None:
        rule = "delegated to " + type(self.base).__name__ if self.rule is None else self.rule
        log(INFO, "\t├──> Quantized replies: payload=%s, aggregation=%s", self.payload.value, rule)
        self.base.summary()

    # ---------------------------------------------------------------- configure
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays
        messages = list(self.base.configure_train(server_round, arrays, config, grid))
        self.sent_by_round[server_round] = len(messages)
        # Every instruction carries the same float32 model and config.
        self._downlink = serialized_size(messages[0].content) * len(messages) if messages else 0
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.base.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.base.aggregate_evaluate(server_round, replies)

    # ---------------------------------------------------------------- aggregate
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._global is None:
            raise RuntimeError("aggregate_train called before configure_train")
        global_arrays = {k: v.numpy() for k, v in self._global.items()}
        accepted: list[ClientReply] = []
        received = failed = rejected = exhausted = 0
        for msg in replies:
            received += 1
            node = msg.metadata.src_node_id
            if msg.has_error():
                failed += 1
                log(WARNING, "Round %d: node %d failed: %s", server_round, node, msg.error.reason)
                continue
            try:
                if _is_budget_exhausted(msg):
                    epsilon = self.validate_exhausted(msg, server_round)
                    exhausted += 1
                    self.epsilon_by_node[node] = epsilon
                    log(
                        INFO,
                        "Round %d: node %d has spent its privacy budget (epsilon %.3f)",
                        server_round,
                        node,
                        epsilon,
                    )
                    continue
                reply = self.validate_reply(msg, server_round, global_arrays)
            except PayloadError as err:
                rejected += 1
                log(WARNING, "Round %d: rejected reply from node %d: %s", server_round, node, err)
                continue
            accepted.append(reply)
            if reply.epsilon is not None:
                self.epsilon_by_node[node] = reply.epsilon

        accepted, clipped = self._bound_norms(server_round, accepted)
        down_weighted = self._count_down_weighted(server_round, accepted)
        skipped = len(accepted) < self.min_replies
        # A round this strategy did not configure (replies handed in directly) has
        # no count of messages sent: none are counted missing.
        sent = self.sent_by_round.get(server_round, received)
        metrics = self._round_metrics(
            accepted,
            failed=failed,
            rejected=rejected,
            exhausted=exhausted,
            missing=sent - received,
            clipped=clipped,
            down_weighted=down_weighted,
        )
        if skipped:
            log(
                WARNING,
                "Round %d: skipped, the global model is unchanged: %d accepted replies, "
                "fewer than the minimum of %d",
                server_round,
                len(accepted),
                self.min_replies,
            )
            metrics["skipped"] = 1
            return None, metrics
        rule = self.rule
        if isinstance(rule, TrimmedMean) and rule.cut(len(accepted)) < rule.byzantine:
            log(
                WARNING,
                "Round %d: only %d replies accepted; trimmed-mean cuts %d from each end, "
                "fewer than the %d Byzantine clients it is configured for",
                server_round, len(accepted), rule.cut(len(accepted)), rule.byzantine,
            )
        # A discarded round must not leave its trace in a stateful base's moments
        # (only a base that aggregates, rule None, changes them).
        optimizer_state = {} if self.rule is not None else {
            name: copy.deepcopy(getattr(self.base, name))
            for name in BASE_STATE_ATTRS if hasattr(self.base, name)
        }
        try:
            arrays = self._aggregate(server_round, accepted, global_arrays, metrics)
        except ValueError as err:  # a non-finite aggregate
            return self._discard(server_round, metrics, str(err), optimizer_state)
        if arrays is None:
            return None, metrics
        step = update_norm({k: arrays[k].numpy().astype(np.float64) - global_arrays[k]
                            for k in global_arrays})
        if not math.isfinite(step):
            reason = "its aggregate is not finite"
            return self._discard(server_round, metrics, reason, optimizer_state)
        if self.round_norm_factor and self.recent_steps:
            typical = statistics.median(self.recent_steps)
            if step > self.round_norm_factor * typical:
                reason = (
                    f"its aggregate step norm {step:.6g} exceeds {self.round_norm_factor:g} x"
                    f" the median {typical:.6g} of the last {len(self.recent_steps)} rounds"
                )
                return self._discard(server_round, metrics, reason, optimizer_state)
        self.recent_steps = [*self.recent_steps, step][-RECENT_ROUNDS:]
        metrics["step-norm"] = step
        return arrays, metrics

    def _aggregate(
        self,
        server_round: int,
        accepted: list[ClientReply],
        global_arrays: Mapping[str, np.ndarray],
        metrics: MetricRecord,
    ) -> ArrayRecord | None:
        """The new global model: the rule's per-tensor aggregate, or ``base``'s."""
        if self.rule is not None:
            new = aggregate_tensors(
                [_weights(r, global_arrays) for r in accepted],
                mse=[r.mse for r in accepted],
                num_examples=[r.num_examples for r in accepted],
                rule=self.rule,
            )
            return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in new.items()})
        arrays, base_metrics = self.base.aggregate_train(
            server_round, [_as_float_reply(r, global_arrays) for r in accepted]
        )
        for key, value in (base_metrics or {}).items():
            metrics.setdefault(key, value)
        return arrays

    def _discard(
        self,
        server_round: int,
        metrics: MetricRecord,
        reason: str,
        optimizer_state: Mapping[str, Any],
    ) -> tuple[None, MetricRecord]:
        """Leave the model, and a stateful base's optimizer state, as they were: the
        round's aggregate is not applied."""
        for name, value in optimizer_state.items():
            setattr(self.base, name, value)
        log(
            WARNING,
            "Round %d: discarded, the global model is unchanged: %s",
            server_round,
            reason,
        )
        metrics["discarded"] = 1
        return None, metrics

    def _bound_norms(
        self, server_round: int, accepted: list[ClientReply]
    ) -> tuple[list[ClientReply], int]:
        """Scale each update above the round's norm bound down to it; count and log
        them. Not before an ``OrderStatistic`` rule, which drops outliers itself."""
        if not (self.update_norm_factor and accepted) or isinstance(self.rule, OrderStatistic):
            return accepted, 0
        norms = [update_norm(r.update) for r in accepted]
        scales, bound = norm_clip_scales(norms, factor=self.update_norm_factor)
        bounded, scaled = [], []
        for reply, norm, scale in zip(accepted, norms, scales, strict=True):
            if scale < 1.0:
                update = {k: np.asarray(v, np.float64) * scale for k, v in reply.update.items()}
                reply = replace(reply, update=update)
                scaled.append(f"node {reply.node_id} x{scale:.3g}")
                if scale < NORM_WARNING_BELOW:
                    log(
                        WARNING,
                        "Round %d: node %d's update norm %.6g is %.3g x the bound %.6g "
                        "(%g x the round's median); scaled down by x%.3g",
                        server_round, reply.node_id, norm, 1 / scale, bound,
                        self.update_norm_factor, scale,
                    )
            bounded.append(reply)
        if scaled:
            log(
                INFO,
                "Round %d: norm bound %.6g (%g x the median update norm) scaled %s",
                server_round, bound, self.update_norm_factor, ", ".join(scaled),
            )
        return bounded, len(scaled)

    def _count_down_weighted(self, server_round: int, accepted: list[ClientReply]) -> int:
        """Replies that keep less than ``DOWN_WEIGHTED_BELOW`` of the weight their claims
        (reported MSE, example count) would have given them, after the server's MSE
        check and the share cap; each is logged with its factor.

        The factor is over the whole model: the reply's share of each tensor, weighted
        by the tensor's size, given / claimed. (Per tensor, an honest reply's MSE on a
        10-element bias can fall far below its grid's by chance.)
        """
        rule = self.rule
        if not (isinstance(rule, WeightedRule) and len(accepted) > 1):
            return 0
        counts = np.array([r.num_examples for r in accepted], dtype=np.float64)
        given_total = np.zeros(len(accepted))
        claimed_total = np.zeros(len(accepted))
        for name, tensor in accepted[0].update.items():
            claimed = rule.raw_weights(
                mse=np.array([r.claimed_mse[name] for r in accepted]), num_examples=counts
            )
            checked = rule.raw_weights(
                mse=np.array([r.mse[name] for r in accepted]), num_examples=counts
            )
            claimed_total += tensor.size * claimed / claimed.sum()
            given_total += tensor.size * cap_shares(checked, cap=rule.cap)
        factors = given_total / claimed_total
        held = [(r.node_id, f) for r, f in zip(accepted, factors, strict=True)
                if f < DOWN_WEIGHTED_BELOW]
        for node, factor in held:
            log(
                WARNING,
                "Round %d: node %d down-weighted to x%.3g of the weight its reported MSE "
                "and example count claim (server-checked MSE floor and share cap)",
                server_round, node, factor,
            )
        return len(held)

    def validate_reply(
        self, msg: Message, server_round: int, global_arrays: Mapping[str, np.ndarray]
    ) -> ClientReply:
        """Check every field of an untrusted reply; raise PayloadError if any is bad."""
        content = msg.content
        if set(content.keys()) != {CODES_KEY, META_KEY, METRICS_KEY}:
            raise PayloadError(
                tensor=None, field="records", reason=f"unexpected records {sorted(content.keys())}"
            )
        metrics = content[METRICS_KEY]
        if not isinstance(metrics, MetricRecord):
            raise PayloadError(tensor=None, field=METRICS_KEY, reason="not a MetricRecord")
        unknown = sorted(set(metrics.keys()) - REPLY_METRICS)
        if unknown:
            raise PayloadError(tensor=None, field=unknown[0], reason="not a reply metric")
        num_examples = _metric(metrics, "num-examples", int)
        limit = self.limits.max_num_examples
        if not 0 < num_examples < limit:
            reason = f"must be in 1..{limit - 1} (max-num-examples {limit}), got {num_examples}"
            raise PayloadError(tensor=None, field="num-examples", reason=reason)
        reply_round = _metric(metrics, "server-round", int)
        if reply_round != server_round:
            reason = f"reply is for round {reply_round}, not {server_round}"
            raise PayloadError(tensor=None, field="server-round", reason=reason)
        epsilon = self._privacy_metrics(metrics)
        speedup = _metric(metrics, "speedup", float) if "speedup" in metrics else 1.0
        # Below 1 when DPQuant's estimator costs more than quantization saves.
        if not 0.0 < speedup <= self.limits.max_speedup:
            reason = f"must be in (0, {self.limits.max_speedup:g}], got {speedup}"
            raise PayloadError(tensor=None, field="speedup", reason=reason)
        local_epochs = _metric(metrics, "local-epochs", int) if "local-epochs" in metrics else 0
        if not 0 <= local_epochs < 10**6:
            raise PayloadError(
                tensor=None, field="local-epochs",
                reason=f"must be in 0..999999, got {local_epochs}",
            )
        quantized = metrics.get("quantized-epochs", [])
        if not (
            isinstance(quantized, list)
            and len(quantized) <= MAX_LAYERS
            and all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= local_epochs
                for v in quantized
            )
        ):
            raise PayloadError(
                tensor=None,
                field="quantized-epochs",
                reason=f"must be a list of at most {MAX_LAYERS} ints in 0..local-epochs",
            )
        decoded = decode_update(
            content,
            expected={k: tuple(v.shape) for k, v in global_arrays.items()},
            max_clip=self.max_clip,
        )
        return ClientReply(
            node_id=msg.metadata.src_node_id,
            update=self._update(decoded, global_arrays),
            mse={k: _checked_mse(t) for k, t in decoded.items()},
            claimed_mse={k: t.mse for k, t in decoded.items()},
            num_examples=num_examples,
            uplink_bytes=serialized_size(content),
            epsilon=epsilon,
            speedup=speedup,
            local_epochs=local_epochs,
            quantized_epochs=tuple(quantized),
        )

    def validate_exhausted(self, msg: Message, server_round: int) -> float:
        """Check a budget-exhausted status reply; return the client's epsilon."""
        metrics = msg.content[METRICS_KEY]
        if not isinstance(metrics, MetricRecord):
            raise PayloadError(tensor=None, field=METRICS_KEY, reason="not a MetricRecord")
        unknown = sorted(set(metrics.keys()) - {"server-round", "budget-exhausted", "epsilon"})
        if unknown:
            raise PayloadError(tensor=None, field=unknown[0], reason="not a status metric")
        reply_round = _metric(metrics, "server-round", int)
        if reply_round != server_round:
            reason = f"reply is for round {reply_round}, not {server_round}"
            raise PayloadError(tensor=None, field="server-round", reason=reason)
        if self.limits.max_epsilon is None:
            raise PayloadError(
                tensor=None, field="budget-exhausted", reason="this run has no privacy budget"
            )
        epsilon = self._privacy_metrics(metrics)
        assert epsilon is not None  # required under DP
        return epsilon

    def _privacy_metrics(self, metrics: MetricRecord) -> float | None:
        """The reply's epsilon: required under DP, within the budget (plus the
        accountant's numerical error); forbidden without DP, as is a noise multiplier."""
        budget = self.limits.max_epsilon
        if budget is None:
            for key in ("epsilon", "noise-multiplier"):
                if key in metrics:
                    raise PayloadError(tensor=None, field=key, reason="this run has no DP")
            return None
        epsilon = _metric(metrics, "epsilon", float)
        allowed = budget * (1 + EPSILON_TOLERANCE)
        if not 0 <= epsilon <= allowed:
            reason = f"must be in [0, {allowed:g}] (the run's budget {budget:g}), got {epsilon}"
            raise PayloadError(tensor=None, field="epsilon", reason=reason)
        if "noise-multiplier" in metrics:
            noise = _metric(metrics, "noise-multiplier", float)
            if not 0 < noise < 1e6:
                reason = f"must be in (0, 1e6), got {noise}"
                raise PayloadError(tensor=None, field="noise-multiplier", reason=reason)
        return float(epsilon)

    def _update(
        self, decoded: Mapping[str, DecodedTensor], global_arrays: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        if self.payload is PayloadMode.UPDATE:
            return {k: t.values for k, t in decoded.items()}
        # In float64, where a difference of two float32 values is exact (unless their
        # magnitudes are 2^29 apart), so w_global + Δ gives ŵ back.
        return {k: t.values.astype(np.float64) - global_arrays[k] for k, t in decoded.items()}

    @property
    def max_epsilon(self) -> float:
        """The largest epsilon any client has reported so far (0 without DP)."""
        return max(self.epsilon_by_node.values(), default=0.0)

    def _round_metrics(
        self,
        accepted: list[ClientReply],
        *,
        failed: int,
        rejected: int,
        exhausted: int,
        missing: int,
        clipped: int,
        down_weighted: int,
    ) -> MetricRecord:
        assert self._global is not None
        float32_bytes = serialized_size(RecordDict({ARRAYS_KEY: self._global}))
        mses = [m for r in accepted for m in r.claimed_mse.values()]
        examples = sum(r.num_examples for r in accepted)
        epsilons = [r.epsilon for r in accepted if r.epsilon is not None]
        # Fraction of local epochs each layer ran quantized, over this round's clients.
        widths = {len(r.quantized_epochs) for r in accepted}
        layer_fraction: list[float] = []
        if len(widths) == 1 and (width := widths.pop()) > 0:
            epochs = sum(r.local_epochs for r in accepted)
            layer_fraction = [
                sum(r.quantized_epochs[i] for r in accepted) / max(epochs, 1) for i in range(width)
            ]
        return MetricRecord(
            {
                "accepted": len(accepted),
                "rejected": rejected,
                "failed": failed,
                "budget-exhausted": exhausted,
                # Train messages sent this round that got no reply at all.
                "missing": missing,
                "norm-clipped": clipped,
                "down-weighted": down_weighted,
                # Set by aggregate_train: too few replies / an absurd aggregate.
                "skipped": 0,
                "discarded": 0,
                # ||w_new - w_global|| of the round, when applied.
                "step-norm": 0.0,
                "epsilon-max": max(epsilons, default=0.0),
                # Every client's cumulative epsilon so far, ordered by node id.
                "epsilon-clients": [e for _, e in sorted(self.epsilon_by_node.items())],
                "epsilon-max-run": self.max_epsilon,
                "speedup": float(np.mean([r.speedup for r in accepted])) if accepted else 1.0,
                "quantized-layer-fraction": layer_fraction,
                "num-examples": examples,
                "uplink-bytes": sum(r.uplink_bytes for r in accepted),
                # The instructions of this round: the float32 model to every client.
                "downlink-bytes": self._downlink,
                "uplink-float32-bytes": float32_bytes * len(accepted),
                "mse-mean": float(np.mean(mses)) if mses else 0.0,
                "mse-max": float(np.max(mses)) if mses else 0.0,
            }
        )

    # ---------------------------------------------------------------- checkpoint
    def state(self) -> dict[str, Any]:
        """This strategy's state for a server checkpoint, as JSON-serializable data.

        ``epsilon_by_node`` and ``sent_by_round`` (keys as str, since JSON objects
        have str keys), ``recent_steps``, and under ``base`` the server-optimizer state
        of a stateful stock ``base`` (the attributes in ``BASE_STATE_ATTRS`` it has:
        ``m_t``/``v_t`` of FedAdam, FedYogi, FedAdagrad; ``momentum_vector`` of
        FedAvgM). Each array is ``{"dtype", "shape", "data"}`` with ``data`` its
        C-order bytes in base64, so it comes back bit for bit with its dtype (a float
        list would lose float32 vs float64). The global model is not included: the
        server checkpoints it, and ``configure_train`` hands it back to ``base``.
        """
        return {
            "epsilon_by_node": {str(k): v for k, v in self.epsilon_by_node.items()},
            "sent_by_round": {str(k): v for k, v in self.sent_by_round.items()},
            "recent_steps": list(self.recent_steps),
            "base": {
                name: _encode_arrays(getattr(self.base, name))
                for name in BASE_STATE_ATTRS
                if hasattr(self.base, name)
            },
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state` returned, exactly.

        Raises:
            ValueError: ``state`` holds optimizer state that ``base`` has no
                attribute for (it was saved with a different base strategy).
        """
        base_state = state["base"]
        foreign = sorted(set(base_state) - {a for a in BASE_STATE_ATTRS if hasattr(self.base, a)})
        if foreign:
            raise ValueError(
                f"state has base-strategy state {foreign} that "
                f"{type(self.base).__name__} does not keep"
            )
        self.epsilon_by_node = {int(k): float(v) for k, v in state["epsilon_by_node"].items()}
        self.sent_by_round = {int(k): int(v) for k, v in state["sent_by_round"].items()}
        self.recent_steps = [float(v) for v in state.get("recent_steps", [])]
        for name, value in base_state.items():
            setattr(self.base, name, _decode_arrays(value))


def _encode_array(array: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(array)
    data = base64.b64encode(array.tobytes()).decode("ascii")
    return {"dtype": array.dtype.str, "shape": list(array.shape), "data": data}


def _decode_array(encoded: Mapping[str, Any]) -> np.ndarray:
    raw = base64.b64decode(encoded["data"])
    flat = np.frombuffer(raw, dtype=np.dtype(encoded["dtype"]))
    return flat.reshape(tuple(encoded["shape"])).copy()  # writable, owns its memory


def _encode_arrays(
    value: Mapping[str, np.ndarray] | list[np.ndarray] | None,
) -> dict[str, Any] | list[dict[str, Any]] | None:
    """None, ``{name: array}`` (FedOpt moments) or ``[array]`` (FedAvgM momentum)."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {k: _encode_array(np.asarray(v)) for k, v in value.items()}
    return [_encode_array(np.asarray(v)) for v in value]


def _decode_arrays(
    value: Mapping[str, Any] | list[Mapping[str, Any]] | None,
) -> dict[str, np.ndarray] | list[np.ndarray] | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {k: _decode_array(v) for k, v in value.items()}
    return [_decode_array(v) for v in value]


def _checked_mse(tensor: DecodedTensor) -> float:
    """The reported MSE, raised to the rounding error of the declared grid
    (``fedquant.codec.rounding_error_floor``); unquantized tensors keep 0."""
    if tensor.bits == FLOAT_BITS:
        return tensor.mse
    return max(tensor.mse, rounding_error_floor(bits=tensor.bits, clip=tensor.clip))


def _weights(reply: ClientReply, global_arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The client's local weights ``w_global + Δ``."""
    return {k: global_arrays[k] + v for k, v in reply.update.items()}


def _is_budget_exhausted(msg: Message) -> bool:
    metrics = msg.content.get(METRICS_KEY)
    return (
        set(msg.content.keys()) == {METRICS_KEY}
        and isinstance(metrics, MetricRecord)
        and metrics.get("budget-exhausted") == 1
    )


def _metric(metrics: MetricRecord, key: str, kind: type) -> int | float:
    """A numeric metric as ``kind``: an int for int, a finite float for float."""
    if key not in metrics:
        raise PayloadError(tensor=None, field=key, reason="missing")
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PayloadError(tensor=None, field=key, reason=f"must be a number, got {value!r}")
    if kind is int:
        if not isinstance(value, int):
            raise PayloadError(tensor=None, field=key, reason=f"must be an integer, got {value!r}")
        return value  # Python ints are exact; the caller checks the range
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range; math.isfinite would raise too
        raise PayloadError(tensor=None, field=key, reason="int out of float range") from None
    if not math.isfinite(number):
        raise PayloadError(tensor=None, field=key, reason=f"must be finite, got {value!r}")
    return number


def _as_float_reply(reply: ClientReply, global_arrays: Mapping[str, np.ndarray]) -> Message:
    """A validated reply as an ordinary float32 reply, for a stock strategy."""
    weights = _weights(reply, global_arrays)
    content = RecordDict(
        {
            ARRAYS_KEY: ArrayRecord(
                {k: Array(np.asarray(v, np.float32)) for k, v in weights.items()}
            ),
            METRICS_KEY: MetricRecord({"num-examples": reply.num_examples}),
        }
    )
    return Message(content=content, dst_node_id=reply.node_id, message_type=MessageType.TRAIN)


STOCK_PREFIX = "flwr:"
_NO_FEDERATED_EVALUATION = "fraction_evaluate is set to 0.0"


class _Without(logging.Filter):
    """Drops log records whose message contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def central_evaluation(strategy: type[FedAvg], **kwargs: Any) -> FedAvg:
    """``strategy(fraction_evaluate=0.0, **kwargs)``: evaluation is central, on the
    server's test split. Flower warns at construction that federated evaluation will be
    skipped; that is this design, not something a user can act on, so the warning is
    dropped here (only that record, only while the strategy is built)."""
    flwr_logger = logging.getLogger("flwr")
    quiet = _Without(_NO_FEDERATED_EVALUATION)
    flwr_logger.addFilter(quiet)
    try:
        return strategy(fraction_evaluate=0.0, **kwargs)
    finally:
        flwr_logger.removeFilter(quiet)


def strategy_from_config(cfg: RunConfig) -> QuantizedStrategy:
    """The strategy a run config asks for.

    ``aggregator`` is a rule (``error-weighted`` and ``fedavg``, their shares capped
    at ``weight-cap`` / K (0: no cap); ``mean``; ``median``; ``trimmed-mean``, cutting
    ``byzantine-clients`` from each end; or ``package.module:attr``), or
    ``flwr:<Name>`` to wrap the stock ``flwr.serverapp.strategy.<Name>`` (e.g.
    ``flwr:FedAdam``) with its defaults. ``min-replies``, ``update-norm-factor``,
    ``round-norm-factor`` and the reply limits (``max-num-examples``, the ε budget
    under DP, ``low-precision-speedup``) apply to all of them. A bad value raises
    ConfigError naming the key.
    """
    sampling = {
        "fraction_train": cfg.run.fraction_train,
        "min_train_nodes": cfg.run.min_train_nodes,
        # The server loop waits (up to round-timeout) for every node; after that, a
        # dead one must not block sampling forever.
        "min_available_nodes": cfg.run.min_train_nodes,
    }
    replies = {
        "payload": cfg.codec.payload,
        "max_clip": cfg.codec.max_clip,
        "min_replies": cfg.robust.min_replies,
        "update_norm_factor": cfg.robust.update_norm_factor,
        "round_norm_factor": cfg.robust.round_norm_factor,
        "limits": ReplyLimits(
            max_epsilon=cfg.dp.target_epsilon if cfg.dp.enabled else None,
            max_num_examples=cfg.robust.max_num_examples,
            max_speedup=cfg.dpquant.low_precision_speedup,
        ),
    }
    try:
        if cfg.robust.aggregator.startswith(STOCK_PREFIX):
            name = cfg.robust.aggregator[len(STOCK_PREFIX) :]
            stock = getattr(flwr_strategies, name, None)
            if not (isinstance(stock, type) and issubclass(stock, FedAvg)):
                raise ValueError(f"flwr.serverapp.strategy has no FedAvg-family strategy {name!r}")
            return QuantizedStrategy(
                base=central_evaluation(stock, **sampling), rule=None, **replies
            )
        rule: AggregationRule | str = cfg.robust.aggregator
        cap = cfg.robust.weight_cap or math.inf  # 0: no cap
        if cfg.robust.aggregator == "error-weighted":
            rule = ErrorWeighted(floor=cfg.codec.mse_floor, cap=cap)
        elif cfg.robust.aggregator == "fedavg":
            rule = SampleWeighted(cap=cap)
        elif cfg.robust.aggregator == "trimmed-mean":
            rule = TrimmedMean(byzantine=cfg.robust.byzantine_clients)
        return QuantizedStrategy(
            base=central_evaluation(FedAvg, **sampling), rule=rule, **replies
        )
    except ValueError as err:
        raise ConfigError("aggregator", cfg.robust.aggregator, str(err)) from err
