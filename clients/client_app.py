"""The fedquant ClientApp (Flower Message API).

One training round on a client: load the global weights, train locally on this node's
partition — DP-SGD with Opacus when ``dp`` is on, with DPQuant choosing which layers run
in low precision each epoch — then upload the quantized update Δ = w_local − w_global
(or the quantized local weights) as packed codes plus per-tensor clip, bits and MSE.

Privacy state lives in the node's ``Context.state`` and persists across rounds: the
ledger of every mechanism application (so ε is cumulative), the noise multiplier
calibrated once for the whole run, and DPQuant's sensitivity EMA and epoch counter.
With a state directory (node config ``state-dir`` in deployment, run config
``client-state-dir`` in simulation) the same records are also written to disk,
atomically, before the reply leaves the node, and read back when the node starts
with an empty state: a SuperNode killed and restarted goes on from the ε it had spent.
A client whose next round would exceed its (ε, δ) budget does not train; it replies
with a ``budget-exhausted`` status instead of an update.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedquant.accounting import PrivacyLedger
from fedquant.config import PayloadMode, RunConfig
from fedquant.data import Split, load_partition
from fedquant.dpquant import LayerScheduler, QuantPolicy
from fedquant.fakequant import quantizable_layers
from fedquant.models import build_model
from fedquant.node_state import NodeStateStore
from fedquant.payload import encode_update
from fedquant.private import (
    DPSettings,
    QuantSettings,
    calibrate_client_noise,
    planned_mechanisms,
    round_plan,
    train_round,
)

# The apps send and receive these record names; the strategy checks them.
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
# Node state records (Context.state) that persist across rounds.
PRIVACY_STATE = "fedquant.privacy"
SCHEDULER_STATE = "fedquant.dpquant"
PERSISTED_STATE = (PRIVACY_STATE, SCHEDULER_STATE)

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


def node_state_store(
    context: Context, cfg: RunConfig, partition_id: int
) -> NodeStateStore | None:
    """Where this node persists its privacy state, or None to keep it in memory only.

    A deployed SuperNode names its own directory (node config ``state-dir``); in
    simulation every partition gets ``client-state-dir/partition-<id>``.
    """
    if node_dir := context.node_config.get("state-dir"):
        return NodeStateStore(str(node_dir))
    if cfg.client_state_dir:
        return NodeStateStore(Path(cfg.client_state_dir) / f"partition-{partition_id}")
    return None


def quant_settings(cfg: RunConfig) -> QuantSettings | None:
    if cfg.quant_policy is QuantPolicy.NONE or cfg.quant_train_ratio == 0.0:
        return None
    return QuantSettings(
        policy=cfg.quant_policy,
        ratio=cfg.quant_train_ratio,
        fmt=cfg.quant_format,
        beta=cfg.dpquant_beta,
        alpha=cfg.dpquant_alpha,
        estimator_clip=cfg.dpquant_clip,
        estimator_noise=cfg.dpquant_noise,
        estimator_rate=cfg.dpquant_sample_rate,
        period=cfg.dpquant_period,
        low_precision_speedup=cfg.low_precision_speedup,
    )


def dp_settings(cfg: RunConfig) -> DPSettings | None:
    if not cfg.dp:
        return None
    return DPSettings(cfg.target_epsilon, cfg.target_delta, cfg.max_grad_norm)


def load_scheduler(state: RecordDict, *, n_layers: int, quant: QuantSettings, seed: int) -> LayerScheduler:
    if SCHEDULER_STATE in state:
        return LayerScheduler.from_dict(dict(state[SCHEDULER_STATE]))
    return LayerScheduler(
        n_layers=n_layers,
        policy=quant.policy,
        ratio=quant.ratio,
        beta=quant.beta,
        alpha=quant.alpha,
        seed=seed,
    )


@dataclass
class LocalRound:
    """One round of local training: the weights before and after, and its metrics.

    ``exhausted_epsilon`` is set (and nothing trained) when the round would have
    exceeded the node's privacy budget.
    """

    cfg: RunConfig
    server_round: int
    global_state: dict[str, torch.Tensor]
    local_state: dict[str, torch.Tensor]
    metrics: dict[str, int | float | list[int]]
    generator: torch.Generator
    exhausted_epsilon: float | None = None


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on the local partition and reply with the quantized update."""
    result = local_train(msg, context)
    if result.exhausted_epsilon is not None:
        return _budget_exhausted(msg, result.server_round, result.exhausted_epsilon)
    cfg, global_state, local_state = result.cfg, result.global_state, result.local_state
    if cfg.payload is PayloadMode.UPDATE:
        tensors = {k: local_state[k] - global_state[k] for k in global_state}
    else:
        tensors = dict(local_state)
    content = encode_update(
        tensors, bits=cfg.bits, clip=cfg.clip, rounding=cfg.rounding, generator=result.generator
    )
    content[METRICS_KEY] = MetricRecord(result.metrics)
    return Message(content=content, reply_to=msg)


def local_train(msg: Message, context: Context) -> LocalRound:
    """Load the global weights, train on this node's partition, update its state."""
    torch.set_num_threads(1)  # one simulated client per core; faster than 2 here
    cfg = RunConfig.from_flower(context.run_config)
    server_round = int(msg.content[CONFIG_KEY]["server-round"])
    partition_id, data = node_partition(context, cfg)
    store = node_state_store(context, cfg, partition_id)
    restarted = not any(name in context.state for name in PERSISTED_STATE)
    if store is not None and restarted and (saved := store.load()) is not None:
        for name in PERSISTED_STATE:
            if name in saved:
                context.state[name] = ConfigRecord(saved[name])
    generator = torch.Generator().manual_seed(node_seed(cfg.seed, server_round, partition_id))

    global_state = msg.content[ARRAYS_KEY].to_torch_state_dict()
    model = build_model(cfg.model, seed=cfg.seed)
    model.load_state_dict(global_state)
    for _, layer in quantizable_layers(model):
        layer.act_scale = cfg.act_scale

    dp, quant = dp_settings(cfg), quant_settings(cfg)
    plan = round_plan(
        len(data), batch_size=cfg.batch_size, epochs=cfg.local_epochs, max_steps=cfg.local_steps
    )
    scheduler = None
    if quant is not None:
        n_layers = len(quantizable_layers(model))
        scheduler = load_scheduler(
            context.state, n_layers=n_layers, quant=quant, seed=node_seed(cfg.seed, partition_id)
        )
    ledger, noise = None, None
    if dp is not None:
        privacy = context.state.get(PRIVACY_STATE)
        if privacy is None:
            # Calibrated once, for every round the run plans; never re-derived.
            noise = calibrate_client_noise(plan, rounds=cfg.num_server_rounds, dp=dp, quant=quant)
            ledger = PrivacyLedger()
        else:
            noise = float(privacy["noise-multiplier"])
            ledger = PrivacyLedger.from_dict(
                {k: privacy[k] for k in ("noise", "rate", "steps")}
            )
        this_round = planned_mechanisms(
            plan,
            rounds=1,
            noise=noise,
            quant=quant,
            epochs_before=scheduler.epochs_done if scheduler else 0,
        )
        if ledger.epsilon_if(*this_round, delta=dp.target_delta) > dp.target_epsilon:
            return LocalRound(
                cfg, server_round, global_state, global_state, {}, generator,
                exhausted_epsilon=ledger.epsilon(delta=dp.target_delta),
            )

    stats = train_round(
        model,
        data,
        plan=plan,
        lr=cfg.lr,
        momentum=cfg.momentum,
        batch_size=cfg.batch_size,
        generator=generator,
        scheduler=scheduler,
        quant=quant,
        noise_multiplier=noise,
        max_grad_norm=cfg.max_grad_norm,
        ledger=ledger,
    )

    metrics: dict[str, int | float | list[int]] = {
        "num-examples": len(data),
        "train-loss": stats.loss,
        "server-round": server_round,
        "speedup": stats.speedup,
        "local-epochs": stats.epochs,
        "quantized-epochs": stats.quantized_epochs,
    }
    if scheduler is not None:
        context.state[SCHEDULER_STATE] = ConfigRecord(scheduler.to_dict())
    if dp is not None and ledger is not None and noise is not None:
        context.state[PRIVACY_STATE] = ConfigRecord(
            {**ledger.to_dict(), "noise-multiplier": noise}
        )
        metrics["epsilon"] = ledger.epsilon(delta=dp.target_delta)
        metrics["noise-multiplier"] = noise
    if store is not None:
        # Saved before the reply exists: a crash after this point over-counts, never under.
        store.save(
            {name: dict(context.state[name]) for name in PERSISTED_STATE if name in context.state}
        )
    return LocalRound(cfg, server_round, global_state, model.state_dict(), metrics, generator)


def _budget_exhausted(msg: Message, server_round: int, epsilon: float) -> Message:
    """A reply that says the client stopped training to stay within its budget."""
    metrics = MetricRecord(
        {"server-round": server_round, "budget-exhausted": 1, "epsilon": epsilon}
    )
    return Message(content=RecordDict({METRICS_KEY: metrics}), reply_to=msg)
