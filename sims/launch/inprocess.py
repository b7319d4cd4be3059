"""An in-process Flower ``Grid`` for parameter sweeps and benchmarks.

It delivers each message to the real ``ClientApp`` object in this process (or any
callable with its signature), one node after another, so a sweep runs the same
ServerApp loop, strategy and client code as a simulation, minus the SuperLink, Ray and
process start-up that dominate small runs. Use ``sims.launch.run`` (Flower's simulation
runtime with Ray) for anything that is not a sweep: this grid has no isolation between
clients and no parallelism.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from logging import WARNING
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore import log
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedquant.config import RunConfig
from sims.app.report import RunReport
from sims.app.server_app import run as run_server
from strategies.quantized import strategy_from_config

Client = Callable[[Message, Context], Message]
"""What a node runs on each message: a ``ClientApp`` (``app(msg, context)``), or any
function with its signature."""


class InProcessGrid(Grid):
    """Nodes 1..N, each a ``client_app`` call with its own persistent ``Context``.

    ``client_app``: a ``flwr.clientapp.ClientApp`` or any :data:`Client`. Subclasses
    change how a message reaches the client and back by overriding :meth:`deliver`.
    """

    def __init__(
        self,
        client_app: Client,
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
        """Set the run this grid serves (Flower's ``Grid`` interface)."""
        self._run = run

    @property
    def run(self) -> Run:
        """The run this grid serves."""
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """A message to node ``dst_node_id`` (Flower's ``Grid`` interface)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """The IDs of the connected nodes: 1..N."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node now; keep the replies for ``pull_messages``."""
        ids = []
        for msg in messages:
            msg_id = str(uuid.uuid4())
            msg.metadata.__dict__["_message_id"] = msg_id
            msg.metadata.__dict__["_run_id"] = self._run.run_id
            context = self.contexts[msg.metadata.dst_node_id]
            self._replies[msg_id] = self.deliver(msg, context)
            ids.append(msg_id)
        return ids

    def deliver(self, msg: Message, context: Context) -> Message:
        """The node's reply to ``msg``: the client's, or an error reply if it raises."""
        try:
            return self.client_app(msg, context)
        except Exception as err:  # a client crash becomes an error reply, as in Flower
            log(WARNING, "node %d raised %r", msg.metadata.dst_node_id, err)
            return Message(Error(code=0, reason=repr(err)), reply_to=msg)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to these message IDs that have arrived (all, in-process)."""
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push the messages and return every reply (a late round is only logged)."""
        start = time.monotonic()
        replies = list(self.pull_messages(self.push_messages(messages)))
        if timeout is not None and time.monotonic() - start > timeout:
            log(WARNING, "in-process round took longer than its timeout of %.0f s", timeout)
        return replies


def run_in_process(cfg: RunConfig) -> RunReport:
    """Run the ServerApp loop for ``cfg`` with all clients in this process."""
    from clients.client_app import app as client_app

    grid = InProcessGrid(client_app, num_nodes=cfg.run.num_supernodes, run_config=cfg.to_flower())
    return run_server(grid, cfg, strategy_from_config(cfg, clients_hold_initial=not cfg.run.resume))
