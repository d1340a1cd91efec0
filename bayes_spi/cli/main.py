"""The ``bayes-spi`` command line: one module per subcommand, its docstring is the help text."""

from __future__ import annotations

import errno
import importlib

import click

from bayes_spi import __version__

__all__ = ["cli", "SUBCOMMANDS"]

#: subcommand name -> module under ``bayes_spi.cli`` that defines ``command`` (a click.Command)
SUBCOMMANDS: dict[str, str] = {
    "simulate": "simulate",
    "fit": "fit",
    "demo": "demo",
    "report": "report",
    "export": "export",
    "phase": "phase",
    "evaluate": "evaluate",
    "posterior": "posterior",
    "convert": "convert",
}


class _LazyGroup(click.Group):
    """Imports a subcommand's module only when it is used (keeps ``--help`` fast)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in SUBCOMMANDS:
            return None
        module = importlib.import_module(f"bayes_spi.cli.{SUBCOMMANDS[name]}")
        return module.command

    def invoke(self, ctx: click.Context) -> object:
        """Run the subcommand; a file-system error that no subcommand turned into a message (an unwritable
        output path, a full disk) becomes one line naming the file, not a traceback."""
        try:
            return super().invoke(ctx)
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                raise
            from bayes_spi.cli.common import os_error_message

            raise click.ClickException(os_error_message(exc)) from None


@click.group(cls=_LazyGroup)
@click.version_option(__version__, prog_name="bayes-spi")
def cli() -> None:
    """bayes-spi: Bayesian reconstruction of 3D intensities from XFEL SPI diffraction patterns."""


if __name__ == "__main__":
    cli()
