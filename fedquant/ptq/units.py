"""Reconstruction units: the pieces of a model that BRECQ and MRECG reconstruct one at a time.

A unit is a consecutive slice of the forward pass with its quantizable layers; running
the units in order on images gives the model's logits (a test checks this against
``model.forward``). Each unit's forward takes the network (float, or its PTQ copy: the
same class with swapped layers, :func:`fedquant.ptq.layers.to_ptq_network`) and the
unit's input.

MnistCnn (4 units), each quantizable layer with what follows it up to the next one:

    conv1: pool(relu(conv1(x)))      (B, 1, 28, 28) -> (B, 16, 14, 14)
    conv2: pool(relu(conv2(x)))      (B, 16, 14, 14) -> (B, 32, 7, 7)
    fc1:   relu(fc1(flatten(x)))     (B, 32, 7, 7) -> (B, 64)
    fc2:   fc2(x)                    (B, 64) -> (B, 10), the logits

The activation and pooling belong to the layer before them (so the reconstruction target
is what the next layer sees, after ReLU clips negative errors and max-pooling keeps
only the largest of four), the choice BRECQ's code makes for a layer followed by ReLU.

MnistResNet (5 units), BRECQ's block granularity (Li et al. ICLR 2021, Sec. 3.2):

    stem:   relu(stem_gn(stem(x)))   (B, 1, 28, 28) -> (B, 16, 28, 28)
    layer1: BasicBlock               (B, 16, 28, 28) -> (B, 16, 28, 28)
    layer2: BasicBlock (stride 2)    -> (B, 32, 14, 14)
    layer3: BasicBlock (stride 2)    -> (B, 64, 7, 7)
    fc:     fc(mean over H, W)       (B, 64, 7, 7) -> (B, 10)

The first unit's first layer and the last unit's last layer (conv1/stem and fc2/fc)
keep 8-bit weights and 8-bit inputs, as is customary (BRECQ, QDrop, MRECG).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from fedquant.config import ModelName
from fedquant.models import MnistCnn, MnistResNet

__all__ = ["Unit", "model_name_of", "reconstruction_units", "run_units"]

UnitForward = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Unit:
    """A reconstruction unit: its name, its quantizable layers in forward order, its forward.

    ``forward(network, x)`` runs the unit of ``network`` on the unit's input ``x``.
    ``downsampling`` holds each layer's spatial downsampling factor (stride², 1 for linear
    layers), for MRECG's data-free capacity.
    """

    name: str
    layers: tuple[str, ...]
    downsampling: tuple[int, ...]
    forward: UnitForward


def _cnn(network: nn.Module) -> MnistCnn:
    return cast(MnistCnn, network)


def _resnet(network: nn.Module) -> MnistResNet:
    return cast(MnistResNet, network)


def _cnn_conv1(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    m = _cnn(network)
    out: torch.Tensor = m.pool(torch.relu(m.conv1(x)))  # (B, 16, 14, 14)
    return out


def _cnn_conv2(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    m = _cnn(network)
    out: torch.Tensor = m.pool(torch.relu(m.conv2(x)))  # (B, 32, 7, 7)
    return out


def _cnn_fc1(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.relu(_cnn(network).fc1(x.flatten(1)))  # (B, 1568) -> (B, 64)


def _cnn_fc2(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = _cnn(network).fc2(x)  # (B, 10)
    return out


def _resnet_stem(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    m = _resnet(network)
    return torch.relu(m.stem_gn(m.stem(x)))  # (B, 16, 28, 28)


def _resnet_block(name: str) -> UnitForward:
    def forward(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = network.get_submodule(name)(x)
        return out

    return forward


def _resnet_fc(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = _resnet(network).fc(x.mean(dim=(2, 3)))  # (B, 64) -> (B, 10)
    return out


_CNN_UNITS = (
    Unit("conv1", ("conv1",), (1,), _cnn_conv1),
    Unit("conv2", ("conv2",), (1,), _cnn_conv2),
    Unit("fc1", ("fc1",), (1,), _cnn_fc1),
    Unit("fc2", ("fc2",), (1,), _cnn_fc2),
)


def _block(name: str, *, stride: int, shortcut: bool) -> Unit:
    layers = (f"{name}.conv1", f"{name}.conv2") + ((f"{name}.shortcut.0",) if shortcut else ())
    # conv1 and the shortcut conv carry the block's stride; conv2 has stride 1
    downsampling = (stride**2, 1) + ((stride**2,) if shortcut else ())
    return Unit(name, layers, downsampling, _resnet_block(name))


_RESNET_UNITS = (
    Unit("stem", ("stem",), (1,), _resnet_stem),
    _block("layer1", stride=1, shortcut=False),
    _block("layer2", stride=2, shortcut=True),
    _block("layer3", stride=2, shortcut=True),
    Unit("fc", ("fc",), (1,), _resnet_fc),
)


def model_name_of(model: nn.Module) -> ModelName:
    """Which of the project's models ``model`` is; ValueError for anything else."""
    if isinstance(model, MnistCnn):
        return ModelName.CNN
    if isinstance(model, MnistResNet):
        return ModelName.RESNET
    raise ValueError(
        f"`model` must be a fedquant.models MnistCnn or MnistResNet (unwrapped). "
        f"Found `{type(model).__name__}`."
    )


def reconstruction_units(name: ModelName) -> tuple[Unit, ...]:
    """The units of model ``name`` in depth order (module docstring)."""
    if name is ModelName.CNN:
        return _CNN_UNITS
    if name is ModelName.RESNET:
        return _RESNET_UNITS
    raise ValueError(f"`name` must be a ModelName. Found `{name!r}`.")


def run_units(
    units: tuple[Unit, ...] | list[Unit], network: nn.Module, x: torch.Tensor
) -> torch.Tensor:
    """``units[-1](... units[0](x))`` on ``network``."""
    for unit in units:
        x = unit.forward(network, x)
    return x
