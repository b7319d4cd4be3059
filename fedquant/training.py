"""One client's local round: DP-SGD (Opacus) with DPQuant's rotating quantized layers.

Paper A (Gao et al., "DPQuant", arXiv 2509.03472): each local epoch only k = round(ratio·n)
of the n quantizable layers run in low precision, sampled without replacement from
softmax(-β L), where L is the EMA of a DP estimate of each layer's loss sensitivity.

Privacy: training steps are Sampled Gaussian Mechanism applications (Poisson rate
q = B/|D|, noise σ, per-sample clip C; Abadi et al. 2016); every sensitivity estimate is
one more SGM application (q_a, σ_a, clip C_a). Both go into the client's one
:class:`~fedquant.accounting.PrivacyLedger`, which the caller persists across rounds,
so ε is cumulative. σ is calibrated once, before the first round, for every round the
run plans (:func:`calibrate_client_noise`) and never re-derived.

Secrecy: the guarantee only holds against the server if it cannot reproduce the
randomness that protects the data. Every draw that does (DP-SGD's noise, its Poisson
batches, the estimator's subsample and noise) comes from the one ``privacy_rng`` the
caller passes in, which a client seeds from OS entropy (``clients.client_app``), and the
noise goes through Opacus' secure-mode sampler (:func:`private_engine`). Nothing else
computed from the examples is returned: the round's statistics are derived from the plan
(expected batch sizes), never from the realised Poisson batches or losses.

A round (:func:`train_round`) takes the run's :class:`~fedquant.config.TrainSettings`,
a :class:`PrivateTraining` (σ, C and the ledger; ``None`` for non-private SGD) and a
:class:`LayerQuantization` (DPQuant's settings and the node's schedule; ``None`` to
train in full precision). The plan and the calibration (:func:`client_round_plan`,
:func:`calibrate_client_noise`, :func:`validate_privacy_plan`) are shared by the client
and the server, which checks before the first round that every client can meet (ε, δ).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# isort: off
import fedquant._opacus  # noqa: F401  (before Opacus: drops its root log handler)

# isort: on
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedquant.accounting import MechanismStep, PrivacyLedger, calibrate_noise, check_target
from fedquant.checks import is_finite
from fedquant.config import (
    ConfigError,
    DPQuantSettings,
    DPSettings,
    QuantFormat,
    QuantPolicy,
    RunConfig,
    TrainSettings,
)
from fedquant.data import Split, partition_indices
from fedquant.dpquant import (
    LayerScheduler,
    estimate_sensitivity,
    estimator_flops,
    layer_flops,
    theoretical_speedup,
)
from fedquant.fakequant import quantizable_layers, set_quantized

__all__ = [
    "LayerQuantization",
    "PrivateTraining",
    "RoundPlan",
    "RoundStats",
    "backward_quietly",
    "calibrate_client_noise",
    "check_client_target",
    "client_round_plan",
    "estimator_calls",
    "estimator_queries",
    "planned_mechanisms",
    "private_engine",
    "quantized_layer_losses",
    "round_plan",
    "train_round",
    "validate_privacy_plan",
]


@dataclass(frozen=True)
class RoundPlan:
    """How much local work one round does (the same every round)."""

    sample_rate: float  # q ≈ B / |D|, exactly as Opacus charges it (see round_plan)
    epochs: int
    steps_per_epoch: int  # Poisson batches per epoch, 1 / q
    max_steps: int  # 0: no cap

    @property
    def steps(self) -> int:
        """DP-SGD steps per round: what the accountant is charged for."""
        full = self.epochs * self.steps_per_epoch
        return min(full, self.max_steps) if self.max_steps else full


def round_plan(num_examples: int, *, batch_size: int, epochs: int, max_steps: int) -> RoundPlan:
    """The local work of one round, with the sampling rate Opacus will charge.

    Opacus derives Poisson sampling from the DataLoader: q0 = 1 / ceil(|D| / B), then
    ``steps = int(1 / q0)`` batches per epoch, and charges the accountant
    q = 1 / steps — which float truncation can make slightly larger than B / |D|
    (1/390 for |D| = 12500, B = 32). Planning with the same q keeps the calibration
    and the budget check exact.
    """
    if num_examples < 1:
        raise ValueError(f"a client needs at least one example, got {num_examples}")
    loader_batches = math.ceil(num_examples / batch_size)
    steps_per_epoch = max(1, int(1 / (1 / loader_batches)))
    return RoundPlan(1 / steps_per_epoch, epochs, steps_per_epoch, max_steps)


def client_round_plan(train: TrainSettings, num_examples: int) -> RoundPlan:
    """:func:`round_plan` of a client holding ``num_examples`` under a run's settings.

    Expected batch ``batch_size``, ``local_epochs`` epochs, at most ``local_steps`` steps:
    what the client trains and what the server checks before the first round.
    """
    return round_plan(
        num_examples,
        batch_size=train.batch_size,
        epochs=train.local_epochs,
        max_steps=train.local_steps,
    )


def estimator_calls(*, epochs_before: int, epochs: int, period: int) -> int:
    """Estimates run at the start of every epoch e with e % P == 0."""
    return sum(1 for e in range(epochs_before, epochs_before + epochs) if e % period == 0)


def epochs_per_round(plan: RoundPlan) -> int:
    """Epochs actually started per round (a step cap may end the round early)."""
    return min(plan.epochs, math.ceil(plan.steps / plan.steps_per_epoch))


def _estimates(quant: DPQuantSettings) -> bool:
    """Whether the run's DPQuant settings run the sensitivity estimator at all."""
    return quant.active and quant.policy is QuantPolicy.DPQUANT


def estimator_queries(
    plan: RoundPlan, *, rounds: int, quant: DPQuantSettings, epochs_before: int = 0
) -> list[MechanismStep]:
    """DPQuant's sensitivity estimates in ``rounds`` rounds, as SGM applications.

    One ``MechanismStep(σ_a, q_a, calls)`` for the epochs e with e % P == 0 (paper A's
    estimate every P epochs); none unless the policy is DPQUANT with k > 0 layers.
    """
    if not _estimates(quant) or not rounds:
        return []
    calls = estimator_calls(
        epochs_before=epochs_before, epochs=epochs_per_round(plan) * rounds, period=quant.period
    )
    return [MechanismStep(quant.noise, quant.sample_rate, calls)] if calls else []


def planned_mechanisms(
    plan: RoundPlan,
    *,
    rounds: int,
    noise: float,
    quant: DPQuantSettings,
    epochs_before: int = 0,
) -> list[MechanismStep]:
    """Every SGM application of ``rounds`` rounds: training steps and estimator queries.

    Training is ``MechanismStep(σ, q, steps · rounds)`` (Abadi et al. 2016); the queries
    are :func:`estimator_queries`.
    """
    training = [MechanismStep(noise, plan.sample_rate, plan.steps * rounds)] if rounds else []
    return training + estimator_queries(
        plan, rounds=rounds, quant=quant, epochs_before=epochs_before
    )


def _client_budget(
    plan: RoundPlan, *, rounds: int, dp: DPSettings, quant: DPQuantSettings
) -> dict[str, Any]:
    if not dp.enabled:
        raise ValueError("`dp` is off: a non-private run has no noise to calibrate")
    return {
        "target_epsilon": dp.target_epsilon,
        "delta": dp.target_delta,
        "sample_rate": plan.sample_rate,
        "steps": plan.steps * rounds,
        "accountant": dp.accountant,
        "extra": estimator_queries(plan, rounds=rounds, quant=quant),
    }


@functools.lru_cache(maxsize=64)
def calibrate_client_noise(
    plan: RoundPlan, *, rounds: int, dp: DPSettings, quant: DPQuantSettings
) -> float:
    """σ such that all planned rounds (and estimator queries) meet (ε, δ).

    The smallest σ with ε([(σ, q, steps · rounds), *queries]) <= ``dp.target_epsilon`` at
    ``dp.target_delta``, by ``dp.accountant`` (:func:`fedquant.accounting.calibrate_noise`).
    Cached: a PRV calibration takes seconds, and the simulated clients sharing a process
    (a Ray worker, the in-process grid) mostly share a plan (equal partition sizes).
    Raises ValueError (from ``calibrate_noise``) when no allowed σ can meet it.
    """
    return calibrate_noise(**_client_budget(plan, rounds=rounds, dp=dp, quant=quant))


def check_client_target(
    plan: RoundPlan, *, rounds: int, dp: DPSettings, quant: DPQuantSettings
) -> None:
    """Raise ValueError if no σ lets this plan meet (ε, δ).

    What :func:`calibrate_client_noise` would raise, at the cost of two ε evaluations
    (:func:`fedquant.accounting.check_target`).
    """
    check_target(**_client_budget(plan, rounds=rounds, dp=dp, quant=quant))


def validate_privacy_plan(cfg: RunConfig) -> None:
    """Fail before any client starts if some client cannot meet the (ε, δ) target.

    Checks, for every simulated partition size, that some noise multiplier meets the
    target over all planned rounds plus DPQuant's estimator queries, with the run's
    accountant (what each client's calibration needs); an impossible target raises
    ConfigError naming target-epsilon. Nothing to check without DP.
    """
    if not cfg.dp.enabled:
        return
    parts = partition_indices(
        num_partitions=cfg.run.num_supernodes,
        partitioning=cfg.train.partitioning,
        alpha=cfg.train.dirichlet_alpha,
        seed=cfg.run.seed,
    )
    for size in sorted({len(p) for p in parts}):
        plan = client_round_plan(cfg.train, size)
        try:
            check_client_target(
                plan, rounds=cfg.run.num_server_rounds, dp=cfg.dp, quant=cfg.dpquant
            )
        except ValueError as err:
            raise ConfigError(
                "target-epsilon",
                cfg.dp.target_epsilon,
                f"cannot be met by a client with {size} examples over "
                f"{cfg.run.num_server_rounds} rounds: {err}",
            ) from err


def private_engine(rng: torch.Generator) -> PrivacyEngine:
    """An Opacus ``PrivacyEngine`` in secure mode, drawing every random bit from ``rng``.

    Opacus' ``secure_mode=True`` does two things: (1) noise robust to floating-point
    attacks (Mironov 2012; Holohan & Braghin, arXiv 2107.10138, §5.1): each coordinate
    is the sum of 2n = 4 Gaussians / 2, after one discarded draw
    (``opacus.optimizers.optimizer._generate_noise``); (2) a CSPRNG from torchcsprng for
    that noise and for the Poisson batch sampler. torchcsprng's last release (0.2.1,
    2021) has wheels for Python <= 3.9 and torch 1.8 only, so (2) cannot be had with
    torch 2.13 and PrivacyEngine(secure_mode=True) raises ImportError. This engine is
    built in non-secure mode (its warning about that is silenced here, where it is not
    true) and then switched to secure mode by hand: the optimizer gets the secure noise
    path (1), and the optimizer and ``DPDataLoader`` take ``rng`` as Opacus'
    ``secure_rng``. The caller seeds ``rng`` with 64 bits of OS entropy; caveat:
    torch's generator is a Mersenne Twister, not a CSPRNG: its state is secret but,
    unlike torchcsprng's, could in principle be inferred from enough raw outputs,
    which never leave the client here (only their sums with clipped gradients do).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    engine.secure_mode = True
    engine.secure_rng = rng
    return engine


@dataclass(frozen=True)
class PrivateTraining:
    """DP-SGD for one round: the Sampled Gaussian Mechanism of Abadi et al. 2016 (Alg. 1).

    Each step clips every per-example gradient to L2 norm C = ``max_grad_norm``, sums
    them, adds N(0, σ² C² I) with σ = ``noise_multiplier`` and divides by the expected
    batch size q·|D| (Opacus, Poisson sampling at rate q). Every application, training
    steps and DPQuant's sensitivity estimates alike, is recorded in ``ledger``: the
    node's one :class:`~fedquant.accounting.PrivacyLedger`, persisted by the caller, so ε
    is cumulative over the run. σ comes from :func:`calibrate_client_noise`, once per run.
    """

    noise_multiplier: float
    max_grad_norm: float
    ledger: PrivacyLedger

    def __post_init__(self) -> None:
        if not is_finite(self.noise_multiplier) or not self.noise_multiplier > 0:
            raise ValueError(
                f"`noise_multiplier` must be finite and > 0. Found `{self.noise_multiplier!r}`."
            )
        if not is_finite(self.max_grad_norm) or not self.max_grad_norm > 0:
            raise ValueError(
                f"`max_grad_norm` must be finite and > 0. Found `{self.max_grad_norm!r}`."
            )
        if not isinstance(self.ledger, PrivacyLedger):
            raise ValueError(f"`ledger` must be a PrivacyLedger. Found `{self.ledger!r}`.")


@dataclass(frozen=True)
class LayerQuantization:
    """DPQuant for one round (paper A): the run's settings and the node's schedule.

    ``settings`` gives the format, the estimator (C_a, σ_a, q_a, every P epochs) and the
    speedup s of the low-precision arithmetic; ``scheduler`` (persisted by the caller,
    built with :meth:`LayerScheduler.from_settings`) picks the k layers of each epoch.
    Only for settings that quantize something (``settings.active``).
    """

    settings: DPQuantSettings
    scheduler: LayerScheduler

    def __post_init__(self) -> None:
        if not self.settings.active:
            raise ValueError(
                f"`settings` quantize no layer (policy {self.settings.policy.value}, ratio "
                f"{self.settings.train_ratio}): train without a LayerQuantization instead."
            )
        if not isinstance(self.scheduler, LayerScheduler):
            raise ValueError(f"`scheduler` must be a LayerScheduler. Found `{self.scheduler!r}`.")


@dataclass
class RoundStats:
    """What one round did, derived from the plan and the schedule, never from the data.

    ``steps`` and ``epochs`` run; ``quantized_epochs[i]`` the epochs layer i ran
    quantized; ``speedup`` the mean over epochs of paper A's theoretical speedup.
    """

    steps: int
    epochs: int
    quantized_epochs: list[int] = field(default_factory=list)  # per layer: epochs quantized
    speedup: float = 1.0


LayerLosses = Callable[[int | None, torch.Tensor, torch.Tensor], torch.Tensor]
"""``losses(i, x, y)``: per-example losses (B,) with only layer i quantized (None: none)."""


def quantized_layer_losses(model: nn.Module, fmt: QuantFormat) -> LayerLosses:
    """The per-example loss function DPQuant's estimator evaluates (paper A, R̂).

    ``losses(i, x, y)`` = CE(model(x), y) per example, with only quantizable layer i in
    ``fmt`` (``None``: full precision), under ``torch.no_grad()``. It leaves layer i
    quantized; the caller resets the layers (``set_quantized(model, [], None)``).
    """
    loss_fn = nn.CrossEntropyLoss(reduction="none")

    @torch.no_grad()
    def losses(layer: int | None, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        set_quantized(model, [] if layer is None else [layer], fmt)
        per_example: torch.Tensor = loss_fn(model(x), y)  # (B,)
        return per_example

    return losses


def backward_quietly(loss: torch.Tensor) -> None:
    """``loss.backward()`` without one warning of torch that nobody can act on.

    Opacus' full backward hook on the first layer fires although its input (the images)
    needs no gradient, and torch warns about it; per-sample gradients of the weights are
    all that hook computes.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Full backward hook is firing", category=UserWarning
        )
        torch.autograd.backward(loss)


def train_round(
    model: nn.Module,
    data: Split,
    *,
    plan: RoundPlan,
    train: TrainSettings,
    privacy: PrivateTraining | None,
    quantization: LayerQuantization | None,
    privacy_rng: torch.Generator,
) -> RoundStats:
    """Local epochs of (DP-)SGD, quantizing the scheduler's layers each epoch.

    ``plan`` bounds the work (epochs, steps); ``train`` gives the batch size, momentum
    and the step size: ``dp_lr`` under DP-SGD, ``lr`` without. With ``privacy``, the
    model trains with Opacus (Poisson sampling, per-sample clipping, Gaussian noise;
    :func:`private_engine`) and every mechanism application, training steps and
    sensitivity estimates, is recorded in ``privacy.ledger``; without it, plain SGD on
    shuffled batches, the estimator adds no noise and nothing is charged. With
    ``quantization``, each epoch runs the scheduler's k layers in low precision, after
    a sensitivity estimate every P epochs under the DPQUANT policy (paper A).
    ``privacy_rng`` drives the noise, the batches and the estimator's subsample: secret
    (OS entropy) for a private client, seeded for reproducible runs.
    """
    layers = [m for _, m in quantizable_layers(model)]
    n_layers = len(layers)
    if quantization is not None and quantization.scheduler.n_layers != n_layers:
        raise ValueError(
            f"the schedule has {quantization.scheduler.n_layers} layers, the model "
            f"{n_layers} quantizable layers"
        )
    loader = DataLoader(
        TensorDataset(data.images, data.labels),
        batch_size=train.batch_size,
        shuffle=privacy is None,  # Opacus replaces it with Poisson sampling
        generator=privacy_rng,
    )
    lr = train.dp_lr if privacy is not None else train.lr
    optimizer: torch.optim.Optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=train.momentum
    )
    trained: nn.Module = model
    engine = None
    if privacy is not None:
        engine = private_engine(privacy_rng)
        trained, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            poisson_sampling=True,
        )

    flops = layer_flops(model, layers, data.images[:1])
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    stats = RoundStats(steps=0, epochs=0, quantized_epochs=[0] * n_layers)
    speedups: list[float] = []
    for _ in range(plan.epochs):
        if plan.max_steps and stats.steps >= plan.max_steps:
            break
        analysis = 0.0
        chosen: list[int] = []
        if quantization is not None:
            quant, scheduler = quantization.settings, quantization.scheduler
            if _estimates(quant) and scheduler.epochs_done % quant.period == 0:
                model.eval()
                estimate = estimate_sensitivity(
                    quantized_layer_losses(model, quant.format),
                    data.images,
                    data.labels,
                    n_layers=n_layers,
                    sample_rate=quant.sample_rate,
                    clip=quant.clip,
                    noise_multiplier=quant.noise if privacy is not None else 0.0,
                    generator=privacy_rng,
                )
                scheduler.update_sensitivity(estimate)
                if privacy is not None:
                    privacy.ledger.record(
                        noise_multiplier=quant.noise, sample_rate=quant.sample_rate, steps=1
                    )
                analysis = estimator_flops(
                    flops, n_examples=len(data), sample_rate=quant.sample_rate
                )
            chosen = scheduler.next_epoch()
            set_quantized(model, chosen, quant.format)
        for i in chosen:
            stats.quantized_epochs[i] += 1
        model.train()
        epoch_steps = 0
        for images, labels in loader:
            if plan.max_steps and stats.steps >= plan.max_steps:
                break
            optimizer.zero_grad(set_to_none=True)
            # Mean over the batch, written as sum / n so that an empty Poisson batch gives
            # a zero loss (its step is noise only) instead of a NaN mean.
            loss = loss_fn(trained(images), labels) / max(len(labels), 1)
            backward_quietly(loss)
            optimizer.step()
            stats.steps += 1
            epoch_steps += 1
        stats.epochs += 1
        # Training costs ~3 forward passes (forward, two backward matmuls) per sample,
        # counted at the expected batch size q·|D|: the realised Poisson batch sizes are
        # part of the mechanism's secret randomness and must not shape what is reported.
        epoch_samples = epoch_steps * plan.sample_rate * len(data)
        speedups.append(
            theoretical_speedup(
                [3 * f * epoch_samples for f in flops],
                chosen,
                low_precision_speedup=(
                    quantization.settings.low_precision_speedup if quantization else 1.0
                ),
                analysis_flops=analysis,
            )
        )
    set_quantized(model, [], None)
    if engine is not None and privacy is not None:
        for noise, rate, steps in engine.accountant.history:
            privacy.ledger.record(noise_multiplier=noise, sample_rate=rate, steps=steps)
    close = getattr(trained, "_close", None)
    if privacy is not None and callable(close):
        close()  # remove Opacus hooks; the model object is reused for the reply
    stats.speedup = float(np.mean(speedups)) if speedups else 1.0
    return stats
