"""A client's privacy state, in memory and on disk, so that a restart never resets ε.

DP composes over every release computed from a node's data, so the accountant's
history belongs to the node, not to a process: a SuperNode that is killed and
restarted must go on from the ε it had spent. :class:`NodeState` is that state: the
:class:`PrivacyRecord` (the ledger of every mechanism application and the noise
multiplier calibrated once for the run) and DPQuant's scheduler. ``NodeStateStore``
keeps it as one JSON file in the node's state directory.

Writes are atomic (temporary file, fsync, rename, fsync of the directory), so after a
crash the file holds either the previous round's state or this round's, never half of
one. Reads fail closed: a file that exists but is unreadable, malformed in any field,
or (for a private client) without a complete privacy record raises
:class:`NodeStateError` naming the file and the field, never an empty history: silently
starting over would under-report the privacy spent. A ledger shortened by a lost entry
is caught by the record's redundant ``steps-total``; a ledger rewritten consistently
is not detectable (the file is the node's own, not protected against its owner).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedquant.accounting import PrivacyLedger
from fedquant.checks import is_finite, is_int
from fedquant.dpquant import LayerScheduler
from fedquant.files import write_text_atomically

STATE_FILE = "fedquant-node-state.json"
FORMAT_VERSION = 1
PRIVACY_RECORD = "fedquant.privacy"
SCHEDULER_RECORD = "fedquant.dpquant"
RECORDS = (PRIVACY_RECORD, SCHEDULER_RECORD)
_PRIVACY_FIELDS = ("noise", "rate", "steps", "noise-multiplier", "steps-total")


class NodeStateError(RuntimeError):
    """The node's state exists but is unreadable, malformed or incomplete."""


@dataclass(frozen=True)
class PrivacyRecord:
    """A private node's privacy state: its ledger and its noise multiplier.

    ``ledger`` holds every SGM application so far; ``noise_multiplier`` is the σ
    calibrated once, before the node's first round, for the whole run.
    """

    ledger: PrivacyLedger
    noise_multiplier: float

    def to_dict(self) -> dict[str, Any]:
        """The ledger's lists, σ, and the ledger's step total.

        The total is redundant on purpose: a ledger that lost entries no longer adds up
        to it.
        """
        return {
            **self.ledger.to_dict(),
            "noise-multiplier": self.noise_multiplier,
            "steps-total": self.ledger.total_steps,
        }

    @classmethod
    def from_dict(cls, d: object) -> PrivacyRecord:
        """Inverse of :meth:`to_dict`; strict. Raises ``ValueError`` naming the field."""
        if not isinstance(d, Mapping):
            raise ValueError(f"must be a mapping, got {type(d).__name__}")
        missing = [k for k in _PRIVACY_FIELDS if k not in d]
        if missing:
            raise ValueError(f"missing field(s) {missing}")
        unknown = sorted(map(str, set(d) - set(_PRIVACY_FIELDS)))
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}")
        sigma = d["noise-multiplier"]
        if not (is_finite(sigma) and sigma > 0):
            raise ValueError(f"field 'noise-multiplier' must be finite and > 0, got {sigma!r}")
        try:
            ledger = PrivacyLedger.from_dict({k: d[k] for k in ("noise", "rate", "steps")})
        except ValueError as err:
            raise ValueError(f"ledger fields 'noise', 'rate', 'steps': {err}") from err
        if not len(ledger):
            raise ValueError("ledger fields 'noise', 'rate', 'steps' are empty")
        total = d["steps-total"]
        if not is_int(total) or total != ledger.total_steps:
            raise ValueError(
                f"field 'steps-total' = {total!r} but the ledger records {ledger.total_steps} "
                f"steps: the ledger was shortened or altered"
            )
        if float(sigma) not in {e.noise_multiplier for e in ledger.history}:
            raise ValueError(f"the ledger has no training entry at 'noise-multiplier' = {sigma!r}")
        return cls(ledger, float(sigma))


@dataclass(frozen=True)
class NodeState:
    """Everything a node carries from round to round (either record may be absent)."""

    privacy: PrivacyRecord | None = None
    scheduler: LayerScheduler | None = None

    def to_records(self) -> dict[str, dict[str, Any]]:
        """``{record name: fields}`` of the records present (for ``Context.state``)."""
        records = {}
        if self.privacy is not None:
            records[PRIVACY_RECORD] = self.privacy.to_dict()
        if self.scheduler is not None:
            records[SCHEDULER_RECORD] = self.scheduler.to_dict()
        return records

    @classmethod
    def from_records(cls, records: object, *, source: str) -> NodeState:
        """Parse ``{record name: fields}``; ``NodeStateError`` names ``source`` and the field."""
        if not isinstance(records, Mapping):
            raise NodeStateError(f"{source}: 'records' must be an object, got {records!r:.80}")
        unknown = sorted(map(str, set(records) - set(RECORDS)))
        if unknown:
            raise NodeStateError(f"{source}: unknown record(s) {unknown}")
        privacy = scheduler = None
        try:
            if PRIVACY_RECORD in records:
                privacy = PrivacyRecord.from_dict(records[PRIVACY_RECORD])
        except ValueError as err:
            raise NodeStateError(f"{source}: privacy record '{PRIVACY_RECORD}': {err}") from err
        try:
            if SCHEDULER_RECORD in records:
                scheduler = LayerScheduler.from_dict(records[SCHEDULER_RECORD])
        except (ValueError, TypeError) as err:
            raise NodeStateError(f"{source}: scheduler record '{SCHEDULER_RECORD}': {err}") from err
        return cls(privacy, scheduler)


class NodeStateStore:
    """Load and atomically save a node's persistent state (a JSON object)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()
        self.path = self.directory / STATE_FILE

    def load(self, *, require_privacy: bool) -> NodeState | None:
        """The saved state, or None if this node has never saved one.

        With ``require_privacy`` (a private client), a file without a privacy record is
        an error: it can only be a damaged file, since a private node writes its record
        with its first update.
        """
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise NodeStateError(f"cannot read {self.path}: {err}") from err
        try:
            state = json.loads(text)
        except json.JSONDecodeError as err:
            raise NodeStateError(f"{self.path} is not valid JSON: {err}") from err
        if not isinstance(state, dict) or state.get("version") != FORMAT_VERSION:
            raise NodeStateError(f"{self.path} is not a version-{FORMAT_VERSION} node state")
        if set(state) != {"version", "records"}:
            raise NodeStateError(
                f"{self.path}: expected the fields ['records', 'version'], "
                f"found {sorted(map(str, state))}"
            )
        loaded = NodeState.from_records(state["records"], source=str(self.path))
        if require_privacy and loaded.privacy is None:
            raise NodeStateError(
                f"{self.path}: no privacy record '{PRIVACY_RECORD}': refusing to train "
                f"with a fresh privacy budget where one was spent"
            )
        return loaded

    def save(self, state: NodeState) -> None:
        """Replace the saved state with ``state`` atomically."""
        self.directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps(
            {"version": FORMAT_VERSION, "records": state.to_records()}, allow_nan=False
        )
        write_text_atomically(self.path, text, durable=True)
