"""Private local training through the real ClientApp handler and Context.state."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from opacus.accountants import PRVAccountant
from torch.utils.data import DataLoader, TensorDataset

from fedquant.accounting import Accountant, MechanismStep, PrivacyLedger
from fedquant.config import ConfigError, QuantPolicy, RunConfig
from fedquant.data import Split
from fedquant.dpquant import LayerScheduler, selection_probabilities
from fedquant.models import build_model
from fedquant.node_state import PRIVACY_RECORD, SCHEDULER_RECORD
from fedquant.reply import REPLY_METRICS
from fedquant.seeds import node_seed
from fedquant.training import (
    LayerQuantization,
    PrivateTraining,
    calibrate_client_noise,
    client_round_plan,
    planned_mechanisms,
    private_engine,
    round_plan,
    train_round,
    validate_privacy_plan,
)
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
    ((_, opacus_rate, _),) = engine.accountant.history
    plan = round_plan(n, batch_size=batch, epochs=1, max_steps=0)
    assert plan.sample_rate == opacus_rate
    assert plan.steps_per_epoch == len(dp_loader)


ClientContext = Callable[..., Context]
RunClient = Callable[[RunConfig, Context, int], Message]


def test_epsilon_is_cumulative_across_rounds_and_restarts(
    private_cfg: RunConfig, client_context: ClientContext, run_client: RunClient
) -> None:
    cfg = private_cfg
    uninterrupted = client_context(cfg)
    epsilons = [run_client(cfg, uninterrupted, r).content["metrics"]["epsilon"] for r in (1, 2, 3)]
    assert epsilons[0] < epsilons[1] < epsilons[2] <= cfg.dp.target_epsilon

    # A node that restarts every round: only what Context.state carries survives.
    restarted = client_context(cfg)
    for r in (1, 2, 3):
        state = RecordDict({k: ConfigRecord(dict(v)) for k, v in restarted.state.items()})
        restarted = Context(
            run_id=1,
            node_id=7,
            node_config=dict(restarted.node_config),
            state=state,
            run_config=cfg.to_flower(),
        )
        eps = run_client(cfg, restarted, r).content["metrics"]["epsilon"]
    assert eps == pytest.approx(epsilons[-1], rel=1e-12)

    # Independent recomputation from the recorded history: 3 rounds x 4 DP-SGD steps at
    # (sigma, q) plus one estimator query (sigma_a, q_a) per local epoch.
    privacy = uninterrupted.state[PRIVACY_RECORD]
    sigma = privacy["noise-multiplier"]
    plan = round_plan(1000, batch_size=32, epochs=1, max_steps=4)
    expected = PrivacyLedger(
        [
            MechanismStep(sigma, plan.sample_rate, 12),
            MechanismStep(cfg.dpquant.noise, cfg.dpquant.sample_rate, 3),
        ]
    ).epsilon(delta=cfg.dp.target_delta, accountant=cfg.dp.accountant)
    assert epsilons[-1] == pytest.approx(expected, rel=1e-9)
    # And by Opacus' own PRV accountant (the default), from the raw recorded lists.
    opacus = PRVAccountant()
    opacus.history = [
        (sigma, plan.sample_rate, 12),
        (cfg.dpquant.noise, cfg.dpquant.sample_rate, 3),
    ]
    assert epsilons[-1] == pytest.approx(opacus.get_epsilon(delta=cfg.dp.target_delta), rel=1e-9)
    steps_by_noise: dict[float, int] = {}
    for noise, steps in zip(privacy["noise"], privacy["steps"], strict=True):
        steps_by_noise[noise] = steps_by_noise.get(noise, 0) + steps
    assert steps_by_noise == {sigma: 12, cfg.dpquant.noise: 3}


@pytest.mark.parametrize("accountant", list(Accountant))
def test_budget_is_never_exceeded_and_exhaustion_is_a_status(
    accountant: Accountant,
    private_cfg: RunConfig,
    client_context: ClientContext,
    run_client: RunClient,
) -> None:
    cfg = private_cfg.with_overrides({"accountant": accountant})
    context = client_context(cfg)
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
    strategy.set_global_model(ArrayRecord(build_model(cfg.train.model, seed=0).state_dict()))
    new, round_metrics = strategy.aggregate_train(4, [reply])
    assert new is None
    assert round_metrics["budget-exhausted"] == 1
    assert round_metrics["rejected"] == 0 and round_metrics["failed"] == 0
    assert strategy.max_epsilon == metrics["epsilon"]


def _subset_probability(pi: np.ndarray, subset: tuple[int, ...]) -> float:
    """P(successive sampling without replacement from π draws exactly ``subset``)."""
    total = 0.0
    for order in itertools.permutations(subset):
        prob, left = 1.0, 1.0
        for i in order:
            prob *= pi[i] / left
            left -= pi[i]
        total += prob
    return total


@pytest.mark.parametrize("policy", [QuantPolicy.RANDOM, QuantPolicy.DPQUANT])
def test_dpquant_state_persists_and_rotates(
    policy: QuantPolicy,
    private_cfg: RunConfig,
    client_context: ClientContext,
    run_client: RunClient,
) -> None:
    """The schedule persists in Context.state across rounds, and its subsets rotate.

    One epoch a round, k = round(0.5 · 4) = 2 of the CNN's 4 layers. Oracle: the
    schedule saved after round r, rewound to epoch r - 1, draws round r's layers again
    (for DPQUANT with the EMA L_r the draw used: the estimate precedes the draw).
    Rotation: with seeded noise the run is reproducible, so the check is deterministic;
    its chance to fail for a correct scheduler, over the seed, is the probability that
    three epochs draw one subset, Σ_S Π_r P_r(S): 6 · (1/6)³ = 1/36 for RANDOM (uniform
    2-subsets of 4); for DPQUANT it is computed from the recorded π_r = softmax(-β L_r)
    (0.028 with this seed) and must stay below 0.05. A schedule that is not carried
    over (epoch 0 drawn every round) repeats one subset with certainty under RANDOM.
    """
    cfg = private_cfg.with_overrides({"quant-policy": policy.value, "dp-noise-seeded": True})
    context = client_context(cfg)
    layers: list[tuple[int, ...]] = []
    saved: list[dict[str, object]] = []
    for r in (1, 2, 3):
        metrics = run_client(cfg, context, r).content["metrics"]
        quantized = np.asarray(metrics["quantized-epochs"])
        assert quantized.sum() == 2  # k = round(0.5 * 4) layers, one epoch
        layers.append(tuple(int(i) for i in np.flatnonzero(quantized)))
        assert metrics["speedup"] > 0
        saved.append(dict(context.state[SCHEDULER_RECORD]))
    scheduler = context.state[SCHEDULER_RECORD]
    assert scheduler["epochs_done"] == 3
    if policy is QuantPolicy.DPQUANT:
        assert any(v != 0 for v in scheduler["sensitivity"])  # estimates were folded in
    else:
        assert all(v == 0 for v in scheduler["sensitivity"])  # RANDOM runs no estimator

    # Seeded from (run seed, partition id), with the run's DPQuant settings.
    fresh = LayerScheduler.from_settings(cfg.dpquant, n_layers=4, seed=node_seed(cfg.run.seed, 0))
    assert {k: saved[0][k] for k in ("seed", "policy", "ratio", "beta", "alpha")} == {
        k: fresh.to_dict()[k] for k in ("seed", "policy", "ratio", "beta", "alpha")
    }
    for epoch, (state, chosen) in enumerate(zip(saved, layers, strict=True)):
        replay = LayerScheduler.from_dict({**state, "epochs_done": epoch})
        assert tuple(replay.next_epoch()) == chosen

    subsets = list(itertools.combinations(range(4), 2))
    pis = [
        selection_probabilities(np.asarray(state["sensitivity"]), beta=cfg.dpquant.beta)
        for state in saved
    ]
    repeat = sum(np.prod([_subset_probability(pi, s) for pi in pis]) for s in subsets)
    if policy is QuantPolicy.RANDOM:
        assert repeat == pytest.approx(1 / 36)
    else:  # β = 5 and |L| of a few hundredths: π within ~30% of uniform, repeat ≈ 1/36
        assert repeat < 0.05
    assert len(set(layers)) > 1


def test_impossible_target_is_reported(
    client_context: ClientContext, run_client: RunClient
) -> None:
    cfg = RunConfig.from_flower(
        {"num-server-rounds": 3, "local-steps": 4, "batch-size": 32, "target-epsilon": 1e-4}
    )
    with pytest.raises(ValueError, match="cannot be met"):
        run_client(cfg, client_context(cfg), 1)


def _reply_arrays(reply: Message) -> dict[str, bytes]:
    return {k: v.data for k, v in reply.content["codes"].items()}


def test_default_dp_noise_is_secret_and_seeded_noise_is_opt_in(
    client_context: ClientContext, run_client: RunClient
) -> None:
    """Same run seed, round and partition: the server's values.

    By default two runs still draw different noise and batches; only dp-noise-seeded
    reproduces them.
    """
    cfg = RunConfig.from_flower(
        {"num-server-rounds": 1, "local-steps": 2, "batch-size": 32, "quant-policy": "none"}
    )
    first, second = (run_client(cfg, client_context(cfg), 1) for _ in range(2))
    assert _reply_arrays(first) != _reply_arrays(second)

    seeded = cfg.with_overrides({"dp-noise-seeded": True})
    assert seeded.privacy_warning is not None and "not hold against the server" in (
        seeded.privacy_warning
    )
    first, second = (run_client(seeded, client_context(seeded), 1) for _ in range(2))
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
def test_reply_metrics_are_exactly_the_allowed_set(
    dp: bool, private_cfg: RunConfig, client_context: ClientContext, run_client: RunClient
) -> None:
    cfg = private_cfg.with_overrides({"dp": dp})
    metrics = run_client(cfg, client_context(cfg), 1).content["metrics"]
    private_only = {"epsilon", "noise-multiplier"}
    assert set(metrics.keys()) == (REPLY_METRICS if dp else REPLY_METRICS - private_only)
    assert "train-loss" not in REPLY_METRICS


def test_reply_metrics_do_not_depend_on_the_secret_randomness(
    private_cfg: RunConfig, client_context: ClientContext, run_client: RunClient
) -> None:
    """Two runs differ only in the OS-entropy draws (noise, Poisson batches).

    Every metric is identical, so none of them reveals a realised batch or a loss.
    """
    cfg = private_cfg.with_overrides({"quant-policy": "random"})
    first, second = (run_client(cfg, client_context(cfg), 1) for _ in range(2))
    assert _reply_arrays(first) != _reply_arrays(second)
    assert dict(first.content["metrics"]) == dict(second.content["metrics"])


def _tiny_split(n: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))


@pytest.mark.parametrize("private", [True, False])
def test_train_round_charges_exactly_what_the_plan_budgets(private: bool) -> None:
    """The ledger after a round holds exactly ``planned_mechanisms`` of that round.

    The client's budget check before training uses the plan; training then records
    Opacus' own steps and one estimator query per P epochs. 200 examples, expected batch
    50 (q = 1/4, 4 steps an epoch), 2 epochs, an estimate every epoch: 8 steps at (σ, q)
    and 2 queries at (σ_a, q_a). Without DP nothing is recorded anywhere.
    """
    cfg = RunConfig.from_flower(
        {"batch-size": 50, "local-epochs": 2, "local-steps": 0, "dpquant-period": 1, "dp": private}
    )
    data = _tiny_split(200, seed=0)
    plan = client_round_plan(cfg.train, len(data))
    model = build_model(cfg.train.model, seed=0)
    scheduler = LayerScheduler.from_settings(cfg.dpquant, n_layers=4, seed=1)
    ledger = PrivacyLedger()
    privacy = PrivateTraining(1.3, cfg.dp.max_grad_norm, ledger) if private else None
    stats = train_round(
        model,
        data,
        plan=plan,
        train=cfg.train,
        privacy=privacy,
        quantization=LayerQuantization(cfg.dpquant, scheduler),
        privacy_rng=torch.Generator().manual_seed(2),
    )
    assert (stats.epochs, stats.steps, scheduler.epochs_done) == (2, 8, 2)
    assert stats.quantized_epochs is not None and sum(stats.quantized_epochs) == 2 * 2
    expected = planned_mechanisms(plan, rounds=1, noise=1.3, quant=cfg.dpquant)
    assert expected == [MechanismStep(1.3, 0.25, 8), MechanismStep(3.0, 0.05, 2)]
    if private:
        # Estimates are recorded as they run, the steps after the round: order aside
        # (ε composes in any order), the same entries.
        key = lambda e: (e.noise_multiplier, e.sample_rate)  # noqa: E731
        assert sorted(ledger.history, key=key) == sorted(expected, key=key)
    else:
        assert len(ledger) == 0
    assert any(v != 0 for v in scheduler.sensitivity)  # estimates ran either way


def test_round_inputs_are_validated() -> None:
    cfg = RunConfig()
    with pytest.raises(ValueError, match="`noise_multiplier`"):
        PrivateTraining(0.0, 1.0, PrivacyLedger())
    with pytest.raises(ValueError, match="`max_grad_norm`"):
        PrivateTraining(1.0, float("nan"), PrivacyLedger())
    scheduler = LayerScheduler.from_settings(cfg.dpquant, n_layers=3, seed=0)
    off = cfg.with_overrides({"quant-policy": "none"}).dpquant
    with pytest.raises(ValueError, match="quantize no layer"):
        LayerQuantization(off, scheduler)
    with pytest.raises(ValueError, match="the schedule has 3 layers, the model 4"):
        train_round(
            build_model(cfg.train.model, seed=0),
            _tiny_split(8, seed=0),
            plan=round_plan(8, batch_size=4, epochs=1, max_steps=1),
            train=cfg.train,
            privacy=None,
            quantization=LayerQuantization(cfg.dpquant, scheduler),
            privacy_rng=torch.Generator(),
        )
    with pytest.raises(ValueError, match="`dp` is off"):
        calibrate_client_noise(
            round_plan(8, batch_size=4, epochs=1, max_steps=1),
            rounds=1,
            dp=cfg.with_overrides({"dp": False}).dp,
            quant=cfg.dpquant,
        )


def test_the_server_refuses_an_impossible_target_before_any_client_starts() -> None:
    validate_privacy_plan(RunConfig.from_flower({"num-supernodes": 2, "dp": False}))
    validate_privacy_plan(RunConfig.from_flower({"num-supernodes": 2, "local-steps": 2}))
    impossible = RunConfig.from_flower(
        {"num-supernodes": 2, "target-epsilon": 1e-4, "local-steps": 2}
    )
    with pytest.raises(ConfigError, match="'target-epsilon' = 0.0001: cannot be met by a client"):
        validate_privacy_plan(impossible)
