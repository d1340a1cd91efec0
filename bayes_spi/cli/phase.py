"""Phase retrieval: electron density from a reconstructed intensity (ER + HIO + shrink-wrap), as MRC.

SOURCE is a run directory (its intensity.h5, written at the end of every fit or by `bayes-spi export`)
or any intensity volume: an MRC file whose voxel size is in 1/A (as `bayes-spi export` writes it) or an
HDF5 file with /intensity (or a data file's /truth/intensity) and attr voxel_size_inv_A.

Several random starts are run; each is reported with its final Fourier error
sum(|F| - sqrt(I))^2 / sum(I) over the measured voxels, and the best one is written. Voxels beyond
--q-max (default: the detector's q_max for a run, the grid's inscribed sphere for a file) are unmeasured
and left free. The output MRC has its voxel size in A (1 / (n dq)) and the box centre at the origin;
STEM.json beside it records the settings and the per-start errors.

Example: bayes-spi phase run1 -o run1/density.mrc --starts 8
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

__all__ = ["command", "run_phase"]


def run_phase(source: Path, out: Path | None = None, starts: int = 8, iterations: int | None = None,
              q_max: float | None = None, seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """:func:`bayes_spi.workflows.phase.run_phase` for the command line (``bayes-spi phase``, ``bayes-spi demo``):
    a :class:`~bayes_spi.workflows.errors.WorkflowError` becomes click's error."""
    from bayes_spi.cli.common import click_error
    from bayes_spi.workflows import phase as workflow
    from bayes_spi.workflows.errors import WorkflowError

    try:
        return workflow.run_phase(source, out, starts, iterations, q_max, seed, progress)
    except WorkflowError as exc:
        raise click_error(exc) from None


@click.command("phase", help=__doc__)
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output MRC [default: RUN/density.mrc for a run directory].")
@click.option("--starts", type=click.IntRange(1), default=8, show_default=True, help="Random starts.")
@click.option("--iterations", type=click.IntRange(10), default=None, help="Iterations per start [default: the "
              "phasing module's].")
@click.option("--q-max", "q_max", type=float, default=None, help="Largest measured |q| in 1/A.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random starts.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def command(source: Path, out: Path | None, starts: int, iterations: int | None, q_max: float | None, seed: int,
            progress: bool) -> None:
    record = run_phase(source, out, starts, iterations, q_max, seed, progress)
    click.echo("start  Fourier error")
    for i, e in enumerate(record["errors"]):
        click.echo(f"{i:>5}  {e:.5f}{'   <- best' if i == record['best'] else ''}")
    out_path = Path(record["out"])
    click.echo(f"wrote {os.fspath(out_path)} ({record['grid']}^3 voxels of {record['voxel_A']:.3g} A) and "
               f"{os.fspath(out_path.with_suffix('.json'))}")
