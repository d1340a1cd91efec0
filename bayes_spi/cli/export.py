"""Export the reconstructed intensity I(q) of a run on a cubic grid, as MRC (ChimeraX) and HDF5.

RUN is a run directory (or its model.pt). The grid has --grid voxels per side (odd), centred on q = 0. By
default it spans the detector's q range; with --voxel A it is sampled so that phasing it gives a density
with A-angstrom voxels (spacing 1/(N A) in 1/A, reaching about 1/(2A)). The MRC voxel size and origin are
in 1/A (reciprocal space). A variational intensity field also gets STEM_sd.mrc/.h5, the posterior standard
deviation of I(q) per voxel. Files are written to -o (default: the run directory, then with the stem
intensity_gGRID so that the run's own intensity.mrc/.h5, read by `phase` and `report`, are kept); an
existing file is only replaced with --force.

Example: bayes-spi export run1 --grid 129
"""

from __future__ import annotations

import os
from pathlib import Path

import click

__all__ = ["command"]


@click.command("export", help=__doc__)
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--grid", type=int, default=65, show_default=True, help="Voxels per side (odd).")
@click.option("--voxel", "voxel", type=float, default=None,
              help="Real-space voxel size in A of the density this grid phases to (sets the spacing 1/(N A)); "
                   "default: the grid spans the detector's q range.")
@click.option("-o", "--out-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output directory [default: the run directory].")
@click.option("--stem", default=None,
              help="File name stem [default: intensity, or intensity_gGRID in the run directory].")
@click.option("--force", is_flag=True, help="Overwrite existing files of the same name.")
def command(run: Path, grid: int, voxel: float | None, out_dir: Path | None, stem: str | None, force: bool) -> None:
    from bayes_spi.infer.export import export_run

    if grid < 3 or grid % 2 == 0:
        raise click.BadParameter(f"expected an odd integer >= 3, got {grid}", param_hint="--grid")
    if voxel is not None and not voxel > 0:
        raise click.BadParameter(f"expected a positive size in A, got {voxel}", param_hint="--voxel")
    try:
        res = export_run(run, grid=grid, voxel_A=voxel, out_dir=out_dir, stem=stem, overwrite=force)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"grid {grid}^3, spacing {res['dq_inv_A']:.5g} 1/A, reaches |q| = {res['grid_q_max_inv_A']:.4g} 1/A "
               f"(detector: {res['detector_q_max_inv_A']:.4g} 1/A); density voxel {res['voxel_A']:.4g} A")
    for key in ("intensity_mrc", "intensity_h5", "intensity_sd_mrc", "intensity_sd_h5"):
        if key in res:
            click.echo(f"wrote {os.fspath(res[key])}")
