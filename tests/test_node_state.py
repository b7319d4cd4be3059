"""A node's privacy state on disk: atomic, strict, and continued after a restart."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from flwr.app import Context, Message

from fedquant.accounting import MechanismStep, PrivacyLedger
from fedquant.config import DPQuantSettings, RunConfig
from fedquant.dpquant import LayerScheduler, QuantPolicy
from fedquant.node_state import (
    PRIVACY_RECORD,
    SCHEDULER_RECORD,
    STATE_FILE,
    NodeState,
    NodeStateError,
    NodeStateStore,
    PrivacyRecord,
)

ClientContext = Callable[..., Context]
RunClient = Callable[[RunConfig, Context, int], Message]

LEDGER = PrivacyLedger([MechanismStep(1.5, 0.01, 3), MechanismStep(3.0, 0.05, 1)])


def test_store_round_trip_is_atomic(tmp_path: Path) -> None:
    store = NodeStateStore(tmp_path / "node")
    assert store.load(require_privacy=True) is None
    scheduler = LayerScheduler(n_layers=4, policy=QuantPolicy.DPQUANT, ratio=0.5)
    state = NodeState(PrivacyRecord(LEDGER, 1.5), scheduler)
    store.save(state)
    loaded = store.load(require_privacy=True)
    assert loaded is not None and loaded.to_records() == state.to_records()
    assert loaded.privacy == state.privacy
    store.save(NodeState(PrivacyRecord(PrivacyLedger([MechanismStep(2.0, 0.1, 1)]), 2.0)))
    assert [p.name for p in (tmp_path / "node").iterdir()] == [STATE_FILE]  # no temp files


@pytest.mark.parametrize(
    "text", ["", "{not json", json.dumps([1, 2]), json.dumps({"version": 99, "records": {}})]
)
def test_unreadable_state_is_an_error_not_a_fresh_start(tmp_path: Path, text: str) -> None:
    (tmp_path / STATE_FILE).write_text(text)
    with pytest.raises(NodeStateError, match=STATE_FILE):
        NodeStateStore(tmp_path).load(require_privacy=False)


def _saved_privacy() -> dict[str, object]:
    return PrivacyRecord(LEDGER, 1.5).to_dict()


def _without(record: dict[str, object], key: str) -> dict[str, object]:
    return {k: v for k, v in record.items() if k != key}


# (file content, what the error must name). Every one of them is a version-1 file.
DAMAGED = {
    "records-empty-object": ({}, PRIVACY_RECORD),
    "records-empty-list": ([], "records"),
    "records-missing": (None, "records"),
    "privacy-record-missing": (
        {SCHEDULER_RECORD: LayerScheduler(n_layers=4, policy="dpquant", ratio=0.5).to_dict()},
        PRIVACY_RECORD,
    ),
    "privacy-record-empty": ({PRIVACY_RECORD: {}}, "missing field"),
    "privacy-record-list": ({PRIVACY_RECORD: []}, "mapping"),
    **{
        f"missing-{key}": ({PRIVACY_RECORD: _without(_saved_privacy(), key)}, key)
        for key in ("noise", "rate", "steps", "noise-multiplier", "steps-total")
    },
    "noise-multiplier-negative": (
        {PRIVACY_RECORD: {**_saved_privacy(), "noise-multiplier": -1.5}},
        "noise-multiplier",
    ),
    "noise-multiplier-nan": (
        {PRIVACY_RECORD: {**_saved_privacy(), "noise-multiplier": "NaN"}},
        "noise-multiplier",
    ),
    "noise-multiplier-not-in-ledger": (
        {PRIVACY_RECORD: {**_saved_privacy(), "noise-multiplier": 1.25}},
        "noise-multiplier",
    ),
    "ledger-step-negative": ({PRIVACY_RECORD: {**_saved_privacy(), "steps": [-3, 1]}}, "steps"),
    "ledger-rate-infinite": ({PRIVACY_RECORD: {**_saved_privacy(), "rate": [1e999, 0.05]}}, "rate"),
    "ledger-empty": (
        {PRIVACY_RECORD: {**_saved_privacy(), "noise": [], "rate": [], "steps": []}},
        "empty",
    ),
    "ledger-shortened": (
        {PRIVACY_RECORD: {**_saved_privacy(), "noise": [1.5], "rate": [0.01], "steps": [3]}},
        "steps-total",
    ),
    "ledger-steps-lowered": (
        {PRIVACY_RECORD: {**_saved_privacy(), "steps": [1, 1]}},
        "steps-total",
    ),
    "unknown-record": ({PRIVACY_RECORD: _saved_privacy(), "other": {}}, "other"),
    "scheduler-malformed": (
        {PRIVACY_RECORD: _saved_privacy(), SCHEDULER_RECORD: {"epochs_done": -1}},
        SCHEDULER_RECORD,
    ),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_or_incomplete_state_refuses_to_train(
    tmp_path: Path,
    case: str,
    private_cfg: RunConfig,
    client_context: ClientContext,
    run_client: RunClient,
) -> None:
    """Fail closed: a damaged file stops a private node, and the file is kept.

    A file that exists but lacks a complete, consistent privacy record would start a
    fresh budget: the node does not train.
    """
    records, named = DAMAGED[case]
    content: dict[str, object] = {"version": 1}
    if records is not None:
        content["records"] = records
    text = json.dumps(content).replace('"NaN"', "NaN")
    (tmp_path / STATE_FILE).write_text(text)
    with pytest.raises(NodeStateError, match=STATE_FILE) as err:
        run_client(private_cfg, client_context(private_cfg, tmp_path), 1)
    assert named in str(err.value)
    assert (tmp_path / STATE_FILE).read_text() == text  # nothing overwritten


def epsilon(reply_metrics: object) -> float:
    return float(reply_metrics["epsilon"])  # type: ignore[index]


def test_killed_and_restarted_supernode_continues_its_epsilon(
    tmp_path: Path,
    private_cfg: RunConfig,
    client_context: ClientContext,
    run_client: RunClient,
) -> None:
    cfg = private_cfg
    uninterrupted = client_context(cfg)
    expected = [epsilon(run_client(cfg, uninterrupted, r).content["metrics"]) for r in (1, 2, 3)]

    state_dir = tmp_path / "supernode-0"
    first = client_context(cfg, state_dir)
    for r in (1, 2):
        run_client(cfg, first, r)
    saved = json.loads((state_dir / STATE_FILE).read_text())["records"]
    assert set(saved) == {PRIVACY_RECORD, SCHEDULER_RECORD}

    # The process dies; a new one starts with nothing in memory but the same state dir.
    restarted = client_context(cfg, state_dir)
    after_restart = epsilon(run_client(cfg, restarted, 3).content["metrics"])
    assert after_restart == pytest.approx(expected[2], rel=1e-12)
    assert after_restart > expected[1]
    assert restarted.state[SCHEDULER_RECORD]["epochs_done"] == 3

    # Control: without the state dir the restarted node would start over at round 1's epsilon.
    forgetful = epsilon(run_client(cfg, client_context(cfg), 3).content["metrics"])
    assert forgetful == pytest.approx(expected[0], rel=1e-12)


def test_budget_is_not_reset_by_a_restart(
    tmp_path: Path,
    private_cfg: RunConfig,
    client_context: ClientContext,
    run_client: RunClient,
) -> None:
    cfg = private_cfg
    for r in (1, 2, 3):
        run_client(cfg, client_context(cfg, tmp_path), r)  # a restart before every round
    reply = run_client(cfg, client_context(cfg, tmp_path), 4)  # the budget covers 3 rounds
    metrics = reply.content["metrics"]
    assert metrics["budget-exhausted"] == 1
    assert metrics["epsilon"] <= cfg.dp.target_epsilon


def test_simulation_partitions_use_the_run_config_state_dir(
    tmp_path: Path,
    private_cfg: RunConfig,
    client_context: ClientContext,
    run_client: RunClient,
) -> None:
    cfg = private_cfg.with_overrides({"client-state-dir": str(tmp_path)})
    run_client(cfg, client_context(cfg), 1)
    assert (tmp_path / "partition-0" / STATE_FILE).is_file()


# A scheduler record as node state files hold it (version 1), written before DPQuant's
# constants moved into fedquant.config: such files must keep loading.
SAVED_SCHEDULER = {
    "n_layers": 4,
    "policy": "dpquant",
    "ratio": 0.5,
    "beta": 5.0,
    "alpha": 0.5,
    "seed": 3814374520298932224,
    "sensitivity": [0.0123, -0.0071, 0.0310, 0.0046],
    "static_subset": [],
    "epochs_done": 3,
}


def test_a_saved_scheduler_loads_and_continues_with_its_own_constants(tmp_path: Path) -> None:
    """Policy, ratio, β and α come from the file, not from today's defaults."""
    record = {**SAVED_SCHEDULER, "beta": 20.0, "alpha": 0.25}
    text = json.dumps(
        {"version": 1, "records": {PRIVACY_RECORD: _saved_privacy(), SCHEDULER_RECORD: record}}
    )
    (tmp_path / STATE_FILE).write_text(text)
    loaded = NodeStateStore(tmp_path).load(require_privacy=True)
    assert loaded is not None and loaded.scheduler is not None
    scheduler = loaded.scheduler
    assert scheduler.to_dict() == record  # every field as saved, nothing re-derived
    assert (scheduler.beta, scheduler.alpha) != (DPQuantSettings().beta, DPQuantSettings().alpha)
    assert len(scheduler.next_epoch()) == 2 and scheduler.epochs_done == 4
    # The same record with the default constants is what a fresh run's schedule saves.
    fresh = LayerScheduler.from_settings(
        DPQuantSettings(), n_layers=4, seed=SAVED_SCHEDULER["seed"]
    ).to_dict()
    assert {k: fresh[k] for k in ("n_layers", "policy", "ratio", "beta", "alpha", "seed")} == {
        k: SAVED_SCHEDULER[k] for k in ("n_layers", "policy", "ratio", "beta", "alpha", "seed")
    }
