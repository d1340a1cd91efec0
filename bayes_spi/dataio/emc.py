"""Streaming reader of Dragonfly's photon files (``.emc``), one file or several forming one data set.

Format (verified against Dragonfly's ``src/dataset.c`` and ``utils/py_src/reademc.py``, commit a2933c3)
----------------------------------------------------------------------------------------------------
A binary ``.emc`` file is little-endian ``int32`` throughout::

    header   256 words (1024 bytes): [0] num_data, [1] num_pix, [2] type (0 sparse, 1 dense int32,
             2 dense float64), the rest padding
    type 0   ones[num_data]          photons-equal-to-one pixels per frame
             multi[num_data]         pixels with more than one photon per frame
             place_ones[sum(ones)]   pixel indices of the one-photon pixels, frame after frame
             place_multi[sum(multi)] pixel indices of the multi-photon pixels, frame after frame
             count_multi[sum(multi)] their photon counts
    type 1   frames[num_data * num_pix]  int32 (row-major, frame after frame)
    type 2   frames[num_data * num_pix]  float64

Dragonfly's HDF5 photon files (datasets ``num_pix`` and variable-length ``place_ones``, ``place_multi``,
``count_multi`` of length num_data) are read too. A pixel index ``t`` refers to row ``t`` of the detector
file (:mod:`bayes_spi.dataio.dragonfly_detector`); a pixel listed twice in one frame adds up, as in
Dragonfly's own reader (``np.add.at``).

Several files form one data set (Dragonfly's ``in_photons_list``): frame ``i`` of the set is frame
``i - offset[f]`` of file ``f``. Nothing is loaded whole: only the per-frame lengths (``ones``, ``multi``,
8 bytes a frame) are read at opening; a frame's lists are then read with positioned reads (``os.pread``) of
just their bytes, so random access to any frame costs three small reads and resident memory stays flat in N
(no memory map: a mapped file's pages would count as resident as a scan touches them).

Validation names the file, the field, the value expected and the value found
(:class:`~bayes_spi.dataio.h5.DataFormatError`): a header that is not an emc header, a file shorter or
longer than its header and frame lengths say, negative frame lengths or more listed pixels than the detector
has, pixel indices outside ``[0, num_pix)``, photon counts below 1 in ``count_multi``, a ``num_pix``
different from the detector's or between the files of one set.

Example:
    >>> from bayes_spi.dataio.emc import EmcDataset
    >>> with EmcDataset(["photons_a.emc", "photons_b.emc"]) as emc:  # doctest: +SKIP
    ...     frames = emc.read_pixels([0, 70])   # (2, num_pix) int32
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from bayes_spi.dataio.h5 import DataFormatError, normalise_indices
from bayes_spi.dataio.h5open import open_h5

__all__ = ["HEADER_BYTES", "EMC_TYPES", "EmcFile", "EmcH5File", "EmcDataset", "read_photons_list"]

#: bytes of the binary header (num_data, num_pix, type, padding)
HEADER_BYTES: int = 1024

#: binary emc type word -> meaning
EMC_TYPES: dict[int, str] = {0: "sparse", 1: "dense int32", 2: "dense float64"}

_INT32_MAX = np.iinfo(np.int32).max


class EmcFile:
    """One binary Dragonfly ``.emc`` file; frames are read on demand (positioned reads, nothing mapped).

    Args:
        path: the ``.emc`` file.

    Attributes:
        num_data: frames in the file.
        num_pix: pixels per frame (rows of the detector file).
        kind: ``"sparse"``, ``"dense int32"`` or ``"dense float64"``.

    Raises:
        FileNotFoundError: no such file.
        DataFormatError: the header or the sizes are inconsistent (see the module docstring).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"photons file {os.fspath(self.path)!r} not found")
        size = self.path.stat().st_size
        if size < HEADER_BYTES:
            raise self._error("header", f"{HEADER_BYTES} bytes (num_data, num_pix, type, padding)",
                              f"a file of {size} bytes (truncated)")
        header = np.fromfile(self.path, dtype="<i4", count=3)
        self.num_data, self.num_pix, type_word = (int(v) for v in header)
        if self.num_data < 0:
            raise self._error("header num_data", "a non-negative frame count", str(self.num_data))
        if self.num_pix <= 0:
            raise self._error("header num_pix", "a positive pixel count", str(self.num_pix))
        if type_word not in EMC_TYPES:
            raise self._error("header type", f"one of {sorted(EMC_TYPES)} ({', '.join(EMC_TYPES.values())})",
                              str(type_word))
        self.kind = EMC_TYPES[type_word]
        n = self.num_data
        if self.kind == "sparse":
            need = HEADER_BYTES + 8 * n
            if size < need:
                raise self._error("ones/multi", f"{2 * n} int32 words after the header (num_data = {n})",
                                  f"a file of {size} bytes, {need} needed (truncated)")
            lengths = np.fromfile(self.path, dtype="<i4", count=2 * n, offset=HEADER_BYTES).astype(np.int64)
            self.ones, self.multi = lengths[:n], lengths[n:]
            for name, arr in (("ones", self.ones), ("multi", self.multi)):
                if n and arr.min() < 0:
                    frame = int(np.argmax(arr < 0))
                    raise self._error(name, "non-negative pixel counts per frame",
                                      f"{int(arr[frame])} at frame {frame}")
            over = self.ones + self.multi > self.num_pix
            if over.any():
                frame = int(np.argmax(over))
                raise self._error("ones + multi", f"at most num_pix = {self.num_pix} pixels per frame",
                                  f"{int(self.ones[frame] + self.multi[frame])} at frame {frame}")
            self.ones_offset = np.concatenate([[0], np.cumsum(self.ones)])
            self.multi_offset = np.concatenate([[0], np.cumsum(self.multi)])
            total_ones, total_multi = int(self.ones_offset[-1]), int(self.multi_offset[-1])
            expected = HEADER_BYTES + 4 * (2 * n + total_ones + 2 * total_multi)
            self._check_size(size, expected, f"header + ones + multi + place_ones ({total_ones}) + "
                                             f"place_multi ({total_multi}) + count_multi ({total_multi})")
            self._base_ones = 2 * n
            self._base_multi = 2 * n + total_ones
            self._base_count = 2 * n + total_ones + total_multi
        else:
            self._dtype = np.dtype("<i4" if self.kind == "dense int32" else "<f8")
            expected = HEADER_BYTES + self._dtype.itemsize * n * self.num_pix
            self._check_size(size, expected, f"header + {n} x {self.num_pix} {self.kind} values")
        self._fh = open(self.path, "rb")  # noqa: SIM115 (closed by close())

    # ------------------------------------------------------------------ helpers
    def _error(self, field: str, expected: str, found: str) -> DataFormatError:
        return DataFormatError(self.path, field, expected, found)

    def _check_size(self, size: int, expected: int, what: str) -> None:
        if size < expected:
            raise self._error("file size", f"{expected} bytes ({what})", f"{size} bytes (truncated)")
        if size > expected:
            raise self._error("file size", f"{expected} bytes ({what})", f"{size} bytes ({size - expected} "
                              "trailing bytes)")

    def __len__(self) -> int:
        return self.num_data

    def _read(self, offset: int, nbytes: int) -> bytes:
        """``nbytes`` at byte ``offset`` (a positioned read: no file position shared, nothing mapped)."""
        if self._fh is None:
            raise ValueError(f"{os.fspath(self.path)}: read from a closed photons file")
        if hasattr(os, "pread"):
            data = os.pread(self._fh.fileno(), nbytes, offset)
        else:  # pragma: no cover (Windows)
            self._fh.seek(offset)
            data = self._fh.read(nbytes)
        if len(data) != nbytes:
            raise self._error("file size", f"{offset + nbytes} bytes", f"{offset + len(data)} bytes (truncated "
                              "since it was opened)")
        return data

    def _words(self, first_word: int, count: int) -> np.ndarray:
        """``count`` int32 words from word ``first_word`` after the header, as int64."""
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        return np.frombuffer(self._read(HEADER_BYTES + 4 * first_word, 4 * count), dtype="<i4").astype(np.int64)

    # ------------------------------------------------------------------ reading
    def read_pixels(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Dense frames ``(B, num_pix)`` int32 of the given frame indices (in that order).

        Consecutive frame numbers are read together (one read per list and run of frames), so a sequential
        scan costs three reads per batch and a shuffled batch a few per frame.

        Raises:
            IndexError: an index outside ``[0, num_data)``.
            DataFormatError: a pixel index outside ``[0, num_pix)`` or a count below 1 (names the frame).
        """
        idx = normalise_indices(indices, self.num_data, negative=False)
        unique, inverse = np.unique(idx, return_inverse=True)
        out = np.zeros((len(unique), self.num_pix), dtype=np.int64)
        if len(unique) == 0:
            return out.astype(np.int32)
        breaks = np.nonzero(np.diff(unique) != 1)[0] + 1
        for run_rows in np.split(np.arange(len(unique)), breaks):
            a, b = int(unique[run_rows[0]]), int(unique[run_rows[-1]]) + 1  # frames [a, b)
            if self.kind == "sparse":
                self._read_sparse_run(a, b, out[run_rows[0] : run_rows[-1] + 1])
            else:
                item = self._dtype.itemsize
                raw = np.frombuffer(self._read(HEADER_BYTES + item * a * self.num_pix, item * (b - a) * self.num_pix),
                                    dtype=self._dtype).reshape(b - a, self.num_pix)
                if self.kind == "dense float64":
                    bad = ~np.isfinite(raw).all(axis=1) | (raw != np.round(raw)).any(axis=1)
                    if bad.any():
                        raise self._error("frames", "whole photon counts",
                                          f"a non-integer or non-finite value in frame {a + int(np.argmax(bad))}")
                out[run_rows[0] : run_rows[-1] + 1] = raw.astype(np.int64)
        return self._finish(out, unique)[inverse.reshape(-1)]

    def _read_sparse_run(self, a: int, b: int, out: np.ndarray) -> None:
        """Add frames ``[a, b)`` into ``out`` ``(b - a, num_pix)`` int64."""
        o0, o1 = int(self.ones_offset[a]), int(self.ones_offset[b])
        m0, m1 = int(self.multi_offset[a]), int(self.multi_offset[b])
        place_ones = self._words(self._base_ones + o0, o1 - o0)
        place_multi = self._words(self._base_multi + m0, m1 - m0)
        count_multi = self._words(self._base_count + m0, m1 - m0)
        rows_ones = np.repeat(np.arange(b - a), self.ones[a:b])
        rows_multi = np.repeat(np.arange(b - a), self.multi[a:b])
        self._check_places(place_ones, rows_ones, "place_ones", a)
        self._check_places(place_multi, rows_multi, "place_multi", a)
        if count_multi.size and count_multi.min() < 1:
            at = int(np.argmin(count_multi))
            raise self._error("count_multi", "photon counts >= 1",
                              f"{int(count_multi[at])} in frame {a + int(rows_multi[at])}")
        np.add.at(out, (rows_ones, place_ones), 1)
        np.add.at(out, (rows_multi, place_multi), count_multi)

    def _check_places(self, places: np.ndarray, rows: np.ndarray, field: str, first: int) -> None:
        if places.size and (places.min() < 0 or places.max() >= self.num_pix):
            at = int(np.argmax((places < 0) | (places >= self.num_pix)))
            raise self._error(field, f"pixel indices in [0, num_pix = {self.num_pix})",
                              f"{int(places[at])} in frame {first + int(rows[at])}")

    def _finish(self, out: np.ndarray, idx: np.ndarray) -> np.ndarray:
        if out.size and (out.min() < 0 or out.max() > _INT32_MAX):
            row = int(np.argmax((out < 0).any(axis=1) | (out > _INT32_MAX).any(axis=1)))
            raise self._error("frames", f"photon counts in [0, {_INT32_MAX}]",
                              f"{int(out[row].min())}..{int(out[row].max())} in frame {int(idx[row])}")
        return out.astype(np.int32)

    def close(self) -> None:
        """Close the file."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None  # type: ignore[assignment]


class EmcH5File:
    """One Dragonfly HDF5 photon file (``num_pix``; variable-length ``place_ones``, ``place_multi``,
    ``count_multi``, one entry per frame); same interface as :class:`EmcFile`.

    Raises:
        FileNotFoundError: no such file.
        DataFormatError: a dataset is missing or the lengths disagree.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.kind = "sparse (HDF5)"
        self._file = open_h5(self.path, "a Dragonfly HDF5 photons file")
        try:
            for name in ("num_pix", "place_ones", "place_multi", "count_multi"):
                if name not in self._file or not isinstance(self._file[name], h5py.Dataset):
                    raise DataFormatError(self.path, f"/{name}", "a dataset (Dragonfly HDF5 photons file)", "missing")
            self.num_pix = int(np.prod(self._file["num_pix"][()]))
            if self.num_pix <= 0:
                raise DataFormatError(self.path, "/num_pix", "a positive pixel count", str(self.num_pix))
            lengths = {name: self._file[name].shape[0] for name in ("place_ones", "place_multi", "count_multi")}
            if len(set(lengths.values())) != 1:
                raise DataFormatError(self.path, "/place_ones, /place_multi, /count_multi",
                                      "the same number of frames", str(lengths))
            self.num_data = int(lengths["place_ones"])
        except Exception:
            self._file.close()
            raise

    def __len__(self) -> int:
        return self.num_data

    def read_pixels(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Dense frames ``(B, num_pix)`` int32 of the given frame indices (in that order); runs of consecutive
        frames are read as one slice of each list."""
        idx = normalise_indices(indices, self.num_data, negative=False)
        unique, inverse = np.unique(idx, return_inverse=True)
        out = np.zeros((len(unique), self.num_pix), dtype=np.int64)
        breaks = np.nonzero(np.diff(unique) != 1)[0] + 1
        for run_rows in np.split(np.arange(len(unique)), breaks) if len(unique) else []:
            a, b = int(unique[run_rows[0]]), int(unique[run_rows[-1]]) + 1
            lists = [self._file[name][a:b] for name in ("place_ones", "place_multi", "count_multi")]
            for k, (ones, multi, counts) in enumerate(zip(*lists)):
                self._add_frame(out[run_rows[0] + k], a + k, np.asarray(ones, dtype=np.int64),
                                np.asarray(multi, dtype=np.int64), np.asarray(counts, dtype=np.int64))
        if out.size and out.max() > _INT32_MAX:
            raise DataFormatError(self.path, "/count_multi", f"photon counts <= {_INT32_MAX}", "larger sums")
        return out.astype(np.int32)[inverse.reshape(-1)]

    def _add_frame(self, row: np.ndarray, frame: int, place_ones: np.ndarray, place_multi: np.ndarray,
                   count_multi: np.ndarray) -> None:
        if place_multi.shape != count_multi.shape:
            raise DataFormatError(self.path, "/count_multi", f"{place_multi.size} counts (as /place_multi)",
                                  f"{count_multi.size} in frame {frame}")
        for name, places in (("place_ones", place_ones), ("place_multi", place_multi)):
            if places.size and (places.min() < 0 or places.max() >= self.num_pix):
                raise DataFormatError(self.path, f"/{name}", f"pixel indices in [0, {self.num_pix})",
                                      f"{int(places.min())}..{int(places.max())} in frame {frame}")
        if count_multi.size and count_multi.min() < 1:
            raise DataFormatError(self.path, "/count_multi", "photon counts >= 1",
                                  f"{int(count_multi.min())} in frame {frame}")
        np.add.at(row, place_ones, 1)
        np.add.at(row, place_multi, count_multi)

    def close(self) -> None:
        """Close the file."""
        if self._file.id.valid:
            self._file.close()


def read_photons_list(path: str | os.PathLike[str]) -> list[Path]:
    """The photon files named in a Dragonfly ``in_photons_list`` text file (one path a line; blank lines and
    ``#`` comments skipped; relative paths are relative to the list's folder).

    Raises:
        FileNotFoundError: no such list.
        DataFormatError: the list names no file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"photons list {os.fspath(path)!r} not found")
    names = []
    for line in path.read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if text:
            entry = Path(text)
            names.append(entry if entry.is_absolute() else path.parent / entry)
    if not names:
        raise DataFormatError(path, "lines", "one photons file (.emc) a line", "no file names")
    return names


def _open_one(path: Path) -> EmcFile | EmcH5File:
    if path.is_file() and h5py.is_hdf5(path):
        return EmcH5File(path)
    return EmcFile(path)


class EmcDataset:
    """Several photon files read as one data set (frame ``i`` of the set in order of the files).

    Args:
        paths: ``.emc`` files (binary or Dragonfly's HDF5 photon files), or one path of a text file listing
            them (Dragonfly's ``in_photons_list``, recognised by a ``.txt``/``.lst``/``.list`` suffix).
        num_pix: the detector's pixel count, if known: every file must have it.

    Raises:
        FileNotFoundError: a file is missing.
        DataFormatError: a file is malformed, or ``num_pix`` differs (names the file).
    """

    def __init__(self, paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                 num_pix: int | None = None) -> None:
        if isinstance(paths, (str, os.PathLike)):
            one = Path(paths)
            paths = read_photons_list(one) if one.suffix.lower() in (".txt", ".lst", ".list") else [one]
        files: list[EmcFile | EmcH5File] = []
        try:
            for p in paths:
                files.append(_open_one(Path(p)))
                first_pix = files[0].num_pix
                this = files[-1]
                if num_pix is not None and this.num_pix != num_pix:
                    raise DataFormatError(this.path, "header num_pix",
                                          f"{num_pix} (the detector file's pixel count)", str(this.num_pix))
                if this.num_pix != first_pix:
                    raise DataFormatError(this.path, "header num_pix", f"{first_pix} (as {files[0].path})",
                                          str(this.num_pix))
        except Exception:
            for f in files:
                f.close()
            raise
        if not files:
            raise ValueError("paths: expected at least one photons file, got none")
        self.files = files
        self.num_pix = files[0].num_pix
        self.offsets = np.concatenate([[0], np.cumsum([f.num_data for f in files])]).astype(np.int64)

    @property
    def paths(self) -> list[Path]:
        """The photon files, in order."""
        return [f.path for f in self.files]

    @property
    def num_data(self) -> int:
        """Frames in the whole set."""
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return self.num_data

    def read_pixels(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Dense frames ``(B, num_pix)`` int32 of global frame indices (in that order)."""
        idx = normalise_indices(indices, self.num_data, negative=False)
        out = np.empty((len(idx), self.num_pix), dtype=np.int32)
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        for f in np.unique(which):
            rows = np.nonzero(which == f)[0]
            out[rows] = self.files[int(f)].read_pixels(idx[rows] - self.offsets[f])
        return out

    def close(self) -> None:
        """Close every file."""
        for f in self.files:
            f.close()

    def __enter__(self) -> EmcDataset:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close()
