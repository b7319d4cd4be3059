"""Tests for fedquant.models.

The CNN is unchanged by its Q-layers, the ResNet is a valid, deterministic,
Opacus-compatible model, and quantizing every layer moves each layer's output by no more
than the formats' rounding bounds allow.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from opacus.validators import ModuleValidator
from torch import nn

from fedquant.config import ModelName, QuantFormat
from fedquant.data import Split
from fedquant.fakequant import QConv2d, QLinear, quantizable_layers, set_quantized
from fedquant.models import build_model, evaluate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CNN_KEYS = [
    "conv1.weight",
    "conv1.bias",
    "conv2.weight",
    "conv2.bias",
    "fc1.weight",
    "fc1.bias",
    "fc2.weight",
    "fc2.bias",
]


class PlainCnn(nn.Module):
    """The CNN as it was before Q-layers (nn.Conv2d / nn.Linear): the oracle."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5, padding=2)
        self.conv2 = nn.Conv2d(16, 32, 5, padding=2)
        self.fc1 = nn.Linear(32 * 7 * 7, 64)
        self.fc2 = nn.Linear(64, 10)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_cnn_state_dict_keys_unchanged() -> None:
    assert list(build_model(ModelName.CNN, seed=0).state_dict()) == CNN_KEYS


def test_cnn_identical_to_plain_torch_cnn() -> None:
    model = build_model(ModelName.CNN, seed=3)
    torch.manual_seed(3)
    plain = PlainCnn()  # same seed, same initialization order
    ours, theirs = model.state_dict(), plain.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    x = _images(4, 0)
    assert torch.equal(model(x), plain(x))


@pytest.mark.parametrize("name", list(ModelName))
def test_forward_shape(name: ModelName) -> None:
    assert build_model(name, seed=0)(_images(5, 1)).shape == (5, 10)


@pytest.mark.parametrize("name", list(ModelName))
def test_same_seed_same_weights(name: ModelName) -> None:
    a, b, c = (build_model(name, seed=s) for s in (7, 7, 8))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_build_model_leaves_global_rng_alone() -> None:
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    build_model(ModelName.RESNET, seed=0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", list(ModelName))
def test_no_batchnorm_and_opacus_valid(name: ModelName) -> None:
    model = build_model(name, seed=0)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert ModuleValidator.validate(model, strict=False) == []
    ModuleValidator.validate(model, strict=True)  # raises on any error


def test_validator_would_catch_batchnorm() -> None:
    """Control: the validator check above is able to fail."""
    assert ModuleValidator.validate(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))) != []


@pytest.mark.parametrize(
    ("name", "layers", "convs", "params"),
    [(ModelName.CNN, 4, 2, 114_314), (ModelName.RESNET, 10, 9, 77_754)],
)
def test_quantizable_layers_and_size(name: ModelName, layers: int, convs: int, params: int) -> None:
    model = build_model(name, seed=0)
    found = quantizable_layers(model)
    assert len(found) == layers
    assert sum(isinstance(m, QConv2d) for _, m in found) == convs
    assert sum(isinstance(m, QLinear) for _, m in found) == layers - convs
    assert sum(p.numel() for p in model.parameters()) == params
    # every conv and linear layer is quantizable: none left as plain nn layers
    plain = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert len(plain) == layers


def test_evaluate_matches_one_pass_over_all_examples() -> None:
    """Batches of 4 over 10 examples (the last one short) give the one-pass loss/accuracy."""
    model = build_model(ModelName.CNN, seed=1)
    images = _images(10, 3)
    labels = torch.arange(10) % 10
    with torch.no_grad():
        logits = model(images)
    loss, accuracy = evaluate(model, Split(images, labels), batch_size=4)
    assert loss == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)
    assert accuracy == int((logits.argmax(1) == labels).sum()) / 10


def test_resnet_shortcuts_project_only_when_shape_changes() -> None:
    model = build_model(ModelName.RESNET, seed=0)
    assert isinstance(model.layer1.shortcut, nn.Identity)
    assert isinstance(model.layer2.shortcut[0], QConv2d)
    assert model.layer3.shortcut[0].stride == (2, 2)


@pytest.mark.parametrize("name", list(ModelName))
@pytest.mark.parametrize("fmt", list(QuantFormat))
def test_quantizing_all_layers_changes_but_keeps_outputs_close(
    name: ModelName, fmt: QuantFormat
) -> None:
    """Each quantized layer's output, on the input it gets, within the rounding bound.

    With W_q = W + E_w and x_q = x + E_x, a layer computes W_q x_q = W x + E_w x_q + W E_x,
    so per output element |W_q x_q − W x| ≤ op(|x| + e_x, e_w) + op(e_x, |W|), op the
    layer's linear map (linear or convolution) and e the formats' per-element bounds
    (:func:`_rounding_bound`). Checked for every layer at once, each on the (already
    perturbed) input it receives when all layers are quantized; the bound is rigorous,
    so the only tolerance is float32 rounding of the layer's own output.
    """
    model = build_model(name, seed=0)
    x = _images(4, 2)
    layers = quantizable_layers(model)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        layer.register_forward_hook(
            lambda _m, inputs, out, key=key: seen.__setitem__(key, (inputs[0], out))
        )
        for key, layer in layers
    ]
    with torch.no_grad():
        full = model(x)
        set_quantized(model, range(len(layers)), fmt)
        seen.clear()
        quant = model(x)
        set_quantized(model, [], None)
        for hook in hooks:
            hook.remove()
        back = model(x)
    assert torch.equal(back, full)
    assert not torch.equal(quant, full)
    assert torch.isfinite(quant).all()
    rel = float((quant - full).norm() / full.norm())
    if fmt is QuantFormat.INT8:  # per-tensor error ~1% of the norm, compounded over layers
        assert rel < 0.05
    assert set(seen) == {key for key, _ in layers}
    for key, layer in layers:
        inputs, out = seen[key]
        error, bound, slack = _layer_error_and_bound(layer, inputs, out, fmt)
        assert bool((error <= bound + slack).all()), key
        assert float((error / bound).max()) > 0.01, key  # the bound is not vacuous


_INT_LEVELS = {QuantFormat.INT8: 127, QuantFormat.INT4: 7}


def _rounding_bound(v: torch.Tensor, fmt: QuantFormat, scale: torch.Tensor) -> torch.Tensor:
    """Per element, |q(v) − v| at most, for |v| ≤ α = ``scale`` (no saturation).

    INT8/INT4: Δ/2 = α / (2 · 127) or α / (2 · 7) (round to nearest on the grid Δ·k).
    FP4: log2-nearest rounding keeps q/v in [2^-1/2, 2^1/2], so |q − v| ≤ (√2 − 1)|v|,
    except at the bottom: flushed values (|v| < α2^-7) err by |v| < α2^-7, and values
    rounded up to α2^-6 by less than α2^-7; hence (√2 − 1)|v| + α2^-7.
    """
    if fmt in _INT_LEVELS:
        return (scale / (2 * _INT_LEVELS[fmt])).expand_as(v)
    return (math.sqrt(2) - 1) * v.abs() + scale * 2.0**-7


def _layer_map(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's linear map (no bias) applied to ``x`` with ``weight``."""
    if isinstance(layer, QLinear):
        return F.linear(x, weight)
    assert isinstance(layer, QConv2d) and layer.padding_mode == "zeros"
    return F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)


def _layer_error_and_bound(
    layer: nn.Module, inputs: torch.Tensor, out: torch.Tensor, fmt: QuantFormat
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """|quantized output − float output| on the same input, its bound, float32 slack.

    Scales as the layers choose them: per sample α_b = max|x_b| for the input (the
    default ``ActScale.PER_SAMPLE``), α = max|W| for the weight. Computed in float64.
    """
    x, weight = inputs.double(), layer.weight.detach().double()
    y = _layer_map(layer, x, weight)
    if layer.bias is not None:
        bias = layer.bias.detach().double()
        y = y + (bias if isinstance(layer, QLinear) else bias.view(-1, 1, 1))
    alpha_x = x.abs().amax(dim=tuple(range(1, x.ndim)), keepdim=True)  # (B, 1, ...)
    e_x = _rounding_bound(x, fmt, alpha_x)
    e_w = _rounding_bound(weight, fmt, weight.abs().max())
    bound = _layer_map(layer, x.abs() + e_x, e_w) + _layer_map(layer, e_x, weight.abs())
    # ``out`` is float32: its sums of products carry relative rounding error ≲ 1e-5.
    slack = 1e-5 * _layer_map(layer, x.abs() + e_x, weight.abs() + e_w)
    return (out.double() - y).abs(), bound, slack
