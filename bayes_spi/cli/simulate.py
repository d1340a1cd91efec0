"""Simulate SPI diffraction patterns of a molecule and write them to a bayes-spi HDF5 file.

STRUCTURE is a PDB/mmCIF file or a built-in name (default: 2CEX). Each pattern samples |F(R q)|^2 of the
molecule at a random pose R (uniform on SO(3), or --orientations), times fluence, r_e^2, polarization
and pixel solid angle. Artifacts (--artifacts, letters in this order): F fluence jitter (--fluence-jitter
lognormal:SIGMA | pr772 | none), P Poisson noise, G Gaussian read-out noise (--readout-sigma photons,
clipped at 0 and rounded), B beam stop (--beamstop-radius pixels) plus an optional --mask (.npy or .h5,
True = good; or the pnCCD/Dragonfly .byt, 0 = good; --mask-bin for a binned detector). --background adds a
measured mean background (photons per pixel per pattern) to the expected counts before the noise. The fluence comes from --mean-photons (mean total photons
per pattern over good pixels, default 1e4) or from --photons-per-pulse with --beam-radius-nm. Geometry:
a preset (--geometry) whose values --photon-energy-ev, --pixels, --pixel-size-m, --distance-m and
--polarization override. Ground truth (poses, fluence scales, the intensity on a --truth-grid cube) is
stored in /truth. The file is written in chunks to OUT.tmp and renamed when complete; an existing OUT is
only replaced with --force.

Example: bayes-spi simulate -o data.h5 --geometry reference-32 --n-patterns 1000 --artifacts FPB
"""

from __future__ import annotations

from pathlib import Path

import click

from bayes_spi.geometry import PRESETS, Beam, Detector, Geometry, get_preset

__all__ = ["command"]


def _build_geometry(
    preset: str,
    photon_energy_ev: float | None,
    pixels: int | None,
    pixel_size_m: float | None,
    distance_m: float | None,
    polarization: str | None,
) -> Geometry:
    try:
        base = get_preset(preset)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--geometry") from None
    overridden = any(v is not None for v in (photon_energy_ev, pixels, pixel_size_m, distance_m, polarization))
    if not overridden:
        return base
    det = base.detector
    n = pixels if pixels is not None else None
    if pixels is not None and pixel_size_m is None:
        # keep the detector's physical size when only the pixel count changes
        pixel_size_m = det.n_x * det.pixel_size_m / pixels
    try:
        beam = Beam(
            photon_energy_ev if photon_energy_ev is not None else base.beam.photon_energy_ev,
            polarization if polarization is not None else base.beam.polarization,
        )
        detector = Detector(
            n if n is not None else det.n_x,
            n if n is not None else det.n_y,
            pixel_size_m if pixel_size_m is not None else det.pixel_size_m,
            distance_m if distance_m is not None else det.distance_m,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="geometry options") from None
    return Geometry(beam, detector, name=f"{preset}+custom")


@click.command(name="simulate", help=__doc__)
@click.argument("structure", required=False, default="2CEX")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output HDF5 file.")
@click.option("--geometry", "preset", default="reference-32", show_default=True,
              help=f"Geometry preset: {', '.join(sorted(PRESETS))}.")
@click.option("--photon-energy-ev", type=float, default=None, help="Override the photon energy (eV).")
@click.option("--pixels", type=int, default=None, help="Override pixels per side (same detector size).")
@click.option("--pixel-size-m", type=float, default=None, help="Override the pixel size (m).")
@click.option("--distance-m", type=float, default=None, help="Override the detector distance (m).")
@click.option("--polarization", type=click.Choice(["x", "y", "unpolarized", "none"]), default=None,
              help="Override the polarization.")
@click.option("--n-patterns", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--mean-photons", type=float, default=None,
              help="Target mean total photons per pattern over good pixels [default: 1e4].")
@click.option("--photons-per-pulse", type=float, default=None, help="Photons per pulse (with --beam-radius-nm).")
@click.option("--beam-radius-nm", type=float, default=None, help="Flat-top beam radius in nm.")
@click.option("--artifacts", default="FPB", show_default=True, help="Letters from FPGB ('-' for none).")
@click.option("--fluence-jitter", default="lognormal:0.3", show_default=True,
              help="lognormal:SIGMA, pr772 or none (used with artifact F).")
@click.option("--readout-sigma", type=float, default=0.1, show_default=True,
              help="Read-out noise sigma in photons (artifact G).")
@click.option("--beamstop-radius", type=float, default=2.0, show_default=True,
              help="Beam-stop radius in pixels (artifact B).")
@click.option("--mask", "mask_file", type=click.Path(path_type=Path), default=None,
              help="Extra mask: FILE.byt[:ROWSxCOLUMNS] (pnCCD/Dragonfly, 0 = good), FILE.npy or FILE.h5:/dataset "
                   "(True/1 = good); needs artifact B.")
@click.option("--mask-bin", type=click.IntRange(min=1), default=1, show_default=True,
              help="The detector's binning relative to the --mask and --background files (N x N pixels; the "
                   "leftover rows/columns cropped evenly; a binned pixel is good only if all its pixels are).")
@click.option("--background", "background_file", type=click.Path(path_type=Path), default=None,
              help="Mean background photons per pixel per pattern (FILE.npy or FILE.h5:/dataset) added to the "
                   "expected counts before the noise (what fit --background models, with scale 1).")
@click.option("--orientations", type=click.Path(path_type=Path), default=None,
              help=".npy of (N, 4) scalar-first quaternions instead of uniform poses.")
@click.option("--symmetry", default=None, metavar="GROUP",
              help="Make a symmetric particle: |G| copies of STRUCTURE (cropped to --subunit-radius) under the "
                   "rotations of the point group C1, Cn, Dn, T, O or I (standard orientations, README), centred "
                   "at --shell-radius from the origin. Fit it with the same --symmetry.")
@click.option("--shell-radius", type=click.FloatRange(min=0), default=None,
              help="With --symmetry: distance of each copy's centre from the origin (A).")
@click.option("--subunit-radius", type=click.FloatRange(min=0, min_open=True), default=None,
              help="With --symmetry: keep only the atoms within this distance of STRUCTURE's centre (A) [default: all].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--truth-grid", type=int, default=65, show_default=True,
              help="Odd size of the ground-truth intensity cube (0 = none).")
@click.option("--chunk", type=click.IntRange(min=1), default=256, show_default=True,
              help="Patterns simulated and written at a time.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def command(
    structure: str,
    output: Path,
    preset: str,
    photon_energy_ev: float | None,
    pixels: int | None,
    pixel_size_m: float | None,
    distance_m: float | None,
    polarization: str | None,
    n_patterns: int,
    mean_photons: float | None,
    photons_per_pulse: float | None,
    beam_radius_nm: float | None,
    artifacts: str,
    fluence_jitter: str,
    readout_sigma: float,
    beamstop_radius: float,
    mask_file: Path | None,
    mask_bin: int,
    background_file: Path | None,
    orientations: Path | None,
    symmetry: str | None,
    shell_radius: float | None,
    subunit_radius: float | None,
    seed: int,
    truth_grid: int,
    chunk: int,
    force: bool,
    progress: bool,
) -> None:
    from bayes_spi.dataio.h5 import DataFormatError
    from bayes_spi.sim.fluence import parse_jitter
    from bayes_spi.sim.simulate import parse_artifacts, simulate
    from bayes_spi.sim.structure import load_structure

    from bayes_spi.cli.common import check_writable_dir, refuse_overwrite

    refuse_overwrite([output], force, "output file")
    check_writable_dir(output.parent, "the output file")
    geometry = _build_geometry(preset, photon_energy_ev, pixels, pixel_size_m, distance_m, polarization)
    try:
        arts = parse_artifacts(artifacts)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--artifacts") from None
    try:
        parse_jitter(fluence_jitter)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--fluence-jitter") from None
    if photons_per_pulse is not None and mean_photons is not None:
        raise click.UsageError("give either --mean-photons or --photons-per-pulse, not both")
    if photons_per_pulse is not None and beam_radius_nm is None:
        raise click.UsageError("--photons-per-pulse needs --beam-radius-nm")
    if photons_per_pulse is None and mean_photons is None:
        mean_photons = 1e4
    if mask_file is not None and "B" not in arts:
        raise click.UsageError(f"--mask needs artifact B in --artifacts (got {artifacts!r})")
    if truth_grid and (truth_grid < 3 or truth_grid % 2 == 0):
        raise click.BadParameter(f"expected an odd integer >= 3 or 0, got {truth_grid}", param_hint="--truth-grid")
    try:
        molecule = load_structure(structure)
    except (FileNotFoundError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="STRUCTURE") from None
    if symmetry is None and (shell_radius is not None or subunit_radius is not None):
        raise click.UsageError("--shell-radius and --subunit-radius need --symmetry")
    if symmetry is not None:
        from bayes_spi.sim.symmetric import symmetric_assembly
        from bayes_spi.symmetry import parse_symmetry

        try:
            symmetry = parse_symmetry(symmetry)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--symmetry") from None
        if shell_radius is None:
            raise click.UsageError(f"--symmetry {symmetry} needs --shell-radius (A)")
        try:
            molecule = symmetric_assembly(molecule, symmetry, shell_radius, subunit_radius)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--subunit-radius") from None
    try:
        summary = simulate(
            molecule,
            geometry,
            n_patterns,
            output,
            artifacts=arts,
            mean_photons=mean_photons,
            photons_per_pulse=photons_per_pulse,
            beam_radius_nm=beam_radius_nm,
            fluence_jitter=fluence_jitter,
            readout_sigma=readout_sigma,
            beamstop_radius=beamstop_radius,
            mask=mask_file,
            mask_bin=mask_bin,
            background=background_file,
            orientations=orientations,
            seed=seed,
            truth_grid=truth_grid,
            chunk=chunk,
            progress=progress,
        )
    except (FileNotFoundError, DataFormatError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    import numpy as np

    atoms = np.concatenate([molecule.positions[e] for e in molecule.elements])
    sub = atoms[:: max(1, len(atoms) // 2000)]
    extent = float(np.linalg.norm(sub[:, None] - sub[None], axis=-1).max()) if len(sub) > 1 else 0.0
    over = geometry.field_of_view_A / extent if extent > 0 else float("inf")
    click.echo(f"particle extent {extent:.0f} A, field of view {geometry.field_of_view_A:.0f} A: speckle "
               f"oversampling {over:.2f}")
    if over < 2.0:
        click.echo("WARNING: oversampling < 2: this detector does not resolve the particle's speckles (field of view "
                   "< 2 x particle size); a reconstruction from these patterns is not expected to work. Use a "
                   "larger distance, smaller pixels or a longer wavelength.", err=True)
    click.echo(
        f"wrote {summary.n_patterns} patterns of {molecule.name or structure} "
        f"({geometry.shape[1]}x{geometry.shape[0]} px, {summary.n_good_pixels} good, "
        f"corner resolution {geometry.corner_resolution_A:.2f} A) to {summary.path}\n"
        f"mean photons per pattern: {summary.mean_photons:.1f}; "
        f"fluence {summary.fluence:.4g} photons/A^2; artifacts {arts or '-'}"
    )
