"""Simulated SPI data sets: poses, fluence, artifacts, written to the bayes-spi HDF5 format in chunks.

Forward model for pattern ``i`` and pixel ``k`` (conventions: :mod:`bayes_spi.geometry`):

* pose ``R_i`` (uniform on SO(3) by default); pixel ``k`` samples the molecule-frame intensity at
  ``R_i @ q_k`` (the molecule is rotated by ``R_i^T`` in the lab);
* expected photons ``lambda_ik = gamma_i * fluence * r_e^2 * P_k * Omega_k * |F(R_i q_k)|^2``
  (``fluence`` in photons/A^2, ``r_e`` in A, ``P`` polarization, ``Omega`` solid angle in sr).

Artifacts, each switched on by its letter in ``artifacts`` and applied in this order:

* ``F``: fluence jitter ``gamma_i`` (:mod:`bayes_spi.sim.fluence`; without F, ``gamma_i = 1``);
* ``P``: Poisson noise (without P the counts are the rounded expectation);
* ``G``: Gaussian read-out noise of ``readout_sigma`` photons, then clipped at 0 and rounded;
* background (not an artifact letter: given by ``background``): ``lambda_ik + B_k``, a mean background in
  photons per pixel per pattern, before the noise;
* ``B``: mask: a central beam stop (pixel centres within ``beamstop_radius`` pixels of the detector
  centre) plus an optional user mask; masked pixels are stored as 0 and flagged in ``/geometry/mask``.

Random streams are derived from ``seed`` (one each for poses, jitter, noise and fluence calibration),
so a run is reproducible from its ``/simulation`` attributes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bayes_spi import __version__
from bayes_spi.config.commands import flag
from bayes_spi.dataio.h5 import DataFormatError, H5Writer, quaternions_to_rotations
from bayes_spi.geometry import Geometry, get_preset
from bayes_spi.sim.fluence import CLASSICAL_ELECTRON_RADIUS_A, fluence_from_pulse, parse_jitter, sample_jitter
from bayes_spi.sim.structure import Structure, load_structure
from bayes_spi.sim.transform import (
    density_from_transform,
    intensity_from_transform,
    molecular_transform,
    transform_on_grid,
)

__all__ = [
    "ARTIFACT_LETTERS",
    "SimulationSummary",
    "parse_artifacts",
    "random_quaternions",
    "beamstop_mask",
    "load_mask_file",
    "load_orientations",
    "pixel_weights",
    "expected_photons",
    "calibrate_fluence",
    "simulate",
    "simulate_to_h5",
]

ARTIFACT_LETTERS: str = "FPGB"


@dataclass(frozen=True)
class SimulationSummary:
    """What :func:`simulate` wrote.

    Attributes:
        path: the HDF5 file.
        n_patterns: number of patterns.
        mean_photons: measured mean total counts per pattern over good pixels.
        fluence: incident fluence in photons/A^2 (for gamma = 1).
        photons_per_unit_intensity: ``fluence * r_e^2``.
        n_good_pixels: number of unmasked pixels.
    """

    path: Path
    n_patterns: int
    mean_photons: float
    fluence: float
    photons_per_unit_intensity: float
    n_good_pixels: int


def parse_artifacts(spec: str) -> str:
    """Validate an artifact string (letters from ``FPGB``, any order, case-insensitive); canonical order.

    Raises:
        ValueError: unknown letters.
    """
    text = spec.strip().upper()
    bad = sorted(set(text) - set(ARTIFACT_LETTERS) - {"-"})
    if bad:
        raise ValueError(f"artifacts: expected letters from {ARTIFACT_LETTERS!r} (or '-' for none), got {spec!r}")
    return "".join(letter for letter in ARTIFACT_LETTERS if letter in text)


def random_quaternions(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` uniform random unit quaternions (Haar on SO(3)), scalar-first ``(n, 4)``, ``w >= 0``."""
    quat = rng.standard_normal((n, 4))
    quat /= np.linalg.norm(quat, axis=1, keepdims=True)
    return quat * np.where(quat[:, :1] < 0, -1.0, 1.0)


def beamstop_mask(geometry: Geometry, radius_px: float) -> np.ndarray:
    """Good-pixel mask ``(n_y, n_x)``: False where the pixel centre lies within ``radius_px`` pixels of the centre
    (a per-pixel geometry: where ``|q|`` is below ``radius_px`` pixel steps, ``radius_px / field_of_view_A``)."""
    if not geometry.is_grid:
        return geometry.q_magnitudes() > float(radius_px) / geometry.field_of_view_A
    n_y, n_x = geometry.shape
    iy, ix = np.meshgrid(np.arange(n_y) - (n_y - 1) / 2.0, np.arange(n_x) - (n_x - 1) / 2.0, indexing="ij")
    return np.hypot(iy, ix) > float(radius_px)


def load_mask_file(path: str | os.PathLike[str], shape: tuple[int, int], bin_factor: int = 1) -> np.ndarray:
    """Load a user mask (:func:`bayes_spi.dataio.masks.read_mask`): ``.byt[:HxW]`` (pnCCD/Dragonfly, one byte a
    pixel, 0 = good), ``.npy`` or ``.h5[:/dataset]`` (True/1 = good), binned by ``bin_factor``.

    Returns:
        ``(n_y, n_x)`` bool, True = good.

    Raises:
        FileNotFoundError: missing file.
        DataFormatError: wrong shape/size/values (names the file and what was expected).
    """
    from bayes_spi.dataio.masks import read_mask

    return read_mask(path, shape, bin_factor)


def load_orientations(path: str | os.PathLike[str], n_patterns: int) -> np.ndarray:
    """Quaternions ``(M, 4)`` scalar-first from ``.npy``; returns the first ``n_patterns``, normalised.

    Raises:
        FileNotFoundError / DataFormatError: missing file, wrong shape, too few rows, zero rows.
    """
    from bayes_spi.paths import check_input_file

    file = check_input_file(path, "an orientations file (.npy of quaternions)")
    arr = np.load(file, allow_pickle=False)
    if arr.ndim != 2 or arr.shape[1] != 4 or arr.shape[0] < n_patterns:
        raise DataFormatError(file, "orientations", f"quaternions of shape (>= {n_patterns}, 4)", f"shape {arr.shape}")
    quat = np.asarray(arr[:n_patterns], dtype=np.float64)
    norm = np.linalg.norm(quat, axis=1, keepdims=True)
    if not np.all(np.isfinite(norm)) or np.any(norm == 0):
        raise DataFormatError(file, "orientations", "finite non-zero quaternions", "zero or non-finite rows")
    return quat / norm


def pixel_weights(geometry: Geometry) -> np.ndarray:
    """``P_k * Omega_k`` per pixel, ``(n_y, n_x)`` (sr)."""
    return geometry.pixel_factor()


def expected_photons(
    structure: Structure,
    q: np.ndarray,
    weights: np.ndarray,
    rotations: np.ndarray,
    photons_per_unit_intensity: float,
    scales: np.ndarray | None = None,
) -> np.ndarray:
    """Expected photons ``lambda_bk = scale_b * c * w_k * |F(R_b q_k)|^2``.

    Args:
        structure: the molecule.
        q: pixel scattering vectors ``(K, 3)``.
        weights: ``P_k * Omega_k`` ``(K,)``.
        rotations: ``(B, 3, 3)``.
        photons_per_unit_intensity: ``c = fluence * r_e^2``.
        scales: ``(B,)`` fluence jitter (None: ones).

    Returns:
        ``(B, K)`` float64.
    """
    rotated = np.einsum("bij,kj->bki", rotations, q)
    intensity = np.abs(molecular_transform(structure, rotated)) ** 2
    lam = photons_per_unit_intensity * weights[None, :] * intensity
    if scales is not None:
        lam = lam * np.asarray(scales)[:, None]
    return lam


def calibrate_fluence(
    structure: Structure,
    geometry: Geometry,
    mean_photons: float,
    rng: np.random.Generator,
    n_orientations: int = 128,
) -> float:
    """Fluence (photons/A^2) giving ``mean_photons`` expected photons per pattern (gamma = 1) over good pixels.

    The mean over orientations is estimated from ``n_orientations`` uniform random poses.
    """
    if not np.isfinite(mean_photons) or mean_photons <= 0:
        raise ValueError(f"mean_photons: expected a positive number, got {mean_photons!r}")
    good = geometry.good_pixels()
    q = geometry.q_vectors()[good]
    weights = pixel_weights(geometry)[good]
    rotations = quaternions_to_rotations(random_quaternions(n_orientations, rng))
    per_unit = expected_photons(structure, q, weights, rotations, 1.0).sum(axis=1).mean()
    return float(mean_photons / (per_unit * CLASSICAL_ELECTRON_RADIUS_A**2))


def _resolve_mask(mask: np.ndarray | str | os.PathLike[str] | None, shape: tuple[int, int], bin_factor: int = 1
                  ) -> np.ndarray | None:
    if mask is None:
        return None
    if isinstance(mask, (str, os.PathLike)):
        return load_mask_file(mask, shape, bin_factor)
    arr = np.asarray(mask)
    if arr.shape != shape:
        raise ValueError(f"mask: expected shape {shape}, got {arr.shape}")
    return arr.astype(bool)


def simulate(
    structure: Structure | str | os.PathLike[str],
    geometry: Geometry | str,
    n_patterns: int,
    path: str | os.PathLike[str],
    *,
    artifacts: str = "FPB",
    mean_photons: float | None = None,
    photons_per_pulse: float | None = None,
    beam_radius_nm: float | None = None,
    fluence_jitter: str = "lognormal:0.3",
    readout_sigma: float = 0.1,
    beamstop_radius: float = 2.0,
    mask: np.ndarray | str | os.PathLike[str] | None = None,
    mask_bin: int = 1,
    background: np.ndarray | str | os.PathLike[str] | None = None,
    orientations: np.ndarray | str | os.PathLike[str] | None = None,
    seed: int = 0,
    truth_grid: int = 65,
    chunk: int = 256,
    progress: bool = True,
) -> SimulationSummary:
    """Simulate ``n_patterns`` diffraction patterns and write them (with truth) to ``path``.

    At most one of ``mean_photons`` (target mean total photons per pattern over good pixels at gamma = 1,
    calibrated on 128 random orientations; default 1e4) or ``photons_per_pulse`` + ``beam_radius_nm``
    sets the fluence.
    ``mask`` (array or ``.byt``/``.npy``/``.h5`` file, binned by ``mask_bin``: :mod:`bayes_spi.dataio.masks`) and
    ``beamstop_radius`` (pixels, 0 = none) apply only with artifact ``B``. ``background``: a mean background
    ``B_k`` in photons per pixel per pattern (``(n_y, n_x)`` array, or ``.npy``/``.h5`` file binned (summed) by
    ``mask_bin``) added to every pattern's expected counts before the noise, ``lambda_ik + B_k``: the meaning of
    ``fit --background`` with scale ``b = 1``; it does not scale with the fluence jitter. ``orientations``: ``(>= n_patterns, 4)`` scalar-first quaternions (array or ``.npy``)
    instead of uniform poses. The file is written as ``path.tmp`` then renamed.

    Raises:
        ValueError: inconsistent settings (messages say what was expected).
    """
    if isinstance(n_patterns, bool) or int(n_patterns) != n_patterns or n_patterns < 1:
        raise ValueError(f"n_patterns: expected a positive integer, got {n_patterns!r}")
    n_patterns = int(n_patterns)
    if isinstance(chunk, bool) or int(chunk) != chunk or chunk < 1:
        raise ValueError(f"chunk: expected a positive integer, got {chunk!r}")
    arts = parse_artifacts(artifacts)
    parse_jitter(fluence_jitter)
    if readout_sigma < 0:
        raise ValueError(f"readout_sigma: expected >= 0, got {readout_sigma!r}")
    structure_label = structure if isinstance(structure, (str, os.PathLike)) else getattr(structure, "name", "")
    mol = load_structure(structure) if isinstance(structure, (str, os.PathLike)) else structure
    geom = get_preset(geometry) if isinstance(geometry, str) else geometry
    if mean_photons is not None and photons_per_pulse is not None:
        raise ValueError("fluence: expected one of mean_photons or photons_per_pulse, got both "
                         f"(mean_photons={mean_photons!r}, photons_per_pulse={photons_per_pulse!r})")
    if mean_photons is None and photons_per_pulse is None:
        mean_photons = 1e4
    if photons_per_pulse is not None and beam_radius_nm is None:
        raise ValueError("beam_radius_nm: expected a value with photons_per_pulse, got None")
    # ---- mask
    good = np.ones(geom.shape, dtype=bool)
    user_mask = _resolve_mask(mask, geom.shape, mask_bin)
    if "B" in arts:
        if geom.detector.mask is not None:
            good &= geom.detector.mask
        if beamstop_radius > 0:
            good &= beamstop_mask(geom, beamstop_radius)
        if user_mask is not None:
            good &= user_mask
    elif user_mask is not None:
        raise ValueError("mask: expected artifact 'B' to be enabled when a mask is given, got artifacts "
                         f"{artifacts!r}")
    geom = geom.with_mask(good)
    if not good.any():
        raise ValueError("mask: expected at least one good pixel, got none")
    bg_map = None
    if background is not None:
        if isinstance(background, (str, os.PathLike)):
            from bayes_spi.dataio.masks import read_pixel_map

            bg_map = read_pixel_map(background, geom.shape, mask_bin)
        else:
            bg_map = np.asarray(background, dtype=np.float64)
            if bg_map.shape != geom.shape or not np.all(np.isfinite(bg_map)) or np.any(bg_map < 0):
                raise ValueError(f"background: expected finite values >= 0 of shape {geom.shape}, got shape "
                                 f"{bg_map.shape}")
    # ---- random streams
    streams = np.random.SeedSequence(int(seed)).spawn(4)
    rng_pose, rng_jitter, rng_noise, rng_calib = (np.random.default_rng(s) for s in streams)
    # ---- fluence
    if mean_photons is not None:
        fluence = calibrate_fluence(mol, geom, float(mean_photons), rng_calib)
    else:
        fluence = fluence_from_pulse(float(photons_per_pulse), float(beam_radius_nm))  # type: ignore[arg-type]
    c = fluence * CLASSICAL_ELECTRON_RADIUS_A**2
    # ---- orientations
    fixed_quats: np.ndarray | None = None
    orientations_label = ""
    if orientations is not None:
        if isinstance(orientations, (str, os.PathLike)):
            fixed_quats = load_orientations(orientations, n_patterns)
            orientations_label = os.fspath(orientations)
        else:
            arr = np.asarray(orientations, dtype=np.float64)
            if arr.ndim != 2 or arr.shape[1] != 4 or arr.shape[0] < n_patterns:
                raise ValueError(f"orientations: expected shape (>= {n_patterns}, 4), got {arr.shape}")
            fixed_quats = arr[:n_patterns] / np.linalg.norm(arr[:n_patterns], axis=1, keepdims=True)
            orientations_label = "<array>"
    q = geom.q_vectors()[good]
    weights = pixel_weights(geom)[good]
    attrs: dict[str, Any] = {
        "structure": os.fspath(structure_label),
        "n_atoms": mol.n_atoms,
        "seed": int(seed),
        "artifacts": arts,
        "n_patterns": n_patterns,
        "fluence_jitter": fluence_jitter if "F" in arts else "none",
        "mean_photons_target": float(mean_photons) if mean_photons is not None else "",
        "photons_per_pulse": float(photons_per_pulse) if photons_per_pulse is not None else "",
        "beam_radius_nm": float(beam_radius_nm) if beam_radius_nm is not None else "",
        "fluence_photons_per_A2": fluence,
        "readout_sigma": float(readout_sigma) if "G" in arts else 0.0,
        "beamstop_radius_px": float(beamstop_radius) if "B" in arts else 0.0,
        "mask_file": os.fspath(mask) if isinstance(mask, (str, os.PathLike)) else "",
        "mask_bin": int(mask_bin),
        "background_file": os.fspath(background) if isinstance(background, (str, os.PathLike)) else
        ("<array>" if background is not None else ""),
        "background_photons_per_pattern": float(bg_map[good].sum()) if bg_map is not None else 0.0,
        "orientations": orientations_label or "uniform",
        "truth_grid": int(truth_grid),
        "chunk": int(chunk),
        "software_version": __version__,
    }
    total = 0.0
    with H5Writer(path, geom, with_truth=True, expected_patterns=n_patterns, simulation_attrs=attrs) as writer:
        writer.set_truth_attrs({"photons_per_unit_intensity": c})
        with tqdm(total=n_patterns, disable=not progress, desc="simulate", unit="pat") as bar:
            for start in range(0, n_patterns, chunk):
                batch = min(chunk, n_patterns - start)
                if fixed_quats is not None:
                    quats = fixed_quats[start : start + batch]
                else:
                    quats = random_quaternions(batch, rng_pose)
                scales = sample_jitter(fluence_jitter, batch, rng_jitter) if "F" in arts else np.ones(batch)
                lam = expected_photons(mol, q, weights, quaternions_to_rotations(quats), c, scales)
                if bg_map is not None:
                    lam = lam + bg_map[good][None, :]
                _check_int32(lam, start, c)
                values = rng_noise.poisson(lam).astype(np.float64) if "P" in arts else lam
                if "G" in arts and readout_sigma > 0:
                    values = values + readout_sigma * rng_noise.standard_normal(values.shape)
                counts_good = np.rint(np.clip(values, 0.0, None))
                counts = np.zeros((batch, *geom.shape), dtype=np.int32)
                counts[:, good] = counts_good
                writer.append(counts, quats, scales)
                total += float(counts_good.sum())
                bar.update(batch)
        if truth_grid:
            transform, voxel = transform_on_grid(mol, int(truth_grid), geom.q_max)
            writer.write_truth_intensity(intensity_from_transform(transform), voxel)
            writer.write_truth_density(*density_from_transform(transform, voxel))
    return SimulationSummary(
        path=Path(path),
        n_patterns=n_patterns,
        mean_photons=total / n_patterns,
        fluence=fluence,
        photons_per_unit_intensity=c,
        n_good_pixels=int(good.sum()),
    )


#: the largest count a pattern file holds (``/data/counts`` is int32)
INT32_MAX = int(np.iinfo(np.int32).max)


def _check_int32(lam: np.ndarray, start: int, photons_per_unit: float) -> None:
    """Expected counts beyond what int32 (and Poisson sampling) can hold would wrap around or fail inside
    numpy: say so, with the number and what to change."""
    peak = float(np.max(lam)) if lam.size else 0.0
    if not np.isfinite(peak) or peak > INT32_MAX / 2:
        raise ValueError(
            f"counts: expected at most {INT32_MAX} photons in a pixel (the data file stores int32 counts), got an "
            f"expected {peak:.3g} photons in a pixel of pattern {start + int(np.argmax(lam.max(axis=-1)))} "
            f"(fluence x r_e^2 = {photons_per_unit:.3g}): lower {flag('mean_photons')} or {flag('photons_per_pulse')}")


#: alias kept for callers that use the longer name
simulate_to_h5 = simulate
