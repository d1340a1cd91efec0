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

Detector geometry conventions (any detector)
--------------------------------------------
A :class:`Geometry` is one of three kinds (:attr:`Geometry.kind`); all share the beam, the lab frame and the
``q`` convention above, and all present the pixels as one ``(n_y, n_x)`` array, so every per-pixel array of
the pipeline (counts, mask, ``q``, pixel factor) keeps that shape:

* ``"grid"`` (:class:`Detector`): the flat centred square-pixel grid above (the presets, ``simulate``).
* ``"positions"`` (:class:`PixelDetector`, :meth:`Geometry.from_positions`, :meth:`Geometry.from_panels`): each
  pixel is a flat parallelogram with centre ``positions_m[iy, ix]`` (lab frame, metres, origin at the
  interaction point) and edge vectors ``fs_m[iy, ix]`` (along increasing ``ix``, the fast-scan axis) and
  ``ss_m[iy, ix]`` (along increasing ``iy``, slow scan), so its corners are ``c +- fs/2 +- ss/2``. This covers
  multi-panel detectors with gaps, a beam centre anywhere, tilted or rotated panels. ``q`` follows from the
  centre as above (``k_out = c / (|c| lambda)``); the solid angle is exact for the parallelogram (the sum of
  the exact solid angles of its two triangles, Van Oosterom & Strackee 1983; no small-pixel or small-angle
  approximation); the polarization factor is the formula above evaluated at ``c``. A multi-panel detector is
  laid out as its panels **stacked along** ``iy`` in the order given (panel 0 first; CrystFEL's and the CXI
  modular layout use this order too); panels of unequal width are padded on the right with masked pixels.
* ``"q"`` (:meth:`Geometry.from_q`): ``q`` given per pixel (1/A, this convention, e.g. from Dragonfly's
  detector file) with its ``pixel_factor`` (solid angle times polarization, sr). Nothing else is known:
  :meth:`Geometry.solid_angle`, :meth:`Geometry.polarization_factor` and :meth:`Geometry.pixel_positions`
  raise ``ValueError``; ``beam.polarization`` is ``"none"`` because the factor already holds it. The ``q``
  must lie on the Ewald sphere of the photon energy (checked to 1e-3 of ``1/lambda``: this catches a missing
  or extra ``2 pi``, a wrong unit or sign).

For a per-pixel geometry (kinds ``"positions"`` and ``"q"``): ``q_max`` is the largest ``|q|`` over the pixel
corners (kind ``"positions"``) or pixel centres (kind ``"q"``); ``field_of_view_A`` is the inverse of the
median ``q`` distance between array neighbours among the 64 pairs closest to the beam (the grid formula's
exact counterpart; jumps between panels are outliers the median ignores); ``q_inscribed`` (largest ``|q|``
reached by the detector in every direction around the beam) is the smallest, over 36 azimuthal sectors, of the
largest pixel ``|q|`` in the sector. :meth:`Geometry.binned` and the grid-only :class:`Detector` attributes
(``pixel_size_m``, ``distance_m``) raise ``ValueError`` for them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "HC_EV_A",
    "POLARIZATIONS",
    "GEOMETRY_KINDS",
    "Beam",
    "Detector",
    "PixelDetector",
    "Panel",
    "Geometry",
    "PRESETS",
    "get_preset",
    "parallelogram_solid_angle",
]

#: h*c in eV * Angstrom: ``lambda[A] = HC_EV_A / E[eV]``
HC_EV_A: float = 12398.4198

#: accepted polarization names
POLARIZATIONS: tuple[str, ...] = ("x", "y", "unpolarized", "none")

#: geometry kinds (:attr:`Geometry.kind`)
GEOMETRY_KINDS: tuple[str, ...] = ("grid", "positions", "q")

#: the Ewald-sphere tolerance of a geometry given by q, relative to 1/lambda
_EWALD_TOLERANCE = 1e-3


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


def _as_mask(mask: Any, shape: tuple[int, int]) -> np.ndarray | None:
    """``mask`` as a read-only ``shape`` bool array (True = good), or None."""
    if mask is None:
        return None
    arr = np.asarray(mask)
    if arr.shape != shape:
        raise ValueError(f"mask: expected shape (n_y, n_x) = {shape}, got {arr.shape}")
    if arr.dtype != np.bool_:
        if not np.all((arr == 0) | (arr == 1)):
            raise ValueError("mask: expected boolean values (True/1 = good pixel), got other values")
    arr = arr.astype(bool, copy=True)
    arr.setflags(write=False)
    return arr


def _as_array(value: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """``value`` as a read-only finite float64 array of ``shape`` (broadcast from fewer leading axes)."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a float array of shape {shape}, got {type(value).__name__}") from None
    if arr.shape != shape:
        try:
            arr = np.broadcast_to(arr, shape)
        except ValueError:
            raise ValueError(f"{name}: expected shape {shape}, got shape {arr.shape}") from None
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: expected finite values, got NaN or infinity")
    arr = np.array(arr, dtype=np.float64, copy=True)
    arr.setflags(write=False)
    return arr


def parallelogram_solid_angle(corner: np.ndarray, edge_a: np.ndarray, edge_b: np.ndarray) -> np.ndarray:
    """Exact solid angle (sr) of flat parallelograms seen from the origin.

    The parallelogram has corners ``corner``, ``corner + edge_a``, ``corner + edge_a + edge_b`` and
    ``corner + edge_b``; its solid angle is the sum of those of the triangles ``(A, B, C)`` and ``(A, C, D)``, each
    from Van Oosterom & Strackee (1983): ``tan(Omega / 2) = |r1 . (r2 x r3)| / (R1 R2 R3 + (r1 . r2) R3 +
    (r1 . r3) R2 + (r2 . r3) R1)``. Both triangles' triple products equal ``A . (edge_a x edge_b)``, computed
    that way without cancellation.

    Args:
        corner: ``(..., 3)`` one corner (any length unit).
        edge_a: ``(..., 3)`` first edge vector.
        edge_b: ``(..., 3)`` second edge vector.

    Returns:
        ``(...)`` solid angles in steradian.
    """
    a = np.asarray(corner, dtype=np.float64)
    b = a + edge_a
    c = b + edge_b
    d = a + edge_b
    triple = np.abs(np.sum(a * np.cross(edge_a, edge_b), axis=-1))
    na, nb, nc, nd = (np.linalg.norm(v, axis=-1) for v in (a, b, c, d))

    def dot(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return np.sum(u * v, axis=-1)

    den1 = na * nb * nc + dot(a, b) * nc + dot(a, c) * nb + dot(b, c) * na
    den2 = na * nc * nd + dot(a, c) * nd + dot(a, d) * nc + dot(c, d) * na
    return 2.0 * (np.arctan2(triple, den1) + np.arctan2(triple, den2))


@dataclass(frozen=True, eq=False)
class PixelDetector:
    """A detector given pixel by pixel (kinds ``"positions"`` and ``"q"``; see the module docstring).

    Exactly one description is set: ``positions_m``, ``fs_m`` and ``ss_m`` (kind ``"positions"``), or ``q``
    and ``factor`` (kind ``"q"``). Use :meth:`Geometry.from_positions`, :meth:`Geometry.from_panels` or
    :meth:`Geometry.from_q` rather than this class directly.

    Attributes:
        positions_m: ``(n_y, n_x, 3)`` pixel centres, lab frame, metres.
        fs_m: ``(n_y, n_x, 3)`` pixel edge vector along increasing ``ix`` (metres).
        ss_m: ``(n_y, n_x, 3)`` pixel edge vector along increasing ``iy`` (metres).
        q: ``(n_y, n_x, 3)`` scattering vectors in 1/A (no 2 pi).
        factor: ``(n_y, n_x)`` solid angle x polarization (sr).
        mask: optional ``(n_y, n_x)`` bool, True = good pixel.
    """

    positions_m: np.ndarray | None = field(default=None, repr=False)
    fs_m: np.ndarray | None = field(default=None, repr=False)
    ss_m: np.ndarray | None = field(default=None, repr=False)
    q: np.ndarray | None = field(default=None, repr=False)
    factor: np.ndarray | None = field(default=None, repr=False)
    mask: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        by_position = self.positions_m is not None
        by_q = self.q is not None
        if by_position == by_q:
            raise ValueError("pixel detector: expected either positions_m (with fs_m, ss_m) or q (with factor), "
                             f"got {'both' if by_position else 'neither'}")
        first = self.positions_m if by_position else self.q
        shape = np.shape(first)
        if len(shape) != 3 or shape[-1] != 3 or shape[0] < 1 or shape[1] < 1:
            name = "positions_m" if by_position else "q"
            raise ValueError(f"{name}: expected shape (n_y, n_x, 3), got shape {shape}")
        n_y, n_x = int(shape[0]), int(shape[1])
        if by_position:
            if self.fs_m is None or self.ss_m is None:
                raise ValueError("pixel detector: expected fs_m and ss_m (pixel edge vectors) with positions_m, got None")
            if self.q is not None or self.factor is not None:
                raise ValueError("pixel detector: expected no q / factor with positions_m, got them")
            pos = _as_array(self.positions_m, "positions_m", (n_y, n_x, 3))
            fs = _as_array(self.fs_m, "fs_m", (n_y, n_x, 3))
            ss = _as_array(self.ss_m, "ss_m", (n_y, n_x, 3))
            if np.any(np.linalg.norm(pos, axis=-1) == 0):
                raise ValueError("positions_m: expected pixels away from the interaction point, got a pixel at (0, 0, 0)")
            area = np.linalg.norm(np.cross(fs, ss), axis=-1)
            if np.any(area <= 0):
                raise ValueError("fs_m, ss_m: expected non-parallel, non-zero pixel edge vectors, got a degenerate pixel")
            object.__setattr__(self, "positions_m", pos)
            object.__setattr__(self, "fs_m", fs)
            object.__setattr__(self, "ss_m", ss)
        else:
            if self.factor is None:
                raise ValueError("pixel detector: expected factor (solid angle x polarization) with q, got None")
            if self.fs_m is not None or self.ss_m is not None:
                raise ValueError("pixel detector: expected no fs_m / ss_m with q, got them")
            q = _as_array(self.q, "q", (n_y, n_x, 3))
            factor = _as_array(self.factor, "pixel_factor", (n_y, n_x))
            if np.any(factor < 0):
                raise ValueError("pixel_factor: expected values >= 0 (solid angle x polarization), got negative values")
            object.__setattr__(self, "q", q)
            object.__setattr__(self, "factor", factor)
        object.__setattr__(self, "mask", _as_mask(self.mask, (n_y, n_x)))

    @property
    def kind(self) -> str:
        """``"positions"`` or ``"q"``."""
        return "positions" if self.positions_m is not None else "q"

    @property
    def n_y(self) -> int:
        """Number of pixel rows (``iy``)."""
        return int((self.positions_m if self.positions_m is not None else self.q).shape[0])  # type: ignore[union-attr]

    @property
    def n_x(self) -> int:
        """Number of pixel columns (``ix``)."""
        return int((self.positions_m if self.positions_m is not None else self.q).shape[1])  # type: ignore[union-attr]

    @property
    def pixel_size_m(self) -> float:
        """Not defined for a per-pixel detector: raises ``ValueError``."""
        raise ValueError(f"pixel_size_m: expected a flat grid detector, got a per-pixel detector (kind "
                         f"{self.kind!r}); use the per-pixel arrays (Geometry.q_vectors, pixel_factor)")

    @property
    def distance_m(self) -> float:
        """Not defined for a per-pixel detector: raises ``ValueError``."""
        raise ValueError(f"distance_m: expected a flat grid detector, got a per-pixel detector (kind "
                         f"{self.kind!r}); use the per-pixel arrays (Geometry.q_vectors, pixel_positions)")

    def arrays(self) -> dict[str, np.ndarray]:
        """The defining arrays by name (``positions_m, fs_m, ss_m`` or ``q, pixel_factor``)."""
        if self.kind == "positions":
            return {"positions_m": self.positions_m, "fs_m": self.fs_m, "ss_m": self.ss_m}  # type: ignore[dict-item]
        return {"q": self.q, "pixel_factor": self.factor}  # type: ignore[dict-item]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PixelDetector):
            return NotImplemented
        if self.kind != other.kind or (self.n_y, self.n_x) != (other.n_y, other.n_x):
            return False
        mine, theirs = self.arrays(), other.arrays()
        if not all(np.array_equal(mine[k], theirs[k]) for k in mine):
            return False
        if self.mask is None or other.mask is None:
            return (self.mask is None or bool(self.mask.all())) and (other.mask is None or bool(other.mask.all()))
        return bool(np.array_equal(self.mask, other.mask))

    def __hash__(self) -> int:
        return hash((self.kind, self.n_y, self.n_x))


@dataclass(frozen=True)
class Panel:
    """One flat rectangular panel of ``n_ss x n_fs`` pixels (for :meth:`Geometry.from_panels`).

    Pixel ``(s, f)`` of the panel has its centre at ``corner_m + (f + 1/2) fs_m + (s + 1/2) ss_m``:
    ``corner_m`` is the outer corner of pixel ``(0, 0)`` and ``fs_m`` / ``ss_m`` the pixel pitch vectors
    along the fast-scan (columns) and slow-scan (rows) axes, in metres (the pixel fills its pitch).

    Attributes:
        corner_m: ``(3,)`` outer corner of pixel ``(0, 0)``, lab frame, metres.
        fs_m: ``(3,)`` step to the next column.
        ss_m: ``(3,)`` step to the next row.
        n_fs: number of columns.
        n_ss: number of rows.
        mask: optional ``(n_ss, n_fs)`` bool, True = good.
        name: optional panel name.
    """

    corner_m: tuple[float, float, float]
    fs_m: tuple[float, float, float]
    ss_m: tuple[float, float, float]
    n_fs: int
    n_ss: int
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)
    name: str = ""

    def __post_init__(self) -> None:
        for key in ("corner_m", "fs_m", "ss_m"):
            vec = np.asarray(getattr(self, key), dtype=np.float64)
            if vec.shape != (3,) or not np.all(np.isfinite(vec)):
                raise ValueError(f"panel {self.name!r} {key}: expected 3 finite numbers, got {getattr(self, key)!r}")
            object.__setattr__(self, key, tuple(float(v) for v in vec))
        for key in ("n_fs", "n_ss"):
            value = getattr(self, key)
            if isinstance(value, bool) or int(value) != value or int(value) <= 0:
                raise ValueError(f"panel {self.name!r} {key}: expected a positive integer, got {value!r}")
            object.__setattr__(self, key, int(value))
        object.__setattr__(self, "mask", _as_mask(self.mask, (self.n_ss, self.n_fs)))

    def positions(self) -> np.ndarray:
        """Pixel centres ``(n_ss, n_fs, 3)`` in metres."""
        s = np.arange(self.n_ss, dtype=np.float64)[:, None, None] + 0.5
        f = np.arange(self.n_fs, dtype=np.float64)[None, :, None] + 0.5
        return np.asarray(self.corner_m) + f * np.asarray(self.fs_m) + s * np.asarray(self.ss_m)


def _pixel_q(pos: np.ndarray, lam: float) -> np.ndarray:
    """``q = k_out - k_in`` (1/A) of lab positions ``pos (..., 3)`` (metres), cancellation-free."""
    u, v, d = pos[..., 0], pos[..., 1], pos[..., 2]
    r = np.sqrt(u * u + v * v + d * d)
    qx = u / (r * lam)
    qy = v / (r * lam)
    # (d/r - 1)/lambda: written without cancellation in the forward hemisphere
    with np.errstate(divide="ignore", invalid="ignore"):
        forward = -(u * u + v * v) / (r * (r + d) * lam)
    qz = np.where(d > 0, forward, (d - r) / (r * lam))
    return np.stack([qx, qy, qz], axis=-1)


def _polarization(pos: np.ndarray, polarization: str) -> np.ndarray:
    """Polarization factor at lab positions ``pos (..., 3)`` (see the module docstring)."""
    r2 = np.sum(pos**2, axis=-1)
    if polarization == "x":
        return 1.0 - pos[..., 0] ** 2 / r2
    if polarization == "y":
        return 1.0 - pos[..., 1] ** 2 / r2
    if polarization == "unpolarized":
        return 0.5 * (1.0 + pos[..., 2] ** 2 / r2)
    return np.ones(pos.shape[:-1])


@dataclass(frozen=True, eq=False)
class Geometry:
    """Beam + detector; computes per-pixel ``q``, solid angle and polarization factor.

    Attributes:
        beam: the :class:`Beam`.
        detector: a flat grid :class:`Detector` (with its optional mask) or a :class:`PixelDetector`.
        name: optional preset / user name.
    """

    beam: Beam
    detector: Detector | PixelDetector
    name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.detector, (Detector, PixelDetector)):
            raise ValueError(f"detector: expected a Detector or PixelDetector, got {type(self.detector).__name__}")
        if isinstance(self.detector, PixelDetector) and self.detector.kind == "q":
            q = self.detector.q
            k = 1.0 / self.wavelength_A
            radius = np.linalg.norm(q + np.array([0.0, 0.0, k]), axis=-1)  # type: ignore[operator]
            worst = float(np.max(np.abs(radius - k))) / k
            if worst > _EWALD_TOLERANCE:
                raise ValueError(
                    f"q: expected pixel q on the Ewald sphere |q + k_in| = 1/lambda of {self.beam.photon_energy_ev:g} eV "
                    f"(1/A, no 2 pi, q = k_out - k_in with the beam along +z), got a relative deviation of {worst:.3g}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Geometry):
            return NotImplemented
        return self.beam == other.beam and self.detector == other.detector

    def __hash__(self) -> int:
        return hash((self.beam, self.detector))

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_positions(
        cls,
        positions_m: np.ndarray,
        *,
        photon_energy_ev: float,
        polarization: str = "x",
        mask: np.ndarray | None = None,
        pixel_size_m: float | np.ndarray | None = None,
        fs_m: np.ndarray | None = None,
        ss_m: np.ndarray | None = None,
        name: str | None = None,
    ) -> Geometry:
        """Geometry of pixels at lab positions (kind ``"positions"``).

        Args:
            positions_m: ``(n_y, n_x, 3)`` pixel centres, lab frame (beam along +z, origin at the sample), metres.
            photon_energy_ev: photon energy (eV).
            polarization: see :class:`Beam`.
            mask: optional ``(n_y, n_x)`` bool, True = good pixel.
            pixel_size_m: square pixels of this side (scalar or ``(n_y, n_x)``) in planes perpendicular to the beam
                (edges along lab x and y); give either this or ``fs_m`` and ``ss_m``.
            fs_m: pixel edge vector along increasing ``ix`` (``(3,)`` or ``(n_y, n_x, 3)``, metres).
            ss_m: pixel edge vector along increasing ``iy``.
            name: optional name.

        Raises:
            ValueError: wrong shapes, non-finite values, degenerate pixels, both or neither pixel description.
        """
        pos = np.asarray(positions_m, dtype=np.float64)
        if pos.ndim != 3 or pos.shape[-1] != 3:
            raise ValueError(f"positions_m: expected shape (n_y, n_x, 3), got shape {pos.shape}")
        if pixel_size_m is not None:
            if fs_m is not None or ss_m is not None:
                raise ValueError("from_positions: expected pixel_size_m or (fs_m, ss_m), got both")
            size = np.asarray(pixel_size_m, dtype=np.float64)
            if not np.all(np.isfinite(size)) or np.any(size <= 0):
                raise ValueError(f"pixel_size_m: expected positive finite values, got {pixel_size_m!r}")
            size = np.broadcast_to(size, pos.shape[:2])[..., None]
            fs = size * np.array([1.0, 0.0, 0.0])
            ss = size * np.array([0.0, 1.0, 0.0])
        elif fs_m is None or ss_m is None:
            raise ValueError("from_positions: expected pixel_size_m or both fs_m and ss_m, got neither")
        else:
            fs, ss = fs_m, ss_m
        det = PixelDetector(positions_m=pos, fs_m=fs, ss_m=ss, mask=mask)
        return cls(Beam(photon_energy_ev, polarization), det, name)

    @classmethod
    def from_panels(
        cls,
        panels: list[Panel],
        *,
        photon_energy_ev: float,
        polarization: str = "x",
        mask: np.ndarray | None = None,
        name: str | None = None,
    ) -> Geometry:
        """Geometry of flat panels stacked along ``iy`` in the given order (kind ``"positions"``).

        Panels narrower than the widest are padded on the right with masked pixels (their positions repeat the
        panel's last column). The mask is the panels' masks (missing: all good), the padding, and ``mask``
        (``(n_y, n_x)``, True = good) combined.

        Raises:
            ValueError: no panels, or an invalid panel / mask.
        """
        if not panels:
            raise ValueError("panels: expected at least one panel, got none")
        width = max(p.n_fs for p in panels)
        pos_parts, fs_parts, ss_parts, mask_parts = [], [], [], []
        for panel in panels:
            pad = ((0, 0), (0, width - panel.n_fs), (0, 0))
            shape = (panel.n_ss, panel.n_fs, 3)
            pos_parts.append(np.pad(panel.positions(), pad, mode="edge"))
            fs_parts.append(np.pad(np.broadcast_to(np.asarray(panel.fs_m), shape), pad, mode="edge"))
            ss_parts.append(np.pad(np.broadcast_to(np.asarray(panel.ss_m), shape), pad, mode="edge"))
            good = np.ones((panel.n_ss, panel.n_fs), dtype=bool) if panel.mask is None else panel.mask
            mask_parts.append(np.pad(good, ((0, 0), (0, width - panel.n_fs)), constant_values=False))
        good = np.concatenate(mask_parts, axis=0)
        user = _as_mask(mask, good.shape)
        if user is not None:
            good = good & user
        return cls.from_positions(np.concatenate(pos_parts), photon_energy_ev=photon_energy_ev,
                                  polarization=polarization, mask=good, fs_m=np.concatenate(fs_parts),
                                  ss_m=np.concatenate(ss_parts), name=name)

    @classmethod
    def from_q(
        cls,
        q: np.ndarray,
        pixel_factor: np.ndarray,
        *,
        photon_energy_ev: float,
        mask: np.ndarray | None = None,
        name: str | None = None,
    ) -> Geometry:
        """Geometry of pixels given by their scattering vectors (kind ``"q"``, as Dragonfly's detector file).

        Args:
            q: ``(n_y, n_x, 3)`` in 1/A, no 2 pi, ``q = k_out - k_in`` with the beam along lab +z.
            pixel_factor: ``(n_y, n_x)`` solid angle x polarization (sr), >= 0.
            photon_energy_ev: photon energy (eV); ``q`` must lie on its Ewald sphere (to 1e-3 of ``1/lambda``).
            mask: optional ``(n_y, n_x)`` bool, True = good pixel.
            name: optional name.

        Raises:
            ValueError: wrong shapes, non-finite or negative values, ``q`` off the Ewald sphere.
        """
        det = PixelDetector(q=q, factor=pixel_factor, mask=mask)
        return cls(Beam(photon_energy_ev, "none"), det, name)

    # ----------------------------------------------------------------- basic quantities
    @property
    def kind(self) -> str:
        """``"grid"`` (flat centred square-pixel grid), ``"positions"`` or ``"q"`` (see the module docstring)."""
        return "grid" if isinstance(self.detector, Detector) else self.detector.kind

    @property
    def is_grid(self) -> bool:
        """True for the flat centred square-pixel grid (:class:`Detector`)."""
        return isinstance(self.detector, Detector)

    def _require_grid(self, what: str) -> Detector:
        if not isinstance(self.detector, Detector):
            raise ValueError(f"{what}: expected a flat grid detector, got a per-pixel geometry (kind {self.kind!r})")
        return self.detector

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
        """Lab positions of pixel centres in metres, shape ``(n_y, n_x, 3)``.

        Raises:
            ValueError: a geometry given by ``q`` (kind ``"q"``) has no positions.
        """
        det = self.detector
        if isinstance(det, PixelDetector):
            if det.positions_m is None:
                raise ValueError("pixel_positions: expected a geometry with pixel positions, got one given by q "
                                 "(kind 'q')")
            return np.array(det.positions_m)
        u = (np.arange(det.n_x) - (det.n_x - 1) / 2.0) * det.pixel_size_m
        v = (np.arange(det.n_y) - (det.n_y - 1) / 2.0) * det.pixel_size_m
        vv, uu = np.meshgrid(v, u, indexing="ij")
        return np.stack([uu, vv, np.full_like(uu, det.distance_m)], axis=-1)

    def q_vectors(self) -> np.ndarray:
        """Scattering vectors ``q = k_out - k_in`` of pixel centres, shape ``(n_y, n_x, 3)``, 1/A (no 2*pi)."""
        det = self.detector
        if isinstance(det, PixelDetector) and det.q is not None:
            return np.array(det.q)
        return _pixel_q(self.pixel_positions(), self.wavelength_A)

    def q_magnitudes(self) -> np.ndarray:
        """``|q|`` of pixel centres, shape ``(n_y, n_x)``, 1/A."""
        return np.linalg.norm(self.q_vectors(), axis=-1)

    def solid_angle(self) -> np.ndarray:
        """Exact solid angle of each pixel seen from the sample, shape ``(n_y, n_x)``, sr.

        Grid: ``Omega = sum_corners +-arctan(x y / (D sqrt(x^2 + y^2 + D^2)))`` over the pixel's corners, so the
        total equals the detector's exact angular area ``4 arcsin(ab / sqrt((a^2+4D^2)(b^2+4D^2)))``. Pixel
        positions: :func:`parallelogram_solid_angle` of each pixel.

        Raises:
            ValueError: a geometry given by ``q`` knows only the product :meth:`pixel_factor`.
        """
        det = self.detector
        if isinstance(det, PixelDetector):
            if det.positions_m is None:
                raise ValueError("solid_angle: expected a geometry with pixel positions, got one given by q "
                                 "(kind 'q'; only pixel_factor = solid angle x polarization is known)")
            corner = det.positions_m - 0.5 * det.fs_m - 0.5 * det.ss_m  # type: ignore[operator]
            return parallelogram_solid_angle(corner, det.fs_m, det.ss_m)  # type: ignore[arg-type]
        d = det.distance_m
        xe = (np.arange(det.n_x + 1) - det.n_x / 2.0) * det.pixel_size_m
        ye = (np.arange(det.n_y + 1) - det.n_y / 2.0) * det.pixel_size_m
        ygrid, xgrid = np.meshgrid(ye, xe, indexing="ij")
        corner = np.arctan(xgrid * ygrid / (d * np.sqrt(xgrid**2 + ygrid**2 + d**2)))
        return corner[1:, 1:] - corner[1:, :-1] - corner[:-1, 1:] + corner[:-1, :-1]

    def polarization_factor(self) -> np.ndarray:
        """Polarization factor of each pixel, shape ``(n_y, n_x)`` (see the module docstring).

        Raises:
            ValueError: a geometry given by ``q`` knows only the product :meth:`pixel_factor`.
        """
        if self.kind == "q":
            raise ValueError("polarization_factor: expected a geometry with pixel positions, got one given by q "
                             "(kind 'q'; only pixel_factor = solid angle x polarization is known)")
        return _polarization(self.pixel_positions(), self.beam.polarization)

    def pixel_factor(self) -> np.ndarray:
        """Solid angle times polarization factor of each pixel, ``P_k * Omega_k``, shape ``(n_y, n_x)`` (sr):
        what multiplies ``r_e^2 * fluence * I(q)`` in the expected photon count."""
        det = self.detector
        if isinstance(det, PixelDetector) and det.factor is not None:
            return np.array(det.factor)
        return self.solid_angle() * self.polarization_factor()

    def good_pixels(self) -> np.ndarray:
        """Good-pixel mask, shape ``(n_y, n_x)`` bool (all True without a mask)."""
        if self.detector.mask is None:
            return np.ones(self.shape, dtype=bool)
        return np.array(self.detector.mask, dtype=bool)

    @property
    def q_max(self) -> float:
        """``|q|`` at the outer corner of the detector (edge of the corner pixel), 1/A; per-pixel geometries: the
        largest ``|q|`` over pixel corners (kind ``"positions"``) or centres (kind ``"q"``)."""
        det = self.detector
        if isinstance(det, PixelDetector):
            if det.positions_m is None:
                return float(self.q_magnitudes().max())
            best = 0.0
            for sf in (-0.5, 0.5):
                for ss in (-0.5, 0.5):
                    corner = det.positions_m + sf * det.fs_m + ss * det.ss_m  # type: ignore[operator]
                    best = max(best, float(np.linalg.norm(_pixel_q(corner, self.wavelength_A), axis=-1).max()))
            return best
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
        """``D * lambda / pixel``: inverse ``q`` spacing of adjacent pixels at the centre, Angstrom (per-pixel
        geometries: the inverse median ``q`` spacing of the 64 neighbour pairs nearest the beam)."""
        det = self.detector
        if isinstance(det, Detector):
            return det.distance_m * self.wavelength_A / det.pixel_size_m
        q = self.q_vectors()
        dist, mid = [], []
        for axis in (0, 1):
            if q.shape[axis] < 2:
                continue
            a = np.take(q, np.arange(q.shape[axis] - 1), axis=axis).reshape(-1, 3)
            b = np.take(q, np.arange(1, q.shape[axis]), axis=axis).reshape(-1, 3)
            dist.append(np.linalg.norm(b - a, axis=-1))
            mid.append(np.linalg.norm(0.5 * (a + b), axis=-1))
        if not dist:
            raise ValueError("field_of_view_A: expected a detector with at least 2 pixels, got 1")
        d_all, m_all = np.concatenate(dist), np.concatenate(mid)
        keep = (d_all > 0) & (d_all <= 2.0 * np.median(d_all))  # jumps between panels are outliers
        d_all, m_all = d_all[keep], m_all[keep]
        near = np.argsort(m_all, kind="stable")[:64]
        return float(1.0 / np.median(d_all[near]))

    @property
    def q_inscribed(self) -> float:
        """Largest ``|q|`` the detector reaches in every direction around the beam, 1/A.

        Grid: ``|q|`` at the middle of the nearer detector edge (the inscribed circle). Per-pixel: the smallest,
        over 36 azimuthal sectors of 10 degrees (empty sectors skipped), of the largest pixel-centre ``|q|``
        in the sector.
        """
        det = self.detector
        if isinstance(det, Detector):
            ring = min(det.n_x, det.n_y) / 2.0
            return float(2 * math.sin(0.5 * math.atan(ring * det.pixel_size_m / det.distance_m)) / self.wavelength_A)
        q = self.q_vectors().reshape(-1, 3)
        qn = np.linalg.norm(q, axis=-1)
        sector = ((np.arctan2(q[:, 1], q[:, 0]) + math.pi) / (2 * math.pi) * 36).astype(np.int64) % 36
        top = np.zeros(36)
        np.maximum.at(top, sector, qn)
        return float(top[top > 0].min()) if np.any(top > 0) else float(qn.max())

    # ----------------------------------------------------------------- derived geometries
    def with_mask(self, mask: np.ndarray | None) -> Geometry:
        """Same geometry with ``mask`` (``(n_y, n_x)`` bool, True = good) replacing the detector mask."""
        det = self.detector
        if isinstance(det, PixelDetector):
            return Geometry(self.beam, dataclasses.replace(det, mask=mask), self.name)
        new_det = Detector(det.n_x, det.n_y, det.pixel_size_m, det.distance_m, mask=mask)
        return Geometry(self.beam, new_det, self.name)

    def with_polarization(self, polarization: str) -> Geometry:
        """Same geometry with another polarization.

        Raises:
            ValueError: a geometry given by ``q`` (its pixel factor already holds the polarization).
        """
        if self.kind == "q":
            raise ValueError("with_polarization: expected a geometry with pixel positions, got one given by q "
                             "(kind 'q'; its pixel_factor already holds the polarization)")
        return Geometry(Beam(self.beam.photon_energy_ev, polarization), self.detector, self.name)

    def binned(self, factor: int) -> Geometry:
        """Detector binned ``factor x factor`` (same extent; a binned pixel is good if all its pixels are).

        Raises:
            ValueError: ``factor`` not a positive integer dividing ``n_x`` and ``n_y``, or a per-pixel geometry.
        """
        det = self._require_grid("binned")
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
        """Description as a dict (the mask is NOT included; store it separately).

        Grid: plain scalars only (``name, photon_energy_ev, polarization, pixel_size_m, distance_m, n_x, n_y``).
        Per-pixel: ``kind``, ``name, photon_energy_ev, polarization, n_x, n_y`` and the defining float64 arrays
        (``positions_m, fs_m, ss_m`` ``(n_y, n_x, 3)``, or ``q`` ``(n_y, n_x, 3)`` and ``pixel_factor`` ``(n_y, n_x)``).
        """
        det = self.detector
        out: dict[str, Any] = {
            "name": self.name if self.name is not None else "",
            "photon_energy_ev": float(self.beam.photon_energy_ev),
            "polarization": self.beam.polarization,
        }
        if isinstance(det, PixelDetector):
            out["kind"] = det.kind
            out["n_x"] = int(det.n_x)
            out["n_y"] = int(det.n_y)
            out.update({key: np.array(value) for key, value in det.arrays().items()})
            return out
        out.update({
            "pixel_size_m": float(det.pixel_size_m),
            "distance_m": float(det.distance_m),
            "n_x": int(det.n_x),
            "n_y": int(det.n_y),
        })
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], mask: np.ndarray | None = None) -> Geometry:
        """Inverse of :meth:`to_dict`; ``mask`` optional ``(n_y, n_x)`` bool (arrays may be torch tensors).

        Raises:
            ValueError: a required key is missing or a value is invalid.
        """
        kind = data.get("kind", "grid")
        if isinstance(kind, bytes):
            kind = kind.decode()
        kind = str(kind)
        if kind not in GEOMETRY_KINDS:
            raise ValueError(f"geometry kind: expected one of {GEOMETRY_KINDS}, got {kind!r}")
        polarization = data.get("polarization", "x")
        if isinstance(polarization, bytes):
            polarization = polarization.decode()
        name = data.get("name") or None
        if isinstance(name, bytes):
            name = name.decode() or None
        name = None if name is None else str(name)
        if "photon_energy_ev" not in data:
            raise ValueError("geometry: expected key photon_energy_ev, got missing")
        energy = float(data["photon_energy_ev"])
        if kind != "grid":
            keys = ("positions_m", "fs_m", "ss_m") if kind == "positions" else ("q", "pixel_factor")
            missing = [key for key in keys if key not in data]
            if missing:
                raise ValueError(f"geometry ({kind}): expected keys {keys}, got missing {missing}")
            arrays = {key: np.asarray(data[key], dtype=np.float64) for key in keys}
            if kind == "positions":
                return cls.from_positions(arrays["positions_m"], photon_energy_ev=energy, polarization=str(polarization),
                                          mask=mask, fs_m=arrays["fs_m"], ss_m=arrays["ss_m"], name=name)
            return cls.from_q(arrays["q"], arrays["pixel_factor"], photon_energy_ev=energy, mask=mask, name=name)
        required = ("photon_energy_ev", "pixel_size_m", "distance_m", "n_x", "n_y")
        missing = [key for key in required if key not in data]
        if missing:
            raise ValueError(f"geometry: expected keys {required}, got missing {missing}")
        beam = Beam(energy, str(polarization))
        det = Detector(
            int(data["n_x"]), int(data["n_y"]), float(data["pixel_size_m"]), float(data["distance_m"]), mask=mask
        )
        return cls(beam, det, name)


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
