"""A client's state, in memory and on disk, so that a restart never resets ε.

DP composes over every release computed from a node's data, so the accountant's
history belongs to the node, not to a process: a SuperNode that is killed and
restarted must go on from the ε it had spent. :class:`NodeState` is that state: the
:class:`PrivacyRecord` (the ledger of every mechanism application and the noise
multiplier calibrated once for the run), DPQuant's scheduler, and the codec's
:class:`NodeTensors` (the error-feedback residual and the node's copy of the quantized
broadcast). ``NodeStateStore`` keeps the records as one JSON file in the node's state
directory and the tensors in a ``.npz`` file beside it, whose SHA-256 the JSON records.

Writes are atomic (temporary file, fsync, rename, fsync of the directory), so after a
crash the file holds either the previous round's state or this round's, never half of
one. Reads fail closed: a file that exists but is unreadable, malformed in any field,
or (for a private client) without a complete privacy record raises
:class:`NodeStateError` naming the file and the field, never an empty history: silently
starting over would under-report the privacy spent. A ledger shortened by a lost entry
is caught by the record's redundant ``steps-total``; a ledger rewritten consistently
is not detectable (the file is the node's own, not protected against its owner).
The tensor file is written before the JSON that names its digest, so a crash between
the two leaves a JSON whose digest no longer matches: that too fails closed.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedquant.accounting import PrivacyLedger
from fedquant.checks import is_finite, is_int
from fedquant.dpquant import LayerScheduler
from fedquant.files import write_atomically, write_text_atomically

STATE_FILE = "fedquant-node-state.json"
TENSOR_FILE = "fedquant-node-tensors.npz"
FORMAT_VERSION = 1
PRIVACY_RECORD = "fedquant.privacy"
SCHEDULER_RECORD = "fedquant.dpquant"
TENSOR_RECORD = "fedquant.tensors"
"""JSON record naming the tensor file's digest (``sha256``) and size (``bytes``)."""
RECORDS = (PRIVACY_RECORD, SCHEDULER_RECORD, TENSOR_RECORD)
_RESIDUAL = "residual/"
_MODEL = "model/"
_MODEL_ROUND = "model-round"
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
class NodeTensors:
    """The codec's per-node tensors, carried from round to round.

    ``residual``: the error-feedback memory ``e`` (EF, Seide et al. 2014; Karimireddy et
    al. ICML 2019), what quantization left out of the node's last upload, added to its
    next update before quantizing; empty when error feedback is off or before the first
    upload. ``model``: the node's copy of the quantized broadcast, as it reconstructed it
    for round ``model_round`` (the base the server's next downlink delta applies to);
    empty with ``model_round`` None when the node holds none.
    """

    residual: dict[str, np.ndarray] = field(default_factory=dict)
    model: dict[str, np.ndarray] = field(default_factory=dict)
    model_round: int | None = None

    def __post_init__(self) -> None:
        if (self.model_round is None) != (not self.model):
            raise ValueError("`model` and `model_round` must be given together")
        round_ = self.model_round
        if round_ is not None and not (is_int(round_) and round_ >= 0):
            raise ValueError(f"`model_round` must be an int >= 0, got {self.model_round!r}")

    @property
    def empty(self) -> bool:
        """Whether there is nothing to keep."""
        return not self.residual and not self.model

    def to_bytes(self) -> bytes:
        """An ``.npz`` archive (no pickles): ``residual/<name>``, ``model/<name>``, the round."""
        arrays = {_RESIDUAL + k: np.asarray(v, np.float32) for k, v in self.residual.items()}
        arrays |= {_MODEL + k: np.asarray(v, np.float32) for k, v in self.model.items()}
        round_ = -1 if self.model_round is None else self.model_round
        arrays[_MODEL_ROUND] = np.array(round_, np.int64)
        buffer = io.BytesIO()
        np.savez(buffer, allow_pickle=False, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> NodeTensors:
        """Inverse of :meth:`to_bytes`; ``ValueError`` on anything else."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except Exception as err:  # any parse failure means a damaged file
            raise ValueError(f"not a readable .npz archive: {err}") from None
        round_array = arrays.pop(_MODEL_ROUND, None)
        if round_array is None or round_array.shape != () or round_array.dtype != np.int64:
            raise ValueError(f"missing or malformed {_MODEL_ROUND!r}")
        residual, model = {}, {}
        for name, value in arrays.items():
            if value.dtype != np.float32 or not np.isfinite(value).all():
                raise ValueError(f"array {name!r} must hold finite float32 values")
            if name.startswith(_RESIDUAL):
                residual[name[len(_RESIDUAL) :]] = value
            elif name.startswith(_MODEL):
                model[name[len(_MODEL) :]] = value
            else:
                raise ValueError(f"unknown array {name!r}")
        round_ = int(round_array)
        return cls(residual, model, None if round_ < 0 else round_)


@dataclass(frozen=True)
class NodeState:
    """Everything a node carries from round to round (any part may be absent)."""

    privacy: PrivacyRecord | None = None
    scheduler: LayerScheduler | None = None
    tensors: NodeTensors = field(default_factory=NodeTensors)

    def to_records(self) -> dict[str, dict[str, Any]]:
        """``{record name: fields}`` of the JSON records present (the tensors aside)."""
        records = {}
        if self.privacy is not None:
            records[PRIVACY_RECORD] = self.privacy.to_dict()
        if self.scheduler is not None:
            records[SCHEDULER_RECORD] = self.scheduler.to_dict()
        return records

    @classmethod
    def from_records(
        cls, records: object, *, source: str, tensors: NodeTensors | None = None
    ) -> NodeState:
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
        return cls(privacy, scheduler, tensors if tensors is not None else NodeTensors())


class NodeStateStore:
    """Load and atomically save a node's persistent state (a JSON object)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()
        self.path = self.directory / STATE_FILE
        self.tensor_path = self.directory / TENSOR_FILE

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
        records = state["records"]
        tensors = None
        if isinstance(records, dict) and TENSOR_RECORD in records:
            records = dict(records)
            tensors = self._load_tensors(records.pop(TENSOR_RECORD))
        loaded = NodeState.from_records(records, source=str(self.path), tensors=tensors)
        if require_privacy and loaded.privacy is None:
            raise NodeStateError(
                f"{self.path}: no privacy record '{PRIVACY_RECORD}': refusing to train "
                f"with a fresh privacy budget where one was spent"
            )
        return loaded

    def _load_tensors(self, record: object) -> NodeTensors:
        """The tensor file the JSON names, checked against its recorded digest."""
        where = f"{self.path}: record '{TENSOR_RECORD}'"
        if not (isinstance(record, dict) and set(record) == {"sha256", "bytes"}):
            raise NodeStateError(f"{where} must hold exactly 'sha256' and 'bytes'")
        try:
            data = self.tensor_path.read_bytes()
        except OSError as err:
            raise NodeStateError(f"{where} names {self.tensor_path}: {err}") from err
        if len(data) != record["bytes"] or hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise NodeStateError(
                f"{self.tensor_path} does not match the digest in {self.path}: damaged, "
                f"or a crash fell between writing the two"
            )
        try:
            return NodeTensors.from_bytes(data)
        except ValueError as err:
            raise NodeStateError(f"{self.tensor_path}: {err}") from err

    def save(self, state: NodeState) -> None:
        """Replace the saved state with ``state`` atomically (tensors first, then JSON)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        records = state.to_records()
        if not state.tensors.empty:
            data = state.tensors.to_bytes()
            write_atomically(self.tensor_path, lambda f: f.write(data), durable=True)
            records[TENSOR_RECORD] = {
                "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data),
            }
        text = json.dumps({"version": FORMAT_VERSION, "records": records}, allow_nan=False)
        write_text_atomically(self.path, text, durable=True)
