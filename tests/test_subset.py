"""SPISubset (half-set views of a data file) and the random half split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bayes_spi.dataio.h5 import SPIDataset, write_simulation
from bayes_spi.dataio.subset import SPISubset, random_halves
from bayes_spi.geometry import get_preset


@pytest.fixture(scope="module")
def small_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    geom = get_preset("reference-32")
    n = 103
    counts = np.arange(n)[:, None, None] * np.ones((1, 32, 32))  # pattern i holds the value i everywhere
    rng = np.random.default_rng(0)
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    path = tmp_path_factory.mktemp("sub") / "d.h5"
    write_simulation(path, counts, geom, quaternions=q, scales=np.linspace(0.5, 1.5, n))
    return path


def test_random_halves_partition_and_reproducible() -> None:
    a, b = random_halves(11, seed=4)
    assert len(a) == 5 and len(b) == 6
    assert sorted(np.concatenate([a, b]).tolist()) == list(range(11))
    a2, b2 = random_halves(11, seed=4)
    assert np.array_equal(a, a2) and np.array_equal(b, b2)
    a3, _ = random_halves(11, seed=5)
    assert not np.array_equal(a, a3)
    with pytest.raises(ValueError, match="at least 2"):
        random_halves(1)


@pytest.mark.parametrize("shuffle", [False, True])
def test_subset_epoch_visits_each_member_once(small_file: Path, shuffle: bool) -> None:
    with SPIDataset(small_file) as ds:
        members, _ = random_halves(ds.n_patterns, seed=1)
        sub = SPISubset(ds, members, "half1")
        assert sub.n_patterns == len(members) and sub.shape == (32, 32)
        seen = []
        for idx, counts in sub.iter_batches(10, shuffle=shuffle, seed=2, epoch=1):
            assert len(idx) <= 10
            # the counts of local index j are those of global pattern members[j]
            np.testing.assert_array_equal(counts[:, 16, 16], members[idx].astype(np.float32))
            seen.extend(idx.tolist())
        assert sorted(seen) == list(range(len(members)))
        batches = [idx for idx, _ in sub.iter_batches(10, shuffle=shuffle, seed=2, epoch=1)]
        # all batches full except the last; start= skips exactly
        assert all(len(b) == 10 for b in batches[:-1])
        resumed = [idx for idx, _ in sub.iter_batches(10, shuffle=shuffle, seed=2, epoch=1, start=2)]
        assert all(np.array_equal(x, y) for x, y in zip(batches[2:], resumed, strict=True))
        np.testing.assert_allclose(sub.truth_scales(), ds.truth_scales()[members])
        np.testing.assert_allclose(sub.truth_rotations(), ds.truth_rotations()[members])


def test_subset_shuffle_differs_between_epochs(small_file: Path) -> None:
    with SPIDataset(small_file) as ds:
        sub = SPISubset(ds, np.arange(0, 103, 2))
        e0 = np.concatenate([i for i, _ in sub.iter_batches(8, shuffle=True, seed=0, epoch=0)])
        e1 = np.concatenate([i for i, _ in sub.iter_batches(8, shuffle=True, seed=0, epoch=1)])
        assert not np.array_equal(e0, e1)


def test_subset_rejects_bad_members(small_file: Path) -> None:
    with SPIDataset(small_file) as ds:
        with pytest.raises(ValueError, match="distinct indices"):
            SPISubset(ds, [1, 1, 2])
        with pytest.raises(ValueError, match="distinct indices"):
            SPISubset(ds, [0, 103])
        with pytest.raises(ValueError, match="non-empty"):
            SPISubset(ds, [])
