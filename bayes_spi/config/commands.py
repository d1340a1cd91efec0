"""The command-line vocabulary the library's messages use: option names and the commands that make files.

A library module that has to tell the user what to run or which option to change takes the words from
here, so that the command line's words live in two places only (``cli/``, which defines the options, and
this module); ``tests/test_layers.py`` keeps them out of every other module.

Example:
    >>> flag("mean_photons")
    '--mean-photons'
    >>> command("export_grid", grid=65, voxel=1.5)
    '`bayes-spi export RUN --grid 65 --voxel 1.5`'
"""

from __future__ import annotations

from typing import Any

__all__ = ["COMMANDS", "command", "flag"]

#: what to run, by purpose; ``{name}`` fields are filled by :func:`command`
COMMANDS: dict[str, str] = {
    "fit": "bayes-spi fit DATA.h5 -o RUN/",
    "resume": "bayes-spi fit -o RUN --resume",
    "report_data": "bayes-spi report RUN/ --data DATA.h5",
    "report_truth": "bayes-spi report RUN/ --truth DATA.h5",
    "evaluate_truth": "bayes-spi evaluate RUN/ --truth DATA.h5",
    "phase": "bayes-spi phase RUN/",
    "simulate": "bayes-spi simulate",
    "export_grid": "bayes-spi export RUN --grid {grid} --voxel {voxel:.6g}",
}


def flag(name: str) -> str:
    """The command-line option of a parameter or setting: ``"mean_photons"`` -> ``"--mean-photons"``."""
    return "--" + name.replace("_", "-")


def command(purpose: str, **fields: Any) -> str:
    """The command line for ``purpose`` (a key of :data:`COMMANDS`), its fields filled in, in backquotes.

    Raises:
        KeyError: an unknown purpose.
    """
    return "`" + COMMANDS[purpose].format(**fields) + "`"
