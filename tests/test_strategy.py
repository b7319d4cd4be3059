"""QuantizedStrategy.aggregate_train on valid and malformed replies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg

from fedquant.aggregate import ErrorWeighted
from fedquant.config import ConfigError, PayloadMode, RunConfig
from fedquant.payload import CODES_KEY, META_KEY, decode_update, encode_update, serialized_size
from fedquant.quantize import ClipRule, Rounding
from strategies.quantized import QuantizedStrategy, strategy_from_config

SHAPES = {"conv.weight": (4, 1, 3, 3), "conv.bias": (4,), "fc.weight": (10, 36), "fc.bias": (10,)}


def global_arrays(seed: int = 0) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord(
        {k: Array(rng.normal(size=s).astype(np.float32)) for k, s in SHAPES.items()}
    )


def update(seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=g) for k, s in SHAPES.items()}


def reply(
    node: int,
    tensors: dict[str, torch.Tensor],
    *,
    server_round: int = 1,
    num_examples: int = 100,
    bits: int = 4,
) -> Message:
    content = encode_update(
        tensors,
        bits=bits,
        clip=ClipRule.OCTAV,
        rounding=Rounding.STOCHASTIC,
        generator=torch.Generator().manual_seed(node),
    )
    content["metrics"] = MetricRecord(
        {"num-examples": num_examples, "train-loss": 0.5, "server-round": server_round}
    )
    # As a ClientApp replies: to an instruction the server sent to `node`.
    instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    instruction.metadata.__dict__["_message_id"] = f"instruction-{node}"
    return Message(content=content, reply_to=instruction)


def started(strategy: QuantizedStrategy, arrays: ArrayRecord) -> QuantizedStrategy:
    """Record the global model the way configure_train does (without a Grid)."""
    strategy._global = arrays
    return strategy


def expected_error_weighted(arrays: ArrayRecord, msgs: list[Message]) -> dict[str, np.ndarray]:
    """numpy oracle: w = Σ_i (1/e_i / Σ_k 1/e_k) (w_g + Δ̂_i), per tensor."""
    decoded = [decode_update(m.content) for m in msgs]
    out = {}
    for name in SHAPES:
        values = np.stack([arrays[name].numpy() + d[name].values for d in decoded])
        weights = np.array([1.0 / max(d[name].mse, 1e-12) for d in decoded])
        out[name] = np.average(values, axis=0, weights=weights)
    return out


def corrupt_bits(msg: Message) -> Message:
    msg.content[META_KEY]["fc.weight/bits"] = 9
    return msg


def corrupt_data(msg: Message) -> Message:
    arr = msg.content[CODES_KEY]["fc.bias"]
    msg.content[CODES_KEY]["fc.bias"] = Array(
        dtype=arr.dtype, shape=arr.shape, stype=arr.stype, data=arr.data[:-1]
    )
    return msg


def corrupt_clip(msg: Message) -> Message:
    msg.content[META_KEY]["conv.bias/clip"] = float("nan")
    return msg


def drop_metrics(msg: Message) -> Message:
    del msg.content["metrics"]
    return msg


def wrong_round(msg: Message) -> Message:
    msg.content["metrics"]["server-round"] = 7
    return msg


def zero_examples(msg: Message) -> Message:
    msg.content["metrics"]["num-examples"] = 0
    return msg


def extra_tensor(msg: Message) -> Message:
    msg.content[CODES_KEY]["evil"] = Array(np.zeros(3, np.float32))
    msg.content[META_KEY]["evil/bits"] = 32
    msg.content[META_KEY]["evil/clip"] = 0.0
    msg.content[META_KEY]["evil/mse"] = 0.0
    return msg


def wrong_record_type(msg: Message) -> Message:
    del msg.content[META_KEY]
    msg.content[META_KEY] = MetricRecord({"fc.weight/bits": 4})
    return msg


CORRUPTIONS = [
    corrupt_bits,
    corrupt_data,
    corrupt_clip,
    drop_metrics,
    wrong_round,
    zero_examples,
    extra_tensor,
    wrong_record_type,
]


def test_aggregates_against_numpy_oracle() -> None:
    arrays = global_arrays()
    msgs = [reply(i, update(i)) for i in range(4)]
    strategy = started(QuantizedStrategy(rule=ErrorWeighted()), arrays)
    new, metrics = strategy.aggregate_train(1, msgs)
    assert new is not None and metrics is not None
    oracle = expected_error_weighted(arrays, msgs)
    for name in SHAPES:
        np.testing.assert_allclose(new[name].numpy(), oracle[name], rtol=1e-5, atol=1e-6)
    assert metrics["accepted"] == 4 and metrics["rejected"] == 0
    # Bytes are what Flower serializes: the replies as sent, and float32 arrays instead.
    assert metrics["uplink-bytes"] == sum(serialized_size(m.content) for m in msgs)
    assert metrics["uplink-float32-bytes"] == 4 * serialized_size(RecordDict({"arrays": arrays}))


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_malformed_reply_is_rejected_and_round_goes_on(corrupt) -> None:
    arrays = global_arrays()
    good = [reply(i, update(i)) for i in range(3)]
    bad = corrupt(reply(99, update(99, scale=100.0)))
    strategy = started(QuantizedStrategy(rule=ErrorWeighted()), arrays)
    new, metrics = strategy.aggregate_train(1, [good[0], bad, good[1], good[2]])
    assert metrics["rejected"] == 1 and metrics["accepted"] == 3
    oracle = expected_error_weighted(arrays, good)
    for name in SHAPES:
        np.testing.assert_allclose(new[name].numpy(), oracle[name], rtol=1e-5, atol=1e-6)


def test_all_replies_bad_leaves_model_unchanged() -> None:
    strategy = started(QuantizedStrategy(), global_arrays())
    new, metrics = strategy.aggregate_train(1, [corrupt_bits(reply(1, update(1)))])
    assert new is None
    assert metrics["rejected"] == 1 and metrics["accepted"] == 0


def test_weights_payload_reconstructs_weights() -> None:
    arrays = global_arrays()
    local = {k: torch.from_numpy(arrays[k].numpy()) + d for k, d in update(3).items()}
    strategy = started(QuantizedStrategy(rule="mean", payload=PayloadMode.WEIGHTS), arrays)
    msg = reply(3, local, bits=8)
    decoded = decode_update(msg.content)
    new, _ = strategy.aggregate_train(1, [msg])
    for name in SHAPES:
        # The weights themselves, not global + them: off by at most one step 2s/(2^8-1)
        # inside the clip range (OCTAV may clip a few outliers by a little more).
        step = 2 * decoded[name].clip / 255
        err = np.abs(new[name].numpy() - local[name].numpy())
        inside = np.abs(local[name].numpy()) <= decoded[name].clip
        assert err[inside].max() <= step * (1 + 1e-4)
        np.testing.assert_allclose(new[name].numpy(), decoded[name].values)


def test_stock_fedavg_wrapped_matches_fedavg_rule() -> None:
    arrays = global_arrays()
    msgs = [reply(i, update(i), num_examples=10 * (i + 1)) for i in range(3)]
    wrapped = started(QuantizedStrategy(base=FedAvg(), rule=None), arrays)
    ruled = started(QuantizedStrategy(rule="fedavg"), arrays)
    a, _ = wrapped.aggregate_train(1, msgs)
    b, _ = ruled.aggregate_train(1, msgs)
    for name in SHAPES:
        np.testing.assert_allclose(a[name].numpy(), b[name].numpy(), rtol=1e-5, atol=1e-6)


def test_stock_fedadam_consumes_quantized_replies() -> None:
    arrays = global_arrays()
    msgs = [reply(i, update(i)) for i in range(3)]
    base = FedAdam()
    base.current_arrays = {k: v.numpy() for k, v in arrays.items()}  # as configure_train sets
    strategy = started(QuantizedStrategy(base=base, rule=None), arrays)
    new, metrics = strategy.aggregate_train(1, msgs)
    assert new is not None and metrics["accepted"] == 3
    moved = [np.abs(new[k].numpy() - arrays[k].numpy()).max() for k in SHAPES]
    assert all(0 < m < 1 for m in moved)


def test_strategy_from_config_validates_aggregator() -> None:
    assert strategy_from_config(RunConfig(aggregator="flwr:FedAdam")).rule is None
    assert strategy_from_config(RunConfig(aggregator="fedavg")).rule is not None
    for bad in ("nope", "flwr:NotAStrategy", "no_such_module:f"):
        with pytest.raises(ConfigError, match="aggregator"):
            strategy_from_config(RunConfig(aggregator=bad))
