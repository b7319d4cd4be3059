"""Models, and the train and evaluate loops shared by clients and server.

Models avoid BatchNorm so that they stay valid under Opacus (per-sample gradients
need no cross-sample statistics); where a normalization is wanted, GroupNorm is used.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator

import torch
from torch import nn

from fedquant.data import Split


class ModelName(enum.Enum):
    CNN = "cnn"


class MnistCnn(nn.Module):
    """Small CNN in the spirit of Bozorgasl & Chen (2024)'s MNIST model.

    conv5x5(1→16) → ReLU → maxpool2 → conv5x5(16→32) → ReLU → maxpool2 → fc(1568→64)
    → ReLU → fc(64→10): 114k parameters, most of them in fc1.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5, padding=2)
        self.conv2 = nn.Conv2d(16, 32, 5, padding=2)
        self.fc1 = nn.Linear(32 * 7 * 7, 64)
        self.fc2 = nn.Linear(64, 10)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))  # (B, 16, 14, 14)
        x = self.pool(torch.relu(self.conv2(x)))  # (B, 32, 7, 7)
        x = torch.relu(self.fc1(x.flatten(1)))  # (B, 64)
        return self.fc2(x)  # (B, 10)


def build_model(name: ModelName, *, seed: int) -> nn.Module:
    """A freshly initialized model; the same seed gives the same weights."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if name is ModelName.CNN:
            return MnistCnn()
        raise ValueError(f"unknown model {name!r}")
    finally:
        torch.random.set_rng_state(generator_state)


def batches(
    data: Split, *, batch_size: int, generator: torch.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches in a seeded random order (or in order when no generator)."""
    n = len(data)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield data.images[idx], data.labels[idx]


def train_epochs(
    model: nn.Module,
    data: Split,
    *,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    max_steps: int = 0,
) -> float:
    """Run ``epochs`` passes of ``optimizer`` over ``data``; return the mean loss.

    ``max_steps > 0`` stops after that many optimizer steps (local-steps in FL).

    The optimizer is built by the caller so that a DP optimizer (Opacus) can take
    the place of plain SGD without changing this loop.
    """
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    total, count, steps = 0.0, 0, 0
    for _ in range(epochs):
        for images, labels in batches(data, batch_size=batch_size, generator=generator):
            if max_steps and steps >= max_steps:
                return total / max(count, 1)
            steps += 1
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(images), labels)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(labels)
            count += len(labels)
    return total / max(count, 1)


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, *, batch_size: int = 1000) -> tuple[float, float]:
    """Return (mean cross-entropy loss, accuracy) of ``model`` on ``data``."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for images, labels in batches(data, batch_size=batch_size):
        logits = model(images)
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(1) == labels).sum())
    n = max(len(data), 1)
    return loss_sum / n, correct / n
