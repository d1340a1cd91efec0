"""The error a workflow raises: a message for the user, and what kind of mistake it is.

The command line turns it into its own errors (a usage error, a bad option value or a plain error, see
:func:`bayes_spi.cli.common.click_error`); a Python caller reads the message.

Example:
    >>> err = WorkflowError("expected an odd integer >= 3, got 4", kind="parameter", setting="grid")
    >>> str(err), err.kind, err.setting
    ('expected an odd integer >= 3, got 4', 'parameter', 'grid')
"""

from __future__ import annotations

__all__ = ["WorkflowError", "ERROR_KINDS"]

#: ``usage``: the arguments do not fit together; ``parameter``: one setting has a bad value;
#: ``error``: anything else (a bad file, a failed write, a run that cannot start)
ERROR_KINDS: tuple[str, ...] = ("usage", "parameter", "error")


class WorkflowError(Exception):
    """A workflow cannot start or finish; ``str(exc)`` says why in one line.

    Attributes:
        kind: one of :data:`ERROR_KINDS`.
        setting: with ``kind="parameter"``, the setting at fault (e.g. ``"grid"``, ``"device"``), or ``None``.
    """

    def __init__(self, message: str, *, kind: str = "error", setting: str | None = None) -> None:
        if kind not in ERROR_KINDS:
            raise ValueError(f"kind: expected one of {ERROR_KINDS}, got {kind!r}")
        super().__init__(message)
        self.kind = kind
        self.setting = setting
