"""Private local training through the real ClientApp handler and Context.state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from opacus.accountants import PRVAccountant
from torch.utils.data import DataLoader, TensorDataset

from clients.client_app import train
from fedquant.accounting import Accountant, MechanismStep, PrivacyLedger
from fedquant.config import RunConfig
from fedquant.models import build_model
from fedquant.node_state import PRIVACY_RECORD, SCHEDULER_RECORD
from fedquant.payload import REPLY_METRICS
from fedquant.training import private_engine, round_plan
from strategies.quantized import strategy_from_config


@pytest.mark.parametrize(("n", "batch"), [(12500, 32), (5000, 64), (1000, 64), (37, 8)])
def test_round_plan_charges_the_rate_opacus_charges(n: int, batch: int) -> None:
    """Oracle: the sample rate Opacus' own accountant records for this loader."""
    loader = DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=batch)
    model = torch.nn.Linear(1, 1)
    engine = private_engine(torch.Generator())  # Opacus' PrivacyEngine, as clients use it
    _, optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    model(torch.ones(3, 1)).sum().backward()
    optimizer.step()
    (_, opacus_rate, _), = engine.accountant.history
    plan = round_plan(n, batch_size=batch, epochs=1, max_steps=0)
    assert plan.sample_rate == opacus_rate
    assert plan.steps_per_epoch == len(dp_loader)


def run_client(cfg: RunConfig, context: Context, server_round: int) -> Message:
    model = build_model(cfg.train.model, seed=cfg.run.seed)
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "config": ConfigRecord({"server-round": server_round}),
        }
    )
    instruction = Message(content, dst_node_id=context.node_id, message_type=MessageType.TRAIN)
    instruction.metadata.__dict__["_message_id"] = f"round-{server_round}"
    return train(instruction, context)


def new_context(cfg: RunConfig, node_id: int = 7) -> Context:
    return Context(
        run_id=1,
        node_id=node_id,
        node_config={"partition-id": 0, "num-partitions": 50},  # 1,000 examples
        state=RecordDict(),
        run_config=cfg.to_flower(),
    )


CFG = RunConfig.from_flower({"num-server-rounds": 3, "local-steps": 4, "batch-size": 32, "target-epsilon": 3.0, "quant-train-ratio": 0.5, "dpquant-period": 1},  # an estimate every epoch: its queries must be charged
)


def test_epsilon_is_cumulative_across_rounds_and_restarts() -> None:
    uninterrupted = new_context(CFG)
    epsilons = [run_client(CFG, uninterrupted, r).content["metrics"]["epsilon"] for r in (1, 2, 3)]
    assert epsilons[0] < epsilons[1] < epsilons[2] <= CFG.dp.target_epsilon

    # A node that restarts every round: only what Context.state carries survives.
    restarted = new_context(CFG)
    for r in (1, 2, 3):
        state = RecordDict(
            {k: ConfigRecord(dict(v)) for k, v in restarted.state.items()}
        )
        restarted = Context(
            run_id=1, node_id=7, node_config=dict(restarted.node_config), state=state,
            run_config=CFG.to_flower(),
        )
        eps = run_client(CFG, restarted, r).content["metrics"]["epsilon"]
    assert eps == pytest.approx(epsilons[-1], rel=1e-12)

    # Independent recomputation from the recorded history: 3 rounds x 4 DP-SGD steps at
    # (sigma, q) plus one estimator query (sigma_a, q_a) per local epoch.
    privacy = uninterrupted.state[PRIVACY_RECORD]
    sigma = privacy["noise-multiplier"]
    plan = round_plan(1000, batch_size=32, epochs=1, max_steps=4)
    expected = PrivacyLedger(
        [
            MechanismStep(sigma, plan.sample_rate, 12),
            MechanismStep(CFG.dpquant.noise, CFG.dpquant.sample_rate, 3),
        ]
    ).epsilon(delta=CFG.dp.target_delta, accountant=CFG.dp.accountant)
    assert epsilons[-1] == pytest.approx(expected, rel=1e-9)
    # And by Opacus' own PRV accountant (the default), from the raw recorded lists.
    opacus = PRVAccountant()
    opacus.history = [
        (sigma, plan.sample_rate, 12),
        (CFG.dpquant.noise, CFG.dpquant.sample_rate, 3),
    ]
    assert epsilons[-1] == pytest.approx(opacus.get_epsilon(delta=CFG.dp.target_delta), rel=1e-9)
    steps_by_noise: dict[float, int] = {}
    for noise, steps in zip(privacy["noise"], privacy["steps"], strict=True):
        steps_by_noise[noise] = steps_by_noise.get(noise, 0) + steps
    assert steps_by_noise == {sigma: 12, CFG.dpquant.noise: 3}


@pytest.mark.parametrize("accountant", list(Accountant))
def test_budget_is_never_exceeded_and_exhaustion_is_a_status(accountant: Accountant) -> None:
    cfg = CFG.with_overrides({"accountant": accountant})
    context = new_context(cfg)
    for r in (1, 2, 3):
        assert run_client(cfg, context, r).content["metrics"]["epsilon"] <= cfg.dp.target_epsilon
    # A fourth round was not planned: training it would exceed the budget.
    before = dict(context.state[PRIVACY_RECORD])
    reply = run_client(cfg, context, 4)
    metrics = reply.content["metrics"]
    assert metrics["budget-exhausted"] == 1 and set(reply.content.keys()) == {"metrics"}
    assert metrics["epsilon"] <= cfg.dp.target_epsilon
    assert dict(context.state[PRIVACY_RECORD]) == before  # nothing spent

    strategy = strategy_from_config(cfg)
    strategy._global = ArrayRecord(build_model(CFG.train.model, seed=0).state_dict())
    new, round_metrics = strategy.aggregate_train(4, [reply])
    assert new is None
    assert round_metrics["budget-exhausted"] == 1
    assert round_metrics["rejected"] == 0 and round_metrics["failed"] == 0
    assert strategy.max_epsilon == metrics["epsilon"]


def test_dpquant_state_persists_and_rotates() -> None:
    context = new_context(CFG)
    layers = []
    for r in (1, 2, 3):
        metrics = run_client(CFG, context, r).content["metrics"]
        quantized = np.asarray(metrics["quantized-epochs"])
        assert quantized.sum() == 2  # k = round(0.5 * 4) layers, one epoch
        layers.append(tuple(np.flatnonzero(quantized)))
        assert metrics["speedup"] > 0
    scheduler = context.state[SCHEDULER_RECORD]
    assert scheduler["epochs_done"] == 3
    assert any(v != 0 for v in scheduler["sensitivity"])  # estimates were folded in


def test_impossible_target_is_reported() -> None:
    cfg = RunConfig.from_flower({"num-server-rounds": 3, "local-steps": 4, "batch-size": 32, "target-epsilon": 1e-4})
    with pytest.raises(ValueError, match="cannot be met"):
        run_client(cfg, new_context(cfg), 1)


def _reply_arrays(reply: Message) -> dict[str, bytes]:
    return {k: v.data for k, v in reply.content["codes"].items()}


def test_default_dp_noise_is_secret_and_seeded_noise_is_opt_in() -> None:
    """Same run seed, round and partition: the server's values. By default two runs still
    draw different noise and batches; only dp-noise-seeded reproduces them."""
    cfg = RunConfig.from_flower({"num-server-rounds": 1, "local-steps": 2, "batch-size": 32, "quant-policy": "none"})
    first, second = (run_client(cfg, new_context(cfg), 1) for _ in range(2))
    assert _reply_arrays(first) != _reply_arrays(second)

    seeded = cfg.with_overrides({"dp-noise-seeded": True})
    assert seeded.privacy_warning is not None and "not hold against the server" in (
        seeded.privacy_warning
    )
    first, second = (run_client(seeded, new_context(seeded), 1) for _ in range(2))
    assert _reply_arrays(first) == _reply_arrays(second)


def test_private_engine_uses_opacus_secure_noise_and_the_given_generator() -> None:
    rng = torch.Generator().manual_seed(123)
    model = torch.nn.Linear(4, 2)
    loader = DataLoader(TensorDataset(torch.randn(64, 4), torch.zeros(64, dtype=torch.long)), 8)
    _, optimizer, dp_loader = private_engine(rng).make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    assert optimizer.secure_mode is True  # Opacus' floating-point-attack-safe sampler
    assert optimizer.generator is rng and dp_loader.batch_sampler.generator is rng


@pytest.mark.parametrize("dp", [True, False])
def test_reply_metrics_are_exactly_the_allowed_set(dp: bool) -> None:
    cfg = CFG.with_overrides({"dp": dp})
    metrics = run_client(cfg, new_context(cfg), 1).content["metrics"]
    private_only = {"epsilon", "noise-multiplier"}
    assert set(metrics.keys()) == (REPLY_METRICS if dp else REPLY_METRICS - private_only)
    assert "train-loss" not in REPLY_METRICS


def test_reply_metrics_do_not_depend_on_the_secret_randomness() -> None:
    """Two runs differ only in the OS-entropy draws (noise, Poisson batches): every
    metric is identical, so none of them reveals a realised batch or a loss."""
    cfg = CFG.with_overrides({"quant-policy": "random"})
    first, second = (run_client(cfg, new_context(cfg), 1) for _ in range(2))
    assert _reply_arrays(first) != _reply_arrays(second)
    assert dict(first.content["metrics"]) == dict(second.content["metrics"])
