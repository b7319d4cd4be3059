"""Client failures through the server's round loop: crashes, silence, dead nodes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Error, Message

from clients.client_app import app as client_app
from fedquant.config import RunConfig
from fedquant.dpquant import QuantPolicy
from fedquant.models import build_model
from sims.app.checkpoint import load_checkpoint
from sims.app.server_app import run
from sims.launch.inprocess import InProcessGrid
from strategies.quantized import strategy_from_config

CRASHES, SILENT, DEAD = 3, 2, 4  # node ids


class FaultyGrid(InProcessGrid):
    """Node 3's ClientApp crashes, node 2 never answers, node 4 is offline."""

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n != DEAD]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node == CRASHES:
                msg.metadata.__dict__["_message_id"] = f"crash-{id(msg)}"
                self._replies[msg.metadata.message_id] = Message(
                    Error(code=0, reason="ClientApp raised MemoryError"), reply_to=msg
                )
                ids.append(msg.metadata.message_id)
            elif node == SILENT:
                ids.append(f"never-answered-{id(msg)}")
            else:
                ids.extend(super().push_messages([msg]))
        return ids


def faulty_run(tmp_path: Path, *, min_replies: int) -> tuple[RunConfig, list[dict]]:
    cfg = RunConfig.from_flower(
        {
            "num-supernodes": 4,
            "num-server-rounds": 2,
            "local-steps": 10,
            "dp": False,
            "quant-policy": QuantPolicy.NONE,
            "min-replies": min_replies,
            "round-timeout": 1.0,
            "out-dir": str(tmp_path),
        }
    )
    grid = FaultyGrid(client_app, num_nodes=4, run_config=cfg.to_flower())
    start = time.monotonic()
    run(grid, cfg, strategy_from_config(cfg))
    assert time.monotonic() - start < 120  # the dead node did not hang the run
    return cfg, json.loads((tmp_path / "results.json").read_text())["rounds"]


def test_round_goes_on_with_the_replies_it_has(tmp_path: Path) -> None:
    cfg, rounds = faulty_run(tmp_path, min_replies=1)
    for row in rounds:
        assert (row["accepted"], row["failed"], row["missing"], row["skipped"]) == (1, 1, 1, 0)
    assert rounds[-1]["accuracy"] > 0.5  # node 1's updates were applied
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["summary"]["missing-replies"] == 2
    assert results["summary"]["failed-replies"] == 2


def test_below_the_minimum_the_model_is_not_updated(tmp_path: Path) -> None:
    cfg, rounds = faulty_run(tmp_path, min_replies=2)
    assert [row["skipped"] for row in rounds] == [1, 1]
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.server_round == 2
    initial = build_model(cfg.train.model, seed=cfg.run.seed).state_dict()
    for name, value in initial.items():
        np.testing.assert_array_equal(checkpoint.arrays[name], value.numpy(), err_msg=name)
    results = json.loads((tmp_path / "results.json").read_text())
    assert rounds[-1]["accuracy"] == pytest.approx(results["initial"]["accuracy"])
    assert results["summary"]["skipped-rounds"] == 2
