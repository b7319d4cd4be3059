"""What post-training quantization returns: the model and its diagnostics."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["PTQResult"]


@dataclass(frozen=True)
class PTQResult:
    """A quantized model with what it cost and how far each unit is from full precision.

    Attributes:
        model: the quantized model (a :class:`fedquant.ptq.layers.PTQModel`, eval mode):
            ``forward(images (B, 1, 28, 28)) -> logits (B, 10)``.
        unit_names: the reconstruction units in depth order: the model's blocks
            (``fedquant.ptq.units``) for RTN, BRECQ and MRECG; its quantizable layers
            for AdaRound, which reconstructs layer by layer.
        unit_losses: per unit, the mean squared error of its output in the quantized
            model against the float model's, over the calibration set, after
            quantization (errors accumulated from earlier units included); ``[]``
            without calibration data.
        groups: unit indices reconstructed jointly, in order: singletons for RTN (which
            reconstructs nothing), AdaRound and BRECQ; MRECG's merged groups.
        capacities: MRECG's capacity per unit (``fedquant.ptq.mrecg``); ``[]`` otherwise.
        fp_bytes: 4 x the number of parameters of the float model.
        packed_bytes: the size of the file :func:`fedquant.ptq.save_quantized` writes.
        seconds: wall time of :func:`fedquant.ptq.quantize_model`.
    """

    model: nn.Module
    unit_names: list[str]
    unit_losses: list[float]
    groups: list[list[int]]
    capacities: list[float]
    fp_bytes: int
    packed_bytes: int
    seconds: float
