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

import click

__all__ = ["command", "run_phase"]


def run_phase(source: Path, out: Path | None = None, starts: int = 8, iterations: int | None = None,
              q_max: float | None = None, seed: int = 0, progress: bool = False) -> dict:
    """The body of ``bayes-spi phase``: phase, write ``out`` (MRC) and ``out.json``; returns the JSON record
    (``errors`` per start, ``best``, ``voxel_A``, ``out``). Raises ``click.ClickException`` on bad input."""
    import numpy as np

    from bayes_spi import __version__
    from bayes_spi.analysis.phasing import phase_retrieval
    from bayes_spi.atomic import write_json
    from bayes_spi.infer.volumes import read_intensity, write_density

    source = Path(source)
    if source.is_dir():
        volume = source / "intensity.h5"
        if out is None:
            out = source / "density.mrc"
        if q_max is None and (source / "model.pt").is_file():
            from bayes_spi.infer.evaluate import load_field

            try:
                q_max = load_field(source / "model.pt")[1]
            except (FileNotFoundError, ValueError) as exc:
                raise click.ClickException(str(exc)) from None
    else:
        volume = source
        if out is None:
            raise click.UsageError("give -o/--out for the density when SOURCE is a volume file")
    out = Path(out)
    if q_max is not None and not q_max > 0:
        raise click.BadParameter(f"expected a positive |q| in 1/A, got {q_max}", param_hint="--q-max")
    from bayes_spi.cli.common import check_writable_dir, os_error_message

    if out.is_dir():
        raise click.ClickException(f"{os.fspath(out)}: expected an output MRC file name, got a directory")
    check_writable_dir(out.parent, "the density")  # before the phasing, not after it
    try:
        intensity, dq = read_intensity(volume)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    n = intensity.shape[0]
    measured = None
    if q_max is not None:
        from bayes_spi.analysis.fsc import ball_mask

        measured = ball_mask(n, dq, q_max)
    kwargs = {} if iterations is None else {"n_iter": iterations}
    res = phase_retrieval(intensity, dq, n_starts=starts, seed=seed, measured_mask=measured, progress=progress,
                          **kwargs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_density(res.density, res.voxel_A, out, label=f"bayes-spi {__version__} phased density; voxel A")
    except OSError as exc:
        raise click.ClickException(os_error_message(exc)) from None
    errors = [float(e) for e in np.asarray(res.errors)]
    record = {"software_version": __version__, "source": os.fspath(volume), "out": os.fspath(out), "grid": n,
              "dq_inv_A": dq, "voxel_A": float(res.voxel_A), "q_max_inv_A": q_max, "starts": starts,
              "seed": seed, "iterations": iterations, "errors": errors, "best": int(res.best),
              "support_voxels": int(np.asarray(res.support).sum())}
    try:
        write_json(out.with_suffix(".json"), record)
    except OSError as exc:
        raise click.ClickException(os_error_message(exc)) from None
    return record


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
