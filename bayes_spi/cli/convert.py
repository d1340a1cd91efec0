"""Convert experimental data into a bayes-spi HDF5 file (chunked, compressed, written while streaming).

SOURCES are one of:

\b
  Dragonfly   one or more .emc photon files (one data set, in order), or a text file listing them
              (Dragonfly's in_photons_list), with --detector (Dragonfly's detector .h5 or ASCII .dat) and
              --photon-energy (or --wavelength; the detector file holds no wavelength)
  CXI         a .cxi file (detector distance, pixel size, corner positions, mask, photon energy from it;
              or the pixel geometry of a CrystFEL --geometry FILE.geom)
  stack       counts.npy (N, n_y, n_x) or FILE.h5:/path/to/counts, with --geometry FILE (YAML or JSON:
              photon_energy_ev or wavelength_A, distance_m, pixel_size_m, optional beam_center_px [x, y],
              polarization, mask, pixel_positions_m (n_y, n_x, 3), name), or with a CrystFEL .geom (the
              stack then (N, *its data shape), e.g. AGIPD's (N, 16, 512, 128); modules stacked along rows)

Dragonfly's q (voxel units) become 1/A through the Ewald radius the q-vectors lie on and the wavelength;
its mask 0 and 1 are good pixels (--mask-1 bad: only 0), 2 bad. A Dragonfly detector that is a full grid
centred on the beam becomes the ordinary flat geometry; any other a per-pixel geometry. OUT is written as
OUT.tmp and renamed when complete; an existing OUT is replaced only with --force. fit and posterior accept
these sources directly with the same options.

Example: bayes-spi convert photons_a.emc photons_b.emc --detector det.h5 --photon-energy 6199.2 -o data.h5

Example: bayes-spi convert counts.npy --geometry geometry.yaml -o data.h5
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from bayes_spi.config.sources import SOURCE_OPTION_HELP

__all__ = ["command", "source_options", "options_from_cli"]


def source_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the foreign-source options (--detector, --geometry, --photon-energy, --wavelength, --shape,
    --mask-1, --pixel-size) to a click command."""
    opts = [
        click.option("--detector", "source_detector", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help=SOURCE_OPTION_HELP["detector"]),
        click.option("--geometry", "source_geometry", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help=SOURCE_OPTION_HELP["geometry"]),
        click.option("--photon-energy", "source_photon_energy", type=click.FloatRange(min=0, min_open=True),
                     default=None, metavar="EV", help=SOURCE_OPTION_HELP["photon_energy_ev"]),
        click.option("--wavelength", "source_wavelength", type=click.FloatRange(min=0, min_open=True), default=None,
                     metavar="A", help=SOURCE_OPTION_HELP["wavelength_A"]),
        click.option("--shape", "source_shape", type=(click.IntRange(min=1), click.IntRange(min=1)), default=None,
                     metavar="N_Y N_X", help=SOURCE_OPTION_HELP["shape"]),
        click.option("--mask-1", "source_mask_1", type=click.Choice(["good", "bad"]), default="good",
                     show_default=True, help=SOURCE_OPTION_HELP["keep_mask_1"]),
        click.option("--pixel-size", "source_pixel_size", type=click.FloatRange(min=0, min_open=True), default=None,
                     metavar="M", help=SOURCE_OPTION_HELP["pixel_size_m"]),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def options_from_cli(kwargs: dict[str, Any]) -> Any:
    """Pop the ``source_*`` values of :func:`source_options` from ``kwargs`` into a
    :class:`~bayes_spi.config.sources.SourceOptions` (a bad combination is a usage error)."""
    from bayes_spi.config.sources import SourceOptions

    values = {key: kwargs.pop(key, None) for key in ("source_detector", "source_geometry", "source_photon_energy",
                                                      "source_wavelength", "source_shape", "source_mask_1",
                                                      "source_pixel_size")}
    try:
        return SourceOptions(detector=values["source_detector"], geometry=values["source_geometry"],
                             photon_energy_ev=values["source_photon_energy"],
                             wavelength_A=values["source_wavelength"], shape=values["source_shape"],
                             keep_mask_1=(values["source_mask_1"] or "good") == "good",
                             pixel_size_m=values["source_pixel_size"])
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@click.command("convert", help=__doc__)
@click.argument("sources", nargs=-1, required=True, type=str)
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output bayes-spi HDF5 file.")
@source_options
@click.option("--chunk", type=click.IntRange(min=1), default=64, show_default=True,
              help="Patterns per HDF5 chunk of /data/counts.")
@click.option("--max-patterns", type=click.IntRange(min=1), default=None, help="Convert only the first patterns.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def command(sources: tuple[str, ...], out: Path, chunk: int, max_patterns: int | None, force: bool,
            progress: bool, **kwargs: Any) -> None:
    import sys

    from bayes_spi.cli.common import click_error
    from bayes_spi.workflows.convert import run_convert
    from bayes_spi.workflows.errors import WorkflowError

    options = options_from_cli(kwargs)
    try:
        res = run_convert(list(sources), out, options, force=force, chunk_patterns=chunk, max_patterns=max_patterns,
                          progress=progress, argv=["bayes-spi", *sys.argv[1:]],
                          echo=lambda text, err=False: click.echo(text, err=err))
    except WorkflowError as exc:
        raise click_error(exc) from None
    click.echo(f"wrote {os.fspath(res['out'])}: {res['n_patterns']} patterns of {res['shape'][0]}x{res['shape'][1]} "
               f"({res['geometry_kind']} geometry, {res['good_pixels']} good pixels), "
               f"{res['mean_photons']:.4g} photons per pattern, max count {res['max_count']}, "
               f"{res['patterns_per_s']:.0f} patterns/s")
