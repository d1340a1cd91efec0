"""Checks shared by the subcommands (devices, outputs that exist) and the library's errors as click's."""

from __future__ import annotations

import os
from pathlib import Path

import click

from bayes_spi.atomic import os_error_message
from bayes_spi.config.commands import flag
from bayes_spi.workflows import checks
from bayes_spi.workflows.errors import WorkflowError

__all__ = ["os_error_message", "click_error", "check_device", "refuse_overwrite", "check_writable_dir"]


def click_error(exc: WorkflowError) -> click.ClickException:
    """The command line's error for a workflow's: a usage error, a bad value of the option of ``exc.setting``,
    or a plain error (exit status 2, 2 and 1)."""
    if exc.kind == "usage":
        return click.UsageError(str(exc))
    if exc.kind == "parameter":
        return click.BadParameter(str(exc), param_hint=flag(exc.setting) if exc.setting else None)
    return click.ClickException(str(exc))


def check_device(name: str, param_hint: str = "--device") -> None:
    """Refuse a device this machine does not have (e.g. ``cuda`` without CUDA) before anything is written."""
    try:
        checks.check_device(name)
    except WorkflowError as exc:
        raise click.BadParameter(str(exc), param_hint=param_hint) from None


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
    try:
        checks.check_writable_dir(directory, what)
    except WorkflowError as exc:
        raise click.ClickException(str(exc)) from None
