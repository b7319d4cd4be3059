"""The quantized downlink: the server broadcasts the global model as quantized deltas.

With ``downlink-bits`` B < 32 the server does not send the float32 model each round.
It keeps the model every client reconstructs, ``w_hat_v`` (version v), and advances it
toward the model it wants to broadcast, ``w``, by one quantized delta per round::

    d_v     = Q_B(w - w_hat_{v-1})                 (fedquant.payload's codec, B bits)
    w_hat_v = w_hat_{v-1} + deq(d_v)               (float32, the same adds on both ends)

Quantizing the distance to ``w`` itself, not this round's change, is error feedback on
the server (DoubleSqueeze, Tang et al. ICML 2019; Philippenko & Dieuleveut, "Artemis",
2020): what one delta misses is part of the next, so the broadcast never drifts from
``w`` by more than one quantization error. Rounding is to nearest (the server has
nothing to hide, and unbiasedness is not needed under error feedback).

A client holding ``w_hat_b`` receives the deltas ``d_{b+1} .. d_v`` (the server keeps the
last ``history`` of them) and a SHA-256 digest of ``w_hat_v``; it applies them in order
and checks the digest, so a client whose copy is not what the server thinks fails
loudly instead of training from a wrong model. A client the server has no record of
(first contact, a failed reply, a copy older than the history) gets ``w_hat_v`` in
float32. Version 0 is the run's initial model; when it is the model every client builds
from the run seed, the server may count every client as holding it.

Instruction layout (beside ``CONFIG_KEY``, which carries ``downlink-version``,
``downlink-base`` and ``downlink-sha256``): ``downlink.<v>.codes``, ``downlink.<v>.quant``
and, with a rotation, ``downlink.<v>.codec``: the records of
:func:`fedquant.payload.encode_update` for delta v, one set per version after the base.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedquant.codec import ClipRule, Rounding
from fedquant.config import Rotation, check_bits
from fedquant.payload import (
    CODEC_KEY,
    CODES_KEY,
    META_KEY,
    PayloadError,
    decode_update,
    encode_update,
    needs_seed,
)
from fedquant.seeds import node_seed

__all__ = [
    "BASE",
    "DIGEST",
    "VERSION",
    "Broadcaster",
    "DownlinkError",
    "apply_deltas",
    "delta_keys",
    "model_digest",
]

VERSION = "downlink-version"
"""Instruction config: the version of the model the instruction carries."""
BASE = "downlink-base"
"""Instruction config: the version the deltas apply to (absent with a float32 model)."""
DIGEST = "downlink-sha256"
"""Instruction config: :func:`model_digest` of the model at ``VERSION``."""
_PREFIX = "downlink"
_ROUNDING = Rounding.NEAREST
_SEED_STREAM = 3  # node_seed stream of the downlink's rotation seeds


class DownlinkError(ValueError):
    """An instruction the client cannot turn into the model the server means."""


def model_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the tensors' names, shapes and float32 bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name], dtype=np.float32)
        digest.update(f"{name}:{value.shape};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def delta_keys(version: int) -> tuple[str, str, str]:
    """Instruction keys of delta ``version``: its codes, metadata and codec records."""
    prefix = f"{_PREFIX}.{version}."
    return prefix + CODES_KEY, prefix + META_KEY, prefix + CODEC_KEY


@dataclass
class Broadcaster:
    """The server's side: the broadcast model, its recent deltas, what each node holds.

    Args:
        bits: code bits of the deltas (1..8).
        rotation, entropy_coding: the codec options of the deltas (as the uplink's).
        seed: the run seed (the deltas' public rotation seeds derive from it).
        history: deltas kept; a node further behind gets the float32 model.
    """

    bits: int
    rotation: Rotation = Rotation.NONE
    entropy_coding: bool = False
    seed: int = 0
    history: int = 8
    model: dict[str, np.ndarray] = field(default_factory=dict)
    version: int = 0
    deltas: dict[int, RecordDict] = field(default_factory=dict)
    held: dict[int, int] = field(default_factory=dict)
    """node id -> the version it holds (as far as the server knows)."""

    def __post_init__(self) -> None:
        check_bits(self.bits, key="downlink-bits")
        if self.bits == 32:
            raise ValueError("a Broadcaster needs downlink-bits in 1..8")

    def reset(self, model: Mapping[str, np.ndarray], *, version: int) -> None:
        """Start over from ``model`` (float32) at ``version``: no deltas, no node known."""
        self.model = {k: np.array(v, dtype=np.float32) for k, v in model.items()}
        self.version = version
        self.deltas.clear()
        self.held.clear()

    def advance(self, target: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Quantize ``target - model`` into the next delta; return the new model."""
        update = {
            k: torch.from_numpy(np.asarray(target[k], np.float32) - self.model[k])
            for k in self.model
        }
        version = self.version + 1
        seeded = needs_seed(rotation=self.rotation, rounding=_ROUNDING)
        content = encode_update(
            update,
            bits=self.bits,
            clip=ClipRule.OCTAV,
            rounding=_ROUNDING,
            rotation=self.rotation,
            entropy_coding=self.entropy_coding,
            seed=node_seed(self.seed, version, _SEED_STREAM) if seeded else None,
        )
        self.model = _apply(self.model, content, rotation=self.rotation)
        self.version = version
        self.deltas[version] = content
        for old in [v for v in self.deltas if v <= version - self.history]:
            del self.deltas[old]
        return {k: v.copy() for k, v in self.model.items()}

    def instruction(self, node: int) -> dict[str, ArrayRecord | MetricRecord | ConfigRecord] | None:
        """The delta records for ``node``, or None when it must get the float32 model.

        Returned as ``{key: record}`` plus ``BASE`` in the config the caller sends.
        """
        base = self.held.get(node)
        if base is None or base > self.version:
            return None
        versions = range(base + 1, self.version + 1)
        if any(v not in self.deltas for v in versions):
            return None
        records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {}
        for v in versions:
            for key, name in zip(delta_keys(v), (CODES_KEY, META_KEY, CODEC_KEY), strict=True):
                if name in self.deltas[v]:
                    records[key] = self.deltas[v][name]
        return records


def _apply(
    model: Mapping[str, np.ndarray], content: RecordDict, *, rotation: Rotation
) -> dict[str, np.ndarray]:
    """``model + deq(delta)`` in float32, exactly as every client computes it."""
    decoded = decode_update(
        content,
        expected={k: tuple(v.shape) for k, v in model.items()},
        rotation=rotation,
        rounding=_ROUNDING,
    )
    return {k: (model[k] + decoded[k].values).astype(np.float32) for k in model}


def apply_deltas(
    model: Mapping[str, np.ndarray],
    instruction: RecordDict,
    *,
    base: int,
    version: int,
    digest: str,
    rotation: Rotation,
) -> dict[str, np.ndarray]:
    """The client's side: its copy at ``base`` plus deltas ``base+1 .. version``.

    Each delta is decoded as strictly as a reply; the result must hash to ``digest``.

    Raises:
        DownlinkError: a delta missing or malformed, or a result whose digest differs
            (the copy was not the server's ``w_hat_base``).
    """
    current = {k: np.asarray(v, np.float32) for k, v in model.items()}
    for v in range(base + 1, version + 1):
        codes_key, meta_key, codec_key = delta_keys(v)
        records = {CODES_KEY: codes_key, META_KEY: meta_key}
        if needs_seed(rotation=rotation, rounding=_ROUNDING):
            records[CODEC_KEY] = codec_key
        missing = [key for key in records.values() if key not in instruction]
        if missing:
            raise DownlinkError(f"delta {v}: missing records {missing}")
        delta = RecordDict({name: instruction[key] for name, key in records.items()})
        try:
            current = _apply(current, delta, rotation=rotation)
        except PayloadError as err:
            raise DownlinkError(f"delta {v}: {err}") from err
    if model_digest(current) != digest:
        raise DownlinkError(
            f"the model rebuilt from version {base} does not match the server's version "
            f"{version}: this node's copy is not the one the server assumed"
        )
    return current
