"""The fedquant ServerApp (Flower Message API).

Validates the run config before any client is contacted, then runs the quantized
strategy for ``num-server-rounds`` rounds with central evaluation on the held-out
MNIST test split, printing one progress line per round and writing ``results.json``,
``rounds.csv`` and ``rounds.png`` to ``out-dir``.
"""

from __future__ import annotations

import logging
from logging import INFO

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from clients.client_app import dp_settings, quant_settings
from fedquant.config import ConfigError, RunConfig
from fedquant.data import load_mnist, partition_indices
from fedquant.private import calibrate_client_noise, round_plan
from fedquant.models import build_model, evaluate
from sims.report import RunReport
from strategies.quantized import QuantizedStrategy, strategy_from_config

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flower(context.run_config)
    strategy = strategy_from_config(cfg)  # a bad aggregator fails here, before clients
    validate_privacy_plan(cfg)
    run(grid, cfg, strategy)


def validate_privacy_plan(cfg: RunConfig) -> None:
    """Fail before any client starts if some client cannot meet the (ε, δ) target.

    Calibrates every simulated partition's noise multiplier the way its client will
    (all planned rounds plus DPQuant's estimator queries); an impossible target raises
    ConfigError naming target-epsilon.
    """
    if not cfg.dp:
        return
    parts = partition_indices(
        num_partitions=cfg.num_supernodes,
        partitioning=cfg.partitioning,
        alpha=cfg.dirichlet_alpha,
        seed=cfg.seed,
    )
    dp, quant = dp_settings(cfg), quant_settings(cfg)
    assert dp is not None
    for size in sorted({len(p) for p in parts}):
        plan = round_plan(
            size, batch_size=cfg.batch_size, epochs=cfg.local_epochs, max_steps=cfg.local_steps
        )
        try:
            calibrate_client_noise(plan, rounds=cfg.num_server_rounds, dp=dp, quant=quant)
        except ValueError as err:
            raise ConfigError(
                "target-epsilon",
                cfg.target_epsilon,
                f"cannot be met by a client with {size} examples over "
                f"{cfg.num_server_rounds} rounds: {err}",
            ) from err


def run(grid: Grid, cfg: RunConfig, strategy: QuantizedStrategy) -> RunReport:
    """Run the rounds and write the report; returns it."""
    torch.set_num_threads(1)
    test = load_mnist().test
    model = build_model(cfg.model, seed=cfg.seed)
    report = RunReport(cfg.out_dir, cfg.to_flower())

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        last = server_round == cfg.num_server_rounds
        if server_round % cfg.eval_every and not last:
            report.add_round({**strategy.round_metrics.get(server_round, {}), "round": server_round})
            return None
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate(model, test)
        if server_round == 0:
            report.initial = {"accuracy": accuracy, "loss": loss}
            _progress("round  0: accuracy %.4f (initial model)", accuracy)
        else:
            train = dict(strategy.round_metrics.get(server_round, {}))
            row = report.add_round({**train, "round": server_round, "accuracy": accuracy, "loss": loss})
            layers = row["quantized-layer-fraction"] or []
            _progress(
                "round %2d: accuracy %.4f | uplink %s B vs float32 %s B (x%.1f smaller)"
                " | mse mean %.2e | epsilon max %.3f (clients %s) | quantized layers %s"
                " | speedup x%.2f"
                " | accepted %d, rejected %d, failed %d, budget-exhausted %d",
                server_round,
                accuracy,
                f"{row['uplink-bytes'] or 0:,}",
                f"{row['uplink-float32-bytes'] or 0:,}",
                row["compression"] or 0.0,
                row["mse-mean"] or 0.0,
                row["epsilon-max"] or 0.0,
                " ".join(f"{e:.2f}" for e in row["epsilon-clients"] or []) or "-",
                "[" + " ".join(f"{f:.2f}" for f in layers) + "]",
                row["speedup"] or 1.0,
                row["accepted"] or 0,
                row["rejected"] or 0,
                row["failed"] or 0,
                row["budget-exhausted"] or 0,
            )
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=cfg.num_server_rounds,
        timeout=cfg.round_timeout,
        train_config=ConfigRecord({}),
        evaluate_fn=central_evaluate,
    )
    plot = report.plot()
    s = report.summary()
    _progress(
        "summary: final accuracy %.4f | max epsilon %.3f | mean speedup x%.2f | total uplink %s B"
        " vs float32 %s B | compression x%.2f (%.4f of float32) | rejected %d, failed %d"
        " | results in %s (plot %s)",
        s["final-accuracy"] or 0.0,
        s["max-epsilon"],
        s["mean-speedup"] or 1.0,
        f"{s['total-uplink-bytes']:,}",
        f"{s['total-uplink-float32-bytes']:,}",
        s["compression-ratio"] or 0.0,
        s["uplink-fraction-of-float32"] or 0.0,
        s["rejected-replies"],
        s["failed-replies"],
        report.out_dir,
        plot.name,
    )
    return report


def _progress(fmt: str, *args: object) -> None:
    log(INFO, "[fedquant] " + fmt, *args)


logging.getLogger("matplotlib").setLevel(logging.WARNING)
