"""A node's privacy state on disk: atomic, strict, and continued after a restart."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from clients.client_app import PRIVACY_STATE, SCHEDULER_STATE
from fedquant.config import RunConfig
from fedquant.node_state import STATE_FILE, NodeStateError, NodeStateStore
from tests.test_private_client import CFG, run_client


def test_store_round_trip_is_atomic(tmp_path: Path) -> None:
    store = NodeStateStore(tmp_path / "node")
    assert store.load() is None
    records = {
        PRIVACY_STATE: {"noise": [1.5], "rate": [0.01], "steps": [3], "noise-multiplier": 1.5}
    }
    store.save(records)
    assert store.load() == records
    store.save({PRIVACY_STATE: {"noise": [], "rate": [], "steps": []}})
    assert [p.name for p in (tmp_path / "node").iterdir()] == [STATE_FILE]  # no temp files


@pytest.mark.parametrize(
    "text", ["", "{not json", json.dumps([1, 2]), json.dumps({"version": 99, "records": {}})]
)
def test_unreadable_state_is_an_error_not_a_fresh_start(tmp_path: Path, text: str) -> None:
    (tmp_path / STATE_FILE).write_text(text)
    with pytest.raises(NodeStateError, match=STATE_FILE):
        NodeStateStore(tmp_path).load()


def node(state_dir: Path | None, cfg: RunConfig = CFG) -> Context:
    """A freshly started SuperNode: empty Context.state, optionally a state dir."""
    node_config: dict[str, int | str] = {"partition-id": 0, "num-partitions": 50}
    if state_dir is not None:
        node_config["state-dir"] = str(state_dir)
    return Context(
        run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
        run_config=cfg.to_flower(),
    )


def epsilon(reply_metrics: object) -> float:
    return float(reply_metrics["epsilon"])  # type: ignore[index]


def test_killed_and_restarted_supernode_continues_its_epsilon(tmp_path: Path) -> None:
    uninterrupted = node(None)
    expected = [epsilon(run_client(CFG, uninterrupted, r).content["metrics"]) for r in (1, 2, 3)]

    state_dir = tmp_path / "supernode-0"
    first = node(state_dir)
    for r in (1, 2):
        run_client(CFG, first, r)
    saved = json.loads((state_dir / STATE_FILE).read_text())["records"]
    assert set(saved) == {PRIVACY_STATE, SCHEDULER_STATE}

    # The process dies; a new one starts with nothing in memory but the same state dir.
    restarted = node(state_dir)
    after_restart = epsilon(run_client(CFG, restarted, 3).content["metrics"])
    assert after_restart == pytest.approx(expected[2], rel=1e-12)
    assert after_restart > expected[1]
    assert restarted.state[SCHEDULER_STATE]["epochs_done"] == 3

    # Control: without the state dir the restarted node would start over at round 1's epsilon.
    forgetful = epsilon(run_client(CFG, node(None), 3).content["metrics"])
    assert forgetful == pytest.approx(expected[0], rel=1e-12)


def test_budget_is_not_reset_by_a_restart(tmp_path: Path) -> None:
    for r in (1, 2, 3):
        run_client(CFG, node(tmp_path), r)  # a restart before every round
    reply = run_client(CFG, node(tmp_path), 4)  # the budget covers 3 planned rounds
    metrics = reply.content["metrics"]
    assert metrics["budget-exhausted"] == 1
    assert metrics["epsilon"] <= CFG.target_epsilon


def test_simulation_partitions_use_the_run_config_state_dir(tmp_path: Path) -> None:
    cfg = dataclasses.replace(CFG, client_state_dir=str(tmp_path))
    run_client(cfg, node(None, cfg), 1)
    assert (tmp_path / "partition-0" / STATE_FILE).is_file()
