"""The bayes-spi HDF5 pattern format: writer, validating reader, streaming batches.

Layout (format_version 1)
-------------------------
::

    /                    attrs: format="bayes-spi", format_version=1, software_version
    /data/counts         (N, n_y, n_x) int32 photon counts, chunks=(min(64, N), n_y, n_x), gzip(4) + shuffle,
                         resizable along N (maxshape (None, n_y, n_x)); masked pixels are stored as 0
    /geometry            attrs: name, photon_energy_ev, polarization, pixel_size_m, distance_m, n_x, n_y
                         (conventions: bayes_spi.geometry)
    /geometry/mask       (n_y, n_x) uint8, 1 = good pixel, 0 = masked (beam stop, gaps, bad pixels);
                         optional on reading (absent = all good)
    /truth               optional (simulations only); attrs: photons_per_unit_intensity
                         (= fluence * r_e^2: expected photons in a pixel = gamma * this * P * Omega * |F|^2)
    /truth/quaternions   (N, 4) float64, attrs: convention = "scalar-first (w,x,y,z); R maps lab/detector q
                         to molecule frame: pixel samples I_mol(R @ q)"
    /truth/scales        (N,) float64 fluence jitter gamma_i (mean ~1)
    /truth/intensity     (n, n, n) float32 |F|^2 in electrons^2 on a centred odd cube, attrs:
                         voxel_size_inv_A, axis_order="x,y,z", centre_index (= n//2; q = (i - centre) * voxel)
    /truth/density       optional (n, n, n) float32 band-limited electron density (electrons per voxel) on the
                         real-space grid matching /truth/intensity (bayes_spi.sim.transform.density_on_grid),
                         attrs: voxel_size_A (= 1 / (n * voxel_size_inv_A)), axis_order="x,y,z",
                         centre_index (= n//2; r = (i - centre) * voxel_size_A)
    /truth/latent        optional (N, d) float64 per-pattern true latent parameter of a heterogeneous ensemble
                         (e.g. the superellipsoid exponent p), attrs: names (comma-separated, d of them)
    /truth/class         optional (N,) int64 per-pattern true class / state of a discrete ensemble
                         (bayes_spi.sim.ensemble)
    /simulation          optional; attrs: everything needed to reproduce the simulation (structure, seed,
                         artifacts, fluence settings, n_patterns, ...)
    /data/complete       optional (1,) uint8, files written live (HDF5 SWMR, ``H5Writer(swmr=True)``): 0 while the
                         writer appends, 1 once it has closed the file (``bayes-spi fit --follow`` stops there)

Format version 2 (a per-pixel detector geometry, :mod:`bayes_spi.geometry` kinds ``"positions"`` and ``"q"``)
--------------------------------------------------------------------------------------------------------
The writer writes ``format_version=2`` only when the geometry is per-pixel; a flat grid geometry (kind
``"grid"``: the presets, ``simulate``) is still written as version 1, so those files stay readable by older
versions. Version 2 differs from version 1 only in ``/geometry``::

    /geometry            attrs: kind ("positions" or "q"), name, photon_energy_ev, polarization, n_x, n_y
                         (no pixel_size_m / distance_m)
    /geometry/mask       as in version 1
    /geometry/q          (n_y, n_x, 3) float64 pixel-centre q in 1/A (no 2 pi, q = k_out - k_in); always written
    /geometry/pixel_factor (n_y, n_x) float64 solid angle x polarization (sr); always written
    /geometry/positions_m, /geometry/fs_m, /geometry/ss_m
                         (n_y, n_x, 3) float64, kind "positions" only: pixel centres and edge vectors along
                         ix / iy, lab frame, metres (the geometry is rebuilt from these; q and pixel_factor are
                         then derived copies for other readers)

For kind ``"q"`` the geometry is ``/geometry/q`` with ``/geometry/pixel_factor``. Version-1 files read as
before (a grid geometry).

Reading rules: counts may be any integer dtype, or a float dtype (e.g. converted from another format)
holding whole numbers; every value read at a good pixel must be finite, >= 0 and (for float dtypes) an
integer (the likelihoods count photons), otherwise :class:`DataFormatError` names the file, ``/data/counts`` and the
pattern index. Values at masked pixels are never validated and are returned as 0: consumers must use
:attr:`SPIDataset.mask` and never treat masked pixels as data.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from bayes_spi import __version__
from bayes_spi.geometry import Geometry

__all__ = [
    "check_counts",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "QUATERNION_CONVENTION",
    "DataFormatError",
    "H5Writer",
    "normalise_indices",
    "read_rows",
    "SPIDataset",
    "write_simulation",
    "quaternions_to_rotations",
]

FORMAT_NAME = "bayes-spi"
FORMAT_VERSION = 2
QUATERNION_CONVENTION = (
    "scalar-first (w,x,y,z); R maps lab/detector q to molecule frame: pixel samples I_mol(R @ q)"
)
_GEOMETRY_ATTRS = ("photon_energy_ev", "pixel_size_m", "distance_m", "n_x", "n_y")
_CACHE_BYTES = 64 * 1024 * 1024


def normalise_indices(indices: int | slice | Sequence[int] | np.ndarray, n: int, negative: bool = True) -> np.ndarray:
    """Pattern ``indices`` (an int, a slice, or a 1D integer sequence; negatives count from the end unless
    ``negative=False``, which refuses them) of a data set of ``n`` patterns as ``(B,)`` int64 in ``[0, n)``.

    Raises:
        ValueError: not integers, or not 1D.
        IndexError: out of range.
    """
    if isinstance(indices, slice):
        return np.arange(n)[indices]
    idx = np.asarray(indices)
    if idx.ndim == 0:
        idx = idx.reshape(1)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise ValueError(f"indices: expected integers (1D), got dtype {idx.dtype} shape {idx.shape}")
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < (-n if negative else 0) or idx.max() >= n):
        raise IndexError(f"indices: expected values in [0, {n}), got min {idx.min()} max {idx.max()}")
    return np.where(idx < 0, idx + n, idx)


def check_counts(good: np.ndarray, idx: np.ndarray, path: str | os.PathLike[str], field: str) -> None:
    """Refuse counts that are not photon counts: ``good (B, M)`` (the good pixels of patterns ``idx (B,)``) must be
    finite, whole numbers (float dtypes allowed) and non-negative.

    Raises:
        DataFormatError: naming ``path``, ``field``, the first offending pattern index and value.
    """
    if np.issubdtype(good.dtype, np.floating):
        bad = ~np.isfinite(good).all(axis=1)
        if bad.any():
            raise DataFormatError(path, field, "finite values", f"NaN or infinity in pattern index {int(idx[np.argmax(bad)])}")
        frac = (good != np.round(good)).any(axis=1)
        if frac.any():
            i = int(np.argmax(frac))
            value = float(good[i][good[i] != np.round(good[i])][0])
            raise DataFormatError(path, field, "whole photon counts (float dtype allowed, integer values)",
                                  f"non-integer value {value:g} in pattern index {int(idx[i])}")
    neg = (good < 0).any(axis=1)
    if neg.any():
        raise DataFormatError(path, field, "non-negative counts", f"negative value in pattern index {int(idx[np.argmax(neg)])}")


class DataFormatError(ValueError):
    """A data file does not follow the format; the message names the file, the field, expected and found."""

    def __init__(self, path: str | os.PathLike[str], field: str, expected: str, found: str) -> None:
        self.path = os.fspath(path)
        self.field = field
        self.expected = expected
        self.found = found
        super().__init__(f"{self.path}: field {field}: expected {expected}, got {found}")


def read_rows(dataset: h5py.Dataset, rows: slice, block: int = 65_536) -> np.ndarray:
    """The rows ``rows`` (a slice of the first axis) of an HDF5 dataset, with memory bounded by ``block`` rows.

    A slice with a step above 1 is read as contiguous blocks of about ``block`` rows, each subsampled: HDF5's
    own strided selection holds memory in proportion to the span it covers (~38 MiB for ``[::10]`` of 10^6
    float32 quaternions, ~4 MiB for 10^5), which would grow with N.

    Example::

        q = read_rows(f["pose_quaternion"], slice(None, None, 10))   # every 10th pattern
    """
    start, stop, step = rows.indices(dataset.shape[0])
    if step < 1:
        raise ValueError(f"rows: expected a slice with a positive step, got {rows}")
    if step == 1:
        return dataset[start:stop]
    span = step * max(1, int(block) // step)
    out = np.empty((len(range(start, stop, step)), *dataset.shape[1:]), dtype=dataset.dtype)
    buf = np.empty((min(span, max(stop - start, 0)), *dataset.shape[1:]), dtype=dataset.dtype)  # one block, reused
    j = 0
    for a in range(start, stop, span):
        b = min(stop, a + span)
        dataset.read_direct(buf, np.s_[a:b], np.s_[0:b - a])
        kept = buf[0:b - a:step]
        out[j:j + len(kept)] = kept
        j += len(kept)
    return out


def quaternions_to_rotations(quaternions: np.ndarray) -> np.ndarray:
    """Scalar-first unit quaternions ``(N, 4)`` -> rotation matrices ``(N, 3, 3)`` (normalises first)."""
    quat = np.asarray(quaternions, dtype=np.float64)
    if quat.ndim != 2 or quat.shape[1] != 4:
        raise ValueError(f"quaternions: expected shape (N, 4), got {quat.shape}")
    norm = np.linalg.norm(quat, axis=1, keepdims=True)
    if np.any(norm == 0) or not np.all(np.isfinite(norm)):
        raise ValueError("quaternions: expected non-zero finite quaternions, got a zero or non-finite one")
    w, x, y, z = (quat / norm).T
    rot = np.empty((len(quat), 3, 3))
    rot[:, 0, 0] = 1 - 2 * (y * y + z * z)
    rot[:, 0, 1] = 2 * (x * y - w * z)
    rot[:, 0, 2] = 2 * (x * z + w * y)
    rot[:, 1, 0] = 2 * (x * y + w * z)
    rot[:, 1, 1] = 1 - 2 * (x * x + z * z)
    rot[:, 1, 2] = 2 * (y * z - w * x)
    rot[:, 2, 0] = 2 * (x * z - w * y)
    rot[:, 2, 1] = 2 * (y * z + w * x)
    rot[:, 2, 2] = 1 - 2 * (x * x + y * y)
    return rot


# ====================================================================== writer
class H5Writer:
    """Appendable writer; writes ``PATH.tmp`` and moves it to ``PATH`` on a successful :meth:`close`.

    Use as a context manager: on an exception the temporary file is removed and ``PATH`` is untouched.

    Args:
        path: output file.
        geometry: detector geometry (its mask is stored as ``/geometry/mask``).
        with_truth: create ``/truth/quaternions`` and ``/truth/scales`` (then every :meth:`append` needs them).
        chunk_patterns: HDF5 chunk length along N (default 64; clipped to ``expected_patterns``).
        expected_patterns: optional hint of the final N (only used for the chunk size).
        simulation_attrs: attrs of ``/simulation`` (values: str, numbers, bool; None becomes "").
        swmr: write live for concurrent readers (HDF5 single-writer/multiple-reader, ``libver='latest'``):
            ``PATH`` itself is written (no temporary file), SWMR mode starts at the first :meth:`append` (set
            attributes and truth volumes before it), every append is flushed, and ``/data/complete`` turns 1 on
            :meth:`close`; an aborted file is left as it is, without that mark.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        geometry: Geometry,
        *,
        with_truth: bool = False,
        chunk_patterns: int = 64,
        expected_patterns: int | None = None,
        simulation_attrs: dict[str, Any] | None = None,
        swmr: bool = False,
    ) -> None:
        self.path = Path(path)
        self.swmr = bool(swmr)
        self.tmp_path = self.path if self.swmr else self.path.with_name(self.path.name + ".tmp")
        self.geometry = geometry
        self.with_truth = with_truth
        self.n_patterns = 0
        chunk = int(chunk_patterns)
        if expected_patterns is not None and expected_patterns > 0:
            chunk = min(chunk, int(expected_patterns))
        chunk = max(chunk, 1)
        from bayes_spi.atomic import WriteError

        try:
            self._file = h5py.File(self.tmp_path, "w", **({"libver": "latest"} if self.swmr else {}))
        except OSError as exc:
            raise WriteError(self.path, exc) from exc
        try:
            self._create(geometry, chunk, simulation_attrs)
        except OSError as exc:
            self.abort()
            raise WriteError(self.path, exc) from exc

    def _create(self, geometry: Geometry, chunk: int, simulation_attrs: dict[str, Any] | None) -> None:
        n_y, n_x = geometry.shape
        with_truth = self.with_truth
        f = self._file
        f.attrs["format"] = FORMAT_NAME
        f.attrs["format_version"] = 1 if geometry.is_grid else FORMAT_VERSION
        f.attrs["software_version"] = __version__
        self._counts = f.create_dataset(
            "data/counts",
            shape=(0, n_y, n_x),
            maxshape=(None, n_y, n_x),
            dtype=np.int32,
            chunks=(chunk, n_y, n_x),
            compression="gzip",
            compression_opts=4,
            shuffle=True,
        )
        grp = f.create_group("geometry")
        for key, value in geometry.to_dict().items():
            if isinstance(value, np.ndarray):
                grp.create_dataset(key, data=value.astype(np.float64), compression="gzip", compression_opts=4)
            else:
                grp.attrs[key] = value
        if not geometry.is_grid:
            for key, value in (("q", geometry.q_vectors()), ("pixel_factor", geometry.pixel_factor())):
                if key not in grp:
                    grp.create_dataset(key, data=value, compression="gzip", compression_opts=4)
        grp.create_dataset("mask", data=geometry.good_pixels().astype(np.uint8))
        if with_truth:
            truth = f.create_group("truth")
            self._quats = truth.create_dataset("quaternions", shape=(0, 4), maxshape=(None, 4), dtype=np.float64,
                                               chunks=(max(chunk, 256), 4))
            self._quats.attrs["convention"] = QUATERNION_CONVENTION
            self._scales = truth.create_dataset("scales", shape=(0,), maxshape=(None,), dtype=np.float64,
                                                chunks=(max(chunk, 256),))
        if simulation_attrs:
            self.set_simulation_attrs(simulation_attrs)
        if self.swmr:
            self._complete = f.create_dataset("data/complete", data=np.zeros(1, np.uint8), maxshape=(None,),
                                              chunks=(1,))

    def flush(self) -> None:
        """Write everything appended so far to disk (live readers see it after their next refresh)."""
        if self.swmr and not self._file.swmr_mode:
            self._file.swmr_mode = True  # from here on only appends: every object exists
        self._file.flush()

    def set_simulation_attrs(self, attrs: dict[str, Any]) -> None:
        """Set attributes of ``/simulation`` (None -> "")."""
        grp = self._file.require_group("simulation")
        for key, value in attrs.items():
            grp.attrs[key] = "" if value is None else value

    def set_truth_attrs(self, attrs: dict[str, Any]) -> None:
        """Set attributes of ``/truth`` (e.g. ``photons_per_unit_intensity``)."""
        grp = self._file.require_group("truth")
        for key, value in attrs.items():
            grp.attrs[key] = "" if value is None else value

    def write_truth_intensity(self, intensity: np.ndarray, voxel_size: float) -> None:
        """Store ``/truth/intensity`` ``(n, n, n)`` (axis order x,y,z, centre index n//2) as float32."""
        arr = np.asarray(intensity)
        if arr.ndim != 3 or len(set(arr.shape)) != 1 or arr.shape[0] % 2 == 0:
            raise ValueError(f"intensity: expected an odd cube (n, n, n), got shape {arr.shape}")
        grp = self._file.require_group("truth")
        ds = grp.create_dataset("intensity", data=arr.astype(np.float32), compression="gzip", compression_opts=4)
        ds.attrs["voxel_size_inv_A"] = float(voxel_size)
        ds.attrs["axis_order"] = "x,y,z"
        ds.attrs["centre_index"] = arr.shape[0] // 2

    def write_truth_density(self, density: np.ndarray, voxel_A: float) -> None:
        """Store ``/truth/density`` ``(n, n, n)`` (electrons per voxel, axis order x,y,z, centre n//2) as float32.

        Args:
            density: real-space density on an odd cube.
            voxel_A: real-space voxel size in Angstrom (``1 / (n dq)`` for the matching intensity grid).
        """
        arr = np.asarray(density)
        if arr.ndim != 3 or len(set(arr.shape)) != 1 or arr.shape[0] % 2 == 0:
            raise ValueError(f"density: expected an odd cube (n, n, n), got shape {arr.shape}")
        if not np.isfinite(voxel_A) or voxel_A <= 0:
            raise ValueError(f"voxel_A: expected a positive number, got {voxel_A!r}")
        grp = self._file.require_group("truth")
        ds = grp.create_dataset("density", data=arr.astype(np.float32), compression="gzip", compression_opts=4)
        ds.attrs["voxel_size_A"] = float(voxel_A)
        ds.attrs["axis_order"] = "x,y,z"
        ds.attrs["centre_index"] = arr.shape[0] // 2

    def write_truth_labels(self, latent: np.ndarray | None = None, classes: np.ndarray | None = None,
                           latent_names: Sequence[str] = ()) -> None:
        """Store ``/truth/latent`` ``(N, d)`` and/or ``/truth/class`` ``(N,)`` for the ``N`` patterns appended."""
        grp = self._file.require_group("truth")
        if latent is not None:
            arr = np.asarray(latent, dtype=np.float64)
            if arr.ndim != 2 or arr.shape[0] != self.n_patterns:
                raise ValueError(f"latent: expected shape ({self.n_patterns}, d), got {arr.shape}")
            grp.create_dataset("latent", data=arr).attrs["names"] = ",".join(latent_names)
        if classes is not None:
            cls = np.asarray(classes)
            if cls.shape != (self.n_patterns,) or not np.issubdtype(cls.dtype, np.integer) or (cls.size and cls.min() < 0):
                raise ValueError(f"classes: expected ({self.n_patterns},) non-negative integers, got {cls.dtype} {cls.shape}")
            grp.create_dataset("class", data=cls.astype(np.int64))

    def append(
        self,
        counts: np.ndarray,
        quaternions: np.ndarray | None = None,
        scales: np.ndarray | None = None,
    ) -> None:
        """Append a chunk: ``counts`` ``(B, n_y, n_x)`` non-negative integers; truth ``(B, 4)``, ``(B,)``.

        Raises:
            ValueError: wrong shapes, negative or non-integer counts, truth missing/unexpected.
        """
        arr = np.asarray(counts)
        n_y, n_x = self.geometry.shape
        if arr.ndim != 3 or arr.shape[1:] != (n_y, n_x):
            raise ValueError(f"counts: expected shape (B, {n_y}, {n_x}), got {arr.shape}")
        if arr.size and (not np.all(np.isfinite(arr)) or arr.min() < 0 or np.any(arr != np.round(arr))):
            raise ValueError("counts: expected finite non-negative integers, got other values")
        batch = arr.shape[0]
        if self.with_truth:
            if quaternions is None or scales is None:
                raise ValueError("append: expected quaternions and scales (writer has truth), got None")
            quat = np.asarray(quaternions, dtype=np.float64)
            sc = np.asarray(scales, dtype=np.float64)
            if quat.shape != (batch, 4):
                raise ValueError(f"quaternions: expected shape ({batch}, 4), got {quat.shape}")
            if sc.shape != (batch,):
                raise ValueError(f"scales: expected shape ({batch},), got {sc.shape}")
        elif quaternions is not None or scales is not None:
            raise ValueError("append: expected no truth (writer created with with_truth=False), got truth arrays")
        start, stop = self.n_patterns, self.n_patterns + batch
        self._counts.resize(stop, axis=0)
        self._counts[start:stop] = arr.astype(np.int32)
        if self.with_truth:
            self._quats.resize(stop, axis=0)
            self._quats[start:stop] = quat
            self._scales.resize(stop, axis=0)
            self._scales[start:stop] = sc
        self.n_patterns = stop
        if self.swmr:
            self.flush()

    def close(self) -> None:
        """Finish: flush, close and atomically move ``PATH.tmp`` to ``PATH``."""
        if self._file.id.valid:
            try:
                if self.swmr:  # the mark live readers stop at
                    self.flush()
                    self._complete[0] = 1
                self._file.flush()
                self._file.close()
                if not self.swmr:
                    os.replace(self.tmp_path, self.path)
            except OSError as exc:
                self.abort()
                from bayes_spi.atomic import WriteError

                raise WriteError(self.path, exc) from exc

    def abort(self) -> None:
        """Close and delete the temporary file (``PATH`` untouched); never raises."""
        try:
            if self._file.id.valid:
                self._file.close()
        except (OSError, RuntimeError):
            pass  # closing a file on a full disk can fail: the file is removed below anyway
        if self.swmr:
            return  # live readers may hold it: left as it is, without the /data/complete mark
        try:
            self.tmp_path.unlink(missing_ok=True)
        except OSError:
            pass

    def __enter__(self) -> H5Writer:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()  # on an error it removes the temporary file and raises one WriteError
        else:
            self.abort()
            if isinstance(exc, OSError) and not isinstance(exc, KeyboardInterrupt):
                from bayes_spi.atomic import WriteError

                if not isinstance(exc, WriteError):
                    raise WriteError(self.path, exc) from exc


def write_simulation(
    path: str | os.PathLike[str],
    counts: np.ndarray,
    geometry: Geometry,
    *,
    quaternions: np.ndarray | None = None,
    scales: np.ndarray | None = None,
    intensity: np.ndarray | None = None,
    voxel_size: float | None = None,
    photons_per_unit_intensity: float | None = None,
    simulation_attrs: dict[str, Any] | None = None,
) -> Path:
    """Write a whole in-memory data set (counts ``(N, n_y, n_x)``) in one go; returns the path."""
    with_truth = quaternions is not None or scales is not None
    n = int(np.asarray(counts).shape[0])
    with H5Writer(path, geometry, with_truth=with_truth, expected_patterns=n,
                  simulation_attrs=simulation_attrs) as writer:
        if with_truth:
            quat = quaternions if quaternions is not None else np.tile([1.0, 0, 0, 0], (n, 1))
            sc = scales if scales is not None else np.ones(n)
            writer.append(counts, quat, sc)
        else:
            writer.append(counts)
        if intensity is not None:
            if voxel_size is None:
                raise ValueError("voxel_size: expected a value with intensity, got None")
            writer.write_truth_intensity(intensity, voxel_size)
        if photons_per_unit_intensity is not None:
            writer.set_truth_attrs({"photons_per_unit_intensity": float(photons_per_unit_intensity)})
    return Path(path)


# ====================================================================== reader
def _attr_str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.shape == ():
        return _attr_str(value.item())
    return str(value)


class SPIDataset:
    """Validated read access to a bayes-spi HDF5 file (see the module docstring for the layout).

    Opening validates the structure (format attribute, required fields, dtypes, shapes, geometry attrs,
    truth shapes); :meth:`read` validates the values it reads.

    Raises:
        FileNotFoundError: the file does not exist.
        DataFormatError: anything else wrong (names the file and field).
    """

    def __init__(self, path: str | os.PathLike[str], swmr: bool = False) -> None:
        self.path = Path(path)
        self.swmr = bool(swmr)  # a file still being written (H5Writer(swmr=True)): see refresh()
        from bayes_spi.dataio.h5open import open_h5

        self._file = open_h5(self.path, "a bayes-spi HDF5 data file", rdcc_nbytes=_CACHE_BYTES,
                             **({"libver": "latest", "swmr": True} if self.swmr else {}))
        try:
            self._validate()
        except Exception:
            self._file.close()
            raise

    # ------------------------------------------------------------------ validation
    def _error(self, field: str, expected: str, found: str) -> DataFormatError:
        return DataFormatError(self.path, field, expected, found)

    def _dataset(self, name: str) -> h5py.Dataset:
        obj = self._file.get(name)
        if obj is None:
            raise self._error(name, "a dataset", "missing")
        if not isinstance(obj, h5py.Dataset):
            raise self._error(name, "a dataset", type(obj).__name__)
        return obj

    def _validate(self) -> None:
        f = self._file
        fmt = _attr_str(f.attrs.get("format", "<missing>"))
        if fmt != FORMAT_NAME:
            raise self._error("/ attrs['format']", repr(FORMAT_NAME), repr(fmt))
        version = f.attrs.get("format_version")
        if version is None or int(version) > FORMAT_VERSION or int(version) < 1:
            raise self._error("/ attrs['format_version']", f"an integer in [1, {FORMAT_VERSION}]", repr(version))
        counts = self._dataset("/data/counts")
        if counts.ndim != 3:
            raise self._error("/data/counts", "a 3D array (N, n_y, n_x)", f"shape {counts.shape}")
        if not (np.issubdtype(counts.dtype, np.integer) or np.issubdtype(counts.dtype, np.floating)):
            raise self._error("/data/counts", "an integer (or float) dtype", str(counts.dtype))
        self._counts = counts
        self._float_counts = bool(np.issubdtype(counts.dtype, np.floating))
        n, n_y, n_x = counts.shape
        if "geometry" not in f or not isinstance(f["geometry"], h5py.Group):
            raise self._error("/geometry", "a group with geometry attributes", "missing")
        gattrs = f["geometry"].attrs
        values: dict[str, Any] = {}
        kind = _attr_str(gattrs.get("kind", "grid")) if int(version) >= 2 else "grid"
        if kind not in ("grid", "positions", "q"):
            raise self._error("/geometry attrs['kind']", "'grid', 'positions' or 'q'", repr(kind))
        for key in (_GEOMETRY_ATTRS if kind == "grid" else ("photon_energy_ev", "n_x", "n_y")):
            if key not in gattrs:
                raise self._error(f"/geometry attrs['{key}']", "a positive number", "missing")
            raw = gattrs[key]
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise self._error(f"/geometry attrs['{key}']", "a positive number", repr(raw)) from None
            if not np.isfinite(value) or value <= 0:
                raise self._error(f"/geometry attrs['{key}']", "a positive number", repr(raw))
            values[key] = value
        if (int(values["n_y"]), int(values["n_x"])) != (n_y, n_x):
            raise self._error("/geometry attrs['n_y','n_x']", f"({n_y}, {n_x}) = /data/counts shape[1:]",
                              f"({values['n_y']:g}, {values['n_x']:g})")
        values["polarization"] = _attr_str(gattrs.get("polarization", "x"))
        values["name"] = _attr_str(gattrs.get("name", ""))
        if kind != "grid":
            values["kind"] = kind
            shapes = {"positions_m": (n_y, n_x, 3), "fs_m": (n_y, n_x, 3), "ss_m": (n_y, n_x, 3),
                      "q": (n_y, n_x, 3), "pixel_factor": (n_y, n_x)}
            for key in (("positions_m", "fs_m", "ss_m") if kind == "positions" else ("q", "pixel_factor")):
                ds = self._dataset(f"/geometry/{key}")
                if ds.shape != shapes[key]:
                    raise self._error(f"/geometry/{key}", f"shape {shapes[key]} (n_y, n_x from /data/counts)",
                                      f"shape {ds.shape}")
                arr = np.asarray(ds[()], dtype=np.float64) if np.issubdtype(ds.dtype, np.number) else None
                if arr is None or not np.all(np.isfinite(arr)):
                    raise self._error(f"/geometry/{key}", "finite float values", "NaN, infinity or non-numbers")
                values[key] = arr
        mask = np.ones((n_y, n_x), dtype=bool)
        if "mask" in f["geometry"]:
            mask_ds = self._dataset("/geometry/mask")
            if mask_ds.shape != (n_y, n_x):
                raise self._error("/geometry/mask", f"shape {(n_y, n_x)} = /data/counts shape[1:]",
                                  f"shape {mask_ds.shape}")
            raw_mask = mask_ds[()]
            if not np.all((raw_mask == 0) | (raw_mask == 1)):
                raise self._error("/geometry/mask", "values 0/1 (1 = good pixel)", "other values")
            mask = raw_mask.astype(bool)
            if not mask.any():
                raise self._error("/geometry/mask", "at least one good pixel (value 1)",
                                  f"all {mask.size} pixels masked (0)")
        self.mask: np.ndarray = mask
        try:
            self.geometry: Geometry = Geometry.from_dict(values, mask=mask)
        except ValueError as exc:
            raise self._error("/geometry", "a valid geometry", str(exc)) from exc
        self.has_truth: bool = "truth" in f
        if self.has_truth:
            truth = f["truth"]
            if "quaternions" in truth:
                ds = self._dataset("/truth/quaternions")
                if ds.shape != (n, 4) and not (self.swmr and ds.shape[1:] == (4,)):  # live: appended in turn
                    raise self._error("/truth/quaternions", f"shape ({n}, 4)", f"shape {ds.shape}")
            if "scales" in truth:
                ds = self._dataset("/truth/scales")
                if ds.shape != (n,) and not (self.swmr and ds.ndim == 1):
                    raise self._error("/truth/scales", f"shape ({n},)", f"shape {ds.shape}")
            if "intensity" in truth:
                ds = self._dataset("/truth/intensity")
                if ds.ndim != 3 or len(set(ds.shape)) != 1:
                    raise self._error("/truth/intensity", "a cube (n, n, n)", f"shape {ds.shape}")
                if "voxel_size_inv_A" not in ds.attrs:
                    raise self._error("/truth/intensity attrs['voxel_size_inv_A']", "a positive number", "missing")
            if "density" in truth:
                ds = self._dataset("/truth/density")
                if ds.ndim != 3 or len(set(ds.shape)) != 1:
                    raise self._error("/truth/density", "a cube (n, n, n)", f"shape {ds.shape}")
                if "voxel_size_A" not in ds.attrs:
                    raise self._error("/truth/density attrs['voxel_size_A']", "a positive number", "missing")

    def refresh(self) -> tuple[int, bool]:
        """A file opened with ``swmr=True``: see the patterns appended since; returns ``(N, complete)``
        (``complete``: the writer closed the file, ``/data/complete``; always False without that mark)."""
        if not self.swmr:
            return self.n_patterns, True
        self._counts.refresh()
        done = self._file.get("data/complete")
        if isinstance(done, h5py.Dataset):
            done.refresh()
            return self.n_patterns, bool(done[0])
        return self.n_patterns, False

    # ------------------------------------------------------------------ properties
    @property
    def n_patterns(self) -> int:
        """Number of patterns N."""
        return int(self._counts.shape[0])

    def __len__(self) -> int:
        return self.n_patterns

    @property
    def shape(self) -> tuple[int, int]:
        """Pattern shape ``(n_y, n_x)``."""
        return (int(self._counts.shape[1]), int(self._counts.shape[2]))

    @property
    def chunk_patterns(self) -> int:
        """Patterns per HDF5 chunk of ``/data/counts`` (the streaming block size)."""
        chunks = self._counts.chunks
        return int(chunks[0]) if chunks is not None else 64

    @property
    def attrs(self) -> dict[str, Any]:
        """Attributes of ``/simulation`` (empty dict if absent)."""
        if "simulation" not in self._file:
            return {}
        return {key: self._file["simulation"].attrs[key] for key in self._file["simulation"].attrs}

    @property
    def photons_per_unit_intensity(self) -> float | None:
        """``/truth`` attrs ``photons_per_unit_intensity`` (None if absent)."""
        if not self.has_truth or "photons_per_unit_intensity" not in self._file["truth"].attrs:
            return None
        return float(self._file["truth"].attrs["photons_per_unit_intensity"])

    # ------------------------------------------------------------------ reading
    def read(self, indices: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        """Counts of the given patterns, ``(B, n_y, n_x)`` float32, masked pixels set to 0.

        Raises:
            DataFormatError: a good-pixel value is negative or non-finite (names the pattern index).
        """
        idx = normalise_indices(indices, self.n_patterns)
        if idx.size == 0:
            return np.zeros((0, *self.shape), dtype=np.float32)
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        unique, inverse = np.unique(sorted_idx, return_inverse=True)
        if len(unique) > 1 and np.all(np.diff(unique) == 1):
            raw = self._counts[int(unique[0]) : int(unique[-1]) + 1]
        else:
            raw = self._counts[unique]
        data = np.empty((len(idx), *self.shape), dtype=np.float32)
        data[order] = raw[inverse]
        self._check_values(data, idx)
        data[:, ~self.mask] = 0.0
        return data

    def _check_values(self, data: np.ndarray, idx: np.ndarray) -> None:
        check_counts(data[:, self.mask], idx, self.path, "/data/counts")

    def batch_indices(
        self, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, buffer_chunks: int = 8
    ) -> Iterator[np.ndarray]:
        """Index batches of one epoch (no I/O); see :meth:`iter_batches`."""
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        batch_size = int(batch_size)
        n = self.n_patterns
        block = self.chunk_patterns
        starts = np.arange(0, n, block)
        if not shuffle:
            for first in range(0, n, batch_size):
                yield np.arange(first, min(first + batch_size, n), dtype=np.int64)
            return
        rng = np.random.default_rng([int(seed), int(epoch)])
        starts = starts[rng.permutation(len(starts))]
        pool = np.zeros(0, dtype=np.int64)
        for g in range(0, len(starts), buffer_chunks):
            group = [np.arange(s, min(s + block, n), dtype=np.int64) for s in starts[g : g + buffer_chunks]]
            pool = np.concatenate([pool, *group])
            pool = pool[rng.permutation(len(pool))]
            n_full = len(pool) // batch_size
            for b in range(n_full):
                yield pool[b * batch_size : (b + 1) * batch_size]
            pool = pool[n_full * batch_size :]
        if len(pool):
            yield pool

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
        """Stream one epoch in batches: yields ``(indices (B,) int64, counts (B, n_y, n_x) float32)``.

        Every index appears exactly once per epoch; batches are full except possibly the last. Without
        ``shuffle`` the order is sequential. With ``shuffle`` the HDF5 chunks are visited in a random order
        and patterns are permuted inside a buffer of ``buffer_chunks`` chunks (plus the leftover of the
        previous buffer), reproducibly from ``(seed, epoch)``; memory is independent of N.
        ``start`` skips the first ``start`` batches of that epoch without reading them (exact resume).
        """
        if isinstance(start, bool) or int(start) != start or start < 0:
            raise ValueError(f"start: expected a non-negative integer, got {start!r}")
        for number, idx in enumerate(
            self.batch_indices(batch_size, shuffle=shuffle, seed=seed, epoch=epoch, buffer_chunks=buffer_chunks)
        ):
            if number < start:
                continue
            yield idx, self.read(idx)

    # ------------------------------------------------------------------ truth
    def _truth(self, name: str) -> h5py.Dataset:
        if not self.has_truth or name not in self._file["truth"]:
            raise self._error(f"/truth/{name}", "a dataset (simulated data)", "missing")
        return self._file["truth"][name]

    def truth_quaternions(self, rows: slice | None = None) -> np.ndarray:
        """True poses ``(N, 4)`` scalar-first quaternions (see ``QUATERNION_CONVENTION``); with ``rows`` (a
        slice, e.g. ``slice(a, b)`` or ``slice(None, None, step)``) only those patterns are read."""
        ds = self._truth("quaternions")
        return np.asarray(ds[()] if rows is None else read_rows(ds, rows), dtype=np.float64)

    def truth_rotations(self, rows: slice | None = None) -> np.ndarray:
        """True poses ``(N, 3, 3)`` (or the ``rows`` slice of them): pixel ``k`` of pattern ``i`` samples
        ``I_mol(R_i @ q_k)``."""
        try:
            return quaternions_to_rotations(self.truth_quaternions(rows))
        except ValueError as exc:
            raise self._error("/truth/quaternions", "non-zero finite quaternions (N, 4)",
                              str(exc).split("got ", 1)[-1]) from None

    def truth_scales(self, rows: slice | None = None) -> np.ndarray:
        """True fluence scales ``gamma_i`` ``(N,)`` (or the ``rows`` slice of them)."""
        ds = self._truth("scales")
        return np.asarray(ds[()] if rows is None else read_rows(ds, rows), dtype=np.float64)

    def truth_intensity(self) -> tuple[np.ndarray, float]:
        """True intensity ``(n, n, n)`` float32 (axis order x,y,z, centre n//2) and voxel size (1/A)."""
        ds = self._truth("intensity")
        return np.asarray(ds[()]), float(ds.attrs["voxel_size_inv_A"])

    def truth_density(self) -> tuple[np.ndarray, float]:
        """True band-limited density ``(n, n, n)`` float32 (electrons per voxel, axis order x,y,z, centre n//2)
        and its voxel size (Angstrom).

        Raises:
            DataFormatError: ``/truth/density`` is missing (real data, or a file from an older simulation).
        """
        ds = self._truth("density")
        return np.asarray(ds[()]), float(ds.attrs["voxel_size_A"])

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Close the file."""
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> SPIDataset:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SPIDataset({os.fspath(self.path)!r}, n_patterns={self.n_patterns}, shape={self.shape})"
