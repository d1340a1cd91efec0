"""Lazy, validated access to what a run report needs: each input is read once, and only the parts needed.

Every property returns ``None`` when its file is absent (the page then says which command makes it, see
:data:`SOURCES`) and raises ``ValueError`` naming the file and field when a file is there but malformed.

Run-directory inputs (see README "The run directory"): ``metrics.csv``, ``intensity.h5``, ``posterior.h5``,
``model.pt``, ``config.yaml``, ``evaluation.json``; optional products of later commands: ``fsc.json``
(``{"intensity"|"density"|"halfset": {"q_inv_A": [...], "fsc": [...], "res_nm_0.5": float|null,
"res_nm_0.143": float|null, "crosses_0.5": bool, "crosses_0.143": bool}, "corner_res_nm": float}``, every key
optional; null, or ``crosses`` false, means the curve stays above the threshold: the resolution is then at
best a bound, that of the last shell), ``density.mrc`` (real-space
density, voxel size in A, MRC order ``[z, y, x]``) and ``posterior.nc`` (ArviZ netCDF; per-pattern 50%/90%
credible-cone radii are used when present). The data file (input patterns; with ``--truth`` also the true
poses and intensity) is a bayes-spi HDF5 file.

Memory is bounded in ``N``: with more than :data:`MAX_REPORT_PATTERNS` patterns, every per-pattern input is read
as the same even stride ``[::stride]`` of its patterns (:attr:`RunData.used_index`; rows of posterior.h5, of
/truth and of posterior.nc's listed patterns stay paired), and the figures and statistics use those
``n_used`` of ``N`` patterns (the page says so). The checks that the files agree on ``N`` use the datasets'
shapes, without reading them.

Example::

    rd = RunData("run1", truth_path="data.h5")
    rd.metrics["images_seen"], rd.alignment["G_mod_rotz_pi"]
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from bayes_spi.config.commands import command
from bayes_spi.dataio.h5 import DataFormatError
from bayes_spi.dataio.h5open import open_h5
from bayes_spi.infer.rundir import RunDir
from bayes_spi.report.numbers import cone_radius_deg, geodesic_deg, pose_errors
from bayes_spi.so3 import rotz_pi_numpy

__all__ = ["Source", "SOURCES", "FSC_KINDS", "MAX_REPORT_PATTERNS", "READ_CHUNK", "RunData"]

#: above this many patterns the report reads an even stride ``[::step]`` of them (the same rows of posterior.h5,
#: posterior.nc and /truth), so that its memory does not grow with N
MAX_REPORT_PATTERNS: int = 100_000
#: rows per read when a per-pattern file is filtered in chunks (posterior.nc's listed patterns)
READ_CHUNK: int = 65_536


@dataclass(frozen=True)
class Source:
    """An input of the report: what it is and how to make it."""

    what: str
    hint: str


#: input name -> where it comes from (used by the page to say what is missing)
SOURCES: dict[str, Source] = {
    "metrics": Source(RunDir.name("metrics"), f"written while {command('fit')} runs"),
    "intensity": Source(RunDir.name("intensity"), f"written at the end of {command('fit')}"),
    "posterior": Source(RunDir.name("posterior"), f"written at the end of {command('fit')}"),
    "model": Source(RunDir.name("model"), f"written at the end of {command('fit')}"),
    "data": Source("the data file (input patterns)",
                   f"the path recorded in {RunDir.name('config')} is used; else give {command('report_data')}"),
    "truth": Source("the truth (simulated data file)", f"give {command('report_truth')}"),
    "truth_intensity": Source("/truth/intensity of the truth file",
                              f"simulate with a truth grid ({command('simulate')})"),
    "fsc": Source(RunDir.name("fsc"), f"run {command('evaluate_truth')} (writes RUN/{RunDir.name('fsc')})"),
    "density": Source(RunDir.name("density"), f"run {command('phase')}"),
    "posterior_nc": Source(f"{RunDir.name('posterior_nc')} (credible-cone radii)",
                           f"run `bayes-spi posterior RUN/ DATA.h5 -o RUN/{RunDir.name('posterior_nc')}`"),
}

#: curves of fsc.json, in display order, with their labels
FSC_KINDS: dict[str, str] = {
    "intensity": "intensity vs truth (sqrt I)",
    "speckle": "speckle vs truth (shell means removed)",
    "density": "density vs truth",
    "halfset": "half-set (sqrt I)",
    "halfset_speckle": "half-set speckle",
}


def _fspath(p: Path) -> str:
    return os.fspath(p)


def _float_or_none(v: Any, path: Path, field: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{_fspath(path)}: field {field}: expected a number or null, got {type(v).__name__}")
    return float(v) if math.isfinite(v) else None


class RunData:
    """The inputs of a run report, read lazily (cached).

    Args:
        run_dir: the run directory.
        truth_path: a simulated data file with ``/truth`` (enables the comparisons with the truth).
        data_path: the data file for the input patterns (default: ``truth_path``, else the path in
            ``config.yaml`` when that file exists).
        max_align: patterns used to fit the global alignment ``G`` (see :func:`pose_errors`).
    """

    def __init__(self, run_dir: str | os.PathLike[str], truth_path: str | os.PathLike[str] | None = None,
                 data_path: str | os.PathLike[str] | None = None, max_align: int = 5000) -> None:
        self.run_dir = Path(run_dir)
        self.files = RunDir(self.run_dir)
        if not self.run_dir.is_dir():
            raise FileNotFoundError(f"run directory {_fspath(self.run_dir)!r} not found")
        self.truth_path = None if truth_path is None else Path(truth_path)
        if self.truth_path is not None and not self.truth_path.is_file():
            raise FileNotFoundError(f"truth file {_fspath(self.truth_path)!r} not found")
        self._data_path = None if data_path is None else Path(data_path)
        if self._data_path is not None and not self._data_path.is_file():
            raise FileNotFoundError(f"data file {_fspath(self._data_path)!r} not found")
        self.max_align = int(max_align)

    # ------------------------------------------------------------------ run files
    @cached_property
    def config_text(self) -> str | None:
        """``config.yaml`` as text."""
        p = self.files.path("config")
        return p.read_text(encoding="utf-8") if p.is_file() else None

    @cached_property
    def config(self) -> dict[str, Any] | None:
        """``config.yaml`` as a dict (the whole document)."""
        from bayes_spi.infer.rundir import read_run_info

        if self.config_text is None:
            return None
        return read_run_info(self.run_dir)

    @cached_property
    def verdict(self) -> dict[str, Any] | None:
        """``verdict.json`` (the truth-free verdict of the fit: status, reasons, checks), or None."""
        p = self.files.path("verdict")
        if not p.is_file():
            return None
        doc = self.files.read_json("verdict", required=True)
        if doc.get("status") not in ("converged", "unconverged", "failed"):
            raise ValueError(f"{_fspath(p)}: field status: expected converged, unconverged or failed, "
                             f"got {doc.get('status')!r}")
        return doc

    @cached_property
    def evaluation(self) -> dict[str, float | None] | None:
        """``evaluation.json`` (numbers; null for a metric that could not be computed)."""
        p = self.files.path("evaluation")
        if not p.is_file():
            return None
        doc = self.files.read_json("evaluation", required=True)
        return {str(k): _float_or_none(v, p, str(k)) for k, v in doc.items() if not isinstance(v, (dict, list, str))}

    @cached_property
    def metrics(self) -> dict[str, np.ndarray] | None:
        """``metrics.csv`` columns as float arrays ``(T,)`` (empty cells NaN); None without rows."""
        p = self.files.path("metrics")
        if not p.is_file():
            return None
        with open(p, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            rows = list(reader)
        if not rows:
            return None
        for col in ("images_seen", "elbo_per_image"):
            if col not in header:
                raise ValueError(f"{_fspath(p)}: field {col}: expected a column, got columns {header}")
        out: dict[str, np.ndarray] = {}
        for col in header:
            vals = []
            for i, r in enumerate(rows):
                cell = r.get(col)
                if cell is None or cell == "":
                    vals.append(np.nan)
                    continue
                try:
                    vals.append(float(cell))
                except ValueError:
                    raise ValueError(f"{_fspath(p)}: field {col}: expected numbers, got {cell!r} "
                                     f"in row {i + 1}") from None
            out[col] = np.asarray(vals, dtype=np.float64)
        return out

    @property
    def live_checkpoint(self) -> Path | None:
        """A running fit's ``checkpoint.pt`` (no ``model.pt`` yet), from which the report shows the current
        reconstruction; None otherwise."""
        ck = self.files.path("checkpoint")
        return ck if not self.files.has("model") and ck.is_file() else None

    def _live_intensity(self, n: int = 65) -> tuple[np.ndarray, float] | None:
        """The intensity of a running fit's field on an ``n``-cube up to the detector's ``q_max`` (read-only)."""
        from bayes_spi.infer.evaluate import load_field
        from bayes_spi.infer.outputs import field_on_grid

        ck = self.live_checkpoint
        if ck is None:
            return None
        field, q_max = load_field(ck)
        return field_on_grid(field, n, q_max)

    @cached_property
    def intensity(self) -> tuple[np.ndarray, float] | None:
        """``intensity.h5``: ``(I (n, n, n) [ix, iy, iz] float64, dq 1/A)``; for a running fit, its latest
        checkpoint's field on a 65-cube."""
        p = self.files.path("intensity")
        if not p.is_file():
            return self._live_intensity()
        with open_h5(p, "the run's intensity volume (HDF5)") as f:
            if "intensity" not in f:
                raise ValueError(f"{_fspath(p)}: field /intensity: expected a dataset, got missing")
            d = f["intensity"]
            if d.ndim != 3 or len(set(d.shape)) != 1 or d.shape[0] % 2 == 0:
                raise ValueError(f"{_fspath(p)}: field /intensity: expected an odd cube (n, n, n), got {d.shape}")
            if "voxel_size_inv_A" not in d.attrs:
                raise ValueError(f"{_fspath(p)}: field /intensity attrs['voxel_size_inv_A']: expected a number, "
                                 "got missing")
            return np.asarray(d[()], dtype=np.float64), float(d.attrs["voxel_size_inv_A"])

    @cached_property
    def _posterior_n(self) -> int | None:
        """``N`` from the shape of ``posterior.h5``'s ``/pose_quaternion`` (not read)."""
        p = self.files.path("posterior")
        if not p.is_file():
            return None
        with self.files.open_h5("posterior", "the run's per-image posterior (HDF5)") as f:
            if "pose_quaternion" not in f:
                raise ValueError(f"{_fspath(p)}: field /pose_quaternion: expected a dataset, got missing")
            shape = f["pose_quaternion"].shape
        if len(shape) != 2 or shape[1] != 4 or shape[0] == 0:
            raise ValueError(f"{_fspath(p)}: field /pose_quaternion: expected shape (N, 4), got {shape}")
        return int(shape[0])

    @property
    def n_patterns(self) -> int | None:
        """Patterns in ``posterior.h5`` (None without it); from the dataset's shape."""
        return self._posterior_n

    @staticmethod
    def _stride_of(n: int) -> int:
        return 1 if n <= MAX_REPORT_PATTERNS else math.ceil(n / MAX_REPORT_PATTERNS)

    @property
    def stride(self) -> int:
        """The step of the patterns the report reads: 1 up to :data:`MAX_REPORT_PATTERNS` patterns, else
        ``ceil(N / MAX_REPORT_PATTERNS)``."""
        n = self.n_patterns
        return 1 if n is None else self._stride_of(n)

    @property
    def used_index(self) -> np.ndarray | None:
        """``(M,)`` the patterns (rows of posterior.h5 and the data file) behind the figures and statistics:
        ``arange(0, N, stride)``; row ``j`` of every per-pattern array here is pattern ``used_index[j]``."""
        n = self.n_patterns
        return None if n is None else np.arange(0, n, self.stride, dtype=np.int64)

    @property
    def n_used(self) -> int | None:
        """``M``, the number of patterns the figures and statistics use (None without posterior.h5)."""
        idx = self.used_index
        return None if idx is None else int(len(idx))

    @cached_property
    def posterior(self) -> dict[str, np.ndarray] | None:
        """``posterior.h5`` at the patterns :attr:`used_index` (all of them up to :data:`MAX_REPORT_PATTERNS`):
        ``R (M, 3, 3)``, ``quaternion (M, 4)``, ``index (M,)`` (pattern numbers), and when present
        ``sigma_rad (M, 3)``, ``best_weight (M,)`` (weight of the most probable hypothesis), ``scale_mean (M,)``."""
        from bayes_spi.dataio.h5 import quaternions_to_rotations, read_rows

        n = self.n_patterns
        if n is None:
            return None
        p = self.files.path("posterior")
        rows = slice(None, None, self.stride)
        out: dict[str, np.ndarray] = {"index": self.used_index}
        with self.files.open_h5("posterior", "the run's per-image posterior (HDF5)") as f:
            q = np.asarray(read_rows(f["pose_quaternion"], rows, READ_CHUNK), dtype=np.float64)
            out["quaternion"] = q
            try:
                out["R"] = quaternions_to_rotations(q)
            except ValueError as exc:
                raise ValueError(f"{_fspath(p)}: field /pose_quaternion: {exc}") from None
            for name, key, shape in (("pose_sigma_rad", "sigma_rad", (n, 3)), ("scale_mean", "scale_mean", (n,))):
                if name in f:
                    if f[name].shape != shape:
                        raise ValueError(f"{_fspath(p)}: field /{name}: expected shape {shape}, got {f[name].shape}")
                    out[key] = np.asarray(read_rows(f[name], rows, READ_CHUNK), dtype=np.float64)
            if "hypothesis_weights" in f:
                d = f["hypothesis_weights"]
                if d.ndim != 2 or d.shape[0] != n:
                    raise ValueError(f"{_fspath(p)}: field /hypothesis_weights: expected shape ({n}, K), got {d.shape}")
                out["best_weight"] = np.asarray(read_rows(d, rows, READ_CHUNK), dtype=np.float64).max(axis=1)
        return out

    # ------------------------------------------------------------------ data file and truth
    @cached_property
    def data_path(self) -> Path | None:
        """The data file of the input patterns: ``data_path``, else ``truth_path``, else config.yaml's path."""
        if self._data_path is not None:
            return self._data_path
        if self.truth_path is not None:
            return self.truth_path
        cfg = self.config if self.config_text is not None else None
        rec = cfg.get("data") if isinstance(cfg, dict) else None
        path = rec.get("path") if isinstance(rec, dict) else None
        if isinstance(path, str) and Path(path).is_file():
            return Path(path)
        return None

    def _check_n(self, n: int, path: Path, field: str) -> None:
        if self.n_patterns is not None and n != self.n_patterns:
            raise ValueError(f"{_fspath(path)}: field {field}: expected {self.n_patterns} patterns (as "
                             f"{_fspath(self.files.path('posterior'))}), got {n}")

    def read_patterns(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Counts ``(B, n_y, n_x)`` of the given patterns of the data file and its good-pixel mask ``(n_y, n_x)``."""
        from bayes_spi.config.sources import SourceOptions
        from bayes_spi.dataio.sources import open_dataset

        if self.data_path is None:
            return None
        rec = self.config.get("data") if self.config_text is not None and isinstance(self.config, dict) else None
        from_config = self._data_path is None and self.truth_path is None
        recorded = rec.get("source") if isinstance(rec, dict) and from_config else None
        with open_dataset(self.data_path, **SourceOptions.from_dict(recorded).open_kwargs()) as ds:
            self._check_n(ds.n_patterns, self.data_path, "/data/counts")
            return ds.read(np.asarray(indices, dtype=np.int64)), np.asarray(ds.mask, dtype=bool)

    @cached_property
    def truth(self) -> dict[str, Any] | None:
        """``{"R" (M, 3, 3), "scales" (M,), "intensity" (n, n, n) or None, "voxel" (1/A) or None}``: the true poses
        and scales of the patterns :attr:`used_index` (the same rows as :attr:`posterior`)."""
        from bayes_spi.dataio.h5 import DataFormatError, SPIDataset

        if self.truth_path is None:
            return None
        with SPIDataset(self.truth_path) as ds:
            ds.truth_quaternions(slice(0, 0))  # a clear error if the file has no true poses
            self._check_n(ds.n_patterns, self.truth_path, "/truth/quaternions")
            rows = slice(None, None, self._stride_of(ds.n_patterns))
            R = ds.truth_rotations(rows)
            try:
                I, voxel = ds.truth_intensity()
            except DataFormatError:
                I, voxel = None, None
            return {"R": R, "scales": ds.truth_scales(rows),
                    "intensity": None if I is None else np.asarray(I, dtype=np.float64), "voxel": voxel}

    @cached_property
    def alignment(self) -> dict[str, Any] | None:
        """Pose errors against the truth (:func:`pose_errors`) of the patterns :attr:`used_index` (arrays
        ``(M,)``); None without truth or posterior."""
        if self.truth is None or self.posterior is None:
            return None
        settings = (self.config or {}).get("settings", {}) if self.config_text is not None else {}
        return pose_errors(self.posterior["R"], self.truth["R"], max_align=self.max_align,
                           symmetry=settings.get("symmetry") if isinstance(settings, dict) else None)

    # ------------------------------------------------------------------ later products
    @cached_property
    def fsc(self) -> dict[str, Any] | None:
        """``fsc.json`` validated: ``{kind: {"q": (S,), "fsc": (S,), "res_nm_0.5", "res_nm_0.143", "given_0.5",
        "given_0.143", "crosses_0.5", "crosses_0.143"}, "corner_res_nm"}`` (``crosses_*`` None when not given)."""
        p = self.files.path("fsc")
        if not p.is_file():
            return None
        doc = self.files.read_json("fsc", required=True)
        out: dict[str, Any] = {"corner_res_nm": _float_or_none(doc.get("corner_res_nm"), p, "corner_res_nm")}
        for kind in FSC_KINDS:
            c = doc.get(kind)
            if c is None:
                continue
            if not isinstance(c, dict) or "q_inv_A" not in c or "fsc" not in c:
                raise ValueError(f"{_fspath(p)}: field {kind}: expected an object with q_inv_A and fsc lists, "
                                 f"got {c if not isinstance(c, dict) else sorted(c)}")
            try:
                q = np.asarray(c["q_inv_A"], dtype=np.float64)
                f = np.asarray(c["fsc"], dtype=np.float64)
            except (TypeError, ValueError):
                raise ValueError(f"{_fspath(p)}: field {kind}.q_inv_A/fsc: expected lists of numbers") from None
            if q.ndim != 1 or q.shape != f.shape or q.size == 0:
                raise ValueError(f"{_fspath(p)}: field {kind}: expected q_inv_A and fsc of equal length >= 1, "
                                 f"got shapes {q.shape} and {f.shape}")
            curve: dict[str, Any] = {"q": q, "fsc": f}
            for thr in ("0.5", "0.143"):
                key = f"res_nm_{thr}"
                curve[key] = _float_or_none(c.get(key), p, f"{kind}.{key}")
                curve[f"given_{thr}"] = key in c
                crosses = c.get(f"crosses_{thr}")
                if crosses is not None and not isinstance(crosses, bool):
                    raise ValueError(f"{_fspath(p)}: field {kind}.crosses_{thr}: expected true/false, got {crosses!r}")
                curve[f"crosses_{thr}"] = crosses
            out[kind] = curve
        return out

    @cached_property
    def density(self) -> tuple[np.ndarray, float] | None:
        """``density.mrc``: ``(rho (n_x, n_y, n_z) indexed [ix, iy, iz] float64, voxel A)``."""
        from bayes_spi.mrc import read_mrc

        p = self.files.path("density")
        if not p.is_file():
            return None
        return read_mrc(p)

    @cached_property
    def cones(self) -> dict[str, Any] | None:
        """Per-pattern credible-cone radii in degrees, of the patterns :attr:`used_index` (those of them that
        posterior.nc lists).

        Returns ``{"r50" (M,), "r90" (M,), "r90_mod" (M,) or None, "index" (M,) pattern indices (rows of
        posterior.h5 / the data file), "R_center" (M, 3, 3) or None (the pose the cones are centred on),
        "source": str, "label": str}``.

        From ``posterior.nc`` (``bayes-spi posterior``) when it holds ``sample_stats/cone_radius_deg
        (pattern, credible_mass)`` (with ``credible_mass`` 0.5 and 0.9, the ``pattern`` coordinate,
        ``cone_radius_mod_rotz_deg`` and ``mean_pose_quaternion`` when present; read in chunks of
        :data:`READ_CHUNK` rows, keeping the patterns of :attr:`used_index`), or per-pattern variables whose
        names contain ``cone`` and ``50`` / ``90``; otherwise the isotropic LieNormal approximation from
        ``posterior.h5``'s ``pose_sigma_rad`` (:func:`cone_radius_deg`) around the most probable hypothesis.
        Units: a variable's ``units`` attribute (``deg``/``rad``), else a ``deg`` in its name, else radians.
        """
        nc = self._cones_from_netcdf()
        if nc is not None:
            return nc
        post = self.posterior
        if post is None or "sigma_rad" not in post:
            return None
        s = post["sigma_rad"]
        return {"r50": cone_radius_deg(s, 0.5), "r90": cone_radius_deg(s, 0.9), "r90_mod": None,
                "index": post["index"], "R_center": None,
                "source": "posterior.h5: most probable hypothesis, isotropic LieNormal approximation "
                          "(rms sigma x sqrt(chi2_3 quantile))",
                "label": "posterior.h5 sigmas, isotropic approximation"}

    def _cones_from_netcdf(self) -> dict[str, Any] | None:
        p = self.files.path("posterior_nc")
        n = self.n_patterns
        if not p.is_file() or n is None:
            return None
        try:
            with open_h5(p, "a netCDF-4 (HDF5) file of posterior draws") as f:
                g = f.get("sample_stats")
                if isinstance(g, h5py.Group) and isinstance(g.get("cone_radius_deg"), h5py.Dataset):
                    return self._cones_arviz(p, g, n)
                return self._cones_by_name(p, f, n, self.stride)
        except DataFormatError:
            raise
        except OSError as exc:
            raise ValueError(f"{_fspath(p)}: expected a netCDF-4 (HDF5) file, got an unreadable file ({exc})") from None

    @staticmethod
    def _in_degrees(ds: h5py.Dataset, values: np.ndarray) -> np.ndarray:
        units = ds.attrs.get("units", "")
        units = (units.decode() if isinstance(units, bytes) else str(units)).lower()
        leaf = ds.name.rsplit("/", 1)[-1].lower()
        deg = "deg" in units or ("rad" not in units and "deg" in leaf)
        return values if deg else np.degrees(values)

    def _cones_arviz(self, p: Path, g: h5py.Group, n: int) -> dict[str, Any]:
        from bayes_spi.dataio.h5 import quaternions_to_rotations

        rd = g["cone_radius_deg"]
        if rd.ndim != 2:
            raise ValueError(f"{_fspath(p)}: field /sample_stats/cone_radius_deg: expected dims (pattern, "
                             f"credible_mass), got shape {rd.shape}")
        m = rd.shape[0]
        levels = np.asarray(g["credible_mass"][()], dtype=np.float64) if "credible_mass" in g else np.array([0.5, 0.9])
        levels = np.where(levels > 1.0, levels / 100.0, levels)
        cols = {lv: np.nonzero(np.isclose(levels, lv))[0] for lv in (0.5, 0.9)}
        if levels.shape != (rd.shape[1],) or any(c.size == 0 for c in cols.values()):
            raise ValueError(f"{_fspath(p)}: field /sample_stats/credible_mass: expected levels including 0.5 and "
                             f"0.9 for the {rd.shape[1]} columns of cone_radius_deg, got {levels.tolist()}")
        c50, c90 = int(cols[0.5][0]), int(cols[0.9][0])
        pat = g["pattern"] if "pattern" in g else None
        if pat is not None and pat.shape != (m,):
            raise ValueError(f"{_fspath(p)}: field /sample_stats/pattern: expected {m} indices in [0, {n}) "
                             f"(the patterns of {_fspath(self.files.path('posterior'))}), got shape {pat.shape}")
        rm = g.get("cone_radius_mod_rotz_deg")
        rm = rm if isinstance(rm, h5py.Dataset) and rm.shape == rd.shape else None
        qd = g.get("mean_pose_quaternion")
        qd = qd if isinstance(qd, h5py.Dataset) and qd.shape == (m, 4) else None
        step = self.stride
        parts: dict[str, list[np.ndarray]] = {"index": [], "r50": [], "r90": [], "r90_mod": [], "q": []}
        for a in range(0, m, READ_CHUNK):  # only the patterns of used_index are kept
            rows = slice(a, min(m, a + READ_CHUNK))
            idx = np.arange(rows.start, rows.stop) if pat is None else np.asarray(pat[rows], dtype=np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise ValueError(f"{_fspath(p)}: field /sample_stats/pattern: expected {m} indices in [0, {n}) "
                                 f"(the patterns of {_fspath(self.files.path('posterior'))}), got "
                                 f"{int(idx.min())}..{int(idx.max())}")
            keep = idx % step == 0
            r = self._in_degrees(rd, np.asarray(rd[rows], dtype=np.float64)[keep])
            parts["index"].append(idx[keep])
            parts["r50"].append(r[:, c50])
            parts["r90"].append(r[:, c90])
            if rm is not None:
                parts["r90_mod"].append(self._in_degrees(rm, np.asarray(rm[rows], dtype=np.float64)[keep])[:, c90])
            if qd is not None:
                parts["q"].append(np.asarray(qd[rows], dtype=np.float64)[keep])

        def cat(key: str, shape: tuple[int, ...]) -> np.ndarray:
            return np.concatenate(parts[key]) if parts[key] else np.zeros((0, *shape))

        R_center = None if qd is None else quaternions_to_rotations(cat("q", (4,)))
        label = RunDir.name("posterior_nc") + (f", {m:,} of {n:,} patterns" if m < n else "")
        return {"r50": cat("r50", ()), "r90": cat("r90", ()), "r90_mod": None if rm is None else cat("r90_mod", ()),
                "index": cat("index", ()).astype(np.int64), "R_center": R_center, "label": label,
                "source": "posterior.nc: sample_stats/cone_radius_deg around the posterior mean pose"
                          + (f" ({m:,} of {n:,} patterns)" if m < n else "")}

    @classmethod
    def _cones_by_name(cls, p: Path, f: h5py.File, n: int, step: int = 1) -> dict[str, Any] | None:
        from bayes_spi.dataio.h5 import read_rows

        found: dict[str, np.ndarray] = {}
        names: dict[str, str] = {}

        def visit(name: str, obj: Any) -> None:
            leaf = name.rsplit("/", 1)[-1].lower()
            if not isinstance(obj, h5py.Dataset) or "cone" not in leaf:
                return
            level = "r50" if "50" in leaf else "r90" if "90" in leaf else None
            if level is None or level in found:
                return
            if tuple(d for d in obj.shape if d != 1) != (n,):  # (n,) up to axes of length 1: checked unread
                return
            if obj.shape[0] == n:  # (n,) or (n, 1, ...)
                a = np.asarray(read_rows(obj, slice(None, None, step), READ_CHUNK)).reshape(-1)
            else:  # (1, n) and the like
                a = np.asarray(obj[()]).reshape(-1)[::step]
            found[level] = cls._in_degrees(obj, np.asarray(a, dtype=np.float64))
            names[level] = name

        f.visititems(visit)
        if "r50" not in found or "r90" not in found:
            return None
        return {"r50": found["r50"], "r90": found["r90"], "r90_mod": None, "index": np.arange(0, n, step),
                "R_center": None, "source": f"{RunDir.name('posterior_nc')}: {names['r50']}, {names['r90']}",
                "label": RunDir.name("posterior_nc")}

    @cached_property
    def calibration(self) -> dict[str, Any] | None:
        """Orientation error (mod ``Rz(pi)``) of each pattern's cone centre against the truth, beside its 90% cone
        radius: ``{"errors_deg" (M,), "r90_deg" (M,), "centre": str}`` (the patterns of :attr:`cones`); None without
        truth or cones.

        The centre is the pose the cones are drawn around (posterior.nc's mean pose, else posterior.h5's most
        probable hypothesis), aligned with the same global rotation ``G`` (mod ``Rz(pi)``) as everything else.
        """
        al, cones = self.alignment, self.cones
        if al is None or cones is None:
            return None
        pos = cones["index"] // self.stride  # the cones' patterns are among used_index: rows of the arrays here
        r90 = cones["r90_mod"] if cones["r90_mod"] is not None else cones["r90"]
        if cones["R_center"] is None:
            return {"errors_deg": al["errors_mod_rotz_pi_deg"][pos], "r90_deg": r90,
                    "centre": "most probable hypothesis"}
        G, Rc, Rt = al["G_mod_rotz_pi"], cones["R_center"], self.truth["R"][pos]
        e = np.minimum(geodesic_deg(G @ Rc, Rt), geodesic_deg(G @ Rc @ rotz_pi_numpy(), Rt))
        return {"errors_deg": e, "r90_deg": r90, "centre": "posterior mean pose"}
