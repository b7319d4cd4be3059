"""The layers and the model that post-training quantization produces.

:class:`PTQLayer` replaces a trained convolution or linear layer: integer weight codes
per output channel (step, zero point; :mod:`fedquant.ptq.quantizers`), a float32 bias,
and optionally an :class:`~fedquant.ptq.quantizers.ActivationQuantizer` on its input.
Its forward pass simulates integer inference in float: the input is fake-quantized, the
weight is the dequantized codes, and the convolution or matmul runs in float32.

It is deliberately *not* a subclass of ``nn.Conv2d``/``nn.Linear`` and shares nothing
with ``fedquant.fakequant.QConv2d``/``QLinear`` (DPQuant's training-time fake
quantization, switched per epoch and differentiated by Opacus): a PTQLayer is the end
product of quantizing a *trained* model, with fixed codes, and nothing that walks a
model looking for ``nn.Conv2d`` (Opacus, ``fakequant.quantizable_layers``) will take it
for a trainable layer.

:class:`PTQModel` wraps the converted network (the original model class with its
conv/linear layers swapped for PTQLayers) and the model's name, so that
:func:`fedquant.ptq.export.load_quantized` can rebuild it.

Caveat: the bias stays float32 (integer kernels keep it as int32 at step s_w · s_a,
whose rounding error is negligible next to the weights'); GroupNorm and the residual
additions run in float, as in BRECQ's and QDrop's simulated quantization.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fedquant.config import ModelName
from fedquant.ptq.adaround import AdaRoundWeight
from fedquant.ptq.quantizers import (
    ActivationQuantizer,
    dequantize_affine,
    max_code,
    mse_weight_params,
    quantize_affine,
)

__all__ = ["PTQLayer", "PTQModel", "conv_geometry", "ptq_layers", "to_ptq_network"]


def conv_geometry(layer: nn.Conv2d | nn.Linear) -> dict[str, tuple[int, ...]] | None:
    """stride, padding, dilation and groups of a conv layer (None for a linear one)."""
    if not isinstance(layer, nn.Conv2d):
        return None
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        raise ValueError(f"only zero padding given as integers is supported: {layer}")
    return {
        "stride": tuple(layer.stride),
        "padding": tuple(int(p) for p in layer.padding),
        "dilation": tuple(layer.dilation),
        "groups": (layer.groups,),
    }


class PTQLayer(nn.Module):
    """A quantized conv2d or linear layer: ``op(q_a(x), s · (codes - z)) + bias``.

    ``codes`` (uint8, the weight's shape), ``weight_scale`` and ``weight_zero_point``
    ((C_out,) float32, z integral) define the weight; ``input_quantizer`` (None: float
    input) the activation. While :attr:`adaround` is set (during reconstruction), the
    weight is its soft weight instead, and ``float_weight`` holds the trained weight.
    Build it with :meth:`from_float` (round-to-nearest on an MSE-chosen grid).
    """

    codes: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    float_weight: torch.Tensor | None

    def __init__(
        self,
        *,
        codes: torch.Tensor,
        weight_scale: torch.Tensor,
        weight_zero_point: torch.Tensor,
        weight_bits: int,
        bias: torch.Tensor | None,
        conv: Mapping[str, tuple[int, ...]] | None,
    ) -> None:
        super().__init__()
        max_code(weight_bits)
        if codes.dtype != torch.uint8 or codes.dim() not in (2, 4):
            raise ValueError(
                "`codes` must be uint8 with 2 or 4 dims (C_out, ...)."
                f" Found {codes.dtype} {tuple(codes.shape)}."
            )
        if (codes.dim() == 4) != (conv is not None):
            raise ValueError("4-dim codes need `conv` geometry, 2-dim codes none")
        channels = codes.shape[0]
        for name, value in (
            ("weight_scale", weight_scale),
            ("weight_zero_point", weight_zero_point),
        ):
            if value.shape != (channels,):
                raise ValueError(
                    f"`{name}` must have shape ({channels},). Found {tuple(value.shape)}."
                )
        self.weight_bits = weight_bits
        self.conv = dict(conv) if conv is not None else None
        self.register_buffer("codes", codes.clone())
        self.register_buffer("weight_scale", weight_scale.detach().to(torch.float32).clone())
        self.register_buffer(
            "weight_zero_point", weight_zero_point.detach().to(torch.float32).clone()
        )
        self.register_buffer(
            "bias", None if bias is None else bias.detach().to(torch.float32).clone()
        )
        self.register_buffer("weight", self._dequantized(), persistent=False)
        self.register_buffer("float_weight", None, persistent=False)
        self.input_quantizer: ActivationQuantizer | None = None
        self.adaround: AdaRoundWeight | None = None

    @classmethod
    def from_float(cls, layer: nn.Conv2d | nn.Linear, *, weight_bits: int) -> PTQLayer:
        """Round-to-nearest of ``layer``'s weight on the per-channel MSE grid; float input."""
        weight = layer.weight.detach().to(torch.float32)
        scale, zero_point = mse_weight_params(weight, bits=weight_bits)  # (C_out,)
        view = (-1,) + (1,) * (weight.dim() - 1)  # broadcast over (C_out, ...)
        codes = quantize_affine(weight, scale.view(view), zero_point.view(view), bits=weight_bits)
        bias = None if layer.bias is None else layer.bias.detach()
        out = cls(
            codes=codes,
            weight_scale=scale,
            weight_zero_point=zero_point,
            weight_bits=weight_bits,
            bias=bias,
            conv=conv_geometry(layer),
        )
        out.float_weight = weight.clone()
        return out

    def _grid_view(self) -> tuple[torch.Tensor, torch.Tensor]:
        view = (-1,) + (1,) * (self.codes.dim() - 1)  # (C_out, 1, ...)
        return self.weight_scale.view(view), self.weight_zero_point.view(view)

    def _dequantized(self) -> torch.Tensor:
        scale, zero_point = self._grid_view()
        return dequantize_affine(self.codes, scale, zero_point)

    def set_codes(self, codes: torch.Tensor) -> None:
        """Replace the weight codes (same shape, uint8) and the dequantized weight."""
        if codes.shape != self.codes.shape or codes.dtype != torch.uint8:
            raise ValueError(f"`codes` must be uint8 of shape {tuple(self.codes.shape)}")
        self.codes = codes.clone()
        self.weight = self._dequantized()

    def start_adaround(self) -> AdaRoundWeight:
        """Attach a learnable rounding of the float weight on this layer's grid and return it."""
        if self.float_weight is None:
            raise RuntimeError("the float weight is gone: this layer was frozen")
        scale, zero_point = self._grid_view()
        self.adaround = AdaRoundWeight(self.float_weight, scale, zero_point, bits=self.weight_bits)
        return self.adaround

    def finish_adaround(self) -> None:
        """Make the rounding hard (V >= 0 rounds up), store the codes, detach AdaRound."""
        if self.adaround is None:
            raise RuntimeError("no AdaRound in progress")
        self.set_codes(self.adaround.hard_codes())
        self.adaround = None

    def freeze(self) -> None:
        """Drop the float weight and any rounding state; activation steps stop learning."""
        self.adaround = None
        self.float_weight = None
        if self.input_quantizer is not None:
            self.input_quantizer.step.requires_grad_(False)

    def current_weight(self) -> torch.Tensor:
        """The weight the forward pass uses: AdaRound's soft weight, or the dequantized codes."""
        return self.weight if self.adaround is None else self.adaround.soft_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on the (fake-quantized) input, with the quantized weight."""
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        weight = self.current_weight()
        if self.conv is None:
            return F.linear(x, weight, self.bias)
        return F.conv2d(
            x,
            weight,
            self.bias,
            stride=self.conv["stride"],
            padding=self.conv["padding"],
            dilation=self.conv["dilation"],
            groups=self.conv["groups"][0],
        )

    def extra_repr(self) -> str:
        """Kind, weight shape and bits, for ``repr``."""
        kind = "linear" if self.conv is None else "conv2d"
        return f"{kind}, weight {tuple(self.codes.shape)} at {self.weight_bits} bits"


def to_ptq_network(model: nn.Module, *, weight_bits: Mapping[str, int]) -> nn.Module:
    """A deep copy of ``model`` with the named conv/linear layers replaced by RTN PTQLayers.

    ``weight_bits`` maps each layer's qualified name to its weight bits. The copy is in
    eval mode; ``model`` is untouched.
    """
    network = copy.deepcopy(model).eval()
    for name, bits in weight_bits.items():
        layer = network.get_submodule(name)
        if not isinstance(layer, nn.Conv2d | nn.Linear):
            raise ValueError(f"{name} is not a conv2d or linear layer: {type(layer).__name__}")
        network.set_submodule(name, PTQLayer.from_float(layer, weight_bits=bits))
    network.requires_grad_(False)
    return network


def ptq_layers(network: nn.Module) -> list[tuple[str, PTQLayer]]:
    """The PTQLayers of ``network``, in registration order, with their qualified names."""
    return [(name, m) for name, m in network.named_modules() if isinstance(m, PTQLayer)]


class PTQModel(nn.Module):
    """A post-training-quantized MnistCnn or MnistResNet: ``forward(images) -> logits``.

    ``network`` is the model's own class with its layers swapped for :class:`PTQLayer`;
    ``model_name`` says which class (for the export). Always in eval mode, no gradients.
    """

    def __init__(self, network: nn.Module, *, model_name: ModelName) -> None:
        super().__init__()
        self.network = network
        self.model_name = model_name
        self.eval()
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, 10) of images (B, 1, 28, 28)."""
        logits: torch.Tensor = self.network(images)
        return logits

    def extra_repr(self) -> str:
        """The model's name, for ``repr``."""
        return f"model_name={self.model_name.value}"
