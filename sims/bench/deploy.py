"""Benchmark: wall time per round of a gRPC deployment on 127.0.0.1, insecure and TLS.

    python -m sims.bench.deploy                          # 2 and 8 SuperNodes, both modes
    python -m sims.bench.deploy --supernodes 2 --modes tls --rounds 3

Each cell starts a SuperLink and N SuperNodes with ``sims.launch.deploy`` (TLS cells also
use SuperNode authentication), waits until all N are online, runs the real app for
``--rounds`` rounds of plain local SGD with 4-bit updates, and stops everything. A
round's wall time is the time between the ServerApp's progress lines for round r-1
and round r, as they arrive through ``flwr log --stream``: it spans sending the
global model, each SuperNode starting a fresh ``flwr-clientapp`` process, local
training, the quantized replies, aggregation and the central evaluation. Round 1
also pays each SuperNode's first installation of the app bundle, so it is reported
apart from the later rounds. Start-up is from starting the SuperLink until all
SuperNodes are online. Prints a markdown table and writes it to
``OUT/bench-deploy.md`` (each cell's results.json under ``OUT/runs``).

Caveat: on a machine with fewer cores than SuperNodes, the per-round time mostly
measures process start-up (torch import) contending for the cores, not the network.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sims.launch.deploy import (
    deploy_overrides,
    deployment_superlink,
    start_supernode,
    submit_deployment,
    wait_for_supernodes,
)
from sims.launch.flwr_cli import COMPLETED

ROUND_LINE = re.compile(r"\[fedquant\] round\s+(\d+):")
MODES = {"insecure": False, "tls": True}


@dataclass(frozen=True)
class Cell:
    """One measured deployment run."""

    supernodes: int
    mode: str
    startup_s: float
    round_s: tuple[float, ...]  # wall seconds of rounds 1..R
    final_accuracy: float


def run_cell(*, supernodes: int, mode: str, rounds: int, local_steps: int, out: Path) -> Cell:
    """Deploy, run ``rounds`` rounds, and time them from the ServerApp's log lines."""
    run_dir = out / "runs" / f"{mode}-{supernodes}"
    _, overrides = deploy_overrides(
        [
            f"num-server-rounds={rounds} local-steps={local_steps} bits=4",
            'dp=false quant-policy="none"',
            f'out-dir="{run_dir}"',
        ],
        supernodes=supernodes,
    )
    seen: dict[int, float] = {}

    def on_line(line: str) -> None:
        match = ROUND_LINE.search(line)
        if match:
            seen.setdefault(int(match.group(1)), time.monotonic())

    with tempfile.TemporaryDirectory(prefix="fedquant-bench-deploy-") as tmp:
        start = time.monotonic()
        with deployment_superlink(Path(tmp), secure=MODES[mode]) as dep:
            nodes = [start_supernode(dep, i, num_partitions=supernodes) for i in range(supernodes)]
            wait_for_supernodes(dep, nodes, timeout_s=60.0 + 15.0 * supernodes)
            startup_s = time.monotonic() - start
            status = submit_deployment(
                dep, overrides, stream=False, timeout_s=600.0, on_line=on_line
            )
    if status.get("status") != COMPLETED:
        raise RuntimeError(f"{mode} with {supernodes} SuperNodes ended as {status.get('status')!r}")
    missing = [r for r in range(rounds + 1) if r not in seen]
    if missing:
        raise RuntimeError(f"no progress line for rounds {missing} in the run's log")
    round_s = tuple(seen[r] - seen[r - 1] for r in range(1, rounds + 1))
    results = json.loads((run_dir / "results.json").read_text())
    return Cell(supernodes, mode, startup_s, round_s, float(results["summary"]["final-accuracy"]))


def table(cells: Sequence[Cell]) -> str:
    """The cells as a markdown table."""
    lines = [
        "| SuperNodes | transport | start-up (s) | round 1 (s) | later rounds (s/round) "
        "| final accuracy |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for c in cells:
        later = f"{statistics.fmean(c.round_s[1:]):.1f}" if len(c.round_s) > 1 else "-"
        transport = "TLS + node auth" if MODES[c.mode] else "insecure"
        lines.append(
            f"| {c.supernodes} | {transport} | {c.startup_s:.1f} | {c.round_s[0]:.1f} "
            f"| {later} | {c.final_accuracy:.4f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every (SuperNodes, transport) cell and print the table."""
    parser = argparse.ArgumentParser(
        prog="python -m sims.bench.deploy", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--supernodes", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["insecure", "tls"])
    parser.add_argument("--rounds", type=int, default=2, help="rounds per run (default 2)")
    parser.add_argument("--local-steps", type=int, default=5, help="local SGD steps (default 5)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-deploy"))
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.local_steps < 1 or min(args.supernodes) < 1:
        parser.error("--rounds, --local-steps and --supernodes must be >= 1")
    out = args.out.resolve()
    cells = []
    for supernodes in args.supernodes:
        for mode in args.modes:
            cell = run_cell(
                supernodes=supernodes,
                mode=mode,
                rounds=args.rounds,
                local_steps=args.local_steps,
                out=out,
            )
            print(
                f"{mode} x{supernodes}: start-up {cell.startup_s:.1f} s, rounds "
                + " ".join(f"{s:.1f}" for s in cell.round_s)
                + " s",
                file=sys.stderr,
                flush=True,
            )
            cells.append(cell)
    text = table(cells)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench-deploy.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
