"""Checks shared by the subcommands: devices, outputs that exist, file-system errors as one line."""

from __future__ import annotations

import os
from pathlib import Path

import click

__all__ = ["os_error_message", "check_device", "refuse_overwrite", "check_writable_dir"]


def os_error_message(exc: OSError) -> str:
    """One line for a file-system error: the file, then what went wrong."""
    from bayes_spi.atomic import WriteError, write_error_message

    if isinstance(exc, WriteError):
        return str(exc)
    if exc.filename is not None:
        return write_error_message(exc.filename, exc) if exc.strerror else f"{exc.filename}: {exc}"
    return str(exc) or type(exc).__name__


def check_device(name: str, param_hint: str = "--device") -> None:
    """Refuse a device this machine does not have (e.g. ``cuda`` without CUDA) before anything is written."""
    import torch

    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise click.BadParameter(f"expected auto, cpu, cuda or cuda:N, got {name!r} ({exc})",
                                 param_hint=param_hint) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise click.BadParameter(f"expected a device this machine has, got {name!r}: torch finds no CUDA device "
                                     "here (use --device cpu or auto)", param_hint=param_hint)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise click.BadParameter(f"expected a CUDA index below {torch.cuda.device_count()}, got {name!r}",
                                     param_hint=param_hint)
    elif device.type not in ("cpu", "cuda", "mps"):
        raise click.BadParameter(f"expected auto, cpu, cuda or cuda:N, got {name!r}", param_hint=param_hint)
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise click.BadParameter(f"expected a device this machine has, got {name!r}: no MPS device here",
                                 param_hint=param_hint)


def refuse_overwrite(paths: list[Path], force: bool, what: str = "output") -> None:
    """Raise unless none of ``paths`` exists or ``force`` is set."""
    existing = [p for p in paths if os.path.lexists(p)]
    if existing and not force:
        names = ", ".join(repr(os.fspath(p)) for p in existing)
        raise click.ClickException(f"{what} {names} already exists: expected a new file name; give --force to "
                                   "overwrite it")


def check_writable_dir(directory: Path, what: str) -> None:
    """Refuse an output directory that cannot be created or written (checked before any work is done): the
    nearest existing ancestor must be a writable directory."""
    d = Path(directory)
    probe = d
    while not os.path.lexists(probe):
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise click.ClickException(f"{os.fspath(d)}: expected a writable directory for {what}, got a path through "
                                   f"the file {os.fspath(probe)!r}")
    if not probe.exists():
        raise click.ClickException(f"{os.fspath(d)}: expected a writable directory for {what}, got a broken path "
                                   f"at {os.fspath(probe)!r}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise click.ClickException(f"{os.fspath(d)}: expected a writable directory for {what}, got no write "
                                   f"permission in {os.fspath(probe)!r}")
