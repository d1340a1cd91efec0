"""Open an HDF5 file for reading, with one clear error naming the file for every way that can fail.

Every reader of a file the user gives (a data file, a mask, a detector, a run's ``intensity.h5`` or
``posterior.h5``...) opens it through :func:`open_h5`, so that a missing file, a directory, a file that is not
HDF5 (or is damaged) and a file the user may not read each give one :class:`~bayes_spi.dataio.h5.DataFormatError`
``"PATH: field /: expected WHAT, got ..."`` instead of h5py's own wording. A missing file raises
:class:`H5FileMissingError`, which is both a ``DataFormatError`` and a ``FileNotFoundError``.

Example:
    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> p = os.path.join(d, "notes.h5")
    >>> _ = open(p, "w").write("plain text")
    >>> try:
    ...     open_h5(p, "a mask file (HDF5)")
    ... except DataFormatError as exc:
    ...     print(str(exc).split(": ", 1)[1])
    field /: expected a mask file (HDF5), got an unreadable file (not HDF5: no HDF5 signature)
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import h5py

from bayes_spi.dataio.h5 import DataFormatError
from bayes_spi.paths import input_file_problem

__all__ = ["H5FileMissingError", "open_h5", "h5_open_problem"]


class H5FileMissingError(DataFormatError, FileNotFoundError):
    """The HDF5 file to read does not exist (or is a broken link): a ``DataFormatError`` that callers catching
    ``FileNotFoundError`` also catch."""

    def __init__(self, path: str | os.PathLike[str], expected: str, found: str) -> None:
        super().__init__(path, "/", expected, found)
        self.message = f"{self.path}: field /: expected {expected}, got {found}"
        self.errno = errno.ENOENT
        self.filename = self.path

    def __str__(self) -> str:  # OSError's own would print "[Errno 2] ..." once errno is set
        return self.message


def h5_open_problem(path: Path, exc: OSError) -> str:
    """What ``h5py.File(path, "r")`` failing with ``exc`` found, in words (for ``got ...``)."""
    if isinstance(exc, PermissionError) or exc.errno == errno.EACCES:
        return "an unreadable file (permission denied for this user)"
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError:
        is_hdf5 = False
    if not is_hdf5:
        return "an unreadable file (not HDF5: no HDF5 signature)"
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"an unreadable file (damaged or truncated HDF5: {detail})"


def open_h5(path: str | os.PathLike[str], what: str = "an HDF5 file", **kwargs: Any) -> h5py.File:
    """``h5py.File(path, "r", **kwargs)``, or one clear error naming the file.

    Args:
        path: the file.
        what: what the file should be, for the message (e.g. ``"a CXI (HDF5) file"``).
        **kwargs: passed on to ``h5py.File`` (e.g. ``rdcc_nbytes``, ``swmr``, ``libver``).

    Raises:
        H5FileMissingError: no such file, or a broken symbolic link (also a ``FileNotFoundError``).
        DataFormatError: a directory, a link loop or a special file; a file this user may not read; a file that
            is not HDF5, or a damaged one (the message names the file and what was found).
    """
    p = Path(path)
    problem = input_file_problem(p)
    if problem is not None:
        reason = (problem.strerror or "").removeprefix("got ")
        if isinstance(problem, FileNotFoundError):
            raise H5FileMissingError(p, what, "no file there (not found)" if reason == "not found" else reason)
        raise DataFormatError(p, "/", what, reason)
    if p.stat().st_size == 0:
        raise DataFormatError(p, "/", what, "an empty file")
    try:
        return h5py.File(p, "r", **kwargs)
    except OSError as exc:
        raise DataFormatError(p, "/", what, h5_open_problem(p, exc)) from None
