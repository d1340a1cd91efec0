"""Export per-pattern posterior draws of a fitted run as an ArviZ dataset (netCDF), optionally with coverage.

RUN is a run directory (or its model.pt), DATA the data file (same detector): a bayes-spi file or a foreign one
read with the options of `bayes-spi convert` (by default those the fit recorded for the same file). For every pattern (streamed:
any number of patterns fits in memory) the command draws --draws poses and fluence scales and writes
OUT (-o): group `posterior` (pose_quaternion scalar-first w,x,y,z / pose_rotvec / scale / angle_to_mean_deg /
hypothesis_index, dims chain, draw, pattern), group `sample_stats` (per pattern: chordal mean pose, radius of
the 50% and 90% credible cones, fluence mean/sd/HDI, hypothesis weights) and `observed_data` (photons per
pattern). A heterogeneous fit (--latent-dim, --classes) adds its structure posteriors: draws latent_z and
class_index, and per pattern class_probs, latent_mean/sd and latent_loc/scale per class (the class posterior is
the one refined off the orientation grid, as in the fit's latent_posterior.h5, unless --class-posterior guide or
the fit chose the guide's). Open it with
`arviz.from_netcdf(OUT)`. --summaries-only leaves the draws out (group `posterior`):
the summaries alone, ~300 bytes per pattern instead of ~8 kB at 200 draws.

By default the guide's two most probable hypotheses per pattern are refined on all pixels (Gauss-Newton on
the model's likelihood, first on the inner half of |q| whose speckle basins are twice as wide, then on all
pixels; Laplace covariances and evidence weights), reading log I from a cube filled from the
trained field once, four times as fine as the orientation search's (--refine-on field: the field itself at
every step, 7-10x slower, the same calibration), and the pose and log-scale spreads are
multiplied by temperatures. Without a truth these are self-calibrated by default: --self-calibrate N
patterns (default 1,024, at most the exported patterns and at least 64) are simulated from the fitted model
itself and exported, and the temperatures that make that export nominal are used; the trained field's own
pose error, measured on two half merges (--field-error), is then added to every pose spread. Fixed
temperatures (--pose-temperature, --scale-temperature, --calibration FILE from --calibrate) turn both off;
--self-calibrate 0 uses the temperatures stored with the code (calibrated on the foundation benchmark).
--no-refine exports the amortized guide as trained: faster, but its spreads ignore the encoder's pose errors
and are far too narrow.

With --truth (simulated DATA) it prints how often the credible regions hold the true pose and scale and
writes coverage.json beside OUT; --calibrate also fits the temperatures that make them nominal and writes
calibration.json (for --calibration). Calibrate on a simulation that matches the real data: the right
temperatures depend on how well the fit converged.

Example: bayes-spi posterior run1 data.h5 -o posterior.nc --draws 200 --truth
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from bayes_spi.cli.convert import options_from_cli, source_options

__all__ = ["SELF_CALIBRATE_PATTERNS", "command"]

#: patterns simulated from the fit for the default self-calibration (BENCHMARKS.md: "The field's own pose error")
SELF_CALIBRATE_PATTERNS = 1024


def _recorded_source(run: Path, data: Path) -> Any:
    """The source options the fit recorded in ``config.yaml`` when it read this same DATA, else none."""
    from bayes_spi.config.sources import SourceOptions
    from bayes_spi.infer.rundir import read_run_info

    run_dir = run.parent if run.is_file() else run
    try:
        rec = read_run_info(run_dir).get("data") or {}
    except (FileNotFoundError, ValueError, AttributeError):
        return SourceOptions()
    if not isinstance(rec, dict) or not rec.get("source") or rec.get("path") != os.path.abspath(data):
        return SourceOptions()
    return SourceOptions.from_dict(rec["source"])


@click.command("posterior", help=__doc__)
@click.argument("run", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output netCDF file (e.g. posterior.nc).")
@click.option("--draws", type=click.IntRange(min=1), default=200, show_default=True, help="Draws per pattern.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True, help="Patterns per batch.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed (pattern i draws from stream [seed, i]).")
@click.option("--max-patterns", type=click.IntRange(min=1), default=None, help="Export only the first N patterns.")
@click.option("--refine/--no-refine", default=True, show_default=True,
              help="Refine the guide's best hypotheses on all pixels (Laplace posterior).")
@click.option("--n-refine", type=click.IntRange(min=1), default=2, show_default=True,
              help="Hypotheses refined (and kept) per pattern.")
@click.option("--pose-temperature", type=float, default=None,
              help="Multiply the pose spreads [default: the calibrated value with --refine, 1 without].")
@click.option("--scale-temperature", type=float, default=None,
              help="Multiply the log fluence-scale spreads [default: the calibrated value with --refine, 1 without].")
@click.option("--score-pixels", type=click.IntRange(min=0), default=512, show_default=True,
              help="Pixels for the guide's hypothesis scores and search (0 = all).")
@click.option("--calibration", "calibration", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON with pose_temperature and scale_temperature (from --calibrate); overrides the defaults.")
@click.option("--truth", is_flag=True, help="Report coverage against DATA's truth; write coverage.json beside OUT.")
@click.option("--calibrate", is_flag=True,
              help="With --truth: fit the temperatures that make this export nominal; write calibration.json "
                   "beside OUT.")
@click.option("--self-calibrate", "self_calibrate", type=click.IntRange(min=0), default=None,
              help="Calibration without a truth: simulate N patterns from the fitted model itself (poses and scales "
                   "from the priors, counts through the same detector, DATA's mean photons), fit the temperatures "
                   "on them and use them; writes calibration.json (source: self-simulation) beside OUT. They "
                   "exclude the field's own error (--field-error adds it). 0: the stored temperatures. [default: "
                   "1024 (at most the exported patterns, at least 64) with --refine for a one-structure fit, unless "
                   "fixed temperatures or --calibrate are given]")
@click.option("--field-error/--no-field-error", "field_error", default=None,
              help="Add the trained field's own pose error to every pose spread, measured without a truth: the first "
                   "--field-error-patterns patterns merged in two halves at their posterior poses, held-out probes "
                   "refined on each half and on the field (bayes_spi.posterior.fielderror; BENCHMARKS.md). [default: on "
                   "with --refine for a one-structure fit, unless the temperatures come from --calibration, "
                   "--pose-temperature or --calibrate, which describe the whole error]")
@click.option("--field-error-patterns", "field_error_patterns", type=click.IntRange(min=16), default=4096,
              show_default=True, help="Patterns (the file's first) merged for --field-error, an eighth of them probes "
                                      "(at most 512).")
@click.option("--refine-on", "refine_on", type=click.Choice(["field", "cache"]), default="cache", show_default=True,
              help="What the refinement evaluates: a cached log I cube four times as fine as the search's (7-10x "
                   "faster) or the trained field itself at every step (exact); the default temperatures hold for "
                   "both (BENCHMARKS.md).")
@click.option("--cache-grid", "cache_grid", type=click.IntRange(min=3), default=None,
              help="Voxels per side (odd) of the cube of --refine-on cache [default: four times as fine as the "
                   "fit's orientation search cube, at most 321].")
@click.option("--summaries-only", "summaries_only", is_flag=True,
              help="Write only the per-pattern summaries (sample_stats: mean pose, credible-cone radii, fluence "
                   "mean/sd/HDI, hypothesis weights and spreads; observed_data), not the --draws draws per pattern "
                   "(~8 kB per pattern at 200 draws); still an ArviZ dataset.")
@click.option("--class-posterior", "class_posterior", type=click.Choice(["refined", "guide"]), default=None,
              help="A fit with --classes > 1: the class posterior exported (class_probs, class_index draws; the pose "
                   "posterior given its most probable class): refined (off the orientation grid, Laplace evidence) "
                   "or guide (the encoder's q(c)). [default: the fit's own setting, as its latent_posterior.h5]")
@click.option("--device", default="cpu", show_default=True, help="torch device.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@source_options
def command(run: Path, data: Path, out: Path, draws: int, batch_size: int, seed: int, max_patterns: int | None,
            refine: bool, n_refine: int, pose_temperature: float | None, scale_temperature: float | None,
            score_pixels: int,
            calibration: Path | None, truth: bool, calibrate: bool, self_calibrate: int | None, field_error: bool | None,
            field_error_patterns: int, refine_on: str, cache_grid: int | None, summaries_only: bool,
            class_posterior: str | None, device: str, force: bool, progress: bool,
            **source_kwargs: Any) -> None:
    from bayes_spi.cli.common import check_device, check_writable_dir, refuse_overwrite
    from bayes_spi.dataio.h5 import DataFormatError, SPIDataset
    from bayes_spi.infer.load import load_trained
    from bayes_spi.posterior.calibration import fit_temperatures, load_calibration, save_calibration
    from bayes_spi.posterior.coverage import coverage_from_netcdf, format_coverage
    from bayes_spi.posterior.netcdf import ExportSettings, write_posterior_netcdf

    for name, value in (("--pose-temperature", pose_temperature), ("--scale-temperature", scale_temperature)):
        if value is not None and not value > 0:
            raise click.BadParameter(f"expected a positive number, got {value}", param_hint=name)
    if calibrate and not truth:
        raise click.UsageError("--calibrate needs --truth (a simulated DATA file)")
    if calibration is not None:
        if pose_temperature is not None or scale_temperature is not None:
            raise click.UsageError("give either --calibration or --pose-temperature/--scale-temperature, not both")
        try:
            pose_temperature, scale_temperature = load_calibration(calibration)
        except (FileNotFoundError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
    if cache_grid is not None and cache_grid % 2 == 0:
        raise click.BadParameter(f"expected an odd number of voxels, got {cache_grid}", param_hint="--cache-grid")
    check_device(device)
    if field_error and not refine:
        raise click.UsageError("--field-error needs --refine (it adds to the refined posterior's Laplace spreads)")
    fixed = calibration is not None or pose_temperature is not None or scale_temperature is not None or calibrate
    if field_error is None:
        field_error = refine and not fixed
    auto_self = self_calibrate is None and refine and not fixed
    settings = ExportSettings(n_draws=draws, batch_size=batch_size, seed=seed, score_pixels=score_pixels,
                              refine=refine, n_refine=n_refine, pose_temperature=pose_temperature,
                              scale_temperature=scale_temperature, max_patterns=max_patterns,
                              summaries_only=summaries_only, refine_on=refine_on, cache_grid=cache_grid,
                              class_posterior=class_posterior)
    try:
        trained = load_trained(run, device=device)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    source = options_from_cli(source_kwargs)
    if not source.given:  # a foreign DATA: read it as the fit did (config.yaml records how)
        source = _recorded_source(run, data)
    from bayes_spi.dataio.sources import open_dataset, split_dataset_path

    try:
        dataset = open_dataset(data, **source.open_kwargs())
    except FileNotFoundError as exc:
        if split_dataset_path(data)[0].is_file():  # a file the source names (a detector, a geometry file)
            raise click.ClickException(str(exc)) from None
        raise click.ClickException(f"data file {os.fspath(data)!r} not found (expected a bayes-spi HDF5 file, or "
                                   "a source of `bayes-spi convert`)") from None
    except (DataFormatError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    from bayes_spi.posterior.netcdf import check_pattern_shape

    try:
        check_pattern_shape(trained, dataset)
    except ValueError as exc:
        dataset.close()
        raise click.ClickException(str(exc)) from None
    self_calibrate = _self_calibration_patterns(trained, dataset, settings, self_calibrate, auto_self)
    if truth and not dataset.has_truth:
        dataset.close()
        raise click.ClickException(f"{os.fspath(data)}: field /truth: expected simulated data with a truth "
                                   "(for --truth), got missing")
    try:
        refuse_overwrite([out], force, "output file")
        check_writable_dir(out.parent, "the output file")
    except click.ClickException:
        dataset.close()
        raise
    from bayes_spi.infer.verdict import read_verdict

    try:
        status = (read_verdict(Path(trained.path).parent) or {}).get("status")
    except ValueError:
        status = None
    if status in ("failed", "unconverged"):
        click.echo(f"WARNING: the fit in {os.fspath(run)} is marked {status.upper()} "
                   f"({os.fspath(Path(trained.path).parent / 'verdict.json')}): its posterior is not a trustworthy "
                   "statement of uncertainty; the file records this (attribute fit_verdict)", err=True)
    created = _created_dirs(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        _export(run, data, out, draws, seed, settings, trained, dataset, calibration, pose_temperature,
                scale_temperature, truth, calibrate, self_calibrate, device, refine, progress,
                field_error_patterns if field_error else 0)
    except BaseException:
        _remove_empty(created)  # a failed export leaves no empty output directory behind
        raise


def _self_calibration_patterns(trained: Any, dataset: Any, settings: Any, given: int | None, auto: bool) -> int:
    """The patterns simulated for the self-calibration: ``given``, or by default (``auto``)
    :data:`SELF_CALIBRATE_PATTERNS` capped at the exported patterns (at least 64); 0 for a heterogeneous fit."""
    if given is not None:
        return given
    if not auto:
        return 0
    if hasattr(trained.guide, "latent_posterior"):
        click.echo("self-calibration: not run for a heterogeneous fit (the stored temperatures are used)")
        return 0
    n_export = len(settings.pattern_range(dataset.n_patterns))
    return min(SELF_CALIBRATE_PATTERNS, max(64, n_export))


def _created_dirs(d: Path) -> list[Path]:
    """The directories ``mkdir(parents=True)`` would create for ``d``, deepest first."""
    out = []
    while not os.path.lexists(d) and d.parent != d:
        out.append(d)
        d = d.parent
    return out


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            break  # not empty (or gone): keep it and its parents


def _export(run: Path, data: Path, out: Path, draws: int, seed: int, settings: Any, trained: Any, dataset: Any,
            calibration: Path | None, pose_temperature: float | None, scale_temperature: float | None, truth: bool,
            calibrate: bool, self_calibrate: int, device: str, refine: bool, progress: bool,
            field_error_patterns: int = 0) -> None:
    from bayes_spi.dataio.h5 import DataFormatError, SPIDataset
    from bayes_spi.infer.rundir import RunDir
    from bayes_spi.posterior.calibration import fit_temperatures, save_calibration
    from bayes_spi.posterior.coverage import coverage_from_netcdf, format_coverage
    from bayes_spi.posterior.netcdf import write_posterior_netcdf

    if self_calibrate:
        if calibration is not None or pose_temperature is not None or scale_temperature is not None:
            dataset.close()
            raise click.UsageError("give --self-calibrate or fixed temperatures (--calibration, --pose-temperature, "
                                   "--scale-temperature), not both")
        import dataclasses
        import tempfile

        from bayes_spi.posterior.selfsim import simulate_from_fit

        first = dataset.read(np.arange(min(1000, dataset.n_patterns)))
        photons = float((first * (dataset.mask & trained.guide.mask.cpu().numpy())).sum(axis=(1, 2)).mean())
        with tempfile.TemporaryDirectory(dir=out.parent) as tmpdir:
            sim = simulate_from_fit(trained, self_calibrate, Path(tmpdir) / "selfsim.h5", photons, seed=seed + 1)
            cal_nc = Path(tmpdir) / "selfsim.nc"
            with SPIDataset(sim) as sim_ds:
                write_posterior_netcdf(trained, sim_ds, cal_nc, dataclasses.replace(settings, max_patterns=None))
            cal = fit_temperatures(cal_nc, sim)
        cal.update({"run": os.fspath(run), "source": "self-simulation", "n_patterns": int(self_calibrate),
                    "photons_per_pattern": photons})
        save_calibration(out.parent / "calibration.json", cal)
        settings = dataclasses.replace(settings, pose_temperature=cal["pose_temperature"],
                                       scale_temperature=cal["scale_temperature"])
        click.echo(f"self-calibration on {self_calibrate} patterns simulated from the fit: pose temperature "
                   f"{cal['pose_temperature']:.3f}, scale {cal['scale_temperature']:.3f} (calibration.json)")
    if field_error_patterns:
        settings = _with_field_error(trained, dataset, settings, field_error_patterns, progress)
    with dataset:
        n = len(settings.pattern_range(dataset.n_patterns))
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, unit="pattern", desc="posterior", dynamic_ncols=True)
        t0 = time.perf_counter()
        try:
            write_posterior_netcdf(trained, dataset, out, settings, device=device,
                                   progress=bar.update if bar is not None else None)
        except (ValueError, DataFormatError) as exc:
            raise click.ClickException(str(exc)) from None
        finally:
            if bar is not None:
                bar.close()
        wall = time.perf_counter() - t0
    what = "summaries" if settings.summaries_only else f"{draws} draws"
    click.echo(f"wrote {os.fspath(out)}: {n} patterns x {what} in {wall:.1f} s ({n / wall:.1f} patterns/s); "
               f"temperatures pose {settings.pose_temperature:g} scale {settings.scale_temperature:g}, "
               f"field pose error {settings.field_pose_sigma_deg:.3g} deg, "
               f"refine {'on ' + settings.refine_on if refine else 'off'}")
    if truth:
        try:
            cov = coverage_from_netcdf(out, data)
        except (ValueError, DataFormatError) as exc:
            raise click.ClickException(str(exc)) from None
        click.echo("coverage of the credible regions (fraction holding the truth):")
        click.echo(format_coverage(cov))
        path = RunDir(out.parent).write_json("coverage", cov, allow_nan=False)
        click.echo(f"wrote {os.fspath(path)}")
    if calibrate:
        cal = fit_temperatures(out, data)
        cal["run"] = os.fspath(run)
        path = out.parent / "calibration.json"
        save_calibration(path, cal)
        click.echo(f"calibrated temperatures: pose {cal['pose_temperature']:.3f}, scale {cal['scale_temperature']:.3f} "
                   f"(use with --calibration); wrote {os.fspath(path)}")


def _with_field_error(trained: Any, dataset: Any, settings: Any, n_patterns: int, progress: bool) -> Any:
    """``settings`` with the field's pose error measured on ``dataset`` (and recorded in the file's attributes);
    unchanged, with a note, for a heterogeneous fit or too few patterns."""
    import dataclasses

    from bayes_spi.posterior.fielderror import PROBES, measure_field_pose_error

    if hasattr(trained.guide, "latent_posterior"):
        click.echo("field pose error: not measured for a heterogeneous fit (one field per class or latent)")
        return settings
    if dataset.n_patterns < 16:
        click.echo(f"field pose error: not measured ({dataset.n_patterns} patterns; it needs at least 16)")
        return settings
    n = min(n_patterns, dataset.n_patterns)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, unit="pattern", desc="field error", dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        est = measure_field_pose_error(trained, dataset, settings, n_patterns=n, n_probes=min(PROBES, n // 8),
                                       seed=settings.seed, progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    click.echo(f"field pose error: {est.sigma_deg:.3g} deg per axis (of which noise {math.degrees(est.noise_sigma_rad):.3g}), "
               f"from {est.n_probes} probes against two half merges of {n - est.n_probes} patterns "
               f"({time.perf_counter() - t0:.0f} s); added to every pose spread")
    extra = {**settings.extra_attrs, "field_noise_sigma_deg": math.degrees(est.noise_sigma_rad),
             "field_error_patterns": int(n), "field_error_probes": int(est.n_probes)}
    return dataclasses.replace(settings, field_pose_sigma_deg=est.sigma_deg, extra_attrs=extra)
