"""Hostile clients through the real round loop.

Replies that pass validation cannot steer the model (issue: robust weighting, norm
bounds and recovery by default).

10 clients, 5 rounds, 4-bit uploads, no DP, the real ServerApp loop, strategy and
ClientApp in-process (``sims.bench.attacks.HostileGrid``), each attack against an
all-honest control on the same seed. The attacks that collapsed the model before
these defences existed: a reply claiming MSE 0 took all the error weight, one
sign-flipped x9 update ended the run at 11.8%, a claimed 10^9 examples owned FedAvg.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from clients.client_app import app as client_app
from fedquant.config import ConfigError, RunConfig
from fedquant.dpquant import QuantPolicy
from sims.app.report import RunReport
from sims.app.server_app import run
from sims.bench.attacks import ATTACKS, Attack, HostileGrid, metrics, scaled
from strategies.quantized import strategy_from_config

CLIENTS, ROUNDS = 10, 5
HOSTILE = 1  # node id of the single attacker


def config(out: Path, **overrides: Any) -> RunConfig:
    """Non-private 4-bit runs of 5 rounds x 10 local steps.

    Only the last round is evaluated (the assertions are on final accuracy and per-round
    counts).
    """
    base: dict[str, Any] = {
        "num-supernodes": CLIENTS,
        "num-server-rounds": ROUNDS,
        "local-steps": 10,
        "batch-size": 64,
        "dp": False,
        "quant-policy": QuantPolicy.NONE,
        "bits": 4,
        "eval-every": ROUNDS,
        "out-dir": str(out),
    }
    return RunConfig.from_flower({**base, **{k.replace("_", "-"): v for k, v in overrides.items()}})


def attacked(out: Path, attacks: dict[int, Attack], **overrides: Any) -> dict[str, Any]:
    """Run with ``attacks`` and return results.json, parsed strictly."""
    cfg = config(out, **overrides)
    grid = HostileGrid(client_app, num_nodes=CLIENTS, run_config=cfg.to_flower(), attacks=attacks)
    run(grid, cfg, strategy_from_config(cfg))
    return strict_load(out / "results.json")


def strict_load(path: Path) -> dict[str, Any]:
    """RFC 8259 JSON only: NaN, Infinity and -Infinity are refused."""

    def refuse(token: str) -> None:
        raise ValueError(f"{path} holds the non-standard JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def final(results: dict[str, Any]) -> float:
    return 100 * results["summary"]["final-accuracy"]


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """Accuracy (%) after each round of the all-honest run with the default aggregator."""
    results = attacked(tmp_path_factory.mktemp("control"), {}, eval_every=1)
    return [100 * r["accuracy"] for r in results["rounds"]]


@pytest.fixture(scope="module")
def control(honest: list[float]) -> float:
    """Final accuracy (%) of the all-honest run."""
    return honest[-1]


# Three colluders bias a trimmed mean (per coordinate it drops honest values from the
# far end): a slower descent, which 5 rounds x 10 steps, still far from the plateau,
# turn into 3 points (88.7 vs 91.9%); at 25 steps the runs end near it (95.9 vs 97.2%).
COLLUSION_STEPS = 25


@pytest.fixture(scope="module")
def long_control(tmp_path_factory: pytest.TempPathFactory) -> float:
    """Final accuracy (%) of the all-honest run of COLLUSION_STEPS local steps."""
    out = tmp_path_factory.mktemp("long-control")
    return final(attacked(out, {}, local_steps=COLLUSION_STEPS))


def test_a_reply_claiming_zero_error_gains_no_control(tmp_path: Path, control: float) -> None:
    results = attacked(tmp_path, {HOSTILE: ATTACKS["mse-zero"]()})
    assert final(results) >= control - 1.0
    # The server raised its MSE to the grid's and capped its share: logged and counted.
    assert [r["down-weighted"] for r in results["rounds"]] == [1] * ROUNDS
    assert results["summary"]["rejected-replies"] == 0


def test_a_sign_flipped_x9_update_counts_as_one_median_vote(tmp_path: Path, control: float) -> None:
    results = attacked(tmp_path, {HOSTILE: ATTACKS["flip-x9"]()})
    assert final(results) >= control - 1.0
    assert all(r["norm-clipped"] >= 1 for r in results["rounds"])
    assert results["summary"]["discarded-rounds"] == 0


@pytest.mark.slow
def test_an_x100_update_is_clipped_to_the_median(tmp_path: Path, control: float) -> None:
    results = attacked(tmp_path, {HOSTILE: ATTACKS["scale-x100"]()})
    assert final(results) >= control - 1.0
    assert all(r["norm-clipped"] >= 1 for r in results["rounds"])


@pytest.mark.slow
def test_a_claimed_example_count_at_the_cap_buys_at_most_the_share_cap(
    tmp_path: Path, control: float
) -> None:
    cap = RunConfig().robust.max_num_examples
    attack = Attack("count-at-cap", metrics(num_examples=cap - 1))
    results = attacked(tmp_path, {HOSTILE: attack}, aggregator="fedavg")
    assert final(results) >= control - 1.0
    assert [r["down-weighted"] for r in results["rounds"]] == [1] * ROUNDS


@pytest.mark.slow
@pytest.mark.parametrize("aggregator", ["median", "trimmed-mean"])
def test_three_colluding_sign_flippers_against_robust_rules(
    tmp_path: Path, long_control: float, aggregator: str
) -> None:
    attacks = {node: Attack("flip-x9", scaled(-9.0)) for node in (1, 2, 3)}
    results = attacked(
        tmp_path,
        attacks,
        aggregator=aggregator,
        byzantine_clients=3,
        local_steps=COLLUSION_STEPS,
    )
    assert final(results) >= long_control - 2.0


@pytest.mark.slow  # unit level: test_strategy (discard), test_strategy_fuzz (metrics)
def test_a_poisoned_round_is_discarded_and_honest_replies_stay_accepted(
    tmp_path: Path, honest: list[float]
) -> None:
    """A poisoned round is discarded; the honest replies after it are applied.

    Six colluding x1000 replies in round 3, with the norm bound off and a plain mean: the
    aggregate step is absurd against rounds 1-2, so round 3 is discarded; rounds 4 and 5
    accept every honest reply, and with one round lost the run ends where the control
    stood after 4 rounds.
    """
    attacks = {node: Attack("x1000-once", scaled(1000.0), rounds={3}) for node in range(1, 7)}
    results = attacked(tmp_path, attacks, aggregator="mean", update_norm_factor=0.0)
    rows = results["rounds"]
    assert [r["discarded"] for r in rows] == [0, 0, 1, 0, 0]
    assert rows[2]["step-norm"] == 0.0 and all(r["step-norm"] > 0 for r in rows[3:])
    assert all(r["accepted"] == CLIENTS and r["rejected"] == 0 for r in rows)
    assert results["summary"]["discarded-rounds"] == 1
    assert final(results) >= honest[ROUNDS - 2] - 1.0


@pytest.mark.slow  # unit level: test_strategy (discard), test_strategy_fuzz (metrics)
def test_hostile_metrics_are_rejected_and_results_stay_strict_json(
    tmp_path: Path, control: float
) -> None:
    """Hostile metrics are rejected and counted; the round goes on.

    An epsilon in a run without DP, a huge loss the schema has no place for, and a count
    at the (exclusive) limit: each reply is rejected and counted, the round goes on, and
    results.json has no NaN/Infinity token (strict_load).
    """
    limit = RunConfig().robust.max_num_examples
    attacks = {
        1: Attack("epsilon-without-dp", metrics(epsilon=1e308)),
        2: Attack("loss", metrics(train_loss=math.inf)),
        3: Attack("count-at-limit", metrics(num_examples=limit)),
    }
    results = attacked(tmp_path, attacks)
    assert [r["rejected"] for r in results["rounds"]] == [3] * ROUNDS
    assert [r["accepted"] for r in results["rounds"]] == [CLIENTS - 3] * ROUNDS
    assert results["summary"]["max-epsilon"] == 0.0
    assert final(results) >= control - 1.0


def test_a_non_finite_loss_is_written_as_null(tmp_path: Path) -> None:
    report = RunReport(tmp_path, {"seed": 0})
    report.initial = {"accuracy": 0.1, "loss": math.nan}
    report.add_round({"round": 1, "accuracy": 0.1, "loss": math.inf})
    results = strict_load(tmp_path / "results.json")
    assert results["rounds"][0]["loss"] is None and results["initial"]["loss"] is None


@pytest.mark.parametrize(
    ("aggregator", "byzantine", "clients"),
    [("trimmed-mean", 5, 10), ("median", 2, 4), ("trimmed-mean", 1, 2)],
)
def test_a_rule_that_cannot_tolerate_the_byzantine_count_fails_at_start(
    aggregator: str, byzantine: int, clients: int
) -> None:
    with pytest.raises(ConfigError, match=f"byzantine-clients.*{byzantine}.*cannot tolerate"):
        RunConfig.from_flower(
            {"aggregator": aggregator, "byzantine-clients": byzantine, "num-supernodes": clients}
        )
