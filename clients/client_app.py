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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedquant.accounting import PrivacyLedger
from fedquant.config import PayloadMode, RunConfig
from fedquant.data import Split, load_partition
from fedquant.downlink import BASE, DIGEST, VERSION, DownlinkError, apply_deltas
from fedquant.dpquant import LayerScheduler
from fedquant.fakequant import QConv2d, QLinear, quantizable_layers
from fedquant.models import build_model
from fedquant.node_state import (
    PRIVACY_RECORD,
    SCHEDULER_RECORD,
    NodeState,
    NodeStateStore,
    NodeTensors,
    PrivacyRecord,
)
from fedquant.payload import decode_update, needs_seed
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
# Spawn key of the public per-reply seed of the rotation and dither (fedquant.payload).
_CODEC_SEED_STREAM = 2
# Context.state records of the node's codec tensors (NodeTensors).
_JSON_RECORDS = (PRIVACY_RECORD, SCHEDULER_RECORD)
_RESIDUAL_RECORD = "fedquant.residual"
_MODEL_RECORD = "fedquant.model"
_MODEL_VERSION_RECORD = "fedquant.model-version"
_ANY_CLIP = 1e38  # the node decodes its own reply: no cap on the clip it chose

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
    names = (*_JSON_RECORDS, _MODEL_VERSION_RECORD, _RESIDUAL_RECORD)
    if any(name in context.state for name in names):
        records = {
            name: dict(context.state[name]) for name in _JSON_RECORDS if name in context.state
        }
        return NodeState.from_records(
            records, source="Context.state", tensors=_tensors_from_context(context.state)
        )
    loaded = store.load(require_privacy=private) if store is not None else None
    return loaded if loaded is not None else NodeState()


def keep_node_state(context: Context, store: NodeStateStore | None, state: NodeState) -> None:
    """Put ``state`` into ``Context.state`` and, with a store, on disk (atomically)."""
    for name, record in state.to_records().items():
        context.state[name] = ConfigRecord(record)
    tensors = state.tensors
    if tensors.residual:
        context.state[_RESIDUAL_RECORD] = _array_record(tensors.residual)
    if tensors.model_round is not None:
        context.state[_MODEL_RECORD] = _array_record(tensors.model)
        context.state[_MODEL_VERSION_RECORD] = ConfigRecord({"version": tensors.model_round})
    if store is not None:
        # Saved before the reply exists: a crash after this point over-counts, never under.
        store.save(state)


def _array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in arrays.items()})


def _tensors_from_context(state: RecordDict) -> NodeTensors:
    residual = {}
    if _RESIDUAL_RECORD in state:
        residual = {k: v.numpy() for k, v in state.array_records[_RESIDUAL_RECORD].items()}
    if _MODEL_VERSION_RECORD not in state:
        return NodeTensors(residual=residual)
    version = state.config_records[_MODEL_VERSION_RECORD]["version"]
    model = {k: v.numpy() for k, v in state.array_records[_MODEL_RECORD].items()}
    assert isinstance(version, int)
    return NodeTensors(residual=residual, model=model, model_round=version)


def received_model(
    msg: Message, cfg: RunConfig, copy: NodeTensors
) -> tuple[dict[str, torch.Tensor], NodeTensors]:
    """The global model an instruction carries, and the node's copy of it to keep.

    A float32 model (``ARRAYS_KEY``) is used as it is; quantized deltas
    (:mod:`fedquant.downlink`) are applied to the copy this node holds, which must be
    at their base version (version 0, the run-seeded initial model, is rebuilt when
    the node holds none) and must hash to the server's digest. A node without the
    base it needs raises ``DownlinkError``: the server then sends it the float32 model.
    """
    config = msg.content.config_records[CONFIG_KEY]
    if ARRAYS_KEY in msg.content:
        state = msg.content.array_records[ARRAYS_KEY].to_torch_state_dict()
        if VERSION not in config:
            return state, copy
        sent_version = config[VERSION]
        assert isinstance(sent_version, int)
        arrays = {k: v.numpy() for k, v in state.items()}
        return state, replace(copy, model=arrays, model_round=sent_version)
    base, version, digest = config.get(BASE), config.get(VERSION), config.get(DIGEST)
    if not (isinstance(base, int) and isinstance(version, int) and isinstance(digest, str)):
        raise DownlinkError(f"instruction without a model or {BASE}/{VERSION}/{DIGEST}")
    model = copy.model
    if copy.model_round != base:
        if base != 0:
            raise DownlinkError(
                f"the server sent deltas from version {base}, this node holds {copy.model_round}"
            )
        seeded = build_model(cfg.train.model, seed=cfg.run.seed).state_dict()
        model = {k: v.detach().numpy() for k, v in seeded.items()}
    arrays = apply_deltas(
        model, msg.content, base=base, version=version, digest=digest, rotation=cfg.codec.rotation
    )
    rebuilt = {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
    return rebuilt, replace(copy, model=arrays, model_round=version)


@dataclass
class LocalRound:
    """One round of local training: the weights before and after, and its metrics.

    ``exhausted_epsilon`` is set (and nothing trained) when the round would have
    exceeded the node's privacy budget. ``state`` is the node's state after the round
    (already kept), ``context`` and ``store`` where it is kept.
    """

    cfg: RunConfig
    server_round: int
    partition_id: int
    global_state: dict[str, torch.Tensor]
    local_state: dict[str, torch.Tensor]
    metrics: dict[str, int | float | list[int] | list[float]]
    state: NodeState
    context: Context
    store: NodeStateStore | None
    exhausted_epsilon: float | None = None


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on the local partition and reply with the quantized update."""
    result = local_train(msg, context)
    if result.exhausted_epsilon is not None:
        return _budget_exhausted(msg, result.server_round, result.exhausted_epsilon)
    return quantized_reply(msg, result)


def quantized_reply(msg: Message, result: LocalRound) -> Message:
    """The reply to a round within budget: Δ (or the local weights) as packed codes.

    With error feedback the node sends ``Q(Δ + e)`` and keeps ``e <- Δ + e - deq(Q(Δ + e))``
    (decoded exactly as the server will), saved with its state before the reply leaves.
    """
    cfg, global_state, local_state = result.cfg, result.global_state, result.local_state
    if cfg.codec.payload is PayloadMode.UPDATE:
        tensors = {k: local_state[k] - global_state[k] for k in global_state}
    else:
        tensors = dict(local_state)
    residual = result.state.tensors.residual if cfg.codec.error_feedback else {}
    if residual:
        tensors = {k: v + torch.from_numpy(residual[k]) for k, v in tensors.items()}
    # Stochastic rounding and the rotation/dither of a DP output are post-processing:
    # seeded (and the seed public), so runs reproduce and the server can invert them.
    rounding_rng = torch.Generator().manual_seed(
        node_seed(cfg.run.seed, result.server_round, result.partition_id)
    )
    codec = cfg.codec
    seed = node_seed(cfg.run.seed, result.server_round, result.partition_id, _CODEC_SEED_STREAM)
    content = encode_reply(
        tensors,
        result.metrics,
        bits=codec.bits,
        clip=codec.clip,
        rounding=codec.rounding,
        generator=rounding_rng,
        rotation=codec.rotation,
        unbiased_scale=codec.unbiased_scale,
        entropy_coding=codec.entropy_coding,
        seed=seed if needs_seed(rotation=codec.rotation, rounding=codec.rounding) else None,
    )
    if codec.error_feedback:
        sent = decode_update(
            content, max_clip=_ANY_CLIP, rotation=codec.rotation, rounding=codec.rounding
        )
        new_residual = {
            k: (v.detach().numpy().astype(np.float32) - sent[k].values).astype(np.float32)
            for k, v in tensors.items()
        }
        state = replace(result.state, tensors=replace(result.state.tensors, residual=new_residual))
        keep_node_state(result.context, result.store, state)
    return Message(content=content, reply_to=msg)


@dataclass
class Instruction:
    """A training instruction as the node received it: the model decoded, its state loaded."""

    cfg: RunConfig
    server_round: int
    partition_id: int
    data: Split
    store: NodeStateStore | None
    state: NodeState
    global_state: dict[str, torch.Tensor]


def receive(msg: Message, context: Context) -> Instruction:
    """Read the instruction: the round, this node's data and state, the global model."""
    torch.set_num_threads(1)  # one simulated client per core; faster than 2 here
    cfg = RunConfig.from_flower(context.run_config)
    server_round = msg.content.config_records[CONFIG_KEY][SERVER_ROUND]
    if isinstance(server_round, bool) or not isinstance(server_round, int):
        raise ValueError(f"instruction {SERVER_ROUND!r} must be an integer, got {server_round!r}")
    partition_id, data = node_partition(context, cfg)
    store = node_state_store(context, cfg, partition_id)
    state = node_state(context, store, private=cfg.dp.enabled)
    global_state, tensors = received_model(msg, cfg, state.tensors)
    if tensors is not state.tensors:
        state = replace(state, tensors=tensors)
    return Instruction(cfg, server_round, partition_id, data, store, state, global_state)


def local_train(msg: Message, context: Context) -> LocalRound:
    """Load the global weights, train on this node's partition, update its state."""
    return train_received(receive(msg, context), context)


def train_received(received: Instruction, context: Context) -> LocalRound:
    """Train on this node's partition from the received model; keep the node's state."""
    cfg, server_round, partition_id = received.cfg, received.server_round, received.partition_id
    data, store, state, global_state = (
        received.data,
        received.store,
        received.state,
        received.global_state,
    )
    private = cfg.dp.enabled
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
            keep_node_state(context, store, state)  # the model copy it received
            return LocalRound(
                cfg,
                server_round,
                partition_id,
                global_state,
                global_state,
                {},
                state,
                context,
                store,
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
    new_state = NodeState(privacy=privacy_record, scheduler=scheduler, tensors=state.tensors)
    keep_node_state(context, store, new_state)
    return LocalRound(
        cfg,
        server_round,
        partition_id,
        global_state,
        model.state_dict(),
        metrics,
        new_state,
        context,
        store,
    )


def _budget_exhausted(msg: Message, server_round: int, epsilon: float) -> Message:
    """A reply that says the client stopped training to stay within its budget."""
    content = encode_budget_exhausted(server_round=server_round, epsilon=epsilon)
    return Message(content=content, reply_to=msg)
