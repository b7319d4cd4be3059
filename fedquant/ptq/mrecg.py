"""MRECG: merge adjacent reconstruction units where capacity drops (Ma et al., CVPR 2023).

Ma et al. ("Solving Oscillation Problem in Post-Training Quantization Through a
Theoretical Perspective", arXiv 2303.11906) observe that BRECQ's per-unit reconstruction
loss oscillates with depth, and show that a unit of lower *capacity* than its predecessor
amplifies the error accumulated before it (Sec. 3). Their fix, Mixed REConstruction
Granularity: measure each unit's capacity (ModCap) c_i, form the differentials between
neighbours, d_i = c_i - c_{i+1} (how much capacity drops from unit i to i + 1), and
reconstruct the top-k pairs (i, i + 1) jointly, so the weaker unit is optimized together
with the one before it; chains of selected pairs become longer groups (Sec. 4).

**Computed, not hard-coded.** In the authors' code (bytedance/MRECG, on MQBench) ModCap
does not appear: the merged modules are listed per model by hand. Here the capacities are
computed from the model (:func:`data_free_capacities`, :func:`data_dependent_capacity`)
and the grouping by the pure function :func:`group_units`.

**Data-free capacity** (the paper's formula was not recovered; this one is ours):

    c = log2 Σ_{layers ℓ of the unit}  b_ℓ · P_ℓ / r_ℓ

P_ℓ the layer's weight count, b_ℓ its weight bits, r_ℓ its spatial downsampling (stride²;
1 for a linear layer). b_ℓ · P_ℓ is log2 of the number of distinct weight settings the
layer can represent (2^(b P)); a stride-s convolution evaluates its kernel at 1/s² as many
positions, so per input position it has s² fewer of them to fit the unit's output with,
hence the division. The log2 makes a drop a ratio: halving the representable
configurations costs 1, whatever the width. Biases and GroupNorm parameters stay float and
are not counted; pooling has no parameters and is not counted.

**Data-dependent capacity**: ``c = -ln(MSE / E[y²])``, with MSE the unit's output error
after round-to-nearest (weights and activations) on the calibration set, the unit fed the
*float* model's input (its own error, not what earlier units left), and E[y²] the mean
square of its float output (so logits and feature maps compare). Higher loss, lower
capacity, and a differential is the log-ratio of two units' relative errors.

Caveat: the selection takes the top-k differentials as a budget of k merges, as in the
paper, even when some of them are not positive (capacity rises); ``top_k = 0`` is BRECQ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from fedquant.ptq.layers import PTQLayer
from fedquant.ptq.units import Unit

__all__ = ["data_dependent_capacity", "data_free_capacities", "group_units"]


def group_units(capacities: Sequence[float], top_k: int) -> list[list[int]]:
    """Groups of consecutive unit indices, merging the ``top_k`` largest capacity drops.

    d_i = c_i - c_{i+1} for i = 0..n-2; the pairs (i, i + 1) with the ``top_k`` largest
    d_i are merged (all pairs if ``top_k >= n - 1``), and overlapping pairs chain:
    selecting (1, 2) and (2, 3) gives the group [1, 2, 3]. Ties in d go to the shallower
    pair (smaller i): error compounds with depth, so the earlier fix helps more units.
    ``top_k = 0`` gives singletons (BRECQ). The groups partition ``range(n)`` in order.

    Raises:
        ValueError: ``top_k`` negative, or a capacity not finite.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"`top_k` must be an integer >= 0. Found `{top_k!r}`.")
    values = [float(c) for c in capacities]
    if not all(math.isfinite(c) for c in values):
        raise ValueError(f"`capacities` must be finite. Found `{values}`.")
    drops = [values[i] - values[i + 1] for i in range(len(values) - 1)]
    ranked = sorted(range(len(drops)), key=lambda i: (-drops[i], i))
    merged = set(ranked[:top_k])
    groups: list[list[int]] = []
    for i in range(len(values)):
        if i > 0 and (i - 1) in merged:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def data_free_capacities(units: Sequence[Unit], network: nn.Module) -> list[float]:
    """``log2 Σ_ℓ b_ℓ P_ℓ / r_ℓ`` of each unit (module docstring), from its PTQLayers."""
    capacities = []
    for unit in units:
        total = 0.0
        for name, downsampling in zip(unit.layers, unit.downsampling, strict=True):
            layer = network.get_submodule(name)
            if not isinstance(layer, PTQLayer):
                raise ValueError(f"{name} is not a PTQLayer")
            total += layer.weight_bits * layer.codes.numel() / downsampling
        capacities.append(math.log2(total))
    return capacities


def data_dependent_capacity(output: torch.Tensor, target: torch.Tensor) -> float:
    """``-ln(mean (output - target)² / mean target²)``: a unit's RTN output vs its float output.

    The relative error is floored at 1e-30 (an exact unit would otherwise be infinite).
    """
    relative = float((output - target).square().mean()) / max(float(target.square().mean()), 1e-30)
    return -math.log(max(relative, 1e-30))
