"""Detector masks and per-pixel maps from files: pnCCD/Dragonfly ``.byt``, ``.npy`` and HDF5 datasets.

A *mask* says which pixels are data (``True`` = good). Masked pixels carry no information: they are left out
of every likelihood, never treated as zero counts (docs/DESIGN.md section 2).

File formats (``spec`` is a path, optionally with a suffix after ``:``):

* ``FILE.byt`` or ``FILE.byt:HxW``: one unsigned byte per pixel, row-major ``(n_y, n_x)``, **0 = good**,
  any other value masked (Dragonfly's convention: 1 = "not used to determine orientations" and 2 = "bad",
  excluded everywhere; bayes-spi uses every pixel both to orient and to merge, so both are masked). The file
  holds no shape: ``:HxW`` gives it (``H`` rows of ``W`` pixels), otherwise the detector's shape (times the
  binning) is assumed. The real pnCCD back-detector mask of the PR772 experiment,
  ``tests/data/pnccd_back_260x257_mask.byt`` (260 rows of 257), has 88.5% zeros (good); value 2 on the
  six-row gap between the two pnCCD halves (rows 127-132), on the outer frame and on bad pixels; value 1 on a
  ring of 11-27 pixels around the beam (the strong low-q scattering Dragonfly leaves out of orientation).
* ``FILE.npy``: a 2-D array of bool or 0/1 (**True/1 = good**, as ``/geometry/mask`` of our data format).
* ``FILE.h5:/path/to/dataset`` (also ``.hdf5``, ``.cxi``): a 2-D bool or 0/1 dataset, 1 = good; without a
  dataset path, ``/geometry/mask`` (our format) or a single 2-D dataset at the top level.

Binning (``bin_factor = N > 1``): a data set binned ``N x N`` from the detector the mask was written for. The
mask of shape ``(H, W)`` must satisfy ``H // N == n_y`` and ``W // N == n_x``; the ``H mod N`` rows and
``W mod N`` columns left over are cropped evenly from both edges (the extra one from the end), and a binned
pixel is good only if all its ``N^2`` pixels are (as :meth:`bayes_spi.geometry.Geometry.binned`). A file that
already has the data's shape is taken as it is. Any other shape mismatch is refused (never resampled silently).

Per-pixel maps (:func:`read_pixel_map`, e.g. a measured background): ``.npy`` or ``.h5:/dataset``, a 2-D
float array of the detector's shape (or ``N`` times it with ``bin_factor``: binned pixels are the *sum* of
their ``N^2`` pixels, the right rule for photons per pixel).

Example:
    >>> import numpy as np, tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> np.zeros((4, 6), np.uint8).tofile(d / "m.byt")
    >>> bool(read_mask(str(d / "m.byt") + ":4x6", (2, 3), bin_factor=2).all())
    True
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bayes_spi.dataio.h5 import DataFormatError

__all__ = ["MaskedDataset", "bin_map", "combine_masks", "read_mask", "read_pixel_map", "split_spec"]

_H5_SUFFIXES = (".h5", ".hdf5", ".cxi", ".nxs")


def split_spec(spec: str | os.PathLike[str]) -> tuple[Path, str]:
    """``"file.h5:/dset"`` -> ``(Path("file.h5"), "/dset")``; ``"m.byt:260x257"`` -> ``(Path, "260x257")``;
    a plain path -> ``(Path, "")``. Only a ``:`` after a known suffix splits (Windows drive letters survive)."""
    text = os.fspath(spec)
    for suffix in (*_H5_SUFFIXES, ".byt", ".npy"):
        i = text.lower().rfind(suffix + ":")
        if i >= 0:
            return Path(text[: i + len(suffix)]), text[i + len(suffix) + 1:]
    return Path(text), ""


def _crop_bin(arr: np.ndarray, shape: tuple[int, int], factor: int, file: Path, field: str, reduce: str
              ) -> np.ndarray:
    """``arr (H, W)`` -> ``shape`` by an even crop and ``factor x factor`` blocks (``all`` or ``sum``)."""
    n_y, n_x = shape
    if arr.ndim != 2:
        raise DataFormatError(file, field, "a 2-D array", f"shape {arr.shape}")
    h, w = arr.shape
    if factor == 1 or (h, w) == (n_y, n_x):  # a file of the data's own (binned) shape is taken as it is
        if (h, w) != (n_y, n_x):
            raise DataFormatError(file, field, f"shape (n_y, n_x) = {(n_y, n_x)} (the data's detector; a mask for "
                                  "the unbinned detector needs the binning factor)", f"shape {arr.shape}")
        return arr
    if h // factor != n_y or w // factor != n_x:
        raise DataFormatError(file, field, f"a shape that bins by {factor} to {(n_y, n_x)}, i.e. rows in "
                              f"[{n_y * factor}, {n_y * factor + factor - 1}] and columns in "
                              f"[{n_x * factor}, {n_x * factor + factor - 1}]", f"shape {arr.shape}")
    top, left = (h - n_y * factor) // 2, (w - n_x * factor) // 2
    arr = arr[top:top + n_y * factor, left:left + n_x * factor]
    blocks = arr.reshape(n_y, factor, n_x, factor)
    return blocks.all(axis=(1, 3)) if reduce == "all" else blocks.sum(axis=(1, 3))


def bin_map(arr: np.ndarray, shape: tuple[int, int], factor: int, reduce: str = "all") -> np.ndarray:
    """Crop evenly and bin ``arr (H, W)`` by ``factor`` to ``shape`` (``reduce``: ``all`` for masks, ``sum``
    for photon maps); see the module docstring for the shapes allowed."""
    return _crop_bin(np.asarray(arr), shape, int(factor), Path("<array>"), "array", reduce)


def _read_h5(file: Path, inner: str, what: str) -> np.ndarray:
    import h5py

    from bayes_spi.dataio.h5open import open_h5

    try:
        with open_h5(file, f"a {what} file (HDF5)") as f:
            if not inner:
                if "geometry/mask" in f and what == "mask":
                    inner = "/geometry/mask"
                else:
                    tops = [k for k, v in f.items() if isinstance(v, h5py.Dataset) and v.ndim == 2]
                    if len(tops) != 1:
                        raise DataFormatError(file, what, "a dataset path (FILE.h5:/path/to/dataset) or a file "
                                              "with one 2-D dataset at the top level",
                                              f"{len(tops)} top-level 2-D datasets {tops[:5]}")
                    inner = "/" + tops[0]
            if inner not in f or not isinstance(f[inner], h5py.Dataset):
                raise DataFormatError(file, inner, f"a 2-D {what} dataset", "no such dataset")
            return np.asarray(f[inner][()])
    except DataFormatError:
        raise
    except OSError as exc:
        raise DataFormatError(file, what, "an HDF5 file", f"unreadable ({exc})") from None


def _good_values(arr: np.ndarray, file: Path, field: str) -> np.ndarray:
    if arr.dtype == np.bool_:
        return arr
    if not np.issubdtype(arr.dtype, np.number) or not np.all((arr == 0) | (arr == 1)):
        raise DataFormatError(file, field, "bool or 0/1 values (True/1 = good pixel)",
                              f"dtype {arr.dtype} with values {np.unique(arr)[:6].tolist()}")
    return arr.astype(bool)


def read_mask(spec: str | os.PathLike[str], shape: tuple[int, int], bin_factor: int = 1) -> np.ndarray:
    """The good-pixel mask ``(n_y, n_x)`` bool (True = good) of a mask file for a detector of ``shape``.

    Args:
        spec: ``FILE.byt[:HxW]``, ``FILE.npy`` or ``FILE.h5[:/dataset]`` (see the module docstring).
        shape: ``(n_y, n_x)`` of the data.
        bin_factor: the data's binning relative to the mask's detector (1: same pixels).

    Raises:
        FileNotFoundError: no such file.
        DataFormatError: unknown suffix, wrong size or shape (naming the file and both shapes), bad values, or
            no good pixel.
    """
    from bayes_spi.paths import check_input_file

    if isinstance(bin_factor, bool) or int(bin_factor) != bin_factor or bin_factor < 1:
        raise ValueError(f"mask binning: expected a positive integer, got {bin_factor!r}")
    factor = int(bin_factor)
    file, inner = split_spec(spec)
    check_input_file(file, "a mask file (.byt, .npy or .h5)")
    suffix = file.suffix.lower()
    n_y, n_x = (int(v) for v in shape)
    if suffix == ".byt":
        raw = np.fromfile(file, dtype=np.uint8)
        if inner:
            try:
                h, w = (int(v) for v in inner.lower().split("x"))
            except ValueError:
                raise DataFormatError(file, "mask", "a shape suffix ROWSxCOLUMNS (e.g. mask.byt:260x257)",
                                      repr(inner)) from None
        elif factor == 1:
            h, w = n_y, n_x
        else:
            raise DataFormatError(file, "mask", f"the mask's own shape with a binning factor of {factor} "
                                  "(FILE.byt:ROWSxCOLUMNS)", "a .byt file without a shape")
        if raw.size != h * w:
            raise DataFormatError(file, "mask", f"{h * w} bytes (one per pixel of {h}x{w})", f"{raw.size} bytes")
        good = raw.reshape(h, w) == 0
    elif suffix == ".npy":
        try:
            arr = np.load(file, allow_pickle=False)
        except ValueError as exc:
            raise DataFormatError(file, "mask", "a .npy array", f"unreadable ({exc})") from None
        good = _good_values(arr, file, "mask")
    elif suffix in _H5_SUFFIXES:
        good = _good_values(_read_h5(file, inner, "mask"), file, inner or "mask")
    else:
        raise DataFormatError(file, "mask", "a .byt, .npy or .h5 file", f"suffix {file.suffix!r}")
    good = _crop_bin(good, (n_y, n_x), factor, file, "mask", "all")
    if not good.any():
        raise DataFormatError(file, "mask", "at least one good pixel", f"all {good.size} pixels masked"
                              + (f" after binning by {factor}" if factor > 1 else ""))
    return good


def combine_masks(*masks: np.ndarray | None, what: str = "the combined mask") -> np.ndarray:
    """Logical AND of the good pixels of ``masks`` (``None`` entries skipped); each ``(n_y, n_x)`` bool.

    Raises:
        ValueError: shapes differ, or no pixel is good in all of them.
    """
    present = [np.asarray(m, dtype=bool) for m in masks if m is not None]
    if not present:
        raise ValueError("expected at least one mask, got none")
    for m in present[1:]:
        if m.shape != present[0].shape:
            raise ValueError(f"expected masks of one shape {present[0].shape}, got shape {m.shape}")
    good = np.logical_and.reduce(present)
    if not good.any():
        raise ValueError(f"{what}: expected at least one good pixel, got none (each mask alone has "
                         f"{[int(m.sum()) for m in present]} good pixels, no pixel is good in all)")
    return good


def read_pixel_map(spec: str | os.PathLike[str], shape: tuple[int, int], bin_factor: int = 1,
                   what: str = "background") -> np.ndarray:
    """A per-pixel float map ``(n_y, n_x)`` float64 (e.g. mean background photons per pixel per pattern).

    ``spec``: ``FILE.npy`` or ``FILE.h5[:/dataset]``; with ``bin_factor`` the map is cropped evenly and summed
    over ``N x N`` blocks. Values must be finite and ``>= 0``.

    Raises:
        FileNotFoundError / DataFormatError: missing file, unknown suffix, wrong shape, bad values.
    """
    from bayes_spi.paths import check_input_file

    file, inner = split_spec(spec)
    check_input_file(file, f"a {what} file (.npy or .h5)")
    suffix = file.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(file, allow_pickle=False)
        except ValueError as exc:
            raise DataFormatError(file, what, "a .npy array", f"unreadable ({exc})") from None
    elif suffix in _H5_SUFFIXES:
        arr = _read_h5(file, inner, what)
    else:
        raise DataFormatError(file, what, "a .npy or .h5 file", f"suffix {file.suffix!r}")
    if not np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_:
        raise DataFormatError(file, inner or what, "numbers (photons per pixel per pattern)", f"dtype {arr.dtype}")
    arr = np.asarray(arr, dtype=np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise DataFormatError(file, inner or what, "finite values >= 0 (photons per pixel per pattern)",
                              f"min {np.nanmin(arr):.3g}, {int(np.sum(~np.isfinite(arr)))} non-finite")
    return _crop_bin(arr, tuple(int(v) for v in shape), int(bin_factor), file, inner or what, "sum")


class MaskedDataset:
    """A data set seen through an extra mask: ``mask`` and ``geometry`` carry the combined good pixels and the
    counts read at newly masked pixels are returned as 0 (as the data format does for its own mask).

    Everything else (``n_patterns``, ``path``, truth, ``batch_indices``...) is the parent's.

    Args:
        parent: an open :class:`~bayes_spi.dataio.h5.SPIDataset` (or a subset of one).
        mask: ``(n_y, n_x)`` bool, True = good; combined (AND) with ``parent.mask``.
        source: where the mask came from (for messages).
    """

    def __init__(self, parent: Any, mask: np.ndarray, source: str = "mask") -> None:
        parent_mask = np.asarray(parent.mask, dtype=bool)
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != parent_mask.shape:
            raise ValueError(f"{source}: expected shape {parent_mask.shape} (the data's detector), got shape "
                             f"{mask.shape}")
        self.parent = parent
        self.source = source
        self._mask = combine_masks(parent_mask, mask, what=f"{source} combined with {parent.path}'s own mask")
        self._geometry = parent.geometry.with_mask(self._mask)

    @property
    def mask(self) -> np.ndarray:
        return self._mask

    @property
    def geometry(self) -> Any:
        return self._geometry

    def read(self, indices: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        """Counts ``(B, n_y, n_x)``, 0 at every masked pixel."""
        data = self.parent.read(indices)
        data[..., ~self._mask] = 0
        return data

    def iter_batches(self, *args: Any, **kwargs: Any) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The parent's batches ``(indices (B,), counts (B, n_y, n_x))``, 0 at every masked pixel."""
        for idx, counts in self.parent.iter_batches(*args, **kwargs):
            counts[..., ~self._mask] = 0
            yield idx, counts

    def __getattr__(self, name: str) -> Any:
        if name == "parent":  # not yet set (during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.parent, name)

    def close(self) -> None:
        self.parent.close()

    def __enter__(self) -> "MaskedDataset":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MaskedDataset({self.parent!r}, {int(self._mask.sum())} good pixels, {self.source})"
