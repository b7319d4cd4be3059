"""Benchmark: DP-SGD x DPQuant policies (paper A), and DP-SGD throughput with fake quantization.

    python -m sims.bench_private              # the full grid (see --help)

Rows: {no DP, DP at each target epsilon} x {no training quantization, static, random,
dpquant} at each quantization ratio; final test accuracy as mean ± std over seeds, and
the theoretical training speedup (paper A's formula from per-layer FLOPs and the layers
that actually ran quantized, estimator cost included). Every cell runs the real
ServerApp loop, strategy and ClientApp through ``sims.inprocess.InProcessGrid``, with
the same clients, rounds and seeds. Then DP-SGD samples per second (Opacus, hooks)
with and without fake quantization, measured in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sims.bench import collect, run_sweep, sweep_parser, write_report

POLICIES = ("static", "random", "dpquant")
CELL_KEYS = ("dp", "target-epsilon", "quant-policy", "quant-train-ratio", "seed")


def cells(args: argparse.Namespace) -> list[dict[str, Any]]:
    privacy: list[float | None] = [None, *args.epsilons]
    rows: list[tuple[float | None, str, float]] = []
    for eps in privacy:
        rows.append((eps, "none", 0.0))
        rows += [(eps, policy, ratio) for policy, ratio in itertools.product(POLICIES, args.ratios)]
    out = []
    for (eps, policy, ratio), seed in itertools.product(rows, args.seeds):
        name = f"{'nodp' if eps is None else f'eps{eps:g}'}-{policy}-r{ratio:g}-s{seed}"
        out.append(
            {
                "dp": eps is not None,
                "target-epsilon": eps if eps is not None else 8.0,
                "quant-policy": policy,
                "quant-train-ratio": ratio,
                "quant-format": args.format,
                "model": args.model,
                "seed": seed,
                "num-server-rounds": args.rounds,
                "num-supernodes": args.clients,
                "local-steps": args.local_steps,
                "batch-size": args.batch_size,
                "eval-every": args.rounds,
                "out-dir": str(Path(args.out) / "runs" / name),
            }
        )
    return out


def _row_key(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["dp"], r["target-epsilon"] if r["dp"] else None, r["quant-policy"], r["quant-train-ratio"])


def table(results: list[dict[str, Any]]) -> list[str]:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(_row_key(r), []).append(r)
    lines = [
        "| privacy | policy | ratio | accuracy % (mean ± std) | max epsilon | theoretical speedup |",
        "|---|---|---|---|---|---|",
    ]
    for (dp, eps, policy, ratio), rs in groups.items():
        accs = [100 * r["final-accuracy"] for r in rs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        speed = statistics.mean(r["mean-speedup"] or 1.0 for r in rs)
        max_eps = max(r["max-epsilon"] for r in rs)
        privacy = f"DP, epsilon {eps:g}" if dp else "no DP"
        shown_ratio = "-" if policy == "none" else f"{ratio:g}"
        lines.append(
            f"| {privacy} | {policy} | {shown_ratio} | {statistics.mean(accs):.2f} ± {std:.2f}"
            f" | {max_eps:.3f} | {speed:.2f} |"
        )
    return lines


def dp_sgd_throughput(*, model_name: str, batch_size: int, steps: int, seed: int = 0) -> list[str]:
    """DP-SGD samples/s (Opacus hooks, 1 thread) with no layer vs all layers fake-quantized."""
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from fedquant.data import load_mnist
    from fedquant.fakequant import QuantFormat, quantizable_layers, set_quantized
    from fedquant.models import ModelName, build_model

    torch.set_num_threads(1)
    train = load_mnist().train
    n = batch_size * steps

    def measure(fmt: QuantFormat | None) -> float:
        model = build_model(ModelName(model_name), seed=seed)
        set_quantized(model, range(len(quantizable_layers(model))) if fmt else [], fmt)
        loader = DataLoader(TensorDataset(train.images[:n], train.labels[:n]), batch_size=batch_size)
        engine = PrivacyEngine(accountant="rdp")
        module, optimizer, loader = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            noise_generator=torch.Generator().manual_seed(seed),
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
        "python -m sims.bench_private", __doc__, rounds=3, local_steps=10, out="outputs/bench-private"
    )
    parser.add_argument("--epsilons", nargs="+", type=float, default=[8.0, 4.0])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.9])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--format", default="fp4")
    args = parser.parse_args(argv)

    report: list[str] = []
    if args.collect:
        results = collect(args.out, CELL_KEYS)
        report += [f"{len(results)} finished runs collected from {args.out}:", "", *table(results)]
    elif not args.skip_accuracy:
        results = run_sweep(cells(args), jobs=args.jobs, out=args.out)
        report.append(
            f"Final test accuracy after {args.rounds} rounds, {args.clients} clients,"
            f" {args.local_steps} local steps of batch {args.batch_size}, model {args.model},"
            f" training format {args.format}, seeds {args.seeds}:"
        )
        report += ["", *table(results)]
    report += ["", *dp_sgd_throughput(model_name=args.model, batch_size=args.batch_size, steps=40)]
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
