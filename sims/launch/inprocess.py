"""An in-process Flower ``Grid`` for parameter sweeps and benchmarks.

It delivers each message to the real ``ClientApp`` object in this process, one node
after another, so a sweep runs the same ServerApp loop, strategy and client code as
a simulation, minus the SuperLink, Ray and process start-up that dominate small runs.
Use ``sims.launch.run`` (Flower's simulation runtime with Ray) for anything that is not a
sweep: this grid has no isolation between clients and no parallelism.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from logging import WARNING
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.run import Run
from flwr.serverapp import Grid
from flwr.supercore import log
from flwr.supercore.task_identity import TaskIdentity

from fedquant.config import RunConfig
from sims.app.report import RunReport
from sims.app.server_app import run as run_server
from strategies.quantized import strategy_from_config


class InProcessGrid(Grid):
    """Nodes 1..N, each a ``ClientApp`` call with its own persistent ``Context``."""

    def __init__(
        self,
        client_app: ClientApp,
        *,
        num_nodes: int,
        run_config: Mapping[str, Any],
        run_id: int = 1,
    ) -> None:
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        # Flower's runtimes set the identity of the process's task; so must this grid.
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        self.contexts = {
            node_id: Context(
                run_id=run_id,
                node_id=node_id,
                node_config={"partition-id": node_id - 1, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for node_id in range(1, num_nodes + 1)
        }
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg_id = str(uuid.uuid4())
            msg.metadata.__dict__["_message_id"] = msg_id
            msg.metadata.__dict__["_run_id"] = self._run.run_id
            context = self.contexts[msg.metadata.dst_node_id]
            try:
                reply = self.client_app(msg, context)
            except Exception as err:  # a client crash becomes an error reply, as in Flower
                log(WARNING, "node %d raised %r", msg.metadata.dst_node_id, err)
                reply = Message(Error(code=0, reason=repr(err)), reply_to=msg)
            self._replies[msg_id] = reply
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        start = time.monotonic()
        replies = list(self.pull_messages(self.push_messages(messages)))
        if timeout is not None and time.monotonic() - start > timeout:
            log(WARNING, "in-process round took longer than its timeout of %.0f s", timeout)
        return replies


def run_in_process(cfg: RunConfig) -> RunReport:
    """Run the ServerApp loop for ``cfg`` with all clients in this process."""
    from clients.client_app import app as client_app

    grid = InProcessGrid(client_app, num_nodes=cfg.num_supernodes, run_config=cfg.to_flower())
    return run_server(grid, cfg, strategy_from_config(cfg))
