"""Atomic file writes: a file that exists under its final name is complete.

A write that fails (a full disk, a read-only or missing directory) removes its temporary file, leaves the
file under its final name as it was, and raises :class:`WriteError`: an ``OSError`` (same ``errno``) whose
message names the file and the reason in one line.

Example:
    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> with atomic_path(os.path.join(d, "a.txt")) as tmp:
    ...     _ = tmp.write_text("done")
    >>> open(os.path.join(d, "a.txt")).read()
    'done'
    >>> p = write_json(os.path.join(d, "a.json"), {"x": 1})
    >>> p.read_text()
    '{\\n  "x": 1\\n}\\n'
"""

from __future__ import annotations

import errno as _errno
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "WriteError", "os_error_message", "write_error_message", "write_json"]


def write_error_message(path: str | os.PathLike[str], exc: OSError) -> str:
    """One line: the file, what went wrong (e.g. no space left on the device) and that nothing was replaced."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno == _errno.ENOSPC:
        reason = "no space left on the device"
    elif exc.errno in (_errno.EACCES, _errno.EPERM, _errno.EROFS):
        reason = f"not writable ({reason})"
    return f"{os.fspath(path)}: could not write the file: {reason}"


def os_error_message(exc: OSError) -> str:
    """One line for any file-system error: the file, then what went wrong."""
    if isinstance(exc, WriteError):
        return str(exc)
    if exc.filename is not None:
        return write_error_message(exc.filename, exc) if exc.strerror else f"{exc.filename}: {exc}"
    return str(exc) or type(exc).__name__


class WriteError(OSError):
    """Writing a file failed; the message names the file and the reason (``errno`` as the cause's)."""

    def __init__(self, path: str | os.PathLike[str], cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.filename = os.fspath(path)
        self.message = (write_error_message(path, cause) + "; the temporary file was removed and any previous "
                        "file of that name is unchanged")

    def __str__(self) -> str:
        return self.message


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield ``path.tmp`` to write to; on success it is flushed to disk and renamed to ``path``, on an
    error (or interrupt) it is removed and ``path`` is left as it was (an ``OSError`` becomes a
    :class:`WriteError` naming ``path``)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the original error is the one to report
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError(path, exc) from exc
        raise


def write_json(path: str | os.PathLike[str], obj: Any, *, indent: int = 2, allow_nan: bool = True) -> Path:
    """Write ``obj`` as JSON (``indent``, a final newline, ASCII) to ``path`` atomically (:func:`atomic_path`).

    Args:
        path: the file to write; replaced only when the write succeeded.
        obj: anything ``json.dumps`` accepts.
        indent: spaces per level.
        allow_nan: ``False`` for strict JSON: a ``NaN`` or infinity raises ``ValueError`` (nothing is written).

    Returns:
        ``Path(path)``.
    """
    path = Path(path)
    text = json.dumps(obj, indent=indent, allow_nan=allow_nan) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
