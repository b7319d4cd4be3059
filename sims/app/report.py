"""Per-round results of a run: progress lines, JSON, CSV and a PNG plot."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedquant.files import write_text_atomically

# Columns of rounds.csv, in order; also the keys of each round in results.json.
COLUMNS = (
    "round",
    "accuracy",
    "loss",
    "accepted",
    "rejected",
    "failed",
    "missing",
    "skipped",
    "discarded",
    "norm-clipped",
    "down-weighted",
    "step-norm",
    "budget-exhausted",
    "epsilon-max",
    "epsilon-clients",
    "speedup",
    "quantized-layer-fraction",
    "uplink-bytes",
    "uplink-float32-bytes",
    "downlink-bytes",
    "compression",
    "mse-mean",
    "mse-max",
)


def strict_json(value: Any) -> str:
    """``value`` as standard JSON (RFC 8259).

    A non-finite float (a diverged loss) becomes null, never the ``NaN``/``Infinity``
    tokens strict parsers refuse.
    """
    return json.dumps(_finite(value), indent=2, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class RunReport:
    """Collects one row per round and writes the results folder after each round."""

    def __init__(self, out_dir: str | Path, config: Mapping[str, Any]) -> None:
        self.out_dir = Path(out_dir)
        self.config = dict(config)
        self.rows: list[dict[str, Any]] = []
        self.initial: dict[str, float] = {}
        # What the run gives up (e.g. seeded DP noise), repeated in results.json.
        self.warnings: list[str] = []

    def add_round(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Record one round's row (every column of ``COLUMNS``) and return it."""
        full = {c: row.get(c) for c in COLUMNS}
        up, ref = full["uplink-bytes"], full["uplink-float32-bytes"]
        full["compression"] = (ref / up) if up else None
        self.rows.append(full)
        self.write()
        return full

    def summary(self) -> dict[str, Any]:
        """Totals over the run: final accuracy, bytes in both directions, epsilon."""
        up = sum(r["uplink-bytes"] or 0 for r in self.rows)
        ref = sum(r["uplink-float32-bytes"] or 0 for r in self.rows)
        last = self.rows[-1] if self.rows else {}
        return {
            "rounds": len(self.rows),
            "initial-accuracy": self.initial.get("accuracy"),
            "final-accuracy": last.get("accuracy"),
            "final-loss": last.get("loss"),
            "total-uplink-bytes": up,
            "total-uplink-float32-bytes": ref,
            "total-downlink-bytes": sum(r["downlink-bytes"] or 0 for r in self.rows),
            "compression-ratio": (ref / up) if up else None,
            "uplink-fraction-of-float32": (up / ref) if ref else None,
            "max-epsilon": max((r["epsilon-max"] or 0.0 for r in self.rows), default=0.0),
            "mean-speedup": (
                sum(r["speedup"] or 1.0 for r in self.rows) / len(self.rows) if self.rows else None
            ),
            "rejected-replies": sum(r["rejected"] or 0 for r in self.rows),
            "failed-replies": sum(r["failed"] or 0 for r in self.rows),
            "missing-replies": sum(r["missing"] or 0 for r in self.rows),
            "skipped-rounds": sum(r["skipped"] or 0 for r in self.rows),
            "discarded-rounds": sum(r["discarded"] or 0 for r in self.rows),
            "norm-clipped-replies": sum(r["norm-clipped"] or 0 for r in self.rows),
            "down-weighted-replies": sum(r["down-weighted"] or 0 for r in self.rows),
        }

    def write(self) -> None:
        """Write results.json and rounds.csv to ``out_dir`` (atomically)."""
        payload = {
            "config": self.config,
            "warnings": self.warnings,
            "initial": self.initial,
            "rounds": self.rows,
            "summary": self.summary(),
        }
        write_text_atomically(self.out_dir / "results.json", strict_json(payload))
        lines = [",".join(COLUMNS)]
        for row in self.rows:
            lines.append(",".join(_csv_cell(row[c]) for c in COLUMNS))
        write_text_atomically(self.out_dir / "rounds.csv", "\n".join(lines) + "\n")

    def plot(self) -> Path:
        """Accuracy, epsilon and bytes in both directions per round, as rounds.png."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r["round"] for r in self.rows]
        fig, (ax_acc, ax_eps, ax_bytes) = plt.subplots(1, 3, figsize=(15, 4))
        evaluated = [(0, self.initial.get("accuracy"))] + [
            (r["round"], r["accuracy"]) for r in self.rows
        ]
        evaluated = [(x, y) for x, y in evaluated if y is not None]
        ax_acc.plot([x for x, _ in evaluated], [y for _, y in evaluated], marker="o")
        ax_acc.set(xlabel="round", ylabel="test accuracy", title="Central test accuracy")
        ax_eps.plot(rounds, [r["epsilon-max"] or 0.0 for r in self.rows], marker="o")
        private = self.config.get("dp", True)
        ax_eps.set(
            xlabel="round",
            ylabel="epsilon (largest client)",
            title="Privacy spent" if private else "Privacy spent (no DP: none promised)",
        )
        kib = 1024.0
        series = (
            ("uplink-bytes", "uplink sent (quantized)", "o", "-"),
            ("uplink-float32-bytes", "uplink as float32", "s", "--"),
            ("downlink-bytes", "downlink sent (float32 model)", "^", "-"),
        )
        for key, label, marker, style in series:
            ax_bytes.plot(
                rounds,
                [(r[key] or 0) / kib for r in self.rows],
                marker=marker,
                linestyle=style,
                label=label,
            )
        ax_bytes.set(xlabel="round", ylabel="KiB per round (all clients)", title="Traffic")
        if any((r[key] or 0) > 0 for r in self.rows for key, *_ in series):
            ax_bytes.set_yscale("log")  # nothing to scale when no reply was accepted
        ax_bytes.legend()
        for ax in (ax_acc, ax_eps, ax_bytes):
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
        bits = self.config.get("bits")
        fig.suptitle(f"fedquant: {bits}-bit updates, aggregator {self.config.get('aggregator')}")
        fig.tight_layout()
        path = self.out_dir / "rounds.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):  # per-layer values: one cell, ';'-separated
        return ";".join(f"{v:.4g}" for v in value)
    return repr(value)
