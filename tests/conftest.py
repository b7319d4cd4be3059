"""Shared test set-up."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecordValues,
    RecordDict,
)
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedquant.config import ClipRule, Rounding, RunConfig
from fedquant.reply import ARRAYS_KEY, CONFIG_KEY, SERVER_ROUND, encode_reply


@pytest.fixture(autouse=True)
def server_task_identity() -> None:
    """Messages built outside Flower's runtimes need the task identity it sets."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: a second intra-op thread only adds spin-wait on a busy 2-core box.

    Use per module: ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A private client with 1,000 examples (partition 0 of 50): 3 rounds of 4 DP-SGD steps of
# expected batch 32, DPQuant at ratio 0.5 with an estimate every epoch (so its queries
# must be charged), (3, 1e-5)-DP.
PRIVATE_CLIENT = {
    "num-server-rounds": 3,
    "local-steps": 4,
    "batch-size": 32,
    "target-epsilon": 3.0,
    "quant-train-ratio": 0.5,
    "dpquant-period": 1,
}


@pytest.fixture
def private_cfg() -> RunConfig:
    """The run config of :data:`PRIVATE_CLIENT` (everything else at its default)."""
    return RunConfig.from_flower(PRIVATE_CLIENT)


ClientContext = Callable[..., Context]


@pytest.fixture
def client_context() -> ClientContext:
    """``make(cfg, state_dir=None, node_id=7)``: a freshly started SuperNode's Context.

    Partition 0 of 50 (1,000 examples), an empty ``Context.state`` and, when given, the
    node config ``state-dir``.
    """

    def make(cfg: RunConfig, state_dir: Path | None = None, node_id: int = 7) -> Context:
        node_config: dict[str, int | str] = {"partition-id": 0, "num-partitions": 50}
        if state_dir is not None:
            node_config["state-dir"] = str(state_dir)
        return Context(
            run_id=1,
            node_id=node_id,
            node_config=node_config,
            state=RecordDict(),
            run_config=cfg.to_flower(),
        )

    return make


RunClient = Callable[[RunConfig, Context, int], Message]


@pytest.fixture
def run_client() -> RunClient:
    """``run(cfg, context, server_round)``: the real ClientApp ``train`` handler's reply.

    The instruction carries the freshly built global model (``seed``) and the round.
    """
    from clients.client_app import train  # the client app, only for the tests that use it

    def run(cfg: RunConfig, context: Context, server_round: int) -> Message:
        from fedquant.models import build_model

        model = build_model(cfg.train.model, seed=cfg.run.seed)
        content = RecordDict(
            {
                ARRAYS_KEY: ArrayRecord(model.state_dict()),
                CONFIG_KEY: ConfigRecord({SERVER_ROUND: server_round}),
            }
        )
        instruction = Message(content, dst_node_id=context.node_id, message_type=MessageType.TRAIN)
        instruction.metadata.__dict__["_message_id"] = f"round-{server_round}"
        return train(instruction, context)

    return run


# Replies to a small model, for the strategy's tests ------------------------------------

SMALL_MODEL: dict[str, tuple[int, ...]] = {
    "conv.weight": (4, 1, 3, 3),
    "conv.bias": (4,),
    "fc.weight": (10, 36),
    "fc.bias": (10,),
}
"""Tensor names and shapes of the model the strategy tests aggregate."""

Instruction = Callable[[int], Message]
GlobalModel = Callable[..., ArrayRecord]
QuantizedReply = Callable[..., Message]


def train_instruction(node: int) -> Message:
    """The train instruction a reply from ``node`` answers (fixture :func:`instruction`).

    A reply built with ``reply_to`` takes its sender from it; Flower needs the message
    id set.
    """
    msg = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = f"instruction-{node}"
    return msg


def small_model(seed: int = 0) -> ArrayRecord:
    """A float32 :data:`SMALL_MODEL` with N(0, 1) entries (fixture :func:`global_model`)."""
    rng = np.random.default_rng(seed)
    return ArrayRecord(
        {k: Array(rng.normal(size=s).astype(np.float32)) for k, s in SMALL_MODEL.items()}
    )


@pytest.fixture
def instruction() -> Instruction:
    """``make(node)``: :func:`train_instruction`."""
    return train_instruction


@pytest.fixture
def global_model() -> GlobalModel:
    """``make(seed=0)``: :func:`small_model`."""
    return small_model


@pytest.fixture
def quantized_reply() -> QuantizedReply:
    """``make(node, tensors, metrics, bits=4)``: ``node``'s training reply.

    As a ClientApp sends it (:func:`fedquant.reply.encode_reply`, OCTAV clip, stochastic
    rounding seeded with the node id), answering :func:`instruction` ``(node)``.
    """

    def make(
        node: int,
        tensors: Mapping[str, torch.Tensor],
        metrics: Mapping[str, MetricRecordValues],
        bits: int = 4,
    ) -> Message:
        content = encode_reply(
            tensors,
            metrics,
            bits=bits,
            clip=ClipRule.OCTAV,
            rounding=Rounding.STOCHASTIC,
            generator=torch.Generator().manual_seed(node),
        )
        return Message(content=content, reply_to=train_instruction(node))

    return make
