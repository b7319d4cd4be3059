"""Fake-quantized Linear and Conv2d layers that Opacus trains with exact per-sample gradients.

DPQuant (Gao et al., arXiv 2509.03472, Sec. 3) runs a rotating subset of a model's layers in
low precision during DP-SGD. Here a layer "runs in low precision" by fake quantization: its
weight and its input activation are rounded to a low-precision grid in the forward pass and
the matmul/convolution is done in float on the rounded values; the backward pass uses the
straight-through estimator (STE, Bengio et al. 2013), i.e. the rounding is treated as the
identity.

Per-sample gradients (Opacus, hooks path). With the STE, a quantized layer computes
``y = W_q x_q + b`` with ``x_q = q(x)`` and ``W_q = q(W)``, and
``dL/dW = dL/dW_q = g^T x_q``: the ordinary per-sample formula evaluated on the *quantized*
input. The grad samplers registered at the bottom of this module recompute ``x_q`` from the
activation Opacus captured (the layer's unquantized input), with the format and scale the
layer has at backward time. Two consequences:

* The activation scale must not couple samples: ``ActScale.PER_SAMPLE`` takes each
  sample's own max, ``ActScale.FIXED`` a constant. A per-batch max would make sample b's
  gradient depend on the other samples and break DP-SGD's per-sample clipping.
* Do not change a layer's ``quant_format`` between a forward pass and its backward pass
  (switching between steps or epochs is fine: the attributes are read at every call).

Without the registered samplers, Opacus would treat the subclasses as unknown layers and
fall back to functorch (slower; it also deep-copies the layer when wrapping, so later
changes of the format would not reach the per-sample gradients).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

# isort: off
import fedquant._opacus  # noqa: F401  (before Opacus: drops its root log handler)

# isort: on
from opacus.grad_sample import register_grad_sampler
from opacus.utils.tensor_utils import unfold2d
from torch import nn

from fedquant.config import ActScale, QuantFormat

__all__ = [
    "DEFAULT_ACT_CLIP",
    "ActScale",
    "QConv2d",
    "QLinear",
    "QuantFormat",
    "fake_quantize",
    "quantizable_layers",
    "quantize_values",
    "quantized_indices",
    "set_quantized",
]


DEFAULT_ACT_CLIP = 8.0

_INT_LEVELS = {QuantFormat.INT8: 127, QuantFormat.INT4: 7}
_FP4_MIN_EXP = -6  # smallest nonzero magnitude α · 2^-6
_SQRT2_CARRY = 0x800000 - 0x3504F4  # float32 bit arithmetic of the FP4 rounding
_EXPONENT_MASK = 0x7F800000


def quantize_values(x: torch.Tensor, *, fmt: QuantFormat, scale: torch.Tensor) -> torch.Tensor:
    """Round ``x`` onto the grid of ``fmt`` with scale α = ``scale`` (see ``QuantFormat``).

    Pure function without straight-through gradient (its gradient is zero almost
    everywhere). ``scale`` broadcasts against ``x``; where it is 0 the output is 0 (no NaN).
    """
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    positive = scale > 0
    safe_scale = torch.where(positive, scale, torch.ones_like(scale))
    # In-place after the first op: this runs on the activations of every quantized layer
    # at every step, where each fresh tensor is a large allocation.
    if fmt in _INT_LEVELS:
        levels = _INT_LEVELS[fmt]
        step = safe_scale / levels
        out: torch.Tensor = torch.div(x, step).round_().clamp_(-levels, levels).mul_(step)
        out = out.masked_fill_(positive.logical_not(), 0.0)
    elif fmt is QuantFormat.FP4:
        # Nearest power of two in log2, on the float32 bits: r = 2^E · 1.m rounds up to
        # 2^(E+1) iff 1.m >= √2, i.e. iff the 23 mantissa bits are >= 0x3504F4 (the first
        # float above √2); adding 0x800000 - 0x3504F4 carries exactly then, and the mask
        # keeps the exponent. Exact where a float log2 may round either way at the
        # boundary, and ~3x faster than log2/exp2.
        ratio = torch.div(x, safe_scale).abs_().clamp_max_(1.0).to(torch.float32)
        keep = (ratio >= 2.0 ** (_FP4_MIN_EXP - 1)).logical_and_(positive)  # else flush to 0
        ratio.view(torch.int32).add_(_SQRT2_CARRY).bitwise_and_(_EXPONENT_MASK)
        nearest = ratio.clamp_min_(2.0**_FP4_MIN_EXP).to(x.dtype)
        out = nearest.mul_(safe_scale).copysign_(x).masked_fill_(keep.logical_not_(), 0.0)
    else:
        raise ValueError(f"`fmt` must be a QuantFormat. Found {fmt!r}.")
    return out


def fake_quantize(x: torch.Tensor, *, fmt: QuantFormat, scale: torch.Tensor) -> torch.Tensor:
    """``quantize_values(x)`` in the forward pass, identity gradient (straight-through).

    Written as ``q(x).detach() + (x - x.detach())``: the same gradient as the usual
    ``x + (q(x) - x).detach()``, but the forward value equals q(x) bit for bit (x - x is
    exactly 0), so it matches what the grad samplers recompute. Plain tensor ops, so it
    also works under functorch's ``vmap``/``grad``.
    """
    q = quantize_values(x.detach(), fmt=fmt, scale=torch.as_tensor(scale).detach())
    return q + (x - x.detach())


def _weight_scale(weight: torch.Tensor) -> torch.Tensor:
    """Per-tensor scale α = max |W| (recomputed each call: no buffer, no lazy state)."""
    return weight.detach().abs().amax()


def _activation_scale(x: torch.Tensor, act_scale: ActScale, act_clip: float) -> torch.Tensor:
    """α for the input ``x`` (batch first), shaped to broadcast against ``x``."""
    if act_scale is ActScale.PER_SAMPLE:
        if x.dim() < 2:
            raise ValueError(f"per-sample scaling needs a batch dimension; got shape {x.shape}")
        # max |x_b| in one pass, without materialising |x|
        dims = tuple(range(1, x.dim()))
        scale: torch.Tensor = torch.linalg.vector_norm(
            x.detach(), ord=math.inf, dim=dims, keepdim=True
        )
        return scale
    if act_scale is ActScale.FIXED:
        return torch.tensor(act_clip, dtype=x.dtype, device=x.device)
    raise ValueError(f"`act_scale` must be an ActScale. Found {act_scale!r}.")


def _check_quant_args(
    quant_format: QuantFormat | None, act_scale: ActScale, act_clip: float
) -> None:
    if quant_format is not None and not isinstance(quant_format, QuantFormat):
        raise ValueError(f"`quant_format` must be a QuantFormat or None. Found {quant_format!r}.")
    if not isinstance(act_scale, ActScale):
        raise ValueError(f"`act_scale` must be an ActScale. Found {act_scale!r}.")
    if not act_clip > 0:
        raise ValueError(f"`act_clip` must be positive. Found {act_clip!r}.")


class _StraightThrough(torch.autograd.Function):
    """q(x) forward, identity gradient to x.

    ``fake_quantize``'s straight-through estimator without its two extra passes over the
    activation (x - x.detach(), then the sum).
    """

    @staticmethod
    def forward(x: torch.Tensor, x_q: torch.Tensor) -> torch.Tensor:
        return x_q.view_as(x_q)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _has_storage(x: torch.Tensor) -> bool:
    """False for functorch's wrapped tensors (vmap/grad), which have no data pointer."""
    return not torch._C._functorch.is_functorch_wrapped_tensor(x)


class _QuantMixin:
    """Shared state of QLinear and QConv2d: three plain attributes, read at every call."""

    quant_format: QuantFormat | None
    act_scale: ActScale
    act_clip: float
    # (key of the input, q(input), the input): see quantized_input.
    _input_cache: tuple[tuple[object, ...], torch.Tensor, torch.Tensor] | None

    def _init_quant(
        self, quant_format: QuantFormat | None, act_scale: ActScale, act_clip: float
    ) -> None:
        _check_quant_args(quant_format, act_scale, act_clip)
        self.quant_format = quant_format
        self.act_scale = act_scale
        self.act_clip = act_clip
        self._input_cache: tuple[tuple[object, ...], torch.Tensor, torch.Tensor] | None = None

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """q(x) without STE, with the layer's current format and scale (grad samplers).

        The q(x) of this layer's last training forward pass is reused when ``x`` is that
        pass's input (same storage, view and version, and the same format and scale
        settings): the grad sampler then does not quantize the activations a second time.
        """
        if self.quant_format is None:
            raise RuntimeError("quantized_input needs quant_format to be set")
        cached, self._input_cache = self._input_cache, None
        if cached is not None and _has_storage(x) and cached[0] == self._cache_key(x):
            return cached[1]
        return quantize_values(
            x, fmt=self.quant_format, scale=_activation_scale(x, self.act_scale, self.act_clip)
        )

    def _cache_key(self, x: torch.Tensor) -> tuple[object, ...]:
        # The cache holds the input itself, so its storage cannot be freed and reused:
        # an equal data pointer means the same memory. The version counter (shared by
        # detached views) catches in-place writes since the forward pass.
        return (
            x.data_ptr(),
            x.shape,
            x.stride(),
            x.dtype,
            x._version,
            self.quant_format,
            self.act_scale,
            self.act_clip,
        )

    def _fake_quantize_input_and_weight(
        self, x: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.quant_format is not None
        x_q = quantize_values(
            x.detach(),
            fmt=self.quant_format,
            scale=_activation_scale(x, self.act_scale, self.act_clip),
        )
        if torch.is_grad_enabled() and _has_storage(x):
            self._input_cache = (self._cache_key(x), x_q, x.detach())
        w_q = fake_quantize(weight, fmt=self.quant_format, scale=_weight_scale(weight))
        if _has_storage(x):
            x_ste: torch.Tensor = _StraightThrough.apply(x, x_q)  # type: ignore[no-untyped-call]
            return x_ste, w_q
        return x_q + (x - x.detach()), w_q  # under functorch: as in fake_quantize

    def extra_repr(self) -> str:
        fmt = None if self.quant_format is None else self.quant_format.value
        extra = f", quant_format={fmt}, act_scale={self.act_scale.value}"
        if self.act_scale is ActScale.FIXED:
            extra += f", act_clip={self.act_clip}"
        base: str = super().extra_repr()  # type: ignore[misc]
        return base + extra


class QLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` with its weight and input fake-quantized to ``quant_format``.

    The weight uses a per-tensor scale, the input ``act_scale``; with
    ``quant_format=None`` it is exactly nn.Linear.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        quant_format: QuantFormat | None = None,
        act_scale: ActScale = ActScale.PER_SAMPLE,
        act_clip: float = DEFAULT_ACT_CLIP,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_quant(quant_format, act_scale, act_clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on q(x) with q(W), or the float layer when no format is set."""
        if self.quant_format is None:
            return F.linear(x, self.weight, self.bias)
        x_q, w_q = self._fake_quantize_input_and_weight(x, self.weight)
        return F.linear(x_q, w_q, self.bias)


class QConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with its weight and input fake-quantized to ``quant_format``.

    The weight uses a per-tensor scale, the input ``act_scale``; with
    ``quant_format=None`` it is exactly nn.Conv2d.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: Literal["zeros", "reflect", "replicate", "circular"] = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        quant_format: QuantFormat | None = None,
        act_scale: ActScale = ActScale.PER_SAMPLE,
        act_clip: float = DEFAULT_ACT_CLIP,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device,
            dtype,
        )
        self._init_quant(quant_format, act_scale, act_clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on q(x) with q(W), or the float layer when no format is set."""
        if self.quant_format is None:
            out: torch.Tensor = self._conv_forward(x, self.weight, self.bias)
            return out
        x_q, w_q = self._fake_quantize_input_and_weight(x, self.weight)
        out = self._conv_forward(x_q, w_q, self.bias)
        return out


def quantizable_layers(model: nn.Module) -> list[tuple[str, QLinear | QConv2d]]:
    """All QLinear/QConv2d layers of ``model`` with their names, in ``named_modules`` order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QLinear | QConv2d)]


def set_quantized(model: nn.Module, indices: Iterable[int], fmt: QuantFormat | None) -> None:
    """Give the quantizable layers at ``indices`` the format ``fmt``; all others get None.

    Indices refer to ``quantizable_layers(model)``. Works on a model already wrapped by
    Opacus (``GradSampleModule`` wraps in place, so the original model may be passed too).
    """
    if fmt is not None and not isinstance(fmt, QuantFormat):
        raise ValueError(f"`fmt` must be a QuantFormat or None. Found {fmt!r}.")
    layers = quantizable_layers(model)
    chosen = set()
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int | np.integer):
            raise ValueError(f"`indices` must hold integers. Found {i!r}.")
        if not 0 <= i < len(layers):
            raise ValueError(f"`indices` must lie in [0, {len(layers)}). Found {i}.")
        chosen.add(int(i))
    for i, (_, layer) in enumerate(layers):
        layer.quant_format = fmt if i in chosen else None


def quantized_indices(model: nn.Module) -> list[int]:
    """Indices (into ``quantizable_layers``) of the layers whose ``quant_format`` is set."""
    return [i for i, (_, m) in enumerate(quantizable_layers(model)) if m.quant_format is not None]


# --- Opacus grad samplers (hooks path) ------------------------------------------------------
# Same formulas as opacus/grad_sample/linear.py and conv.py, evaluated on q(x) when the layer
# is quantized. Opacus's conv sampler only unfolds when ``type(layer) is nn.Conv2d``, hence
# the copy for QConv2d.


@register_grad_sampler(QLinear)  # type: ignore[untyped-decorator]
def compute_qlinear_grad_sample(
    layer: QLinear, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.Tensor, torch.Tensor]:
    """Per-sample gradients of a QLinear: ``g_b ⊗ q(x_b)`` for W, ``Σ g_b`` for b."""
    x = activations[0].to(backprops.dtype)
    if layer.quant_format is not None and x.shape[0] > 0:
        x = layer.quantized_input(x)
    ret: dict[torch.Tensor, torch.Tensor] = {}
    if layer.weight.requires_grad:
        ret[layer.weight] = torch.einsum("n...i,n...j->nij", backprops, x)  # (B, out, in)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = torch.einsum("n...k->nk", backprops)  # (B, out)
    return ret


@register_grad_sampler(QConv2d)  # type: ignore[untyped-decorator]
def compute_qconv2d_grad_sample(
    layer: QConv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.Tensor, torch.Tensor]:
    """Per-sample gradients of a QConv2d via unfold (im2col) on q(x), as Opacus does."""
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    ret: dict[torch.Tensor, torch.Tensor] = {}
    if n == 0:  # empty batch (Poisson sampling): zero gradients, like Opacus
        if layer.weight.requires_grad:
            ret[layer.weight] = torch.zeros_like(layer.weight).unsqueeze(0)
        if layer.bias is not None and layer.bias.requires_grad:
            ret[layer.bias] = torch.zeros_like(layer.bias).unsqueeze(0)
        return ret
    if layer.quant_format is not None:
        x = layer.quantized_input(x)
    padding = layer.padding
    if layer.padding_mode != "zeros":  # mirror nn.Conv2d._conv_forward
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = (0, 0)
    cols = unfold2d(
        x,
        kernel_size=layer.kernel_size,
        padding=padding,
        stride=layer.stride,
        dilation=layer.dilation,
    )  # (B, C_in * kH * kW, L)
    backprops = backprops.reshape(n, -1, cols.shape[-1])  # (B, C_out, L)
    if layer.weight.requires_grad:
        grad_sample = torch.einsum("noq,npq->nop", backprops, cols)  # (B, C_out, C_in*kH*kW)
        grad_sample = grad_sample.view(
            n,
            layer.groups,
            -1,
            layer.groups,
            layer.in_channels // layer.groups,
            int(np.prod(layer.kernel_size)),
        )
        grad_sample = torch.einsum("ngrg...->ngr...", grad_sample).contiguous()
        ret[layer.weight] = grad_sample.view(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.sum(dim=2)  # (B, C_out)
    return ret
