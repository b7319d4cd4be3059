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
"""

from __future__ import annotations

import functools
import math
import warnings
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

from fedquant.accounting import (
    Accountant,
    MechanismStep,
    PrivacyLedger,
    calibrate_noise,
    check_target,
)
from fedquant.data import Split
from fedquant.dpquant import (
    LayerScheduler,
    QuantPolicy,
    estimate_sensitivity,
    estimator_flops,
    layer_flops,
    theoretical_speedup,
)
from fedquant.fakequant import QuantFormat, quantizable_layers, set_quantized


@dataclass(frozen=True)
class DPSettings:
    """Sample-level DP for one client over the whole run, as ``accountant`` measures it."""

    target_epsilon: float
    target_delta: float
    max_grad_norm: float
    accountant: Accountant


@dataclass(frozen=True)
class QuantSettings:
    """DPQuant's knobs (paper A leaves β, α, C_a, σ_a, q_a and P open)."""

    policy: QuantPolicy
    ratio: float
    fmt: QuantFormat
    beta: float
    alpha: float
    estimator_clip: float
    estimator_noise: float
    estimator_rate: float
    period: int
    low_precision_speedup: float


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


def estimator_calls(*, epochs_before: int, epochs: int, period: int) -> int:
    """Estimates run at the start of every epoch e with e % P == 0."""
    return sum(1 for e in range(epochs_before, epochs_before + epochs) if e % period == 0)


def epochs_per_round(plan: RoundPlan) -> int:
    """Epochs actually started per round (a step cap may end the round early)."""
    return min(plan.epochs, math.ceil(plan.steps / plan.steps_per_epoch))


def estimator_queries(
    plan: RoundPlan, *, rounds: int, quant: QuantSettings | None, epochs_before: int = 0
) -> list[MechanismStep]:
    """DPQuant's sensitivity estimates in ``rounds`` rounds (none for other policies)."""
    if quant is None or quant.policy is not QuantPolicy.DPQUANT or not rounds:
        return []
    calls = estimator_calls(
        epochs_before=epochs_before, epochs=epochs_per_round(plan) * rounds, period=quant.period
    )
    return [MechanismStep(quant.estimator_noise, quant.estimator_rate, calls)] if calls else []


def planned_mechanisms(
    plan: RoundPlan,
    *,
    rounds: int,
    noise: float,
    quant: QuantSettings | None,
    epochs_before: int = 0,
) -> list[MechanismStep]:
    """Every SGM application of ``rounds`` rounds: training steps and estimator queries."""
    training = [MechanismStep(noise, plan.sample_rate, plan.steps * rounds)] if rounds else []
    return training + estimator_queries(
        plan, rounds=rounds, quant=quant, epochs_before=epochs_before
    )


def _client_budget(
    plan: RoundPlan, *, rounds: int, dp: DPSettings, quant: QuantSettings | None
) -> dict[str, Any]:
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
    plan: RoundPlan, *, rounds: int, dp: DPSettings, quant: QuantSettings | None
) -> float:
    """σ such that all planned rounds (and estimator queries) meet (ε, δ).

    Cached: a PRV calibration takes seconds, and the simulated clients sharing a process
    (a Ray worker, the in-process grid) mostly share a plan (equal partition sizes).
    Raises ValueError (from ``calibrate_noise``) when no allowed σ can meet it.
    """
    return calibrate_noise(**_client_budget(plan, rounds=rounds, dp=dp, quant=quant))


def check_client_target(
    plan: RoundPlan, *, rounds: int, dp: DPSettings, quant: QuantSettings | None
) -> None:
    """Raise ValueError if no σ lets this plan meet (ε, δ): what
    :func:`calibrate_client_noise` would raise, at the cost of two ε evaluations."""
    check_target(**_client_budget(plan, rounds=rounds, dp=dp, quant=quant))


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


@dataclass
class RoundStats:
    steps: int
    epochs: int
    quantized_epochs: list[int] = field(default_factory=list)  # per layer: epochs quantized
    speedup: float = 1.0


def _per_example_losses(model: nn.Module, fmt: QuantFormat):
    loss_fn = nn.CrossEntropyLoss(reduction="none")

    @torch.no_grad()
    def losses(layer: int | None, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        set_quantized(model, [] if layer is None else [layer], fmt)
        return loss_fn(model(x), y)

    return losses


def backward_quietly(loss: torch.Tensor) -> None:
    """``loss.backward()`` without torch's warning that Opacus' full backward hook on the
    first layer fires although its input (the images) needs no gradient: per-sample
    gradients of the weights are all that hook computes. Nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Full backward hook is firing", category=UserWarning
        )
        loss.backward()


def train_round(
    model: nn.Module,
    data: Split,
    *,
    plan: RoundPlan,
    lr: float,
    momentum: float,
    batch_size: int,
    privacy_rng: torch.Generator,
    scheduler: LayerScheduler | None,
    quant: QuantSettings | None,
    noise_multiplier: float | None,
    max_grad_norm: float,
    ledger: PrivacyLedger | None,
) -> RoundStats:
    """Local epochs of (DP-)SGD, quantizing the scheduler's layers each epoch.

    With ``noise_multiplier`` set, the model trains with Opacus (Poisson sampling,
    per-sample clipping to ``max_grad_norm``, Gaussian noise; :func:`private_engine`)
    and every mechanism application — training steps and sensitivity estimates — is
    recorded in ``ledger``. Without it, plain SGD; estimates then use no noise and
    nothing is charged. ``privacy_rng`` drives the noise, the batches and the estimator's
    subsample: secret (OS entropy) for a private client, seeded for reproducible runs.
    """
    private = noise_multiplier is not None
    layers = [m for _, m in quantizable_layers(model)]
    n_layers = len(layers)
    loader = DataLoader(
        TensorDataset(data.images, data.labels),
        batch_size=batch_size,
        shuffle=not private,  # Opacus replaces it with Poisson sampling
        generator=privacy_rng,
    )
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    trained: nn.Module = model
    engine = None
    if private:
        engine = private_engine(privacy_rng)
        trained, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
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
        if scheduler is not None and quant is not None:
            if quant.policy is QuantPolicy.DPQUANT and scheduler.epochs_done % quant.period == 0:
                model.eval()
                estimate = estimate_sensitivity(
                    _per_example_losses(model, quant.fmt),
                    data.images,
                    data.labels,
                    n_layers=n_layers,
                    sample_rate=quant.estimator_rate,
                    clip=quant.estimator_clip,
                    noise_multiplier=quant.estimator_noise if private else 0.0,
                    generator=privacy_rng,
                )
                scheduler.update_sensitivity(estimate)
                if private and ledger is not None:
                    ledger.record(
                        noise_multiplier=quant.estimator_noise,
                        sample_rate=quant.estimator_rate,
                        steps=1,
                    )
                analysis = estimator_flops(
                    flops, n_examples=len(data), sample_rate=quant.estimator_rate
                )
            chosen = scheduler.next_epoch()
            set_quantized(model, chosen, quant.fmt)
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
                low_precision_speedup=quant.low_precision_speedup if quant else 4.0,
                analysis_flops=analysis,
            )
        )
    set_quantized(model, [], None)
    if engine is not None and ledger is not None:
        for noise, rate, steps in engine.accountant.history:
            ledger.record(noise_multiplier=noise, sample_rate=rate, steps=steps)
    if private and hasattr(trained, "_close"):
        trained._close()  # remove Opacus hooks; the model object is reused for the reply
    stats.speedup = float(np.mean(speedups)) if speedups else 1.0
    return stats
