"""The run's torch files (``model.pt``, ``checkpoint.pt``): written atomically, read without running code.

A torch file is a pickle, and an ordinary ``torch.load`` of a crafted pickle runs arbitrary code. bayes-spi
therefore stores only tensors and plain values (dicts, lists, tuples, str, int, float, bool, None; a numpy
array is stored as a tensor) and reads every such file with ``torch.load(..., weights_only=True)``, which
refuses anything else. A file that is empty, truncated, not a torch file, or asks for other objects is
reported as a :class:`TorchFileError` that names the file.

Example:
    >>> import os, tempfile
    >>> import numpy as np
    >>> p = os.path.join(tempfile.mkdtemp(), "a.pt")
    >>> save_torch_file({"mask": np.ones(3, bool), "n": np.int64(2)}, p)
    >>> ck = load_torch_file(p)
    >>> ck["mask"].dtype, ck["n"]
    (torch.bool, 2)
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bayes_spi.atomic import atomic_path
from bayes_spi.config.commands import command

__all__ = ["TorchFileError", "to_plain", "save_torch_file", "load_torch_file"]


class TorchFileError(ValueError):
    """A torch file cannot be read safely: empty, truncated, foreign, or holding objects other than tensors."""


def to_plain(obj: Any) -> Any:
    """``obj`` with numpy arrays as tensors, numpy scalars and paths as plain values (recursively through
    dicts, lists and tuples): what ``torch.load(..., weights_only=True)`` reads back."""
    if isinstance(obj, dict):
        return {to_plain(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(to_plain(v) for v in obj)
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj).copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def save_torch_file(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(to_plain(obj))`` to ``path.tmp``, then renamed to ``path``: a reader never sees a partial
    file, and on an error (e.g. a full disk) the temporary file is removed and ``path`` is left as it was."""
    with atomic_path(path) as tmp:
        torch.save(to_plain(obj), tmp)


#: what a truncated, foreign or crafted file raises inside ``torch.load(..., weights_only=True)``
_READ_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, KeyError, IndexError,
                AttributeError, UnicodeDecodeError, zipfile.BadZipFile, ImportError)


def load_torch_file(path: str | os.PathLike[str], map_location: Any = "cpu", what: str = "a bayes-spi torch file"
                    ) -> Any:
    """Read a torch file with ``weights_only=True`` (no code in the file runs).

    Args:
        path: the file.
        map_location: as for ``torch.load``.
        what: what the file should be, for the error message (e.g. ``"the trained model of a finished run"``).

    Raises:
        FileNotFoundError: no such file.
        TorchFileError: empty, truncated, not a torch file, or holding objects other than tensors and plain
            values (the message names the file).
    """
    p = Path(path)
    if p.is_file() and p.stat().st_size == 0:
        raise TorchFileError(f"{os.fspath(p)}: expected {what}, got an empty file")
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        asks = f"asks for the object {found.group(1)}" if found else "is not one"
        hint = ""
        if found and found.group(1).startswith("numpy"):
            hint = ("; a model.pt written by an older bayes-spi stored its mask as a numpy array: rewrite it from "
                    f"the run's checkpoint with {command('resume')}")
        raise TorchFileError(
            f"{os.fspath(p)}: expected {what} holding only tensors and plain values (read with weights_only, "
            f"no code in it is run), got a file that {asks} (a foreign, tampered or damaged file; nothing in it "
            f"was executed){hint}") from None
    except _READ_ERRORS as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TorchFileError(f"{os.fspath(p)}: expected {what}, got an unreadable file (truncated or not a torch "
                             f"file: {msg})") from None
