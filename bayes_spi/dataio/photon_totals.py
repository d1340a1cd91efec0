"""Per-pattern photon totals from a file, as weighted points, for the empirical scale prior.

The reader only: :meth:`bayes_spi.models.priors.EmpiricalScalePrior.from_totals` smooths what it returns
(binning and bandwidth: :mod:`bayes_spi.distributions.empirical`).

File formats (the relative spread is what matters: totals are normalised to mean 1 later):

* ``.npy``, 1-D, shape ``(N,)``: per-image photon totals (> 0).
* ``.npy``, 2-D, shape ``(2, J)``: row 0 bin centres (photons per image, > 0), row 1 their weights
  (counts or fractions, >= 0) -- the layout of the packaged ``pr772_photons_per_image.npy``.
* ``.npz``: either a field ``values`` (per-image totals), or ``edges`` ``(J + 1,)`` (increasing) with
  ``counts`` ``(J,)``, or ``centres`` (or ``centers``) ``(J,)`` with ``counts`` ``(J,)``.
* ``.csv`` (comma-separated, one header line naming the columns): a column ``value`` / ``values``
  (per-image totals), or ``centre``/``center``/``centres``/``centers`` with ``count``/``counts``, or
  ``edge``/``edges`` with ``count``/``counts``, the count column one entry shorter (last cell empty).

A histogram's bins are represented by their centres (the midpoints of ``edges``).

Example:
    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "totals.npy")
    >>> np.save(path, np.array([900.0, 1000.0, 1100.0]))
    >>> pts = load_photon_totals(path)
    >>> pts.n_samples, pts.values.shape
    (3, (3,))
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bayes_spi.dataio.h5 import DataFormatError

__all__ = ["PhotonTotals", "load_photon_totals"]


@dataclass(frozen=True)
class PhotonTotals:
    """Weighted photon totals.

    Attributes:
        values: ``(J,)`` positive totals (per-image values or bin centres), float64.
        weights: ``(J,)`` non-negative weights with a positive sum, float64.
        n_samples: number of images when known, else ``None``: per-image files; histograms with integer
            counts (their sum), or with fractions that are all integer multiples of the smallest one
            (``sum / smallest``: the smallest bin is taken to hold one image, as in the PR772 file).
        binned: whether ``values`` are histogram bin centres.
    """

    values: np.ndarray
    weights: np.ndarray
    n_samples: int | None
    binned: bool


def _error(path: Path, field: str, expected: str, got: str) -> ValueError:
    return DataFormatError(path, field, expected, got)


def _check_values(path: Path, field: str, values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size < 1:
        raise _error(path, field, "a non-empty 1-D array", f"shape {v.shape}")
    if not np.all(np.isfinite(v)) or np.any(v <= 0):
        bad = v[~(np.isfinite(v) & (v > 0))][:3]
        raise _error(path, field, "finite photon totals > 0", f"values such as {bad.tolist()}")
    return v


def _check_weights(path: Path, field: str, weights: np.ndarray, n: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise _error(path, field, f"shape ({n},) (one weight per bin)", f"shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
        raise _error(path, field, "finite counts >= 0 with a positive sum", f"min {w.min()}, sum {w.sum()}")
    return w


def _image_count(w: np.ndarray) -> int | None:
    """Images behind histogram weights: their sum for integer counts; for fractions that are all integer
    multiples of the smallest one, ``sum / smallest`` (the smallest bin holding one image); else ``None``."""
    if np.all(w == np.round(w)):
        return int(round(float(w.sum())))
    ratio = w / w.min()
    if np.all(np.abs(ratio - np.round(ratio)) < 1e-6 * np.maximum(ratio, 1.0)):
        return int(round(float(ratio.sum())))
    return None


def _histogram(path: Path, centres: np.ndarray, counts: np.ndarray, field: str) -> PhotonTotals:
    c = _check_values(path, field, centres)
    w = _check_weights(path, "counts", counts, c.size)
    keep = w > 0
    return PhotonTotals(c[keep], w[keep], _image_count(w[keep]), True)


def _from_edges(path: Path, edges: np.ndarray, counts: np.ndarray) -> PhotonTotals:
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or e.size < 2 or not np.all(np.isfinite(e)) or np.any(np.diff(e) <= 0):
        raise _error(path, "edges", "an increasing 1-D array of >= 2 finite bin edges", f"shape {e.shape}")
    return _histogram(path, 0.5 * (e[1:] + e[:-1]), counts, "edges")


def _samples(path: Path, values: np.ndarray, field: str) -> PhotonTotals:
    v = _check_values(path, field, values)
    return PhotonTotals(v, np.ones_like(v), int(v.size), False)


def _load_npy(path: Path) -> PhotonTotals:
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise _error(path, "array", "a numeric .npy array", f"unreadable ({exc})") from None
    if arr.ndim == 1:
        return _samples(path, arr, "array")
    if arr.ndim == 2 and arr.shape[0] == 2:
        return _histogram(path, arr[0], arr[1], "array row 0 (bin centres)")
    raise _error(path, "array", "shape (N,) per-image photon totals or (2, J) bin centres and weights",
                 f"shape {arr.shape}")


def _load_npz(path: Path) -> PhotonTotals:
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        if "values" in keys:
            return _samples(path, z["values"], "values")
        if "counts" in keys and "edges" in keys:
            return _from_edges(path, z["edges"], z["counts"])
        for name in ("centres", "centers"):
            if "counts" in keys and name in keys:
                return _histogram(path, z[name], z["counts"], name)
    raise _error(path, "fields", "'values', or 'edges' and 'counts', or 'centres' and 'counts'",
                 f"fields {sorted(keys)}")


def _load_csv(path: Path) -> PhotonTotals:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    if len(rows) < 2:
        raise _error(path, "header", "a header line and at least one row", f"{len(rows)} line(s)")
    header = [h.strip().lower() for h in rows[0]]

    def column(names: tuple[str, ...]) -> tuple[str, np.ndarray] | None:
        for name in names:
            if name in header:
                i = header.index(name)
                cells = [r[i].strip() if i < len(r) else "" for r in rows[1:]]
                while cells and cells[-1] == "":
                    cells.pop()
                try:
                    return name, np.array([float(c) for c in cells], dtype=np.float64)
                except ValueError:
                    raise _error(path, name, "numbers", f"a cell that is not a number in {cells[:5]}...") from None
        return None

    values = column(("value", "values"))
    if values is not None:
        return _samples(path, values[1], values[0])
    counts = column(("count", "counts"))
    edges = column(("edge", "edges"))
    centres = column(("centre", "center", "centres", "centers"))
    if counts is not None and edges is not None:
        return _from_edges(path, edges[1], counts[1])
    if counts is not None and centres is not None:
        return _histogram(path, centres[1], counts[1], centres[0])
    raise _error(path, "header", "columns 'value', or 'edge' and 'count', or 'centre' and 'count'",
                 f"columns {header}")


def load_photon_totals(path: str | os.PathLike[str]) -> PhotonTotals:
    """Read per-image photon totals or their histogram (formats: module doc).

    Raises:
        FileNotFoundError: no such file.
        DataFormatError (a ``ValueError``): unknown suffix or bad content; names the file and field.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"photon-count file {os.fspath(path)!r} not found (expected .npy, .npz or .csv)")
    suffix = p.suffix.lower()
    if suffix == ".npy":
        return _load_npy(p)
    if suffix == ".npz":
        return _load_npz(p)
    if suffix in (".csv", ".txt"):
        return _load_csv(p)
    raise _error(p, "suffix", ".npy, .npz or .csv", repr(p.suffix))
