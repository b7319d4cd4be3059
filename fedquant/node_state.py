"""A client's privacy state on disk, so that a restart never resets its epsilon.

DP composes over every release computed from a node's data, so the accountant's
history belongs to the node, not to a process: a SuperNode that is killed and
restarted must go on from the ε it had spent. ``NodeStateStore`` keeps one JSON file
in the node's state directory with the ledger of every mechanism application, the
noise multiplier calibrated once for the run, and DPQuant's scheduler state.

Writes are atomic (temporary file, fsync, rename, fsync of the directory), so after a
crash the file holds either the previous round's state or this round's, never half of
one. A file that exists but cannot be read is an error, never an empty history:
silently starting over would under-report the privacy spent.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

STATE_FILE = "fedquant-node-state.json"
FORMAT_VERSION = 1


class NodeStateError(RuntimeError):
    """The node's state file exists but is unreadable or malformed."""


class NodeStateStore:
    """Load and atomically save a node's persistent state (a JSON object)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()
        self.path = self.directory / STATE_FILE

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None if this node has never saved one."""
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
        return dict(state["records"])

    def save(self, records: dict[str, Any]) -> None:
        """Replace the saved state with ``records`` atomically."""
        self.directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"version": FORMAT_VERSION, "records": records})
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{STATE_FILE}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power loss
        finally:
            os.close(dir_fd)
