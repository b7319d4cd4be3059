"""Server strategy for quantized replies, on Flower's Message API strategies.

``QuantizedStrategy`` is the Flower glue around four steps, each owned by a module that
knows nothing of the others:

1. **decode**: each training reply is untrusted input, decoded whole and checked against
   the run's limits by :func:`fedquant.reply.decode_reply` (records, round, example
   count, ε, every tensor's bits, clip, MSE, shape and bytes). A malformed one is logged
   with its reason and counted as ``rejected``; a client that stopped to stay within
   its privacy budget is counted as ``budget-exhausted``, not as a failure.
2. **bound**: a reply that decodes may still be hostile (:mod:`fedquant.robust`): its
   update's L2 norm is clipped to ``update_norm_factor`` x the round's median (not
   before the order-statistic rules, which drop outliers themselves); its reported MSE
   was already raised to its grid's rounding error, and the weighted rules cap any
   reply's share at ``cap / K``; a reply left with less than half the weight its
   claims asked for is logged and counted as ``down-weighted``.
3. **combine**: a per-tensor rule (:mod:`fedquant.aggregate`: by quantization error,
   FedAvg, mean, median, trimmed mean, or a user's function) or, with ``rule=None``,
   the wrapped stock strategy (``base``) as if the replies were ordinary float32 ones,
   so ``FedAvg``, ``FedAdam``, ... consume quantized replies unchanged.
4. **report**: the round's metrics and log lines (:mod:`strategies.round_report`).

A round with fewer than ``min_replies`` accepted replies leaves the model unchanged
(``skipped``); so does one whose aggregate step is non-finite or more than
``round_norm_factor`` times the median step of the last rounds applied (``discarded``),
and then the wrapped base is put back as it was before the round. Train messages that
got no reply at all are counted as ``missing``.

The global model the replies update is an explicit input: given at construction or by
:meth:`QuantizedStrategy.set_global_model`, recorded by ``configure_train`` (the model
it sends), and advanced by ``aggregate_train`` when it applies a round.

With a quantized downlink (``downlink``, :mod:`fedquant.downlink`), the model a round
produces is broadcast as quantized deltas, and the model ``aggregate_train`` returns
(which the ServerApp evaluates and checkpoints, and the next round sends) is the one
every client reconstructs, ``w_hat``; the float32 model it tracks is kept as the
difference ``w - w_hat``, added back before the next delta is quantized.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import replace
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
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
    resolve_rule,
)
from fedquant.config import UNQUANTIZED_BITS, ConfigError, PayloadMode, RunConfig
from fedquant.downlink import BASE, DIGEST, VERSION, Broadcaster, model_digest
from fedquant.payload import serialized_size
from fedquant.reply import (
    ARRAYS_KEY,
    CONFIG_KEY,
    BudgetExhausted,
    ClientReply,
    ReplyError,
    ReplyLimits,
    as_float32_reply,
    decode_reply,
)
from fedquant.robust import (
    DOWN_WEIGHTED_BELOW,
    bound_update_norms,
    check_norm_factor,
    discard_reason,
    kept_weight_fractions,
    remember_step,
    step_norm,
)
from strategies import round_report as report
from strategies.round_report import RoundCounts, RoundMetrics
from strategies.stock import (
    STOCK_PREFIX,
    central_evaluation,
    object_state,
    restore_object_state,
    stock_strategy,
)


class QuantizedStrategy(Strategy):
    """Decode, bound, combine and report quantized replies (paper B pipeline).

    Args:
        base: Flower strategy used for sampling and configuring clients, and for
            aggregation when ``rule`` is None (e.g. ``FedAdam`` wrapped).
        rule: per-tensor aggregation rule: a name from ``fedquant.aggregate.RULES``,
            ``"package.module:attr"``, or a callable; None to let ``base`` aggregate.
        payload: whether replies carry updates Δ or weights.
        min_replies: fewest accepted replies that may change the model; a round
            with fewer is skipped (the model stays as it was).
        update_norm_factor: an update whose L2 norm exceeds this times the median
            norm of the round's accepted updates is scaled down to that bound
            (:func:`fedquant.robust.bound_update_norms`); 0 disables the bound. At 1
            (the default) no reply moves the model more than the median one: a x9
            or x100 update, sign-flipped or not, counts as one median-sized vote.
        round_norm_factor: a round whose aggregate step ``||w_new - w_global||``
            exceeds this times the median step of the last rounds applied is discarded,
            as is one with a non-finite aggregate (:func:`fedquant.robust.discard_reason`);
            0 disables the comparison.
        limits: what a reply may claim (default: no DP, the default caps).
        global_model: the model the first replies update (else set by
            :meth:`set_global_model` or ``configure_train``).
        downlink: broadcast the model as quantized deltas (None: float32).
        clients_hold_initial: every client can rebuild the initial model itself (the
            run-seeded one), so none needs it sent.

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
        min_replies: int = 1,
        update_norm_factor: float = 1.0,
        round_norm_factor: float = 10.0,
        limits: ReplyLimits | None = None,
        global_model: ArrayRecord | None = None,
        downlink: Broadcaster | None = None,
        clients_hold_initial: bool = False,
    ) -> None:
        if isinstance(min_replies, bool) or not isinstance(min_replies, int) or min_replies < 1:
            raise ValueError(f"`min_replies` must be an int >= 1. Found `{min_replies!r}`.")
        self.update_norm_factor = check_norm_factor(update_norm_factor, name="update_norm_factor")
        self.round_norm_factor = check_norm_factor(round_norm_factor, name="round_norm_factor")
        self.base = base if base is not None else central_evaluation(FedAvg)
        self.rule = resolve_rule(rule) if rule is not None else None
        self.payload = payload
        self.min_replies = min_replies
        self.limits = limits if limits is not None else ReplyLimits()
        self.epsilon_by_node: dict[int, float] = {}
        self.sent_by_round: dict[int, int] = {}
        # Aggregate step norms of the last rounds applied, oldest first.
        self.recent_steps: list[float] = []
        self._global: ArrayRecord | None = None
        self._model_bytes: int | None = None  # of RecordDict({ARRAYS_KEY: _global})
        self._downlink = 0  # bytes the last configure_train sent
        self.broadcaster = downlink
        self.clients_hold_initial = clients_hold_initial
        self._broadcast: ArrayRecord | None = None  # the model the broadcaster holds
        self._broadcast_lag: dict[str, np.ndarray] = {}  # w - w_hat
        self._version_sent: dict[int, int] = {}  # node -> version of this round's send
        if global_model is not None:
            self.set_global_model(global_model)

    def summary(self) -> None:
        """Log the strategy's settings, then ``base``'s."""
        rule = "delegated to " + type(self.base).__name__ if self.rule is None else self.rule
        log(INFO, "\t├──> Quantized replies: payload=%s, aggregation=%s", self.payload.value, rule)
        self.base.summary()

    # ------------------------------------------------------------------ global model
    @property
    def global_model(self) -> ArrayRecord | None:
        """The float32 model the next replies are updates of."""
        return self._global

    def set_global_model(self, arrays: ArrayRecord) -> None:
        """Make ``arrays`` the model the next replies update (at start, on resume)."""
        if arrays is not self._global:
            self._global = arrays
            self._model_bytes = None

    def _float32_reply_bytes(self) -> int:
        """Bytes of the global model as one float32 record, serialized once per model."""
        if self._model_bytes is None:
            assert self._global is not None
            self._model_bytes = serialized_size(RecordDict({ARRAYS_KEY: self._global}))
        return self._model_bytes

    # --------------------------------------------------------------------- configure
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send ``arrays`` (which becomes the global model) through ``base``."""
        self.set_global_model(arrays)
        messages = list(self.base.configure_train(server_round, arrays, config, grid))
        if self.broadcaster is not None:
            messages = self._quantized_instructions(arrays, messages)
        self.sent_by_round[server_round] = len(messages)
        # Delta instructions from the same base are identical: each size is measured once.
        delta_bytes: dict[object, int] = {}
        self._downlink = 0
        for msg in messages:
            base = None if ARRAYS_KEY in msg.content else msg.content[CONFIG_KEY].get(BASE)
            if base is None:
                self._downlink += self._instruction_bytes(msg.content)
                continue
            if base not in delta_bytes:
                delta_bytes[base] = serialized_size(msg.content)
            self._downlink += delta_bytes[base]
        return messages

    def _quantized_instructions(
        self, arrays: ArrayRecord, messages: list[Message]
    ) -> list[Message]:
        """Each node's instruction: the deltas since the copy it holds, or the float32 model."""
        broadcaster = self.broadcaster
        assert broadcaster is not None
        if arrays is not self._broadcast:  # first round, resume, or a model set from outside
            first = self._broadcast is None
            broadcaster.reset(
                {k: v.numpy() for k, v in arrays.items()},
                version=0 if first else broadcaster.version + 1,
            )
            self._broadcast_lag = {}
            self._broadcast = arrays
        digest = model_digest(broadcaster.model)
        out = []
        self._version_sent = {}
        for msg in messages:
            node = msg.metadata.dst_node_id
            if self.clients_hold_initial and broadcaster.version == 0:
                broadcaster.held.setdefault(node, 0)
            config = ConfigRecord(dict(msg.content.config_records[CONFIG_KEY]))
            config[VERSION] = broadcaster.version
            config[DIGEST] = digest
            deltas = broadcaster.instruction(node)
            if deltas is None:
                content = RecordDict({ARRAYS_KEY: msg.content[ARRAYS_KEY], CONFIG_KEY: config})
            else:
                config[BASE] = broadcaster.held[node]
                content = RecordDict(deltas)
                content[CONFIG_KEY] = config
            self._version_sent[node] = broadcaster.version
            out.append(
                Message(content=content, message_type=msg.metadata.message_type, dst_node_id=node)
            )
        return out

    def _instruction_bytes(self, content: RecordDict) -> int:
        """Bytes of an instruction as Flower serializes it, the model counted once.

        A ``RecordDict`` serializes as a repeated field of its records, so its size is
        the sum of theirs: the model's (already measured) plus the config's.
        """
        if content.get(ARRAYS_KEY) is not self._global:
            return serialized_size(content)
        rest = RecordDict({k: v for k, v in content.items() if k != ARRAYS_KEY})
        return self._float32_reply_bytes() + serialized_size(rest)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegated to ``base`` (evaluation is central by default)."""
        return self.base.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegated to ``base``."""
        return self.base.aggregate_evaluate(server_round, replies)

    # --------------------------------------------------------------------- aggregate
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode, bound, combine and report one round's training replies.

        Raises:
            RuntimeError: no global model was given (constructor,
                :meth:`set_global_model` or ``configure_train``).
        """
        if self._global is None:
            raise RuntimeError(
                "aggregate_train needs the global model: pass `global_model`, call "
                "set_global_model() or configure_train() first"
            )
        global_arrays = {k: v.numpy() for k, v in self._global.items()}
        counts = self._decode(server_round, replies, global_arrays)
        accepted, clipped = self._bound_norms(server_round, counts.accepted)
        metrics = RoundMetrics.of_round(
            counts,
            accepted,
            # A round this strategy did not configure (replies handed in directly) has
            # no count of messages sent: none are counted missing.
            sent=self.sent_by_round.get(server_round, counts.received),
            clipped=clipped,
            down_weighted=self._count_down_weighted(server_round, accepted),
            epsilon_by_node=self.epsilon_by_node,
            downlink_bytes=self._downlink,
            float32_reply_bytes=self._float32_reply_bytes(),
            coordinates=sum(v.numpy().size for v in self._global.values()),
        )
        if len(accepted) < self.min_replies:
            report.log_skipped(server_round, accepted=len(accepted), minimum=self.min_replies)
            metrics.skipped = 1
            return None, metrics.to_record()
        rule, count = self.rule, len(accepted)
        if isinstance(rule, TrimmedMean) and rule.cut(count) < rule.byzantine:
            report.log_trimmed_short(
                server_round, accepted=count, cut=rule.cut(count), byzantine=rule.byzantine
            )
        # A discarded round must leave no trace in a stateful base (only a base that
        # aggregates, rule None, changes): the whole object is put back.
        snapshot = copy.deepcopy(self.base) if self.rule is None else None
        base_metrics: Mapping[str, Any] = {}
        try:
            arrays, base_metrics = self._combine(server_round, accepted, global_arrays)
        except ValueError as err:  # a non-finite aggregate
            self._discard(server_round, metrics, str(err), snapshot)
            return None, metrics.to_record()
        if arrays is None:
            return None, _with(metrics.to_record(), base_metrics)
        step = step_norm({k: v.numpy() for k, v in arrays.items()}, global_arrays)
        reason = discard_reason(step, self.recent_steps, factor=self.round_norm_factor)
        if reason is not None:
            self._discard(server_round, metrics, reason, snapshot)
            return None, _with(metrics.to_record(), base_metrics)
        self.recent_steps = remember_step(self.recent_steps, step)
        metrics.step_norm = step
        if self.broadcaster is not None:
            arrays = self._broadcast_model(arrays)
        self.set_global_model(arrays)
        return arrays, _with(metrics.to_record(), base_metrics)

    def _broadcast_model(self, arrays: ArrayRecord) -> ArrayRecord:
        """The next broadcast version of ``arrays`` (what clients will rebuild).

        The float32 target is ``arrays`` plus the part of the previous target the
        broadcast missed (server-side error feedback, :mod:`fedquant.downlink`).
        """
        broadcaster = self.broadcaster
        assert broadcaster is not None
        target = {k: v.numpy() + self._broadcast_lag.get(k, 0.0) for k, v in arrays.items()}
        model = broadcaster.advance(target)
        self._broadcast_lag = {k: (target[k] - model[k]).astype(np.float32) for k in model}
        self._broadcast = ArrayRecord({k: Array(v) for k, v in model.items()})
        return self._broadcast

    def _decode(
        self, server_round: int, replies: Iterable[Message], global_arrays: Mapping[str, np.ndarray]
    ) -> RoundCounts:
        """Decode every reply; count (and log) failures, rejections and exhausted budgets."""
        counts = RoundCounts(server_round)
        for msg in replies:
            counts.received += 1
            node = msg.metadata.src_node_id
            if self.broadcaster is not None:
                self._note_copy(node, ok=not msg.has_error())
            if msg.has_error():
                counts.fail(node, msg.error.reason)
                continue
            try:
                reply = decode_reply(
                    msg,
                    server_round=server_round,
                    global_arrays=global_arrays,
                    payload=self.payload,
                    limits=self.limits,
                )
            except ReplyError as err:
                counts.reject(node, err)
                continue
            if isinstance(reply, BudgetExhausted):
                counts.exhaust(node, reply.epsilon)
                self.epsilon_by_node[node] = reply.epsilon
                continue
            counts.accepted.append(reply)
            if reply.epsilon is not None:
                self.epsilon_by_node[node] = reply.epsilon
        return counts

    def _note_copy(self, node: int, *, ok: bool) -> None:
        """A node that replied holds the version it was sent; one that failed, unknown."""
        assert self.broadcaster is not None
        sent = self._version_sent.get(node)
        if ok and sent is not None:
            self.broadcaster.held[node] = sent
        else:
            self.broadcaster.held.pop(node, None)

    def _bound_norms(
        self, server_round: int, accepted: list[ClientReply]
    ) -> tuple[list[ClientReply], int]:
        """Scale each update above the round's norm bound down to it; count and log them.

        Not before an ``OrderStatistic`` rule, which drops outliers itself.
        """
        if not (self.update_norm_factor and accepted) or isinstance(self.rule, OrderStatistic):
            return accepted, 0
        bound = bound_update_norms([r.update for r in accepted], factor=self.update_norm_factor)
        clipped = [(accepted[i].node_id, bound.norms[i], bound.scales[i]) for i in bound.clipped]
        report.log_norm_bound(
            server_round, bound=bound.bound, factor=self.update_norm_factor, clipped=clipped
        )
        bounded = [replace(r, update=u) for r, u in zip(accepted, bound.updates, strict=True)]
        return bounded, len(clipped)

    def _count_down_weighted(self, server_round: int, accepted: list[ClientReply]) -> int:
        """Count, and log with its factor, each reply the server down-weighted.

        Those that keep less than ``DOWN_WEIGHTED_BELOW`` of the weight their claims would
        have given them (:func:`fedquant.robust.kept_weight_fractions`).
        """
        rule = self.rule
        if not (isinstance(rule, WeightedRule) and len(accepted) > 1):
            return 0
        factors = kept_weight_fractions(
            rule,
            claimed_mse=[r.claimed_mse for r in accepted],
            checked_mse=[r.mse for r in accepted],
            num_examples=[r.num_examples for r in accepted],
            sizes={k: v.size for k, v in accepted[0].update.items()},
        )
        held = [
            (r.node_id, float(f))
            for r, f in zip(accepted, factors, strict=True)
            if f < DOWN_WEIGHTED_BELOW
        ]
        report.log_down_weighted(server_round, held)
        return len(held)

    def _combine(
        self,
        server_round: int,
        accepted: list[ClientReply],
        global_arrays: Mapping[str, np.ndarray],
    ) -> tuple[ArrayRecord | None, Mapping[str, Any]]:
        """The new global model, the rule's per-tensor aggregate or ``base``'s.

        With ``base``'s own metrics (none for a rule).
        """
        if self.rule is not None:
            new = aggregate_tensors(
                [r.weights(global_arrays) for r in accepted],
                mse=[r.mse for r in accepted],
                num_examples=[r.num_examples for r in accepted],
                rule=self.rule,
            )
            return ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in new.items()}), {}
        floats = [
            as_float32_reply(
                r.weights(global_arrays), num_examples=r.num_examples, node_id=r.node_id
            )
            for r in accepted
        ]
        arrays, base_metrics = self.base.aggregate_train(server_round, floats)
        return arrays, base_metrics or {}

    def _discard(
        self, server_round: int, metrics: RoundMetrics, reason: str, snapshot: Strategy | None
    ) -> None:
        """Do not apply the round: the model, and the base, stay as they were before it."""
        if snapshot is not None:
            self.base = snapshot
        report.log_discarded(server_round, reason)
        metrics.discarded = 1

    @property
    def max_epsilon(self) -> float:
        """The largest epsilon any client has reported so far (0 without DP)."""
        return max(self.epsilon_by_node.values(), default=0.0)

    # ------------------------------------------------------------------- checkpoint
    def state(self) -> dict[str, Any]:
        """This strategy's state for a server checkpoint, as JSON-serializable data.

        ``epsilon_by_node`` and ``sent_by_round`` (keys as str, since JSON objects have
        str keys), ``recent_steps``, and the whole ``base`` object's data
        (:func:`strategies.stock.object_state`: a stateful stock base's server-optimizer
        state included, whatever its class calls it), with its class name. The global
        model is not included: the server checkpoints it, and ``configure_train`` hands
        it back.
        """
        return {
            "epsilon_by_node": {str(k): v for k, v in self.epsilon_by_node.items()},
            "sent_by_round": {str(k): v for k, v in self.sent_by_round.items()},
            "recent_steps": list(self.recent_steps),
            "base-class": type(self.base).__name__,
            "base": object_state(self.base),
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state` returned, exactly.

        Raises:
            ValueError: ``state`` was saved with a base of another class (or by an
                older fedquant), or holds attributes ``base`` does not keep; the message
                names them (:func:`strategies.stock.restore_object_state`).
        """
        if "base-class" not in state:
            raise ValueError("state has no 'base-class': it was saved by an older fedquant")
        restore_object_state(self.base, state["base"], saved_class=state["base-class"])
        self.epsilon_by_node = {int(k): float(v) for k, v in state["epsilon_by_node"].items()}
        self.sent_by_round = {int(k): int(v) for k, v in state["sent_by_round"].items()}
        self.recent_steps = [float(v) for v in state.get("recent_steps", [])]


def _with(record: MetricRecord, extra: Mapping[str, Any]) -> MetricRecord:
    """``record`` plus the keys of ``extra`` it does not have (a base's own metrics)."""
    for key, value in extra.items():
        record.setdefault(key, value)
    return record


def strategy_from_config(
    cfg: RunConfig, *, clients_hold_initial: bool = False
) -> QuantizedStrategy:
    """The strategy a run config asks for.

    ``aggregator`` is a rule (``error-weighted`` and ``fedavg``, their shares capped
    at ``weight-cap`` / K (0: no cap); ``mean``; ``median``; ``trimmed-mean``, cutting
    ``byzantine-clients`` from each end; or ``package.module:attr``), or
    ``flwr:<Name>`` to wrap the stock ``flwr.serverapp.strategy.<Name>`` (e.g.
    ``flwr:FedAdam``) with its defaults. ``min-replies``, ``update-norm-factor``,
    ``round-norm-factor`` and the reply limits (``max-num-examples``, the ε budget
    under DP, ``low-precision-speedup``, ``max-clip``) apply to all of them; with
    ``downlink-bits`` below 32 the broadcast is quantized (``clients_hold_initial``: the
    initial model is the run-seeded one every client can build). A bad value raises
    ConfigError naming the key.
    """
    sampling = {
        "fraction_train": cfg.run.fraction_train,
        "min_train_nodes": cfg.run.min_train_nodes,
        # The server loop waits (up to round-timeout) for every node; after that, a
        # dead one must not block sampling forever.
        "min_available_nodes": cfg.run.min_train_nodes,
    }
    robust: dict[str, Any] = {
        "payload": cfg.codec.payload,
        "min_replies": cfg.robust.min_replies,
        "update_norm_factor": cfg.robust.update_norm_factor,
        "round_norm_factor": cfg.robust.round_norm_factor,
        "limits": ReplyLimits.from_config(cfg),
        "downlink": (
            None
            if cfg.codec.downlink_bits == UNQUANTIZED_BITS
            else Broadcaster(
                bits=cfg.codec.downlink_bits,
                rotation=cfg.codec.rotation,
                entropy_coding=cfg.codec.entropy_coding,
                seed=cfg.run.seed,
            )
        ),
        "clients_hold_initial": clients_hold_initial,
    }
    aggregator = cfg.robust.aggregator
    try:
        if aggregator.startswith(STOCK_PREFIX):
            base = stock_strategy(aggregator[len(STOCK_PREFIX) :], **sampling)
            return QuantizedStrategy(base=base, rule=None, **robust)
        base = central_evaluation(FedAvg, **sampling)
        return QuantizedStrategy(base=base, rule=_rule_from_config(cfg), **robust)
    except ValueError as err:
        raise ConfigError("aggregator", aggregator, str(err)) from err


def _rule_from_config(cfg: RunConfig) -> AggregationRule | str:
    """The configured rule, with the run's share cap, MSE floor or Byzantine count."""
    cap = cfg.robust.weight_cap or math.inf  # 0: no cap
    if cfg.robust.aggregator == "error-weighted":
        return ErrorWeighted(floor=cfg.codec.mse_floor, cap=cap)
    if cfg.robust.aggregator == "fedavg":
        return SampleWeighted(cap=cap)
    if cfg.robust.aggregator == "trimmed-mean":
        return TrimmedMean(byzantine=cfg.robust.byzantine_clients)
    return cfg.robust.aggregator
