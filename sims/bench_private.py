"""Benchmark: DP-SGD x DPQuant policies (paper A), and DP-SGD throughput with fake quantization.

    python -m sims.bench_private              # the full grid (see --help)

Rows: {no DP, DP at each target epsilon} x {no training quantization, static, random,
dpquant} at each quantization ratio; final test accuracy as mean ± std over seeds, and
the theoretical training speedup (paper A's formula from per-layer FLOPs and the layers
that actually ran quantized, estimator cost included). Every cell runs the real
ServerApp loop, strategy and ClientApp through ``sims.inprocess.InProcessGrid``, with
the same clients, rounds and seeds, and with ``dp-noise-seeded = true`` so that a cell
reruns bit for bit and cells with the same seed share their noise stream (a benchmark,
not a private deployment). Then the accountants: the noise multiplier RDP and PRV
calibrate for the same plans and targets, and the accuracy each gives at the same seeds.
Last, DP-SGD samples per second (Opacus, hooks) with and without fake quantization,
measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sims.bench import collect, run_sweep, sweep_parser, write_report

POLICIES = ("static", "random", "dpquant")
ACCOUNTANTS = ("rdp", "prv")
# Where the clients' data comes from: (partitioning, clients); one client holding all
# 50,000 training examples is central DP-SGD through the same code path.
SETTINGS = {
    "iid": ("iid", None),  # None: --clients
    "dirichlet": ("dirichlet", None),
    "central": ("iid", 1),
}
CELL_KEYS = (
    "dp", "target-epsilon", "accountant", "quant-policy", "quant-train-ratio", "partitioning",
    "num-supernodes", "seed",
)


def cells(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The policy grid (``args.accountant``), the accountant comparison, then the
    accuracy targets in every data setting (``--targets``)."""
    privacy: list[float | None] = [None, *args.epsilons]
    rows: list[tuple[str, float | None, str, str, float]] = []
    for eps in privacy:
        rows.append(("iid", eps, args.accountant, "none", 0.0))
        rows += [
            ("iid", eps, args.accountant, policy, ratio)
            for policy, ratio in itertools.product(POLICIES, args.ratios)
        ]
    rows += [
        ("iid", eps, accountant, "dpquant", 0.5)
        for eps, accountant in itertools.product(args.accountant_epsilons, ACCOUNTANTS)
    ]
    rows += [
        (setting, eps, args.accountant, "dpquant", 0.5)
        for setting, eps in itertools.product(args.targets, args.target_epsilons)
    ]
    out: dict[str, dict[str, Any]] = {}  # by name: the sections share some cells
    for (setting, eps, accountant, policy, ratio), seed in itertools.product(rows, args.seeds):
        partitioning, clients = SETTINGS[setting]
        privacy_name = "nodp" if eps is None else f"eps{eps:g}-{accountant}"
        prefix = "" if setting == "iid" else f"{setting}-"
        name = f"{prefix}{privacy_name}-{policy}-r{ratio:g}-s{seed}"
        out[name] = {
            "dp": eps is not None,
            "target-epsilon": eps if eps is not None else 8.0,
            "accountant": accountant,
            "dp-noise-seeded": True,
            "quant-policy": policy,
            "quant-train-ratio": ratio,
            "quant-format": args.format,
            "model": args.model,
            "seed": seed,
            "partitioning": partitioning,
            "num-server-rounds": args.rounds,
            "num-supernodes": clients or args.clients,
            "local-steps": args.local_steps,
            "batch-size": args.batch_size,
            "eval-every": args.rounds,
            "out-dir": str(Path(args.out) / "runs" / name),
        }
    return list(out.values())


def _row_key(r: dict[str, Any]) -> tuple[Any, ...]:
    privacy = (r["target-epsilon"], r["accountant"]) if r["dp"] else None
    return (r["dp"], privacy, r["quant-policy"], r["quant-train-ratio"])


def table(results: list[dict[str, Any]], *, accountant: str) -> list[str]:
    """The policy grid: rows whose DP runs used ``accountant``."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in _federated_iid(results):
        if not r["dp"] or r["accountant"] == accountant:
            groups.setdefault(_row_key(r), []).append(r)
    lines = [
        "| privacy | policy | ratio | accuracy % (mean ± std) | max epsilon | theoretical speedup"
        " |",
        "|---|---|---|---|---|---|",
    ]
    for (dp, privacy, policy, ratio), rs in groups.items():
        eps = privacy[0] if privacy else None
        accs = [100 * r["final-accuracy"] for r in rs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        speed = statistics.mean(r["mean-speedup"] or 1.0 for r in rs)
        max_eps = max(r["max-epsilon"] for r in rs)
        shown = f"DP, epsilon {eps:g} ({accountant})" if dp else "no DP"
        shown_ratio = "-" if policy == "none" else f"{ratio:g}"
        lines.append(
            f"| {shown} | {policy} | {shown_ratio} | {statistics.mean(accs):.2f} ± {std:.2f}"
            f" | {max_eps:.3f} | {speed:.2f} |"
        )
    return lines


def _federated_iid(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    most = max((r["num-supernodes"] for r in results), default=0)
    return [r for r in results if r["partitioning"] == "iid" and r["num-supernodes"] == most]


def target_table(results: list[dict[str, Any]], epsilons: Sequence[float]) -> list[str]:
    """Accuracy at each target epsilon in each data setting (DPQuant, ratio 0.5)."""
    lines = [
        "| data | clients | target epsilon | accuracy % (mean ± std) | seeds | max epsilon |",
        "|---|---|---|---|---|---|",
    ]
    for eps in epsilons:
        groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for r in results:
            if (
                r["dp"] and r["target-epsilon"] == eps and r["quant-policy"] == "dpquant"
                and r["quant-train-ratio"] == 0.5
            ):
                groups.setdefault((r["partitioning"], r["num-supernodes"]), []).append(r)
        for (partitioning, clients), rs in sorted(groups.items()):
            by_seed = {r["seed"]: r for r in rs}  # the accountant comparison repeats seeds
            accs = [100 * r["final-accuracy"] for r in by_seed.values()]
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            data = "central (all 50,000)" if clients == 1 else partitioning
            lines.append(
                f"| {data} | {clients} | {eps:g} | {statistics.mean(accs):.2f} ± {std:.2f}"
                f" | {len(accs)} | {max(r['max-epsilon'] for r in rs):.3f} |"
            )
    return lines


def accountant_table(results: list[dict[str, Any]], epsilons: Sequence[float]) -> list[str]:
    """Accuracy of RDP- and PRV-calibrated runs at the same targets and seeds."""
    lines = [
        "| target epsilon | accountant | accuracy % (mean ± std) | max epsilon reported |",
        "|---|---|---|---|",
    ]
    for eps, accountant in itertools.product(epsilons, ACCOUNTANTS):
        rs = [
            r for r in _federated_iid(results)
            if r["dp"] and r["target-epsilon"] == eps and r["accountant"] == accountant
            and r["quant-policy"] == "dpquant" and r["quant-train-ratio"] == 0.5
        ]
        if not rs:
            continue
        accs = [100 * r["final-accuracy"] for r in rs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(
            f"| {eps:g} | {accountant} | {statistics.mean(accs):.2f} ± {std:.2f}"
            f" | {max(r['max-epsilon'] for r in rs):.3f} |"
        )
    return lines


def calibrated_noise(epsilons: Sequence[float]) -> list[str]:
    """σ that RDP and PRV calibrate for the default plan and for 20 local epochs a round.

    The plans of the default run config (10 IID clients of 5,000 examples, 5 rounds,
    DPQuant's estimator queries included), computed the way each client does.
    """
    from clients.client_app import dp_settings, quant_settings
    from fedquant.accounting import Accountant
    from fedquant.config import RunConfig
    from fedquant.private import calibrate_client_noise, round_plan

    plans = {
        "default (20 steps/round)": RunConfig(),
        "20 local epochs/round": RunConfig(local_epochs=20, local_steps=0),
    }
    lines = [
        "| plan | DP-SGD steps | target epsilon | sigma RDP | sigma PRV | PRV / RDP |",
        "|---|---|---|---|---|---|",
    ]
    for label, base in plans.items():
        plan = round_plan(
            5000, batch_size=base.batch_size, epochs=base.local_epochs, max_steps=base.local_steps
        )
        for eps in epsilons:
            sigma = {}
            for accountant in Accountant:
                cfg = dataclasses.replace(base, target_epsilon=eps, accountant=accountant)
                dp = dp_settings(cfg)
                assert dp is not None
                sigma[accountant] = calibrate_client_noise(
                    plan, rounds=cfg.num_server_rounds, dp=dp, quant=quant_settings(cfg)
                )
            rdp, prv = sigma[Accountant.RDP], sigma[Accountant.PRV]
            lines.append(
                f"| {label} | {plan.steps * base.num_server_rounds} | {eps:g} | {rdp:.4f}"
                f" | {prv:.4f} | {prv / rdp:.3f} |"
            )
    return lines


def dp_sgd_throughput(*, model_name: str, batch_size: int, steps: int, seed: int = 0) -> list[str]:
    """DP-SGD samples/s (Opacus hooks, 1 thread) with no layer vs all layers fake-quantized."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from fedquant.data import load_mnist
    from fedquant.fakequant import QuantFormat, quantizable_layers, set_quantized
    from fedquant.models import ModelName, build_model
    from fedquant.private import private_engine

    torch.set_num_threads(1)
    train = load_mnist().train
    n = batch_size * steps

    def measure(fmt: QuantFormat | None) -> float:
        model = build_model(ModelName(model_name), seed=seed)
        set_quantized(model, range(len(quantizable_layers(model))) if fmt else [], fmt)
        examples = TensorDataset(train.images[:n], train.labels[:n])
        loader = DataLoader(examples, batch_size=batch_size)
        engine = private_engine(torch.Generator().manual_seed(seed))
        module, optimizer, loader = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )
        loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
        seen, start = 0, time.perf_counter()
        for images, labels in loader:
            optimizer.zero_grad(set_to_none=True)
            (loss_fn(module(images), labels) / max(len(labels), 1)).backward()
            optimizer.step()
            seen += len(labels)
        return seen / (time.perf_counter() - start)

    formats: list[QuantFormat | None] = [None, QuantFormat.INT8, QuantFormat.INT4, QuantFormat.FP4]
    # Interleave repeats so machine noise hits every variant alike; report the median.
    rates: dict[str, list[float]] = {str(f and f.value): [] for f in formats}
    for _ in range(3):
        for fmt in formats:
            rates[str(fmt and fmt.value)].append(measure(fmt))
    base = statistics.median(rates["None"])
    lines = [
        f"DP-SGD throughput, {model_name}, batch {batch_size}, {steps} Poisson batches, 1 thread"
        " (median of 3 interleaved runs):",
        "| layers fake-quantized | samples/s | vs full precision |",
        "|---|---|---|",
    ]
    for key, values in rates.items():
        label = "none (full precision)" if key == "None" else f"all, {key}"
        rate = statistics.median(values)
        lines.append(f"| {label} | {rate:.0f} | {rate / base:.2f} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = sweep_parser(
        "python -m sims.bench_private", __doc__, rounds=3, local_steps=10,
        out="outputs/bench-private",
    )
    parser.add_argument("--epsilons", nargs="*", type=float, default=[8.0, 4.0])
    parser.add_argument("--accountant", choices=ACCOUNTANTS, default="prv",
                        help="accountant of the policy grid (default prv)")
    parser.add_argument("--accountant-epsilons", nargs="*", type=float, default=[2.0, 8.0],
                        help="targets at which RDP and PRV runs are compared")
    parser.add_argument("--targets", nargs="*", choices=list(SETTINGS), default=[],
                        help="data settings whose accuracy at --target-epsilons is tabulated "
                        "(central: one client with all 50,000 examples)")
    parser.add_argument("--target-epsilons", nargs="+", type=float, default=[2.0, 8.0])
    parser.add_argument("--noise-epsilons", nargs="+", type=float, default=[1.0, 2.0, 4.0, 8.0],
                        help="targets at which the calibrated noise multipliers are printed")
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.5, 0.9])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--format", default="fp4")
    args = parser.parse_args(argv)

    report: list[str] = []
    results: list[dict[str, Any]] = []
    if args.collect:
        results = collect(args.out, CELL_KEYS)
        report += [f"{len(results)} finished runs collected from {args.out}:"]
    elif not args.skip_accuracy:
        results = run_sweep(cells(args), jobs=args.jobs, out=args.out)
        report.append(
            f"Final test accuracy after {args.rounds} rounds, {args.clients} clients,"
            f" {args.local_steps} local steps of batch {args.batch_size}, model {args.model},"
            f" training format {args.format}, seeds {args.seeds}:"
        )
    if results:
        report += ["", *table(results, accountant=args.accountant)]
        report += [
            "", "Accountants at the same seeds (DPQuant, ratio 0.5):",
            *accountant_table(results, args.accountant_epsilons),
        ]
        if args.targets:
            report += [
                "", f"Accuracy by data setting ({args.accountant}, DPQuant ratio 0.5,"
                " 4-bit uploads):",
                *target_table(results, args.target_epsilons),
            ]
    report += [
        "", "Noise multiplier calibrated by each accountant (the default run config: delta "
        "1e-5, 5 rounds, 5,000 examples, batch 256, DPQuant's estimator queries included):",
        *calibrated_noise(args.noise_epsilons),
    ]
    report += ["", *dp_sgd_throughput(model_name=args.model, batch_size=args.batch_size, steps=40)]
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
