"""Benchmark: final accuracy across bits x aggregator x rounding, and codec throughput.

    python -m sims.bench.sweep                      # the full grid (see --help)
    python -m sims.bench.sweep --seeds 0 --bits 4 32 --rounds 3   # a quick look

Every cell runs the real ServerApp loop, strategy and ClientApp code through
``sims.launch.inprocess.InProcessGrid`` (no Ray: a sweep of ~100 runs would otherwise spend
most of its time starting processes), on the embedded MNIST, with the same rounds,
clients and seeds for all cells. Prints a table per partitioning (mean ± std of
the final test accuracy over seeds), the paper-B targets, and the quantize+pack
throughput against ``torch.quantize_per_tensor`` measured in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

AGGREGATORS = ("error-weighted", "fedavg")
# Each finished cell keeps its run time beside results.json, so that a sweep assembled
# from reused cells still reports what the whole sweep costs.
CELL_TIMING = "bench-cell-time.json"
CELL_SECONDS = "cell-seconds"
CELL_CPU_SECONDS = "cell-cpu-seconds"
CELL_KEYS = ("partitioning", "bits", "aggregator", "rounding", "seed")
ROUNDINGS = ("stochastic", "nearest")


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
                "out-dir": str(Path(args.out) / "runs" / _cell_name(part, bits, agg, rounding, seed)),
            }
        )
    return out


def _cell_name(part: str, bits: int, agg: str, rounding: str, seed: int) -> str:
    return f"{part}-b{bits}-{agg}-{rounding}-s{seed}"


def run_cell(overrides: dict[str, Any]) -> dict[str, Any]:
    import logging

    import torch

    from fedquant.config import RunConfig
    from sims.launch.inprocess import run_in_process

    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    cfg = RunConfig.from_flower(overrides, strict=True)
    start, cpu = time.perf_counter(), time.process_time()
    summary = run_in_process(cfg).summary()
    timing = {
        CELL_SECONDS: time.perf_counter() - start,
        CELL_CPU_SECONDS: time.process_time() - cpu,  # what it costs on a core of its own
    }
    (Path(cfg.out_dir) / CELL_TIMING).write_text(json.dumps(timing))
    return {**overrides, **summary, **timing}


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
        f"| {partitioning} | bits | rounding | " + " | ".join(AGGREGATORS) + " | uplink / float32 |",
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
    import torch

    from sims.bench.throughput import quantize_pack_throughput

    # One thread for both sides: torch's OpenMP pool stalls on a loaded 2-core machine,
    # which would flatter fedquant's ratio.
    torch.set_num_threads(1)
    rows = quantize_pack_throughput()
    lines = ["| method | MB/s (float32 in) | vs torch.quantize_per_tensor |", "|---|---|---|"]
    lines += [f"| {r['method']} | {r['mb_per_s']:.0f} | {r['ratio_vs_torch']:.2f} |" for r in rows]
    return lines


def collect(out: str | Path, keys: Sequence[str] = CELL_KEYS) -> list[dict[str, Any]]:
    """Results of the runs already finished under ``out``/runs (e.g. of an interrupted sweep)."""
    rows = []
    for path in sorted(Path(out).glob("runs/*/results.json")):
        data = json.loads(path.read_text())
        if data["summary"]["rounds"] < data["config"]["num-server-rounds"]:
            continue  # unfinished
        cell = {k: data["config"][k] for k in keys}
        timing = path.parent / CELL_TIMING
        seconds = json.loads(timing.read_text()) if timing.is_file() else {}
        rows.append({**cell, "out-dir": str(path.parent), **data["summary"], **seconds})
    return rows


def _finished(cell: dict[str, Any]) -> dict[str, Any] | None:
    """The summary of a cell whose run already completed with the same config, if any."""
    path = Path(cell["out-dir"]) / "results.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    same = all(data["config"].get(k) == v for k, v in cell.items() if k != "out-dir")
    if not same or data["summary"]["rounds"] < cell["num-server-rounds"]:
        return None
    timing = Path(cell["out-dir"]) / CELL_TIMING
    seconds = json.loads(timing.read_text()) if timing.is_file() else {}
    return {**cell, **data["summary"], **seconds}


def run_sweep(todo: list[dict[str, Any]], *, jobs: int, out: str | Path) -> list[dict[str, Any]]:
    """Run every cell on ``jobs`` processes, printing progress; save accuracy.json.

    Cells whose run already finished under the same config (an interrupted sweep)
    are reused, not run again.
    """
    done = [(cell, _finished(cell)) for cell in todo]
    results = [r for _, r in done if r is not None]
    todo = [cell for cell, r in done if r is None]
    print(f"{len(todo)} runs on {jobs} processes ({len(results)} reused) ...",
          file=sys.stderr, flush=True)
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for i, res in enumerate(pool.map(run_cell, todo), 1):
            results.append(res)
            name = Path(res["out-dir"]).name
            print(f"[{i}/{len(todo)}] {name}: accuracy {res['final-accuracy']:.4f}",
                  file=sys.stderr, flush=True)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "accuracy.json").write_text(json.dumps(results, indent=2))
    return results


def write_report(lines: Sequence[str], out: str | Path) -> None:
    """Print the report and keep it as ``out``/bench.md."""
    text = "\n".join(lines)
    print(text)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "bench.md").write_text(text + "\n")


def sweep_parser(prog: str, doc: str, *, rounds: int, local_steps: int, out: str) -> argparse.ArgumentParser:
    """The options every sweep shares: seeds, rounds, clients, processes, output."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=local_steps)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=out)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument(
        "--collect", action="store_true", help="only tabulate the finished runs under --out"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = sweep_parser("python -m sims.bench.sweep", __doc__, rounds=8, local_steps=20, out="outputs/bench")
    parser.add_argument("--partitionings", nargs="+", default=["iid", "dirichlet"])
    parser.add_argument("--bits", nargs="+", type=int, default=[1, 2, 4, 8, 32])
    parser.add_argument("--alpha", type=float, default=0.5)
    args = parser.parse_args(argv)

    report: list[str] = []
    if args.collect:
        results = collect(args.out)
        report.append(f"{len(results)} finished runs collected from {args.out}:")
        for part in args.partitionings:
            report += ["", *table(results, part, args.bits)]
        report += ["", "Targets:"] + [t for part in args.partitionings for t in targets(results, part)]
    elif not args.skip_accuracy:
        results = run_sweep(cells(args), jobs=args.jobs, out=args.out)
        report.append(
            f"Final test accuracy (%) after {args.rounds} rounds, {args.clients} clients,"
            f" {args.local_steps} local steps of batch 32 per round, seeds {args.seeds}"
            f" (Dirichlet alpha {args.alpha}); mean ± std over seeds:"
        )
        for part in args.partitionings:
            report += ["", *table(results, part, args.bits)]
        report += ["", "Targets:"] + [t for part in args.partitionings for t in targets(results, part)]
    report += ["", "Quantize + pack throughput, 4 bits, 4M float32 elements, 1 thread:", *throughput_lines()]
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
