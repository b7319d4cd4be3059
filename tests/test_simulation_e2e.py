"""End to end through Flower's real simulation runtime (SuperLink + Ray), as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sims.run import APP_DIR, run_simulation


def test_quantized_fedavg_simulation_with_ray(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg, status = run_simulation(
        [
            "num-supernodes=8 fraction-train=0.5 num-server-rounds=3 bits=4 local-steps=40",
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


@pytest.mark.parametrize(
    ("override", "key"),
    [("bits=9", "bits"), ('clip="median"', "clip"), ('aggregator="nope"', "aggregator"),
     ("no-such-key=1", "no-such-key"), ("lr=-1.0", "lr")],
)
def test_launcher_rejects_bad_config_before_starting(override: str, key: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sims.run", "--run-config", override],
        cwd=APP_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert f"'{key}'" in proc.stderr
    assert "SuperLink" not in proc.stdout + proc.stderr
