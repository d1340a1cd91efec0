"""Open any supported pattern source as a data set with the :class:`~bayes_spi.dataio.h5.SPIDataset` interface.

:func:`open_dataset` is what ``fit``, ``posterior`` and ``convert`` call. It recognises:

* a bayes-spi HDF5 file (``bayes-spi simulate``, ``bayes-spi convert``) -> :class:`SPIDataset`;
* Dragonfly photon files: one or several ``.emc`` (or Dragonfly's HDF5 photon files), or a text file listing
  them (``.txt``/``.lst``, as Dragonfly's ``in_photons_list``), with ``detector=`` Dragonfly's detector file
  (:mod:`bayes_spi.dataio.dragonfly_detector`) and the photon energy -> :class:`EmcSource`;
* a CXI file (``.cxi``, or HDF5 with ``/entry_1``) -> :mod:`bayes_spi.dataio.cxi` (its own geometry, or a
  CrystFEL ``.geom`` given as ``geometry=``);
* the generic route: a NumPy stack ``counts.npy`` ``(N, n_y, n_x)`` (memory-mapped) or an HDF5 dataset
  ``file.h5:/path/to/counts`` ``(N, n_y, n_x)``, with ``geometry=`` a geometry file -> :class:`StackSource`;
  the geometry may also be a CrystFEL ``.geom`` (AGIPD at European XFEL), the stack then ``(N, *data_shape)``
  of that file (e.g. ``(N, 16, 512, 128)``).

Generic geometry file (YAML or JSON; relative file names are relative to the geometry file)
-----------------------------------------------------------------------------------------
::

    photon_energy_ev: 6199.2      # or wavelength_A: 2.0
    distance_m: 0.075             # sample-detector distance (metres)
    pixel_size_m: 1.92e-3         # square pixel side (metres)
    polarization: x               # x | y | unpolarized | none (default x: E-field along lab x = image columns)
    beam_center_px: [7.5, 5.5]    # optional (x, y) = (column, row) where the beam meets the detector, in pixel
                                  # index units (pixel (iy, ix) centre at ((ix - x) p, (iy - y) p, D));
                                  # default the detector's middle ((n_x - 1)/2, (n_y - 1)/2)
    mask: mask.npy                # optional (n_y, n_x), nonzero/True = good pixel (.npy, or file.h5:/path)
    pixel_positions_m: pos.npy    # optional (n_y, n_x, 3) pixel centres in the lab frame (metres; beam along
                                  # +z, sample at the origin): any detector (tilted, multi-panel); then
                                  # distance_m and beam_center_px are not used, pixel_size_m still is
    name: my-detector             # optional

Conventions: :mod:`bayes_spi.geometry` (beam along +z, ``q`` without ``2 pi``, arrays ``[iy, ix]``). A centred
beam without ``pixel_positions_m`` gives the flat grid geometry (the presets' kind); anything else the
per-pixel ``"positions"`` kind (exact solid angle and polarization per pixel).

Every source validates counts as it reads them (finite, non-negative, whole numbers at good pixels; masked
pixels are returned as 0) and raises :class:`~bayes_spi.dataio.h5.DataFormatError` naming the file, the field
and the pattern. Memory does not grow with N: patterns are read in batches.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from bayes_spi.config.commands import flag
from bayes_spi.dataio.h5 import FORMAT_NAME, DataFormatError, SPIDataset, check_counts, normalise_indices
from bayes_spi.dataio.h5open import open_h5
from bayes_spi.geometry import HC_EV_A, POLARIZATIONS, Beam, Detector, Geometry

__all__ = [
    "PatternSource",
    "EmcSource",
    "StackSource",
    "open_dataset",
    "read_geometry_file",
    "split_dataset_path",
    "source_kind",
    "GEOMETRY_FILE_KEYS",
]

#: keys of the generic geometry file (see the module docstring)
GEOMETRY_FILE_KEYS: tuple[str, ...] = ("photon_energy_ev", "wavelength_A", "distance_m", "pixel_size_m",
                                       "polarization", "beam_center_px", "mask", "pixel_positions_m", "name")

_LIST_SUFFIXES = (".txt", ".lst", ".list")


# ====================================================================== base class
class PatternSource:
    """Common read/batch logic of the foreign sources: subclasses set ``path``, ``geometry``, ``mask``,
    ``n_patterns``, ``shape``, ``chunk_patterns`` and implement :meth:`_read_sorted`.

    The interface is :class:`SPIDataset`'s: ``read``, ``iter_batches``, ``batch_indices``, ``n_patterns``,
    ``shape``, ``geometry``, ``mask``, ``has_truth`` (False), ``photons_per_unit_intensity`` (None),
    ``attrs`` (provenance), ``close`` and the context manager.
    """

    path: Path
    geometry: Geometry
    mask: np.ndarray
    n_patterns: int
    shape: tuple[int, int]
    chunk_patterns: int = 64
    has_truth: bool = False
    photons_per_unit_intensity: float | None = None
    #: what the data is, for messages and the provenance attributes
    kind: str = "source"
    #: the field named in value errors
    field: str = "counts"

    # ------------------------------------------------------------------ to implement
    def _read_sorted(self, idx: np.ndarray) -> np.ndarray:
        """Raw counts ``(B, n_y, n_x)`` of sorted distinct indices ``idx``."""
        raise NotImplementedError

    @property
    def attrs(self) -> dict[str, Any]:
        """Provenance (written to ``/simulation`` attrs by ``bayes-spi convert``)."""
        return {"source_kind": self.kind, "source": os.fspath(self.path)}

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return self.n_patterns

    def read(self, indices: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        """Counts of the given patterns, ``(B, n_y, n_x)`` float32, masked pixels set to 0.

        Raises:
            DataFormatError: a good-pixel value is negative, non-finite or not a whole number (names the pattern).
        """
        idx = normalise_indices(indices, self.n_patterns)
        if idx.size == 0:
            return np.zeros((0, *self.shape), dtype=np.float32)
        unique, inverse = np.unique(idx, return_inverse=True)
        raw = np.asarray(self._read_sorted(unique))
        check_counts(raw[:, self.mask], unique, self.path, self.field)
        data = raw.astype(np.float32)[inverse.reshape(-1)]
        data[:, ~self.mask] = 0.0
        return data

    def batch_indices(
        self, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, buffer_chunks: int = 8
    ) -> Iterator[np.ndarray]:
        """Index batches of one epoch (no I/O); the same order rules as :meth:`SPIDataset.batch_indices`."""
        return SPIDataset.batch_indices(self, batch_size, shuffle=shuffle, seed=seed,  # type: ignore[arg-type]
                                        epoch=epoch, buffer_chunks=buffer_chunks)

    def iter_batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        start: int = 0,
        epoch: int = 0,
        buffer_chunks: int = 8,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream one epoch in batches: ``(indices (B,) int64, counts (B, n_y, n_x) float32)``; see
        :meth:`SPIDataset.iter_batches` (``start`` skips batches without reading them)."""
        return SPIDataset.iter_batches(self, batch_size, shuffle=shuffle, seed=seed,  # type: ignore[arg-type]
                                       start=start, epoch=epoch, buffer_chunks=buffer_chunks)

    # ------------------------------------------------------------------ truth: none
    def _no_truth(self, name: str) -> DataFormatError:
        return DataFormatError(self.path, f"/truth/{name}", "a dataset (simulated data)",
                               f"missing ({self.kind} data has no truth)")

    def truth_quaternions(self) -> np.ndarray:
        """Raises :class:`DataFormatError`: foreign data has no truth."""
        raise self._no_truth("quaternions")

    def truth_rotations(self) -> np.ndarray:
        """Raises :class:`DataFormatError`: foreign data has no truth."""
        raise self._no_truth("quaternions")

    def truth_scales(self) -> np.ndarray:
        """Raises :class:`DataFormatError`: foreign data has no truth."""
        raise self._no_truth("scales")

    def truth_intensity(self) -> tuple[np.ndarray, float]:
        """Raises :class:`DataFormatError`: foreign data has no truth."""
        raise self._no_truth("intensity")

    def truth_density(self) -> tuple[np.ndarray, float]:
        """Raises :class:`DataFormatError`: foreign data has no truth."""
        raise self._no_truth("density")

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Release the files."""

    def __enter__(self) -> PatternSource:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({os.fspath(self.path)!r}, n_patterns={self.n_patterns}, shape={self.shape})"


# ====================================================================== Dragonfly
class EmcSource(PatternSource):
    """Dragonfly photon files + detector file as a data set (frames assembled into ``(n_y, n_x)`` images).

    Args:
        photons: ``.emc`` file(s) or a list file (see :class:`~bayes_spi.dataio.emc.EmcDataset`).
        detector: Dragonfly's detector file (HDF5 or ASCII).
        photon_energy_ev: photon energy (required unless the detector file holds the wavelength).
        shape: ``(n_y, n_x)`` if the pixel layout cannot be recovered from the detector.
        keep_mask_1: Dragonfly mask value 1 counts as good (default).
        pixel_size_m: nominal pixel size for a flat grid (only ``D / p`` is in the file).
    """

    kind = "dragonfly-emc"
    field = "frames"
    chunk_patterns = 256

    def __init__(self, photons: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                 detector: str | os.PathLike[str], *, photon_energy_ev: float | None = None,
                 shape: tuple[int, int] | None = None, keep_mask_1: bool = True,
                 pixel_size_m: float | None = None) -> None:
        from bayes_spi.dataio.dragonfly_detector import detector_geometry, read_dragonfly_detector
        from bayes_spi.dataio.emc import EmcDataset

        self.detector_path = Path(detector)
        det = read_dragonfly_detector(self.detector_path)
        self.geometry, self.layout = detector_geometry(det, photon_energy_ev=photon_energy_ev, shape=shape,
                                                       keep_mask_1=keep_mask_1, pixel_size_m=pixel_size_m)
        self.emc = EmcDataset(photons, num_pix=det.num_pix)
        self.path = self.emc.paths[0]
        self.mask = self.geometry.good_pixels()
        self.shape = self.geometry.shape
        self.n_patterns = self.emc.num_data
        self.keep_mask_1 = keep_mask_1

    @property
    def attrs(self) -> dict[str, Any]:
        """Provenance: the photon files, the detector file, the layout and the mask rule."""
        return {"source_kind": self.kind, "source": ";".join(os.fspath(p) for p in self.emc.paths),
                "detector_file": os.fspath(self.detector_path), "pixel_layout": self.layout.how,
                "dragonfly_mask_1": "good" if self.keep_mask_1 else "bad"}

    def _read_sorted(self, idx: np.ndarray) -> np.ndarray:
        return self.layout.image(self.emc.read_pixels(idx))

    def close(self) -> None:
        """Close the photon files."""
        self.emc.close()


# ====================================================================== generic stack
def split_dataset_path(text: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """``"file.h5:/path/in/file"`` -> ``(Path("file.h5"), "/path/in/file")``; a plain path -> ``(path, None)``."""
    text = os.fspath(text)
    if ":/" in text:
        head, tail = text.split(":/", 1)
        if head and not Path(text).exists():
            return Path(head), "/" + tail
    return Path(text), None


def _load_array(spec: str, base: Path, what: str) -> np.ndarray:
    path, inner = split_dataset_path(spec)
    if not path.is_absolute():
        path = base / path
    if inner is not None:
        with open_h5(path, f"an HDF5 file holding the {what}") as f:
            if inner not in f or not isinstance(f[inner], h5py.Dataset):
                raise DataFormatError(path, inner, f"a dataset ({what})", "missing")
            return np.asarray(f[inner][()])
    if path.suffix.lower() == ".npy":
        return np.load(path, allow_pickle=False)
    raise DataFormatError(path, "/", f"a .npy file or FILE.h5:/dataset ({what})", f"suffix {path.suffix!r}")


def _number(doc: dict[str, Any], key: str, path: Path, required: bool = True) -> float | None:
    if key not in doc or doc[key] is None:
        if required:
            raise DataFormatError(path, key, "a positive number", "missing")
        return None
    try:
        value = float(doc[key])
    except (TypeError, ValueError):
        raise DataFormatError(path, key, "a positive number", repr(doc[key])) from None
    if not math.isfinite(value) or value <= 0:
        raise DataFormatError(path, key, "a positive number", repr(doc[key]))
    return value


def read_geometry_file(path: str | os.PathLike[str], shape: tuple[int, int], *,
                       photon_energy_ev: float | None = None) -> Geometry:
    """The geometry described by a generic geometry file (see the module docstring) for ``(n_y, n_x)`` patterns.

    Args:
        path: the YAML or JSON file.
        shape: the patterns' ``(n_y, n_x)``.
        photon_energy_ev: overrides the file's photon energy / wavelength.

    Raises:
        FileNotFoundError: the file or a file it names is missing.
        DataFormatError: a field is missing, unknown or invalid (names the file and the field).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"geometry file {os.fspath(path)!r} not found")
    import yaml

    text = path.read_text()
    try:
        doc = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise DataFormatError(path, "/", "YAML or JSON", (str(exc).splitlines() or [""])[0][:120]) from None
    if not isinstance(doc, dict):
        raise DataFormatError(path, "/", "a mapping of geometry fields", type(doc).__name__)
    unknown = sorted(set(doc) - set(GEOMETRY_FILE_KEYS))
    if unknown:
        raise DataFormatError(path, ", ".join(unknown), f"only the fields {', '.join(GEOMETRY_FILE_KEYS)}", "unknown")
    n_y, n_x = shape
    base = path.parent
    if photon_energy_ev is None:
        energy = _number(doc, "photon_energy_ev", path, required=False)
        wavelength = _number(doc, "wavelength_A", path, required=False)
        if energy is None and wavelength is None:
            raise DataFormatError(path, "photon_energy_ev", "a positive number (or wavelength_A)", "missing")
        if energy is not None and wavelength is not None and abs(energy * wavelength / HC_EV_A - 1) > 1e-6:
            raise DataFormatError(path, "photon_energy_ev, wavelength_A", "agreeing values",
                                  f"{energy} eV and {wavelength} A")
        photon_energy_ev = energy if energy is not None else HC_EV_A / float(wavelength)  # type: ignore[arg-type]
    polarization = str(doc.get("polarization", "x"))
    if polarization not in POLARIZATIONS:
        raise DataFormatError(path, "polarization", f"one of {', '.join(POLARIZATIONS)}", repr(polarization))
    pixel = _number(doc, "pixel_size_m", path)
    name = str(doc["name"]) if doc.get("name") else None
    mask = None
    if doc.get("mask") is not None:
        raw = _load_array(str(doc["mask"]), base, "mask")
        if raw.shape != (n_y, n_x):
            raise DataFormatError(path, "mask", f"an array of shape {(n_y, n_x)} (the patterns')", f"shape {raw.shape}")
        mask = raw.astype(bool)
        if not mask.any():
            raise DataFormatError(path, "mask", "at least one good (nonzero) pixel", "all pixels masked")
    if doc.get("pixel_positions_m") is not None:
        pos = np.asarray(_load_array(str(doc["pixel_positions_m"]), base, "pixel positions"), dtype=np.float64)
        if pos.shape != (n_y, n_x, 3):
            raise DataFormatError(path, "pixel_positions_m", f"an array of shape {(n_y, n_x, 3)}", f"shape {pos.shape}")
        return _from_positions(path, pos, photon_energy_ev, polarization, mask, pixel, name)
    distance = _number(doc, "distance_m", path)
    centre = doc.get("beam_center_px")
    middle = ((n_x - 1) / 2.0, (n_y - 1) / 2.0)
    if centre is not None:
        try:
            cx, cy = (float(v) for v in centre)
        except (TypeError, ValueError):
            raise DataFormatError(path, "beam_center_px", "two numbers [x, y] (column, row)", repr(centre)) from None
        if not (math.isfinite(cx) and math.isfinite(cy)):
            raise DataFormatError(path, "beam_center_px", "finite numbers", repr(centre))
    else:
        cx, cy = middle
    try:
        if (cx, cy) == middle:
            return Geometry(Beam(float(photon_energy_ev), polarization),
                            Detector(n_x, n_y, float(pixel), float(distance), mask=mask), name=name)  # type: ignore[arg-type]
    except ValueError as exc:
        raise DataFormatError(path, "/", "a valid geometry", str(exc)) from None
    iy, ix = np.mgrid[0:n_y, 0:n_x].astype(np.float64)
    pos = np.stack([(ix - cx) * pixel, (iy - cy) * pixel, np.full_like(ix, float(distance))], axis=-1)  # type: ignore[operator]
    return _from_positions(path, pos, photon_energy_ev, polarization, mask, pixel, name)


def _from_positions(path: Path, pos: np.ndarray, energy: float, polarization: str, mask: np.ndarray | None,
                    pixel: float | None, name: str | None) -> Geometry:
    from_positions = getattr(Geometry, "from_positions", None)
    if from_positions is None:
        raise DataFormatError(path, "beam_center_px / pixel_positions_m", "a centred flat grid (this version has no "
                              "per-pixel geometry)", "an off-centre or per-pixel detector")
    try:
        return from_positions(pos, photon_energy_ev=float(energy), polarization=polarization, mask=mask,
                              pixel_size_m=pixel, name=name)
    except ValueError as exc:
        raise DataFormatError(path, "pixel_positions_m", "a valid per-pixel geometry", str(exc)) from None


class StackSource(PatternSource):
    """A NumPy ``.npy`` stack (memory-mapped) or an HDF5 dataset of counts plus a geometry file.

    Args:
        counts: ``counts.npy`` or ``file.h5:/path/to/dataset``, ``(N, n_y, n_x)``; with a CrystFEL ``.geom``
            ``(N, *data_shape)`` of that file (e.g. AGIPD's ``(N, 16, 512, 128)``), laid out as it says.
        geometry: the geometry file: YAML/JSON (see the module docstring) or CrystFEL ``.geom``
            (:mod:`bayes_spi.dataio.crystfel`; its mask file is applied, its ``data`` path is not used).
        photon_energy_ev: overrides the geometry file's photon energy.
    """

    kind = "stack"

    def __init__(self, counts: str | os.PathLike[str], geometry: str | os.PathLike[str], *,
                 photon_energy_ev: float | None = None) -> None:
        self.path, self.inner = split_dataset_path(counts)
        self.geometry_path = Path(geometry)
        self._file: h5py.File | None = None
        if self.inner is not None:
            self._file = open_h5(self.path, "an HDF5 file of counts")
            obj = self._file.get(self.inner)
            if not isinstance(obj, h5py.Dataset):
                self.close()
                raise DataFormatError(self.path, self.inner, "a dataset of counts (N, n_y, n_x)",
                                      "missing" if obj is None else type(obj).__name__)
            self._counts: Any = obj
            self.field = self.inner
            chunks = obj.chunks
            self.chunk_patterns = int(chunks[0]) if chunks else 64
        else:
            if self.path.suffix.lower() != ".npy":
                raise DataFormatError(self.path, "/", "a .npy stack or FILE.h5:/dataset", f"suffix {self.path.suffix!r}")
            try:
                self._counts = np.load(self.path, mmap_mode="r", allow_pickle=False)
            except ValueError as exc:
                raise DataFormatError(self.path, "/", "a NumPy .npy array", str(exc)[:120]) from None
            self.field = "array"
            self.chunk_patterns = 64
        shape = tuple(self._counts.shape)
        dtype = np.dtype(self._counts.dtype)
        self.crystfel = None
        if self.geometry_path.suffix.lower() == ".geom":
            from bayes_spi.dataio.crystfel import read_crystfel_geom

            try:
                self.crystfel = read_crystfel_geom(self.geometry_path, photon_energy_ev=photon_energy_ev,
                                                   data_file=self.path if self.inner is not None else None)
            except Exception:
                self.close()
                raise
            if shape[1:] != self.crystfel.data_shape:
                self.close()
                raise DataFormatError(self.path, self.field, f"frames of shape {self.crystfel.data_shape} (the "
                                      f"data shape of {os.fspath(self.geometry_path)})", f"shape {shape}")
            shape = (shape[0], *self.crystfel.geometry.shape)
        if len(shape) != 3 or min(shape[1:]) < 1:
            self.close()
            raise DataFormatError(self.path, self.field, "a 3D array (N, n_y, n_x)", f"shape {shape}")
        if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
            self.close()
            raise DataFormatError(self.path, self.field, "an integer or float dtype", str(dtype))
        self.n_patterns = int(shape[0])
        self.shape = (int(shape[1]), int(shape[2]))
        try:
            self.geometry = (self.crystfel.geometry if self.crystfel is not None else
                             read_geometry_file(self.geometry_path, self.shape, photon_energy_ev=photon_energy_ev))
        except Exception:
            self.close()
            raise
        self.mask = self.geometry.good_pixels()

    @property
    def attrs(self) -> dict[str, Any]:
        """Provenance: the counts and the geometry file."""
        src = os.fspath(self.path) + (f":{self.inner}" if self.inner else "")
        return {"source_kind": self.kind, "source": src, "geometry_file": os.fspath(self.geometry_path)}

    def _read_sorted(self, idx: np.ndarray) -> np.ndarray:
        if len(idx) > 1 and np.all(np.diff(idx) == 1):
            raw = np.asarray(self._counts[int(idx[0]) : int(idx[-1]) + 1])
        else:
            raw = np.asarray(self._counts[idx])
        return raw.reshape(len(idx), *self.shape)

    def close(self) -> None:
        """Close the HDF5 file / drop the memory map."""
        if self._file is not None and self._file.id.valid:
            self._file.close()


# ====================================================================== dispatch
def source_kind(path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> str:
    """``"bayes-spi"``, ``"emc"``, ``"cxi"`` or ``"stack"`` for a path (or several photon files).

    Raises:
        FileNotFoundError: a plain path that does not exist.
        DataFormatError: an HDF5 file of no known layout.
    """
    if not isinstance(path, (str, os.PathLike)):
        return "emc"
    from bayes_spi.paths import input_file_problem

    file, inner = split_dataset_path(path)
    problem = input_file_problem(file)
    if isinstance(problem, FileNotFoundError):
        detail = "" if problem.strerror == "not found" else f" ({problem.strerror})"
        raise FileNotFoundError(f"data file {os.fspath(file)!r} not found{detail}")
    if problem is not None:
        raise DataFormatError(file, "/", "a data file (bayes-spi .h5, .emc, .cxi, .npy)",
                              (problem.strerror or "").removeprefix("got "))
    if inner is not None:
        return "stack"
    suffix = file.suffix.lower()
    if suffix == ".emc" or suffix in _LIST_SUFFIXES:
        return "emc"
    if suffix == ".npy":
        return "stack"
    if suffix == ".cxi":
        return "cxi"
    if h5py.is_hdf5(file):
        with open_h5(file, "a data file (HDF5)") as f:
            fmt = f.attrs.get("format")
            fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
            if fmt == FORMAT_NAME or ("data" in f and "geometry" in f):
                return "bayes-spi"
            if "place_ones" in f:
                return "emc"
            if "entry_1" in f:
                return "cxi"
        raise DataFormatError(file, "/", "a bayes-spi file (attrs format='bayes-spi'), a CXI file (/entry_1), "
                              f"Dragonfly photons (/place_ones) or FILE.h5:/dataset with {flag('geometry')}", "none of these")
    raise DataFormatError(file, "/", f"a bayes-spi .h5, a CXI .cxi, Dragonfly .emc (+ {flag('detector')}) or a .npy stack "
                          f"(+ {flag('geometry')})", f"an unknown file type ({suffix or 'no suffix'})")


def open_dataset(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    detector: str | os.PathLike[str] | None = None,
    geometry: str | os.PathLike[str] | None = None,
    photon_energy_ev: float | None = None,
    shape: tuple[int, int] | None = None,
    keep_mask_1: bool = True,
    pixel_size_m: float | None = None,
) -> Any:
    """Open a pattern source (see the module docstring) as an :class:`SPIDataset`-like data set.

    Args:
        path: the data file; several Dragonfly photon files as a sequence.
        detector: Dragonfly's detector file (``.emc`` sources).
        geometry: the generic geometry file (``.npy`` and ``FILE.h5:/dataset`` sources), or a CrystFEL ``.geom``
            (stacks and CXI files).
        photon_energy_ev: the photon energy (Dragonfly; overrides a geometry file's).
        shape: ``(n_y, n_x)`` of a Dragonfly pixel list whose layout cannot be recovered.
        keep_mask_1: Dragonfly mask value 1 is good (default) or bad.
        pixel_size_m: nominal pixel size of a flat Dragonfly grid.

    Raises:
        FileNotFoundError: a file is missing.
        DataFormatError: a file is malformed (names the file and the field).
        ValueError: an option a source needs is missing, or given for a source that does not use it.
    """
    kind = source_kind(path)
    name = os.fspath(path) if isinstance(path, (str, os.PathLike)) else os.fspath(path[0])
    if kind != "emc" and detector is not None:
        raise ValueError(f"{name}: {flag('detector')} is for Dragonfly .emc data, got a {kind} source")
    if kind not in ("stack", "cxi") and geometry is not None:
        raise ValueError(f"{name}: {flag('geometry')} is for .npy / FILE.h5:/dataset stacks and CXI files, got a {kind} "
                         "source")
    if kind == "bayes-spi":
        if photon_energy_ev is not None:
            raise ValueError(f"{name}: {flag('photon_energy')} is not used for a bayes-spi file (its geometry is in it)")
        return SPIDataset(path)  # type: ignore[arg-type]
    if kind == "emc":
        if detector is None:
            raise ValueError(f"{name}: Dragonfly photons need their detector file: expected {flag('detector')} FILE, got none")
        return EmcSource(path, detector, photon_energy_ev=photon_energy_ev, shape=shape,  # type: ignore[arg-type]
                         keep_mask_1=keep_mask_1, pixel_size_m=pixel_size_m)
    if kind == "stack":
        if geometry is None:
            raise ValueError(f"{name}: a counts stack needs a geometry file: expected {flag('geometry')} FILE (YAML/JSON), "
                             "got none")
        return StackSource(path, geometry, photon_energy_ev=photon_energy_ev)  # type: ignore[arg-type]
    return _open_cxi(Path(name), photon_energy_ev=photon_energy_ev, geometry=geometry)


def _open_cxi(path: Path, *, photon_energy_ev: float | None, geometry: str | os.PathLike[str] | None) -> Any:
    """A CXI file, with its own geometry or that of a CrystFEL ``.geom`` (``geometry``)."""
    from bayes_spi.dataio.cxi import open_cxi

    if geometry is None:
        return open_cxi(path, photon_energy_ev=photon_energy_ev)
    if Path(geometry).suffix.lower() != ".geom":
        raise ValueError(f"{os.fspath(path)}: {flag('geometry')} for a CXI file: expected a CrystFEL .geom, got "
                         f"{os.fspath(geometry)!r}")
    from bayes_spi.dataio.crystfel import read_crystfel_geom

    crystfel = read_crystfel_geom(geometry, photon_energy_ev=photon_energy_ev, data_file=path)
    return open_cxi(path, geometry=crystfel.geometry)  # the photon energy: the .geom's or the one given
