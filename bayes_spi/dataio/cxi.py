"""CXI files (the CXIDB format) as a data set: detector geometry, mask and photon energy from the file, frames
streamed in batches.

Read from the CXI layout (CXI file format 1.6, https://github.com/cxidb/CXI; lengths in metres, energies in J):

* the frames: ``/entry_1/data_1/data`` or ``/entry_1/instrument_1/detector_1/data`` (or ``data_path``), shape
  ``(N, ss, fs)`` (one panel), ``(N, M, ss, fs)`` (a modular detector of ``M`` modules, CXI "Modular Pixel
  Detectors") or ``(ss, fs)`` (one frame); several detectors ``detector_1, detector_2, ...`` of the same
  instrument, each with its own ``data (N, ss_k, fs_k)`` and geometry, are panels of one detector;
* the geometry of each panel (module): ``corner_position`` (``corner_positions`` for modules) ``(3,)`` / ``(M, 3)``,
  the lab position of the outer corner of the first pixel, and ``basis_vectors`` ``(2, 3)`` / ``(M, 2, 3)``, the
  steps from a pixel centre to the next along the slow (first) and fast (second) data axes. Without
  ``basis_vectors`` the CXI default ``[[0, -y_pixel_size, 0], [-x_pixel_size, 0, 0]]`` applies; without
  ``corner_position`` (older CXIDB files) the panel is taken as centred on the beam at ``distance``, facing it.
  Per-frame copies (a leading ``N`` axis) must not vary between frames;
* the mask: ``mask`` and/or ``mask_shared`` ``(ss, fs)`` / ``(M, ss, fs)`` 32-bit CXI pixel flags. A pixel is
  bad when any flag of ``bad_bits`` is set: by default every bit except ``0x1000`` (``CXI_PIXEL_HAS_SIGNAL``,
  not a defect); the spec's defect bits are invalid 0x1, saturated 0x2, hot 0x4, dead 0x8, shadowed 0x10,
  bad 0x80, missing (gap) 0x200, noisy 0x400, and the spec leaves the other bits to users (counted as bad);
* the photon energy: ``/entry_1/instrument_1/source_1/energy`` (J), unless ``photon_energy_ev`` is given.

Coordinates: CXI's frame (z along the beam, y up, x horizontal completing a right-handed frame, origin at the
interaction point) is bayes-spi's lab frame (:mod:`bayes_spi.geometry`), so the default polarization ``"x"`` is
the horizontal polarization of XFELs. The geometry is per pixel (kind ``"positions"``: exact solid angle and
polarization per pixel); modules and detectors are stacked along ``iy`` in file order (module 0 / detector_1
first), narrower panels padded on the right with masked pixels.

Values: integer counts, or floats holding whole photon counts (as :class:`~bayes_spi.dataio.h5.SPIDataset`
requires); for photon-converted data that is not whole (e.g. energy-calibrated detector values) give
``adu_per_photon``: each value is divided by it, rounded to the nearest integer and negative results (noise
around 0 after dark subtraction) set to 0.

Example::

    with open_cxi("run.cxi") as data:
        print(data.geometry.kind, data.shape, data.n_patterns)
        for idx, counts in data.iter_batches(256, shuffle=False):
            ...
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from bayes_spi.config.commands import flag
from bayes_spi.dataio.h5 import DataFormatError
from bayes_spi.dataio.h5open import open_h5
from bayes_spi.dataio.sources import PatternSource
from bayes_spi.geometry import Geometry, Panel

__all__ = ["CXIDataset", "open_cxi", "JOULE_PER_EV", "CXI_PIXEL_HAS_SIGNAL", "DEFAULT_BAD_BITS", "DATA_PATHS"]

#: 1 eV in J (exact, SI 2019)
JOULE_PER_EV: float = 1.602176634e-19

#: CXI mask bit "the pixel signal is above the background" (not a defect)
CXI_PIXEL_HAS_SIGNAL: int = 0x00001000

#: mask bits that make a pixel bad by default: all but CXI_PIXEL_HAS_SIGNAL
DEFAULT_BAD_BITS: int = 0xFFFFFFFF & ~CXI_PIXEL_HAS_SIGNAL

#: where the frames are looked for, in this order
DATA_PATHS: tuple[str, ...] = ("/entry_1/data_1/data", "/entry_1/instrument_1/detector_1/data")

_DETECTORS = "/entry_1/instrument_1"
_ENERGY = "/entry_1/instrument_1/source_1/energy"


class CXIDataset(PatternSource):
    """A CXI file as a data set with the :class:`~bayes_spi.dataio.h5.SPIDataset` interface (``read``,
    ``iter_batches``, ``geometry``, ``mask``, ...): frames are read per batch, never the whole stack.

    Args:
        path: the ``.cxi`` file.
        photon_energy_ev: overrides (or replaces a missing) ``source_1/energy``.
        polarization: ``"x"`` (default, horizontal), ``"y"``, ``"unpolarized"`` or ``"none"``.
        data_path: the frames dataset (default: the first of :data:`DATA_PATHS` present).
        adu_per_photon: convert non-whole values to photons (see the module docstring).
        bad_bits: CXI mask bits that make a pixel bad (default :data:`DEFAULT_BAD_BITS`).
        geometry: a geometry replacing the file's (e.g. ``read_crystfel_geom("agipd.geom").geometry`` for a file
            whose frames are ``(N, modules, ss, fs)`` in that ``.geom``'s layout): it must have the frames' stacked
            shape; its mask is combined with the file's CXI mask, if the file has one. Then the file needs no
            geometry fields, and its photon energy is not read.

    Raises:
        FileNotFoundError: no such file.
        DataFormatError: a field is missing or malformed (names the file and the field).
    """

    kind = "cxi"

    def __init__(self, path: str | os.PathLike[str], *, photon_energy_ev: float | None = None,
                 polarization: str = "x", data_path: str | None = None, adu_per_photon: float | None = None,
                 bad_bits: int = DEFAULT_BAD_BITS, geometry: Geometry | None = None) -> None:
        self.path = Path(path)
        if adu_per_photon is not None and not (np.isfinite(adu_per_photon) and adu_per_photon > 0):
            raise ValueError(f"adu_per_photon: expected a positive number, got {adu_per_photon!r}")
        self.adu_per_photon = None if adu_per_photon is None else float(adu_per_photon)
        self.bad_bits = int(bad_bits)
        self._file = open_h5(self.path, "a CXI (HDF5) file", rdcc_nbytes=64 * 1024 * 1024)
        try:
            self._open(photon_energy_ev, polarization, data_path, geometry)
        except Exception:
            self.close()
            raise

    # ------------------------------------------------------------------ structure
    def _error(self, field: str, expected: str, found: str) -> DataFormatError:
        return DataFormatError(self.path, field, expected, found)

    def _data_sets(self, data_path: str | None) -> list[tuple[h5py.Dataset, h5py.Group]]:
        """``[(frames dataset, its geometry group)]``: one, or one per ``detector_k``."""
        f = self._file
        if data_path is not None:
            obj = f.get(data_path)
            if not isinstance(obj, h5py.Dataset):
                raise self._error(data_path, "a dataset of frames", "missing" if obj is None else type(obj).__name__)
            return [(obj, obj.parent)]
        detectors = []
        k = 1
        while isinstance(f.get(f"{_DETECTORS}/detector_{k}/data"), h5py.Dataset):
            detectors.append(f[f"{_DETECTORS}/detector_{k}"])
            k += 1
        if len(detectors) > 1:
            return [(grp["data"], grp) for grp in detectors]
        for name in DATA_PATHS:
            obj = f.get(name)
            if isinstance(obj, h5py.Dataset):
                # data_1 is usually a link to detector_1's data; detector_1 holds the geometry
                group = detectors[0] if detectors else obj.parent
                return [(obj, group)]
        raise self._error(DATA_PATHS[0], f"a dataset of frames (or {DATA_PATHS[1]})", "missing")

    def _open(self, photon_energy_ev: float | None, polarization: str, data_path: str | None,
              given: Geometry | None) -> None:
        if given is not None and photon_energy_ev is not None:
            raise ValueError("photon_energy_ev: expected none with geometry (the geometry holds the photon energy), "
                             f"got {photon_energy_ev!r}")
        sets = self._data_sets(data_path)
        panels: list[Panel] = []
        self._parts: list[tuple[h5py.Dataset, str, int]] = []  # (dataset, name, modules)
        n_frames: int | None = None
        for data, group in sets:
            name = data.name or "data"
            if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
                raise self._error(name, "an integer or float dtype", str(data.dtype))
            if data.ndim == 2:
                frames, modules, ss, fs = 1, 0, data.shape[0], data.shape[1]
            elif data.ndim == 3:
                frames, modules, ss, fs = data.shape[0], 0, data.shape[1], data.shape[2]
            elif data.ndim == 4:
                frames, modules, ss, fs = data.shape
            else:
                raise self._error(name, "frames (N, ss, fs), modules (N, M, ss, fs) or one frame (ss, fs)",
                                  f"shape {data.shape}")
            if min(ss, fs) < 1 or (data.ndim == 4 and modules < 1):
                raise self._error(name, "non-empty frames", f"shape {data.shape}")
            if n_frames is not None and frames != n_frames:
                raise self._error(name, f"{n_frames} frames (as the first detector)", f"{frames}")
            n_frames = frames
            self._parts.append((data, name, modules))
            if given is None:
                panels += self._panels(group, modules, ss, fs)
            else:
                m = max(modules, 1)
                mask = self._mask(group, modules, ss, fs)
                # placeholder panels (only their shape and mask are used): the given geometry replaces them
                panels += [Panel((0.0, 0.0, 1.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), n_fs=fs, n_ss=ss, mask=mask[k])
                           for k in range(m)]
        self.panels = panels
        if given is not None:
            width = max(p.n_fs for p in panels)
            stacked = (sum(p.n_ss for p in panels), width)
            if tuple(given.shape) != stacked:
                raise ValueError(f"geometry: expected shape {stacked} (the frames of {os.fspath(self.path)} with "
                                 f"modules stacked along the rows), got shape {tuple(given.shape)}")
            file_mask = np.concatenate([np.pad(np.ones((p.n_ss, p.n_fs), bool) if p.mask is None else p.mask,
                                               ((0, 0), (0, width - p.n_fs))) for p in panels])
            self.geometry = given.with_mask(given.good_pixels() & file_mask)
        else:
            energy = self._photon_energy(photon_energy_ev)
            try:
                self.geometry = Geometry.from_panels(panels, photon_energy_ev=energy, polarization=polarization,
                                                     name=f"cxi:{self.path.name}")
            except ValueError as exc:
                raise self._error(sets[0][1].name or "/", "a valid detector geometry", str(exc)) from None
        self.mask = self.geometry.good_pixels()
        if not self.mask.any():
            raise self._error(f"{sets[0][1].name}/mask", "at least one good pixel", "every pixel flagged bad")
        self.shape = self.geometry.shape
        self.n_patterns = int(n_frames or 0)
        chunks = sets[0][0].chunks
        self.chunk_patterns = int(chunks[0]) if chunks and sets[0][0].ndim >= 3 else 64
        self.field = sets[0][0].name or "data"

    def _vector(self, group: h5py.Group, names: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray | None:
        """A geometry field of ``shape`` (a leading per-frame axis allowed if constant), or None if absent."""
        for key in names:
            obj = group.get(key)
            if obj is None:
                continue
            field = f"{group.name}/{key}"
            if not isinstance(obj, h5py.Dataset) or not np.issubdtype(obj.dtype, np.number):
                raise self._error(field, f"numbers of shape {shape}", type(obj).__name__)
            arr = np.asarray(obj[()], dtype=np.float64)
            if arr.shape != shape and arr.shape[1:] == shape:
                if not np.all(arr == arr[:1]):
                    raise self._error(field, "the same geometry for every frame", "values that vary between frames")
                arr = arr[0]
            if arr.shape != shape:
                raise self._error(field, f"shape {shape}", f"shape {arr.shape}")
            if not np.all(np.isfinite(arr)):
                raise self._error(field, "finite values", "NaN or infinity")
            return arr
        return None

    def _scalar(self, group: h5py.Group, key: str) -> float | None:
        value = self._vector(group, (key,), ())
        if value is None:
            return None
        if value <= 0:
            raise self._error(f"{group.name}/{key}", "a positive length (m)", repr(float(value)))
        return float(value)

    def _panels(self, group: h5py.Group, modules: int, ss: int, fs: int) -> list[Panel]:
        """The panels of one detector group (``modules`` = 0: one panel)."""
        m = max(modules, 1)
        lead = (modules,) if modules else ()
        corner = self._vector(group, ("corner_positions", "corner_position"), (*lead, 3))
        basis = self._vector(group, ("basis_vectors",), (*lead, 2, 3))
        if basis is None:
            x_size, y_size = self._scalar(group, "x_pixel_size"), self._scalar(group, "y_pixel_size")
            if x_size is None or y_size is None:
                raise self._error(f"{group.name}/basis_vectors", "basis vectors, or x_pixel_size and y_pixel_size",
                                  "missing")
            basis = np.broadcast_to(np.array([[0.0, -y_size, 0.0], [-x_size, 0.0, 0.0]]), (*lead, 2, 3))
        if corner is None:
            distance = self._scalar(group, "distance")
            if distance is None:
                raise self._error(f"{group.name}/corner_position", "the corner position (or distance)", "missing")
            if modules:
                raise self._error(f"{group.name}/corner_positions", "corner positions (M, 3) of the modules", "missing")
            b = np.asarray(basis)
            # centred on the beam: the panel's middle at (0, 0, distance)
            corner = np.array([0.0, 0.0, distance]) - 0.5 * (ss * b[0] + fs * b[1])
        corner = np.asarray(corner).reshape(m, 3)
        basis = np.asarray(basis).reshape(m, 2, 3)
        masks = self._mask(group, modules, ss, fs)
        return [Panel(tuple(corner[k]), fs_m=tuple(basis[k, 1]), ss_m=tuple(basis[k, 0]), n_fs=fs, n_ss=ss,
                      mask=masks[k], name=f"{group.name}[{k}]" if modules else str(group.name))
                for k in range(m)]

    def _mask(self, group: h5py.Group, modules: int, ss: int, fs: int) -> list[np.ndarray]:
        m = max(modules, 1)
        shape = (modules, ss, fs) if modules else (ss, fs)
        good = np.ones((m, ss, fs), dtype=bool)
        for key in ("mask", "mask_shared"):
            obj = group.get(key)
            if obj is None:
                continue
            field = f"{group.name}/{key}"
            if not isinstance(obj, h5py.Dataset) or not np.issubdtype(obj.dtype, np.integer):
                raise self._error(field, f"integer CXI pixel flags of shape {shape}",
                                  str(getattr(obj, "dtype", type(obj).__name__)))
            if obj.shape != shape:
                raise self._error(field, f"one mask of shape {shape} for all frames (per-frame masks are not read)",
                                  f"shape {obj.shape}")
            flags = np.asarray(obj[()]).astype(np.int64) & 0xFFFFFFFF
            good &= ((flags & self.bad_bits) == 0).reshape(m, ss, fs)
        return list(good)

    def _photon_energy(self, given: float | None) -> float:
        if given is not None:
            return float(given)
        obj = self._file.get(_ENERGY)
        if not isinstance(obj, h5py.Dataset) or not np.issubdtype(obj.dtype, np.number):
            raise self._error(_ENERGY, f"the photon energy in J (or give photon_energy_ev / {flag('photon_energy')})",
                              "missing" if obj is None else type(obj).__name__)
        values = np.asarray(obj[()], dtype=np.float64).ravel()
        if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values <= 0):
            raise self._error(_ENERGY, "a positive photon energy in J", "empty, non-finite or non-positive values")
        if values.size > 1 and np.ptp(values) > 1e-3 * values.mean():
            raise self._error(_ENERGY, "one photon energy (per-frame values within 0.1%)",
                              f"values from {values.min():.4g} to {values.max():.4g} J")
        return float(values.mean() / JOULE_PER_EV)

    # ------------------------------------------------------------------ reading
    @property
    def attrs(self) -> dict[str, Any]:
        """Provenance: the file, the frames dataset(s), the mask rule and the photon conversion."""
        return {"source_kind": self.kind, "source": os.fspath(self.path),
                "cxi_data": ";".join(name for _, name, _ in self._parts), "cxi_bad_bits": f"0x{self.bad_bits:08x}",
                "adu_per_photon": "" if self.adu_per_photon is None else self.adu_per_photon}

    def _read_sorted(self, idx: np.ndarray) -> np.ndarray:
        """Frames ``(B, n_y, n_x)`` of sorted distinct indices: the panels stacked (and padded) as the geometry."""
        n_y, n_x = self.shape
        out = np.zeros((len(idx), n_y, n_x), dtype=np.float64 if self.adu_per_photon else np.float32)
        contiguous = len(idx) > 1 and bool(np.all(np.diff(idx) == 1))
        sel: Any = slice(int(idx[0]), int(idx[-1]) + 1) if contiguous else idx
        row = 0
        for data, name, modules in self._parts:
            if data.ndim == 2:
                raw = np.asarray(data[()])[None].repeat(len(idx), axis=0)
            else:
                raw = np.asarray(data[sel] if len(idx) > 1 else data[int(idx[0])][None])
            if not (np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating)):
                raise self._error(name, "numbers", str(raw.dtype))
            raw = raw.reshape(len(idx), -1, raw.shape[-1])  # modules stacked along the rows
            out[:, row : row + raw.shape[1], : raw.shape[2]] = raw
            row += raw.shape[1]
        if self.adu_per_photon is not None:
            with np.errstate(invalid="ignore"):
                out = np.where(np.isfinite(out), np.maximum(np.rint(out / self.adu_per_photon), 0.0), out)
        return out

    def close(self) -> None:
        """Close the file."""
        handle = getattr(self, "_file", None)
        if handle is not None and handle.id.valid:
            handle.close()


def open_cxi(path: str | os.PathLike[str], *, photon_energy_ev: float | None = None, **options: Any) -> CXIDataset:
    """:class:`CXIDataset` of ``path`` (``options``: see the class)."""
    return CXIDataset(path, photon_energy_ev=photon_energy_ev, **options)
