"""``sims.bench.overhead`` times the real client code without patching it.

Its fedquant ClientApp runs ``clients.client_app.local_train`` (passed in explicitly and
timed there) and then ``clients.client_app.quantized_reply``; the benchmark only
measures fedquant's client if that reply is the one ``clients.client_app.app`` sends.
"""

from __future__ import annotations

import dataclasses

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

import clients.client_app as fq_client
from clients.client_app import quantized_reply
from fedquant.config import RunConfig
from fedquant.models import build_model
from fedquant.reply import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY
from sims.bench.overhead import RoundClock, float32_reply, timed_app

OVERRIDES = {
    "num-supernodes": 2,
    "local-steps": 2,
    "batch-size": 16,
    "dp": False,  # no secret noise: two runs of a round give the same weights
    "quant-policy": "none",
}


def _train_message(cfg: RunConfig) -> Message:
    model = build_model(cfg.train.model, seed=cfg.run.seed)
    content = RecordDict(
        {
            ARRAYS_KEY: ArrayRecord(model.state_dict()),
            CONFIG_KEY: ConfigRecord({"server-round": 1}),
        }
    )
    return Message(content, dst_node_id=1, message_type="train")


def _context(cfg: RunConfig) -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config=cfg.to_flower(),
    )


def test_quantized_reply_is_the_client_apps_reply() -> None:
    cfg = RunConfig.from_flower(OVERRIDES)
    msg = _train_message(cfg)
    result = fq_client.local_train(msg, _context(cfg))
    ours = quantized_reply(msg, result)
    real = fq_client.app(_train_message(cfg), _context(cfg))
    assert not real.has_error()
    assert set(ours.content.keys()) == set(real.content.keys())
    assert ours.content.object_id == real.content.object_id  # every record, byte for byte
    # The comparison can fail: other rounding draws give other codes.
    other = quantized_reply(msg, dataclasses.replace(result, server_round=2))
    assert other.content.object_id != real.content.object_id


def test_timed_app_times_training_and_sends_float32_weights() -> None:
    cfg = RunConfig.from_flower(OVERRIDES)
    clock = RoundClock()
    reply = timed_app(float32_reply, clock)(_train_message(cfg), _context(cfg))
    assert clock.seconds["wall-train"] > 0.0 and clock.seconds["cpu-train"] > 0.0
    result = fq_client.local_train(_train_message(cfg), _context(cfg))  # the same round
    arrays = reply.content.array_records[ARRAYS_KEY].to_torch_state_dict()
    assert arrays.keys() == result.local_state.keys()
    assert all((arrays[k] == result.local_state[k]).all() for k in arrays)
    metrics = dict(reply.content.metric_records[METRICS_KEY])
    assert metrics == {"num-examples": result.metrics["num-examples"]}
