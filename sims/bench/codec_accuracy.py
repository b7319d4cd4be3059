"""Benchmark: final accuracy across bits x aggregator x rounding, and codec throughput.

    python -m sims.bench.codec_accuracy                    # the full grid (see --help)
    python -m sims.bench.codec_accuracy --seeds 0 --bits 4 32 --rounds 3   # a quick look

Every cell runs the real ServerApp loop, strategy and ClientApp code in-process
(``sims.bench.sweep``, through ``sims.launch.inprocess.InProcessGrid``), on the
embedded MNIST, with the same rounds, clients and seeds for all cells, and plain local
SGD (communication only: private training has its own sweep, ``sims.bench.private``).
Prints a table per partitioning (mean ± std of the final test accuracy over seeds),
the paper-B targets, and the quantize+pack throughput against
``torch.quantize_per_tensor`` measured in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sims.bench.sweep import collect, run_sweep, sweep_parser, write_report

AGGREGATORS = ("error-weighted", "fedavg")
ROUNDINGS = ("stochastic", "nearest")
CELL_KEYS = ("partitioning", "bits", "aggregator", "rounding", "seed")
"""The run-config keys that tell this sweep's cells apart."""


def cells(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One dict of run-config overrides per (partitioning, bits, aggregator, rounding, seed)."""
    out = []
    for part, bits, agg, rounding, seed in itertools.product(
        args.partitionings, args.bits, AGGREGATORS, ROUNDINGS, args.seeds
    ):
        if bits == 32 and rounding != ROUNDINGS[0]:
            continue  # rounding does not apply to float32
        out.append(
            {
                "partitioning": part,
                "bits": bits,
                "aggregator": agg,
                "rounding": rounding,
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
                    Path(args.out) / "runs" / _cell_name(part, bits, agg, rounding, seed)
                ),
            }
        )
    return out


def _cell_name(part: str, bits: int, agg: str, rounding: str, seed: int) -> str:
    return f"{part}-b{bits}-{agg}-{rounding}-s{seed}"


def table(results: list[dict[str, Any]], partitioning: str, bits_list: Sequence[int]) -> list[str]:
    """Markdown table: rows bits x rounding, columns aggregators; mean ± std over seeds."""

    def cell(bits: int, agg: str, rounding: str) -> str:
        accs = [
            100 * r["final-accuracy"]
            for r in results
            if (r["partitioning"], r["bits"], r["aggregator"], r["rounding"])
            == (partitioning, bits, agg, rounding)
        ]
        if not accs:
            return "-"
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        return f"{statistics.mean(accs):.2f} ± {std:.2f}"

    lines = [
        f"| {partitioning} | bits | rounding | "
        + " | ".join(AGGREGATORS)
        + " | uplink / float32 |",
        "|---|---|---|" + "---|" * len(AGGREGATORS) + "---|",
    ]
    for bits in bits_list:
        for rounding in ROUNDINGS if bits != 32 else ROUNDINGS[:1]:
            fractions = [
                r["uplink-fraction-of-float32"]
                for r in results
                if (r["partitioning"], r["bits"], r["rounding"]) == (partitioning, bits, rounding)
            ]
            shown = rounding if bits != 32 else "-"
            frac = f"{statistics.mean(fractions):.4f}" if fractions else "-"
            lines.append(
                f"| | {bits} | {shown} | "
                + " | ".join(cell(bits, agg, rounding) for agg in AGGREGATORS)
                + f" | {frac} |"
            )
    return lines


def targets(results: list[dict[str, Any]], partitioning: str) -> list[str]:
    """Paper-B targets: 4-bit error-weighted within 1 point of 32-bit FedAvg; 2-bit within 3."""

    def mean_acc(bits: int, agg: str) -> float | None:
        accs = [
            100 * r["final-accuracy"]
            for r in results
            if (r["partitioning"], r["bits"], r["aggregator"], r["rounding"])
            == (partitioning, bits, agg, "stochastic")
        ]
        return statistics.mean(accs) if accs else None

    ref = mean_acc(32, "fedavg")
    lines = []
    for bits, allowed in ((4, 1.0), (2, 3.0)):
        acc = mean_acc(bits, "error-weighted")
        if ref is None or acc is None:
            continue
        gap = ref - acc
        verdict = "met" if gap <= allowed else "NOT met"
        lines.append(
            f"- {partitioning}: {bits}-bit error-weighted (stochastic) {acc:.2f} vs 32-bit FedAvg"
            f" {ref:.2f}: gap {gap:+.2f} points (target <= {allowed:.0f}): {verdict}"
        )
    return lines


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


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or ``--collect``) the accuracy grid and report it with the throughput."""
    parser = sweep_parser(
        "python -m sims.bench.codec_accuracy",
        __doc__ or "",
        rounds=8,
        local_steps=20,
        out="outputs/bench",
    )
    parser.add_argument("--partitionings", nargs="+", default=["iid", "dirichlet"])
    parser.add_argument("--bits", nargs="+", type=int, default=[1, 2, 4, 8, 32])
    parser.add_argument("--alpha", type=float, default=0.5)
    args = parser.parse_args(argv)

    report: list[str] = []
    results: list[dict[str, Any]] | None = None
    if args.collect:
        results = collect(args.out, CELL_KEYS)
        report.append(f"{len(results)} finished runs collected from {args.out}:")
    elif not args.skip_accuracy:
        results = run_sweep(cells(args), jobs=args.jobs, out=args.out)
        report.append(
            f"Final test accuracy (%) after {args.rounds} rounds, {args.clients} clients,"
            f" {args.local_steps} local steps of batch 32 per round, seeds {args.seeds}"
            f" (Dirichlet alpha {args.alpha}); mean ± std over seeds:"
        )
    if results is not None:
        for part in args.partitionings:
            report += ["", *table(results, part, args.bits)]
        report += ["", "Targets:"]
        report += [t for part in args.partitionings for t in targets(results, part)]
    report += [
        "",
        "Quantize + pack throughput, 4 bits, 4M float32 elements, 1 thread:",
        *throughput_lines(),
    ]
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
