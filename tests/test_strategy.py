"""QuantizedStrategy.aggregate_train on valid and malformed replies."""

from __future__ import annotations

import json
import logging
import math
import pickle
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi

from fedquant.aggregate import ErrorWeighted, SampleWeighted, TrimmedMean, update_norm
from fedquant.config import ConfigError, PayloadMode, RunConfig
from fedquant.payload import CODES_KEY, META_KEY, decode_update, serialized_size
from fedquant.reply import (
    BudgetExhausted,
    ClientReply,
    ReplyError,
    ReplyLimits,
    decode_reply,
    encode_budget_exhausted,
    encode_reply,
)
from strategies.quantized import QuantizedStrategy, strategy_from_config
from strategies.stock import object_state
from tests.conftest import SMALL_MODEL, GlobalModel, Instruction, QuantizedReply

SHAPES = SMALL_MODEL
Reply = Callable[..., Message]


def update(seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=g) for k, s in SHAPES.items()}


@pytest.fixture
def reply(quantized_reply: QuantizedReply) -> Reply:
    """``make(node, tensors, server_round=1, num_examples=100, bits=4, epsilon=None)``."""

    def make(
        node: int,
        tensors: dict[str, torch.Tensor],
        *,
        server_round: int = 1,
        num_examples: int = 100,
        bits: int = 4,
        epsilon: float | None = None,
    ) -> Message:
        metrics: dict[str, int | float] = {
            "num-examples": num_examples,
            "server-round": server_round,
        }
        if epsilon is not None:
            metrics["epsilon"] = epsilon
        return quantized_reply(node, tensors, metrics, bits=bits)

    return make


class FakeGrid:
    """The one Grid method FedAvg.configure_train uses: the connected node ids."""

    def __init__(self, nodes: int) -> None:
        self.nodes = list(range(1, nodes + 1))

    def get_node_ids(self) -> list[int]:
        return self.nodes


def expected_error_weighted(arrays: ArrayRecord, msgs: list[Message]) -> dict[str, np.ndarray]:
    """The numpy oracle of error weighting (paper B), per tensor.

    w = Σ_i (1/e_i / Σ_k 1/e_k) (w_g + Δ̂_i), with e_i the reported MSE raised to Δ²/12
    of the declared grid, Δ = 2 clip / (2^bits - 1).
    """
    decoded = [decode_update(m.content) for m in msgs]
    out = {}
    for name in SHAPES:
        values = np.stack([arrays[name].numpy() + d[name].values for d in decoded])
        grid = [(2 * d[name].clip / (2 ** d[name].bits - 1)) ** 2 / 12 for d in decoded]
        errors = [max(d[name].mse, g, 1e-12) for d, g in zip(decoded, grid, strict=True)]
        weights = 1.0 / np.array(errors)
        # Honest replies of similar error: the share cap (2 / K) does not bind.
        assert (weights / weights.sum()).max() < 2 / len(msgs)
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


def test_aggregates_against_numpy_oracle(global_model: GlobalModel, reply: Reply) -> None:
    arrays = global_model()
    msgs = [reply(i, update(i)) for i in range(4)]
    strategy = QuantizedStrategy(rule=ErrorWeighted(), update_norm_factor=0.0, global_model=arrays)
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
def test_malformed_reply_is_rejected_and_round_goes_on(
    corrupt, global_model: GlobalModel, reply: Reply
) -> None:
    arrays = global_model()
    good = [reply(i, update(i)) for i in range(3)]
    bad = corrupt(reply(99, update(99, scale=100.0)))
    strategy = QuantizedStrategy(rule=ErrorWeighted(), update_norm_factor=0.0, global_model=arrays)
    new, metrics = strategy.aggregate_train(1, [good[0], bad, good[1], good[2]])
    assert metrics["rejected"] == 1 and metrics["accepted"] == 3
    oracle = expected_error_weighted(arrays, good)
    for name in SHAPES:
        np.testing.assert_allclose(new[name].numpy(), oracle[name], rtol=1e-5, atol=1e-6)


def test_all_replies_bad_leaves_model_unchanged(global_model: GlobalModel, reply: Reply) -> None:
    strategy = QuantizedStrategy(global_model=global_model())
    new, metrics = strategy.aggregate_train(1, [corrupt_bits(reply(1, update(1)))])
    assert new is None
    assert metrics["rejected"] == 1 and metrics["accepted"] == 0


def test_weights_payload_reconstructs_weights(global_model: GlobalModel, reply: Reply) -> None:
    arrays = global_model()
    local = {k: torch.from_numpy(arrays[k].numpy()) + d for k, d in update(3).items()}
    strategy = QuantizedStrategy(rule="mean", payload=PayloadMode.WEIGHTS, global_model=arrays)
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


def test_stock_fedavg_wrapped_matches_fedavg_rule(global_model: GlobalModel, reply: Reply) -> None:
    arrays = global_model()
    msgs = [reply(i, update(i), num_examples=10 * (i + 1)) for i in range(3)]
    wrapped = QuantizedStrategy(base=FedAvg(), rule=None, global_model=arrays)
    ruled = QuantizedStrategy(rule="fedavg", global_model=arrays)
    a, _ = wrapped.aggregate_train(1, msgs)
    b, _ = ruled.aggregate_train(1, msgs)
    for name in SHAPES:
        np.testing.assert_allclose(a[name].numpy(), b[name].numpy(), rtol=1e-5, atol=1e-6)


def test_stock_fedadam_consumes_quantized_replies(global_model: GlobalModel, reply: Reply) -> None:
    arrays = global_model()
    msgs = [reply(i, update(i)) for i in range(3)]
    strategy = QuantizedStrategy(base=FedAdam(), rule=None)
    strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(3))  # FedAdam needs it
    new, metrics = strategy.aggregate_train(1, msgs)
    assert new is not None and metrics["accepted"] == 3
    moved = [np.abs(new[k].numpy() - arrays[k].numpy()).max() for k in SHAPES]
    assert all(0 < m < 1 for m in moved)


def test_strategy_from_config_validates_aggregator() -> None:
    assert strategy_from_config(RunConfig.from_flower({"aggregator": "flwr:FedAdam"})).rule is None
    assert strategy_from_config(RunConfig.from_flower({"aggregator": "fedavg"})).rule is not None
    for bad in ("nope", "flwr:NotAStrategy", "no_such_module:f"):
        with pytest.raises(ConfigError, match="aggregator"):
            strategy_from_config(RunConfig.from_flower({"aggregator": bad}))


# ----------------------------------------------------------------- norm bound


def recording_mean(seen: dict[str, np.ndarray]):
    """The plain mean, keeping the (K, *shape) values each tensor was given."""

    def rule(values: np.ndarray, *, mse: np.ndarray, num_examples: np.ndarray) -> np.ndarray:
        seen[f"t{len(seen)}"] = values.astype(np.float64)
        return values.mean(axis=0)

    return rule


@pytest.mark.parametrize("payload", list(PayloadMode), ids=lambda p: p.value)
def test_norm_bound_clips_a_huge_update_exactly_to_the_bound(
    payload: PayloadMode, caplog: pytest.LogCaptureFixture, global_model: GlobalModel, reply: Reply
) -> None:
    arrays = global_model()
    g = {k: arrays[k].numpy().astype(np.float64) for k in SHAPES}
    deltas = [update(i) for i in range(4)] + [update(99, scale=1.0)]  # 100x the others
    if payload is PayloadMode.WEIGHTS:
        msgs = [
            reply(i, {k: torch.from_numpy(g[k]).float() + d[k] for k in SHAPES}, bits=8)
            for i, d in enumerate(deltas)
        ]
    else:
        msgs = [reply(i, d) for i, d in enumerate(deltas)]
    # Oracle: Δ_i as decoded (minus w_global for weights), bound = 10 x median ||Δ_i||.
    decoded = [
        {
            k: t.values.astype(np.float64) - (g[k] if payload is PayloadMode.WEIGHTS else 0.0)
            for k, t in decode_update(m.content).items()
        }
        for m in msgs
    ]
    norms = [update_norm(d) for d in decoded]
    bound = 10.0 * float(np.median(norms))
    assert norms[4] > 2 * bound and max(norms[:4]) < bound

    seen: dict[str, np.ndarray] = {}
    strategy = QuantizedStrategy(
        rule=recording_mean(seen), payload=payload, update_norm_factor=10.0, global_model=arrays
    )
    with caplog.at_level(logging.WARNING):
        new, metrics = strategy.aggregate_train(1, msgs)
    assert metrics["norm-clipped"] == 1 and metrics["accepted"] == 5
    clipped = {k: seen[f"t{i}"][4] - g[k] for i, k in enumerate(SHAPES)}
    assert update_norm(clipped) == pytest.approx(bound, rel=1e-9)
    for i, k in enumerate(SHAPES):  # only scaled, never turned
        want = decoded[4][k] * bound / norms[4]
        np.testing.assert_allclose(clipped[k], want, rtol=1e-9, atol=1e-12)
        # Honest replies pass unchanged.
        honest_deltas = np.stack([d[k] for d in decoded[:4]])
        np.testing.assert_allclose(seen[f"t{i}"][:4] - g[k], honest_deltas, rtol=1e-5, atol=1e-6)
    honest_mean = {k: np.mean([d[k] for d in decoded[:4]], axis=0) for k in SHAPES}
    for k in SHAPES:
        want = g[k] + (4 * honest_mean[k] + clipped[k]) / 5
        np.testing.assert_allclose(new[k].numpy(), want, rtol=1e-5, atol=1e-6)
    # The mean moves from the honest-only mean by ||Δ_4 - mean_honest|| / K, which the
    # bound caps at (bound + ||mean_honest||) / K; unclipped it would move far more.
    moved = update_norm({k: new[k].numpy() - (g[k] + honest_mean[k]) for k in SHAPES})
    assert moved <= (bound + update_norm(honest_mean)) / 5 + 1e-5
    unclipped = update_norm({k: decoded[4][k] - honest_mean[k] for k in SHAPES}) / 5
    assert moved < unclipped / 2
    logged = [r.getMessage() for r in caplog.records if "x the bound" in r.getMessage()]
    assert len(logged) == 1 and "node 4" in logged[0]
    assert f"{norms[4]:.6g}" in logged[0] and f"{bound:.6g}" in logged[0]
    assert f"x{bound / norms[4]:.3g}" in logged[0]


def test_norm_bound_zero_disables_clipping(global_model: GlobalModel, reply: Reply) -> None:
    arrays = global_model()
    msgs = [reply(i, update(i)) for i in range(4)] + [reply(4, update(99, scale=1.0))]
    off = QuantizedStrategy(rule="mean", update_norm_factor=0.0, global_model=arrays)
    new, metrics = off.aggregate_train(1, msgs)
    assert metrics["norm-clipped"] == 0
    decoded = [decode_update(m.content) for m in msgs]
    for name in SHAPES:
        want = arrays[name].numpy() + np.mean([d[name].values for d in decoded], axis=0)
        np.testing.assert_allclose(new[name].numpy(), want, rtol=1e-5, atol=1e-6)


def test_norm_bound_leaves_honest_rounds_alone(global_model: GlobalModel, reply: Reply) -> None:
    arrays = global_model()
    msgs = [reply(i, update(i)) for i in range(4)]
    on = QuantizedStrategy(rule=ErrorWeighted(), global_model=arrays)
    new, metrics = on.aggregate_train(1, msgs)
    # The default factor 1: everything above the median is cut; K=4 has two above it.
    assert metrics["norm-clipped"] == 2
    loose = QuantizedStrategy(rule=ErrorWeighted(), update_norm_factor=1.5, global_model=arrays)
    new, metrics = loose.aggregate_train(1, msgs)
    assert metrics["norm-clipped"] == 0
    oracle = expected_error_weighted(arrays, msgs)
    for name in SHAPES:
        np.testing.assert_allclose(new[name].numpy(), oracle[name], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------- missing replies and minimum


def test_missing_counts_train_messages_without_any_reply(
    global_model: GlobalModel, reply: Reply, instruction: Instruction
) -> None:
    arrays = global_model()
    strategy = QuantizedStrategy(base=FedAvg(min_available_nodes=5), rule="mean")
    sent = strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(5))
    assert isinstance(sent, list) and len(sent) == 5 and strategy.sent_by_round[1] == 5
    replies = [
        reply(1, update(1)),
        Message(Error(code=0, reason="client crashed"), reply_to=instruction(2)),
        corrupt_bits(reply(3, update(3))),
        reply(4, update(4)),
    ]
    new, metrics = strategy.aggregate_train(1, replies)
    assert new is not None
    assert metrics["missing"] == 1  # 5 sent, 4 replies (an error and a rejected one count)
    assert (metrics["accepted"], metrics["failed"], metrics["rejected"]) == (2, 1, 1)
    assert metrics["skipped"] == 0
    # Bytes are what Flower serializes: the instructions as sent, the model counted once.
    assert metrics["downlink-bytes"] == sum(serialized_size(m.content) for m in sent)


@pytest.mark.parametrize("good", [0, 2, 3])
def test_min_replies_skips_the_round_below_the_minimum(
    good: int, caplog: pytest.LogCaptureFixture, global_model: GlobalModel, reply: Reply
) -> None:
    strategy = QuantizedStrategy(rule="mean", min_replies=3, global_model=global_model())
    replies = [reply(i, update(i)) for i in range(good)] + [corrupt_clip(reply(9, update(9)))]
    with caplog.at_level(logging.WARNING):
        new, metrics = strategy.aggregate_train(1, replies)
    assert metrics["accepted"] == good and metrics["rejected"] == 1
    skipped = [r.getMessage() for r in caplog.records if "Round 1: skipped" in r.getMessage()]
    if good < 3:
        assert new is None and metrics["skipped"] == 1
        assert len(skipped) == 1
        assert f"{good} accepted" in skipped[0] and "minimum of 3" in skipped[0]
    else:
        assert new is not None and metrics["skipped"] == 0 and not skipped


def test_constructor_validates_min_replies_and_norm_factor() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="min_replies"):
            QuantizedStrategy(min_replies=bad)
    for bad in (0.5, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="update_norm_factor"):
            QuantizedStrategy(update_norm_factor=bad)
        with pytest.raises(ValueError, match="round_norm_factor"):
            QuantizedStrategy(round_norm_factor=bad)


def test_strategy_from_config_passes_the_robustness_keys() -> None:
    cfg = RunConfig.from_flower(
        {
            "aggregator": "trimmed-mean",
            "byzantine-clients": 3,
            "min-replies": 4,
            "update-norm-factor": 0.0,
            "round-norm-factor": 5.0,
            "max-num-examples": 1000,
            "dp": False,
        }
    )
    strategy = strategy_from_config(cfg)
    assert strategy.rule == TrimmedMean(3)
    assert strategy.min_replies == 4 and strategy.update_norm_factor == 0.0
    assert strategy.round_norm_factor == 5.0
    assert strategy.limits == ReplyLimits(max_epsilon=None, max_num_examples=1000, max_speedup=4.0)
    stock = strategy_from_config(
        RunConfig.from_flower({"aggregator": "flwr:FedAdam", "min-replies": 2})
    )
    assert stock.min_replies == 2 and stock.update_norm_factor == 1.0
    assert stock.limits.max_epsilon == 8.0
    capped = strategy_from_config(
        RunConfig.from_flower({"aggregator": "fedavg", "weight-cap": 3.0})
    ).rule
    assert capped == SampleWeighted(cap=3.0)
    uncapped = strategy_from_config(
        RunConfig.from_flower({"aggregator": "error-weighted", "weight-cap": 0.0})
    ).rule
    assert uncapped == ErrorWeighted(cap=math.inf)
    assert strategy_from_config(RunConfig.from_flower({"aggregator": "median"})).rule is not None


# ------------------------------------------------------------------ checkpoints


def test_state_round_trips_through_json(global_model: GlobalModel, reply: Reply) -> None:
    arrays = global_model()
    strategy = QuantizedStrategy(rule="mean", limits=ReplyLimits(max_epsilon=1.0))
    strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(3))
    strategy.aggregate_train(1, [reply(i, update(i), epsilon=0.25 * i + 0.1) for i in range(3)])
    state = json.loads(json.dumps(strategy.state()))
    restored = QuantizedStrategy(rule="mean")
    restored.load_state(state)
    assert restored.epsilon_by_node == strategy.epsilon_by_node == {0: 0.1, 1: 0.35, 2: 0.6}
    assert restored.sent_by_round == {1: 3}
    assert restored.recent_steps == strategy.recent_steps and len(strategy.recent_steps) == 1
    assert restored.state() == strategy.state()


@pytest.mark.parametrize(
    "make_base",
    [FedAdam, FedYogi, FedAdagrad, lambda: FedAvgM(server_momentum=0.9)],
    ids=["FedAdam", "FedYogi", "FedAdagrad", "FedAvgM"],
)
def test_restored_stock_optimizer_aggregates_the_next_round_identically(
    make_base, global_model: GlobalModel, reply: Reply
) -> None:
    grid = FakeGrid(3)
    original = QuantizedStrategy(base=make_base(), rule=None)
    arrays = global_model()
    for server_round in (1, 2):
        original.configure_train(server_round, arrays, ConfigRecord(), grid)
        msgs = [
            reply(i, update(10 * server_round + i), server_round=server_round) for i in range(3)
        ]
        arrays, _ = original.aggregate_train(server_round, msgs)
    state = json.loads(json.dumps(original.state()))
    untrained = json.loads(json.dumps(QuantizedStrategy(base=make_base(), rule=None).state()))
    assert state["base"] != untrained["base"]  # two rounds left optimizer state to save

    restored = QuantizedStrategy(base=make_base(), rule=None)
    restored.load_state(state)
    # Every array of the base's state, bytes and dtype, comes back as it was.
    assert restored.state() == original.state()
    msgs = [reply(i, update(30 + i), server_round=3) for i in range(3)]
    results = []
    for strategy in (original, restored):
        strategy.configure_train(3, arrays, ConfigRecord(), grid)
        results.append(strategy.aggregate_train(3, msgs)[0])
    for name in SHAPES:
        np.testing.assert_array_equal(results[0][name].numpy(), results[1][name].numpy())
    # The optimizer state matters: a fresh strategy gives a different step.
    fresh = QuantizedStrategy(base=make_base(), rule=None)
    fresh.configure_train(3, arrays, ConfigRecord(), grid)
    other = fresh.aggregate_train(3, msgs)[0]
    assert any(not np.array_equal(other[k].numpy(), results[0][k].numpy()) for k in SHAPES)


def test_load_state_rejects_another_base_strategys_moments() -> None:
    strategy = QuantizedStrategy(base=FedAdam(), rule=None)
    state = json.loads(json.dumps(strategy.state()))
    other = QuantizedStrategy(base=FedAvg(), rule="mean")
    before = other.state()
    with pytest.raises(ValueError, match=r"FedAdam, which keeps \[.*'m_t'.*into a FedAvg"):
        other.load_state(state)
    assert other.state() == before  # nothing was half restored


# ------------------------------------------------------------------ recovery


def test_an_absurd_round_is_discarded_with_the_optimizer_state_it_would_have_changed(
    caplog: pytest.LogCaptureFixture, global_model: GlobalModel, reply: Reply
) -> None:
    """An absurd round leaves the model and the base's momentum as they were.

    FedAvgM (server momentum 0.9) aggregates round 1; in round 2 every reply is 10^4 x
    larger (norm bound off): the step exceeds 10 x round 1's, so the model stays and so
    does the momentum; round 3, honest again, is applied from the unchanged state.
    (FedAdam normalises its step per coordinate, so scaled replies do not make its
    step absurd.)
    """
    arrays = global_model()
    base = FedAvgM(server_momentum=0.9)
    strategy = QuantizedStrategy(base=base, rule=None, update_norm_factor=0.0)
    strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(3))
    first, metrics = strategy.aggregate_train(1, [reply(i, update(i)) for i in range(3)])
    assert first is not None and metrics["discarded"] == 0 and metrics["step-norm"] > 0
    before = json.dumps(strategy.state())
    strategy.configure_train(2, first, ConfigRecord(), FakeGrid(3))
    huge = [reply(i, update(i + 10, scale=100.0), server_round=2) for i in range(3)]
    with caplog.at_level(logging.WARNING):
        new, metrics = strategy.aggregate_train(2, huge)
    assert new is None and metrics["discarded"] == 1 and metrics["step-norm"] == 0.0
    state = json.loads(json.dumps(strategy.state()))
    assert state["base"] == json.loads(before)["base"]  # the momentum is untouched
    assert state["base"]["momentum_vector"] is not None
    assert any("Round 2: discarded" in r.getMessage() for r in caplog.records)
    strategy.configure_train(3, first, ConfigRecord(), FakeGrid(3))
    honest = [reply(i, update(i + 20), server_round=3) for i in range(3)]
    third, metrics = strategy.aggregate_train(3, honest)
    assert third is not None and metrics["discarded"] == 0 and metrics["accepted"] == 3
    # Oracle: a strategy that never saw round 2 (momentum and FedAvgM's own copy of the
    # model both as after round 1) takes the same step in round 3 and ends it with the
    # same optimizer state (the momentum carries FedAvgM's copy of the model onwards).
    undisturbed = QuantizedStrategy(
        base=FedAvgM(server_momentum=0.9), rule=None, update_norm_factor=0.0
    )
    undisturbed.configure_train(1, arrays, ConfigRecord(), FakeGrid(3))
    undisturbed.aggregate_train(1, [reply(i, update(i)) for i in range(3)])
    undisturbed.configure_train(3, first, ConfigRecord(), FakeGrid(3))
    want, _ = undisturbed.aggregate_train(3, honest)
    for name in SHAPES:
        np.testing.assert_array_equal(third[name].numpy(), want[name].numpy())
    assert strategy.state()["base"] == undisturbed.state()["base"]


def test_a_non_finite_aggregate_is_discarded(global_model: GlobalModel, reply: Reply) -> None:
    def overflow(values: np.ndarray, *, mse: np.ndarray, num_examples: np.ndarray) -> np.ndarray:
        return np.full(values.shape[1:], np.inf)

    strategy = QuantizedStrategy(rule=overflow, global_model=global_model())
    new, metrics = strategy.aggregate_train(1, [reply(i, update(i)) for i in range(3)])
    assert new is None and metrics["discarded"] == 1 and metrics["accepted"] == 3


# ------------------------------------------------------------------ reply format


def test_budget_exhausted_status_decodes_typed_with_its_sender(instruction: Instruction) -> None:
    content = encode_budget_exhausted(server_round=4, epsilon=2.5)
    msg = Message(content=content, reply_to=instruction(6))
    decoded = decode_reply(
        msg, server_round=4, global_arrays={}, limits=ReplyLimits(max_epsilon=3.0)
    )
    assert decoded == BudgetExhausted(node_id=6, epsilon=2.5)
    # Without a privacy budget the same status is a lie.
    with pytest.raises(ReplyError, match="'budget-exhausted': this run has no privacy budget"):
        decode_reply(msg, server_round=4, global_arrays={})


def test_decode_reply_raises_one_typed_error_that_pickles(
    global_model: GlobalModel, reply: Reply
) -> None:
    arrays = {k: v.numpy() for k, v in global_model().items()}
    good = decode_reply(reply(3, update(3)), server_round=1, global_arrays=arrays)
    assert isinstance(good, ClientReply) and good.node_id == 3 and good.num_examples == 100
    # A codec failure keeps its tensor and field, as a ReplyError.
    with pytest.raises(ReplyError, match="tensor 'fc.weight', field 'bits'") as err:
        decode_reply(corrupt_bits(reply(3, update(3))), server_round=1, global_arrays=arrays)
    back = pickle.loads(pickle.dumps(err.value))
    assert type(back) is ReplyError and (back.tensor, back.field) == ("fc.weight", "bits")


def test_encode_reply_refuses_a_metric_the_server_would_reject() -> None:
    with pytest.raises(ValueError, match=r"not reply metrics: \['train-loss'\]"):
        encode_reply(update(1), {"train-loss": 0.1}, bits=4, generator=torch.Generator())


def test_object_state_refuses_what_is_not_data() -> None:
    class Holder:
        def __init__(self) -> None:
            self.rate = 0.1
            self.fn = len  # behaviour: left to the constructor
            self.lock = object()

    with pytest.raises(TypeError, match="Holder.lock: object is not data"):
        object_state(Holder())
