"""The fedquant ClientApp (Flower Message API).

One training round on a client: load the global weights, train locally on this
node's partition, then upload the quantized update Δ = w_local − w_global (or the
quantized local weights) as packed codes plus per-tensor clip, bits and MSE.
"""

from __future__ import annotations

import hashlib

import torch
from flwr.app import Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from fedquant.config import PayloadMode, RunConfig
from fedquant.data import Split, load_partition
from fedquant.models import build_model, train_epochs
from fedquant.payload import encode_update

# The apps send and receive these record names; the strategy checks them.
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"

app = ClientApp()


def node_seed(*parts: int) -> int:
    """A 63-bit seed derived from (run seed, round, partition, ...), not the clock."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def node_partition(context: Context, cfg: RunConfig) -> tuple[int, Split]:
    """This node's partition id and data, as given by its node config."""
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    data = load_partition(
        partition_id,
        num_partitions=num_partitions,
        partitioning=cfg.partitioning,
        alpha=cfg.dirichlet_alpha,
        seed=cfg.seed,
    )
    return partition_id, data


def make_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """The local optimizer. This is where a DP optimizer (Opacus) plugs in."""
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on the local partition and reply with the quantized update."""
    torch.set_num_threads(1)  # one simulated client per core; faster than 2 here
    cfg = RunConfig.from_flower(context.run_config)
    server_round = int(msg.content[CONFIG_KEY]["server-round"])
    partition_id, data = node_partition(context, cfg)

    global_state = msg.content[ARRAYS_KEY].to_torch_state_dict()
    model = build_model(cfg.model, seed=cfg.seed)
    model.load_state_dict(global_state)
    generator = torch.Generator().manual_seed(node_seed(cfg.seed, server_round, partition_id))
    loss = train_epochs(
        model,
        data,
        optimizer=make_optimizer(model, cfg),
        epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        generator=generator,
        max_steps=cfg.local_steps,
    )

    local_state = model.state_dict()
    if cfg.payload is PayloadMode.UPDATE:
        tensors = {k: local_state[k] - global_state[k] for k in global_state}
    else:
        tensors = dict(local_state)
    content = encode_update(
        tensors, bits=cfg.bits, clip=cfg.clip, rounding=cfg.rounding, generator=generator
    )
    content[METRICS_KEY] = MetricRecord(
        {"num-examples": len(data), "train-loss": loss, "server-round": server_round}
    )
    return Message(content=content, reply_to=msg)

