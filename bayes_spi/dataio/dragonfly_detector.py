"""Dragonfly's detector file (HDF5 or ASCII ``.dat``) -> a bayes-spi :class:`~bayes_spi.geometry.Geometry`.

The file (verified against Dragonfly's ``src/detector.c``, ``utils/py_src/detector.py`` and
``utils/make_detector.py``, commit a2933c3)
--------------------------------------------------------------------------------------------------------
* HDF5: datasets ``qx, qy, qz, corr`` (float, ``num_pix``), ``mask`` (integer, ``num_pix``), and scalars
  ``detd`` and ``ewald_rad`` (datasets, or attributes of the root), optionally ``background``.
* ASCII: a first line ``num_pix [detd ewald_rad]`` (the old format has ``num_pix`` only), then one line
  ``qx qy qz corr mask`` per pixel.

``q`` is in *voxel units*: ``q = s (k_out_hat - z_hat)`` with ``s`` the Ewald-sphere radius in voxels
(``make_detector``: ``s = 1 / (lambda q_sep)``, ``q_sep = 2 sin(atan(p/D)/2)/lambda * D/(ewald_rad p)``,
so ``s`` is ``ewald_rad`` up to ``O((p/D)^2)``; other converters use ``s = ewald_rad`` exactly). Rather than
guess which, :func:`ewald_radius` recovers ``s`` from the q-vectors themselves: every pixel lies on the sphere
``|q + s z_hat| = s``, so ``s = -|q|^2 / (2 q_z)``; the weighted mean over all pixels is used and every pixel
is checked to lie on that sphere (relative 1e-6). Then, in bayes-spi's units (1/A, no ``2 pi``, see
:mod:`bayes_spi.geometry`), ``q = q_voxel / (s lambda)``. The wavelength is not in Dragonfly's file: it is
taken from a ``wavelength`` (A) or ``photon_energy`` (eV) dataset/attribute if the file has one, otherwise
it must be given (``--photon-energy``). A file whose ``qz`` are mostly positive (some converters' sign) has
``qz`` negated (a mirror; SPI intensities are centrosymmetric, so this only rotates the solution).

Axes: Dragonfly ``qx`` -> lab ``x`` (bayes-spi ``ix``), ``qy`` -> lab ``y`` (``iy``), ``qz`` -> beam. Pixel
``t`` of a ``make_detector`` file is ``t = x * dets_y + y`` (``x`` slow), so a frame becomes an image by
``frame.reshape(n_x, n_y).T``; in general the layout is recovered from positions (:func:`pixel_layout`).

Mask (Dragonfly's docs and ``src/detector.c``): ``0`` good; ``1`` used for merging but not for orientation
determination (``make_detector`` puts the corners outside the inscribed circle there); ``2`` bad (never
used; beam stop). bayes-spi has one good/bad mask: by default values 0 and 1 are good (the ``1`` pixels hold
valid photons and our likelihood uses every good pixel), ``2`` bad; ``keep_mask_1=False`` makes ``1`` bad too.

``corr`` is the pixel's solid angle times polarization (``make_detector``: ``detd / norm^3 * P``, the
small-pixel solid angle in sr). A detector that is a full flat grid centred on the beam (the
``make_detector`` default) becomes the ordinary flat :class:`Geometry` (exact solid angles; the
polarization recognised from ``corr``); any other becomes a per-pixel geometry (``Geometry.from_q``) whose
pixel factor is ``corr`` as stored (its overall scale only rescales the fitted intensity).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from bayes_spi.config.commands import flag
from bayes_spi.dataio.h5 import DataFormatError
from bayes_spi.dataio.h5open import open_h5
from bayes_spi.geometry import HC_EV_A, Beam, Detector, Geometry

__all__ = [
    "DragonflyDetector",
    "PixelLayout",
    "read_dragonfly_detector",
    "ewald_radius",
    "q_inverse_angstrom",
    "good_pixels",
    "pixel_layout",
    "detector_geometry",
    "NOMINAL_PIXEL_SIZE_M",
]

#: pixel size used for a flat grid when none is given: Dragonfly's file fixes only ``D / p``, and every
#: quantity bayes-spi computes (q, solid angle, polarization) depends only on that ratio
NOMINAL_PIXEL_SIZE_M: float = 1e-4

_EWALD_TOL = 1e-6
_FLAT_TOL = 1e-9


@dataclass(frozen=True)
class DragonflyDetector:
    """A Dragonfly detector file's contents (pixel ``t`` is row ``t`` of every array).

    Attributes:
        path: the file.
        q_voxel: ``(num_pix, 3)`` float64 q in voxel units (``qz`` sign normalised to ``<= 0``).
        corr: ``(num_pix,)`` solid angle x polarization.
        raw_mask: ``(num_pix,)`` uint8 Dragonfly mask (0 good, 1 merge-only, 2 bad).
        detd: detector distance in pixels (``D / p``), or None (old ASCII files).
        ewald_rad: the file's ``ewald_rad`` in voxels, or None.
        wavelength_A: from the file if it has one, else None.
        qz_flipped: the file's ``qz`` were positive and have been negated.
    """

    path: Path
    q_voxel: np.ndarray
    corr: np.ndarray
    raw_mask: np.ndarray
    detd: float | None
    ewald_rad: float | None
    wavelength_A: float | None = None
    qz_flipped: bool = False

    @property
    def num_pix(self) -> int:
        """Number of pixels."""
        return int(self.q_voxel.shape[0])


def _scalar(f: h5py.File, name: str) -> float | None:
    if name in f and isinstance(f[name], h5py.Dataset):
        return float(np.asarray(f[name][()]).reshape(-1)[0])
    if name in f.attrs:
        return float(np.asarray(f.attrs[name]).reshape(-1)[0])
    return None


def _read_h5(path: Path) -> dict[str, Any]:
    with open_h5(path, "a Dragonfly detector file (HDF5)") as f:
        out: dict[str, Any] = {}
        for name in ("qx", "qy", "qz", "corr", "mask"):
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise DataFormatError(path, f"/{name}", "a dataset (Dragonfly detector: qx, qy, qz, corr, mask)",
                                      "missing")
            out[name] = np.asarray(f[name][()]).reshape(-1)
        out["detd"] = _scalar(f, "detd")
        out["ewald_rad"] = _scalar(f, "ewald_rad")
        wavelength = _scalar(f, "wavelength")
        energy = _scalar(f, "photon_energy")
        out["wavelength_A"] = wavelength if wavelength is not None else (
            HC_EV_A / energy if energy is not None and energy > 0 else None)
    return out


def _read_ascii(path: Path) -> dict[str, Any]:
    with open(path, encoding="ascii", errors="replace") as fh:
        head = fh.readline().split()
    try:
        num_pix = int(head[0])
        detd = float(head[1]) if len(head) > 1 else None
        ewald_rad = float(head[2]) if len(head) > 2 else None
    except (IndexError, ValueError):
        raise DataFormatError(path, "line 1", "'num_pix [detd ewald_rad]'", repr(" ".join(head)[:80])) from None
    if num_pix <= 0:
        raise DataFormatError(path, "line 1 num_pix", "a positive pixel count", str(num_pix))
    try:
        table = np.loadtxt(path, skiprows=1, dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise DataFormatError(path, "pixel lines", "5 numbers a line: qx qy qz corr mask", str(exc)[:120]) from None
    if table.shape != (num_pix, 5):
        raise DataFormatError(path, "pixel lines", f"{num_pix} lines of 5 numbers (qx qy qz corr mask)",
                              f"{table.shape[0]} lines of {table.shape[1] if table.ndim == 2 else 0}")
    return {"qx": table[:, 0], "qy": table[:, 1], "qz": table[:, 2], "corr": table[:, 3], "mask": table[:, 4],
            "detd": detd, "ewald_rad": ewald_rad, "wavelength_A": None}


def read_dragonfly_detector(path: str | os.PathLike[str]) -> DragonflyDetector:
    """Read and validate a Dragonfly detector file (HDF5 or ASCII).

    Raises:
        FileNotFoundError: no such file.
        DataFormatError: a field is missing, of the wrong length, not finite, or a mask value is not 0/1/2.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"detector file {os.fspath(path)!r} not found")
    raw = _read_h5(path) if h5py.is_hdf5(path) else _read_ascii(path)
    n = raw["qx"].size
    for name in ("qy", "qz", "corr", "mask"):
        if raw[name].size != n:
            raise DataFormatError(path, name, f"{n} values (as qx)", f"{raw[name].size}")
    if n == 0:
        raise DataFormatError(path, "qx", "at least one pixel", "none")
    q = np.stack([raw["qx"], raw["qy"], raw["qz"]], axis=1).astype(np.float64)
    corr = np.asarray(raw["corr"], dtype=np.float64)
    for name, arr in (("qx/qy/qz", q), ("corr", corr)):
        if not np.isfinite(arr).all():
            raise DataFormatError(path, name, "finite numbers", "NaN or infinity")
    mask = np.asarray(raw["mask"])
    if not np.isin(mask, (0, 1, 2)).all():
        where = int(np.argmax(~np.isin(mask, (0, 1, 2))))
        raise DataFormatError(path, "mask", "values 0 (good), 1 (merge only), 2 (bad)",
                              f"{mask[where].item()!r} at pixel {where}")
    if corr.min() < 0:
        raise DataFormatError(path, "corr", "non-negative solid angle x polarization", f"{corr.min():g}")
    flipped = bool(q[:, 2].mean() > 0)
    if flipped:
        q[:, 2] = -q[:, 2]
    return DragonflyDetector(path, q, corr, mask.astype(np.uint8), raw["detd"], raw["ewald_rad"],
                             raw["wavelength_A"], flipped)


def ewald_radius(det: DragonflyDetector) -> float:
    """The Ewald-sphere radius ``s`` in voxels that the file's q-vectors lie on (see the module docstring):
    ``s = sum |q|^2 / sum (-2 q_z)`` over the pixels off the beam.

    Raises:
        DataFormatError: fewer than one scattered pixel, or a pixel off the sphere by more than 1e-6 relative.
    """
    q = det.q_voxel
    q2 = np.sum(q * q, axis=1)
    off = q[:, 2] < 0
    if not off.any():
        raise DataFormatError(det.path, "qz", "pixels off the beam (qz != 0)", "all qz = 0 (a 2D detector?)")
    s = float(q2[off].sum() / (-2.0 * q[off, 2].sum()))
    residual = np.abs(np.linalg.norm(q + np.array([0.0, 0.0, s]), axis=1) - s) / s
    worst = int(np.argmax(residual))
    if residual[worst] > _EWALD_TOL:
        raise DataFormatError(det.path, "qx/qy/qz", f"q on one Ewald sphere |q + s z| = s (s = {s:.6g} voxels)",
                              f"pixel {worst} off it by {residual[worst]:.2e} relative")
    return s


def q_inverse_angstrom(det: DragonflyDetector, wavelength_A: float) -> np.ndarray:
    """The file's q-vectors in 1/A (bayes-spi convention, no ``2 pi``), ``(num_pix, 3)``."""
    if not math.isfinite(wavelength_A) or wavelength_A <= 0:
        raise ValueError(f"wavelength_A: expected a positive number, got {wavelength_A!r}")
    return det.q_voxel / (ewald_radius(det) * wavelength_A)


def good_pixels(det: DragonflyDetector, keep_mask_1: bool = True) -> np.ndarray:
    """bayes-spi's good-pixel mask ``(num_pix,)`` bool: Dragonfly 0 (and 1 unless ``keep_mask_1`` is False)."""
    return det.raw_mask < (2 if keep_mask_1 else 1)


@dataclass(frozen=True)
class PixelLayout:
    """Where each Dragonfly pixel goes in an ``(n_y, n_x)`` image.

    Attributes:
        index: ``(n_y, n_x)`` int64, the Dragonfly pixel at each image pixel, ``-1`` for a hole (no pixel).
        position: ``(n_y, n_x, 2)`` detector-plane position ``(x, y)`` of each image pixel in pixel units
            (holes included), beam at ``(0, 0)``.
        distance: detector distance in pixel units (``D / p``).
        how: ``"positions"`` (rounded detector-plane positions) or ``"shape"`` (a given or square shape).
    """

    index: np.ndarray
    position: np.ndarray
    distance: float
    how: str

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_y, n_x)``."""
        return (int(self.index.shape[0]), int(self.index.shape[1]))

    @property
    def complete(self) -> bool:
        """Every image pixel is a Dragonfly pixel (no holes)."""
        return bool((self.index >= 0).all())

    def image(self, frames: np.ndarray) -> np.ndarray:
        """Frames ``(B, num_pix)`` -> images ``(B, n_y, n_x)`` (holes 0)."""
        flat = self.index.reshape(-1)
        out = np.zeros((frames.shape[0], flat.size), dtype=frames.dtype)
        have = flat >= 0
        out[:, have] = frames[:, flat[have]]
        return out.reshape(frames.shape[0], *self.shape)


def _plane_positions(det: DragonflyDetector, distance: float) -> np.ndarray:
    """Detector-plane positions ``(num_pix, 2)`` in pixel units: ``distance * k_xy / k_z``."""
    s = ewald_radius(det)
    k = det.q_voxel / s + np.array([0.0, 0.0, 1.0])
    if (k[:, 2] <= 0).any():
        raise DataFormatError(det.path, "qz", "pixels in the forward hemisphere", "a pixel at 90 degrees or more")
    return distance * k[:, :2] / k[:, 2:3]


def _distance(det: DragonflyDetector) -> float:
    if det.detd is not None and det.detd > 0:
        return float(det.detd)
    raise DataFormatError(det.path, "detd", "the detector distance in pixels (new-format file)",
                          "missing (old ASCII file): give shape=(n_y, n_x)")


def pixel_layout(det: DragonflyDetector, shape: tuple[int, int] | None = None) -> PixelLayout:
    """Recover the image layout of the pixel list.

    With ``shape`` (``(n_y, n_x)``, ``n_y * n_x = num_pix``): pixel ``t = ix * n_y + iy`` (``make_detector``'s
    order, ``x`` slow). Without: the detector-plane positions ``detd * k_xy / k_z`` are rounded to the pixel
    grid; if they lie on it (within 0.05 pixel) with at most one pixel per cell, the image is the bounding
    grid with holes (gaps between panels) left empty; otherwise a square ``num_pix = n * n`` is tried.

    Raises:
        DataFormatError / ValueError: no layout found (the message asks for ``shape``).
    """
    n = det.num_pix
    if shape is not None:
        n_y, n_x = (int(v) for v in shape)
        if n_y <= 0 or n_x <= 0 or n_y * n_x != n:
            raise ValueError(f"shape: expected (n_y, n_x) with n_y * n_x = num_pix = {n}, got {tuple(shape)}")
        index = np.arange(n, dtype=np.int64).reshape(n_x, n_y).T.copy()
        distance = det.detd if det.detd else float("nan")
        pos = _plane_positions(det, distance)[index] if det.detd else np.full((n_y, n_x, 2), np.nan)
        return PixelLayout(index, pos, float(distance), "shape")
    if det.detd:
        distance = _distance(det)
        pos = _plane_positions(det, distance)
        origin = pos.min(axis=0)
        cell = np.round(pos - origin).astype(np.int64)
        on_grid = np.abs(pos - origin - cell).max() <= 0.05
        n_x, n_y = int(cell[:, 0].max()) + 1, int(cell[:, 1].max()) + 1
        if on_grid and n_x * n_y <= 16 * n:
            index = np.full((n_y, n_x), -1, dtype=np.int64)
            index[cell[:, 1], cell[:, 0]] = np.arange(n)
            if int((index >= 0).sum()) == n:  # one pixel per cell
                iy, ix = np.mgrid[0:n_y, 0:n_x]
                grid = np.stack([ix + origin[0], iy + origin[1]], axis=-1).astype(np.float64)
                have = index >= 0
                grid[have] = pos[index[have]]
                return PixelLayout(index, grid, distance, "positions")
    side = math.isqrt(n)
    if side * side == n:
        return pixel_layout(det, (side, side))
    raise ValueError(f"{os.fspath(det.path)}: the {n} pixels are not on a square grid and their positions do not "
                     f"fill a grid: give the image shape (n_y, n_x) ({flag('shape')}), pixel t = ix * n_y + iy")


def _polarization_of(det: DragonflyDetector, layout: PixelLayout) -> str | None:
    """The bayes-spi polarization whose ``P_k`` matches ``corr_k * norm^3 / detd`` up to one constant."""
    have = layout.index >= 0
    pos = layout.position[have]
    corr = det.corr[layout.index[have]]
    d = layout.distance
    norm2 = pos[:, 0] ** 2 + pos[:, 1] ** 2 + d * d
    ratio = corr * norm2**1.5 / d
    if not (ratio > 0).all():
        return None
    candidates = {"x": 1.0 - pos[:, 0] ** 2 / norm2, "y": 1.0 - pos[:, 1] ** 2 / norm2,
                  "unpolarized": 0.5 * (1.0 + d * d / norm2), "none": np.ones_like(norm2)}
    for name, factor in candidates.items():
        rel = ratio / factor
        if np.abs(rel / rel.mean() - 1.0).max() < 1e-6:
            return name
    return None


def detector_geometry(
    det: DragonflyDetector,
    *,
    photon_energy_ev: float | None = None,
    shape: tuple[int, int] | None = None,
    keep_mask_1: bool = True,
    pixel_size_m: float | None = None,
    name: str | None = None,
) -> tuple[Geometry, PixelLayout]:
    """The bayes-spi geometry of a Dragonfly detector and the layout of its pixels in the image.

    Args:
        det: the detector file's contents.
        photon_energy_ev: the beam's photon energy (required unless the file holds the wavelength; if both,
            they must agree to 1e-6).
        shape: the image shape ``(n_y, n_x)`` if the layout cannot be recovered from the positions.
        keep_mask_1: Dragonfly mask 1 counts as good (default; see the module docstring).
        pixel_size_m: physical pixel size for a flat grid (default :data:`NOMINAL_PIXEL_SIZE_M`; only
            ``D / p`` is in the file and everything computed depends only on it).
        name: the geometry's name.

    Returns:
        ``(geometry, layout)``: a flat :class:`Geometry` if the pixels are a full grid centred on the beam
        (``q`` equal to the file's to 1e-9 relative), else a per-pixel one (``Geometry.from_q``).

    Raises:
        ValueError: no wavelength, or it disagrees with the file's.
        DataFormatError: the file is inconsistent (see :func:`ewald_radius`).
    """
    if photon_energy_ev is None and det.wavelength_A is None:
        raise ValueError(f"{os.fspath(det.path)}: a Dragonfly detector file holds no wavelength: expected "
                         f"the photon energy ({flag('photon_energy')} EV), got none")
    if photon_energy_ev is not None and (not math.isfinite(photon_energy_ev) or photon_energy_ev <= 0):
        raise ValueError(f"photon energy: expected a positive number of eV, got {photon_energy_ev!r}")
    energy = float(photon_energy_ev) if photon_energy_ev is not None else HC_EV_A / float(det.wavelength_A)
    if det.wavelength_A is not None and abs(HC_EV_A / energy / det.wavelength_A - 1.0) > 1e-6:
        raise ValueError(f"{os.fspath(det.path)}: photon energy {energy:g} eV (wavelength {HC_EV_A / energy:.6g} A) "
                         f"disagrees with the file's wavelength {det.wavelength_A:.6g} A")
    layout = pixel_layout(det, shape)
    lam = HC_EV_A / energy
    q = q_inverse_angstrom(det, lam)
    good_list = good_pixels(det, keep_mask_1)
    have = layout.index >= 0
    mask = np.zeros(layout.shape, dtype=bool)
    mask[have] = good_list[layout.index[have]]
    if not mask.any():
        raise DataFormatError(det.path, "mask", "at least one good pixel", "every pixel masked")
    n_y, n_x = layout.shape
    label = name or f"dragonfly-{n_y}x{n_x}"
    if layout.complete and np.isfinite(layout.distance):
        pol = _polarization_of(det, layout)
        if pol is not None:
            p = float(pixel_size_m) if pixel_size_m is not None else NOMINAL_PIXEL_SIZE_M
            flat = Geometry(Beam(energy, pol), Detector(n_x, n_y, p, layout.distance * p, mask=mask), name=label)
            q_img = q[layout.index]
            err = np.linalg.norm(flat.q_vectors() - q_img, axis=-1) / np.maximum(np.linalg.norm(q_img, axis=-1),
                                                                                 1e-300)
            if float(err.max()) <= _FLAT_TOL:
                return flat, layout
    return _per_pixel_geometry(det, layout, q, energy, mask, label), layout


def _per_pixel_geometry(det: DragonflyDetector, layout: PixelLayout, q: np.ndarray, energy: float,
                        mask: np.ndarray, name: str) -> Geometry:
    from_q = getattr(Geometry, "from_q", None)
    if from_q is None:
        raise ValueError(f"{os.fspath(det.path)}: this detector is not a flat grid centred on the beam, and this "
                         "version of bayes-spi has no per-pixel geometry (Geometry.from_q)")
    have = layout.index >= 0
    q_img = np.zeros((*layout.shape, 3))
    q_img[have] = q[layout.index[have]]
    factor = np.zeros(layout.shape)
    factor[have] = det.corr[layout.index[have]]
    if not have.all():  # holes: q and a small-pixel solid angle from their position on the detector plane
        d = layout.distance
        pos = layout.position[~have]
        norm = np.sqrt(pos[:, 0] ** 2 + pos[:, 1] ** 2 + d * d)
        lam = HC_EV_A / energy
        q_img[~have] = np.stack([pos[:, 0] / norm, pos[:, 1] / norm, d / norm - 1.0], axis=1) / lam
        factor[~have] = d / norm**3
    return from_q(q_img, factor, photon_energy_ev=energy, mask=mask, name=name)
