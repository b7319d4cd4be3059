"""quantize_model: post-training quantization of a trained MnistCnn or MnistResNet.

The pipeline, for every method:

1. A float reference: a copy of the model with every DPQuant layer at full precision
   (``fakequant.set_quantized(..., None)``); the caller's model is never modified.
2. Round-to-nearest (RTN) of every conv/linear weight per output channel on an
   MSE-chosen asymmetric grid (:mod:`fedquant.ptq.quantizers`), ``weight_bits`` bits,
   8 for the first and the last layer (:mod:`fedquant.ptq.units`).
3. With ``act_bits`` < 32: a per-tensor quantizer on each conv/linear input, its range
   chosen by MSE on that layer's input in the float model over the calibration images
   (8 bits for the first and last layer's input).
4. The method:

   RTN        nothing more (the only method that needs no data when ``act_bits`` is 32).
   ADAROUND   each layer in depth order: AdaRound's rounding reconstructs the layer's
              float output from its input in the already-quantized model (Nagel et al.
              2020, Eq. 25 without the activation function); activation steps fixed.
   BRECQ      each unit in depth order, the same objective over the unit, activation
              steps learned in the same pass (Li et al. 2021).
   MRECG      BRECQ over groups of units merged where capacity drops most
              (:mod:`fedquant.ptq.mrecg`, Ma et al. 2023).

   QDrop (``qdrop`` < 1) mixes the reconstruction input with its float value
   (:mod:`fedquant.ptq.reconstruct`). Every random draw comes from one
   ``torch.Generator`` seeded with ``settings.seed``.

5. Diagnostics: per-unit output error against the float model on the calibration set,
   the float and packed sizes, the wall time.

Calibration images are the caller's: ``quantize_model`` never loads data; it uses the
first ``settings.calibration_size`` rows of what it is given.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fedquant.config import UNQUANTIZED_BITS, Capacity, PTQMethod, PTQSettings
from fedquant.fakequant import set_quantized
from fedquant.ptq.export import encode_quantized
from fedquant.ptq.layers import PTQLayer, PTQModel, ptq_layers, to_ptq_network
from fedquant.ptq.mrecg import data_dependent_capacity, data_free_capacities, group_units
from fedquant.ptq.quantizers import ActivationQuantizer
from fedquant.ptq.reconstruct import reconstruct
from fedquant.ptq.result import PTQResult
from fedquant.ptq.units import Unit, model_name_of, reconstruction_units, run_units

__all__ = ["EDGE_BITS", "quantize_model"]

EDGE_BITS = 8
"""Weight and input bits of the first and the last quantizable layer."""

_EVAL_BATCH = 256  # images per forward pass outside the reconstruction loop
_IMAGE_SHAPE = (1, 28, 28)


def quantize_model(
    model: nn.Module, settings: PTQSettings, *, calibration: torch.Tensor | None
) -> PTQResult:
    """Quantize a trained MnistCnn or MnistResNet after training (module docstring).

    Args:
        model: the trained float model; not modified.
        settings: method, bits, iterations, top-k, capacity, QDrop and seed.
        calibration: (N, 1, 28, 28) normalized float images, or None (no data: RTN of
            the weights with ``act_bits`` = 32 only). The first
            ``settings.calibration_size`` images are used.

    Returns:
        The quantized model and its diagnostics (:class:`PTQResult`).

    Raises:
        ValueError: method NONE; a method that reconstructs (or quantized activations)
            without calibration images; malformed images; a model not of this project.
    """
    start = time.perf_counter()
    method = settings.method
    if method is PTQMethod.NONE:
        raise ValueError("settings.method is PTQMethod.NONE: there is nothing to quantize")
    if calibration is None and settings.needs_data:
        raise ValueError(
            f"ptq = '{method.value}' reconstructs from calibration images, but"
            " calibration=None; pass images or use ptq = 'rtn'"
        )
    quantize_inputs = settings.act_bits != UNQUANTIZED_BITS
    if calibration is None and quantize_inputs:
        raise ValueError(
            f"ptq-act-bits = {settings.act_bits} needs calibration images for the activation"
            " ranges, but calibration=None; pass images or set ptq-act-bits = 32"
        )
    name = model_name_of(model)
    images = None if calibration is None else _images(calibration, settings.calibration_size)
    units = reconstruction_units(name)
    float_net = _float_reference(model)
    order = [layer for unit in units for layer in unit.layers]  # depth order
    edges = {units[0].layers[0], units[-1].layers[-1]}
    network = to_ptq_network(
        float_net,
        weight_bits={n: EDGE_BITS if n in edges else settings.weight_bits for n in order},
    )
    if quantize_inputs:
        act_bits = {n: EDGE_BITS if n in edges else settings.act_bits for n in order}
        _calibrate_inputs(network, float_net, _present(images), act_bits)
    generator = torch.Generator().manual_seed(settings.seed)

    capacities: list[float] = []
    if method is PTQMethod.ADAROUND:
        unit_names = order
        groups = [[i] for i in range(len(order))]
        for layer_name in order:
            _adaround_layer(network, float_net, layer_name, _present(images), settings, generator)
    else:
        unit_names = [unit.name for unit in units]
        groups = [[i] for i in range(len(units))]
        if method is PTQMethod.MRECG:
            capacities = _capacities(settings.capacity, units, network, float_net, _present(images))
            groups = group_units(capacities, settings.top_k)
        if method in (PTQMethod.BRECQ, PTQMethod.MRECG):
            _reconstruct_groups(
                network,
                float_net,
                units,
                groups,
                _present(images),
                settings,
                quantize_inputs,
                generator,
            )
    for _, layer in ptq_layers(network):
        layer.freeze()
    quantized = PTQModel(network, model_name=name)

    unit_losses: list[float] = []
    if images is not None:
        unit_losses = (
            _layer_losses(network, float_net, order, images)
            if method is PTQMethod.ADAROUND
            else _unit_losses(network, float_net, units, images)
        )
    return PTQResult(
        model=quantized,
        unit_names=list(unit_names),
        unit_losses=unit_losses,
        groups=groups,
        capacities=capacities,
        fp_bytes=4 * sum(p.numel() for p in model.parameters()),
        packed_bytes=len(encode_quantized(quantized)),
        seconds=time.perf_counter() - start,
    )


def _images(calibration: torch.Tensor, size: int) -> torch.Tensor:
    if not isinstance(calibration, torch.Tensor):
        raise ValueError(f"`calibration` must be a tensor. Found `{type(calibration).__name__}`.")
    if calibration.dim() != 4 or tuple(calibration.shape[1:]) != _IMAGE_SHAPE:
        raise ValueError(
            f"`calibration` must have shape (N, 1, 28, 28). Found `{tuple(calibration.shape)}`."
        )
    if len(calibration) == 0 or not calibration.is_floating_point():
        raise ValueError("`calibration` must hold at least one image, as floats")
    images = calibration[:size].detach().to(torch.float32).contiguous()  # (N, 1, 28, 28)
    if not bool(torch.isfinite(images).all()):
        raise ValueError("`calibration` must be finite")
    return images


def _present(images: torch.Tensor | None) -> torch.Tensor:
    if images is None:  # quantize_model's checks make this unreachable
        raise ValueError("this step needs calibration images")
    return images


def _float_reference(model: nn.Module) -> nn.Module:
    reference = copy.deepcopy(model).eval()
    set_quantized(reference, [], None)  # DPQuant's layers all at full precision
    reference.requires_grad_(False)
    return reference


@torch.no_grad()
def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(x[i : i + _EVAL_BATCH]) for i in range(0, len(x), _EVAL_BATCH)])


def _ptq_layer(network: nn.Module, name: str) -> PTQLayer:
    layer = network.get_submodule(name)
    if not isinstance(layer, PTQLayer):
        raise TypeError(f"{name} is not a PTQLayer")  # a programming error
    return layer


@torch.no_grad()
def _calibrate_inputs(
    network: nn.Module, float_net: nn.Module, images: torch.Tensor, bits: dict[str, int]
) -> None:
    """Give each layer of ``network`` an input quantizer fitted to its float-model input."""

    def hook(name: str, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        _ptq_layer(network, name).input_quantizer = ActivationQuantizer.calibrated(
            args[0], bits=bits[name]
        )

    handles = [
        float_net.get_submodule(n).register_forward_pre_hook(functools.partial(hook, n))
        for n in bits
    ]
    try:
        float_net(images)  # one pass over all images: per-tensor ranges need all of them
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def _layer_io(net: nn.Module, name: str, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of layer ``name`` of ``net`` on ``images``, concatenated over batches."""
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        inputs.append(args[0])
        outputs.append(out)

    handle = net.get_submodule(name).register_forward_hook(hook)
    try:
        _batched(net, images)
    finally:
        handle.remove()
    return torch.cat(inputs), torch.cat(outputs)


def _adaround_layer(
    network: nn.Module,
    float_net: nn.Module,
    name: str,
    images: torch.Tensor,
    settings: PTQSettings,
    generator: torch.Generator,
) -> None:
    """AdaRound of one layer: its float output from its input in the quantized model."""
    quantized_inputs, _ = _layer_io(network, name, images)
    float_inputs, targets = _layer_io(float_net, name, images)
    layer = _ptq_layer(network, name)
    reconstruct(
        [layer],
        layer,
        inputs=quantized_inputs,
        float_inputs=float_inputs,
        targets=targets,
        iterations=settings.iterations,
        learn_activation_steps=False,
        keep_quantized=settings.qdrop,
        generator=generator,
    )


def _unit_boundaries(
    units: Sequence[Unit], net: nn.Module, images: torch.Tensor
) -> list[torch.Tensor]:
    """[images, output of unit 0, ..., output of the last unit] of ``net``."""
    boundaries = [images]
    for unit in units:
        boundaries.append(_batched(functools.partial(unit.forward, net), boundaries[-1]))
    return boundaries


def _capacities(
    kind: Capacity,
    units: Sequence[Unit],
    network: nn.Module,
    float_net: nn.Module,
    images: torch.Tensor,
) -> list[float]:
    """MRECG's capacity of each unit, from the RTN-quantized ``network``."""
    if kind is Capacity.DATA_FREE:
        return data_free_capacities(units, network)
    boundaries = _unit_boundaries(units, float_net, images)
    return [
        data_dependent_capacity(
            _batched(functools.partial(unit.forward, network), boundaries[i]), boundaries[i + 1]
        )
        for i, unit in enumerate(units)
    ]


def _reconstruct_groups(
    network: nn.Module,
    float_net: nn.Module,
    units: Sequence[Unit],
    groups: Sequence[Sequence[int]],
    images: torch.Tensor,
    settings: PTQSettings,
    learn_activation_steps: bool,
    generator: torch.Generator,
) -> None:
    """BRECQ over ``groups`` in depth order, each from its input in the quantized model."""
    float_boundaries = _unit_boundaries(units, float_net, images)
    quantized_inputs = images
    for group in groups:
        pieces = [units[i] for i in group]
        forward = functools.partial(run_units, pieces, network)
        reconstruct(
            [_ptq_layer(network, n) for unit in pieces for n in unit.layers],
            forward,
            inputs=quantized_inputs,
            float_inputs=float_boundaries[group[0]],
            targets=float_boundaries[group[-1] + 1],
            iterations=settings.iterations,
            learn_activation_steps=learn_activation_steps,
            keep_quantized=settings.qdrop,
            generator=generator,
        )
        quantized_inputs = _batched(forward, quantized_inputs)


@torch.no_grad()
def _unit_losses(
    network: nn.Module, float_net: nn.Module, units: Sequence[Unit], images: torch.Tensor
) -> list[float]:
    """Mean squared error of each unit's output, quantized chain vs float chain."""
    sums = [0.0] * len(units)
    counts = [0] * len(units)
    for i in range(0, len(images), _EVAL_BATCH):
        quantized = reference = images[i : i + _EVAL_BATCH]  # (B, 1, 28, 28)
        for j, unit in enumerate(units):
            quantized = unit.forward(network, quantized)
            reference = unit.forward(float_net, reference)
            sums[j] += float((quantized - reference).square().sum())
            counts[j] += reference.numel()
    return [s / c for s, c in zip(sums, counts, strict=True)]


@torch.no_grad()
def _layer_losses(
    network: nn.Module, float_net: nn.Module, names: Sequence[str], images: torch.Tensor
) -> list[float]:
    """Mean squared error of each layer's output, quantized model vs float model."""
    sums = dict.fromkeys(names, 0.0)
    counts = dict.fromkeys(names, 0)
    outputs: dict[tuple[int, str], torch.Tensor] = {}  # (0 quantized | 1 float, layer)

    def hook(key: tuple[int, str], module: nn.Module, args: object, out: torch.Tensor) -> None:
        outputs[key] = out

    handles = [
        net.get_submodule(n).register_forward_hook(functools.partial(hook, (k, n)))
        for k, net in enumerate((network, float_net))
        for n in names
    ]
    try:
        for i in range(0, len(images), _EVAL_BATCH):
            batch = images[i : i + _EVAL_BATCH]  # (B, 1, 28, 28)
            network(batch)
            float_net(batch)
            for n in names:
                sums[n] += float((outputs[(0, n)] - outputs[(1, n)]).square().sum())
                counts[n] += outputs[(1, n)].numel()
    finally:
        for handle in handles:
            handle.remove()
    return [sums[n] / counts[n] for n in names]
