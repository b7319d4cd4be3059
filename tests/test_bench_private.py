"""The private-training benchmark: its grid, its statistics and its verdicts.

The sweep itself runs for ~90 minutes (``python -m sims.bench.private``); here its
pieces are checked on small inputs, and the estimator's share of ε against the
accountant directly.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter

import pytest

from fedquant.accounting import Accountant, MechanismStep, PrivacyLedger
from sims.bench.private import (
    FINDING_CHOICES,
    POLICIES,
    PolicyRow,
    cells,
    estimator_share,
    findings_table,
    pareto_plot,
    parse_args,
    target_table,
    verdicts,
)


def test_default_grid_has_every_cell_the_issue_asks_for() -> None:
    args = parse_args([])
    grid = cells(args)
    names = [c.name for c in grid]
    assert len(names) == len(set(names))  # no cell runs twice
    findings = Counter(
        (
            c.overrides["model"],
            c.overrides["num-supernodes"],
            c.overrides["dp"],
            c.overrides["quant-policy"],
        )
        for c in grid
        if c.section == "findings"
    )
    # The default fits 90 minutes with the targets; the ResNet is asked for by name.
    assert set(args.findings) == {"cnn:central", "cnn:federated"}
    with_resnet = cells(
        parse_args(["--findings", "cnn:central", "cnn:federated", "resnet:central"])
    )
    findings += Counter(
        (
            c.overrides["model"],
            c.overrides["num-supernodes"],
            c.overrides["dp"],
            c.overrides["quant-policy"],
        )
        for c in with_resnet
        if c.section == "findings" and c.overrides["model"] == "resnet"
    )
    for model, clients in [("cnn", 1), ("cnn", 10), ("resnet", 1)]:
        for policy in POLICIES:
            assert findings[model, clients, True, policy] >= 5  # >= 5 seeds under DP
        for policy in ("none", "random"):
            assert findings[model, clients, False, policy] >= 5
    # Central and federated findings runs process the same number of examples.
    examples = {
        (o["model"], o["num-supernodes"]): o["num-supernodes"]
        * o["local-steps"]
        * o["num-server-rounds"]
        * o["batch-size"]
        for o in (c.overrides for c in grid if c.section == "findings")
    }
    assert examples["cnn", 1] == examples["cnn", 10]
    targets = [c.overrides for c in grid if c.section == "targets"]
    iid = [o for o in targets if o["partitioning"] == "iid" and o["num-supernodes"] == 10]
    assert Counter(o["target-epsilon"] for o in iid) == {2.0: 3, 8.0: 3}  # 3 seeds each
    others = {(o["partitioning"], o["num-supernodes"], o["target-epsilon"]) for o in targets}
    assert others >= {("dirichlet", 10, 8.0), ("iid", 1, 8.0)}
    every = cells(parse_args(["--findings", *FINDING_CHOICES]))
    assert {
        (c.overrides["model"], c.overrides["num-supernodes"])
        for c in every
        if c.section == "findings"
    } == {("cnn", 1), ("cnn", 10), ("resnet", 1), ("resnet", 10)}
    central = [o for o in targets if o["num-supernodes"] == 1]
    # The central reference processes as many examples as the federation at its epsilon.
    for o in central:
        fed = next(f for f in iid if f["target-epsilon"] == o["target-epsilon"])
        assert o["local-steps"] * o["num-server-rounds"] * o["batch-size"] == (
            10 * fed["local-steps"] * fed["num-server-rounds"] * fed["batch-size"]
        )
    # The run length is chosen per epsilon: 5 rounds at epsilon 2, --rounds (10) at 8.
    assert {(o["target-epsilon"], o["num-server-rounds"]) for o in iid} == {(2.0, 5), (8.0, 10)}
    assert all(o["dp-noise-seeded"] for o in (c.overrides for c in grid))


def test_quick_mode_keeps_explicit_flags() -> None:
    quick = parse_args(["--quick"])
    assert quick.rounds == 2 and quick.findings_seeds == [0]
    assert parse_args(["--quick", "--rounds", "3"]).rounds == 3


def _row(dp: bool, policy: str, acc: list[float], speedup: float = 1.0) -> PolicyRow:
    return PolicyRow(dp, policy, tuple(acc), speedup, 0.0)


def test_verdicts_are_paired_by_seed() -> None:
    rows = [
        _row(True, "none", [90, 91, 92]),
        _row(True, "static", [80, 81, 82]),
        _row(True, "random", [84, 85, 86]),
        _row(True, "dpquant", [84.5, 86.0, 86.0]),
        _row(False, "none", [97, 97.5, 98]),
        _row(False, "random", [96, 96.5, 97]),
    ]
    lines = verdicts(rows)
    # finding 1, per seed: (DP none - DP random) - (SGD none - SGD random) = 6 - 1 = 5,
    # the same for every seed: no spread, so SE 0 (unpaired it would be 0.91).
    assert "difference +5.00 ± 0.00 (SE, 3 paired seeds)" in lines[0]
    assert "significant" in lines[0]
    # dpquant - random per seed: 0.5, 1.0, 0.0: mean 0.5, SE 0.5 / sqrt(3) = 0.29
    assert "+0.50 ± 0.29" in lines[1] and "within 2 SE" in lines[1]
    assert "+4.00 ± 0.00" in lines[2] and "significant" in lines[2]
    flipped = verdicts([_row(True, "random", [80, 81]), _row(True, "static", [85, 86])])
    assert "does not hold" in flipped[0]
    # Only seeds both rows ran are paired.
    partial = PolicyRow(True, "static", (70.0, 71.0), 1.0, 0.0, seeds=(1, 7))
    assert "(SE, 1 paired seeds)" in verdicts([_row(True, "random", [80, 81]), partial])[0]


def test_findings_table_reports_loss_against_unquantized_of_the_same_privacy() -> None:
    rows = [
        _row(True, "none", [90, 92]),
        _row(True, "random", [85, 87], 2.0),
        _row(False, "none", [98, 98]),
        _row(False, "random", [97, 97], 2.0),
    ]
    text = "\n".join(findings_table(rows, late_gain=0.3))
    assert "| DP | random | 86.00 ± 1.41 | -5.00 | 2 | 2.00 |" in text
    assert "| no DP | random | 97.00 ± 0.00 | -1.00 |" in text
    assert "+0.30 points" in text


def test_target_table_groups_by_data_setting() -> None:
    def run(part: str, clients: int, acc: float, seed: int) -> dict:
        return {
            "dp": True,
            "target-epsilon": 8.0,
            "partitioning": part,
            "num-supernodes": clients,
            "final-accuracy": acc,
            "max-epsilon": 7.99,
            "num-server-rounds": 10,
            "local-steps": 200 if clients == 1 else 20,
            "seed": seed,
        }

    results = [run("iid", 10, a, s) for s, a in enumerate([0.95, 0.96, 0.97])]
    results.append(run("iid", 1, 0.97, 0))
    lines = target_table(results, [8.0])
    iid = next(line for line in lines if line.startswith("| iid"))
    assert f"{statistics.mean([95, 96, 97]):.2f} ± 1.00 | 3 |" in iid
    assert any(line.startswith("| central (all 50,000) | 1 | 2000 |") for line in lines)


def test_estimator_share_matches_the_ledger() -> None:
    """The share is 1 - ε(training)/ε(all) at the calibrated σ.

    Recomputed here from the accountant with the same plan (10 clients of 5,000, batch
    128, 4 x 5 steps).
    """
    from fedquant.config import RunConfig
    from fedquant.training import calibrate_client_noise, round_plan

    overrides = {
        "dp": True,
        "target-epsilon": 8.0,
        "quant-policy": "dpquant",
        "num-server-rounds": 4,
        "local-steps": 5,
        "batch-size": 128,
    }
    share = estimator_share(overrides)
    cfg = RunConfig.from_flower(overrides)
    plan = round_plan(5000, batch_size=128, epochs=1, max_steps=5)
    sigma = calibrate_client_noise(plan, rounds=4, dp=cfg.dp, quant=cfg.dpquant)
    train = PrivacyLedger([MechanismStep(sigma, plan.sample_rate, 20)])
    eps_train = train.epsilon(delta=1e-5, accountant=Accountant.PRV)
    assert share == pytest.approx(1 - eps_train / 8.0, abs=0.01)
    assert 0 < share < 0.5
    assert estimator_share({**overrides, "quant-policy": "random"}) == pytest.approx(0, abs=1e-9)
    assert estimator_share({**overrides, "dp": False}) == 0.0


def test_pareto_plot_is_written(tmp_path) -> None:
    rows = [_row(True, "none", [90, 91]), _row(True, "dpquant", [89, 90], 1.8)]
    path = pareto_plot({"cnn, central": rows, "cnn, federated": rows}, tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_estimator_diagnostic_on_a_saved_model(tmp_path) -> None:
    """Noise sd is σ_a C_a / (q_a |D|) = 3 / (0.05 · 5000) = 0.012 for 10 clients.

    The best subset is never worse than DPQuant or uniform selection.
    """
    from fedquant.config import ModelName
    from fedquant.models import build_model
    from sims.app.checkpoint import Checkpoint, save_checkpoint
    from sims.bench.private import estimator_diagnostic

    model = build_model(ModelName.CNN, seed=3)
    arrays = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path, Checkpoint(1, arrays, {}, {}, {}))
    run = {
        "out-dir": str(tmp_path),
        "model": "cnn",
        "num-supernodes": 10,
        "seed": 0,
        "quant-policy": "none",
        "quant-train-ratio": 0.5,
        "dp": True,
    }
    lines = estimator_diagnostic(run, examples=64, draws=100)
    rows = [line for line in lines if line.startswith("| conv") or line.startswith("| fc")]
    assert [row.split(" | ")[0] for row in rows] == ["| conv1", "| conv2", "| fc1", "| fc2"]
    assert all(row.split(" | ")[3] == "0.0120" for row in rows)
    header = next(line for line in lines if "best subset" in line)
    best = float(re.search(r"best subset (-?[0-9.]+)", header).group(1))
    betas = [line.split(" | ") for line in lines if re.match(r"\| [0-9]", line)]
    assert [row[0].split()[1] for row in betas][:2] == ["5", "20"]  # the run's β is the default
    costs = [float(v) for row in betas for v in row[1:3]]
    assert len(costs) == 2 * 6 and min(costs) >= best - 1e-12
