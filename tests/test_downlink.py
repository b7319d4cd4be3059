"""The quantized downlink and the client's error feedback, through the real apps."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from clients.client_app import app as client_app
from clients.client_app import node_state, node_state_store, received_model
from fedquant.codec import Rounding
from fedquant.config import Rotation, RunConfig
from fedquant.downlink import (
    BASE,
    DIGEST,
    VERSION,
    Broadcaster,
    DownlinkError,
    apply_deltas,
    model_digest,
)
from fedquant.models import build_model
from fedquant.node_state import NodeStateError, NodeStateStore, NodeTensors
from fedquant.payload import decode_update
from fedquant.reply import ARRAYS_KEY, CONFIG_KEY, SERVER_ROUND
from sims.app.server_app import run
from sims.launch.inprocess import InProcessGrid
from strategies.quantized import QuantizedStrategy, strategy_from_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ClientContext = Callable[..., Context]
RunClient = Callable[[RunConfig, Context, int], Message]


def _model(seed: int = 0) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in build_model_state(seed).items()}


def build_model_state(seed: int) -> dict[str, torch.Tensor]:
    from fedquant.config import ModelName

    return build_model(ModelName.CNN, seed=seed).state_dict()


def _drift(model: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in model.items()}


@pytest.mark.parametrize("rotation", list(Rotation))
def test_a_client_rebuilds_the_broadcast_bit_for_bit(rotation: Rotation) -> None:
    broadcaster = Broadcaster(bits=4, rotation=rotation, entropy_coding=True, seed=1)
    start = _model()
    broadcaster.reset(start, version=0)
    target = start
    for step in range(1, 4):
        target = _drift(target, step)
        broadcaster.advance(target)
    broadcaster.held[5] = 0
    records = broadcaster.instruction(5)
    assert records is not None
    rebuilt = apply_deltas(
        start,
        RecordDict(records),
        base=0,
        version=3,
        digest=model_digest(broadcaster.model),
        rotation=rotation,
    )
    for name, value in broadcaster.model.items():
        np.testing.assert_array_equal(rebuilt[name], value, err_msg=name)
    # Server-side error feedback: the broadcast tracks the target to one step's error.
    err = sum(float(np.sum((broadcaster.model[k] - target[k]) ** 2)) for k in target)
    norm = sum(float(np.sum((target[k] - start[k]) ** 2)) for k in target)
    assert err < 0.05 * norm


def test_a_copy_that_is_not_the_servers_fails_loudly() -> None:
    broadcaster = Broadcaster(bits=4, seed=1)
    start = _model()
    broadcaster.reset(start, version=0)
    broadcaster.advance(_drift(start, 1))
    broadcaster.held[1] = 0
    records = RecordDict(broadcaster.instruction(1) or {})
    wrong = {k: v + 1e-3 for k, v in start.items()}
    with pytest.raises(DownlinkError, match="does not match"):
        apply_deltas(
            wrong,
            records,
            base=0,
            version=1,
            digest=model_digest(broadcaster.model),
            rotation=Rotation.NONE,
        )
    with pytest.raises(DownlinkError, match="missing records"):
        apply_deltas(
            start,
            RecordDict(),
            base=0,
            version=1,
            digest=model_digest(broadcaster.model),
            rotation=Rotation.NONE,
        )


def test_a_node_too_far_behind_or_unknown_gets_the_float32_model() -> None:
    broadcaster = Broadcaster(bits=2, seed=1, history=2)
    start = _model()
    broadcaster.reset(start, version=0)
    target = start
    for step in range(1, 4):
        target = _drift(target, step)
        broadcaster.advance(target)
    broadcaster.held.update({1: 0, 2: 1, 3: 3})
    assert broadcaster.instruction(1) is None  # deltas 1..3 needed, 2 kept
    assert broadcaster.instruction(4) is None  # never seen
    two = broadcaster.instruction(2)
    assert two is not None and {k.split(".")[1] for k in two} == {"2", "3"}
    assert broadcaster.instruction(3) == {}  # up to date: nothing to send


class RecordingGrid(InProcessGrid):
    """Checks, at every delivery, that the client rebuilds the model the server holds."""

    strategy: QuantizedStrategy
    cfg: RunConfig
    checked = 0
    deltas = 0

    def deliver(self, msg: Message, context: Context) -> Message:
        copy = node_state(context, None, private=False).tensors
        rebuilt, _ = received_model(msg, self.cfg, copy)
        served = self.strategy.global_model
        assert served is not None
        for name, value in served.items():
            np.testing.assert_array_equal(rebuilt[name].numpy(), value.numpy(), err_msg=name)
        self.checked += 1
        self.deltas += ARRAYS_KEY not in msg.content
        return super().deliver(msg, context)


def test_downlink_decode_equals_what_the_server_evaluated(tmp_path: Path) -> None:
    """Three rounds, 4-bit deltas (rotated, entropy-coded), 2-bit error-fed uploads."""
    cfg = RunConfig.from_flower(
        {
            "num-supernodes": 3,
            "num-server-rounds": 3,
            "local-steps": 10,
            "batch-size": 32,
            "quant-policy": "none",
            "dp": False,
            "bits": 2,
            "rounding": "dithered",
            "rotation": "hadamard",
            "entropy-coding": True,
            "error-feedback": True,
            "downlink-bits": 4,
            "out-dir": str(tmp_path),
        }
    )
    grid = RecordingGrid(client_app, num_nodes=3, run_config=cfg.to_flower())
    strategy = strategy_from_config(cfg, clients_hold_initial=True)
    grid.strategy, grid.cfg = strategy, cfg
    run(grid, cfg, strategy)
    assert grid.checked == 9
    assert grid.deltas == 9  # every node rebuilt the seeded initial model itself
    results = json.loads((tmp_path / "results.json").read_text())
    rounds = results["rounds"]
    assert all(r["accepted"] == 3 and r["failed"] == 0 for r in rounds)
    assert rounds[-1]["accuracy"] > 0.6
    assert 0 < rounds[-1]["downlink-bits-per-coordinate"] < 5
    assert 0 < rounds[-1]["uplink-bits-per-coordinate"] < 3
    assert results["summary"]["total-fraction-of-float32"] < 0.15
    # The model the server evaluated last is the one it would broadcast next.
    assert strategy.global_model is not None
    assert strategy.broadcaster is not None
    for name, value in strategy.global_model.items():
        np.testing.assert_array_equal(value.numpy(), strategy.broadcaster.model[name])


# ----------------------------------------------------------------------------- EF memory


def test_error_feedback_memory_survives_a_client_restart(
    tmp_path: Path, client_context: ClientContext, run_client: RunClient
) -> None:
    cfg = RunConfig.from_flower(
        {
            "dp": False,
            "local-steps": 3,
            "batch-size": 32,
            "quant-policy": "none",
            "bits": 1,
            "rounding": "nearest",
            "error-feedback": True,
        }
    )
    first = client_context(cfg, state_dir=tmp_path)
    reply = run_client(cfg, first, 1)
    assert not reply.has_error()
    kept = node_state(first, None, private=False).tensors.residual
    assert kept and any(np.abs(v).max() > 0 for v in kept.values())

    # A restarted node: empty Context.state, the same state directory.
    restarted = client_context(cfg, state_dir=tmp_path)
    store = node_state_store(restarted, cfg, 0)
    assert store is not None
    loaded = node_state(restarted, store, private=False).tensors.residual
    assert loaded.keys() == kept.keys()
    for name in kept:
        np.testing.assert_array_equal(loaded[name], kept[name], err_msg=name)

    # The residual is exactly what the upload missed: sent + new residual = Δ + old one.
    reply = run_client(cfg, restarted, 2)
    assert not reply.has_error()
    newer = node_state(restarted, None, private=False).tensors.residual
    sent = decode_update(reply.content, rounding=Rounding.NEAREST)
    # The same round's Δ in float32, from a twin node without error feedback (training
    # without DP is seeded, so it is the same Δ).
    twin_cfg = cfg.with_overrides({"bits": 32, "error-feedback": False})
    twin = run_client(twin_cfg, client_context(twin_cfg), 2)
    delta = decode_update(twin.content)
    for name in kept:
        np.testing.assert_allclose(
            sent[name].values + newer[name],
            delta[name].values + kept[name],
            rtol=0,
            atol=1e-6 * float(np.abs(delta[name].values).max() + np.abs(kept[name]).max()),
            err_msg=name,
        )


def test_a_damaged_tensor_file_refuses_to_load(tmp_path: Path) -> None:
    from fedquant.node_state import NodeState

    store = NodeStateStore(tmp_path)
    store.save(NodeState(tensors=NodeTensors(residual={"w": np.ones(3, np.float32)})))
    assert store.load(require_privacy=False) is not None
    data = bytearray(store.tensor_path.read_bytes())
    data[-5] ^= 0xFF
    store.tensor_path.write_bytes(bytes(data))
    with pytest.raises(NodeStateError, match="digest"):
        store.load(require_privacy=False)
    store.tensor_path.unlink()
    with pytest.raises(NodeStateError, match="names"):
        store.load(require_privacy=False)


def test_an_instruction_from_a_base_the_node_lacks_is_an_error() -> None:
    cfg = RunConfig.from_flower({"downlink-bits": 4})
    content = RecordDict(
        {CONFIG_KEY: ConfigRecord({SERVER_ROUND: 2, BASE: 3, VERSION: 4, DIGEST: "x"})}
    )
    msg = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
    with pytest.raises(DownlinkError, match="version 3"):
        received_model(msg, cfg, NodeTensors())


class CrashingGrid(InProcessGrid):
    """The SuperLink dies when round ``crash_round`` is sent."""

    crash_round: int | None = None

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        if int(messages[0].content[CONFIG_KEY][SERVER_ROUND]) == self.crash_round:
            raise ConnectionError("SuperLink went away")
        return super().send_and_receive(messages, timeout=timeout)


def test_a_resumed_run_sends_the_float32_model_once_and_goes_on(tmp_path: Path) -> None:
    """After a server restart nobody's copy is known: one float32 broadcast, then deltas."""
    values = {
        "num-supernodes": 3,
        "num-server-rounds": 4,
        "local-steps": 5,
        "batch-size": 32,
        "dp": False,
        "quant-policy": "none",
        "error-feedback": True,
        "downlink-bits": 4,
        "out-dir": str(tmp_path),
        "client-state-dir": str(tmp_path / "clients"),
    }
    cfg = RunConfig.from_flower(values)
    grid = CrashingGrid(client_app, num_nodes=3, run_config=cfg.to_flower())
    grid.crash_round = 3
    with pytest.raises(ConnectionError):
        run(grid, cfg, strategy_from_config(cfg, clients_hold_initial=True))
    resumed = RunConfig.from_flower({**values, "resume": True})
    grid = CrashingGrid(client_app, num_nodes=3, run_config=resumed.to_flower())
    run(grid, resumed, strategy_from_config(resumed))
    rows = json.loads((tmp_path / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert all(r["accepted"] == 3 and r["failed"] == 0 for r in rows)
    float32 = rows[0]["downlink-float32-bytes"]
    assert rows[1]["downlink-bytes"] < float32 / 4  # deltas
    assert rows[2]["downlink-bytes"] >= float32  # the resumed server knows no copy
    assert rows[3]["downlink-bytes"] < float32 / 4  # deltas again
