"""Evaluate a run against the ground truth of a simulated data file.

Reports, after the best global alignment of the poses (R_true ~= G R_est; a mirror image of the molecule
only rotates its intensity, so this covers inversion): the median and mean orientation error (also modulo
the Rz(pi) two-fold of the Ewald geometry, and how often the wrong mode wins), the fluence-scale
correlation, the intensity correlation and FSC (on sqrt(I), shells of |q|), the density FSC of the phased
intensity against the true density (aligned for translation and enantiomer), the resolutions in nm where
the FSC crosses 0.5 and 0.143, and the detector-corner resolution (the data's limit) alongside.

When RUN/posterior.nc exists (from `bayes-spi posterior`; or --posterior FILE), the calibration of the
posterior is reported too: the fraction of patterns whose aligned true pose lies inside their 50% and 90%
credible cones (raw and modulo Rz(pi)) and whose true fluence scale (up to one global factor) lies inside
the 50% and 90% intervals, with the median cone radii.

Writes RUN/evaluation.json (the numbers and the fit's verdict, as the fit writes it) and RUN/fsc.json
(the curves, read by `bayes-spi report`).
With --json the numbers are printed as one JSON object; otherwise as a small table.

Without true poses (an independent simulator, another program's reconstruction, an experiment), give
--reference VOLUME instead of --truth: an intensity volume (MRC with the voxel size in 1/A, HDF5 with
/intensity and attr voxel_size_inv_A, or a data file's /truth/intensity). The run's intensity is aligned
onto it by rotation and scored by the speckle correlation (sqrt I, each |q| shell standardised, over the
shell the detector measured) and the FSC; written to RUN/reference.json.

Example: bayes-spi evaluate run1 --truth data.h5
Example: bayes-spi evaluate run1 --reference dragonfly_intensity.h5
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import click

__all__ = ["command"]


_KINDS = {"emc": "Dragonfly photons", "cxi": "a CXI file", "stack": "a counts stack"}


def _refuse_foreign_truth(truth: Path | None) -> None:
    """A foreign data file (Dragonfly, CXI, a stack) holds no truth: say so plainly, not as an HDF5 error."""
    from bayes_spi.dataio.h5 import DataFormatError
    from bayes_spi.dataio.sources import source_kind

    if truth is None:
        return
    try:
        kind = source_kind(truth)
    except (FileNotFoundError, DataFormatError):
        return  # evaluate_run_full reports it
    if kind != "bayes-spi":
        raise click.ClickException(f"--truth: {os.fspath(truth)}: expected a simulated bayes-spi data file with "
                                   f"/truth, got {_KINDS.get(kind, kind)} (experimental data has no truth: use "
                                   "`bayes-spi fit --half-sets` or `evaluate --reference VOLUME`)")


@click.command("evaluate", help=__doc__)
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.option("--truth", "truth", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The simulated data file with /truth.")
@click.option("--reference", "reference", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A reference intensity volume (no poses needed) instead of --truth.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--density", "density", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Compare this density MRC (on the truth grid) instead of phasing the aligned intensity.")
@click.option("--no-density", is_flag=True, help="Skip phasing and the density FSC.")
@click.option("--starts", type=click.IntRange(1), default=4, show_default=True, help="Phasing random starts.")
@click.option("--posterior", "posterior_nc", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Posterior draws (netCDF from `bayes-spi posterior`) to check coverage [default: RUN/posterior.nc "
                   "if present].")
@click.option("--write/--no-write", default=True, show_default=True,
              help="Write evaluation.json and fsc.json into the run directory.")
def command(run: Path, truth: Path | None, reference: Path | None, as_json: bool, density: Path | None, no_density: bool, starts: int,
            posterior_nc: Path | None, write: bool) -> None:
    from bayes_spi.dataio.h5 import DataFormatError
    from bayes_spi.infer.evaluate import (evaluate_run_full, evaluation_document, format_evaluation,
                                          write_evaluation, write_fsc_json)
    from bayes_spi.infer.rundir import RunDir
    from bayes_spi.infer.verdict import read_verdict

    if density is not None and no_density:
        raise click.UsageError("give either --density or --no-density, not both")
    if (truth is None) == (reference is None):
        raise click.UsageError("give either --truth DATA (a simulation with true poses) or --reference VOLUME")
    if reference is not None:
        from bayes_spi.infer.evaluate import evaluate_against_reference

        try:
            scalars, curves = evaluate_against_reference(run, reference)
        except (FileNotFoundError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
        clean = {k: (v if math.isfinite(v) else None) for k, v in scalars.items()}
        if write:
            RunDir(run).write_json("reference", {**clean, "reference": os.fspath(reference)})
        if as_json:
            click.echo(json.dumps(clean))
            return
        click.echo(f"{os.fspath(run)} against the reference {os.fspath(reference)} (after rotational alignment):")
        click.echo(f"  speckle correlation  {scalars['speckle_corr']:.3f}  (|q| {scalars['q_min']:.4f}-"
                   f"{scalars['q_max']:.4f} 1/A)")
        for key, label in (("intensity_fsc_res_nm_0.5", "sqrt I FSC 0.5"), ("speckle_fsc_res_nm_0.5", "speckle FSC 0.5"),
                           ("speckle_fsc_res_nm_0.143", "speckle FSC 0.143")):
            click.echo(f"  {label:<20} {scalars[key]:.3f} nm")
        return
    _refuse_foreign_truth(truth)
    try:
        ev = evaluate_run_full(run, truth, density=False if no_density else (density or True), phase_starts=starts)
    except (FileNotFoundError, ValueError, DataFormatError) as exc:
        raise click.ClickException(str(exc)) from None
    scalars = dict(ev.scalars)
    nc = posterior_nc if posterior_nc is not None else RunDir(run).path("posterior_nc")
    coverage: dict = {}
    if posterior_nc is not None or nc.is_file():
        from bayes_spi.posterior.coverage import coverage_from_netcdf, format_coverage

        try:
            coverage = coverage_from_netcdf(nc, truth)
        except (FileNotFoundError, ValueError, DataFormatError) as exc:
            raise click.ClickException(str(exc)) from None
        for k, v in coverage.items():
            if k.startswith(("pose_coverage", "scale_coverage", "median_cone_radius")) and isinstance(v, float):
                scalars[k] = v
    try:
        verdict = read_verdict(run)
    except ValueError:  # a damaged verdict.json does not stop the evaluation; the file then has no verdict
        verdict = None
    document = evaluation_document(scalars, verdict.get("status") if verdict else None)
    if write:
        write_evaluation(run, document)
        write_fsc_json(run, ev.curves, corner_res_nm=ev.scalars["corner_res_nm"])
    if as_json:
        click.echo(json.dumps(document))
        return
    click.echo(f"evaluation of {os.fspath(run)} against {os.fspath(truth)}:")
    click.echo(format_evaluation(ev.scalars))
    if coverage:
        click.echo(f"posterior calibration ({os.fspath(nc)}):")
        click.echo(format_coverage(coverage))
    for name, curve in ev.curves.items():
        for t in (0.5, 0.143):
            if not curve.crosses(t):
                click.echo(f"  note: the {name} FSC stays above {t} up to the last shell: its resolution is a bound")
    for note in ev.notes:
        click.echo(f"  note: {note}")
