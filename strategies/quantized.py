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
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING

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

from fedquant.aggregate import AggregationRule, ErrorWeighted, aggregate_tensors, resolve_rule
from fedquant.config import ConfigError, PayloadMode, RunConfig
from fedquant.payload import (
    CODES_KEY,
    META_KEY,
    DecodedTensor,
    PayloadError,
    decode_update,
    serialized_size,
)

METRICS_KEY = "metrics"
ARRAYS_KEY = "arrays"
# A claimed example count above this is absurd for one client and is rejected.
MAX_NUM_EXAMPLES = 10**9


@dataclass(frozen=True)
class ClientReply:
    """A validated training reply: the client's reconstructed local weights."""

    node_id: int
    weights: dict[str, np.ndarray]
    mse: dict[str, float]
    num_examples: int
    train_loss: float
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
    """

    def __init__(
        self,
        *,
        base: Strategy | None = None,
        rule: AggregationRule | str | None = "error-weighted",
        payload: PayloadMode = PayloadMode.UPDATE,
        max_clip: float = 1e4,
    ) -> None:
        self.base = base if base is not None else FedAvg(fraction_evaluate=0.0)
        self.rule = resolve_rule(rule) if rule is not None else None
        self.payload = payload
        self.max_clip = max_clip
        self.round_metrics: dict[int, MetricRecord] = {}
        self.epsilon_by_node: dict[int, float] = {}
        self._global: ArrayRecord | None = None

    def summary(self) -> None:
        rule = "delegated to " + type(self.base).__name__ if self.rule is None else self.rule
        log(INFO, "\t├──> Quantized replies: payload=%s, aggregation=%s", self.payload.value, rule)
        self.base.summary()

    # ---------------------------------------------------------------- configure
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays
        return self.base.configure_train(server_round, arrays, config, grid)

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
        failed = rejected = exhausted = 0
        for msg in replies:
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
                    log(INFO, "Round %d: node %d has spent its privacy budget (epsilon %.3f)",
                        server_round, node, epsilon)
                    continue
                reply = self.validate_reply(msg, server_round, global_arrays)
            except PayloadError as err:
                rejected += 1
                log(WARNING, "Round %d: rejected reply from node %d: %s", server_round, node, err)
                continue
            accepted.append(reply)
            if reply.epsilon is not None:
                self.epsilon_by_node[node] = reply.epsilon

        metrics = self._round_metrics(
            accepted, failed=failed, rejected=rejected, exhausted=exhausted
        )
        self.round_metrics[server_round] = metrics
        if not accepted:
            log(WARNING, "Round %d: no valid replies; the global model is unchanged", server_round)
            return None, metrics
        if self.rule is not None:
            new = aggregate_tensors(
                [r.weights for r in accepted],
                mse=[r.mse for r in accepted],
                num_examples=[r.num_examples for r in accepted],
                rule=self.rule,
            )
            arrays = ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in new.items()})
        else:
            arrays, base_metrics = self.base.aggregate_train(
                server_round, [_as_float_reply(r) for r in accepted]
            )
            for key, value in (base_metrics or {}).items():
                metrics.setdefault(key, value)
        return arrays, metrics

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
        num_examples = _metric(metrics, "num-examples", int)
        if not 0 < num_examples <= MAX_NUM_EXAMPLES:
            raise PayloadError(
                tensor=None, field="num-examples", reason=f"must be in 1..{MAX_NUM_EXAMPLES}, got {num_examples}"
            )
        reply_round = _metric(metrics, "server-round", int)
        if reply_round != server_round:
            raise PayloadError(
                tensor=None, field="server-round", reason=f"reply is for round {reply_round}, not {server_round}"
            )
        train_loss = _metric(metrics, "train-loss", float)
        epsilon = _metric(metrics, "epsilon", float) if "epsilon" in metrics else None
        if epsilon is not None and epsilon < 0:
            raise PayloadError(tensor=None, field="epsilon", reason=f"must be >= 0, got {epsilon}")
        speedup = _metric(metrics, "speedup", float) if "speedup" in metrics else 1.0
        if not speedup > 0:
            raise PayloadError(tensor=None, field="speedup", reason=f"must be > 0, got {speedup}")
        local_epochs = _metric(metrics, "local-epochs", int) if "local-epochs" in metrics else 0
        quantized = metrics.get("quantized-epochs", [])
        if not (
            isinstance(quantized, list)
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= local_epochs
                    for v in quantized)
        ):
            raise PayloadError(
                tensor=None, field="quantized-epochs",
                reason=f"must be a list of ints in 0..local-epochs, got {quantized!r}",
            )
        decoded = decode_update(
            content,
            expected={k: tuple(v.shape) for k, v in global_arrays.items()},
            max_clip=self.max_clip,
        )
        return ClientReply(
            node_id=msg.metadata.src_node_id,
            weights=self._reconstruct(decoded, global_arrays),
            mse={k: t.mse for k, t in decoded.items()},
            num_examples=num_examples,
            train_loss=train_loss,
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
        reply_round = _metric(metrics, "server-round", int)
        if reply_round != server_round:
            raise PayloadError(
                tensor=None, field="server-round", reason=f"reply is for round {reply_round}, not {server_round}"
            )
        epsilon = _metric(metrics, "epsilon", float)
        if epsilon < 0:
            raise PayloadError(tensor=None, field="epsilon", reason=f"must be >= 0, got {epsilon}")
        return float(epsilon)

    def _reconstruct(
        self, decoded: Mapping[str, DecodedTensor], global_arrays: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        if self.payload is PayloadMode.UPDATE:
            return {k: global_arrays[k] + t.values for k, t in decoded.items()}
        return {k: t.values for k, t in decoded.items()}

    @property
    def max_epsilon(self) -> float:
        """The largest epsilon any client has reported so far (0 without DP)."""
        return max(self.epsilon_by_node.values(), default=0.0)

    def _round_metrics(
        self, accepted: list[ClientReply], *, failed: int, rejected: int, exhausted: int
    ) -> MetricRecord:
        assert self._global is not None
        float32_bytes = serialized_size(RecordDict({ARRAYS_KEY: self._global}))
        mses = [m for r in accepted for m in r.mse.values()]
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
                "epsilon-max": max(epsilons, default=0.0),
                # Every client's cumulative epsilon so far, ordered by node id.
                "epsilon-clients": [e for _, e in sorted(self.epsilon_by_node.items())],
                "epsilon-max-run": self.max_epsilon,
                "speedup": float(np.mean([r.speedup for r in accepted])) if accepted else 1.0,
                "quantized-layer-fraction": layer_fraction,
                "num-examples": examples,
                "train-loss": (
                    sum(r.train_loss * r.num_examples for r in accepted) / examples
                    if examples
                    else 0.0
                ),
                "uplink-bytes": sum(r.uplink_bytes for r in accepted),
                "uplink-float32-bytes": float32_bytes * len(accepted),
                "mse-mean": float(np.mean(mses)) if mses else 0.0,
                "mse-max": float(np.max(mses)) if mses else 0.0,
            }
        )


def _is_budget_exhausted(msg: Message) -> bool:
    metrics = msg.content.get(METRICS_KEY)
    return (
        set(msg.content.keys()) == {METRICS_KEY}
        and isinstance(metrics, MetricRecord)
        and metrics.get("budget-exhausted") == 1
    )


def _metric(metrics: MetricRecord, key: str, kind: type) -> int | float:
    if key not in metrics:
        raise PayloadError(tensor=None, field=key, reason="missing")
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PayloadError(tensor=None, field=key, reason=f"must be a number, got {value!r}")
    if kind is int and not isinstance(value, int):
        raise PayloadError(tensor=None, field=key, reason=f"must be an integer, got {value!r}")
    if not math.isfinite(value):
        raise PayloadError(tensor=None, field=key, reason=f"must be finite, got {value!r}")
    return value


def _as_float_reply(reply: ClientReply) -> Message:
    """A validated reply as an ordinary float32 reply, for a stock strategy."""
    content = RecordDict(
        {
            ARRAYS_KEY: ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in reply.weights.items()}),
            METRICS_KEY: MetricRecord(
                {"num-examples": reply.num_examples, "train-loss": reply.train_loss}
            ),
        }
    )
    return Message(content=content, dst_node_id=reply.node_id, message_type=MessageType.TRAIN)


STOCK_PREFIX = "flwr:"


def strategy_from_config(cfg: RunConfig) -> QuantizedStrategy:
    """The strategy a run config asks for.

    ``aggregator`` is a rule (``error-weighted``, ``fedavg``, ``mean``, or
    ``package.module:attr``), or ``flwr:<Name>`` to wrap the stock
    ``flwr.serverapp.strategy.<Name>`` (e.g. ``flwr:FedAdam``) with its defaults.
    A bad value raises ConfigError naming the key.
    """
    sampling = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": 0.0,  # evaluation is central, on the server's test split
        "min_train_nodes": cfg.min_train_nodes,
        "min_available_nodes": cfg.num_supernodes,
    }
    try:
        if cfg.aggregator.startswith(STOCK_PREFIX):
            name = cfg.aggregator[len(STOCK_PREFIX) :]
            stock = getattr(flwr_strategies, name, None)
            if not (isinstance(stock, type) and issubclass(stock, FedAvg)):
                raise ValueError(f"flwr.serverapp.strategy has no FedAvg-family strategy {name!r}")
            return QuantizedStrategy(
                base=stock(**sampling), rule=None, payload=cfg.payload, max_clip=cfg.max_clip
            )
        rule: AggregationRule | str = cfg.aggregator
        if cfg.aggregator == "error-weighted":
            rule = ErrorWeighted(floor=cfg.mse_floor)
        return QuantizedStrategy(
            base=FedAvg(**sampling),
            rule=rule,
            payload=cfg.payload,
            max_clip=cfg.max_clip,
        )
    except ValueError as err:
        raise ConfigError("aggregator", cfg.aggregator, str(err)) from err
