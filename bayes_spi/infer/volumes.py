"""Read and write 3D volumes: intensities (reciprocal space) and densities (real space), MRC and HDF5.

Conventions (the same as the run directory's ``intensity.mrc``/``.h5``):

- An intensity is an odd cube ``(n, n, n)`` indexed ``[ix, iy, iz]`` with voxel ``i`` at
  ``q = (i - n // 2) * dq`` (1/A). In MRC files the data order is ``[z, y, x]``, the voxel size is ``dq``
  **in 1/A** and the origin ``-(n // 2) * dq`` (so ChimeraX puts ``q = 0`` at the origin). In HDF5 the
  dataset ``/intensity`` holds ``[ix, iy, iz]`` with attribute ``voxel_size_inv_A``.
- A density is an odd cube ``[ix, iy, iz]`` with voxel size ``voxel_A`` (A), the box centre at the origin.

Example::

    I, dq = read_intensity("run1/intensity.h5")
    write_density(rho, voxel_A, "density.mrc")
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from bayes_spi import __version__
from bayes_spi.mrc import read_mrc, write_mrc
from bayes_spi.paths import check_input_file

__all__ = ["read_intensity", "read_density", "write_density"]


def _check_cube(arr: np.ndarray, path: Path, field: str) -> np.ndarray:
    if arr.ndim != 3 or len(set(arr.shape)) != 1 or arr.shape[0] % 2 == 0 or arr.shape[0] < 3:
        raise ValueError(f"{os.fspath(path)}: field {field}: expected an odd cube (n, n, n), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{os.fspath(path)}: field {field}: expected finite values, got NaN or inf")
    return arr


def read_intensity(path: str | os.PathLike[str]) -> tuple[np.ndarray, float]:
    """An intensity cube ``(n, n, n)`` ``[ix, iy, iz]`` float64 and its voxel size ``dq`` (1/A).

    Reads ``.mrc``/``.map`` (voxel size taken as 1/A, as ``bayes-spi export`` writes it) or HDF5
    (``/intensity`` with attr ``voxel_size_inv_A``, or a data file's ``/truth/intensity``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a volume, not an odd cube, no voxel size, non-finite values (names file and field).
    """
    p = check_input_file(path, "an intensity volume, .mrc or .h5")
    if p.suffix.lower() in (".mrc", ".map", ".mrcs"):
        labels: list[str] = []
        data, dq = read_mrc(p, labels)
        _check_cube(data, p, "data")
        _reject_density(p, data, dq, labels)
        return data, dq
    from bayes_spi.dataio.h5open import open_h5

    with open_h5(p, "an MRC or HDF5 intensity volume") as f:
        for name in ("intensity", "truth/intensity"):
            if name in f and isinstance(f[name], h5py.Dataset):
                ds = f[name]
                if "voxel_size_inv_A" not in ds.attrs:
                    raise ValueError(f"{os.fspath(p)}: field /{name} attrs['voxel_size_inv_A']: expected the voxel "
                                     "size in 1/A, got missing")
                return _check_cube(np.asarray(ds[()], dtype=np.float64), p, f"/{name}"), float(ds.attrs["voxel_size_inv_A"])
    raise ValueError(f"{os.fspath(p)}: field /intensity: expected a dataset (or /truth/intensity), got missing")


#: an intensity grid's spacing (1/A) is far below this; a density's voxel size (A) is above it
_MAX_INTENSITY_VOXEL_INV_A = 0.5


def _reject_density(path: Path, data: np.ndarray, voxel: float, labels: list[str]) -> None:
    """An intensity MRC holds ``|F(q)|^2`` on a fine reciprocal grid (voxel in 1/A); refuse a real-space density
    (labelled as one by bayes-spi, or with a voxel size that only makes sense in A)."""
    density_label = next((lab for lab in labels if "density" in lab.lower()), None)
    if density_label is not None:
        raise ValueError(f"{os.fspath(path)}: expected an intensity volume (reciprocal space), got a density MRC "
                         f"(label {density_label!r}); phase an intensity: a run directory, its intensity.h5, or "
                         "the output of `bayes-spi export`")
    if voxel >= _MAX_INTENSITY_VOXEL_INV_A:
        raise ValueError(f"{os.fspath(path)}: field voxel_size: expected an intensity grid spacing in 1/A (well "
                         f"below {_MAX_INTENSITY_VOXEL_INV_A}), got {voxel:g}: a real-space density (voxel in A)?")


def read_density(path: str | os.PathLike[str]) -> tuple[np.ndarray, float]:
    """A density cube ``[ix, iy, iz]`` float64 and its voxel size (A) from an MRC file."""
    p = check_input_file(path, "a density MRC, e.g. from `bayes-spi phase`")
    data, voxel = read_mrc(p)
    return _check_cube(data, p, "data"), voxel


def write_density(density: np.ndarray, voxel_A: float, path: str | os.PathLike[str], label: str = "") -> Path:
    """Write a real-space density ``(n, n, n)`` ``[ix, iy, iz]`` as MRC (voxel size in A, box centred on 0)."""
    rho = np.asarray(density)
    if rho.ndim != 3 or len(set(rho.shape)) != 1:
        raise ValueError(f"expected a density cube (n, n, n), got shape {rho.shape}")
    if not voxel_A > 0:
        raise ValueError(f"expected a positive voxel size in A, got {voxel_A}")
    return write_mrc(path, rho, float(voxel_A), label or f"bayes-spi {__version__} electron density; voxel size in A")
