"""Write the report of a run: PNG figures in RUN/report/ and one page RUN/report.html that shows them.

Figures: ELBO and its terms, training speed, central slices of the 3D intensity (beside the truth, aligned,
with --truth), input patterns beside the model's expected counts at the inferred poses, FSC curves (from
RUN/fsc.json), coverage of viewing directions, the posterior angular spread (from RUN/posterior.nc when it
holds cone radii, else posterior.h5), orientation errors (with --truth) and the phased density (from
RUN/density.mrc); plus the one-page overview RUN/report.png. A figure whose inputs are missing is left out
and the page says which command makes them. The input patterns come from --data, else --truth, else the
data file recorded in RUN/config.yaml.

Example: bayes-spi report run1/ --truth data.h5
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import click

from bayes_spi.infer.rundir import RunDir

__all__ = ["command", "RUN_MARKERS"]

#: files of which a run directory holds at least one (written when a fit starts or ends): see RunDir.is_run
RUN_MARKERS: tuple[str, ...] = RunDir.marker_names()


@click.command(name="report", help=__doc__)
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--truth", "truth_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Simulated data file with /truth: adds the comparisons with the true poses and intensity.")
@click.option("--data", "data_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Data file of the input patterns [default: --truth, else the one in RUN/config.yaml].")
@click.option("--n-patterns", type=click.IntRange(min=1, max=32), default=6, show_default=True,
              help="Patterns shown beside the model's prediction.")
@click.option("--max-align", type=click.IntRange(min=10), default=5000, show_default=True,
              help="Patterns used to fit the global rotation to the truth (a random subset when more).")
def command(run_dir: Path, truth_path: Path | None, data_path: Path | None, n_patterns: int, max_align: int) -> None:
    from bayes_spi.report.page import build_report

    if not run_dir.is_dir():
        raise click.ClickException(f"run directory {os.fspath(run_dir)!r} not found (expected the output of "
                                   "`bayes-spi fit DATA.h5 -o RUN`)")
    from bayes_spi.dataio.h5 import DataFormatError, SPIDataset

    for name, p in (("--truth", truth_path), ("--data", data_path)):
        if p is None:
            continue
        if not p.is_file():
            raise click.ClickException(f"{name}: data file {os.fspath(p)!r} not found")
        try:  # an unreadable file is an error here, not a page with the comparisons left out
            with SPIDataset(p) as ds:
                if name == "--truth" and not ds.has_truth:
                    raise DataFormatError(p, "/truth", "simulated data with a truth (for --truth)", "missing")
        except (FileNotFoundError, DataFormatError) as exc:
            raise click.ClickException(f"{name}: {exc}") from None
    if not RunDir(run_dir).is_run():
        raise click.ClickException(f"{os.fspath(run_dir)}: expected a run directory (the output of `bayes-spi fit "
                                   f"DATA.h5 -o RUN`, holding {', '.join(RUN_MARKERS)}), got none of these files")
    t0 = time.perf_counter()
    try:
        result = build_report(run_dir, truth_path, data_path, n_patterns=n_patterns, max_align=max_align)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    made = [n for n, p in result.figures.items() if p is not None]
    skipped = [n for n, p in result.figures.items() if p is None and n not in result.problems]
    click.echo(f"wrote {result.html} ({len(made)} figures in {RunDir(run_dir).path('report_dir')}: "
               f"{', '.join(made) or 'none'}) in {time.perf_counter() - t0:.1f} s")
    if result.overview is not None:
        click.echo(f"wrote {result.overview}")
    if skipped:
        click.echo(f"not made (inputs missing, see the page): {', '.join(skipped)}")
    for name, msg in result.problems.items():
        click.echo(f"not made: {name}: {msg}", err=True)
