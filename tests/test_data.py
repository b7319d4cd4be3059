"""The embedded MNIST loader and the federated partitions."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest

from fedquant.data import (
    DataFileError,
    Partitioning,
    _NumpyOnlyUnpickler,
    load_mnist,
    partition_indices,
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
