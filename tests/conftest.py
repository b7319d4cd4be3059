"""Shared test set-up."""

from __future__ import annotations

import pytest
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture(autouse=True)
def server_task_identity() -> None:
    """Messages built outside Flower's runtimes need the task identity it sets."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID
