"""The embedded MNIST loader and the federated partitions."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fedquant.data import (
    MNIST_CODES_SHA256,
    MNIST_MEAN,
    MNIST_STD,
    DataFileError,
    Mnist,
    Partitioning,
    _NumpyOnlyUnpickler,
    _sha256,
    default_cache_dir,
    default_mnist_path,
    load_codes,
    load_mnist,
    load_partition,
    partition_indices,
    partition_of,
)


def test_full_mnist_loads_with_expected_splits() -> None:
    mnist = load_mnist()
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (50_000, 10_000, 10_000)
    assert tuple(mnist.train.images.shape[1:]) == (1, 28, 28)
    counts = np.bincount(mnist.test.labels.numpy(), minlength=10)
    assert counts.min() > 800 and counts.sum() == 10_000  # every digit present


def test_altered_file_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "mnist.pkl.gz"
    with gzip.open(fake, "wb") as f:
        pickle.dump((np.zeros((1, 784)), np.zeros(1)), f)
    with pytest.raises(DataFileError, match="SHA-256"):
        load_mnist.__wrapped__(str(fake))


def test_unpickler_refuses_other_globals() -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    import io

    with pytest.raises(DataFileError, match="builtins.print"):
        _NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()


LABELS = tuple(int(x) for x in np.random.default_rng(1).integers(0, 10, 3000))


@pytest.mark.parametrize("partitioning", list(Partitioning))
def test_partitions_are_disjoint_complete_and_reproducible(partitioning: Partitioning) -> None:
    args = dict(num_partitions=7, partitioning=partitioning, alpha=0.5, seed=3)
    parts = partition_indices(LABELS, **args)
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(len(LABELS)))  # disjoint and complete
    again = partition_indices.__wrapped__(LABELS, **args)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_indices.__wrapped__(LABELS, **{**args, "seed": 4})
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_dirichlet_is_skewed_and_iid_is_not() -> None:
    labels = np.asarray(LABELS)

    def max_class_share(partitioning: Partitioning, alpha: float) -> float:
        parts = partition_indices(
            LABELS, num_partitions=5, partitioning=partitioning, alpha=alpha, seed=0
        )
        return float(np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]))

    # IID: each class near 1/10 of a client's data; Dirichlet(0.1): one class dominates.
    assert max_class_share(Partitioning.IID, 0.5) < 0.15
    assert max_class_share(Partitioning.DIRICHLET, 0.1) > 0.4


# Lazy partitions over the shared uint8 codes.


def _eager_train_images() -> torch.Tensor:
    """Oracle: the file's float32 training pixels normalized in one go, as before."""
    with gzip.open(default_mnist_path(), "rb") as f:
        (images, _), _, _ = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    x = torch.from_numpy(np.array(images, dtype=np.float32))
    return ((x - MNIST_MEAN) / MNIST_STD).reshape(-1, 1, 28, 28)


@pytest.mark.parametrize(
    ("partitioning", "n"), [(Partitioning.IID, 1000), (Partitioning.DIRICHLET, 50)]
)
def test_lazy_partition_equals_eager_normalized_subset_exactly(
    partitioning: Partitioning, n: int
) -> None:
    eager = _eager_train_images()
    labels = load_mnist().codes.train.labels
    args = dict(num_partitions=n, partitioning=partitioning, alpha=0.5, seed=2)
    for pid in (0, n // 2 + 1, n - 1):
        part = load_partition(pid, **args)
        idx = partition_indices(**args)[pid]
        assert np.array_equal(partition_of(pid, **args), idx)
        assert part.images.dtype == torch.float32 and part.labels.dtype == torch.int64
        assert tuple(part.images.shape) == (len(idx), 1, 28, 28)
        assert torch.equal(part.images, eager[torch.as_tensor(idx)])  # bit for bit
        assert np.array_equal(part.labels.numpy(), labels[idx])


def test_codes_are_shared_read_only_uint8_and_splits_normalize_on_demand() -> None:
    codes = load_codes()
    assert [len(s) for s in (codes.train, codes.val, codes.test)] == [50_000, 10_000, 10_000]
    for split in (codes.train, codes.val, codes.test):
        assert split.codes.dtype == np.uint8 and split.codes.shape[1:] == (784,)
        assert not split.codes.flags.writeable and not split.labels.flags.writeable
    # Memory-mapped from the cache file, not a private copy.
    cache_file = default_cache_dir() / f"mnist-codes-{MNIST_CODES_SHA256[:16]}.u8"
    assert str(cache_file) in Path("/proc/self/maps").read_text()
    # A fresh Mnist holds no float32 split until one is asked for.
    mnist = Mnist(codes)
    assert "train" not in vars(mnist) and "test" not in vars(mnist)
    assert torch.equal(mnist.test.images, codes.test.normalized().images)
    assert "test" in vars(mnist) and "train" not in vars(mnist)
    # A partition is a private copy: nothing a client does reaches the shared codes.
    part = codes.train.normalized(np.arange(5))
    part.images.zero_()
    assert codes.train.codes[:5].any()


def test_bad_cache_is_rebuilt_and_unwritable_cache_falls_back(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    built = load_codes.__wrapped__(None, str(cache))
    expected = np.array(built.test.codes)  # a copy: ``built`` maps the file we alter next
    (cache_file,) = cache.iterdir()
    assert _sha256(cache_file) == MNIST_CODES_SHA256
    cache_file.write_bytes(b"\0" * cache_file.stat().st_size)  # altered: same size, wrong bytes
    rebuilt = load_codes.__wrapped__(None, str(cache))
    assert _sha256(cache_file) == MNIST_CODES_SHA256
    assert np.array_equal(rebuilt.test.codes, expected)
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    in_memory = load_codes.__wrapped__(None, str(blocked / "cache"))
    assert np.array_equal(in_memory.test.codes, expected)


def test_partition_id_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="partition-id"):
        partition_of(10, num_partitions=10, partitioning=Partitioning.IID, alpha=0.5, seed=0)
