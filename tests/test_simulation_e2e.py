"""End to end through Flower's real simulation runtime (SuperLink + Ray), as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sims.launch import run as launch_run
from sims.launch.flwr_cli import APP_DIR
from sims.launch.run import run_simulation


def test_quantized_fedavg_simulation_with_ray(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _, status = run_simulation(
        [
            "num-supernodes=8 fraction-train=0.5 num-server-rounds=3 bits=4 local-steps=40",
            'batch-size=32 dp=false quant-policy="none"',
            f'out-dir="{out}"',
        ],
        stream=False,
    )
    assert status["status"] == "finished:completed"
    results = json.loads((out / "results.json").read_text())
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["accepted"] == 4 and r["rejected"] == 0 for r in rounds)
    # Well above chance (0.1) after three rounds, and better than the initial model.
    assert rounds[-1]["accuracy"] > 0.6
    assert rounds[-1]["accuracy"] > results["initial"]["accuracy"] + 0.3
    # 4-bit packed codes: at most 0.13 of the float32 payload, as Flower serializes it.
    assert results["summary"]["uplink-fraction-of-float32"] <= 0.13
    assert (out / "rounds.csv").read_text().count("\n") == 4
    assert (out / "rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_private_dpquant_simulation_with_ray(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _, status = run_simulation(
        [
            "num-supernodes=6 num-server-rounds=3 bits=4 local-steps=10 target-epsilon=4.0",
            'dp=true quant-policy="dpquant" quant-train-ratio=0.5',
            f'out-dir="{out}"',
        ],
        stream=False,
    )
    assert status["status"] == "finished:completed"
    results = json.loads((out / "results.json").read_text())
    rounds = results["rounds"]
    assert results["warnings"] == []  # the DP noise was secret (not seeded)
    assert rounds[-1]["accuracy"] > 0.3  # chance is 0.1
    # Every client reported its cumulative epsilon; none exceeded the target.
    epsilons = [r["epsilon-max"] for r in rounds]
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2] <= 4.0
    assert results["summary"]["max-epsilon"] == epsilons[2]
    # k = round(0.5 * 4) = 2 of the CNN's 4 layers ran quantized in every epoch.
    for r in rounds:
        assert sum(r["quantized-layer-fraction"]) == pytest.approx(2.0)
        assert 0 < r["speedup"] < 4.0  # s = 4 bounds paper A's formula
    # Round 2 runs no sensitivity estimate (period 2): quantized layers only save time.
    assert rounds[1]["speedup"] > 1.0


@pytest.mark.slow
def test_both_directions_compressed_simulation_with_ray(tmp_path: Path) -> None:
    """Issue 13's codec the way a user runs it: 2 bits up, 4-bit deltas down, on Ray."""
    out = tmp_path / "out"
    _, status = run_simulation(
        [
            "num-supernodes=4 num-server-rounds=3 local-steps=20 batch-size=32 dp=false",
            'quant-policy="none" bits=2 rotation="hadamard" rounding="dithered"',
            "entropy-coding=true error-feedback=true downlink-bits=4",
            f'out-dir="{out}"',
        ],
        stream=False,
    )
    assert status["status"] == "finished:completed"
    results = json.loads((out / "results.json").read_text())
    rounds = results["rounds"]
    assert all(r["accepted"] == 4 and r["failed"] == 0 for r in rounds)
    assert rounds[-1]["accuracy"] > 0.6
    # Every client rebuilt the seeded initial model, then applied 4-bit deltas.
    assert all(0 < r["downlink-bits-per-coordinate"] < 4.5 for r in rounds[1:])
    assert all(0 < r["uplink-bits-per-coordinate"] <= 2.2 for r in rounds)
    assert results["summary"]["total-fraction-of-float32"] < 0.1


@pytest.mark.parametrize(
    ("override", "key", "value"),
    [
        ("bits=9", "bits", 9),
        ('clip="median"', "clip", "median"),
        ('aggregator="nope"', "aggregator", "nope"),
        ("no-such-key=1", "no-such-key", 1),
        ("lr=-1.0", "lr", -1.0),
        ("target-epsilon=0.0001 num-server-rounds=50", "target-epsilon", 0.0001),
        ("min-replies=11", "min-replies", 11),
        ('resume=true out-dir="/nonexistent/fedquant"', "client-state-dir", ""),
    ],
)
def test_launcher_rejects_bad_config_before_starting(
    override: str,
    key: str,
    value: object,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(launch_run, "simulation_superlink", _must_not_start)
    assert launch_run.main(["--run-config", override]) == 2
    out = capsys.readouterr()
    assert f"'{key}' = {value!r}" in out.err
    assert "SuperLink" not in out.out + out.err


def _must_not_start(*args: object, **kwargs: object) -> None:
    raise AssertionError("a SuperLink was started for a config that must be rejected")


def test_launcher_command_exits_2_on_a_bad_config() -> None:
    """The one rejection through ``python -m``: the exit status reaches the shell."""
    proc = subprocess.run(
        [sys.executable, "-m", "sims.launch.run", "--run-config", "bits=9"],
        cwd=APP_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "'bits' = 9" in proc.stderr
    assert "SuperLink" not in proc.stdout + proc.stderr
