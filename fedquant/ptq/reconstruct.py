"""Output reconstruction: AdaRound's objective over a layer or a block (BRECQ), with QDrop.

One reconstruction optimizes the rounding of every PTQLayer in a piece of the network
(one layer for AdaRound, a unit or a merged group of units for BRECQ/MRECG) so that the
piece, fed its input *in the quantized model* x̃, reproduces the *float* model's output
y of that piece (AdaRound Sec. 3.3 Eq. 25's asymmetric reconstruction; BRECQ Sec. 3.2):

    min_V  E_batch ‖piece_q(x̃) - y‖²  +  λ Σ_layers f_reg(V; β)

with the per-sample squared error summed over the sample's features and averaged over
a minibatch (BRECQ's ``lp_loss`` with p = 2), λ = 0.01, β annealed 20 → 2 after a 20 %
warm-up (:mod:`fedquant.ptq.adaround`); Adam with learning rate 1e-3 on V. With
``learn_activation_steps`` the input quantizers' steps of the piece's layers are
learned in the same pass (LSQ gradient), Adam with learning rate 4e-5 and a cosine
schedule to 0, as in QDrop's code (BRECQ's code learns them in a second pass).

QDrop (Wei et al. ICLR 2022, Sec. 4): with ``keep_quantized`` = p < 1 each element of
the piece's input is replaced by its float value with probability 1 - p at every step
(``x = where(u < p, x̃, x_fp)``, u ~ U[0, 1)). QDrop proper drops inside every activation
quantizer of the piece; here only the piece's input is mixed (the project's definition).

Caveats: BRECQ's preferred objective weights the squared error by the diagonal Fisher of
the output (Sec. 3.2, Eq. 10); this is the plain-MSE variant. Minibatches of
:data:`BATCH_SIZE` are drawn with replacement from the calibration set with the given
``torch.Generator`` (so a fixed seed gives the same codes). Default iteration counts here
are far below the papers' 20,000 per block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fedquant.ptq.adaround import REG_WEIGHT, beta_at
from fedquant.ptq.layers import PTQLayer

__all__ = ["ACT_LR", "BATCH_SIZE", "WEIGHT_LR", "reconstruct", "squared_error"]

BATCH_SIZE = 32
"""Minibatch size of a reconstruction step (BRECQ's and QDrop's default)."""

WEIGHT_LR = 1e-3
"""Adam's learning rate on AdaRound's V."""

ACT_LR = 4e-5
"""Adam's learning rate on the activation steps (cosine-annealed to 0)."""


def squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean_b Σ_features (output_b - target_b)²``: the reconstruction term (batch first)."""
    return (output - target).square().flatten(1).sum(dim=1).mean()


def reconstruct(
    layers: Sequence[PTQLayer],
    forward: Callable[[torch.Tensor], torch.Tensor],
    *,
    inputs: torch.Tensor,
    float_inputs: torch.Tensor,
    targets: torch.Tensor,
    iterations: int,
    learn_activation_steps: bool,
    keep_quantized: float,
    generator: torch.Generator,
    weight_lr: float = WEIGHT_LR,
) -> list[float]:
    """Learn the rounding of ``layers`` so that ``forward(inputs) ≈ targets``; make it hard.

    Args:
        layers: the PTQLayers that ``forward`` runs (each must still hold its float weight).
        forward: the piece of the quantized network, input batch -> output batch.
        inputs: (N, ...) the piece's input in the quantized model, x̃.
        float_inputs: (N, ...) the piece's input in the float model (for QDrop).
        targets: (N, ...) the float model's output of the piece, y.
        iterations: Adam steps.
        learn_activation_steps: also learn the steps of the layers' input quantizers.
        keep_quantized: QDrop's p; 1.0 keeps the whole input quantized (QDrop off).
        generator: the source of the minibatch indices and QDrop's masks.
        weight_lr: Adam's learning rate on V.

    Returns:
        The reconstruction term at every step (before the step), for diagnostics.
        On return every layer holds hard-rounded codes and no AdaRound state.
    """
    if iterations < 1:
        raise ValueError(f"`iterations` must be >= 1. Found `{iterations}`.")
    if not 0.0 < keep_quantized <= 1.0:
        raise ValueError(f"`keep_quantized` must be in (0, 1]. Found `{keep_quantized}`.")
    if not (len(inputs) == len(float_inputs) == len(targets) > 0):
        raise ValueError("`inputs`, `float_inputs` and `targets` must have the same length > 0")
    roundings = [layer.start_adaround() for layer in layers]
    steps = [
        layer.input_quantizer.step
        for layer in layers
        if learn_activation_steps and layer.input_quantizer is not None
    ]
    weight_opt = torch.optim.Adam([r.logits for r in roundings], lr=weight_lr)
    step_opt = torch.optim.Adam(steps, lr=ACT_LR) if steps else None
    schedule = (
        torch.optim.lr_scheduler.CosineAnnealingLR(step_opt, T_max=iterations, eta_min=0.0)
        if step_opt is not None
        else None
    )
    history: list[float] = []
    count = len(inputs)
    try:
        for step in steps:
            step.requires_grad_(True)
        for t in range(iterations):
            index = torch.randint(count, (min(BATCH_SIZE, count),), generator=generator)
            x = inputs[index]  # (B, ...)
            if keep_quantized < 1.0:
                keep = torch.rand(x.shape, generator=generator) < keep_quantized
                x = torch.where(keep, x, float_inputs[index])
            reconstruction = squared_error(forward(x), targets[index])
            loss = reconstruction
            beta = beta_at(t, total=iterations)
            if beta is not None:
                loss = loss + REG_WEIGHT * sum(
                    (r.regularizer(beta=beta) for r in roundings), torch.zeros(())
                )
            weight_opt.zero_grad(set_to_none=True)
            if step_opt is not None:
                step_opt.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            weight_opt.step()
            if step_opt is not None and schedule is not None:
                step_opt.step()
                schedule.step()
            history.append(float(reconstruction.detach()))
    finally:
        for step in steps:
            step.requires_grad_(False)
        for layer in layers:
            if layer.adaround is not None:
                layer.finish_adaround()
    return history
