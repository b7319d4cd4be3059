"""Benchmark: final accuracy and bytes sent across bits x codec preset x downlink.

    python -m sims.bench.codec_accuracy            # the default grid: 156 runs (see below)
    python -m sims.bench.codec_accuracy --quick    # 1 seed, IID, 3 short rounds (~5 min)
    python -m sims.bench.codec_accuracy --seeds 0 --bits 4 32 --rounds 3   # a quick look
    # the earlier rounding study (bits x aggregator x rounding, float32 downlink):
    python -m sims.bench.codec_accuracy --codecs baseline nearest --downlinks float32
        --aggregators error-weighted fedavg --bits 1 2 4 8 32

Every cell runs the real ServerApp loop, strategy and ClientApp code in-process
(``sims.bench.sweep``, through ``sims.launch.inprocess.InProcessGrid``), on the
embedded MNIST, with the same rounds, clients and seeds for all cells, and plain local
SGD (communication only: private training has its own sweep, ``sims.bench.private``).

Axes: partitioning (IID, Dirichlet) x bits (1, 2, 4; 32 is the float32 reference, with a
float32 downlink, under every aggregator and FedAvg) x codec preset (:data:`PRESETS`) x
downlink (``float32``, or ``quantized`` at the uplink's bits: ``downlink-bits`` = bits)
x aggregator (default error-weighted, the server's default) x seed. The presets, chosen
as the points of the design space a reader of the compression literature would ask for,
one step apart:

- ``baseline``: today's default, OCTAV-clipped codes with stochastic rounding, packed
  (QSGD-style unbiased rounding, Alistarh et al. 2017; paper B's codec).
- ``eden``: randomized Hadamard rotation, nearest rounding, unbiased scale: DRIVE/EDEN
  (Vargaftik et al. 2021, 2022), the reference for unbiased 1-bit-per-coordinate
  compression; fixed rate, no entropy coding.
- ``rotated-dithered-ans``: the issue's full codec: rotation, subtractive dither (error
  Δ²/12 independent of the input) and ANS coding on a finer grid, so that B is the
  budget in bits per coordinate actually sent.
- ``rotated-dithered-ans-ef``: the same plus client error feedback (Seide et al. 2014;
  Karimireddy et al. 2019), which returns what one round's quantization lost in the
  next: what makes 1 bit per coordinate usable in the literature.
- ``rotated-nearest-ans-ef``: the same with nearest rounding: biased, but with half the
  error of dither at 1 bit, and error feedback returns the bias (EF-SGD, EF21: Richtárik
  et al. 2021).
- ``nearest`` (not in the default grid): OCTAV-clipped nearest rounding, the second
  rounding of the earlier study.

The downlink axis shows what the uplink alone cannot: with a float32 broadcast the
total bytes per round stay above ~half of float32 whatever the uplink does.

Reported per cell: final accuracy (mean ± std over seeds), bits per coordinate actually
sent in each direction (the rounds' ``uplink-bits-per-coordinate`` /
``downlink-bits-per-coordinate``: bytes with every header x 8 over coordinates and
messages) and the bytes of a round in both directions as a fraction of float32, both
averaged over the rounds after the first (round 1 may broadcast the float32 model);
then paper B's targets, issue 13's targets (1 bit per coordinate within 0.5 point of
float32 FedAvg on IID; total bytes per round <= 0.15 of float32 at 4 bits), a plot of
accuracy against bytes per round (``codec-pareto.png``), the quantize + pack throughput
against ``torch.quantize_per_tensor``, and the sweep's run time with an estimate for the
default grid from the per-cell times the sweep records (``--quick`` runs one cell of the
default size for it). Measured on the 2-core dev box: a default-size cell takes 28-35
CPU-seconds (50-104 s of wall time at a load of 4), so the default grid needs ~40 min on
2 idle cores and ~105 min on 2 processes at that load.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sims.bench.sweep import (
    CELL_CPU_SECONDS,
    CELL_SECONDS,
    collect,
    run_sweep,
    sweep_parser,
    write_report,
)

AGGREGATORS = ("error-weighted", "fedavg")
"""Aggregators of the earlier study (``--aggregators``; default: the first)."""
REFERENCE_AGGREGATOR = "fedavg"
"""The float32 reference of the targets: FedAvg on float32 updates."""
FLOAT32 = "float32"
"""Name of the float32 reference (bits 32) in the codec column, and of a float32 downlink."""
QUANTIZED = "quantized"
"""Downlink quantized at the uplink's bits (``downlink-bits`` = ``bits``)."""
DOWNLINKS = (FLOAT32, QUANTIZED)
UNQUANTIZED = 32
CODEC_KEYS = ("rounding", "rotation", "unbiased-scale", "entropy-coding", "error-feedback")
"""The run-config keys a preset sets; every quantized cell sets all of them."""
CELL_KEYS = (
    "partitioning",
    "bits",
    "aggregator",
    *CODEC_KEYS,
    "downlink-bits",
    "seed",
    "num-server-rounds",
    "num-supernodes",
    "local-steps",
)
"""The run-config keys that tell this sweep's cells apart (the last three: their size)."""
CODEC_DEFAULTS: dict[str, Any] = {
    "rounding": "stochastic",
    "rotation": "none",
    "unbiased-scale": False,
    "entropy-coding": False,
    "error-feedback": False,
}


@dataclass(frozen=True)
class Preset:
    """A named codec: run-config overrides on top of :data:`CODEC_DEFAULTS`."""

    name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)

    @property
    def settings(self) -> dict[str, Any]:
        """Every key of :data:`CODEC_KEYS`, with this preset's values."""
        return {**CODEC_DEFAULTS, **self.overrides}


PRESETS = {
    p.name: p
    for p in (
        Preset("baseline"),
        Preset("nearest", {"rounding": "nearest"}),
        Preset("eden", {"rotation": "hadamard", "rounding": "nearest", "unbiased-scale": True}),
        Preset(
            "rotated-dithered-ans",
            {"rotation": "hadamard", "rounding": "dithered", "entropy-coding": True},
        ),
        Preset(
            "rotated-dithered-ans-ef",
            {
                "rotation": "hadamard",
                "rounding": "dithered",
                "entropy-coding": True,
                "error-feedback": True,
            },
        ),
        Preset(
            "rotated-nearest-ans-ef",
            {
                "rotation": "hadamard",
                "rounding": "nearest",
                "entropy-coding": True,
                "error-feedback": True,
            },
        ),
    )
}
"""Codec presets by name (the module docstring says why these)."""
DEFAULT_CODECS = (
    "baseline",
    "eden",
    "rotated-dithered-ans",
    "rotated-dithered-ans-ef",
    "rotated-nearest-ans-ef",
)
DEFAULT_BITS = (1, 2, 4, UNQUANTIZED)
QUICK: dict[str, Any] = {
    "seeds": [0],
    "rounds": 3,
    "clients": 4,
    "local_steps": 5,
    "partitionings": ["iid"],
    "bits": [1, 4, UNQUANTIZED],
    "out": "outputs/bench-codec-quick",
}
"""What ``--quick`` changes (flags given explicitly win): 18 short cells."""
UPLINK_BITS = "uplink-bits-per-coordinate"
DOWNLINK_BITS = "downlink-bits-per-coordinate"
ROUND_FRACTION = "round-fraction-of-float32"
ROUND_BYTES = "round-bytes"
"""Keys :func:`with_link_stats` adds: means over the rounds after the first."""
ISSUE_ONE_BIT_GAP = 0.5
ISSUE_FOUR_BIT_FRACTION = 0.15


# ----------------------------------------------------------------------------- cells


def cells(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run-config overrides per (partitioning, bits, aggregator, codec, downlink, seed).

    Bits 32 is the float32 reference: no codec, a float32 downlink, under every
    aggregator of ``args.aggregators`` and FedAvg.
    """
    out = []
    for part, bits, seed in itertools.product(args.partitionings, args.bits, args.seeds):
        if bits == UNQUANTIZED:
            combos: list[tuple[str, str, str]] = [
                (agg, FLOAT32, FLOAT32)
                for agg in dict.fromkeys([*args.aggregators, REFERENCE_AGGREGATOR])
            ]
        else:
            combos = list(itertools.product(args.aggregators, args.codecs, args.downlinks))
        for agg, codec, downlink in combos:
            settings = CODEC_DEFAULTS if codec == FLOAT32 else PRESETS[codec].settings
            down_bits = UNQUANTIZED if downlink == FLOAT32 else bits
            out.append(
                {
                    "partitioning": part,
                    "bits": bits,
                    "aggregator": agg,
                    **settings,
                    "downlink-bits": down_bits,
                    "seed": seed,
                    # Communication only: plain local SGD (private training has its own sweep).
                    "dp": False,
                    "quant-policy": "none",
                    "batch-size": 32,
                    "num-server-rounds": args.rounds,
                    "num-supernodes": args.clients,
                    "local-steps": args.local_steps,
                    "eval-every": args.rounds,  # only the final accuracy is reported
                    "dirichlet-alpha": args.alpha,
                    "out-dir": str(
                        Path(args.out)
                        / "runs"
                        / _cell_name(part, bits, agg, codec, down_bits, seed)
                    ),
                }
            )
    return out


def _cell_name(part: str, bits: int, agg: str, codec: str, downlink_bits: int, seed: int) -> str:
    return f"{part}-b{bits}-{agg}-{codec}-d{downlink_bits}-s{seed}"


def preset_of(row: Mapping[str, Any]) -> str:
    """The codec of a result row: a preset's name, ``float32`` at bits 32, else ``custom``."""
    if row["bits"] == UNQUANTIZED:
        return FLOAT32
    for preset in PRESETS.values():
        if all(row.get(k) == v for k, v in preset.settings.items()):
            return preset.name
    return "custom"


def downlink_of(row: Mapping[str, Any]) -> str:
    """``float32`` or ``quantized`` (at the uplink's bits); ``d<bits>`` for anything else."""
    down = row["downlink-bits"]
    if down == UNQUANTIZED:
        return FLOAT32
    return QUANTIZED if down == row["bits"] else f"d{down}"


# ----------------------------------------------------------------------------- statistics


def link_stats(rounds: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Means over the rounds after the first (all rounds when there is one).

    Bits per coordinate in each direction, and the bytes of a round in both directions,
    absolute and as a fraction of float32 (sums over those rounds). Round 1 is left out
    because it may broadcast the float32 model, which later rounds do not.
    """
    steady = list(rounds[1:]) if len(rounds) > 1 else list(rounds)

    def mean(key: str) -> float | None:
        values = [r[key] for r in steady if r.get(key) is not None]
        return statistics.mean(values) if values else None

    sent = sum((r.get("uplink-bytes") or 0) + (r.get("downlink-bytes") or 0) for r in steady)
    ref = sum(
        (r.get("uplink-float32-bytes") or 0) + (r.get("downlink-float32-bytes") or 0)
        for r in steady
    )
    return {
        UPLINK_BITS: mean(UPLINK_BITS),
        DOWNLINK_BITS: mean(DOWNLINK_BITS),
        ROUND_BYTES: sent / len(steady) if steady else None,
        ROUND_FRACTION: sent / ref if ref else None,
    }


def with_link_stats(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each result with :func:`link_stats` of its run (read from its results.json)."""
    out = []
    for r in results:
        path = Path(r["out-dir"]) / "results.json"
        rounds = json.loads(path.read_text())["rounds"] if path.is_file() else []
        out.append({**r, **link_stats(rounds)})
    return out


def _select(results: Sequence[Mapping[str, Any]], **match: Any) -> list[Mapping[str, Any]]:
    """Rows whose partitioning/bits/aggregator (keys) and codec/downlink (derived) match."""
    derived = {"codec": preset_of, "downlink": downlink_of}
    return [
        r
        for r in results
        if all((derived[k](r) if k in derived else r[k]) == v for k, v in match.items())
    ]


def _accuracies(rows: Sequence[Mapping[str, Any]]) -> list[float]:
    return [100 * r["final-accuracy"] for r in rows if r.get("final-accuracy") is not None]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _mean_of(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.mean(values) if values else None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# ----------------------------------------------------------------------------- report


def table(
    results: Sequence[Mapping[str, Any]],
    partitioning: str,
    bits_list: Sequence[int],
    *,
    codecs: Sequence[str] = DEFAULT_CODECS,
    downlinks: Sequence[str] = DOWNLINKS,
) -> list[str]:
    """Markdown table: rows bits x codec x downlink, a column per aggregator run.

    Accuracy: mean ± std over seeds; bits per coordinate and the round's bytes as a
    fraction of float32 (:func:`link_stats`, needs :func:`with_link_stats`): means over
    the cell's runs.
    """
    part = _select(results, partitioning=partitioning)
    aggregators = [a for a in AGGREGATORS if any(r["aggregator"] == a for r in part)]
    aggregators += sorted({r["aggregator"] for r in part} - set(aggregators))
    lines = [
        f"| {partitioning} | bits | codec | downlink | "
        + " | ".join(aggregators)
        + " | uplink bits/coord | downlink bits/coord | round bytes / float32 |",
        "|---|---|---|---|" + "---|" * len(aggregators) + "---|---|---|",
    ]
    for bits in bits_list:
        combos = (
            [(FLOAT32, FLOAT32)]
            if bits == UNQUANTIZED
            else list(itertools.product(codecs, downlinks))
        )
        for codec, downlink in combos:
            rows = _select(part, bits=bits, codec=codec, downlink=downlink)
            if not rows:
                continue
            accs = []
            for agg in aggregators:
                values = _accuracies([r for r in rows if r["aggregator"] == agg])
                accs.append("{:.2f} ± {:.2f}".format(*_mean_std(values)) if values else "-")
            lines.append(
                f"| | {bits} | {codec} | {downlink} | "
                + " | ".join(accs)
                + f" | {_fmt(_mean_of(rows, UPLINK_BITS), '.3f')}"
                f" | {_fmt(_mean_of(rows, DOWNLINK_BITS), '.3f')}"
                f" | {_fmt(_mean_of(rows, ROUND_FRACTION), '.4f')} |"
            )
    return lines


def _reference_accuracy(results: Sequence[Mapping[str, Any]], partitioning: str) -> float | None:
    accs = _accuracies(
        _select(
            results, partitioning=partitioning, bits=UNQUANTIZED, aggregator=REFERENCE_AGGREGATOR
        )
    )
    return statistics.mean(accs) if accs else None


def targets(results: Sequence[Mapping[str, Any]], partitioning: str) -> list[str]:
    """Paper-B targets: 4-bit error-weighted within 1 point of 32-bit FedAvg; 2-bit within 3.

    The 4- and 2-bit cells are the ``baseline`` codec with a float32 downlink.
    """
    ref = _reference_accuracy(results, partitioning)
    lines = []
    for bits, allowed in ((4, 1.0), (2, 3.0)):
        accs = _accuracies(
            _select(
                results,
                partitioning=partitioning,
                bits=bits,
                aggregator="error-weighted",
                codec="baseline",
                downlink=FLOAT32,
            )
        )
        if ref is None or not accs:
            continue
        acc = statistics.mean(accs)
        gap = ref - acc
        verdict = "met" if gap <= allowed else "NOT met"
        lines.append(
            f"- {partitioning}: {bits}-bit error-weighted (stochastic) {acc:.2f} vs 32-bit FedAvg"
            f" {ref:.2f}: gap {gap:+.2f} points (target <= {allowed:.0f}): {verdict}"
        )
    return lines


def issue_targets(
    results: Sequence[Mapping[str, Any]], *, aggregator: str = "error-weighted"
) -> list[str]:
    """Issue 13's targets, per cell and overall.

    1. At 1 bit per coordinate (bits 1), IID: final accuracy within
       :data:`ISSUE_ONE_BIT_GAP` point of float32 FedAvg (met when the best cell is).
    2. At 4 bits, every partitioning run: the bytes of a round in both directions at most
       :data:`ISSUE_FOUR_BIT_FRACTION` of float32 (met when the best cell is; only a
       quantized downlink can).
    The bits per coordinate actually sent are printed beside each cell.
    """
    lines = []
    ref = _reference_accuracy(results, "iid")
    one_bit = _cells_of(results, partitioning="iid", bits=1, aggregator=aggregator)
    if ref is not None and one_bit:
        gaps = []
        for (codec, downlink), rows in one_bit.items():
            acc = statistics.mean(_accuracies(rows))
            gap = ref - acc
            gaps.append(gap)
            up, down = _mean_of(rows, UPLINK_BITS), _mean_of(rows, DOWNLINK_BITS)
            lines.append(
                f"- iid, 1 bit, {codec}, {downlink} downlink: {acc:.2f} vs float32 FedAvg"
                f" {ref:.2f}: gap {gap:+.2f} points (sent: {_fmt(up, '.3f')} up /"
                f" {_fmt(down, '.3f')} down bits/coord)"
            )
        best_gap = min(gaps)
        verdict = "met" if best_gap <= ISSUE_ONE_BIT_GAP else "NOT met"
        lines.append(
            f"- **1 bit per coordinate within {ISSUE_ONE_BIT_GAP} point of float32 FedAvg (iid):"
            f" best gap {best_gap:+.2f}: {verdict}**"
        )
    for partitioning in sorted({r["partitioning"] for r in results}):
        four = _cells_of(results, partitioning=partitioning, bits=4, aggregator=aggregator)
        best = None
        for (codec, downlink), rows in four.items():
            fraction = _mean_of(rows, ROUND_FRACTION)
            if fraction is None:
                continue
            best = fraction if best is None else min(best, fraction)
            lines.append(
                f"- {partitioning}, 4 bits, {codec}, {downlink} downlink: round bytes"
                f" {fraction:.4f} of float32 (up {_fmt(_mean_of(rows, UPLINK_BITS), '.3f')},"
                f" down {_fmt(_mean_of(rows, DOWNLINK_BITS), '.3f')} bits/coord)"
            )
        if best is not None:
            verdict = "met" if best <= ISSUE_FOUR_BIT_FRACTION else "NOT met"
            lines.append(
                f"- **{partitioning}: round bytes (both directions) <= {ISSUE_FOUR_BIT_FRACTION}"
                f" of float32 at 4 bits: best {best:.4f}: {verdict}**"
            )
    return lines


def _cells_of(
    results: Sequence[Mapping[str, Any]], **match: Any
) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    """Matching rows with an accuracy, grouped by (codec, downlink), in a stable order."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in _select(results, **match):
        if r.get("final-accuracy") is not None:
            groups.setdefault((preset_of(r), downlink_of(r)), []).append(r)
    return dict(sorted(groups.items()))


def pareto_plot(
    results: Sequence[Mapping[str, Any]], path: Path, *, aggregator: str = "error-weighted"
) -> Path:
    """Final accuracy against bytes per round (both directions, log x), per codec preset.

    One panel per partitioning; a colour per codec, a filled marker for a quantized
    downlink and an open one for a float32 downlink, the bits beside each point; the
    float32 FedAvg reference as a black star. Error bars: one std over seeds.
    """
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    partitionings = sorted({r["partitioning"] for r in results}, key=lambda p: (p != "iid", p))
    width = max(8.0, 6.0 * len(partitionings))
    fig, axes = plt.subplots(1, max(1, len(partitionings)), figsize=(width, 4.2), squeeze=False)
    codecs = list(dict.fromkeys(preset_of(r) for r in results if r["bits"] != UNQUANTIZED))
    colours = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(codecs)}
    handles: dict[str, Any] = {}
    for ax, part in zip(axes.flat, partitionings, strict=False):
        ref = _select(results, partitioning=part, bits=UNQUANTIZED, aggregator=REFERENCE_AGGREGATOR)
        groups = _cells_of(results, partitioning=part, aggregator=aggregator)
        if ref:
            groups[(FLOAT32, FLOAT32)] = list(ref)
        by_bits: dict[tuple[str, str, int], list[Mapping[str, Any]]] = {}
        for (codec, downlink), rows in groups.items():
            for r in rows:
                by_bits.setdefault((codec, downlink, r["bits"]), []).append(r)
        for (codec, downlink, bits), rows in sorted(by_bits.items()):
            x = _mean_of(rows, ROUND_BYTES)
            accs = _accuracies(rows)
            if x is None or not accs:
                continue
            mean, std = _mean_std(accs)
            if codec == FLOAT32:
                label = "float32 FedAvg"
                style = {"marker": "*", "color": "black", "markersize": 12}
            else:
                label = f"{codec}, {downlink} downlink"
                filled = downlink == QUANTIZED
                style = {
                    "marker": "o" if filled else "s",
                    "color": colours[codec],
                    "markerfacecolor": colours[codec] if filled else "none",
                    "markersize": 7,
                }
            handles[label] = ax.errorbar(x, mean, yerr=std, capsize=3, linestyle="none", **style)
            ax.annotate(f"{bits}", (x, mean), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no crowded labels
        ax.set_title(part)
        ax.set_xlabel("bytes per round, both directions (rounds after the first)")
        ax.set_ylabel("final test accuracy (%)")
        ax.grid(alpha=0.3, which="both")
    columns = 2 if width < 10 else 3
    legend_rows = -(-len(handles) // columns)
    height = 4.2 + 0.2 * legend_rows  # the legend gets its own strip below the panels
    fig.set_size_inches(width, height)
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="lower center",
        ncol=columns,
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout(rect=(0, (0.2 * legend_rows + 0.15) / height, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _work(cell: Mapping[str, Any]) -> int:
    """Local SGD steps of a cell: rounds x clients x local steps (what its time scales with)."""
    return int(cell["num-server-rounds"]) * int(cell["num-supernodes"]) * int(cell["local-steps"])


def time_estimate(
    results: Sequence[Mapping[str, Any]],
    grid: Sequence[Mapping[str, Any]],
    *,
    jobs: int,
    key: str = CELL_SECONDS,
) -> float | None:
    """Minutes ``grid`` takes on ``jobs`` processes, from the cell times (``key``) of ``results``.

    A cell's time is modelled as ``a + b x local steps`` (start-up, evaluation and the
    codec are the part ``a`` that does not scale with training), fitted by least squares
    when the timed cells have at least two sizes (``--quick`` runs one default-size cell
    for this, :func:`calibration_cells`); with one size, seconds per local step, which
    overestimates larger cells. None without timed cells.
    """
    timed = [r for r in results if r.get(key) is not None and _work(r) > 0]
    if not timed:
        return None
    work = [float(_work(r)) for r in timed]
    seconds = [float(r[key]) for r in timed]
    per_cell = sum(seconds) / sum(work) * sum(_work(c) for c in grid)
    if len(set(work)) >= 2:
        slope, intercept = statistics.linear_regression(work, seconds)
        if slope > 0 and intercept >= 0:
            per_cell = intercept * len(grid) + slope * sum(_work(c) for c in grid)
    return per_cell / 60.0 / max(1, jobs)


def calibration_cells(args: argparse.Namespace) -> list[dict[str, Any]]:
    """With ``--calibrate``: one cell of the default grid's size, for :func:`time_estimate`.

    The default grid's most expensive codec (rotation, entropy coding's rate search, error
    feedback, quantized downlink) at 4 bits, IID, seed 0, under ``OUT/calibration``; its
    accuracy stays out of the tables.
    """
    if not args.calibrate:
        return []
    full = parse_args(["--out", str(Path(args.out) / "calibration")])
    full.partitionings, full.bits, full.seeds = ["iid"], [4], [0]
    full.codecs, full.downlinks = ["rotated-dithered-ans-ef"], [QUANTIZED]
    return cells(full)


def throughput_lines() -> list[str]:
    """Quantize + pack throughput against ``torch.quantize_per_tensor``, as a table."""
    import torch

    from sims.bench.throughput import quantize_pack_throughput

    # One thread for both sides: torch's OpenMP pool stalls on a loaded 2-core machine,
    # which would flatter fedquant's ratio.
    torch.set_num_threads(1)
    rows = quantize_pack_throughput()
    lines = ["| method | MB/s (float32 in) | vs torch.quantize_per_tensor |", "|---|---|---|"]
    lines += [f"| {r['method']} | {r['mb_per_s']:.0f} | {r['ratio_vs_torch']:.2f} |" for r in rows]
    return lines


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; ``--quick`` replaces the defaults not given explicitly."""
    parser = sweep_parser(
        "python -m sims.bench.codec_accuracy",
        __doc__ or "",
        rounds=8,
        local_steps=20,
        out="outputs/bench-codec",
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, IID, bits 1 4 32, 3 short rounds (~5 min)"
    )
    parser.add_argument("--partitionings", nargs="+", default=["iid", "dirichlet"])
    parser.add_argument("--bits", nargs="+", type=int, default=list(DEFAULT_BITS))
    parser.add_argument("--codecs", nargs="+", choices=list(PRESETS), default=list(DEFAULT_CODECS))
    parser.add_argument("--downlinks", nargs="+", choices=DOWNLINKS, default=list(DOWNLINKS))
    parser.add_argument(
        "--aggregators", nargs="+", default=[AGGREGATORS[0]], help="of the quantized cells"
    )
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run one default-size cell to estimate the default grid's time"
        " (default: with --quick)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        defaults = parse_args([])
        for key, value in QUICK.items():
            if getattr(args, key) == getattr(defaults, key):  # explicit flags win
                setattr(args, key, value)
    if args.calibrate is None:
        args.calibrate = args.quick
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or ``--collect``) the grid and report it with the plot and the throughput."""
    args = parse_args(argv)
    started = time.perf_counter()
    report: list[str] = []
    results: list[dict[str, Any]] | None = None
    calibration: list[dict[str, Any]] = []
    calibration_dirs = {c["out-dir"] for c in calibration_cells(args)}
    if args.collect:
        results = collect(args.out, CELL_KEYS)
        if args.calibrate:
            calibration = collect(Path(args.out) / "calibration", CELL_KEYS)
        report.append(f"{len(results)} finished runs collected from {args.out}:")
    elif not args.skip_accuracy:
        todo = cells(args) + calibration_cells(args)
        done = run_sweep(todo, jobs=args.jobs, out=args.out)
        results = [r for r in done if r["out-dir"] not in calibration_dirs]
        calibration = [r for r in done if r["out-dir"] in calibration_dirs]
        report.append(
            f"Final test accuracy (%) after {args.rounds} rounds, {args.clients} clients,"
            f" {args.local_steps} local steps of batch 32 per round, seeds {args.seeds}"
            f" (Dirichlet alpha {args.alpha}); mean ± std over seeds; bits per coordinate"
            " and round bytes / float32: means over the rounds after the first:"
        )
    if results is not None:
        results = with_link_stats(results)
        for part in args.partitionings:
            report += [
                "",
                *table(results, part, args.bits, codecs=args.codecs, downlinks=args.downlinks),
            ]
        report += ["", "Targets (paper B):"]
        report += [t for part in args.partitionings for t in targets(results, part)]
        report += [
            "",
            "Targets (issue 13):",
            *issue_targets(results, aggregator=args.aggregators[0]),
        ]
        if results:
            plot = pareto_plot(
                results, Path(args.out) / "codec-pareto.png", aggregator=args.aggregators[0]
            )
            report += ["", f"Accuracy vs bytes per round per codec: {plot}"]
        timed = [*results, *calibration]
        wall = [r[CELL_SECONDS] for r in timed if r.get(CELL_SECONDS) is not None]
        cpu = [r[CELL_CPU_SECONDS] for r in timed if r.get(CELL_CPU_SECONDS) is not None]
        full = cells(parse_args(["--out", args.out]))
        estimate = time_estimate(timed, full, jobs=args.jobs)
        cpu_estimate = time_estimate(timed, full, jobs=args.jobs, key=CELL_CPU_SECONDS)
        report += [
            "",
            f"Runs: {len(wall)} timed ({len(calibration)} for calibration only),"
            f" {sum(wall) / 60:.1f} process-minutes of wall time"
            f" ({sum(wall) / 60 / max(1, args.jobs):.1f} min on {args.jobs} processes),"
            f" {sum(cpu) / 60:.1f} CPU-minutes.",
        ]
        if estimate is not None and cpu_estimate is not None:
            sizes = len({_work(r) for r in timed})
            how = (
                "a + b x local steps, fitted" if sizes > 1 else "seconds per local step (errs high)"
            )
            report.append(
                f"Estimated default grid ({len(full)} cells) on {args.jobs} processes:"
                f" {estimate:.0f} min at this machine's load, {cpu_estimate:.0f} min on idle"
                f" cores (CPU time); {how} on these cells."
            )
    if not args.skip_throughput:
        report += [
            "",
            "Quantize + pack throughput, 4 bits, 4M float32 elements, 1 thread:",
            *throughput_lines(),
        ]
    report += ["", f"Wall time of this invocation: {(time.perf_counter() - started) / 60:.1f} min."]
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
