"""Results of a run: per-round rows, the PTQ section, as JSON, CSV and PNG plots."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedquant.config import Calibration, PTQSettings
from fedquant.files import write_text_atomically

if TYPE_CHECKING:
    from fedquant.ptq import PTQResult

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
    "downlink-float32-bytes",
    "uplink-bits-per-coordinate",
    "downlink-bits-per-coordinate",
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
        # Post-training quantization of the final model (ptq_section / ptq_failure).
        self.ptq: dict[str, Any] | None = None

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
        down = sum(r["downlink-bytes"] or 0 for r in self.rows)
        down_ref = sum(r["downlink-float32-bytes"] or 0 for r in self.rows)
        last = self.rows[-1] if self.rows else {}
        return {
            "rounds": len(self.rows),
            "initial-accuracy": self.initial.get("accuracy"),
            "final-accuracy": last.get("accuracy"),
            "final-loss": last.get("loss"),
            "total-uplink-bytes": up,
            "total-uplink-float32-bytes": ref,
            "total-downlink-bytes": down,
            "total-downlink-float32-bytes": down_ref,
            "compression-ratio": (ref / up) if up else None,
            "uplink-fraction-of-float32": (up / ref) if ref else None,
            "downlink-fraction-of-float32": (down / down_ref) if down_ref else None,
            "total-fraction-of-float32": (
                (up + down) / (ref + down_ref) if ref + down_ref else None
            ),
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
        if self.ptq is not None:
            payload["ptq"] = self.ptq
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
            ("downlink-bytes", "downlink sent", "^", "-"),
            ("downlink-float32-bytes", "downlink as float32", "v", ":"),
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
        bits, down = self.config.get("bits"), self.config.get("downlink-bits", 32)
        downlink = "float32 downlink" if down == 32 else f"{down}-bit downlink"
        fig.suptitle(
            f"fedquant: {bits}-bit updates, {downlink}, aggregator {self.config.get('aggregator')}"
        )
        fig.tight_layout()
        path = self.out_dir / "rounds.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


# Post-training quantization ------------------------------------------------------------


def ptq_section(
    settings: PTQSettings,
    result: PTQResult,
    *,
    accuracy_fp: float,
    accuracy_quantized: float,
    file: str,
    file_bytes: int,
) -> dict[str, Any]:
    """The ``ptq`` section of results.json: settings, test accuracies, sizes, per unit.

    ``drop`` = accuracy_fp - accuracy_quantized; ``compression`` = fp-bytes / packed-bytes
    (float32 parameters against the packed codes, scales included); ``file`` is the packed
    model (``fedquant.ptq.save_quantized``, ``file-bytes`` on disk). The per-unit lists
    follow the reconstruction units in depth order; ``groups`` lists the unit indices
    reconstructed jointly (one entry per unit unless MRECG merged them).
    """
    return {
        **_ptq_settings(settings),
        "error": None,
        "accuracy-fp": accuracy_fp,
        "accuracy-quantized": accuracy_quantized,
        "drop": accuracy_fp - accuracy_quantized,
        "fp-bytes": result.fp_bytes,
        "packed-bytes": result.packed_bytes,
        "compression": result.fp_bytes / result.packed_bytes if result.packed_bytes else None,
        "file": file,
        "file-bytes": file_bytes,
        "seconds": result.seconds,
        "unit-names": list(result.unit_names),
        "unit-losses": [float(v) for v in result.unit_losses],
        "groups": [[int(i) for i in g] for g in result.groups],
        "capacities": [float(v) for v in result.capacities],
    }


def ptq_failure(settings: PTQSettings, error: BaseException) -> dict[str, Any]:
    """The ``ptq`` section of a run whose quantization failed: the settings and the error."""
    return {**_ptq_settings(settings), "error": f"{type(error).__name__}: {error}"}


def _ptq_settings(settings: PTQSettings) -> dict[str, Any]:
    calibrated = settings.calibration is Calibration.VALIDATION
    return {
        "method": settings.method.value,
        "weight-bits": settings.weight_bits,
        "act-bits": settings.act_bits,
        "calibration": settings.calibration.value,
        "calibration-size": settings.calibration_size if calibrated else 0,
    }


def ptq_summary(section: Mapping[str, Any]) -> str:
    """One line for a ``ptq`` section (the ServerApp's summary, the CLI's output)."""
    what = f"ptq {section['method']} W{section['weight-bits']}A{section['act-bits']}"
    if section["error"] is not None:
        return f"{what}: FAILED ({section['error']}); the training results are kept"
    data = (
        f"{section['calibration-size']} validation images"
        if section["calibration"] == Calibration.VALIDATION.value
        else "no data"
    )
    merged = sum(1 for g in section["groups"] if len(g) > 1)
    return (
        f"{what} ({data}): test accuracy {section['accuracy-fp']:.4f} float ->"
        f" {section['accuracy-quantized']:.4f} quantized (drop {section['drop']:+.4f})"
        f" | {section['fp-bytes']:,} B float32 -> {section['packed-bytes']:,} B packed"
        f" (x{section['compression'] or 0.0:.2f}) | {len(section['unit-names'])} units in"
        f" {len(section['groups'])} groups ({merged} merged) | {section['seconds']:.1f} s"
        f" | model {section['file']}"
    )


def plot_ptq_units(path: str | Path, sections: Sequence[Mapping[str, Any]]) -> Path:
    """Per-unit reconstruction loss across depth (log scale), one curve per method.

    Units reconstructed jointly (a group of more than one unit) are shaded in their
    method's colour; a second panel shows the capacities MRECG compared, when there
    are any. Failed sections are left out. This is the view in which Ma et al. (CVPR
    2023, Fig. 1) show BRECQ's loss oscillating with depth.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [s for s in sections if s["error"] is None]
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = [palette[k % len(palette)] for k in range(len(done))]
    capacity = [k for k, s in enumerate(done) if len(s["capacities"]) == len(s["unit-names"]) > 0]
    fig, axes = plt.subplots(1, 2 if capacity else 1, figsize=(13, 4.5) if capacity else (8, 4.5))
    axes = list(axes) if capacity else [axes]
    ax_loss = axes[0]
    any_loss = False
    for section, color in zip(done, colors, strict=True):
        losses = [_positive_or_nan(v) for v in section["unit-losses"]]
        any_loss = any_loss or any(math.isfinite(v) for v in losses)
        ax_loss.plot(
            range(len(losses)),
            losses,
            marker="o",
            color=color,
            label=f"{section['method']} (test accuracy {section['accuracy-quantized']:.4f})",
        )
        merged = [g for g in section["groups"] if len(g) > 1]
        for j, group in enumerate(merged):
            ax_loss.axvspan(
                min(group) - 0.4,
                max(group) + 0.4,
                color=color,
                alpha=0.15,
                label=f"{section['method']}: units reconstructed jointly" if j == 0 else None,
            )
    if any_loss:
        ax_loss.set_yscale("log")
    else:
        ax_loss.text(
            0.5,
            0.5,
            "no per-unit losses (no calibration data)",
            ha="center",
            transform=ax_loss.transAxes,
        )
    ax_loss.set(
        xlabel="reconstruction unit (depth)",
        ylabel="reconstruction loss (MSE)",
        title="Per-unit reconstruction loss",
    )
    if capacity:
        for k in capacity:
            values = done[k]["capacities"]
            axes[1].plot(
                range(len(values)), values, marker="s", color=colors[k], label=done[k]["method"]
            )
        axes[1].set(xlabel="reconstruction unit (depth)", ylabel="capacity", title="Capacity")
    names = list(done[0]["unit-names"]) if done else []
    same_units = all(s["unit-names"] == names for s in done)
    for ax in axes:
        if same_units:
            ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        else:  # AdaRound's units are layers, the others' blocks: indices only
            ax.set_xlabel("reconstruction unit index (depth; methods' units differ)")
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if done:
        first = done[0]
        data = (
            f"{first['calibration-size']} calibration images"
            if first["calibration"] == Calibration.VALIDATION.value
            else "no calibration data"
        )
        fig.suptitle(
            f"Post-training quantization W{first['weight-bits']}A{first['act-bits']}, {data}"
        )
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _positive_or_nan(value: Any) -> float:
    """A loss for a log axis: NaN (a gap in the curve) unless finite and positive."""
    v = float("nan") if value is None else float(value)
    return v if math.isfinite(v) and v > 0.0 else float("nan")


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):  # per-layer values: one cell, ';'-separated
        return ";".join(f"{v:.4g}" for v in value)
    return repr(value)
