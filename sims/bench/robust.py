"""Benchmark: hostile clients against each aggregator, through the real round loop.

    python -m sims.bench.robust              # every attack x aggregator (~5 min on 2 cores)
    python -m sims.bench.robust --seeds 0 1  # more seeds

Each cell is a run of 10 clients, 4-bit uploads, no DP (``--rounds`` x
``--local-steps`` of batch 64), the real ServerApp loop, strategy and ClientApp
in-process (``sims.bench.attacks.HostileGrid``), with the attackers' replies edited after
honest training: well-formed replies that pass every check of the codec. Prints, per
attack and aggregator, the final accuracy and the reply counts the strategy logged
(accepted, rejected, norm-clipped, down-weighted, discarded rounds), and writes the
table to ``--out``/bench.md. Finished runs under ``--out`` are reused.

The ``undefended`` columns show ``error-weighted`` and ``fedavg`` with the defaults
before issue 10: a norm bound of 10 x the round's median and no share cap (the
server's check of each reported MSE against its grid cannot be turned off).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

CLIENTS = 10
# Attack name -> (attacker node ids, attack name in sims.bench.attacks or "count-at-cap").
ATTACK_SETUPS: dict[str, tuple[tuple[int, ...], str | None]] = {
    "none": ((), None),
    "1 x MSE 0": ((1,), "mse-zero"),
    "1 x sign-flip x9": ((1,), "flip-x9"),
    "1 x scale x100": ((1,), "scale-x100"),
    "1 x sign-flip x9, MSE 0": ((1,), "flip-x9+mse-zero"),
    "1 x sign-flip x9, count at cap": ((1,), "flip-x9+count-at-cap"),
    "3 x sign-flip x9": ((1, 2, 3), "flip-x9"),
}
# Column -> run-config overrides.
AGGREGATORS: dict[str, dict[str, Any]] = {
    "error-weighted": {"aggregator": "error-weighted"},
    "fedavg": {"aggregator": "fedavg"},
    "median": {"aggregator": "median", "byzantine-clients": 3},
    "trimmed-mean (b=3)": {"aggregator": "trimmed-mean", "byzantine-clients": 3},
    "error-weighted, undefended": {
        "aggregator": "error-weighted",
        "update-norm-factor": 10.0,
        "weight-cap": 0.0,
    },
    "fedavg, undefended": {"aggregator": "fedavg", "update-norm-factor": 10.0, "weight-cap": 0.0},
}
COUNTS = ("accepted", "rejected", "norm-clipped", "down-weighted")


def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """One run; returns its final accuracy and the summed reply counts."""
    import torch

    from clients.client_app import app as client_app
    from fedquant.config import RunConfig
    from fedquant.dpquant import QuantPolicy
    from sims.app.server_app import run
    from sims.bench.attacks import ATTACKS, Attack, HostileGrid, chained, metrics, scaled
    from strategies.quantized import strategy_from_config

    out = Path(cell["out"])
    if (out / "rounds.png").exists():  # written last: the run finished; reuse it
        data = json.loads((out / "results.json").read_text())
        return _cell_result(cell, data["summary"], data["rounds"])
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    cfg = RunConfig.from_flower(
        {
            "num-supernodes": CLIENTS,
            "num-server-rounds": cell["rounds"],
            "local-steps": cell["local_steps"],
            "batch-size": 64,
            "dp": False,
            "quant-policy": QuantPolicy.NONE,
            "bits": 4,
            "seed": cell["seed"],
            "eval-every": cell["rounds"],
            "out-dir": cell["out"],
            **AGGREGATORS[cell["aggregator"]],
        }
    )
    nodes, name = ATTACK_SETUPS[cell["attack"]]

    def build(name: str) -> Attack:
        if name == "flip-x9+count-at-cap":  # just below the exclusive limit: accepted
            count = metrics(num_examples=cfg.robust.max_num_examples - 1)
            return Attack(name, chained(scaled(-9.0), count))
        return ATTACKS[name]()

    attacks = {node: build(name) for node in nodes if name is not None}
    grid = HostileGrid(client_app, num_nodes=CLIENTS, run_config=cfg.to_flower(), attacks=attacks)
    report = run(grid, cfg, strategy_from_config(cfg))
    return _cell_result(cell, report.summary(), report.rows)


def _cell_result(
    cell: dict[str, Any], summary: dict[str, Any], rows: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    return {
        **cell,
        "accuracy": 100 * (summary["final-accuracy"] or 0.0),
        "discarded": summary["discarded-rounds"],
        **{key: sum(r[key] or 0 for r in rows) for key in COUNTS},
    }


def table(results: Sequence[dict[str, Any]], seeds: Sequence[int]) -> list[str]:
    """Rows attack, columns aggregator: accuracy (mean over seeds) and the counts."""
    head = "| attack | " + " | ".join(AGGREGATORS) + " |"
    lines = [head, "|---|" + "---|" * len(AGGREGATORS)]
    for attack in ATTACK_SETUPS:
        cells = []
        for aggregator in AGGREGATORS:
            rs = [r for r in results if r["attack"] == attack and r["aggregator"] == aggregator]
            if not rs:
                cells.append("-")
                continue
            acc = statistics.mean(r["accuracy"] for r in rs)
            counts = "/".join(str(sum(r[k] for r in rs)) for k in (*COUNTS, "discarded"))
            cells.append(f"{acc:.2f} ({counts})")
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    return [
        *lines,
        "",
        f"Final test accuracy %, mean over seeds {', '.join(map(str, seeds))}; in brackets the"
        " replies accepted / rejected / norm-clipped / down-weighted and the rounds discarded,"
        " summed over rounds and seeds.",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or reuse) every attack x aggregator cell and print the table."""
    parser = argparse.ArgumentParser("python -m sims.bench.robust", description=__doc__)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="outputs/bench-robust")
    args = parser.parse_args(argv)
    cells = [
        {
            "attack": attack,
            "aggregator": aggregator,
            "seed": seed,
            "rounds": args.rounds,
            "local_steps": args.local_steps,
            "out": str(Path(args.out) / "runs" / f"{i:02d}-s{seed}"),
        }
        for i, (attack, aggregator) in enumerate((a, g) for a in ATTACK_SETUPS for g in AGGREGATORS)
        for seed in args.seeds
    ]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(run_cell, cells))
    lines = [
        f"# Robustness: {CLIENTS} clients, {args.rounds} rounds x {args.local_steps} local steps,"
        " 4-bit uploads, no DP",
        "",
        *table(results, args.seeds),
    ]
    print("\n".join(lines))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
