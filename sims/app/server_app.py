"""The fedquant ServerApp (Flower Message API).

Validates the run config before any client is contacted, then runs the quantized
strategy for ``num-server-rounds`` rounds with central evaluation on the held-out
MNIST test split, printing one progress line per round and writing ``results.json``,
``rounds.csv``, ``rounds.png`` and a checkpoint (``sims.app.checkpoint``) to ``out-dir``
after every round; ``resume=true`` continues from the last complete round. With ``ptq``
set, the final model is then quantized (``sims.ptq``): a ``ptq`` section in
results.json, the packed model and a per-unit loss plot; a failure there is logged and
recorded in that section, and the training results stay.
"""

from __future__ import annotations

import logging
import random
import time
import traceback
from logging import ERROR, INFO, WARNING
from typing import cast

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fedquant.config import PTQMethod, RunConfig
from fedquant.data import Split, load_mnist
from fedquant.models import build_model, evaluate
from fedquant.seeds import node_seed
from fedquant.training import validate_privacy_plan
from sims.app.checkpoint import Checkpoint, check_same_experiment, load_checkpoint, save_checkpoint
from sims.app.report import RunReport, plot_ptq_units, ptq_failure, ptq_summary
from strategies import round_report as metric
from strategies.quantized import QuantizedStrategy, strategy_from_config

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the run config and the privacy plan, then run every round."""
    cfg = RunConfig.from_flower(context.run_config)
    # A bad aggregator fails here, before clients; a fresh run starts from the seeded
    # model every client can build, so a quantized downlink need not send it.
    strategy = strategy_from_config(cfg, clients_hold_initial=not cfg.run.resume)
    validate_privacy_plan(cfg)
    run(grid, cfg, strategy)


def run(grid: Grid, cfg: RunConfig, strategy: QuantizedStrategy) -> RunReport:
    """Run the rounds (from the last checkpoint if ``resume``) and write the report.

    Each round: wait (at most ``round-timeout``) for the SuperNodes to be online, send
    the training instructions, aggregate the replies that arrive within
    ``round-timeout``, evaluate centrally, and write the checkpoint.
    """
    torch.set_num_threads(1)
    test = load_mnist().test
    model = build_model(cfg.train.model, seed=cfg.run.seed)
    report = RunReport(cfg.run.out_dir, cfg.to_flower())
    if warning := cfg.privacy_warning:
        log(WARNING, "[fedquant] %s", warning)
        report.warnings.append(warning)
    arrays = ArrayRecord(model.state_dict())
    first_round = 1
    checkpoint = load_checkpoint(cfg.run.out_dir) if cfg.run.resume else None
    if checkpoint is not None:
        check_same_experiment(checkpoint, cfg.to_flower())
        arrays = ArrayRecord({k: Array(v) for k, v in checkpoint.arrays.items()})
        report.initial = dict(checkpoint.report["initial"])
        report.rows = list(checkpoint.report["rows"])
        strategy.load_state(checkpoint.strategy)
        first_round = checkpoint.server_round + 1
        _progress("resuming after round %d from %s", checkpoint.server_round, cfg.run.out_dir)
    else:
        if cfg.run.resume:
            _progress("no checkpoint in %s: starting from round 1", cfg.run.out_dir)
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate(model, test)
        report.initial = {"accuracy": accuracy, "loss": loss}
        _progress("round  0: accuracy %.4f (initial model)", accuracy)
    strategy.summary()

    for server_round in range(first_round, cfg.run.num_server_rounds + 1):
        wait_for_nodes(grid, cfg.run.num_supernodes, timeout=cfg.run.round_timeout)
        # Flower's strategies sample with `random`: seeding it per round makes a
        # resumed run sample the nodes an uninterrupted one would have.
        random.seed(node_seed(cfg.run.seed, server_round))
        messages = strategy.configure_train(server_round, arrays, ConfigRecord({}), grid)
        replies = grid.send_and_receive(messages, timeout=cfg.run.round_timeout)
        new_arrays, metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        row: dict[str, object] = {**(metrics or {}), "round": server_round}
        if server_round % cfg.run.eval_every == 0 or server_round == cfg.run.num_server_rounds:
            model.load_state_dict(arrays.to_torch_state_dict())
            row["loss"], row["accuracy"] = evaluate(model, test)
        _progress_round(report.add_round(row))
        save_checkpoint(
            cfg.run.out_dir,
            Checkpoint(
                server_round=server_round,
                arrays={k: v.numpy() for k, v in arrays.items()},
                config=cfg.to_flower(),
                report={"initial": report.initial, "rows": report.rows},
                strategy=strategy.state(),
            ),
        )

    plot = report.plot()
    if cfg.ptq.method is not PTQMethod.NONE:
        post_training_quantization(cfg, arrays, report, test=test)
    s = report.summary()
    _progress(
        "summary: final accuracy %.4f | max epsilon %.3f | mean speedup x%.2f | total downlink"
        " %s B (%.4f of float32) | total uplink %s B"
        " vs float32 %s B | compression x%.2f (%.4f of float32) | both directions %.4f of"
        " float32 | rejected %d, failed %d,"
        " missing %d, skipped rounds %d, discarded rounds %d%s | results in %s (plot %s)",
        s["final-accuracy"] or 0.0,
        s["max-epsilon"],
        s["mean-speedup"] or 1.0,
        f"{s['total-downlink-bytes']:,}",
        s["downlink-fraction-of-float32"] or 0.0,
        f"{s['total-uplink-bytes']:,}",
        f"{s['total-uplink-float32-bytes']:,}",
        s["compression-ratio"] or 0.0,
        s["uplink-fraction-of-float32"] or 0.0,
        s["total-fraction-of-float32"] or 0.0,
        s["rejected-replies"],
        s["failed-replies"],
        s["missing-replies"],
        s["skipped-rounds"],
        s["discarded-rounds"],
        "" if report.ptq is None else " | " + ptq_summary(report.ptq),
        report.out_dir,
        plot.name,
    )
    return report


def post_training_quantization(
    cfg: RunConfig, arrays: ArrayRecord, report: RunReport, *, test: Split
) -> None:
    """Quantize the final global model (``cfg.ptq``) into ``report.ptq``, and write it.

    The packed model and the per-unit loss plot go next to results.json. Any failure
    is logged with its traceback and recorded as the section's ``error``: the rounds'
    results, already written, are never lost to it.
    """
    _progress(
        "post-training quantization of the final model: ptq %s, W%dA%d, calibration %s",
        cfg.ptq.method.value,
        cfg.ptq.weight_bits,
        cfg.ptq.act_bits,
        cfg.ptq.calibration.value,
    )
    try:
        from sims import ptq  # only runs that ask for PTQ load it

        section = ptq.quantize_final_model(
            cfg.train.model,
            arrays.to_torch_state_dict(),
            cfg.ptq,
            test=test,
            packed_path=report.out_dir / ptq.MODEL_FILE,
        )
        section["plot"] = plot_ptq_units(report.out_dir / ptq.PLOT_FILE, [section]).name
    except Exception as err:  # PTQ runs after training: it must not lose the training
        log(
            ERROR,
            "[fedquant] post-training quantization (ptq = %r) failed; the training results"
            " in %s are kept:\n%s",
            cfg.ptq.method.value,
            report.out_dir,
            traceback.format_exc(),
        )
        section = ptq_failure(cfg.ptq, err)
    report.ptq = section
    report.write()


def wait_for_nodes(grid: Grid, wanted: int, *, timeout: float) -> int:
    """Wait until ``wanted`` nodes are online, or ``timeout`` seconds; return how many are.

    A dead SuperNode must not hang the run: after the timeout the round goes on with
    the nodes that are online (the strategy's minimums decide whether that suffices).
    """
    deadline = time.monotonic() + timeout
    while (online := len(list(grid.get_node_ids()))) < wanted and time.monotonic() < deadline:
        time.sleep(1.0)
    if online < wanted:
        log(
            WARNING,
            "[fedquant] %d of %d nodes online after %.0f s; going on with them",
            online,
            wanted,
            timeout,
        )
    return online


def _progress_round(row: dict[str, object]) -> None:
    layers = cast(list[float], row[metric.QUANTIZED_LAYER_FRACTION] or [])
    epsilons = cast(list[float], row[metric.EPSILON_CLIENTS] or [])
    accuracy = row["accuracy"]
    _progress(
        "round %2d: accuracy %s | downlink %s B | uplink %s B vs float32 %s B (x%.1f smaller)"
        " | mse mean %.2e | epsilon max %.3f (clients %s) | quantized layers %s"
        " | speedup x%.2f | accepted %d, rejected %d, failed %d, missing %d,"
        " budget-exhausted %d, norm-clipped %d, down-weighted %d%s",
        row["round"],
        "-" if accuracy is None else f"{accuracy:.4f}",
        f"{row[metric.DOWNLINK_BYTES] or 0:,}",
        f"{row[metric.UPLINK_BYTES] or 0:,}",
        f"{row[metric.UPLINK_FLOAT32_BYTES] or 0:,}",
        row["compression"] or 0.0,
        row[metric.MSE_MEAN] or 0.0,
        row[metric.EPSILON_MAX] or 0.0,
        " ".join(f"{e:.2f}" for e in epsilons) or "-",
        "[" + " ".join(f"{f:.2f}" for f in layers) + "]",
        row[metric.SPEEDUP] or 1.0,
        row[metric.ACCEPTED] or 0,
        row[metric.REJECTED] or 0,
        row[metric.FAILED] or 0,
        row[metric.MISSING] or 0,
        row[metric.BUDGET_EXHAUSTED] or 0,
        row[metric.NORM_CLIPPED] or 0,
        row[metric.DOWN_WEIGHTED] or 0,
        " | SKIPPED: too few replies, model unchanged"
        if row[metric.SKIPPED]
        else " | DISCARDED: absurd aggregate, model unchanged"
        if row[metric.DISCARDED]
        else "",
    )


def _progress(fmt: str, *args: object) -> None:
    log(INFO, "[fedquant] " + fmt, *args)


logging.getLogger("matplotlib").setLevel(logging.WARNING)
