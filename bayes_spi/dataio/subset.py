"""A subset of a data file's patterns that behaves like the whole file (for half-set validation).

:class:`SPISubset` wraps an open :class:`~bayes_spi.dataio.h5.SPIDataset` and a sorted array of global
pattern indices. Pattern ``j`` of the subset is pattern ``members[j]`` of the file; everything the trainer
and the exports use (``n_patterns``, ``iter_batches``, ``read``, geometry, mask, truth) is translated.
Shuffled epochs follow the parent file's chunk-wise order (so reads stay chunk-local and memory stays
independent of N) and keep only members, re-batched to full batches.

:func:`random_halves` draws the reproducible random split used by ``bayes-spi fit --half-sets``.

Example:
    >>> import numpy as np
    >>> h1, h2 = random_halves(10, seed=0)
    >>> sorted(np.concatenate([h1, h2]).tolist()) == list(range(10))
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from bayes_spi.dataio.h5 import SPIDataset

__all__ = ["SPISubset", "random_halves"]


def random_halves(n_patterns: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n_patterns)`` at random into two halves (sizes differ by at most 1), each sorted.

    Reproducible from ``seed`` (``numpy.random.default_rng(seed)``).
    """
    if n_patterns < 2:
        raise ValueError(f"expected at least 2 patterns to split into half-sets, got {n_patterns}")
    perm = np.random.default_rng(int(seed)).permutation(int(n_patterns))
    half = n_patterns // 2
    return np.sort(perm[:half]).astype(np.int64), np.sort(perm[half:]).astype(np.int64)


class SPISubset:
    """The patterns ``members`` (global indices) of ``parent``, re-indexed ``0 .. len(members) - 1``.

    Args:
        parent: an open data set (not closed by the subset unless :meth:`close` is called).
        members: ``(n,)`` distinct global pattern indices.
        name: a label for logs and ``repr`` (e.g. ``"half1"``).
    """

    def __init__(self, parent: SPIDataset, members: Sequence[int] | np.ndarray, name: str = "subset") -> None:
        idx = np.asarray(members, dtype=np.int64)
        if idx.ndim != 1 or idx.size == 0:
            raise ValueError(f"members: expected a non-empty 1-D index array, got shape {idx.shape}")
        idx = np.sort(idx)
        if idx[0] < 0 or idx[-1] >= parent.n_patterns or np.any(np.diff(idx) == 0):
            raise ValueError(f"members: expected distinct indices in [0, {parent.n_patterns}), got "
                             f"range [{idx[0]}, {idx[-1]}] with {int(np.sum(np.diff(idx) == 0))} repeats")
        self.parent = parent
        self.members = idx
        self.name = name
        self._is_member = np.zeros(parent.n_patterns, dtype=bool)
        self._is_member[idx] = True

    # the attributes the trainer, the exports and the CLI use
    @property
    def path(self) -> Path:
        return self.parent.path

    @property
    def n_patterns(self) -> int:
        return int(self.members.size)

    @property
    def shape(self) -> tuple[int, int]:
        return self.parent.shape

    @property
    def geometry(self):  # noqa: ANN201 - a Geometry
        return self.parent.geometry

    @property
    def mask(self) -> np.ndarray:
        return self.parent.mask

    @property
    def has_truth(self) -> bool:
        return self.parent.has_truth

    @property
    def chunk_patterns(self) -> int:
        return self.parent.chunk_patterns

    def local(self, global_indices: np.ndarray) -> np.ndarray:
        """Subset positions ``(B,)`` of member global indices ``(B,)``."""
        return np.searchsorted(self.members, np.asarray(global_indices, dtype=np.int64))

    def read(self, indices: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        """Counts ``(B, n_y, n_x)`` of subset patterns ``indices`` (local)."""
        local = np.arange(self.n_patterns)[indices] if isinstance(indices, slice) else np.asarray(indices)
        return self.parent.read(self.members[np.atleast_1d(local)])

    def batch_indices(self, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
                      buffer_chunks: int = 8) -> Iterator[np.ndarray]:
        """Local index batches of one epoch (see :meth:`SPIDataset.batch_indices`)."""
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        if not shuffle:
            for first in range(0, self.n_patterns, batch_size):
                yield np.arange(first, min(first + batch_size, self.n_patterns), dtype=np.int64)
            return
        pool = np.zeros(0, dtype=np.int64)
        # the parent's chunk-wise shuffle, with batches big enough that filtering keeps them full
        for glob in self.parent.batch_indices(batch_size * 4, shuffle=True, seed=seed, epoch=epoch,
                                              buffer_chunks=buffer_chunks):
            pool = np.concatenate([pool, self.local(glob[self._is_member[glob]])])
            while len(pool) >= batch_size:
                yield pool[:batch_size]
                pool = pool[batch_size:]
        if len(pool):
            yield pool

    def iter_batches(self, batch_size: int, *, shuffle: bool, seed: int = 0, start: int = 0, epoch: int = 0,
                     buffer_chunks: int = 8) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(local indices (B,), counts (B, n_y, n_x))`` for one epoch; ``start`` skips batches (resume)."""
        if isinstance(start, bool) or int(start) != start or start < 0:
            raise ValueError(f"start: expected a non-negative integer, got {start!r}")
        for number, idx in enumerate(self.batch_indices(batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                                                        buffer_chunks=buffer_chunks)):
            if number >= start:
                yield idx, self.read(idx)

    # truth, restricted to the members
    def truth_quaternions(self) -> np.ndarray:
        return self.parent.truth_quaternions()[self.members]

    def truth_rotations(self) -> np.ndarray:
        return self.parent.truth_rotations()[self.members]

    def truth_scales(self) -> np.ndarray:
        return self.parent.truth_scales()[self.members]

    def truth_intensity(self) -> tuple[np.ndarray, float]:
        return self.parent.truth_intensity()

    def close(self) -> None:
        """Close the parent file."""
        self.parent.close()

    def __enter__(self) -> "SPISubset":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SPISubset({self.name!r}, {self.n_patterns} of {self.parent!r})"
