"""The sweep framework the in-process benchmarks share: cells, runs, reuse, reports.

A sweep is a list of cells, each a dict of run-config overrides with its own
``out-dir`` under ``OUT/runs``. :func:`run_sweep` runs every cell through the real
ServerApp loop, strategy and ClientApp code with
``sims.launch.inprocess.run_in_process`` (no Ray: a sweep of ~100 runs would otherwise
spend most of its time starting processes), on ``jobs`` processes, and reuses any cell
whose run already finished under the same config (an interrupted sweep goes on where
it stopped). Each finished cell keeps its run time beside its results.json
(:data:`CELL_TIMING`), so a sweep assembled from reused cells still reports what the
whole sweep costs. :func:`collect` tabulates the cells finished so far;
:func:`sweep_parser` holds the options every sweep shares; :func:`write_report` prints
and keeps the report.

The benchmarks built on it: ``sims.bench.codec_accuracy`` (accuracy vs bits) and
``sims.bench.private`` (DP-SGD and DPQuant).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

CELL_TIMING = "bench-cell-time.json"
"""The file beside a cell's results.json that keeps its run time."""
CELL_SECONDS = "cell-seconds"
CELL_CPU_SECONDS = "cell-cpu-seconds"


def run_cell(overrides: dict[str, Any]) -> dict[str, Any]:
    """Run one cell in this process; its overrides, run summary and run time."""
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
    (Path(cfg.run.out_dir) / CELL_TIMING).write_text(json.dumps(timing))
    return {**overrides, **summary, **timing}


def collect(out: str | Path, keys: Sequence[str]) -> list[dict[str, Any]]:
    """Results of the runs already finished under ``out``/runs (e.g. of an interrupted sweep).

    Each row holds the run-config values of ``keys`` (what tells the cells apart), its
    ``out-dir``, the run's summary and, when kept, its run time.
    """
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
    print(
        f"{len(todo)} runs on {jobs} processes ({len(results)} reused) ...",
        file=sys.stderr,
        flush=True,
    )
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for i, res in enumerate(pool.map(run_cell, todo), 1):
            results.append(res)
            name = Path(res["out-dir"]).name
            print(
                f"[{i}/{len(todo)}] {name}: accuracy {res['final-accuracy']:.4f}",
                file=sys.stderr,
                flush=True,
            )
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "accuracy.json").write_text(json.dumps(results, indent=2))
    return results


def write_report(lines: Sequence[str], out: str | Path) -> None:
    """Print the report and keep it as ``out``/bench.md."""
    text = "\n".join(lines)
    print(text)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "bench.md").write_text(text + "\n")


def sweep_parser(
    prog: str, doc: str, *, rounds: int, local_steps: int, out: str
) -> argparse.ArgumentParser:
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
