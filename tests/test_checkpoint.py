"""Server checkpoints: atomic, strict about the experiment, and a resume is exact."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message

from clients.client_app import app as client_app
from fedquant.config import ConfigError, RunConfig
from sims.app.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    check_same_experiment,
    load_checkpoint,
    save_checkpoint,
)
from sims.app.server_app import run
from sims.launch.inprocess import InProcessGrid
from strategies.quantized import strategy_from_config


def test_checkpoint_round_trip_and_atomic_replace(tmp_path: Path) -> None:
    arrays = {"conv.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2)}
    first = Checkpoint(1, arrays, {"bits": 4}, {"initial": {}, "rows": [{"round": 1}]}, {"x": [1]})
    save_checkpoint(tmp_path, first)
    second = dataclasses.replace(
        first, server_round=2, arrays={k: v + 1 for k, v in arrays.items()}
    )
    save_checkpoint(tmp_path, second)
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.server_round == 2
    assert loaded.arrays.keys() == arrays.keys()
    for name, value in arrays.items():
        assert loaded.arrays[name].dtype == value.dtype
        np.testing.assert_array_equal(loaded.arrays[name], value + 1)
    assert (loaded.config, loaded.report, loaded.strategy) == (
        first.config,
        first.report,
        first.strategy,
    )
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]  # no temp files left
    assert load_checkpoint(tmp_path / "elsewhere") is None


def test_resume_refuses_a_different_experiment() -> None:
    checkpoint = Checkpoint(2, {}, RunConfig.from_flower({"bits": 4}).to_flower(), {}, {})
    longer = RunConfig.from_flower(
        {"bits": 4, "num-server-rounds": 9, "resume": True, "round-timeout": 5.0}
    )
    check_same_experiment(checkpoint, longer.to_flower())  # more rounds: the same run
    with pytest.raises(ConfigError, match="'bits' = 2.*checkpoint"):
        check_same_experiment(checkpoint, RunConfig.from_flower({"bits": 2}).to_flower())


class RecordingGrid(InProcessGrid):
    """Records the rounds it is asked to run; the SuperLink dies at ``crash_round``."""

    def __init__(self, cfg: RunConfig, *, crash_round: int | None = None) -> None:
        super().__init__(client_app, num_nodes=cfg.run.num_supernodes, run_config=cfg.to_flower())
        self.crash_round = crash_round
        self.rounds: list[int] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        server_round = int(messages[0].content["config"]["server-round"])
        if server_round == self.crash_round:
            raise ConnectionError("SuperLink went away")
        self.rounds.append(server_round)
        return super().send_and_receive(messages, timeout=timeout)


def run_with(grid: RecordingGrid, cfg: RunConfig) -> RecordingGrid:
    run(grid, cfg, strategy_from_config(cfg))
    return grid


@pytest.mark.parametrize(
    "overrides",
    [
        # Client ledgers must continue too; bit-identical DP runs need the (opt-in,
        # non-private) seeded noise.
        {"dp": True, "aggregator": "error-weighted", "dp_noise_seeded": True},
        {"dp": False, "quant_policy": "none", "aggregator": "flwr:FedAdam"},  # optimizer state
    ],
    ids=["dp-error-weighted", "fedadam"],
)
def test_resume_ends_with_the_uninterrupted_result(tmp_path: Path, overrides: dict) -> None:
    def config(name: str, **extra: object) -> RunConfig:
        values = {
            "num_supernodes": 3,
            "num_server_rounds": 3,
            "local_steps": 4,
            "batch_size": 32,
            "out_dir": str(tmp_path / name),
            "client_state_dir": str(tmp_path / name / "clients"),
            "target_epsilon": 4.0,
            **overrides,
            **extra,
        }
        return RunConfig.from_flower({k.replace("_", "-"): v for k, v in values.items()})

    whole = config("whole")
    run_with(RecordingGrid(whole), whole)

    broken = config("broken")
    with pytest.raises(ConnectionError, match="SuperLink went away"):
        run_with(RecordingGrid(broken, crash_round=3), broken)
    saved = load_checkpoint(broken.run.out_dir)
    assert saved is not None and saved.server_round == 2

    # Everything restarts: a new ServerApp and new client processes (empty contexts).
    resumed = config("broken", resume=True)
    assert run_with(RecordingGrid(resumed), resumed).rounds == [3]  # rounds 1-2 not rerun

    final_whole, final_resumed = (
        load_checkpoint(whole.run.out_dir),
        load_checkpoint(resumed.run.out_dir),
    )
    assert final_whole is not None and final_resumed is not None
    assert final_resumed.server_round == 3
    for name, value in final_whole.arrays.items():
        np.testing.assert_array_equal(final_resumed.arrays[name], value, err_msg=name)
    results_whole = json.loads(Path(whole.run.out_dir, "results.json").read_text())
    rows_whole = results_whole["rounds"]
    rows_resumed = json.loads(Path(resumed.run.out_dir, "results.json").read_text())["rounds"]
    # What seeded noise gives up is written down with the results.
    assert results_whole["warnings"] == ([whole.privacy_warning] if whole.dp.enabled else [])
    assert rows_resumed == rows_whole  # accuracy, epsilon, bytes: every round, every column
    if whole.dp.enabled:
        epsilons = [r["epsilon-max"] for r in rows_whole]
        assert 0 < epsilons[0] < epsilons[1] < epsilons[2] <= whole.dp.target_epsilon
