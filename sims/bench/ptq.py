"""Benchmark: post-training quantization of the project's trained models (paper C, MRECG).

    python -m sims.bench.ptq              # the default sweep (~51 min on 2 cores, see below)
    python -m sims.bench.ptq --quick      # a smoke run of every path (~3 min)
    python -m sims.bench.ptq --collect    # re-tabulate the finished cells, run nothing

Models: the CNN and the ResNet, each trained once without DP and once with DP-SGD at
ε = 8 (δ 1e-5, PRV), by the project's federated round loop in-process
(``sims.bench.sweep.run_cell``: the real ServerApp loop, strategy and ClientApp; 10 IID
clients, 4-bit uploads, no DPQuant, ``dp-noise-seeded``); lengths in :data:`TRAIN_PLANS`.
A trained model's checkpoint is reused by every later invocation with the same plan.

Each trained model is then quantized at :data:`BITS` (W4A8, W4A4, W2A4: weights per
output channel, activations per tensor; the first and last layers at 8 bits) by each of
:data:`METHODS` (RTN, AdaRound, BRECQ, MRECG with data-free and data-dependent
capacity), calibrated on the first ``--calibration-size`` validation images
(``sims.ptq.calibration_images``, as the ServerApp does) with ``--iterations`` Adam steps
per reconstruction unit, at each ``--seeds`` (``ptq-seed``: the minibatch draws of the
reconstruction), and evaluated on the first ``--test-size`` test images. RTN draws
nothing at random, so it runs once (seed 0) and its spread is 0 by construction.

Every cell (one quantization and its evaluation, or the float model's evaluation) runs
in a worker process and writes its result as one JSON file under
``--out``/cells/<trained model>/: an interrupted sweep resumes where it stopped, and
``--collect`` re-tabulates. The report (``bench.md`` in ``--out``, beside
``ptq.png``) has:

1. the table: accuracy (mean ± sd over seeds), drop from the float model, model bytes
   (float vs packed file), PTQ wall time;
2. one verdict line per model, privacy and bit setting on the paper's ordering
   MRECG ≥ BRECQ ≥ AdaRound ≥ RTN, computed from the measured means (paired by seed,
   with the standard error), and on where the gaps are widest (2-bit weights, the
   deeper model);
3. the cost: each cell's CPU time is recorded, and the default sweep's duration is
   estimated from the records under ``--out`` (:func:`estimate_budget`).

The plot: per model at W2A4, the per-unit reconstruction loss across depth for BRECQ
and both MRECG variants (Ma et al. 2023, Fig. 1: the oscillation view), and the
accuracy of every method at every bit setting.

Default sweep cost (measured on this 2-core machine, one thread per process): training
~36 CPU-min, 25 of them the DP ResNet; a ResNet cell ~45 CPU-s (12-18 of them evaluating
10,000 test images), a CNN cell ~10; 156 quantization cells ~66 CPU-min; ~51 min on 2
processes, each model's cells queued as soon as it is trained. The report prints the
estimate from the recorded times.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import statistics
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from sims.bench.sweep import CELL_CPU_SECONDS, CELL_SECONDS, CELL_TIMING, write_report

MODELS = ("cnn", "resnet")
PRIVACY: dict[str, dict[str, Any]] = {
    "nodp": {"dp": False},
    "eps8": {"dp": True, "target-epsilon": 8.0},
}
PRIVACY_LABELS = {"nodp": "no DP", "eps8": "DP ε=8"}
BITS: dict[str, tuple[int, int]] = {"W4A8": (4, 8), "W4A4": (4, 4), "W2A4": (2, 4)}
"""Bit setting -> (ptq-weight-bits, ptq-act-bits)."""
METHODS: dict[str, dict[str, Any]] = {
    "RTN": {"ptq": "rtn"},
    "AdaRound": {"ptq": "adaround"},
    "BRECQ": {"ptq": "brecq"},
    "MRECG data-free": {"ptq": "mrecg", "ptq-capacity": "data-free"},
    "MRECG data-dependent": {"ptq": "mrecg", "ptq-capacity": "data-dependent"},
}
"""Method label -> its run-config keys (the rest at PTQSettings' defaults)."""
DETERMINISTIC = frozenset({"RTN"})
"""Methods that draw nothing at random: one run (seed 0) stands for every seed."""
FP = "FP"
"""The method (and bit setting) label of the float model's own evaluation."""
MRECG_VARIANTS = ("MRECG data-free", "MRECG data-dependent")
EXPECTED_ORDER: tuple[tuple[str, ...], ...] = (MRECG_VARIANTS, ("BRECQ",), ("AdaRound",), ("RTN",))
"""The paper's ordering (Ma et al. 2023, Tables 1-3), best first; each MRECG variant ≥ BRECQ."""
GAPS: tuple[tuple[str, str], ...] = (*((m, "BRECQ") for m in MRECG_VARIANTS), ("BRECQ", "RTN"))
"""The gaps whose size across bits and models is checked: (a, b) is mean(a) - mean(b)."""
DEEPER = "resnet"
LOWEST_BITS = "W2A4"
TEST_IMAGES = 10_000

TRAIN_PLANS: dict[tuple[str, str], tuple[int, int, int]] = {
    ("cnn", "nodp"): (10, 20, 256),
    ("cnn", "eps8"): (5, 20, 256),
    ("resnet", "nodp"): (5, 100, 32),
    ("resnet", "eps8"): (10, 20, 256),
}
"""(model, privacy) -> (rounds, local steps, batch size) of its federated training.

Measured here (10 IID clients, 4-bit uploads, one thread): the CNN without DP is the
README's 10 x 20 of 256 (98.2%); with DP it gets 5 rounds (DP-SGD costs ~0.3 CPU-s a
step of 256, so the README's 10 rounds, 95.8%, would take 10 CPU-min of the hour; at
ε = 2 its 5 rounds gave 92.2%). The ResNet is limited by its sequential steps (central
SGD at lr 0.05, batch 128: 51% after 100 steps, 89% after 200): 5 rounds x 20 steps of
128 reached 70.0% without DP; 5 x 100 steps of 32 reach 95.8% (3.0 CPU-min). With DP
the noise on the mean gradient is ~σ/B with σ ≈ 0.5-0.8 whatever the plan, so the batch
must stay large: 5 x 30 of 128 reached 54.7% (8.5 CPU-min), 10 x 20 of 256 88.6%
(24.6 CPU-min, the longest run of the sweep; its cells start as soon as it ends).
"""
QUICK_TRAIN_PLAN = (2, 5, 64)

QUICK: dict[str, Any] = {
    "seeds": [0],
    "iterations": 20,
    "calibration_size": 64,
    "test_size": 1000,
    "out": "outputs/bench-ptq-quick",
}


# Cells --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainRun:
    """One federated training run: a (model, privacy) pair and its length."""

    model: str
    privacy: str
    rounds: int
    local_steps: int
    batch_size: int
    clients: int = 10
    seed: int = 0

    @property
    def name(self) -> str:
        """The run's folder name under ``--out``/models, which says what it ran."""
        return (
            f"{self.model}-{self.privacy}-{self.clients}c-{self.rounds}x{self.local_steps}"
            f"-b{self.batch_size}-s{self.seed}"
        )

    @property
    def examples(self) -> int:
        """Training examples processed by all clients together."""
        return self.clients * self.rounds * self.local_steps * self.batch_size

    def overrides(self, out: str | Path) -> dict[str, Any]:
        """Its run-config keys (a ``sims.bench.sweep`` cell)."""
        return {
            "model": self.model,
            **PRIVACY[self.privacy],
            "dp-noise-seeded": True,
            "quant-policy": "none",
            "partitioning": "iid",
            "num-supernodes": self.clients,
            "num-server-rounds": self.rounds,
            "local-steps": self.local_steps,
            "batch-size": self.batch_size,
            "seed": self.seed,
            "eval-every": self.rounds,
            "ptq": "none",
            "out-dir": str(Path(out) / "models" / self.name),
        }


@dataclasses.dataclass(frozen=True)
class PTQCell:
    """One quantization of a trained model and its evaluation (``method`` FP: none)."""

    model: str
    privacy: str
    trained: str  # the TrainRun's name
    bits: str
    method: str
    seed: int
    iterations: int
    calibration_size: int
    test_size: int

    @property
    def file_name(self) -> str:
        """The result's file name under ``--out``/cells/<trained>."""
        if self.method == FP:
            return f"fp-t{self.test_size}.json"
        slug = self.method.lower().replace(" ", "-")
        return (
            f"{self.bits}-{slug}-c{self.calibration_size}-i{self.iterations}"
            f"-t{self.test_size}-s{self.seed}.json"
        )

    def key(self) -> dict[str, Any]:
        """What identifies the cell; a result file holding other values is not reused."""
        return dataclasses.asdict(self)

    def overrides(self) -> dict[str, Any]:
        """Its ``ptq-*`` run-config keys."""
        weight_bits, act_bits = BITS[self.bits]
        return {
            **METHODS[self.method],
            "ptq-weight-bits": weight_bits,
            "ptq-act-bits": act_bits,
            "ptq-calibration": "validation",
            "ptq-calibration-size": self.calibration_size,
            "ptq-iterations": self.iterations,
            "ptq-seed": self.seed,
        }


def train_runs(args: argparse.Namespace) -> list[TrainRun]:
    """The training runs of the grid, the most expensive first (DP, then the ResNet)."""
    runs = []
    for model, privacy in itertools.product(args.models, args.privacy):
        rounds, steps, batch = QUICK_TRAIN_PLAN if args.quick else TRAIN_PLANS[model, privacy]
        runs.append(TrainRun(model, privacy, rounds, steps, batch, clients=args.clients))
    return sorted(runs, key=lambda r: (r.privacy == "nodp", r.model != "resnet"))


def ptq_cells(args: argparse.Namespace, runs: Sequence[TrainRun]) -> list[PTQCell]:
    """Every trained model's float evaluation and its quantizations, the costliest first."""
    cells = []
    for run in runs:
        common = {
            "model": run.model,
            "privacy": run.privacy,
            "trained": run.name,
            "iterations": args.iterations,
            "calibration_size": args.calibration_size,
            "test_size": args.test_size,
        }
        cells.append(PTQCell(bits=FP, method=FP, seed=0, **common))
        for bits, method in itertools.product(args.bits, args.methods):
            seeds = args.seeds[:1] if method in DETERMINISTIC else args.seeds
            cells += [PTQCell(bits=bits, method=method, seed=s, **common) for s in seeds]
    # Longest first keeps both processes busy to the end.
    return sorted(cells, key=lambda c: (c.model != "resnet", c.method in (FP, "RTN")))


def cell_path(out: str | Path, cell: PTQCell) -> Path:
    """Where ``cell``'s result is kept."""
    return Path(out) / "cells" / cell.trained / cell.file_name


def load_result(out: str | Path, cell: PTQCell) -> dict[str, Any] | None:
    """The result of ``cell`` already finished under ``out`` with the same key, if any."""
    path = cell_path(out, cell)
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    if {k: data.get(k) for k in cell.key()} != cell.key():
        return None
    return data


def run_ptq_cell(job: tuple[PTQCell, str]) -> dict[str, Any]:
    """Quantize (or only evaluate) the trained model of ``job`` = (cell, out); save the result.

    The result holds the cell's key, the test accuracy (%), the per-unit diagnostics of
    :class:`fedquant.ptq.PTQResult`, the float and packed sizes, the PTQ wall time and
    the CPU times of the quantization, the evaluation and the whole cell.
    """
    import torch

    from fedquant.config import ModelName, RunConfig
    from fedquant.data import Split, load_mnist
    from fedquant.files import write_text_atomically
    from fedquant.models import build_model, evaluate
    from fedquant.ptq import quantize_model
    from sims.app.checkpoint import load_checkpoint
    from sims.ptq import calibration_images

    cell, out = job
    torch.set_num_threads(1)
    start, cpu = time.perf_counter(), time.process_time()
    checkpoint = load_checkpoint(Path(out) / "models" / cell.trained)
    if checkpoint is None:
        raise FileNotFoundError(f"no checkpoint of {cell.trained} under {out}/models")
    model = build_model(ModelName(cell.model), seed=0)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in checkpoint.arrays.items()})
    test = load_mnist().test
    test = Split(test.images[: cell.test_size], test.labels[: cell.test_size])
    result: dict[str, Any] = {**cell.key()}
    fp_bytes = 4 * sum(p.numel() for p in model.parameters())
    if cell.method == FP:
        evaluated, ptq_cpu = model, 0.0
        result.update(
            {
                "unit-names": [],
                "unit-losses": [],
                "groups": [],
                "capacities": [],
                "fp-bytes": fp_bytes,
                "packed-bytes": fp_bytes,
                "ptq-seconds": 0.0,
            }
        )
    else:
        settings = RunConfig.from_flower(cell.overrides(), strict=True).ptq
        ptq_cpu = time.process_time()
        quantized = quantize_model(model, settings, calibration=calibration_images(settings))
        ptq_cpu = time.process_time() - ptq_cpu
        evaluated = quantized.model
        result.update(
            {
                "unit-names": quantized.unit_names,
                "unit-losses": quantized.unit_losses,
                "groups": quantized.groups,
                "capacities": quantized.capacities,
                "fp-bytes": quantized.fp_bytes,
                "packed-bytes": quantized.packed_bytes,
                "ptq-seconds": quantized.seconds,
            }
        )
    eval_cpu = time.process_time()
    _, accuracy = evaluate(evaluated, test)
    eval_cpu = time.process_time() - eval_cpu
    result.update(
        {
            "accuracy": 100 * accuracy,
            "ptq-cpu-seconds": ptq_cpu,
            "eval-cpu-seconds": eval_cpu,
            CELL_SECONDS: time.perf_counter() - start,
            CELL_CPU_SECONDS: time.process_time() - cpu,
        }
    )
    write_text_atomically(cell_path(out, cell), json.dumps(result, indent=1))
    return result


def finished_training(run: TrainRun, out: str | Path) -> bool:
    """Whether ``run`` already finished under ``out`` with the same run config."""
    path = Path(out) / "models" / run.name / "results.json"
    if not path.is_file():
        return False
    data = json.loads(path.read_text())
    wanted = {k: v for k, v in run.overrides(out).items() if k != "out-dir"}
    same = all(data["config"].get(k) == v for k, v in wanted.items())
    return same and data["summary"]["rounds"] >= run.rounds


def run_all(
    runs: Sequence[TrainRun], cells: Sequence[PTQCell], *, jobs: int, out: str | Path
) -> tuple[list[dict[str, Any]], list[str]]:
    """Train (or reuse) every model and run (or reuse) every cell on ``jobs`` processes.

    A model's cells are queued as soon as it is trained, so the other processes
    quantize the models already trained while the longest training runs. Training
    goes through ``sims.bench.sweep.run_cell`` (the real round loop, in-process). A
    cell that raises is reported and left out; a training run that raises stops the
    sweep. Returns the cells' results and the failures.
    """
    from sims.bench.sweep import run_cell as train

    done = {cell: load_result(out, cell) for cell in cells}
    results = [r for r in done.values() if r is not None]
    waiting: dict[str, list[PTQCell]] = {}
    for cell, r in done.items():
        if r is None:
            waiting.setdefault(cell.trained, []).append(cell)
    to_train = [run for run in runs if not finished_training(run, out)]
    total = sum(len(v) for v in waiting.values())
    print(
        f"{len(to_train)} training runs and {total} PTQ cells on {jobs} processes"
        f" ({len(runs) - len(to_train)} trained models and {len(results)} cells reused) ...",
        file=sys.stderr,
        flush=True,
    )
    failures: list[str] = []
    if not to_train and not total:
        return results, failures
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        pending: dict[Future[dict[str, Any]], TrainRun | PTQCell] = {
            pool.submit(train, run.overrides(out)): run for run in to_train
        }

        def queue(trained: str) -> None:
            for cell in waiting.pop(trained, []):
                pending[pool.submit(run_ptq_cell, (cell, str(out)))] = cell

        for run in runs:
            if run not in to_train:
                queue(run.name)
        finished = 0
        while pending:
            complete, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in complete:
                item = pending.pop(future)
                if isinstance(item, TrainRun):
                    res = future.result()  # a model that cannot be trained stops the sweep
                    print(
                        f"trained {item.name}: accuracy {res['final-accuracy']:.4f}"
                        f" ({res[CELL_CPU_SECONDS] / 60:.1f} CPU-min)",
                        file=sys.stderr,
                        flush=True,
                    )
                    queue(item.name)
                    continue
                finished += 1
                try:
                    res = future.result()
                except Exception as err:  # keep the other cells; the report says what is missing
                    failures.append(f"{item.trained}/{item.file_name}: {err!r}")
                    print(
                        f"[{finished}/{total}] FAILED {failures[-1]}", file=sys.stderr, flush=True
                    )
                    continue
                results.append(res)
                print(
                    f"[{finished}/{total}] {res['trained']} {res['bits']} {res['method']}"
                    f" s{res['seed']}: accuracy {res['accuracy']:.2f}%"
                    f" ({res[CELL_CPU_SECONDS]:.1f} CPU-s)",
                    file=sys.stderr,
                    flush=True,
                )
    return results, failures


def train_records(out: str | Path, runs: Iterable[TrainRun]) -> list[dict[str, Any]]:
    """Summary and recorded time of each finished training run of ``runs`` under ``out``."""
    records = []
    for run in runs:
        folder = Path(out) / "models" / run.name
        path = folder / "results.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        if data["summary"]["rounds"] < run.rounds:
            continue
        timing = folder / CELL_TIMING
        seconds = json.loads(timing.read_text()) if timing.is_file() else {}
        records.append({**dataclasses.asdict(run), **data["summary"], **seconds})
    return records


def recorded_training(out: str | Path) -> list[dict[str, Any]]:
    """Every finished training run under ``out``/models (any plan), for the estimate."""
    runs = []
    for path in sorted(Path(out).glob("models/*/results.json")):
        config = json.loads(path.read_text())["config"]
        privacy = next(
            (
                name
                for name, keys in PRIVACY.items()
                if all(config.get(k) == v for k, v in keys.items())
            ),
            None,
        )
        if privacy is None or config.get("model") not in MODELS:
            continue
        run = TrainRun(
            config["model"],
            privacy,
            config["num-server-rounds"],
            config["local-steps"],
            config["batch-size"],
            clients=config["num-supernodes"],
            seed=config["seed"],
        )
        if run.name == path.parent.name:
            runs.append(run)
    return train_records(out, runs)


def recorded_cells(out: str | Path) -> list[dict[str, Any]]:
    """Every cell result under ``out``/cells (any settings), for the estimate."""
    return [json.loads(p.read_text()) for p in sorted(Path(out).glob("cells/*/*.json"))]


# Statistics, table and verdicts -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MethodRow:
    """One (model, privacy, bits, method): test accuracy (%) by seed, sizes and time."""

    model: str
    privacy: str
    bits: str
    method: str
    accuracy: dict[int, float]
    fp_bytes: int = 0
    packed_bytes: int = 0
    ptq_seconds: float = 0.0

    @property
    def mean(self) -> float:
        """Mean accuracy over seeds."""
        return statistics.mean(self.accuracy.values())

    @property
    def sd(self) -> float:
        """Standard deviation over seeds (0 for one run)."""
        values = list(self.accuracy.values())
        return statistics.stdev(values) if len(values) > 1 else 0.0

    def at(self, seed: int) -> float | None:
        """Accuracy at ``seed``; a deterministic method's one run stands for every seed."""
        if self.method in DETERMINISTIC and len(self.accuracy) == 1:
            return next(iter(self.accuracy.values()))
        return self.accuracy.get(seed)


def method_rows(results: Iterable[Mapping[str, Any]]) -> list[MethodRow]:
    """Results grouped by (model, privacy, bits, method), in the grid's order."""
    groups: dict[tuple[str, str, str, str], list[Mapping[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["model"], r["privacy"], r["bits"], r["method"]), []).append(r)

    def order(key: tuple[str, str, str, str]) -> tuple[int, int, int, int]:
        model, privacy, bits, method = key
        return (
            _index(MODELS, model),
            _index(tuple(PRIVACY), privacy),
            -1 if bits == FP else _index(tuple(BITS), bits),
            -1 if method == FP else _index(tuple(METHODS), method),
        )

    rows = []
    for key in sorted(groups, key=order):
        rs = groups[key]
        rows.append(
            MethodRow(
                *key,
                accuracy={int(r["seed"]): float(r["accuracy"]) for r in rs},
                fp_bytes=int(rs[0]["fp-bytes"]),
                packed_bytes=int(rs[0]["packed-bytes"]),
                ptq_seconds=statistics.mean(float(r["ptq-seconds"]) for r in rs),
            )
        )
    return rows


def _index(items: Sequence[str], item: str) -> int:
    return items.index(item) if item in items else len(items)


def _fp_rows(rows: Iterable[MethodRow]) -> dict[tuple[str, str], MethodRow]:
    return {(r.model, r.privacy): r for r in rows if r.method == FP}


def table(rows: Sequence[MethodRow]) -> list[str]:
    """One row per (model, privacy, bits, method), the float model first.

    Accuracy mean ± sd over seeds, the drop from the float model (points; positive is
    worse), float vs packed bytes and their ratio, PTQ wall time (mean over seeds).
    """
    fp = _fp_rows(rows)
    lines = [
        "| model | training | bits | method | accuracy % (mean ± sd) | drop from FP (points)"
        " | seeds | bytes: fp → packed | PTQ wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = fp.get((row.model, row.privacy))
        drop = "-" if base is None or row.method == FP else f"{base.mean - row.mean:+.2f}"
        if row.method == FP:
            size, seconds, seeds = f"{row.fp_bytes:,}", "-", "-"
        else:
            ratio = row.fp_bytes / row.packed_bytes if row.packed_bytes else math.nan
            size = f"{row.fp_bytes:,} → {row.packed_bytes:,} (x{ratio:.1f})"
            seconds = f"{row.ptq_seconds:.1f}"
            seeds = "1 (deterministic)" if row.method in DETERMINISTIC else str(len(row.accuracy))
        lines.append(
            f"| {row.model} | {PRIVACY_LABELS.get(row.privacy, row.privacy)} | {row.bits}"
            f" | {row.method} | {row.mean:.2f} ± {row.sd:.2f} | {drop} | {seeds} | {size}"
            f" | {seconds} |"
        )
    return lines


def paired(better: MethodRow, worse: MethodRow) -> tuple[float, float, int]:
    """Mean and standard error over seeds of ``better - worse``, seed by seed.

    The same ``ptq-seed`` gives both methods the same minibatch draws; a deterministic
    method's single run is paired with every seed. Without a common seed, the
    difference of the means with SE 0 and n 0.
    """
    seeds = sorted(set(better.accuracy) | set(worse.accuracy))
    diffs = []
    for seed in seeds:
        a, b = better.at(seed), worse.at(seed)
        if a is not None and b is not None:
            diffs.append(a - b)
    if not diffs:
        return better.mean - worse.mean, 0.0, 0
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
    return statistics.mean(diffs), se, len(diffs)


def _significance(diff: float, se: float, n: int) -> str:
    if n < 2:
        return f"{n} paired seed, no SE"
    spread = "significant, > 2 SE" if abs(diff) > 2 * se else "within 2 SE"
    return f"{spread}, {n} paired seeds"


def expected_pairs(methods: Iterable[str]) -> list[tuple[str, str]]:
    """(better, worse) pairs of :data:`EXPECTED_ORDER` among ``methods``, adjacent levels.

    Levels with no measured method are skipped: with RTN and BRECQ only, BRECQ ≥ RTN.
    """
    measured = set(methods)
    levels = [[m for m in level if m in measured] for level in EXPECTED_ORDER]
    levels = [level for level in levels if level]
    return [
        (better, worse)
        for upper, lower in itertools.pairwise(levels)
        for better in upper
        for worse in lower
    ]


def ordering_verdicts(rows: Sequence[MethodRow]) -> list[str]:
    """One line per (model, privacy, bits): the measured order and the paper's.

    The paper's MRECG ≥ BRECQ ≥ AdaRound ≥ RTN (for each MRECG variant) "holds" when
    every adjacent pair of :func:`expected_pairs` (the order restricted to the methods
    measured) has a mean paired difference ≥ 0; otherwise the line names each pair that
    does not, with its difference ± SE.
    """
    by = {(r.model, r.privacy, r.bits, r.method): r for r in rows if r.method != FP}
    settings = list(dict.fromkeys((r.model, r.privacy, r.bits) for r in by.values()))
    out = []
    for model, privacy, bits in settings:
        present = [r for (m, p, b, _), r in by.items() if (m, p, b) == (model, privacy, bits)]
        measured = " > ".join(
            f"{r.method} {r.mean:.2f}" for r in sorted(present, key=lambda r: -r.mean)
        )
        pairs = expected_pairs([r.method for r in present])
        failures = []
        for better, worse in pairs:
            diff, se, n = paired(by[model, privacy, bits, better], by[model, privacy, bits, worse])
            if diff < 0:
                failures.append(
                    f"{better} < {worse} by {-diff:.2f} ± {se:.2f} ({_significance(diff, se, n)})"
                )
        label = f"{model}, {PRIVACY_LABELS.get(privacy, privacy)}, {bits}"
        if not pairs:
            verdict = "not checked (fewer than two of its methods measured)"
        elif failures:
            verdict = "DOES NOT HOLD: " + "; ".join(failures)
        else:
            verdict = f"holds ({len(pairs)} pairs)"
        out.append(
            f"- {label}: measured {measured}. Expected MRECG ≥ BRECQ ≥ AdaRound ≥ RTN: {verdict}"
        )
    return out


def _gap(
    by: Mapping[tuple[str, str, str, str], MethodRow], key: tuple[str, str, str], a: str, b: str
) -> float | None:
    ra, rb = by.get((*key, a)), by.get((*key, b))
    return None if ra is None or rb is None else ra.mean - rb.mean


def gap_verdicts(rows: Sequence[MethodRow]) -> list[str]:
    """Whether each gap of :data:`GAPS` is widest at 2-bit weights and on the deeper model.

    Per (model, privacy): the gap at every bit setting, "yes" when it is largest at
    :data:`LOWEST_BITS`. Per privacy: the gap on the CNN and on the ResNet at every bit
    setting, "yes" when the ResNet's is larger at each.
    """
    by = {(r.model, r.privacy, r.bits, r.method): r for r in rows if r.method != FP}
    models = list(dict.fromkeys(r.model for r in by.values()))
    privacies = list(dict.fromkeys(r.privacy for r in by.values()))
    bit_settings = [b for b in BITS if any(r.bits == b for r in by.values())]
    out = []
    for a, b in GAPS:
        name = f"{a} − {b}"
        for model, privacy in itertools.product(models, privacies):
            gaps = {bits: _gap(by, (model, privacy, bits), a, b) for bits in bit_settings}
            known = {bits: g for bits, g in gaps.items() if g is not None}
            if len(known) < 2 or LOWEST_BITS not in known:
                continue
            widest = max(known, key=lambda bits: known[bits])
            shown = ", ".join(f"{bits} {g:+.2f}" for bits, g in known.items())
            verdict = "yes" if widest == LOWEST_BITS else f"NO (widest at {widest})"
            out.append(
                f"- gap {name}, {model}, {PRIVACY_LABELS.get(privacy, privacy)}: {shown} points;"
                f" widest at {LOWEST_BITS}: {verdict}"
            )
        if DEEPER not in models or len(models) < 2:
            continue
        shallow = next(m for m in models if m != DEEPER)
        for privacy in privacies:
            pairs = {
                bits: (
                    _gap(by, (shallow, privacy, bits), a, b),
                    _gap(by, (DEEPER, privacy, bits), a, b),
                )
                for bits in bit_settings
            }
            known_pairs = {
                bits: (s, d) for bits, (s, d) in pairs.items() if s is not None and d is not None
            }
            if not known_pairs:
                continue
            wider = [bits for bits, (s, d) in known_pairs.items() if d > s]
            shown = ", ".join(
                f"{bits} {s:+.2f} vs {d:+.2f}" for bits, (s, d) in known_pairs.items()
            )
            verdict = (
                "yes"
                if len(wider) == len(known_pairs)
                else f"NO (wider on {DEEPER} at {len(wider)} of {len(known_pairs)})"
            )
            out.append(
                f"- gap {name}, {PRIVACY_LABELS.get(privacy, privacy)}, {shallow} vs {DEEPER}:"
                f" {shown} points; wider on the deeper model at every bit setting: {verdict}"
            )
    return out


# Cost ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Budget:
    """The estimated cost of a sweep: CPU-minutes, and minutes on ``jobs`` processes.

    ``chain_min``: the longest training run plus its own cells shared by the processes
    (they cannot start before it ends), the least the sweep can take however it is run.
    """

    train_cpu_min: float
    ptq_cpu_min: float
    chain_min: float
    jobs: int
    unknown_train: int
    unknown_cells: int
    exact_cells: int

    @property
    def minutes(self) -> float:
        """Wall minutes: all the work shared by the processes, or the longest chain."""
        return max((self.train_cpu_min + self.ptq_cpu_min) / self.jobs, self.chain_min)


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return statistics.mean(values) if values else None


def _eval_per_image(records: Sequence[Mapping[str, Any]], model: str) -> float:
    """CPU-s per test image of the float model's evaluation (FP cells), 0 if unmeasured."""
    per = _mean(
        r["eval-cpu-seconds"] / r["test_size"]
        for r in records
        if r["model"] == model and r["method"] == FP
    )
    return per or 0.0


def estimate_train(
    run: TrainRun, records: Sequence[Mapping[str, Any]], eval_per_image: float
) -> float | None:
    """CPU-s of ``run``: its own record, or one of the same model and privacy, scaled.

    Scaled as fixed + (recorded - fixed) x examples / recorded examples, fixed being the
    server's two evaluations of the test set (initial and final).
    """
    same = [
        r
        for r in records
        if r["model"] == run.model and r["privacy"] == run.privacy and CELL_CPU_SECONDS in r
    ]
    exact = [r for r in same if TrainRun(**_train_fields(r)) == run]
    if exact:
        return float(exact[0][CELL_CPU_SECONDS])
    fixed = 2 * TEST_IMAGES * eval_per_image
    scaled = [
        fixed
        + max(r[CELL_CPU_SECONDS] - fixed, 0.0)
        * run.examples
        / TrainRun(**_train_fields(r)).examples
        for r in same
    ]
    return _mean(scaled)


def _train_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    return {f.name: record[f.name] for f in dataclasses.fields(TrainRun)}


def estimate_cell(cell: PTQCell, records: Sequence[Mapping[str, Any]]) -> float | None:
    """CPU-s of ``cell``: its own record, or the most alike records of its model and method.

    Most alike: the same iterations, then the same calibration size, then the same bits
    (privacy, seed and trained model do not change the work). A record's quantization
    time splits into what RTN costs on the same model, bits and calibration size
    (calibration passes, ranges, unit losses: scaled by calibration size) and the rest
    (the reconstruction: scaled by iterations); its evaluation scales by test images,
    and the rest of the cell (loading) is kept. Part of "the rest" also grows with the
    calibration size, not the iterations: scaled up from fewer iterations the estimate
    is high, scaled down low. Without an RTN record the whole quantization time is
    scaled by iterations.
    """
    exact = [r for r in records if {k: r.get(k) for k in cell.key()} == cell.key()]
    if exact:
        return float(exact[0][CELL_CPU_SECONDS])
    similar = [r for r in records if (r["model"], r["method"]) == (cell.model, cell.method)]
    if not similar:
        return None

    def likeness(r: Mapping[str, Any]) -> tuple[bool, bool, bool]:
        return (
            r["iterations"] == cell.iterations,
            r["calibration_size"] == cell.calibration_size,
            r["bits"] == cell.bits,
        )

    best = max(likeness(r) for r in similar)
    estimates = []
    for r in (r for r in similar if likeness(r) == best):
        base = _mean(
            x["ptq-cpu-seconds"]
            for x in records
            if (x["model"], x["bits"], x["method"], x["calibration_size"])
            == (r["model"], r["bits"], "RTN", r["calibration_size"])
        )
        if r["method"] == "RTN":
            base = r["ptq-cpu-seconds"]
        base = min(base if base is not None else 0.0, r["ptq-cpu-seconds"])
        reconstruction = r["ptq-cpu-seconds"] - base
        rest = max(r[CELL_CPU_SECONDS] - r["ptq-cpu-seconds"] - r["eval-cpu-seconds"], 0.0)
        estimates.append(
            base * cell.calibration_size / r["calibration_size"]
            + reconstruction * cell.iterations / r["iterations"]
            + r["eval-cpu-seconds"] * cell.test_size / r["test_size"]
            + rest
        )
    return _mean(estimates)


def estimate_budget(
    runs: Sequence[TrainRun],
    cells: Sequence[PTQCell],
    *,
    train: Sequence[Mapping[str, Any]],
    results: Sequence[Mapping[str, Any]],
    jobs: int,
) -> Budget:
    """The cost of training ``runs`` and running ``cells`` (:func:`run_all`), from records."""
    train_s = {
        run.name: estimate_train(run, train, _eval_per_image(results, run.model)) for run in runs
    }
    cell_s = [(cell, estimate_cell(cell, results)) for cell in cells]
    exact = sum(1 for c in cells if any({k: r.get(k) for k in c.key()} == c.key() for r in results))
    chains = [
        (seconds or 0.0) + sum(s or 0.0 for c, s in cell_s if c.trained == name) / jobs
        for name, seconds in train_s.items()
    ]
    return Budget(
        train_cpu_min=sum(s for s in train_s.values() if s is not None) / 60,
        ptq_cpu_min=sum(s for _, s in cell_s if s is not None) / 60,
        chain_min=max(chains, default=0.0) / 60,
        jobs=jobs,
        unknown_train=sum(1 for s in train_s.values() if s is None),
        unknown_cells=sum(1 for _, s in cell_s if s is None),
        exact_cells=exact,
    )


def budget_lines(budget: Budget, *, label: str, limit_min: float = 60.0) -> list[str]:
    """The estimate as report lines."""
    unknown = ""
    if budget.unknown_train or budget.unknown_cells:
        unknown = (
            f" Not estimated (nothing recorded to scale from): {budget.unknown_train} training"
            f" runs, {budget.unknown_cells} cells; the estimate is low by their cost."
        )
    fits = "fits" if budget.minutes <= limit_min else "DOES NOT fit"
    return [
        f"{label}: training {budget.train_cpu_min:.1f} CPU-min, quantization cells"
        f" {budget.ptq_cpu_min:.1f} CPU-min ({budget.exact_cells} from their own records,"
        f" the rest scaled), the longest training run and its cells {budget.chain_min:.1f}"
        f" min: about {budget.minutes:.0f} min on {budget.jobs} processes; {fits}"
        f" {limit_min:.0f} min on {budget.jobs} cores.{unknown}"
    ]


# Plot ---------------------------------------------------------------------------------


def plot(results: Sequence[Mapping[str, Any]], rows: Sequence[MethodRow], path: Path) -> Path:
    """Per-unit loss across depth at W2A4 (BRECQ vs MRECG), and accuracy per method.

    Top row, per model: each unit's reconstruction loss (MSE of its output against the
    float model's, log scale; mean over seeds), BRECQ and both MRECG variants, solid
    without DP and dashed with it; the MRECG legend entries name the merged groups.
    Below, per model and privacy: accuracy per method at each bit setting (error bars:
    sd over seeds), the float model's as a dotted line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in MODELS if any(r.model == m for r in rows)] or list(MODELS)
    privacies = [p for p in PRIVACY if any(r.privacy == p for r in rows)] or ["nodp"]
    nrows = 1 + len(privacies)
    fig, axes = plt.subplots(
        nrows, len(models), figsize=(6.0 * len(models), 3.6 * nrows), squeeze=False
    )
    colors = {
        "RTN": "tab:gray",
        "AdaRound": "tab:green",
        "BRECQ": "tab:blue",
        "MRECG data-free": "tab:red",
        "MRECG data-dependent": "tab:purple",
    }
    styles = {"nodp": "-", "eps8": "--"}
    for j, model in enumerate(models):
        ax = axes[0][j]
        names: list[str] = []
        for privacy, method in itertools.product(privacies, ("BRECQ", *MRECG_VARIANTS)):
            rs = [
                r
                for r in results
                if (r["model"], r["privacy"], r["bits"], r["method"])
                == (model, privacy, LOWEST_BITS, method)
                and r["unit-losses"]
            ]
            if not rs:
                continue
            names = list(rs[0]["unit-names"])
            losses = [statistics.mean(v) for v in zip(*(r["unit-losses"] for r in rs), strict=True)]
            merged = [g for g in rs[0]["groups"] if len(g) > 1]
            groups = f" merged {merged}" if method in MRECG_VARIANTS else ""
            ax.plot(
                range(len(losses)),
                [v if v > 0 else math.nan for v in losses],
                marker="o",
                color=colors[method],
                linestyle=styles.get(privacy, ":"),
                label=f"{method}, {PRIVACY_LABELS.get(privacy, privacy)}{groups}",
            )
        ax.set_yscale("log")
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        ax.set_title(f"{model}, {LOWEST_BITS}: per-unit reconstruction loss")
        ax.set_ylabel("output MSE vs float")
        ax.grid(alpha=0.3)
        if names:
            ax.legend(fontsize=6)
        for i, privacy in enumerate(privacies, 1):
            ax = axes[i][j]
            bits_present = [b for b in BITS if any(r.bits == b and r.model == model for r in rows)]
            methods = [m for m in METHODS if any(r.method == m for r in rows)]
            width = 0.8 / max(len(methods), 1)
            for k, method in enumerate(methods):
                pts = [
                    next(
                        (
                            r
                            for r in rows
                            if (r.model, r.privacy, r.bits, r.method) == (model, privacy, b, method)
                        ),
                        None,
                    )
                    for b in bits_present
                ]
                xs = [x + (k - (len(methods) - 1) / 2) * width for x in range(len(bits_present))]
                ax.bar(
                    xs,
                    [p.mean if p else math.nan for p in pts],
                    width,
                    yerr=[p.sd if p else 0.0 for p in pts],
                    color=colors[method],
                    label=method,
                    capsize=2,
                )
            fp = _fp_rows(rows).get((model, privacy))
            if fp is not None:
                ax.axhline(fp.mean, color="black", linestyle=":", label=f"FP {fp.mean:.2f}")
            ax.set_xticks(range(len(bits_present)), bits_present)
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"{model}, {PRIVACY_LABELS.get(privacy, privacy)}")
            ax.grid(alpha=0.3, axis="y")
            ax.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# Command line -------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; ``--quick`` replaces the defaults not given explicitly."""
    doc = (__doc__ or "").split("\n")[0]
    parser = argparse.ArgumentParser(prog="python -m sims.bench.ptq", description=doc)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="ptq-seed values")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--privacy", nargs="+", choices=list(PRIVACY), default=list(PRIVACY))
    parser.add_argument("--bits", nargs="+", choices=list(BITS), default=list(BITS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument(
        "--iterations",
        type=int,
        default=300,
        help="ptq-iterations: Adam steps per reconstruction unit (fits the hour; papers: 20,000)",
    )
    parser.add_argument(
        "--calibration-size",
        type=int,
        default=256,
        help="ptq-calibration-size: validation images (minibatches of 32 are drawn from them)",
    )
    parser.add_argument(
        "--test-size",
        type=int,
        default=TEST_IMAGES,
        help="test images each model is evaluated on (a ResNet pass over 10,000 costs ~20 CPU-s)",
    )
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="outputs/bench-ptq")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: tiny training (2 rounds x 5 steps of 64), 20 iterations, one seed,"
        " 64 calibration and 1,000 test images (~3 min)",
    )
    parser.add_argument(
        "--collect", action="store_true", help="only tabulate the finished cells under --out"
    )
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**dict.fromkeys(QUICK))  # None: the flag was not given
        given = parser.parse_args(argv)
        for key, value in QUICK.items():
            if getattr(given, key) is None:  # explicit flags win, even at their default
                setattr(args, key, value)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Train (or reuse) the models, run (or reuse, or only collect) the cells, report."""
    args = parse_args(argv)
    started = time.perf_counter()
    runs = train_runs(args)
    cells = ptq_cells(args, runs)
    failures: list[str] = []
    if args.collect:
        results = [r for c in cells if (r := load_result(args.out, c)) is not None]
    else:
        results, failures = run_all(runs, cells, jobs=args.jobs, out=args.out)
    trained = train_records(args.out, runs)
    rows = method_rows(results)
    report = [
        f"# Post-training quantization benchmark ({len(results)} of {len(cells)} cells)",
        "",
        f"Calibration: the first {args.calibration_size} validation images;"
        f" {args.iterations} Adam steps per reconstruction unit; ptq-seed"
        f" {', '.join(map(str, args.seeds))}; top-k and QDrop at their defaults; accuracy on"
        f" the first {args.test_size:,} test images.",
        "",
        "## Trained models (federated, in-process round loop)",
        "",
        "| model | training | clients | rounds x steps, batch | accuracy % (server, 10,000 test)"
        " | max epsilon | CPU-min |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in trained:
        cpu = r.get(CELL_CPU_SECONDS)
        report.append(
            f"| {r['model']} | {PRIVACY_LABELS[r['privacy']]} | {r['clients']}"
            f" | {r['rounds']} x {r['local_steps']}, {r['batch_size']}"
            f" | {100 * (r['final-accuracy'] or 0.0):.2f} | {r['max-epsilon']:.3f}"
            f" | {'-' if cpu is None else f'{cpu / 60:.1f}'} |"
        )
    report += ["", "## Accuracy, size and time", "", *table(rows)]
    report += [
        "",
        "## The paper's ordering, from the measured means (paired by seed ± SE)",
        "",
        *ordering_verdicts(rows),
        "",
        *gap_verdicts(rows),
    ]
    if results:
        figure = plot(results, rows, Path(args.out) / "ptq.png")
        report += ["", f"Per-unit loss across depth (W2A4) and accuracy per method: {figure}"]
    wall = sum(r[CELL_SECONDS] for r in results) + sum(r.get(CELL_SECONDS, 0) for r in trained)
    cpu = sum(r[CELL_CPU_SECONDS] for r in results) + sum(
        r.get(CELL_CPU_SECONDS, 0) for r in trained
    )
    default = parse_args(["--jobs", str(args.jobs)])
    default_runs = train_runs(default)
    sources = list(dict.fromkeys([args.out, default.out]))  # --quick: also the real sweep's
    report += [
        "",
        "## Cost",
        "",
        f"Wall time of this invocation: {(time.perf_counter() - started) / 60:.1f} min."
        f" Its cells and training runs as recorded: {wall / 60:.1f} process-minutes of wall"
        f" time, {cpu / 60:.1f} CPU-minutes.",
        "",
        *budget_lines(
            estimate_budget(
                default_runs,
                ptq_cells(default, default_runs),
                train=[r for out in sources for r in recorded_training(out)],
                results=[r for out in sources for r in recorded_cells(out)],
                jobs=args.jobs,
            ),
            label="The default sweep, estimated from the times recorded under"
            f" {' and '.join(sources)}",
        ),
    ]
    if failures:
        report += ["", f"## {len(failures)} cells FAILED (left out above)", ""]
        report += [f"- {failure}" for failure in failures]
    write_report(report, args.out)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
