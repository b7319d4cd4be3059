"""Private local training through the real ClientApp handler and Context.state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from clients.client_app import PRIVACY_STATE, SCHEDULER_STATE, train
from fedquant.accounting import MechanismStep, PrivacyLedger
from fedquant.config import RunConfig
from fedquant.models import build_model
from fedquant.private import round_plan
from strategies.quantized import QuantizedStrategy


@pytest.mark.parametrize(("n", "batch"), [(12500, 32), (5000, 64), (1000, 64), (37, 8)])
def test_round_plan_charges_the_rate_opacus_charges(n: int, batch: int) -> None:
    """Oracle: the sample rate Opacus' own accountant records for this loader."""
    loader = DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=batch)
    model = torch.nn.Linear(1, 1)
    engine = PrivacyEngine(accountant="rdp")
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
    model = build_model(cfg.model, seed=cfg.seed)
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


CFG = RunConfig(
    num_server_rounds=3,
    local_steps=4,
    batch_size=32,
    target_epsilon=3.0,
    quant_train_ratio=0.5,
    dpquant_period=1,  # an estimate every epoch: its queries must be charged
)


def test_epsilon_is_cumulative_across_rounds_and_restarts() -> None:
    uninterrupted = new_context(CFG)
    epsilons = [run_client(CFG, uninterrupted, r).content["metrics"]["epsilon"] for r in (1, 2, 3)]
    assert epsilons[0] < epsilons[1] < epsilons[2] <= CFG.target_epsilon

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
    privacy = uninterrupted.state[PRIVACY_STATE]
    sigma = privacy["noise-multiplier"]
    plan = round_plan(1000, batch_size=32, epochs=1, max_steps=4)
    expected = PrivacyLedger(
        [
            MechanismStep(sigma, plan.sample_rate, 12),
            MechanismStep(CFG.dpquant_noise, CFG.dpquant_sample_rate, 3),
        ]
    ).epsilon(delta=CFG.target_delta)
    assert epsilons[-1] == pytest.approx(expected, rel=1e-9)
    steps_by_noise: dict[float, int] = {}
    for noise, steps in zip(privacy["noise"], privacy["steps"], strict=True):
        steps_by_noise[noise] = steps_by_noise.get(noise, 0) + steps
    assert steps_by_noise == {sigma: 12, CFG.dpquant_noise: 3}


def test_budget_is_never_exceeded_and_exhaustion_is_a_status() -> None:
    context = new_context(CFG)
    for r in (1, 2, 3):
        assert run_client(CFG, context, r).content["metrics"]["epsilon"] <= CFG.target_epsilon
    # A fourth round was not planned: training it would exceed the budget.
    before = dict(context.state[PRIVACY_STATE])
    reply = run_client(CFG, context, 4)
    metrics = reply.content["metrics"]
    assert metrics["budget-exhausted"] == 1 and set(reply.content.keys()) == {"metrics"}
    assert metrics["epsilon"] <= CFG.target_epsilon
    assert dict(context.state[PRIVACY_STATE]) == before  # nothing spent

    strategy = QuantizedStrategy()
    strategy._global = ArrayRecord(build_model(CFG.model, seed=0).state_dict())
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
    scheduler = context.state[SCHEDULER_STATE]
    assert scheduler["epochs_done"] == 3
    assert any(v != 0 for v in scheduler["sensitivity"])  # estimates were folded in


def test_impossible_target_is_reported() -> None:
    cfg = RunConfig(num_server_rounds=3, local_steps=4, batch_size=32, target_epsilon=1e-4)
    with pytest.raises(ValueError, match="cannot be met"):
        run_client(cfg, new_context(cfg), 1)
