"""Input paths: say exactly why a file cannot be read (missing, a directory, a broken link, a link loop).

Example:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> try:
    ...     check_input_file(d, "a data file")
    ... except InputPathError as exc:
    ...     print(str(exc).endswith("expected a data file, got a directory"))
    True
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

__all__ = ["InputPathError", "input_file_problem", "check_input_file"]


class InputPathError(ValueError):
    """An input path exists but is not a readable regular file (a directory, a link loop, a special file)."""


def input_file_problem(path: str | os.PathLike[str]) -> OSError | None:
    """``None`` if ``path`` is a regular file (after links), else the error to raise, with what it is instead."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return OSError(errno.ELOOP, "got a symbolic link loop (the link resolves to itself)")
        if p.is_symlink():
            try:
                target = os.readlink(p)
            except OSError:
                target = "?"
            return FileNotFoundError(errno.ENOENT, f"got a broken symbolic link (to {target!r}, which does not exist)")
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return FileNotFoundError(errno.ENOENT, "not found")
        return OSError(exc.errno, f"got an inaccessible path ({exc.strerror})")
    if p.is_dir():
        return IsADirectoryError(errno.EISDIR, "got a directory")
    import stat

    if not stat.S_ISREG(st.st_mode):
        return OSError(errno.EINVAL, "got a special file, not a regular file")
    return None


def check_input_file(path: str | os.PathLike[str], what: str) -> Path:
    """``Path(path)`` if it is a readable regular file; otherwise raise ``FileNotFoundError`` (missing, broken
    link) or :class:`InputPathError` (a ``ValueError``: a directory, a link loop, a special file) with the
    message ``"PATH: expected WHAT, got ..."`` (``"PATH: not found (expected WHAT)"`` for a missing file)."""
    problem = input_file_problem(path)
    if problem is None:
        return Path(path)
    reason = problem.strerror or ""
    msg = f"{os.fspath(path)}: not found (expected {what})" if reason == "not found" else \
        f"{os.fspath(path)}: expected {what}, {reason}"
    if isinstance(problem, FileNotFoundError):
        raise FileNotFoundError(msg)
    raise InputPathError(msg)
