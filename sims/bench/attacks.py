"""Hostile clients for robustness tests and ``sims.bench.robust``.

A hostile client trains honestly and then edits its reply before it leaves: it lies
about its quantization error or its example count, scales (or sign-flips) its update
and re-encodes it as valid codes with an honest MSE for the scaled values, or adds
metrics the run does not allow. Every edited reply is well-formed, so it passes the
codec's checks; what it can still do to the model is what the strategy must bound.
:class:`HostileGrid` runs the real ServerApp loop, strategy and ClientApp in-process
(``sims.launch.inprocess``) with some nodes hostile.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import Message, RecordDict
from flwr.clientapp import ClientApp

from fedquant.codec import ClipRule, Rounding
from fedquant.payload import (
    CODES_KEY,
    META_KEY,
    META_SEP,
    PayloadError,
    decode_update,
    encode_update,
)
from fedquant.reply import METRICS_KEY, SERVER_ROUND
from sims.launch.inprocess import InProcessGrid

# An edit of a reply's records by the node that sends it.
Edit = Callable[[RecordDict, int], RecordDict]


@dataclass(frozen=True)
class Attack:
    """What a hostile client does to its reply's records.

    It edits them in the rounds it attacks (``rounds``; empty: every round).
    """

    name: str
    edit: Edit
    rounds: Collection[int] = ()


def zero_mse(content: RecordDict, node: int) -> RecordDict:
    """Claim a quantization error of 0 on every tensor (to win error weighting)."""
    meta = content.config_records[META_KEY]
    for key in list(meta.keys()):
        if key.rsplit(META_SEP, 1)[1] == "mse":
            meta[key] = 0.0
    return content


def scaled(factor: float) -> Edit:
    """Multiply the update by ``factor`` (negative: sign-flipped) and re-encode it.

    The result is valid codes at the same bits, reporting the honest MSE of the
    re-encoding. The decoded values sit on the client's grid, and a scaled copy of a grid
    re-encodes with almost no error, an MSE no honest client reports; a uniform
    jitter of one grid step first gives back continuous values like the update the
    client computed, so the reply looks like an honest encoding of a scaled update.
    """

    def edit(content: RecordDict, node: int) -> RecordDict:
        decoded = decode_update(content)
        generator = torch.Generator().manual_seed(node)
        update = {}
        for name, tensor in decoded.items():
            values = torch.from_numpy(tensor.values.copy())
            step = 2 * tensor.clip / ((1 << tensor.bits) - 1) if tensor.bits <= 8 else 0.0
            jitter = (torch.rand(values.shape, generator=generator) - 0.5) * step
            update[name] = factor * (values + jitter)
        bits = {t.bits for t in decoded.values()}.pop()
        records = encode_update(
            update,
            bits=bits,
            clip=ClipRule.OCTAV,
            rounding=Rounding.STOCHASTIC,
            generator=generator,
        )
        records[METRICS_KEY] = content[METRICS_KEY]
        return records

    return edit


def metrics(**values: Any) -> Edit:
    """Set reply metrics (kebab-case keys are given with underscores)."""

    def edit(content: RecordDict, node: int) -> RecordDict:
        record = content[METRICS_KEY]
        for key, value in values.items():
            record[key.replace("_", "-")] = value
        return content

    return edit


def chained(*edits: Edit) -> Edit:
    """The edits applied in order."""

    def edit(content: RecordDict, node: int) -> RecordDict:
        for one in edits:
            content = one(content, node)
        return content

    return edit


ATTACKS: dict[str, Callable[..., Attack]] = {
    "mse-zero": lambda: Attack("mse-zero", zero_mse),
    "flip-x9": lambda: Attack("flip-x9", scaled(-9.0)),
    "scale-x100": lambda: Attack("scale-x100", scaled(100.0)),
    # Error weighting's worst case: a flipped update that claims to be exact.
    "flip-x9+mse-zero": lambda: Attack("flip-x9+mse-zero", chained(scaled(-9.0), zero_mse)),
}
"""Attacks by name (``sims.bench.robust``); each call builds a fresh one."""


class HostileGrid(InProcessGrid):
    """An in-process grid with hostile nodes.

    An :class:`~sims.launch.inprocess.InProcessGrid` whose nodes in ``attacks`` edit
    their training replies before the server sees them.
    """

    def __init__(
        self,
        client_app: ClientApp,
        *,
        num_nodes: int,
        run_config: Mapping[str, Any],
        attacks: Mapping[int, Attack],
    ) -> None:
        super().__init__(client_app, num_nodes=num_nodes, run_config=run_config)
        self.attacks = dict(attacks)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver ``messages``; a hostile node's training reply is edited on its way back."""
        ids = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            (msg_id,) = super().push_messages([msg])
            ids.append(msg_id)
            attack = self.attacks.get(node)
            reply = self._replies[msg_id]
            if attack is not None and not reply.has_error() and CODES_KEY in reply.content:
                server_round = reply.content.metric_records[METRICS_KEY][SERVER_ROUND]
                if not attack.rounds or server_round in attack.rounds:
                    try:
                        content = attack.edit(copy.deepcopy(reply.content), node)
                    except PayloadError:  # its own update no longer decodes: send it as is
                        continue
                    self._replies[msg_id] = Message(content=content, reply_to=msg)
        return ids
