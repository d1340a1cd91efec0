"""Experiment geometry: X-ray beam and flat pixel detector, and the scattering vectors they define.

Convention (used everywhere in bayes-spi)
-----------------------------------------
* The beam travels along lab ``+z``; the incident wave vector is ``k_in = (0, 0, 1/lambda)`` in 1/A.
* Scattering vectors carry **no** factor ``2*pi``: ``|q| = 2 sin(theta) / lambda`` (``2 theta`` is the
  scattering angle), so a real-space period ``d`` corresponds to ``|q| = 1/d``.
* The detector is a flat ``n_y x n_x`` grid of square pixels (side ``pixel_size_m``) perpendicular to the
  beam at distance ``D = distance_m``, centred on the beam. Pixel ``(iy, ix)`` has its centre at lab
  position ``(u, v, D)`` with ``u = (ix - (n_x - 1)/2) * pixel``, ``v = (iy - (n_y - 1)/2) * pixel``.
* ``k_out = (u, v, D) / (|(u, v, D)| * lambda)`` and ``q = k_out - k_in`` (so every ``q`` lies on the
  Ewald sphere ``|q + k_in| = 1/lambda``).
* All per-pixel arrays are indexed ``[iy, ix]``; ``q[..., 0]`` is along lab ``x`` (the ``ix`` direction),
  ``q[..., 1]`` along ``y`` (``iy``), ``q[..., 2]`` along the beam.
* Polarization ``"x"`` / ``"y"``: linear, electric field along lab ``x`` / ``y``; factor
  ``1 - (k_out_x / |k_out|)^2`` (resp. ``_y``). ``"unpolarized"``: ``(1 + cos^2 2theta) / 2``.
  ``"none"``: factor 1 (for comparison with papers that omit it).
* ``q_max`` is ``|q|`` at the *outer corner of the detector* (the edge of the corner pixel, not its
  centre), so it does not change when the detector is binned; ``corner_resolution_A = 1 / q_max``
  (7.97 A for ``reference-128``).
* ``field_of_view_A = D * lambda / pixel``: the inverse of the ``q`` spacing between adjacent pixels at
  the detector centre (small-angle limit); the largest object the sampling resolves without aliasing
  (Shannon/oversampling aside): 690 / 345 / 172.5 A for the 128 / 64 / 32 pixel presets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "HC_EV_A",
    "POLARIZATIONS",
    "Beam",
    "Detector",
    "Geometry",
    "PRESETS",
    "get_preset",
]

#: h*c in eV * Angstrom: ``lambda[A] = HC_EV_A / E[eV]``
HC_EV_A: float = 12398.4198

#: accepted polarization names
POLARIZATIONS: tuple[str, ...] = ("x", "y", "unpolarized", "none")


@dataclass(frozen=True)
class Beam:
    """Monochromatic X-ray beam along lab ``+z``.

    Attributes:
        photon_energy_ev: photon energy in eV (> 0).
        polarization: ``"x"``, ``"y"`` (linear, E-field along lab x / y), ``"unpolarized"`` or ``"none"``.
    """

    photon_energy_ev: float
    polarization: str = "x"

    def __post_init__(self) -> None:
        energy = float(self.photon_energy_ev)
        if not math.isfinite(energy) or energy <= 0:
            raise ValueError(f"photon_energy_ev: expected a positive finite number, got {self.photon_energy_ev!r}")
        object.__setattr__(self, "photon_energy_ev", energy)
        if self.polarization not in POLARIZATIONS:
            raise ValueError(f"polarization: expected one of {POLARIZATIONS}, got {self.polarization!r}")

    @property
    def wavelength_A(self) -> float:
        """Wavelength in Angstrom, ``12398.4198 / E[eV]``."""
        return HC_EV_A / self.photon_energy_ev


@dataclass(frozen=True, eq=False)
class Detector:
    """Flat square-pixel detector perpendicular to the beam, centred on it.

    Attributes:
        n_x: number of pixel columns (``ix``).
        n_y: number of pixel rows (``iy``).
        pixel_size_m: pixel side in metres.
        distance_m: sample-detector distance in metres.
        mask: optional ``(n_y, n_x)`` bool array, True = good pixel (None: all good).
    """

    n_x: int
    n_y: int
    pixel_size_m: float
    distance_m: float
    mask: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("n_x", "n_y"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or int(value) <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        for name in ("pixel_size_m", "distance_m"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name}: expected a positive finite number, got {getattr(self, name)!r}")
            object.__setattr__(self, name, value)
        if self.mask is not None:
            mask = np.asarray(self.mask)
            if mask.shape != (self.n_y, self.n_x):
                raise ValueError(f"mask: expected shape (n_y, n_x) = {(self.n_y, self.n_x)}, got {mask.shape}")
            if mask.dtype != np.bool_:
                if not np.all((mask == 0) | (mask == 1)):
                    raise ValueError("mask: expected boolean values (True/1 = good pixel), got other values")
                mask = mask.astype(bool)
            mask = mask.copy()
            mask.setflags(write=False)
            object.__setattr__(self, "mask", mask)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Detector):
            return NotImplemented
        scalars_equal = (self.n_x, self.n_y, self.pixel_size_m, self.distance_m) == (
            other.n_x,
            other.n_y,
            other.pixel_size_m,
            other.distance_m,
        )
        if not scalars_equal:
            return False
        if self.mask is None or other.mask is None:
            return (self.mask is None or bool(self.mask.all())) and (other.mask is None or bool(other.mask.all()))
        return bool(np.array_equal(self.mask, other.mask))

    def __hash__(self) -> int:
        return hash((self.n_x, self.n_y, self.pixel_size_m, self.distance_m))


@dataclass(frozen=True, eq=False)
class Geometry:
    """Beam + detector; computes per-pixel ``q``, solid angle and polarization factor.

    Attributes:
        beam: the :class:`Beam`.
        detector: the :class:`Detector` (with its optional mask).
        name: optional preset / user name.
    """

    beam: Beam
    detector: Detector
    name: str | None = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Geometry):
            return NotImplemented
        return self.beam == other.beam and self.detector == other.detector

    def __hash__(self) -> int:
        return hash((self.beam, self.detector))

    # ----------------------------------------------------------------- basic quantities
    @property
    def shape(self) -> tuple[int, int]:
        """Detector shape ``(n_y, n_x)``."""
        return (self.detector.n_y, self.detector.n_x)

    @property
    def n_pixels(self) -> int:
        """Number of pixels ``n_y * n_x``."""
        return self.detector.n_y * self.detector.n_x

    @property
    def wavelength_A(self) -> float:
        """Wavelength in Angstrom."""
        return self.beam.wavelength_A

    @property
    def k_in(self) -> np.ndarray:
        """Incident wave vector ``(0, 0, 1/lambda)``, shape ``(3,)``, 1/A."""
        return np.array([0.0, 0.0, 1.0 / self.wavelength_A])

    def pixel_positions(self) -> np.ndarray:
        """Lab positions ``(u, v, D)`` of pixel centres in metres, shape ``(n_y, n_x, 3)``."""
        det = self.detector
        u = (np.arange(det.n_x) - (det.n_x - 1) / 2.0) * det.pixel_size_m
        v = (np.arange(det.n_y) - (det.n_y - 1) / 2.0) * det.pixel_size_m
        vv, uu = np.meshgrid(v, u, indexing="ij")
        return np.stack([uu, vv, np.full_like(uu, det.distance_m)], axis=-1)

    def q_vectors(self) -> np.ndarray:
        """Scattering vectors ``q = k_out - k_in`` of pixel centres, shape ``(n_y, n_x, 3)``, 1/A (no 2*pi)."""
        pos = self.pixel_positions()
        u, v, d = pos[..., 0], pos[..., 1], pos[..., 2]
        r = np.sqrt(u * u + v * v + d * d)
        lam = self.wavelength_A
        qx = u / (r * lam)
        qy = v / (r * lam)
        # (D/r - 1)/lambda written without cancellation
        qz = -(u * u + v * v) / (r * (r + d) * lam)
        return np.stack([qx, qy, qz], axis=-1)

    def q_magnitudes(self) -> np.ndarray:
        """``|q|`` of pixel centres, shape ``(n_y, n_x)``, 1/A."""
        return np.linalg.norm(self.q_vectors(), axis=-1)

    def solid_angle(self) -> np.ndarray:
        """Exact solid angle of each (rectangular, flat) pixel seen from the sample, shape ``(n_y, n_x)``, sr.

        Uses ``Omega = sum_corners +-arctan(x y / (D sqrt(x^2 + y^2 + D^2)))`` over the pixel's corners, so
        the total equals the detector's exact angular area ``4 arcsin(ab / sqrt((a^2+4D^2)(b^2+4D^2)))``.
        """
        det = self.detector
        d = det.distance_m
        xe = (np.arange(det.n_x + 1) - det.n_x / 2.0) * det.pixel_size_m
        ye = (np.arange(det.n_y + 1) - det.n_y / 2.0) * det.pixel_size_m
        ygrid, xgrid = np.meshgrid(ye, xe, indexing="ij")
        corner = np.arctan(xgrid * ygrid / (d * np.sqrt(xgrid**2 + ygrid**2 + d**2)))
        return corner[1:, 1:] - corner[1:, :-1] - corner[:-1, 1:] + corner[:-1, :-1]

    def polarization_factor(self) -> np.ndarray:
        """Polarization factor of each pixel, shape ``(n_y, n_x)`` (see the module docstring)."""
        pos = self.pixel_positions()
        r2 = np.sum(pos**2, axis=-1)
        pol = self.beam.polarization
        if pol == "x":
            return 1.0 - pos[..., 0] ** 2 / r2
        if pol == "y":
            return 1.0 - pos[..., 1] ** 2 / r2
        if pol == "unpolarized":
            cos2 = pos[..., 2] ** 2 / r2
            return 0.5 * (1.0 + cos2)
        return np.ones(self.shape)

    def pixel_factor(self) -> np.ndarray:
        """Solid angle times polarization factor of each pixel, ``P_k * Omega_k``, shape ``(n_y, n_x)`` (sr):
        what multiplies ``r_e^2 * fluence * I(q)`` in the expected photon count."""
        return self.solid_angle() * self.polarization_factor()

    def good_pixels(self) -> np.ndarray:
        """Good-pixel mask, shape ``(n_y, n_x)`` bool (all True without a mask)."""
        if self.detector.mask is None:
            return np.ones(self.shape, dtype=bool)
        return np.array(self.detector.mask, dtype=bool)

    @property
    def q_max(self) -> float:
        """``|q|`` at the outer corner of the detector (edge of the corner pixel), 1/A."""
        det = self.detector
        a = det.n_x * det.pixel_size_m / 2.0
        b = det.n_y * det.pixel_size_m / 2.0
        d = det.distance_m
        r = math.sqrt(a * a + b * b + d * d)
        sin_theta = math.sqrt((1.0 - d / r) / 2.0)
        return 2.0 * sin_theta / self.wavelength_A

    @property
    def q_max_pixel_centres(self) -> float:
        """Largest ``|q|`` over pixel centres, 1/A (slightly below :attr:`q_max`)."""
        return float(self.q_magnitudes().max())

    @property
    def corner_resolution_A(self) -> float:
        """``1 / q_max`` in Angstrom."""
        return 1.0 / self.q_max

    @property
    def field_of_view_A(self) -> float:
        """``D * lambda / pixel``: inverse ``q`` spacing of adjacent pixels at the centre, Angstrom."""
        return self.detector.distance_m * self.wavelength_A / self.detector.pixel_size_m

    # ----------------------------------------------------------------- derived geometries
    def with_mask(self, mask: np.ndarray | None) -> Geometry:
        """Same geometry with ``mask`` (``(n_y, n_x)`` bool, True = good) replacing the detector mask."""
        det = self.detector
        new_det = Detector(det.n_x, det.n_y, det.pixel_size_m, det.distance_m, mask=mask)
        return Geometry(self.beam, new_det, self.name)

    def with_polarization(self, polarization: str) -> Geometry:
        """Same geometry with another polarization."""
        return Geometry(Beam(self.beam.photon_energy_ev, polarization), self.detector, self.name)

    def binned(self, factor: int) -> Geometry:
        """Detector binned ``factor x factor`` (same extent; a binned pixel is good if all its pixels are).

        Raises:
            ValueError: ``factor`` not a positive integer dividing ``n_x`` and ``n_y``.
        """
        det = self.detector
        if isinstance(factor, bool) or int(factor) != factor or factor < 1:
            raise ValueError(f"factor: expected a positive integer, got {factor!r}")
        factor = int(factor)
        if det.n_x % factor or det.n_y % factor:
            raise ValueError(f"factor: expected a divisor of n_x={det.n_x} and n_y={det.n_y}, got {factor}")
        mask = None
        if det.mask is not None:
            blocks = det.mask.reshape(det.n_y // factor, factor, det.n_x // factor, factor)
            mask = blocks.all(axis=(1, 3))
        new_det = Detector(det.n_x // factor, det.n_y // factor, det.pixel_size_m * factor, det.distance_m, mask)
        name = None if self.name is None else f"{self.name}/bin{factor}"
        return Geometry(self.beam, new_det, name)

    # ----------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain-scalar description (the mask is NOT included; store it separately)."""
        det = self.detector
        return {
            "name": self.name if self.name is not None else "",
            "photon_energy_ev": float(self.beam.photon_energy_ev),
            "polarization": self.beam.polarization,
            "pixel_size_m": float(det.pixel_size_m),
            "distance_m": float(det.distance_m),
            "n_x": int(det.n_x),
            "n_y": int(det.n_y),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], mask: np.ndarray | None = None) -> Geometry:
        """Inverse of :meth:`to_dict`; ``mask`` optional ``(n_y, n_x)`` bool.

        Raises:
            ValueError: a required key is missing or a value is invalid.
        """
        required = ("photon_energy_ev", "pixel_size_m", "distance_m", "n_x", "n_y")
        missing = [key for key in required if key not in data]
        if missing:
            raise ValueError(f"geometry: expected keys {required}, got missing {missing}")
        polarization = data.get("polarization", "x")
        if isinstance(polarization, bytes):
            polarization = polarization.decode()
        name = data.get("name") or None
        if isinstance(name, bytes):
            name = name.decode() or None
        beam = Beam(float(data["photon_energy_ev"]), str(polarization))
        det = Detector(
            int(data["n_x"]), int(data["n_y"]), float(data["pixel_size_m"]), float(data["distance_m"]), mask=mask
        )
        return cls(beam, det, None if name is None else str(name))


def _reference(n: int) -> Geometry:
    return Geometry(Beam(4600.0, "x"), Detector(n, n, 0.1 / n, 0.2), name=f"reference-{n}")


#: preset name -> Geometry (reference geometry of the SPI papers and its binned versions)
PRESETS: dict[str, Geometry] = {f"reference-{n}": _reference(n) for n in (128, 64, 32)}


def get_preset(name: str) -> Geometry:
    """Geometry preset by name (``reference-128``, ``reference-64``, ``reference-32``).

    Raises:
        ValueError: unknown name (the message lists the known presets).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown geometry preset {name!r}: expected one of {sorted(PRESETS)}")
    return PRESETS[name]
