"""The fedquant ClientApp (Flower Message API).

One training round on a client: load the global weights, train locally on this node's
partition — DP-SGD with Opacus when ``dp`` is on, with DPQuant choosing which layers run
in low precision each epoch — then upload the quantized update Δ = w_local − w_global
(or the quantized local weights) as packed codes plus per-tensor clip, bits and MSE.

Privacy state (:class:`~fedquant.node_state.NodeState`) lives in the node's
``Context.state`` and persists across rounds: the ledger of every mechanism application
(so ε is cumulative), the noise multiplier calibrated once for the whole run, and
DPQuant's sensitivity EMA and epoch counter. With a state directory (node config
``state-dir`` in deployment, run config ``client-state-dir`` in simulation) the same
records are also written to disk, atomically, before the reply leaves the node, and read
back when the node starts with an empty state: a SuperNode killed and restarted goes on
from the ε it had spent; a damaged or incomplete file stops it (NodeStateError).
A client whose next round would exceed its (ε, δ) budget does not train; it replies
with a ``budget-exhausted`` status instead of an update.

What leaves the node (threat model: README "Privacy"): the DP-SGD output, quantized
(post-processing), and the metrics in ``fedquant.reply.REPLY_METRICS``, none of them
computed from the examples except through a charged mechanism. The randomness that
protects the examples is drawn from OS entropy (:func:`privacy_generator`), never from
values the server knows.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedquant.accounting import PrivacyLedger
from fedquant.config import PayloadMode, RunConfig
from fedquant.data import Split, load_partition
from fedquant.dpquant import LayerScheduler
from fedquant.fakequant import QConv2d, QLinear, quantizable_layers
from fedquant.models import build_model
from fedquant.node_state import RECORDS, NodeState, NodeStateStore, PrivacyRecord
from fedquant.reply import (
    ARRAYS_KEY,
    CONFIG_KEY,
    EPSILON,
    LOCAL_EPOCHS,
    NOISE_MULTIPLIER,
    NUM_EXAMPLES,
    QUANTIZED_EPOCHS,
    SERVER_ROUND,
    SPEEDUP,
    encode_budget_exhausted,
    encode_reply,
)
from fedquant.seeds import node_seed
from fedquant.training import (
    LayerQuantization,
    PrivateTraining,
    calibrate_client_noise,
    client_round_plan,
    planned_mechanisms,
    train_round,
)

# Spawn key of the (opt-in, non-private) seeded DP noise stream; see privacy_generator.
_SEEDED_NOISE_STREAM = 1

app = ClientApp()


def privacy_generator(cfg: RunConfig, server_round: int, partition_id: int) -> torch.Generator:
    """The source of every random draw that protects this node's examples.

    DP-SGD's noise, its Poisson batches and the DPQuant estimator's subsample and noise
    are only private against the server if the server cannot reproduce them, so a
    private client seeds this generator with 64 bits from the OS CSPRNG (``secrets``),
    never from the run seed, round or partition id the server chose. Only with the
    explicit ``dp-noise-seeded = true`` (reproducible experiments, not private against
    the server; the launcher and results.json warn) is it derived from those, and
    likewise without DP, where nothing is protected.
    """
    if cfg.dp.enabled and not cfg.dp.noise_seeded:
        return torch.Generator().manual_seed(secrets.randbits(64))
    return torch.Generator().manual_seed(
        node_seed(cfg.run.seed, server_round, partition_id, _SEEDED_NOISE_STREAM)
    )


def node_partition(context: Context, cfg: RunConfig) -> tuple[int, Split]:
    """This node's partition id and data, as given by its node config."""
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    data = load_partition(
        partition_id,
        num_partitions=num_partitions,
        partitioning=cfg.train.partitioning,
        alpha=cfg.train.dirichlet_alpha,
        seed=cfg.run.seed,
    )
    return partition_id, data


def node_state_store(context: Context, cfg: RunConfig, partition_id: int) -> NodeStateStore | None:
    """Where this node persists its privacy state, or None to keep it in memory only.

    A deployed SuperNode names its own directory (node config ``state-dir``); in
    simulation every partition gets ``client-state-dir/partition-<id>``.
    """
    if node_dir := context.node_config.get("state-dir"):
        return NodeStateStore(str(node_dir))
    if cfg.run.client_state_dir:
        return NodeStateStore(Path(cfg.run.client_state_dir) / f"partition-{partition_id}")
    return None


def node_state(context: Context, store: NodeStateStore | None, *, private: bool) -> NodeState:
    """This node's state, from memory or from its state file.

    From ``Context.state`` while the process lives, else (after a start or restart) from
    its state file; fails closed (NodeStateError) on damage.
    """
    if any(name in context.state for name in RECORDS):
        records = {name: dict(context.state[name]) for name in RECORDS if name in context.state}
        return NodeState.from_records(records, source="Context.state")
    loaded = store.load(require_privacy=private) if store is not None else None
    return loaded if loaded is not None else NodeState()


@dataclass
class LocalRound:
    """One round of local training: the weights before and after, and its metrics.

    ``exhausted_epsilon`` is set (and nothing trained) when the round would have
    exceeded the node's privacy budget.
    """

    cfg: RunConfig
    server_round: int
    partition_id: int
    global_state: dict[str, torch.Tensor]
    local_state: dict[str, torch.Tensor]
    metrics: dict[str, int | float | list[int] | list[float]]
    exhausted_epsilon: float | None = None


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on the local partition and reply with the quantized update."""
    result = local_train(msg, context)
    if result.exhausted_epsilon is not None:
        return _budget_exhausted(msg, result.server_round, result.exhausted_epsilon)
    return quantized_reply(msg, result)


def quantized_reply(msg: Message, result: LocalRound) -> Message:
    """The reply to a round within budget: Δ (or the local weights) as packed codes."""
    cfg, global_state, local_state = result.cfg, result.global_state, result.local_state
    if cfg.codec.payload is PayloadMode.UPDATE:
        tensors = {k: local_state[k] - global_state[k] for k in global_state}
    else:
        tensors = dict(local_state)
    # Stochastic rounding of a DP output is post-processing: seeded, so runs reproduce.
    rounding_rng = torch.Generator().manual_seed(
        node_seed(cfg.run.seed, result.server_round, result.partition_id)
    )
    content = encode_reply(
        tensors,
        result.metrics,
        bits=cfg.codec.bits,
        clip=cfg.codec.clip,
        rounding=cfg.codec.rounding,
        generator=rounding_rng,
    )
    return Message(content=content, reply_to=msg)


def local_train(msg: Message, context: Context) -> LocalRound:
    """Load the global weights, train on this node's partition, update its state."""
    torch.set_num_threads(1)  # one simulated client per core; faster than 2 here
    cfg = RunConfig.from_flower(context.run_config)
    server_round = msg.content.config_records[CONFIG_KEY][SERVER_ROUND]
    if isinstance(server_round, bool) or not isinstance(server_round, int):
        raise ValueError(f"instruction {SERVER_ROUND!r} must be an integer, got {server_round!r}")
    partition_id, data = node_partition(context, cfg)
    store = node_state_store(context, cfg, partition_id)
    private = cfg.dp.enabled
    state = node_state(context, store, private=private)

    global_state = msg.content.array_records[ARRAYS_KEY].to_torch_state_dict()
    model = build_model(cfg.train.model, seed=cfg.run.seed)
    model.load_state_dict(global_state)
    for layer in model.modules():
        if isinstance(layer, QLinear | QConv2d):
            layer.act_scale = cfg.dpquant.act_scale

    plan = client_round_plan(cfg.train, len(data))
    scheduler = state.scheduler
    quantization = None
    if cfg.dpquant.active:
        if scheduler is None:
            scheduler = LayerScheduler.from_settings(
                cfg.dpquant,
                n_layers=len(quantizable_layers(model)),
                seed=node_seed(cfg.run.seed, partition_id),
            )
        quantization = LayerQuantization(cfg.dpquant, scheduler)
    privacy = None
    if private:
        if state.privacy is None:
            # Calibrated once, for every round the run plans; never re-derived.
            noise = calibrate_client_noise(
                plan, rounds=cfg.run.num_server_rounds, dp=cfg.dp, quant=cfg.dpquant
            )
            ledger = PrivacyLedger()
        else:
            noise, ledger = state.privacy.noise_multiplier, state.privacy.ledger
        this_round = planned_mechanisms(
            plan,
            rounds=1,
            noise=noise,
            quant=cfg.dpquant,
            epochs_before=scheduler.epochs_done if scheduler else 0,
        )
        delta, accountant = cfg.dp.target_delta, cfg.dp.accountant
        if ledger.epsilon_if(*this_round, delta=delta, accountant=accountant) > (
            cfg.dp.target_epsilon
        ):
            return LocalRound(
                cfg,
                server_round,
                partition_id,
                global_state,
                global_state,
                {},
                exhausted_epsilon=ledger.epsilon(delta=delta, accountant=accountant),
            )
        privacy = PrivateTraining(noise, cfg.dp.max_grad_norm, ledger)

    stats = train_round(
        model,
        data,
        plan=plan,
        train=cfg.train,
        privacy=privacy,
        quantization=quantization,
        privacy_rng=privacy_generator(cfg, server_round, partition_id),
    )

    metrics: dict[str, int | float | list[int] | list[float]] = {
        NUM_EXAMPLES: len(data),
        SERVER_ROUND: server_round,
        SPEEDUP: stats.speedup,
        LOCAL_EPOCHS: stats.epochs,
        QUANTIZED_EPOCHS: stats.quantized_epochs,
    }
    privacy_record = state.privacy
    if privacy is not None:
        privacy_record = PrivacyRecord(privacy.ledger, privacy.noise_multiplier)
        metrics[EPSILON] = privacy.ledger.epsilon(
            delta=cfg.dp.target_delta, accountant=cfg.dp.accountant
        )
        metrics[NOISE_MULTIPLIER] = privacy.noise_multiplier
    new_state = NodeState(privacy=privacy_record, scheduler=scheduler)
    for name, record in new_state.to_records().items():
        context.state[name] = ConfigRecord(record)
    if store is not None:
        # Saved before the reply exists: a crash after this point over-counts, never under.
        store.save(new_state)
    return LocalRound(cfg, server_round, partition_id, global_state, model.state_dict(), metrics)


def _budget_exhausted(msg: Message, server_round: int, epsilon: float) -> Message:
    """A reply that says the client stopped training to stay within its budget."""
    content = encode_budget_exhausted(server_round=server_round, epsilon=epsilon)
    return Message(content=content, reply_to=msg)
