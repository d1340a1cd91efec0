"""Heterogeneous ensembles: a cube-to-sphere shape family and multi-state structure mixtures.

Two kinds of ensemble, each written in the bayes-spi HDF5 format with the per-pattern truth:

* ``shapes``: uniform-density superellipsoids ``|x|^p + |y|^p + |z|^p <= a^p`` (``p = 2`` a sphere of
  radius ``a``, ``p -> inf`` a cube of edge ``2 a``). By default every shape has the same volume
  ``V = 4/3 pi r0^3`` (``a`` follows from ``p``, :func:`superellipsoid_half_width`), so shapes differ in
  form, not in their forward scattering ``F(0) = rho V``. The exponent of pattern ``i`` is either one of
  a few discrete values (classes; ``/truth/class`` and ``/truth/latent = p_i``) or drawn log-uniformly
  in a range (``/truth/latent = p_i`` only).
* ``structures``: a mixture of atomic structures (two conformations, two proteins); the state of each
  pattern is ``/truth/class``. A member ``NAME@hinge=DEG`` is ``NAME`` with one half swung open about a
  hinge by ``DEG`` degrees (:mod:`bayes_spi.sim.hinge`): ``structures:2CEX,2CEX@hinge=25`` is a two-state
  conformational mixture.

The transform of a shape is exact for its voxelisation: the density is a sum of uniform cubic voxels
of edge ``h`` with occupancy ``o_m`` (the fraction of the voxel inside the body, exact 0/1 away from
the surface, sub-sampled on ``s^3`` points in the voxels that the surface cuts), and a uniform cube
centred at ``r_m`` has the transform ``h^3 exp(2 pi i q . r_m) sinc(q_x h) sinc(q_y h) sinc(q_z h)``
(``sinc(x) = sin(pi x) / (pi x)``). The sum over voxels is the same type-3 NUFFT
(``finufft.nufft3d3``, ``isign=+1``) that :func:`bayes_spi.sim.transform.molecular_transform` uses for
atoms: ``F(q) = rho_e h^3 S(q) sum_m o_m exp(2 pi i q . r_m)`` in electrons (``rho_e`` in electrons/A^3).
For ``p = 2`` it converges to the closed-form sphere transform ``rho_e V 3 (sin x - x cos x) / x^3``,
``x = 2 pi |q| a`` (:func:`sphere_transform`), as ``h -> 0``.

Example:
    >>> import numpy as np
    >>> round(superellipsoid_volume(10.0, 2.0) / (4 / 3 * np.pi * 1000.0), 6)
    1.0
    >>> F = superellipsoid_transform(np.zeros((1, 3)), 10.0, 2.0, rho_e=1.0, n_voxels=24)
    >>> round(float(F.real[0] / (4 / 3 * np.pi * 1000.0)), 3)
    1.0
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import finufft
import numpy as np
from tqdm import tqdm

from bayes_spi import __version__
from bayes_spi.dataio.h5 import H5Writer, quaternions_to_rotations
from bayes_spi.geometry import Geometry, get_preset
from bayes_spi.sim.fluence import CLASSICAL_ELECTRON_RADIUS_A, parse_jitter, sample_jitter
from bayes_spi.sim.simulate import (
    SimulationSummary,
    beamstop_mask,
    pixel_weights,
    random_quaternions,
)
from bayes_spi.sim.hinge import load_ensemble_member
from bayes_spi.sim.structure import Structure

__all__ = [
    "ENSEMBLE_KINDS",
    "EnsembleSpec",
    "parse_ensemble",
    "superellipsoid_volume",
    "superellipsoid_half_width",
    "superellipsoid_voxels",
    "voxel_transform",
    "superellipsoid_transform",
    "sphere_transform",
    "simulate_ensemble",
    "read_truth_labels",
]

ENSEMBLE_KINDS = ("shapes", "structures")

#: electron density of gold (electrons / A^3): 19.3 g/cm^3, Z = 79, 196.97 g/mol
GOLD_ELECTRON_DENSITY = 19.3 / 196.97 * 6.02214076e23 * 79 / 1e24


# ====================================================================== shapes
def superellipsoid_volume(a: float, p: float) -> float:
    """Volume of ``|x|^p + |y|^p + |z|^p <= a^p``: ``8 a^3 Gamma(1 + 1/p)^3 / Gamma(1 + 3/p)`` (A^3)."""
    _check_shape(a, p)
    return 8.0 * a**3 * math.gamma(1.0 + 1.0 / p) ** 3 / math.gamma(1.0 + 3.0 / p)


def superellipsoid_half_width(volume: float, p: float) -> float:
    """The half-width ``a`` (A) of the superellipsoid of exponent ``p`` with the given volume (A^3)."""
    if not (volume > 0 and math.isfinite(volume)):
        raise ValueError(f"volume: expected a positive number, got {volume!r}")
    return (volume / superellipsoid_volume(1.0, p)) ** (1.0 / 3.0)


def _check_shape(a: float, p: float) -> None:
    if not (a > 0 and math.isfinite(a)):
        raise ValueError(f"half-width a: expected a positive number (A), got {a!r}")
    if not (p >= 1 and math.isfinite(p)):
        raise ValueError(f"exponent p: expected a finite number >= 1 (2 = sphere, large = cube), got {p!r}")


def superellipsoid_voxels(a: float, p: float, n_voxels: int = 40, supersample: int = 6
                          ) -> tuple[np.ndarray, np.ndarray, float]:
    """Voxelise the body ``|x|^p + |y|^p + |z|^p <= a^p`` on ``n_voxels^3`` voxels over ``[-a, a]^3``.

    The occupancy of a voxel is exact where the voxel is wholly inside (the largest value of the convex,
    separable ``f = sum |x_i / a|^p`` over a box is at its corner farthest from 0 in every coordinate) or
    wholly outside (smallest value at the point nearest 0 in every coordinate); voxels cut by the
    surface get the fraction of ``supersample^3`` regular sub-points inside.

    Returns:
        ``(centres (V, 3) A, occupancy (V,) in (0, 1], h)``: the occupied voxels and the voxel edge ``h`` (A).
    """
    _check_shape(a, p)
    if n_voxels < 2 or supersample < 1:
        raise ValueError(f"expected n_voxels >= 2 and supersample >= 1, got {n_voxels}, {supersample}")
    h = 2.0 * a / n_voxels
    axis = (np.arange(n_voxels) - (n_voxels - 1) / 2.0) * h
    lo, hi = np.abs(axis - h / 2) / a, np.abs(axis + h / 2) / a
    far = np.maximum(lo, hi) ** p  # (n,) per-axis largest |x/a|^p over the voxel
    near = np.where((axis - h / 2) * (axis + h / 2) <= 0, 0.0, np.minimum(lo, hi) ** p)
    f_max = far[:, None, None] + far[None, :, None] + far[None, None, :]
    f_min = near[:, None, None] + near[None, :, None] + near[None, None, :]
    occ = (f_max <= 1.0).astype(np.float64)
    cut = np.argwhere((f_max > 1.0) & (f_min < 1.0))  # (C, 3) voxel indices the surface cuts
    if len(cut):
        sub = ((np.arange(supersample) + 0.5) / supersample - 0.5) * h  # (s,)
        cx, cy, cz = (axis[cut[:, k]] for k in range(3))
        fx = np.abs((cx[:, None] + sub) / a) ** p  # (C, s)
        fy = np.abs((cy[:, None] + sub) / a) ** p
        fz = np.abs((cz[:, None] + sub) / a) ** p
        inside = (fx[:, :, None, None] + fy[:, None, :, None] + fz[:, None, None, :]) <= 1.0
        occ[cut[:, 0], cut[:, 1], cut[:, 2]] = inside.reshape(len(cut), -1).mean(axis=1)
    idx = np.argwhere(occ > 0)
    return axis[idx], occ[idx[:, 0], idx[:, 1], idx[:, 2]], h


def voxel_transform(centres: np.ndarray, weights: np.ndarray, h: float, q: np.ndarray, *,
                    eps: float = 1e-9) -> np.ndarray:
    """Transform of a sum of uniform cubic voxels: ``S(q) sum_m w_m exp(2 pi i q . r_m)``, ``S`` the box factor.

    Args:
        centres: ``(V, 3)`` voxel centres (A).
        weights: ``(V,)`` electrons in each voxel.
        h: voxel edge (A).
        q: ``(..., 3)`` scattering vectors (1/A).
        eps: NUFFT relative precision.

    Returns:
        ``F(q)`` complex128 ``(...)`` in electrons.
    """
    arr = np.asarray(q, dtype=np.float64)
    if arr.ndim < 1 or arr.shape[-1] != 3:
        raise ValueError(f"q: expected shape (..., 3), got {arr.shape}")
    pts = np.asarray(centres, dtype=np.float64)
    w = np.asarray(weights, dtype=np.complex128)
    if pts.ndim != 2 or pts.shape[1] != 3 or w.shape != (len(pts),):
        raise ValueError(f"expected centres (V, 3) and weights (V,), got shapes {pts.shape} and {w.shape}")
    flat = np.ascontiguousarray(arr.reshape(-1, 3))
    if flat.shape[0] == 0:
        return np.zeros(arr.shape[:-1], dtype=np.complex128)
    two_pi = 2.0 * np.pi
    out = finufft.nufft3d3(
        np.ascontiguousarray(pts[:, 0]), np.ascontiguousarray(pts[:, 1]), np.ascontiguousarray(pts[:, 2]), w,
        np.ascontiguousarray(two_pi * flat[:, 0]), np.ascontiguousarray(two_pi * flat[:, 1]),
        np.ascontiguousarray(two_pi * flat[:, 2]), eps=eps, isign=1)
    box = np.sinc(flat[:, 0] * h) * np.sinc(flat[:, 1] * h) * np.sinc(flat[:, 2] * h)
    return (out * box).reshape(arr.shape[:-1])


def superellipsoid_transform(q: np.ndarray, a: float, p: float, rho_e: float = GOLD_ELECTRON_DENSITY,
                             n_voxels: int = 40, supersample: int = 6) -> np.ndarray:
    """``F(q)`` (electrons, complex128 ``(...)``) of the uniform superellipsoid of half-width ``a`` (A),
    exponent ``p`` and electron density ``rho_e`` (electrons/A^3), at ``q (..., 3)`` (1/A)."""
    centres, occ, h = superellipsoid_voxels(a, p, n_voxels, supersample)
    return voxel_transform(centres, occ * (rho_e * h**3), h, q)


def sphere_transform(q_norm: np.ndarray, radius: float, rho_e: float = GOLD_ELECTRON_DENSITY) -> np.ndarray:
    """Closed form of a uniform sphere: ``F = rho_e V 3 (sin x - x cos x) / x^3``, ``x = 2 pi |q| R`` (real)."""
    x = 2.0 * np.pi * np.asarray(q_norm, dtype=np.float64) * radius
    volume = 4.0 / 3.0 * np.pi * radius**3
    small = x < 1e-3
    xs = np.where(small, 1.0, x)
    shape = np.where(small, 1.0 - x**2 / 10.0, 3.0 * (np.sin(xs) - xs * np.cos(xs)) / xs**3)
    return rho_e * volume * shape


# ====================================================================== ensemble spec
@dataclass(frozen=True)
class EnsembleSpec:
    """What varies from pattern to pattern.

    Attributes:
        kind: ``shapes`` or ``structures``.
        exponents: ``shapes``: the class exponents (discrete) or ``(p_min, p_max)`` with ``continuous``.
        continuous: ``shapes``: draw ``p`` log-uniformly in ``[p_min, p_max]`` (no classes).
        radius: ``shapes``: radius of the equal-volume sphere ``r0`` (A); with ``equal_volume=False`` the
            half-width ``a`` of every shape.
        equal_volume: ``shapes``: every shape has the volume of the sphere of radius ``radius``.
        rho_e: ``shapes``: electron density (electrons/A^3; default gold).
        structures: ``structures``: names (built-in ``2CEX``, ``1EI7``) or PDB/mmCIF paths, one per class; a
            suffix ``@hinge=DEG`` makes a hinge-moved copy (:mod:`bayes_spi.sim.hinge`).
        fractions: class fractions (default equal); ignored for continuous shapes.
        n_voxels: ``shapes``: voxels across the body (edge ``h = 2 a / n_voxels``).
        levels: continuous ``shapes``: ``p`` is drawn log-uniformly, then snapped to the nearest of
            ``levels`` log-spaced exponents over the range (so patterns share transforms; the stored
            truth is the snapped, exact exponent).
    """

    kind: str
    exponents: tuple[float, ...] = (2.0, 20.0)
    continuous: bool = False
    radius: float = 30.0
    equal_volume: bool = True
    rho_e: float = GOLD_ELECTRON_DENSITY
    structures: tuple[str, ...] = ()
    fractions: tuple[float, ...] = ()
    n_voxels: int = 40
    levels: int = 32

    def __post_init__(self) -> None:
        if self.kind not in ENSEMBLE_KINDS:
            raise ValueError(f"ensemble kind: expected one of {', '.join(ENSEMBLE_KINDS)}, got {self.kind!r}")
        if self.kind == "shapes":
            if any(not (p >= 1 and math.isfinite(p)) for p in self.exponents) or not self.exponents:
                raise ValueError(f"exponents: expected finite numbers >= 1, got {self.exponents!r}")
            if self.continuous and (len(self.exponents) != 2 or self.exponents[0] >= self.exponents[1]):
                raise ValueError(f"exponents: expected (p_min, p_max) with p_min < p_max for a continuous "
                                 f"ensemble, got {self.exponents!r}")
            if not (self.radius > 0 and self.rho_e > 0):
                raise ValueError(f"expected a positive radius and rho_e, got {self.radius!r}, {self.rho_e!r}")
        elif len(self.structures) < 1:
            raise ValueError("structures: expected at least one structure for a 'structures' ensemble, got none")
        if self.n_voxels < 8 or self.levels < 2:
            raise ValueError(f"expected n_voxels >= 8 and levels >= 2, got {self.n_voxels}, {self.levels}")
        n = self.n_classes
        if self.fractions and (len(self.fractions) != n or any(f < 0 for f in self.fractions)
                               or sum(self.fractions) <= 0):
            raise ValueError(f"fractions: expected {n} non-negative numbers with a positive sum, got "
                             f"{self.fractions!r}")

    @property
    def n_classes(self) -> int:
        """Number of discrete classes (0 for a continuous shape ensemble)."""
        if self.kind == "structures":
            return len(self.structures)
        return 0 if self.continuous else len(self.exponents)

    def class_probs(self) -> np.ndarray:
        """``(C,)`` class fractions (normalised)."""
        n = self.n_classes
        w = np.asarray(self.fractions, dtype=np.float64) if self.fractions else np.ones(n)
        return w / w.sum()

    def half_width(self, p: float) -> float:
        """Half-width ``a`` (A) of the shape of exponent ``p``."""
        if self.equal_volume:
            return superellipsoid_half_width(4.0 / 3.0 * math.pi * self.radius**3, p)
        return float(self.radius)


def parse_ensemble(spec: str) -> EnsembleSpec:
    """Parse ``shapes:p=2,20`` (classes), ``shapes:p=2..20`` (continuous, log-uniform),
    ``structures:2CEX,1EI7``; options after ``;``: ``radius=30``, ``fractions=0.5,0.5``, ``rho=4.66``,
    ``equal_volume=0``, ``voxels=40``, ``levels=32``.

    Example:
        >>> parse_ensemble("shapes:p=2..12;radius=25").continuous
        True
    """
    text = spec.strip()
    kind, _, rest = text.partition(":")
    kind = kind.strip().lower()
    parts = [s.strip() for s in rest.split(";") if s.strip()]
    kwargs: dict[str, Any] = {"kind": kind}
    try:
        if kind == "structures":
            if not parts:
                raise ValueError("no structures")
            kwargs["structures"] = tuple(s.strip() for s in parts.pop(0).split(",") if s.strip())
        for part in parts:
            key, _, value = part.partition("=")
            key = key.strip().lower()
            if key == "p":
                if ".." in value:
                    lo, hi = value.split("..")
                    kwargs["exponents"], kwargs["continuous"] = (float(lo), float(hi)), True
                else:
                    kwargs["exponents"] = tuple(float(v) for v in value.split(","))
            elif key == "radius":
                kwargs["radius"] = float(value)
            elif key == "rho":
                kwargs["rho_e"] = float(value)
            elif key == "fractions":
                kwargs["fractions"] = tuple(float(v) for v in value.split(","))
            elif key == "equal_volume":
                kwargs["equal_volume"] = value.strip() not in ("0", "false", "no")
            elif key == "voxels":
                kwargs["n_voxels"] = int(value)
            elif key == "levels":
                kwargs["levels"] = int(value)
            else:
                raise ValueError(f"unknown option {key!r}")
    except ValueError as exc:
        raise ValueError(f"ensemble: expected 'shapes:p=2,20', 'shapes:p=2..20' or 'structures:2CEX,1EI7' with "
                         f"options radius=, fractions=, rho=, equal_volume=, voxels=, levels=; got {spec!r} ({exc})") from exc
    return EnsembleSpec(**kwargs)


# ====================================================================== simulation
class _ShapeBank:
    """Voxelised shapes, cached by exponent (a discrete ensemble reuses its few voxelisations)."""

    def __init__(self, spec: EnsembleSpec) -> None:
        self.spec = spec
        self._cache: dict[float, tuple[np.ndarray, np.ndarray, float]] = {}

    def transform(self, p: float, q: np.ndarray) -> np.ndarray:
        if p not in self._cache:
            if len(self._cache) >= 33:
                self._cache.clear()
            centres, occ, h = superellipsoid_voxels(self.spec.half_width(p), p, self.spec.n_voxels)
            self._cache[p] = (centres, occ * (self.spec.rho_e * h**3), h)
        return voxel_transform(*self._cache[p], q, eps=1e-7)


def _class_labels(spec: EnsembleSpec, n: int, rng: np.random.Generator) -> tuple[np.ndarray | None, np.ndarray]:
    """``(classes (N,) or None, latent (N, 1))``: the exponent (shapes) or the class (structures)."""
    if spec.kind == "shapes" and spec.continuous:
        grid = np.exp(np.linspace(*np.log(spec.exponents), spec.levels))
        draw = rng.uniform(math.log(grid[0]), math.log(grid[-1]), size=n)
        return None, grid[np.abs(draw[:, None] - np.log(grid)[None, :]).argmin(axis=1)][:, None]
    classes = rng.choice(spec.n_classes, size=n, p=spec.class_probs())
    if spec.kind == "shapes":
        return classes, np.asarray(spec.exponents, dtype=np.float64)[classes][:, None]
    return classes, classes[:, None].astype(np.float64)


def simulate_ensemble(
    ensemble: EnsembleSpec | str,
    geometry: Geometry | str,
    n_patterns: int,
    path: str | os.PathLike[str],
    *,
    mean_photons: float = 1e3,
    fluence_jitter: str = "lognormal:0.3",
    beamstop_radius: float = 2.0,
    seed: int = 0,
    chunk: int = 1024,
    progress: bool = True,
) -> SimulationSummary:
    """Simulate a heterogeneous data set: Poisson patterns (artifacts ``F``, ``P``, ``B`` as in
    :func:`bayes_spi.sim.simulate.simulate`) of a random member of the ensemble at a uniform pose.

    The fluence gives ``mean_photons`` expected photons per pattern averaged over the ensemble's members
    (calibrated on its classes, or on 8 exponents spread over a continuous range) at ``gamma = 1``.
    Besides ``/truth/quaternions`` and ``/truth/scales``, the file holds ``/truth/latent`` ``(N, 1)`` (the
    exponent ``p``, or the class as a number) and, for a discrete ensemble, ``/truth/class`` ``(N,)``.

    Raises:
        ValueError: bad settings (messages say what was expected).
    """
    spec = parse_ensemble(ensemble) if isinstance(ensemble, str) else ensemble
    if isinstance(n_patterns, bool) or int(n_patterns) != n_patterns or n_patterns < 1:
        raise ValueError(f"n_patterns: expected a positive integer, got {n_patterns!r}")
    if not (mean_photons > 0 and math.isfinite(mean_photons)):
        raise ValueError(f"mean_photons: expected a positive number, got {mean_photons!r}")
    parse_jitter(fluence_jitter)
    n_patterns = int(n_patterns)
    geom = get_preset(geometry) if isinstance(geometry, str) else geometry
    good = np.ones(geom.shape, dtype=bool)
    if geom.detector.mask is not None:
        good &= geom.detector.mask
    if beamstop_radius > 0:
        good &= beamstop_mask(geom, beamstop_radius)
    geom = geom.with_mask(good)
    q = geom.q_vectors()[good]
    weights = pixel_weights(geom)[good]
    rng_label, rng_pose, rng_jitter, rng_noise, rng_calib = (
        np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(5))
    classes, latent = _class_labels(spec, n_patterns, rng_label)
    bank = _ShapeBank(spec) if spec.kind == "shapes" else None
    mols: list[Structure] = [load_ensemble_member(s) for s in spec.structures] if spec.kind == "structures" else []

    def intensity(member: float | int, rotated: np.ndarray) -> np.ndarray:
        if bank is not None:
            return np.abs(bank.transform(float(member), rotated)) ** 2
        return np.abs(_structure_transform(mols[int(member)], rotated)) ** 2

    # ---- fluence: mean photons over the ensemble's members at gamma = 1
    if spec.kind == "shapes":
        members: list[float] = (list(np.exp(np.linspace(*np.log(spec.exponents), 8))) if spec.continuous
                                else list(spec.exponents))
        member_w = np.ones(len(members)) / len(members) if spec.continuous else spec.class_probs()
    else:
        members, member_w = list(range(len(mols))), spec.class_probs()
    rot_cal = quaternions_to_rotations(random_quaternions(64, rng_calib))
    rotated_cal = np.einsum("bij,kj->bki", rot_cal, q)
    per_unit = sum(w * (intensity(m, rotated_cal) * weights).sum(axis=1).mean() for m, w in zip(members, member_w))
    c = float(mean_photons / per_unit)
    fluence = c / CLASSICAL_ELECTRON_RADIUS_A**2
    attrs: dict[str, Any] = {
        "ensemble": spec.kind,
        "ensemble_exponents": ",".join(f"{p:g}" for p in spec.exponents) if spec.kind == "shapes" else "",
        "ensemble_continuous": bool(spec.continuous),
        "ensemble_radius_A": float(spec.radius) if spec.kind == "shapes" else "",
        "ensemble_equal_volume": bool(spec.equal_volume),
        "ensemble_rho_e": float(spec.rho_e) if spec.kind == "shapes" else "",
        "ensemble_voxels": int(spec.n_voxels) if spec.kind == "shapes" else "",
        "structure": ",".join(spec.structures),
        "class_fractions": ",".join(f"{f:g}" for f in spec.class_probs()) if spec.n_classes else "",
        "seed": int(seed),
        "artifacts": "FPB",
        "n_patterns": n_patterns,
        "fluence_jitter": fluence_jitter,
        "mean_photons_target": float(mean_photons),
        "fluence_photons_per_A2": fluence,
        "beamstop_radius_px": float(beamstop_radius),
        "orientations": "uniform",
        "software_version": __version__,
    }
    total = 0.0
    with H5Writer(path, geom, with_truth=True, expected_patterns=n_patterns, simulation_attrs=attrs) as writer:
        writer.set_truth_attrs({"photons_per_unit_intensity": c})
        with tqdm(total=n_patterns, disable=not progress, desc="simulate ensemble", unit="pat") as bar:
            for start in range(0, n_patterns, chunk):
                batch = min(chunk, n_patterns - start)
                quats = random_quaternions(batch, rng_pose)
                rots = quaternions_to_rotations(quats)
                scales = sample_jitter(fluence_jitter, batch, rng_jitter)
                lam = np.empty((batch, len(q)))
                rotated = np.einsum("bij,kj->bki", rots, q)  # (B, K, 3)
                member = (classes[start:start + batch] if classes is not None and spec.kind == "structures"
                          else latent[start:start + batch, 0])
                for value in np.unique(member):
                    sel = member == value
                    lam[sel] = intensity(value, rotated[sel])
                lam *= c * weights[None, :] * scales[:, None]
                counts_good = rng_noise.poisson(lam)
                counts = np.zeros((batch, *geom.shape), dtype=np.int32)
                counts[:, good] = counts_good
                writer.append(counts, quats, scales)
                total += float(counts_good.sum())
                bar.update(batch)
        writer.write_truth_labels(latent=latent, classes=classes,
                                  latent_names=("exponent",) if spec.kind == "shapes" else ("state",))
    return SimulationSummary(Path(path), n_patterns, total / n_patterns, fluence, c, int(good.sum()))


def _structure_transform(mol: Structure, q: np.ndarray) -> np.ndarray:
    from bayes_spi.sim.transform import molecular_transform

    return molecular_transform(mol, q)


def read_truth_labels(path: str | os.PathLike[str]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(latent (N, d) or None, classes (N,) or None)`` from ``/truth/latent`` and ``/truth/class``."""
    from bayes_spi.dataio.h5open import open_h5

    with open_h5(path, "a data file with /truth (HDF5)") as f:
        truth = f.get("truth")
        latent = np.asarray(truth["latent"][()], dtype=np.float64) if truth is not None and "latent" in truth else None
        classes = np.asarray(truth["class"][()], dtype=np.int64) if truth is not None and "class" in truth else None
    return latent, classes
