"""Benchmark: private accuracy targets, DPQuant's findings and DP-SGD throughput.

Private accuracy against the published DP-SGD results, DPQuant's two findings (paper A)
centrally and federated, and DP-SGD throughput with fake quantization:

    python -m sims.bench.private              # the default sweep (~85 min on 2 cores)
    python -m sims.bench.private --quick      # a smoke run of every section (~5 min)

Sections of the report (``bench.md`` in ``--out``, beside ``dpquant-pareto.png``):

1. Targets: final test accuracy at each ``--target-epsilons`` with the run config's
   defaults except the run length the benchmark chooses per ε (``--target-rounds``, else
   ``--rounds``, of ``--local-steps``): 10 IID clients (``--seeds``), Dirichlet(0.5) and
   the central reference, one client holding all 50,000 examples through the same code
   path, processing as many examples as the federation in batches of
   ``--central-batch-size``
   (``--other-seeds`` and ``--other-epsilons``).
2. Findings at ε = ``--findings-epsilon`` and without DP, ``--findings-seeds``, on each
   model and data setting of ``--findings`` (``model:central`` is one client with all
   50,000 examples, ``model:federated`` 10 IID clients) at the model's ratio
   (``FINDING_RATIOS``): the
   accuracy each policy loses against unquantized training under DP and under SGD
   (finding 1), the policies' order under DP (finding 2), the theoretical speedup of
   each row and the share of ε spent on DPQuant's estimator; the last rounds' gain of
   the unquantized DP model shows how near its plateau the runs end.
3. The noise multiplier RDP and PRV calibrate for the same plans, and (with
   ``--accountant-epsilons``) the accuracy each gives at the same seeds.
4. DP-SGD samples per second (Opacus hooks) with and without fake quantization, for
   each model, measured in the same run (interleaved, median of 3).

Every accuracy cell runs the real ServerApp loop, strategy and ClientApp through
``sims.launch.inprocess.InProcessGrid`` with ``dp-noise-seeded = true``, so a cell reruns bit
for bit and cells with the same seed share their noise stream (a benchmark, not a
private deployment). Finished cells under ``--out`` are reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sims.bench.sweep import (
    CELL_CPU_SECONDS,
    CELL_SECONDS,
    collect,
    run_sweep,
    sweep_parser,
    write_report,
)

POLICIES = ("none", "static", "random", "dpquant")
ACCOUNTANTS = ("rdp", "prv")
# Where the clients' data comes from: (partitioning, clients); one client holding all
# 50,000 training examples is central DP-SGD through the same code path.
SETTINGS = {
    "iid": ("iid", None),  # None: --clients
    "dirichlet": ("dirichlet", None),
    "central": ("iid", 1),
}
# DPQuant ratio per model: the CNN's 4 layers give k = 4 (all) at 0.9, so static and
# random would coincide; at 0.5 (k = 2) they differ. The ResNet has 10 layers (k = 9).
FINDING_RATIOS = {"cnn": 0.5, "resnet": 0.9}
# Findings run length per model (4 rounds): expected batch, local steps per round of
# the central client, of each of the 10 federated clients. Central and federated
# process the same examples. The CNN's 51,200 end near the DP plateau (its accuracy
# changes by less than a point over the last two rounds); the ResNet costs ~6x more
# per example, so it gets 20,480 to fit the sweep (see the README).
FINDINGS_PLAN = {"cnn": (256, 50, 5), "resnet": (128, 40, 4)}
# Softmax temperatures the estimator diagnostic compares (see estimator_diagnostic).
DIAGNOSTIC_BETAS = (5.0, 20.0, 50.0, 100.0, 200.0, 500.0)
FINDING_CHOICES = [
    f"{model}:{setting}" for model in FINDING_RATIOS for setting in ("central", "federated")
]
# Without DP, finding 1 needs the unquantized model and one policy at the same ratio.
NON_PRIVATE_POLICIES = ("none", "random")
CELL_KEYS = (
    "dp",
    "target-epsilon",
    "accountant",
    "quant-policy",
    "quant-train-ratio",
    "partitioning",
    "num-supernodes",
    "model",
    "batch-size",
    "num-server-rounds",
    "local-steps",
    "seed",
    "dpquant-beta",
)
# The run-config keys of a cell, as results carry them beside the run's summary.
_OVERRIDE_KEYS = (*CELL_KEYS, "quant-format", "dp-noise-seeded", "eval-every", "out-dir")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of the sweep; ``overrides`` are its run-config keys."""

    section: str
    overrides: dict[str, Any]

    @property
    def name(self) -> str:
        """The cell's output folder name, which says what it runs."""
        return Path(self.overrides["out-dir"]).name


def _cell(
    args: argparse.Namespace,
    *,
    setting: str,
    eps: float | None,
    policy: str,
    ratio: float,
    seed: int,
    model: str,
    rounds: int,
    local_steps: int,
    batch_size: int,
    accountant: str | None = None,
    curve: bool = False,
    beta: float | None = None,
) -> dict[str, Any]:
    partitioning, clients = SETTINGS[setting]
    accountant = accountant or args.accountant
    privacy = "nodp" if eps is None else f"eps{eps:g}-{accountant}"
    shown_ratio = "" if policy == "none" else f"-r{ratio:g}"
    if beta is not None:
        shown_ratio += f"-beta{beta:g}"
    name = (
        f"{model}-{setting}-{privacy}-{policy}{shown_ratio}-b{batch_size}-{rounds}x{local_steps}"
        f"-s{seed}"
    )
    return {
        "dp": eps is not None,
        "target-epsilon": eps if eps is not None else 8.0,
        "accountant": accountant,
        "dp-noise-seeded": True,
        "quant-policy": policy,
        "quant-train-ratio": ratio,
        "quant-format": args.format,
        "model": model,
        "seed": seed,
        "partitioning": partitioning,
        "num-server-rounds": rounds,
        "num-supernodes": clients or args.clients,
        "local-steps": local_steps,
        "batch-size": batch_size,
        # Findings keep the accuracy curve: it shows how near its plateau a run ends.
        "eval-every": 1 if curve else rounds,
        "out-dir": str(Path(args.out) / "runs" / name),
        **({"dpquant-beta": beta} if beta is not None else {}),
    }


def target_rounds(args: argparse.Namespace, eps: float) -> int:
    """Rounds of the federated targets at ``eps``: ``--target-rounds`` or ``--rounds``."""
    for pair in args.target_rounds:
        at, rounds = pair.split("=")
        if float(at) == eps:
            return int(rounds)
    return int(args.rounds)


def _findings(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(model, setting) of each --findings pair; "federated" is the iid setting."""
    pairs = [choice.split(":") for choice in args.findings]
    return [(model, "central" if where == "central" else "iid") for model, where in pairs]


def cells(args: argparse.Namespace) -> list[Cell]:
    """Targets, findings and the accountant comparison, without duplicates."""
    out: dict[str, Cell] = {}

    def add(section: str, **kw: Any) -> None:
        overrides = _cell(args, **kw)
        out.setdefault(overrides["out-dir"], Cell(section, overrides))

    for setting in args.targets:
        central = setting == "central"
        iid = setting == "iid"
        epsilons = args.target_epsilons if iid else args.other_epsilons
        seeds = args.seeds if iid else args.other_seeds
        for eps, seed in itertools.product(epsilons, seeds):
            rounds, batch = target_rounds(args, eps), args.batch_size
            if central:  # as many examples as the federation, in larger batches
                batch = args.central_batch_size
                rounds = rounds * args.clients * args.batch_size // batch
            add(
                "targets",
                setting=setting,
                eps=eps,
                policy="dpquant",
                ratio=0.5,
                seed=seed,
                model="cnn",
                rounds=rounds,
                local_steps=args.local_steps,
                batch_size=batch,
            )
    for model, setting in _findings(args):
        ratio = FINDING_RATIOS[model]
        batch, central_steps, local_steps = FINDINGS_PLAN[model]
        batch = args.findings_batch_size or batch
        if setting == "central":
            steps = args.findings_central_steps or central_steps
        else:
            steps = args.findings_local_steps or local_steps
        rows: list[tuple[float | None, str, float | None]] = [
            (args.findings_epsilon, p, None) for p in POLICIES
        ]
        rows += [(args.findings_epsilon, "dpquant", beta) for beta in args.findings_betas]
        rows += [(None, p, None) for p in NON_PRIVATE_POLICIES]
        for (eps, policy, beta), seed in itertools.product(rows, args.findings_seeds):
            add(
                "findings",
                setting=setting,
                eps=eps,
                policy=policy,
                ratio=ratio,
                seed=seed,
                model=model,
                rounds=args.findings_rounds,
                local_steps=steps,
                batch_size=batch,
                curve=True,
                beta=beta,
            )
    for eps, accountant, seed in itertools.product(
        args.accountant_epsilons, ACCOUNTANTS, args.seeds
    ):
        add(
            "accountants",
            setting="iid",
            eps=eps,
            policy="dpquant",
            ratio=0.5,
            seed=seed,
            model="cnn",
            rounds=args.rounds,
            local_steps=args.local_steps,
            batch_size=args.batch_size,
            accountant=accountant,
        )
    return list(out.values())


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _accuracy(rs: Iterable[dict[str, Any]]) -> list[float]:
    return [100 * r["final-accuracy"] for r in rs]


def target_table(results: list[dict[str, Any]], epsilons: Sequence[float]) -> list[str]:
    """Accuracy at each target epsilon in each data setting (DPQuant, ratio 0.5)."""
    lines = [
        "| data | clients | DP-SGD steps per client | target epsilon | accuracy % (mean ± std)"
        " | seeds | max epsilon |",
        "|---|---|---|---|---|---|---|",
    ]
    for eps in epsilons:
        groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for r in results:
            if r["dp"] and r["target-epsilon"] == eps:
                groups.setdefault((r["partitioning"], r["num-supernodes"]), []).append(r)
        for (partitioning, clients), rs in sorted(groups.items(), key=lambda kv: -kv[0][1]):
            mean, std = _mean_std(_accuracy(rs))
            data = "central (all 50,000)" if clients == 1 else partitioning
            steps = rs[0]["num-server-rounds"] * rs[0]["local-steps"]
            lines.append(
                f"| {data} | {clients} | {steps} | {eps:g} | {mean:.2f} ± {std:.2f}"
                f" | {len(rs)} | {max(r['max-epsilon'] for r in rs):.3f} |"
            )
    return lines


def accountant_table(results: list[dict[str, Any]], epsilons: Sequence[float]) -> list[str]:
    """Accuracy of RDP- and PRV-calibrated runs at the same targets and seeds."""
    lines = [
        "| target epsilon | accountant | accuracy % (mean ± std) | max epsilon reported |",
        "|---|---|---|---|",
    ]
    for eps, accountant in itertools.product(epsilons, ACCOUNTANTS):
        rs = [r for r in results if r["target-epsilon"] == eps and r["accountant"] == accountant]
        if rs:
            mean, std = _mean_std(_accuracy(rs))
            lines.append(
                f"| {eps:g} | {accountant} | {mean:.2f} ± {std:.2f}"
                f" | {max(r['max-epsilon'] for r in rs):.3f} |"
            )
    return lines


def estimator_share(overrides: dict[str, Any]) -> float:
    """Share of the run's ε spent on DPQuant's estimator: 1 - ε(training alone)/ε(all).

    Both at the σ the client calibrates for the whole plan (what each client does).
    """
    from fedquant.accounting import MechanismStep, PrivacyLedger
    from fedquant.config import RunConfig
    from fedquant.data import SPLIT_SIZES
    from fedquant.training import calibrate_client_noise, client_round_plan, planned_mechanisms

    cfg = RunConfig.from_flower(overrides)
    dp, quant = cfg.dp, cfg.dpquant
    if not dp.enabled:
        return 0.0
    plan = client_round_plan(cfg.train, dict(SPLIT_SIZES)["train"] // cfg.run.num_supernodes)
    rounds = cfg.run.num_server_rounds
    sigma = calibrate_client_noise(plan, rounds=rounds, dp=dp, quant=quant)
    everything = planned_mechanisms(plan, rounds=rounds, noise=sigma, quant=quant)
    training = [MechanismStep(sigma, plan.sample_rate, plan.steps * rounds)]

    def eps(history: list[MechanismStep]) -> float:
        return PrivacyLedger(history).epsilon(delta=dp.target_delta, accountant=dp.accountant)

    return 1.0 - eps(training) / eps(everything)


def _curve(run: dict[str, Any]) -> list[float]:
    """Test accuracy after each round (results.json of the run)."""
    data = json.loads((Path(run["out-dir"]) / "results.json").read_text())
    return [100 * row["accuracy"] for row in data["rounds"] if row.get("accuracy") is not None]


def _late_gain(rs: Sequence[dict[str, Any]]) -> float:
    """Mean accuracy gained over the second half of the rounds: ~0 near a plateau."""
    gains = []
    for r in rs:
        curve = _curve(r)
        if len(curve) >= 2:
            gains.append(curve[-1] - curve[(len(curve) - 1) // 2])
    return statistics.mean(gains) if gains else float("nan")


@dataclasses.dataclass(frozen=True)
class PolicyRow:
    """One (privacy, policy) row of a findings table: final accuracy (%) per seed."""

    dp: bool
    policy: str
    accuracy: tuple[float, ...]
    speedup: float
    estimator_share: float
    seeds: tuple[int, ...] = ()  # aligned with accuracy; default 0, 1, ...

    def by_seed(self) -> dict[int, float]:
        """Accuracy by seed."""
        return dict(zip(self.seeds or range(len(self.accuracy)), self.accuracy, strict=True))


def _policy_label(r: dict[str, Any]) -> str:
    """The policy, and DPQuant's β where it is not the default."""
    from fedquant.config import DPQuantSettings

    default = DPQuantSettings().beta
    beta = r.get("dpquant-beta", default)
    if r["quant-policy"] == "dpquant" and beta != default:
        return f"dpquant β={beta:g}"
    return str(r["quant-policy"])


def finding_rows(rs: Sequence[dict[str, Any]]) -> list[PolicyRow]:
    """The findings cells of one (model, setting), grouped by (dp, policy, β)."""
    groups: dict[tuple[bool, str], list[dict[str, Any]]] = {}
    for r in rs:
        groups.setdefault((r["dp"], _policy_label(r)), []).append(r)
    rows = []
    for (dp, policy), group in sorted(
        groups.items(), key=lambda kv: (not kv[0][0], POLICIES.index(kv[0][1].split()[0]), kv[0][1])
    ):
        cell = {k: v for k, v in group[0].items() if k in _OVERRIDE_KEYS}
        # PRV's ε carries a numerical error of ~0.01: a share below it shows as 0.
        dpquant = policy.startswith("dpquant")
        share = max(0.0, estimator_share(cell)) if dp and dpquant else 0.0
        group = sorted(group, key=lambda r: r["seed"])
        rows.append(
            PolicyRow(
                dp,
                policy,
                tuple(_accuracy(group)),
                statistics.mean(r["mean-speedup"] or 1.0 for r in group),
                share,
                tuple(r["seed"] for r in group),
            )
        )
    return rows


def findings_table(rows: Sequence[PolicyRow], late_gain: float) -> list[str]:
    """The findings table, one row per (privacy, policy).

    Accuracy, loss against unquantized training of the same privacy, speedup, and the
    estimator's share of ε.
    """
    base = {row.dp: statistics.mean(row.accuracy) for row in rows if row.policy == "none"}
    lines = [
        "| privacy | policy | accuracy % (mean ± std) | vs unquantized (points) | seeds"
        " | theoretical speedup | estimator share of epsilon |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        mean, std = _mean_std(row.accuracy)
        loss = f"{mean - base[row.dp]:+.2f}" if row.policy != "none" and row.dp in base else "-"
        share = f"{100 * row.estimator_share:.2f}%" if row.estimator_share else "-"
        lines.append(
            f"| {'DP' if row.dp else 'no DP'} | {row.policy} | {mean:.2f} ± {std:.2f} | {loss}"
            f" | {len(row.accuracy)} | {row.speedup:.2f} | {share} |"
        )
    lines.append(
        f"\nUnquantized DP model: {late_gain:+.2f} points gained over the second half of"
        " the rounds (mean over seeds; near 0 at a plateau)."
    )
    return lines


def _paired(combine: Callable[..., float], *rows: PolicyRow) -> tuple[float, float, int]:
    """Mean and standard error over seeds of ``combine(acc_1, ..., acc_m)`` per seed.

    Cells with the same seed share the initial model, the data order and (with seeded
    noise) the DP noise, so differences between policies are taken seed by seed: the
    common part of the run-to-run variation cancels (common random numbers).
    """
    maps = [row.by_seed() for row in rows]
    seeds = sorted(set.intersection(*(set(m) for m in maps)))
    values = [combine(*(m[seed] for m in maps)) for seed in seeds]
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return statistics.mean(values), se, len(values)


def verdicts(rows: Sequence[PolicyRow]) -> list[str]:
    """Paper A's findings, each as a paired difference (seed by seed) and its standard error.

    Finding 1: quantized training costs more accuracy under DP-SGD than under SGD
    (policy ``random``, the one both privacy settings ran): per seed,
    (DP none - DP random) - (SGD none - SGD random). Finding 2: under DP,
    dpquant >= random >= static. "holds" when the mean difference has the claimed sign,
    "significant" when it also exceeds two standard errors.
    """
    by = {(row.dp, row.policy): row for row in rows}
    out = []

    def verdict(diff: float, se: float) -> str:
        if diff < 0:
            return "does not hold"
        return "holds, significant (> 2 SE)" if diff > 2 * se else "holds, within 2 SE"

    four = [(True, "none"), (True, "random"), (False, "none"), (False, "random")]
    if all(k in by for k in four):
        dp_cost, _, _ = _paired(lambda a, b: a - b, by[True, "none"], by[True, "random"])
        sgd_cost, _, _ = _paired(lambda a, b: a - b, by[False, "none"], by[False, "random"])
        diff, se, n = _paired(lambda a, b, c, d: (a - b) - (c - d), *(by[k] for k in four))
        out.append(
            f"- finding 1 (quantization costs more under DP): random costs {dp_cost:.2f} points"
            f" under DP-SGD, {sgd_cost:.2f} under SGD: difference {diff:+.2f} ± {se:.2f}"
            f" (SE, {n} paired seeds): {verdict(diff, se)}"
        )
    tuned = sorted(label for dp, label in by if dp and label.startswith("dpquant β"))
    for better, worse in (
        ("dpquant", "random"),
        *((t, "random") for t in tuned),
        ("random", "static"),
    ):
        if (True, better) in by and (True, worse) in by:
            diff, se, n = _paired(lambda a, b: a - b, by[True, better], by[True, worse])
            out.append(
                f"- finding 2 under DP, {better} >= {worse}: {diff:+.2f} ± {se:.2f} points"
                f" (SE, {n} paired seeds): {verdict(diff, se)}"
            )
    return out


def estimator_diagnostic(
    run: dict[str, Any], *, examples: int = 2000, draws: int = 4000
) -> list[str]:
    """Signal against noise of DPQuant's estimator, on the final model of a findings run.

    On ``examples`` training examples (no privacy: this is the benchmark looking), the
    per-layer loss increase r_i(x) = loss_i(x) - loss_fp(x), clipped to C_a as the
    estimator does, gives the exact sensitivity R_i = mean r_i(x). One estimate R̂ (a
    Poisson subsample at q_a of the client's |D| examples, plus N(0, σ_a² C_a²)) has
    sampling std sd(r_i) / sqrt(q_a |D|) and DP noise std σ_a C_a / (q_a |D|); the EMA
    (weight α) keeps α / (2 - α) of that variance at stationarity. Then the expected
    loss increase Σ_{i∈S} R_i of the k quantized layers S: for π = softmax(-β R)
    (exact), for π from a noisy EMA (Monte Carlo, ``draws``), uniform (random and, in
    expectation over seeds, static) and the k least sensitive layers (the best subset).
    """
    import numpy as np
    import torch

    from fedquant.config import RunConfig
    from fedquant.data import SPLIT_SIZES, load_mnist
    from fedquant.dpquant import num_quantized, sample_layers, selection_probabilities
    from fedquant.fakequant import quantizable_layers, set_quantized
    from fedquant.models import build_model
    from fedquant.training import quantized_layer_losses
    from sims.app.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(run["out-dir"])
    if checkpoint is None:
        return [f"(no checkpoint in {run['out-dir']})"]
    # DPQuant's settings at this run's ratio, whatever policy the run itself used.
    overrides = {k: run[k] for k in _OVERRIDE_KEYS if k in run}
    cfg = RunConfig.from_flower({**overrides, "quant-policy": "dpquant"})
    quant = cfg.dpquant
    model = build_model(cfg.train.model, seed=0)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in checkpoint.arrays.items()})
    model.eval()
    train = load_mnist().train
    x, y = train.images[:examples], train.labels[:examples]
    n = len(quantizable_layers(model))
    losses = quantized_layer_losses(model, quant.format)  # the estimator's own loss function
    base = losses(None, x, y).double()
    r = [losses(i, x, y).double() - base for i in range(n)]
    set_quantized(model, [], None)
    per_example = torch.stack(r, dim=1)  # (examples, n)
    norm = torch.linalg.vector_norm(per_example, dim=1, keepdim=True)
    per_example = per_example * torch.clamp(quant.clip / norm.clamp_min(1e-300), max=1.0)
    exact = per_example.mean(dim=0).numpy()
    local = dict(SPLIT_SIZES)["train"] // cfg.run.num_supernodes
    subsample = quant.sample_rate * local
    sampling_sd = per_example.std(dim=0).numpy() / np.sqrt(subsample)
    noise_sd = quant.noise * quant.clip / subsample
    ema = quant.alpha / (2 - quant.alpha)
    total_sd = np.sqrt((sampling_sd**2 + noise_sd**2) * ema)
    k = num_quantized(n, quant.train_ratio)
    rng = np.random.default_rng(0)

    def cost(pi: np.ndarray) -> float:
        return float(np.mean([exact[sample_layers(pi, k, rng)].sum() for _ in range(200)]))

    def noisy(beta: float) -> float:
        return float(
            np.mean(
                [
                    exact[
                        sample_layers(
                            selection_probabilities(exact + rng.normal(0.0, total_sd), beta=beta),
                            k,
                            rng,
                        )
                    ].sum()
                    for _ in range(draws // 10)
                ]
            )
        )

    lines = [
        f"Estimator signal vs noise: {run['model']}, {cfg.run.num_supernodes} client(s) of"
        f" {local:,} examples, final model of the run with seed {run['seed']}; q_a"
        f" {quant.sample_rate:g} ({subsample:.0f} examples), σ_a {quant.noise:g},"
        f" C_a {quant.clip:g}, EMA α {quant.alpha:g}, β {quant.beta:g}, k = {k} of {n}:",
        "| layer | R_i (exact, nats) | sampling sd | DP noise sd | sd after EMA |",
        "|---|---|---|---|---|",
    ]
    names = [name for name, _ in quantizable_layers(model)]
    for i in range(n):
        lines.append(
            f"| {names[i]} | {exact[i]:.4f} | {sampling_sd[i]:.4f} | {noise_sd:.4f}"
            f" | {total_sd[i]:.4f} |"
        )
    best = float(np.sort(exact)[:k].sum())
    uniform = cost(np.full(n, 1.0 / n))
    lines += [
        "",
        f"Expected loss increase of the k = {k} layers quantized together (Σ R_i over the"
        f" subset; best subset {best:.4f}, uniform (random; static in expectation)"
        f" {uniform:.4f}) for DPQuant at each β, with exact R and with the noisy EMA:",
        "| β | exact R | noisy EMA | noisy: share of the best-vs-uniform gap closed |",
        "|---|---|---|---|",
    ]
    for beta in sorted({quant.beta, *DIAGNOSTIC_BETAS}):
        with_noise = noisy(beta)
        closed = (uniform - with_noise) / (uniform - best) if uniform > best else float("nan")
        shown = f"{beta:g}" + (" (run's)" if beta == quant.beta else "")
        lines.append(
            f"| {shown} | {cost(selection_probabilities(exact, beta=beta)):.4f}"
            f" | {with_noise:.4f} | {100 * closed:.0f}% |"
        )
    return lines


def pareto_plot(panels: Mapping[str, Sequence[PolicyRow]], path: Path) -> Path:
    """Accuracy against theoretical speedup per policy (paper A's Pareto view).

    One panel per (model, setting); error bars are one standard deviation over seeds.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(2, len(panels))
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.0 * cols, 3.6 * rows_n + 0.8), squeeze=False)
    markers = {"none": "o", "static": "s", "random": "^", "dpquant": "*"}
    handles: dict[str, Any] = {}
    for ax, (title, rows) in zip(axes.flat, panels.items(), strict=False):  # spare axes
        for row in rows:
            mean, std = _mean_std(row.accuracy)
            label = f"{'DP' if row.dp else 'no DP'} {row.policy}"
            handles[label] = ax.errorbar(
                row.speedup,
                mean,
                yerr=std,
                markersize=9,
                marker=markers.get(row.policy, "P"),  # "P": dpquant at another β
                color="tab:red" if row.dp else "tab:blue",
                capsize=3,
                linestyle="none",
            )
        ax.set_title(title)
        ax.set_xlabel("theoretical training speedup")
        ax.set_ylabel("final test accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="lower center",
        ncol=min(4, len(handles)),
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.1 if rows_n > 1 else 0.16, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def calibrated_noise(epsilons: Sequence[float]) -> list[str]:
    """σ that RDP and PRV calibrate for the default plan and for 20 local epochs a round.

    The plans of the default run config (10 IID clients of 5,000 examples, 5 rounds,
    DPQuant's estimator queries included), computed the way each client does.
    """
    from fedquant.accounting import Accountant
    from fedquant.config import RunConfig
    from fedquant.training import calibrate_client_noise, client_round_plan

    plans = {
        "default (20 steps/round)": RunConfig(),
        "20 local epochs/round": RunConfig.from_flower({"local-epochs": 20, "local-steps": 0}),
    }
    lines = [
        "| plan | DP-SGD steps | target epsilon | sigma RDP | sigma PRV | PRV / RDP |",
        "|---|---|---|---|---|---|",
    ]
    for label, base in plans.items():
        plan = client_round_plan(base.train, 5000)
        for eps in epsilons:
            sigma = {}
            for accountant in Accountant:
                cfg = base.with_overrides({"target-epsilon": eps, "accountant": accountant})
                sigma[accountant] = calibrate_client_noise(
                    plan, rounds=cfg.run.num_server_rounds, dp=cfg.dp, quant=cfg.dpquant
                )
            rdp, prv = sigma[Accountant.RDP], sigma[Accountant.PRV]
            lines.append(
                f"| {label} | {plan.steps * base.run.num_server_rounds} | {eps:g} | {rdp:.4f}"
                f" | {prv:.4f} | {prv / rdp:.3f} |"
            )
    return lines


def dp_sgd_throughput(*, model_name: str, batch_size: int, steps: int, seed: int = 0) -> list[str]:
    """DP-SGD samples/s (Opacus hooks, 1 thread) with no layer vs all layers fake-quantized."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from fedquant.config import ModelName, QuantFormat
    from fedquant.data import load_mnist
    from fedquant.fakequant import quantizable_layers, set_quantized
    from fedquant.models import build_model
    from fedquant.training import backward_quietly, private_engine

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
            backward_quietly(loss_fn(module(images), labels) / max(len(labels), 1))
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


QUICK = {
    "seeds": [0],
    "other_seeds": [0],
    "rounds": 2,
    "local_steps": 2,
    "target_rounds": [],
    "target_epsilons": [8.0],
    "targets": ["iid", "central"],
    "findings_seeds": [0],
    "findings": FINDING_CHOICES,
    "findings_rounds": 2,
    "findings_local_steps": 1,
    "findings_central_steps": 2,
    "findings_batch_size": 64,
    "accountant_epsilons": [],
    "noise_epsilons": [8.0],
    "throughput_steps": 2,
    "out": "outputs/bench-private-quick",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; ``--quick`` replaces the defaults not given explicitly."""
    parser = sweep_parser(
        "python -m sims.bench.private",
        __doc__,
        rounds=10,
        local_steps=20,
        out="outputs/bench-private",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of every section: tiny runs, 1-2 seeds (~5 min)",
    )
    parser.add_argument(
        "--targets",
        nargs="*",
        choices=list(SETTINGS),
        default=["iid", "dirichlet", "central"],
        help="data settings of the accuracy targets (central: one client with all 50,000 examples)",
    )
    parser.add_argument("--target-epsilons", nargs="*", type=float, default=[2.0, 8.0])
    parser.add_argument(
        "--other-seeds",
        nargs="*",
        type=int,
        default=[0],
        help="seeds of the dirichlet and central targets (iid: --seeds)",
    )
    parser.add_argument(
        "--other-epsilons",
        nargs="*",
        type=float,
        default=[8.0],
        help="target epsilons of the dirichlet and central targets (iid: --target-epsilons)",
    )
    parser.add_argument(
        "--target-rounds",
        nargs="*",
        default=["2=5"],
        help="EPS=ROUNDS: the targets' run length at EPS (others: --rounds);"
        " at epsilon 2, 5 rounds beat 10 (measured: README)",
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--central-batch-size",
        type=int,
        default=1024,
        help="expected batch of the central reference (same examples"
        " processed: rounds scale down). With 256, 2,000 steps of step 1.0"
        " let the noise's random walk grow the weights 40x and ended at"
        " 67%% (epsilon 8)",
    )
    parser.add_argument(
        "--findings",
        nargs="*",
        choices=FINDING_CHOICES,
        default=["cnn:central", "cnn:federated"],
        help="model:setting pairs of the findings section; the default fits"
        " 90 minutes on 2 cores with the targets; resnet:central adds ~35"
        " min (30 runs of ~140 CPU-s), resnet:federated as much again",
    )
    parser.add_argument("--findings-epsilon", type=float, default=8.0)
    parser.add_argument("--findings-seeds", nargs="*", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--findings-rounds", type=int, default=4)
    parser.add_argument(
        "--findings-local-steps",
        type=int,
        default=None,
        help="local steps per round of the 10 federated clients (default:"
        " FINDINGS_PLAN, per model)",
    )
    parser.add_argument(
        "--findings-central-steps",
        type=int,
        default=None,
        help="local steps per round of the central client (default:"
        " FINDINGS_PLAN, as many examples as the federation)",
    )
    parser.add_argument(
        "--findings-batch-size",
        type=int,
        default=None,
        help="expected batch of the findings runs (default: FINDINGS_PLAN)",
    )
    parser.add_argument(
        "--findings-betas",
        nargs="*",
        type=float,
        default=[],
        help="DPQuant rows at these softmax temperatures besides the"
        " default β (see the estimator diagnostic)",
    )
    parser.add_argument(
        "--accountant",
        choices=ACCOUNTANTS,
        default="prv",
        help="accountant of the targets and findings (default prv)",
    )
    parser.add_argument(
        "--accountant-epsilons",
        nargs="*",
        type=float,
        default=[],
        help="targets at which RDP and PRV runs are compared at --seeds",
    )
    parser.add_argument(
        "--noise-epsilons",
        nargs="*",
        type=float,
        default=[1.0, 2.0, 4.0, 8.0],
        help="targets at which the calibrated noise multipliers are printed",
    )
    parser.add_argument("--throughput-steps", type=int, default=8)
    parser.add_argument("--format", default="fp4")
    parser.add_argument(
        "--match", default="", help="run (and tabulate) only the cells whose name contains this"
    )
    args = parser.parse_args(argv)
    if args.quick:
        defaults = parse_args([])
        for key, value in QUICK.items():
            if getattr(args, key) == getattr(defaults, key):  # explicit flags win
                setattr(args, key, value)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or collect) the sweep's cells and write ``bench.md``."""
    args = parse_args(argv)
    todo = [c for c in cells(args) if args.match in c.name]
    started = time.perf_counter()
    if args.collect:
        results = collect(args.out, CELL_KEYS)
    elif args.skip_accuracy:
        results = []
    else:
        results = run_sweep([c.overrides for c in todo], jobs=args.jobs, out=args.out)
    by_dir = {Path(r["out-dir"]).name: r for r in results}
    section = {
        name: [by_dir[c.name] for c in todo if c.section == name and c.name in by_dir]
        for name in ("targets", "findings", "accountants")
    }
    report = [
        f"# Private training benchmark ({len(results)} runs, {args.accountant.upper()}"
        f" accountant, training format {args.format}, 4-bit uploads)",
    ]
    if section["targets"]:
        report += [
            "",
            f"## Accuracy targets: {args.local_steps} local steps of expected batch"
            f" {args.batch_size} per round, CNN, DPQuant ratio 0.5; rounds per epsilon"
            f" {', '.join(f'{e:g}: {target_rounds(args, e)}' for e in args.target_epsilons)}"
            f" ({args.clients} clients; central: the same examples in batches of"
            f" {args.central_batch_size})",
            "",
            *target_table(section["targets"], args.target_epsilons),
        ]
    panels: dict[str, list[PolicyRow]] = {}
    for model, setting in _findings(args):
        clients = 1 if setting == "central" else args.clients
        rs = [
            r for r in section["findings"] if r["model"] == model and r["num-supernodes"] == clients
        ]
        if not rs:
            continue
        rows = finding_rows(rs)
        unquantized_dp = [r for r in rs if r["dp"] and r["quant-policy"] == "none"]
        where = "central (1 client, 50,000 examples)" if clients == 1 else f"{clients} IID clients"
        steps = rs[0]["local-steps"]
        report += [
            "",
            f"## DPQuant's findings: {model}, {where}, ratio {FINDING_RATIOS[model]},"
            f" epsilon {args.findings_epsilon:g} and no DP; {args.findings_rounds} rounds x"
            f" {steps} local steps of expected batch {rs[0]['batch-size']}",
            "",
            *findings_table(rows, _late_gain(unquantized_dp)),
            "",
            *verdicts(rows),
        ]
        panels[f"{model}, {'central' if clients == 1 else 'federated'}"] = rows
        first = min(unquantized_dp, key=lambda r: r["seed"], default=None)
        if first is not None:
            report += ["", *estimator_diagnostic(first)]
    if panels:
        plot = pareto_plot(panels, Path(args.out) / "dpquant-pareto.png")
        report += ["", f"Accuracy vs theoretical speedup per policy: {plot}"]
    if section["accountants"]:
        report += [
            "",
            "## Accountants at the same seeds (DPQuant, ratio 0.5)",
            "",
            *accountant_table(section["accountants"], args.accountant_epsilons),
        ]
    report += [
        "",
        "## Noise multiplier calibrated by each accountant (the default run config: delta"
        " 1e-5, 5 rounds, 5,000 examples, batch 256, DPQuant's estimator queries included)",
        "",
        *calibrated_noise(args.noise_epsilons),
    ]
    for model in dict.fromkeys(["cnn", *(m for m, _ in _findings(args))]):
        report += [
            "",
            *dp_sgd_throughput(
                model_name=model,
                batch_size=args.batch_size,
                steps=args.throughput_steps,
            ),
        ]
    wall = [r[CELL_SECONDS] for r in results if CELL_SECONDS in r]
    cpu = [r[CELL_CPU_SECONDS] for r in results if CELL_CPU_SECONDS in r]
    report += [
        "",
        f"Wall time of this invocation: {(time.perf_counter() - started) / 60:.1f} min."
        f" Runs: {len(wall)} timed, {sum(wall) / 60:.1f} process-minutes of wall time"
        f" ({sum(wall) / 60 / args.jobs:.1f} min on {args.jobs} processes); {len(cpu)} with"
        f" CPU time, {sum(cpu) / 60:.1f} CPU-minutes.",
    ]
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
