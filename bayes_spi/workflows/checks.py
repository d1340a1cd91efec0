"""Checks a workflow makes before it writes anything: the device exists, the output directory is writable.

Each raises :class:`~bayes_spi.workflows.errors.WorkflowError` with one line that says what was expected.

Example:
    >>> check_device("cpu")
    >>> try:
    ...     check_device("gpu7")
    ... except WorkflowError as exc:
    ...     print(exc.setting, str(exc).startswith("expected auto, cpu, cuda or cuda:N"))
    device True
"""

from __future__ import annotations

import os
from pathlib import Path

from bayes_spi.config.commands import flag
from bayes_spi.workflows.errors import WorkflowError

__all__ = ["check_device", "check_writable_dir"]


def check_device(name: str) -> None:
    """Refuse a device this machine does not have (e.g. ``cuda`` without CUDA): ``kind="parameter"``,
    ``setting="device"``."""
    import torch

    if name == "auto":
        return

    def bad(message: str) -> WorkflowError:
        return WorkflowError(message, kind="parameter", setting="device")

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise bad(f"expected auto, cpu, cuda or cuda:N, got {name!r} ({exc})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise bad(f"expected a device this machine has, got {name!r}: torch finds no CUDA device "
                      f"here (use {flag('device')} cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise bad(f"expected a CUDA index below {torch.cuda.device_count()}, got {name!r}")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise bad(f"expected auto, cpu, cuda or cuda:N, got {name!r}")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise bad(f"expected a device this machine has, got {name!r}: no MPS device here")


def check_writable_dir(directory: str | os.PathLike[str], what: str) -> None:
    """Refuse an output directory that cannot be created or written: the nearest existing ancestor must be a
    writable directory (``what`` names it in the message, e.g. ``"the run"``)."""
    d = Path(directory)
    probe = d
    while not os.path.lexists(probe):
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise WorkflowError(f"{os.fspath(d)}: expected a writable directory for {what}, got a path through "
                            f"the file {os.fspath(probe)!r}")
    if not probe.exists():
        raise WorkflowError(f"{os.fspath(d)}: expected a writable directory for {what}, got a broken path "
                            f"at {os.fspath(probe)!r}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise WorkflowError(f"{os.fspath(d)}: expected a writable directory for {what}, got no write "
                            f"permission in {os.fspath(probe)!r}")
