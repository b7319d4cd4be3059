"""Models, and the evaluation loop of the server (local training: ``fedquant.training``).

Models avoid BatchNorm so that they stay valid under Opacus (per-sample gradients
need no cross-sample statistics); where a normalization is wanted, GroupNorm is used.
Their convolutions and linear layers are ``fedquant.fakequant`` Q-layers, full precision
unless ``fakequant.set_quantized`` selects them (DPQuant's per-epoch layer choice).
"""

from __future__ import annotations

import torch
from torch import nn

from fedquant.config import ModelName
from fedquant.data import Split
from fedquant.fakequant import QConv2d, QLinear


class MnistCnn(nn.Module):
    """Small CNN in the spirit of Bozorgasl & Chen (2024)'s MNIST model.

    conv5x5(1→16) → ReLU → maxpool2 → conv5x5(16→32) → ReLU → maxpool2 → fc(1568→64)
    → ReLU → fc(64→10): 114k parameters, most of them in fc1. Four quantizable layers
    (QConv2d/QLinear, full precision by default: then identical to nn.Conv2d/nn.Linear).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = QConv2d(1, 16, 5, padding=2)
        self.conv2 = QConv2d(16, 32, 5, padding=2)
        self.fc1 = QLinear(32 * 7 * 7, 64)
        self.fc2 = QLinear(64, 10)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, 10) of images (B, 1, 28, 28)."""
        x = self.pool(torch.relu(self.conv1(x)))  # (B, 16, 14, 14)
        x = self.pool(torch.relu(self.conv2(x)))  # (B, 32, 7, 7)
        x = torch.relu(self.fc1(x.flatten(1)))  # (B, 64)
        logits: torch.Tensor = self.fc2(x)  # (B, 10)
        return logits


RESNET_GROUPS = 8  # GroupNorm groups in every normalization layer of MnistResNet


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(RESNET_GROUPS, channels)


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016, Fig. 2) with GroupNorm in place of BatchNorm.

    out = relu(GN(conv3x3(relu(GN(conv3x3(x))))) + shortcut(x)); the shortcut is the
    identity, or conv1x1 + GN ("option B") when the stride or the width changes.
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int) -> None:
        super().__init__()
        self.conv1 = QConv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.gn1 = _group_norm(out_channels)
        self.conv2 = QConv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.gn2 = _group_norm(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                QConv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                _group_norm(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(GN(conv(relu(GN(conv(x))))) + shortcut(x)); no in-place ops."""
        # No in-place ReLU: Opacus's backward hooks reject in-place ops on hooked outputs.
        out = torch.relu(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class MnistResNet(nn.Module):
    """Small ResNet for 1×28×28 inputs, with GroupNorm in place of BatchNorm.

    He et al. 2016 ("Deep Residual Learning for Image Recognition") with GroupNorm (Wu &
    He, ECCV 2018) instead of BatchNorm, because BatchNorm mixes samples and Opacus
    cannot compute per-sample gradients through it.

    stem conv3x3(1→16) + GN + ReLU (B, 16, 28, 28) → block(16) (B, 16, 28, 28)
    → block(32, stride 2) (B, 32, 14, 14) → block(64, stride 2) (B, 64, 7, 7)
    → global average pool (B, 64) → fc(64→10). GroupNorm with 8 groups everywhere;
    convolutions have no bias (GN follows). 10 quantizable layers, 77,754 parameters.
    Initialization as torchvision's ResNet: Kaiming-normal (fan_out) convolutions,
    GN weight 1 and bias 0.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = QConv2d(1, 16, 3, padding=1, bias=False)
        self.stem_gn = _group_norm(16)
        self.layer1 = BasicBlock(16, 16, stride=1)
        self.layer2 = BasicBlock(16, 32, stride=2)
        self.layer3 = BasicBlock(32, 64, stride=2)
        self.fc = QLinear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, 10) of images (B, 1, 28, 28)."""
        x = torch.relu(self.stem_gn(self.stem(x)))  # (B, 16, 28, 28)
        x = self.layer1(x)  # (B, 16, 28, 28)
        x = self.layer2(x)  # (B, 32, 14, 14)
        x = self.layer3(x)  # (B, 64, 7, 7)
        x = x.mean(dim=(2, 3))  # (B, 64)
        logits: torch.Tensor = self.fc(x)  # (B, 10)
        return logits


def build_model(name: ModelName, *, seed: int) -> nn.Module:
    """A freshly initialized model; the same seed gives the same weights."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if name is ModelName.CNN:
            return MnistCnn()
        if name is ModelName.RESNET:
            return MnistResNet()
        raise ValueError(f"unknown model {name!r}")
    finally:
        torch.random.set_rng_state(generator_state)


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, *, batch_size: int = 1000) -> tuple[float, float]:
    """Return (mean cross-entropy loss, accuracy) of ``model`` on ``data``."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        images = data.images[start : start + batch_size]  # (B, 1, 28, 28)
        labels = data.labels[start : start + batch_size]  # (B,)
        logits = model(images)
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(1) == labels).sum())
    n = max(len(data), 1)
    return loss_sum / n, correct / n
