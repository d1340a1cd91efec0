"""Follow a data file that is still being written (HDF5 SWMR): the patterns are streamed as they arrive.

A writer (:class:`~bayes_spi.dataio.h5.H5Writer` with ``swmr=True``, or any HDF5 SWMR writer appending to
``/data/counts``) appends patterns during an experiment; :class:`FollowingDataset` opens the file read-only
in SWMR mode and its :meth:`~FollowingDataset.follow_batches` streams the patterns in file order, refreshing
the dataset when it has caught up: it waits (reporting progress through ``on_wait``) until a batch is full,
and ends when the writer marks the file complete (``/data/complete`` = 1) or when no pattern has arrived for
``timeout`` seconds; the last, partial batch is then streamed too. From then on the dataset is an ordinary
fixed-size one (:attr:`FollowingDataset.following` is False), e.g. for the exact EMC iterations and the
outputs at the end of a fit.

Example::

    with open_following("live.h5", timeout=60) as ds:
        for idx, counts in ds.follow_batches(32):
            ...   # (32,), (32, n_y, n_x): the patterns in file order, as they arrive
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bayes_spi.dataio.h5 import DataFormatError, SPIDataset

__all__ = ["FollowingDataset", "open_following", "WaitHandler"]

#: ``on_wait(consumed, available, idle_s, timeout_s)``: called about every ``report_every`` seconds while waiting
WaitHandler = Callable[[int, int, float, float], None]


def _print_wait(consumed: int, available: int, idle_s: float, timeout_s: float) -> None:
    import sys

    print(f"waiting for patterns: {consumed} streamed, {available} in the file (the writer is still writing); "
          f"stopping after {timeout_s:.0f} s without new ones ({idle_s:.0f} s so far)", file=sys.stderr, flush=True)


def open_following(path: str | os.PathLike[str], timeout: float = 60.0, min_patterns: int = 2,
                   poll_s: float = 0.2, on_wait: WaitHandler | None = None) -> "FollowingDataset":
    """Open ``path`` for following once it exists, is in SWMR mode and holds ``min_patterns`` patterns (or
    is complete), waiting up to ``timeout`` seconds for each.

    Raises:
        FileNotFoundError: the file did not appear within ``timeout``.
        DataFormatError: it is not a readable bayes-spi file (or never entered SWMR mode) within ``timeout``.
    """
    if not timeout > 0:
        raise ValueError(f"timeout: expected a positive number of seconds, got {timeout!r}")
    deadline = time.monotonic() + timeout
    while True:
        try:
            ds = FollowingDataset(SPIDataset(path, swmr=True), timeout=timeout, poll_s=poll_s, on_wait=on_wait)
            break
        except (FileNotFoundError, DataFormatError):
            # not there yet, or the writer has not entered SWMR mode yet (the file is then locked)
            if time.monotonic() > deadline:
                raise
            time.sleep(poll_s)
    try:
        ds.wait_for(min_patterns)
    except BaseException:
        ds.close()
        raise
    return ds


class FollowingDataset:
    """An :class:`~bayes_spi.dataio.h5.SPIDataset` opened with ``swmr=True`` that streams a growing file.

    :meth:`follow_batches` streams the patterns as they arrive; everything else is the wrapped dataset's
    (``mask``, ``geometry``, ``read``, and ``iter_batches``/``batch_indices`` over the patterns present at the
    last :meth:`refresh`); :attr:`n_patterns` is the count at the last refresh.

    Args:
        dataset: the file, opened with ``swmr=True``.
        timeout: seconds without a new pattern after which streaming ends.
        poll_s: seconds between refreshes while waiting.
        on_wait: progress while waiting (default: one line on stderr every ``report_every`` seconds).
        report_every: seconds between progress lines.
    """

    def __init__(self, dataset: SPIDataset, timeout: float = 60.0, poll_s: float = 0.2,
                 on_wait: WaitHandler | None = None, report_every: float = 5.0) -> None:
        if not dataset.swmr:
            raise ValueError("expected a dataset opened with swmr=True, got one opened without")
        self._ds = dataset
        self.timeout = float(timeout)
        self.poll_s = float(poll_s)
        self.on_wait = on_wait if on_wait is not None else _print_wait
        self.report_every = float(report_every)
        self.following = True  # False once the writer marked the file complete or the timeout passed
        self.end_reason = ""  # "complete" or "timeout" once following ended
        self._n, self.complete = dataset.refresh()

    def __getattr__(self, name: str) -> Any:  # mask, geometry, shape, read, path, truth, ...
        return getattr(self._ds, name)

    @property
    def n_patterns(self) -> int:
        """Patterns in the file at the last :meth:`refresh`."""
        return self._n

    def __len__(self) -> int:
        return self._n

    def refresh(self) -> int:
        """Look for new patterns; returns the count."""
        self._n, self.complete = self._ds.refresh()
        return self._n

    def _stop(self, reason: str) -> None:
        self.following, self.end_reason = False, reason

    def wait_for(self, n: int) -> int:
        """Wait until the file holds ``n`` patterns, is complete, or ``timeout`` passed without a new pattern;
        returns the count (streaming ends when the file is complete or timed out)."""
        last_n, last_new = self.refresh(), time.monotonic()
        last_report = -float("inf")
        while self._n < n and self.following:
            if self.complete:
                self._stop("complete")
                break
            now = time.monotonic()
            if now - last_new > self.timeout:
                self._stop("timeout")
                break
            if now - last_report >= self.report_every:
                self.on_wait(self._consumed, self._n, now - last_new, self.timeout)
                last_report = now
            time.sleep(self.poll_s)
            if self.refresh() != last_n:
                last_n, last_new = self._n, time.monotonic()
        if self.following and self.complete:
            self._stop("complete")
        return self._n

    _consumed = 0

    def follow_indices(self, batch_size: int, start: int = 0) -> Iterator[np.ndarray]:
        """Index batches in file order as the patterns arrive (each waited for), from batch ``start`` on; the
        last one possibly partial. Once following has ended: the remaining patterns, then the end."""
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        if isinstance(start, bool) or int(start) != start or start < 0:
            raise ValueError(f"start: expected a non-negative integer, got {start!r}")
        first = int(start) * int(batch_size)
        while True:
            self.wait_for(first + batch_size)
            stop = min(first + batch_size, self._n)
            if stop <= first and not self.following:
                return
            if stop - first == batch_size or not self.following:
                self._consumed = stop
                yield np.arange(first, stop, dtype=np.int64)
                first = stop

    def follow_batches(self, batch_size: int, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """:meth:`follow_indices` with the counts: ``(indices (B,), counts (B, n_y, n_x) float32)``."""
        for idx in self.follow_indices(batch_size, start):
            yield idx, self._ds.read(idx)

    def close(self) -> None:
        self._ds.close()

    def __enter__(self) -> "FollowingDataset":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "following" if self.following else f"ended ({self.end_reason})"
        return f"FollowingDataset({os.fspath(Path(self._ds.path))!r}, n_patterns={self._n}, {state})"
