"""Server checkpoints: after every round, everything needed to continue the run.

One file, ``<out-dir>/checkpoint.npz``, holds the global model's arrays and, as a JSON
document in one more array, the round number, the run config, the report so far
(initial evaluation and one row per round) and the strategy's state. It is written to
a temporary file, fsynced and renamed over the previous one, so a crash at any moment
leaves the last complete round's checkpoint intact. It is read with
``allow_pickle=False``: a checkpoint is data, never code.

A resumed run must be the same experiment: every run-config key except those in
``MAY_CHANGE_ON_RESUME`` has to match the checkpoint's, or the run stops before any
client starts, naming the key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedquant.config import ConfigError, RunConfig
from fedquant.files import write_atomically

CHECKPOINT_FILE = "checkpoint.npz"
_META = "__fedquant_checkpoint__"  # an entry name no model parameter has
FORMAT_VERSION = 2  # 2: the strategy state holds the stock base as a whole (strategies.stock)
# Keys that do not change the experiment: a longer run, other timeouts, fewer evals.
MAY_CHANGE_ON_RESUME = frozenset(
    {"resume", "num-server-rounds", "round-timeout", "eval-every", "out-dir"}
    # Post-training quantization runs after training and does not change it.
    | {key for key in RunConfig().to_flower() if key.startswith("ptq")}
)


@dataclass(frozen=True)
class Checkpoint:
    """The state after ``server_round`` complete rounds."""

    server_round: int
    arrays: dict[str, np.ndarray]
    config: dict[str, Any]
    report: dict[str, Any]
    strategy: dict[str, Any]


def checkpoint_path(out_dir: str | Path) -> Path:
    """Where a run in ``out_dir`` keeps its checkpoint."""
    return Path(out_dir) / CHECKPOINT_FILE


def save_checkpoint(out_dir: str | Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` atomically; returns its path."""
    path = checkpoint_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "version": FORMAT_VERSION,
        "server-round": checkpoint.server_round,
        "config": checkpoint.config,
        "report": checkpoint.report,
        "strategy": checkpoint.strategy,
    }
    if _META in checkpoint.arrays:
        raise ValueError(f"a model parameter may not be named {_META!r}")
    entries = dict(checkpoint.arrays)
    entries[_META] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    write_atomically(path, lambda f: np.savez(f, **entries), durable=True)  # type: ignore[arg-type]
    return path


def load_checkpoint(out_dir: str | Path) -> Checkpoint | None:
    """The last complete round's checkpoint in ``out_dir``, or None if there is none."""
    path = checkpoint_path(out_dir)
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as data:
        if _META not in data.files:
            raise ValueError(f"{path} is not a fedquant checkpoint")
        meta = json.loads(data[_META].tobytes().decode())
        arrays = {name: data[name] for name in data.files if name != _META}
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint version {meta.get('version')!r}")
    return Checkpoint(
        server_round=int(meta["server-round"]),
        arrays=arrays,
        config=dict(meta["config"]),
        report=dict(meta["report"]),
        strategy=dict(meta["strategy"]),
    )


def check_same_experiment(checkpoint: Checkpoint, config: Mapping[str, Any]) -> None:
    """Raise ConfigError naming the first key whose value differs from the checkpoint's."""
    for key in sorted(set(checkpoint.config) | set(config)):
        if key in MAY_CHANGE_ON_RESUME:
            continue
        old, new = checkpoint.config.get(key), config.get(key)
        if old != new:
            raise ConfigError(
                key,
                new,
                f"differs from the checkpoint being resumed ({old!r}); "
                "start a new out-dir for a different experiment",
            )
