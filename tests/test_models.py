"""Tests for fedquant.models: the CNN is unchanged by its Q-layers, the ResNet is a valid,
deterministic, Opacus-compatible model."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from fedquant.fakequant import QConv2d, QLinear, QuantFormat, quantizable_layers, set_quantized
from fedquant.models import ModelName, build_model

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


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors: a second intra-op thread only adds spin-wait on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    model = build_model(name, seed=0)
    x = _images(4, 2)
    with torch.no_grad():
        full = model(x)
        set_quantized(model, range(len(quantizable_layers(model))), fmt)
        quant = model(x)
        set_quantized(model, [], None)
        back = model(x)
    assert torch.equal(back, full)
    assert not torch.equal(quant, full)
    assert torch.isfinite(quant).all()
    rel = float((quant - full).norm() / full.norm())
    # per-tensor error is ~1% (INT8) and ~20% (4-bit) of the norm; it compounds over layers
    assert rel < (0.05 if fmt is QuantFormat.INT8 else 1.0)
