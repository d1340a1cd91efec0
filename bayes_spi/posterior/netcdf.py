r"""Stream per-pattern posterior draws into an ArviZ-layout netCDF file (opens with ``arviz.from_netcdf``).

The file is netCDF-4 (HDF5, written with h5netcdf), written batch by batch (memory does not grow with
the number of patterns) to ``PATH.tmp`` and renamed when complete. Groups:

``posterior`` (dims ``chain`` = 1, ``draw`` = D, ``pattern`` = N, ``quaternion`` = w,x,y,z, ``rotvec`` = x,y,z)
    ``pose_quaternion (chain, draw, pattern, quaternion)`` unit quaternions, scalar first, ``w >= 0``;
    ``pose_rotvec (chain, draw, pattern, rotvec)`` the same rotations as axis * angle (rad, norm <= pi);
    ``scale (chain, draw, pattern)`` fluence scale (relative: defined up to one global factor);
    ``angle_to_mean_deg (chain, draw, pattern)`` angle of the draw to the pattern's mean pose;
    ``hypothesis_index (chain, draw, pattern)`` which mixture component the draw came from.
``sample_stats`` (per-pattern summaries, no chain/draw dims; ``credible_mass`` = 0.5, 0.9; ``hdi`` = lower, higher)
    ``mean_pose_quaternion``, ``mean_pose_rotvec`` the chordal L2 mean pose (see
    :mod:`bayes_spi.posterior.mixture`); ``cone_radius_deg (pattern, credible_mass)`` radius of the credible
    cone around it, ``cone_radius_mod_rotz_deg`` the same modulo the Rz(pi) twin, ``rotz_flip_mass`` mass
    nearer the twin; ``scale_mean``, ``scale_sd``, ``log_scale_mean``, ``log_scale_sd`` (exact moments),
    ``scale_hdi``, ``scale_eti (pattern, credible_mass, hdi)`` highest-density and equal-tailed intervals;
    ``hypothesis_weights (pattern, hypothesis)``, ``hypothesis_quaternion``, ``hypothesis_sigma_deg
    (pattern, hypothesis, rotvec)`` (marginal tangent standard deviations), ``hypothesis_log_scale_loc``,
    ``hypothesis_log_scale_sd``.
``observed_data``
    ``photons (pattern)`` total counts on good pixels.

A heterogeneous fit (``fit --latent-dim d --classes C``: :mod:`bayes_spi.guides.latent`) adds its per-pattern
structure posteriors (dims ``class`` = C, ``latent`` = d): in ``posterior``, ``latent_z (chain, draw, pattern,
latent)`` draws of ``z`` from ``q(z_i) = sum_c q(c_i) q(z_i | c)`` and ``class_index (chain, draw, pattern)`` the
class of each draw (pattern ``i`` draws from ``numpy.random.default_rng([seed, i, 1])``, a stream apart from
the poses'); in ``sample_stats``, ``class_probs (pattern, class)``, ``latent_mean``, ``latent_sd (pattern,
latent)`` (the class mixture's exact moments) and ``latent_loc``, ``latent_scale (pattern, class, latent)``
(``q(z | c)``, Normal).

Size: about ``N * D * 40`` bytes before compression (e.g. 50,000 patterns x 200 draws: ~400 MB).
``ExportSettings(summaries_only=True)`` (``bayes-spi posterior --summaries-only``) leaves the ``posterior`` group
out: the file holds ``sample_stats`` and ``observed_data`` only (~300 bytes per pattern), still an ArviZ
dataset (``arviz.from_netcdf``, ``xarray.open_datatree``); the summaries are the same numbers.
Coordinates ``pattern`` are the patterns' indices in the data file. Attributes (root and every group)
follow ArviZ (``created_at``, ``arviz_version``, ``inference_library``, ``inference_library_version``) and
record the conventions, the source data file, the run and every setting.

Example::

    trained = load_trained("run1")
    with SPIDataset("data.h5") as ds:
        write_posterior_netcdf(trained, ds, "posterior.nc", n_draws=200)
    idata = arviz.from_netcdf("posterior.nc")
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import h5netcdf
import h5py
import numpy as np
import torch
from torch import Tensor

from bayes_spi import __version__
from bayes_spi.atomic import atomic_path
from bayes_spi.dataio.h5 import SPIDataset
from bayes_spi.posterior.mixture import LEVELS, MixturePosterior, PosteriorDraws, PosteriorSummary, draw, summarize
from bayes_spi.posterior.refine import refine_posterior
from bayes_spi.so3 import rotmat_to_quat_wxyz, rotmat_to_rotvec

__all__ = [
    "DEFAULT_POSE_TEMPERATURE",
    "DEFAULT_SCALE_TEMPERATURE",
    "EXPORT_CACHE_FACTOR",
    "MAX_EXPORT_CACHE_GRID",
    "QUATERNION_CONVENTION",
    "ExportSettings",
    "LatentBatch",
    "PosteriorNetCDFWriter",
    "check_pattern_shape",
    "export_cache_grid",
    "guide_batches",
    "export_batches",
    "export_log_cube",
    "latent_batch",
    "write_posterior_netcdf",
]

QUATERNION_CONVENTION = ("scalar-first (w, x, y, z), w >= 0; R maps lab/detector q to the molecule frame: "
                         "pixel q samples I(R @ q) (as /truth/quaternions of the data file)")
ROTVEC_CONVENTION = "axis * angle (rad), angle in [0, pi]; the same rotation R as the quaternion"
#: pose temperature of the refined posterior, calibrated on simulations (benchmarks/bench_coverage.py,
#: BENCHMARKS.md): the Laplace spreads describe the likelihood given the trained field, whose remaining
#: errors widen the true pose's scatter by about 20% on the foundation benchmark (2CEX, 32x32, 1e4 photons)
DEFAULT_POSE_TEMPERATURE = 1.2
#: log-scale temperature of the refined posterior, calibrated the same way (patterns 0-2047 of that benchmark)
DEFAULT_SCALE_TEMPERATURE = 1.1
#: the default refinement (``refine_on="cache"``) reads ``log I`` from a cube this many times finer than the
#: orientation search's: fine enough that its trilinear interpolation adds no measurable error to the
#: posterior, so the temperatures above (calibrated on the field) hold for it. Measured on 1024 patterns
#: simulated from the demo's fitted model (its field is then exact; BENCHMARKS.md, issue 10): temperatures
#: that make the cones nominal 1.18 / 1.06 (pose / scale) refined on the field, 1.16 / 1.07 on this cube
#: (129^3), but 1.36 / 1.17 on the twice-as-fine cube of ``posterior.h5`` (65^3)
EXPORT_CACHE_FACTOR = 4
#: the largest export cube (voxels per side; 321^3 float32: 132 MB), reached for the largest search cube (81)
MAX_EXPORT_CACHE_GRID = 321

MEAN_POSE_DEFINITION = ("chordal L2 mean: E[R] over the draws projected onto SO(3) (SVD); cones are geodesic "
                        "balls around it whose radius is the quantile of the draws' angles to it")


@dataclass
class ExportSettings:
    """Settings of an export (all recorded as file attributes).

    Attributes:
        n_draws: draws per pattern ``D``.
        batch_size: patterns per batch.
        seed: base seed; pattern ``i`` draws from ``numpy.random.default_rng([seed, i])``.
        score_pixels: good pixels (fixed random subset) for the guide's hypothesis scores and search (0: all).
        refine: refine the guide's best hypotheses by Gauss-Newton + Laplace (:mod:`bayes_spi.posterior.refine`).
        n_refine, n_iter: hypotheses refined per pattern, Gauss-Newton iterations.
        coarse_to_fine: refine first on the pixels inside these fractions of the largest ``|q|``, then on all
            (:func:`~bayes_spi.posterior.refine.refine_posterior`; ``()``: all pixels at once, as before 2026-12-02).
        pose_temperature: multiplies the tangent-space spreads (``None``: :data:`DEFAULT_POSE_TEMPERATURE`
            with ``refine``, 1 without).
        scale_temperature: multiplies the log-scale spreads (``None``: :data:`DEFAULT_SCALE_TEMPERATURE` with
            ``refine``, 1 without).
        levels: credible masses of the cones and intervals.
        max_patterns: export at most this many patterns (``None``: all).
        first_pattern: index of the first pattern exported (patterns ``first_pattern, first_pattern + 1, ...``).
        extra_attrs: more attributes for the file.
        refine_on: ``"cache"`` (the default: ``log I`` read trilinearly from a cube of ``cache_grid^3`` voxels
            filled from the trained field once, 7-10x faster than the field) or ``"field"`` (the trained field
            itself at every Gauss-Newton iteration, exact). The default temperatures hold for both (see
            :data:`EXPORT_CACHE_FACTOR`).
        cache_grid: voxels per side of that cube (odd; ``None``: :func:`export_cache_grid`, four times as fine
            as the orientation search's cube).
        summaries_only: write only the per-pattern summaries (groups ``sample_stats`` and ``observed_data``),
            not the ``posterior`` group of ``n_draws`` draws per pattern (~40 bytes per draw: 8 kB per pattern
            at 200 draws); the summaries (cone radii, HDIs) are still computed from ``n_draws`` draws.
        field_pose_sigma_deg: the pose error of the trained field itself (degrees per tangent axis; ``0``: none),
            added to every hypothesis' tangent covariance after the temperature
            (:meth:`~bayes_spi.posterior.mixture.MixturePosterior.inflated`): measured without a truth by
            :func:`bayes_spi.posterior.fielderror.measure_field_pose_error` (``bayes-spi posterior`` does by default).
        class_posterior: a heterogeneous fit with two or more classes: ``refined`` (the off-grid class posterior of
            :mod:`bayes_spi.posterior.class_refine`, all good pixels), ``guide`` (the encoder's ``q(c_i)``) or
            ``None`` (the fit's own ``class_posterior`` setting: the same as its ``latent_posterior.h5``). The
            pose posterior is given the most probable class of that posterior.
    """

    n_draws: int = 200
    batch_size: int = 128
    seed: int = 0
    score_pixels: int = 512
    refine: bool = True
    n_refine: int = 2
    n_iter: int = 3
    coarse_to_fine: tuple[float, ...] = (0.5,)
    pose_temperature: float | None = None
    scale_temperature: float | None = None
    levels: tuple[float, ...] = LEVELS
    max_patterns: int | None = None
    first_pattern: int = 0
    extra_attrs: dict[str, Any] = field(default_factory=dict)
    summaries_only: bool = False
    refine_on: str = "cache"
    cache_grid: int | None = None
    class_posterior: str | None = None
    field_pose_sigma_deg: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.field_pose_sigma_deg, (int, float)) and 0 <= self.field_pose_sigma_deg < 180):
            raise ValueError(f"expected field_pose_sigma_deg in [0, 180), got {self.field_pose_sigma_deg!r}")
        if self.refine_on not in ("field", "cache"):
            raise ValueError(f"expected refine_on 'field' or 'cache', got {self.refine_on!r}")
        if self.class_posterior not in (None, "refined", "guide"):
            raise ValueError(f"expected class_posterior 'refined', 'guide' or None, got {self.class_posterior!r}")
        if self.cache_grid is not None and (isinstance(self.cache_grid, bool) or int(self.cache_grid) != self.cache_grid
                                            or self.cache_grid < 3 or self.cache_grid % 2 == 0):
            raise ValueError(f"expected cache_grid an odd integer >= 3 or None, got {self.cache_grid!r}")
        for name in ("n_draws", "batch_size", "n_refine"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"expected {name} >= 1 (an integer), got {value!r}")
        if self.n_iter < 0 or self.score_pixels < 0 or self.first_pattern < 0:
            raise ValueError(f"expected n_iter, score_pixels, first_pattern >= 0, got {self.n_iter}, "
                             f"{self.score_pixels}, {self.first_pattern}")
        if self.pose_temperature is None:
            self.pose_temperature = DEFAULT_POSE_TEMPERATURE if self.refine else 1.0
        if self.scale_temperature is None:
            self.scale_temperature = DEFAULT_SCALE_TEMPERATURE if self.refine else 1.0
        if self.max_patterns is not None and self.max_patterns < 1:
            raise ValueError(f"expected max_patterns >= 1 or None, got {self.max_patterns}")
        for name in ("pose_temperature", "scale_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"expected {name} > 0, got {getattr(self, name)}")
        self.coarse_to_fine = tuple(float(c) for c in self.coarse_to_fine)
        if any(not 0 < c < 1 for c in self.coarse_to_fine):
            raise ValueError(f"expected coarse_to_fine fractions in (0, 1), got {self.coarse_to_fine!r}")
        self.levels = tuple(float(p) for p in self.levels)
        if not self.levels or any(not 0 < p < 1 for p in self.levels):
            raise ValueError(f"expected credible masses in (0, 1), got {self.levels!r}")

    def pattern_range(self, n_patterns: int) -> np.ndarray:
        """The exported file indices for a file of ``n_patterns``: ``(N,)`` int64."""
        stop = n_patterns if self.max_patterns is None else min(n_patterns, self.first_pattern + self.max_patterns)
        if self.first_pattern >= stop:
            raise ValueError(f"expected first_pattern < {n_patterns} (the file's patterns), got {self.first_pattern}")
        return np.arange(self.first_pattern, stop, dtype=np.int64)

    def attrs(self) -> dict[str, Any]:
        """The settings as file attributes (plain numbers and strings)."""
        out: dict[str, Any] = {
            "n_draws": int(self.n_draws), "seed": int(self.seed), "score_pixels": int(self.score_pixels),
            "pose_posterior": ("refined: guide hypotheses moved to the likelihood mode (Gauss-Newton), Laplace "
                               "covariances and evidence weights" if self.refine else "amortized guide as trained"),
            "refine": int(self.refine), "n_refine": int(self.n_refine), "n_iter": int(self.n_iter),
            "coarse_to_fine": ",".join(f"{c:g}" for c in self.coarse_to_fine) or "none",
            "pose_temperature": float(self.pose_temperature), "scale_temperature": float(self.scale_temperature),
            "credible_masses": np.asarray(self.levels, dtype=np.float64),
            "summaries_only": int(self.summaries_only), "refine_on": str(self.refine_on),
        }
        if self.refine and self.refine_on == "cache" and self.cache_grid is not None:
            out["cache_grid"] = int(self.cache_grid)
        if self.class_posterior is not None:
            out["class_posterior"] = str(self.class_posterior)
        out["field_pose_sigma_deg"] = float(self.field_pose_sigma_deg)
        out.update(self.extra_attrs)
        return out


def export_cache_grid(guide: Any) -> int:
    """Voxels per side of the ``log I`` cube the default export refines on: :data:`EXPORT_CACHE_FACTOR` times
    as fine as the guide's orientation search cube (``n`` voxels: ``4 (n - 1) + 1``; 41 without a search),
    at most :data:`MAX_EXPORT_CACHE_GRID`."""
    search = getattr(guide, "search", None)
    base = int(search.cache_grid) if search is not None else 41
    return int(min(EXPORT_CACHE_FACTOR * (base - 1) + 1, MAX_EXPORT_CACHE_GRID))


@torch.no_grad()
def export_log_cube(field: Any, n: int, q_max: float, chunk: int = 65536) -> Tensor:
    """``log I`` on the ``n^3`` cube over ``[-q_max, q_max]^3`` for the export's refinement, ``(1, 1, n, n, n)``.

    The values of :func:`bayes_spi.infer.outputs.field_log_cache` (indexed ``[ix, iy, iz]``) wherever a trilinear
    read at ``|x| <= q_max`` can look: the field is evaluated only at voxels within ``q_max + sqrt(3) h`` of the
    origin (``h`` the voxel spacing: ~57% of the cube), one ``x`` plane at a time (no ``n^3 x 3`` array of
    points: 321^3 would be 400 MB); the corners beyond hold the smallest value computed. The export reads at
    rotated detector ``q`` (``|q| <= q_max``, the model's ``q_max`` being the largest pixel ``|q|``).
    """
    dev = next(field.parameters()).device
    ax = torch.linspace(-q_max, q_max, n, device=dev)
    yz = torch.stack(torch.meshgrid(ax, ax, indexing="ij"), dim=-1).reshape(-1, 2)  # (n^2, 2): [iy, iz]
    reach = q_max + 3.0**0.5 * 2.0 * q_max / max(n - 1, 1) + 1e-6 * q_max
    out = torch.full((n, n * n), float("inf"), device=dev)
    for ix in range(n):
        inside = torch.nonzero(ax[ix] ** 2 + (yz**2).sum(-1) <= reach**2).squeeze(-1)
        pts = torch.cat([ax[ix].expand(inside.numel(), 1), yz[inside]], dim=-1)
        for i in range(0, inside.numel(), chunk):
            out[ix, inside[i:i + chunk]] = field.log_intensity(pts[i:i + chunk]).to(out.dtype)
    out[torch.isinf(out)] = out[torch.isfinite(out)].min()
    return out.reshape(1, 1, n, n, n)


def _arviz_attrs() -> dict[str, str]:
    try:
        az_version = metadata.version("arviz")
    except metadata.PackageNotFoundError:
        az_version = ""
    return {
        "created_at": datetime.now(timezone.utc).isoformat(),
        "arviz_version": az_version,
        "inference_library": "bayes-spi (pyro)",
        "inference_library_version": __version__,
    }


def _np(x: Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


@dataclass
class LatentBatch:
    """One batch's structure posteriors of a heterogeneous fit (:class:`~bayes_spi.guides.latent.LatentGuide`).

    Attributes:
        class_probs: ``(B, C)`` ``q(c_i)``.
        loc, scale: ``(B, C, d)`` ``q(z_i | c) = Normal(loc, scale)`` (``d = 0``: no continuous latent).
    """

    class_probs: np.ndarray
    loc: np.ndarray
    scale: np.ndarray

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and sd ``(B, d)`` of the class mixture ``sum_c q(c) q(z | c)`` (law of total variance)."""
        w = self.class_probs[..., None]
        mean = (w * self.loc).sum(1)
        second = (w * (self.scale**2 + self.loc**2)).sum(1)
        return mean, np.sqrt(np.maximum(second - mean**2, 0.0))

    def draw(self, n_draws: int, indices: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``(classes (D, B), z (D, B, d))`` from the mixture; pattern ``i`` uses ``default_rng([seed, i, 1])``."""
        n_b, n_c, n_d = self.loc.shape
        cls = np.zeros((n_draws, n_b), dtype=np.int64)
        z = np.zeros((n_draws, n_b, n_d))
        for b, i in enumerate(np.asarray(indices, dtype=np.int64)):
            rng = np.random.default_rng([int(seed), int(i), 1])
            p = np.asarray(self.class_probs[b], dtype=np.float64)
            cls[:, b] = np.minimum(np.searchsorted(np.cumsum(p / p.sum()), rng.random(n_draws), side="right"), n_c - 1)
            z[:, b] = self.loc[b, cls[:, b]] + self.scale[b, cls[:, b]] * rng.standard_normal((n_draws, n_d))
        return cls, z


def latent_batch(guide: Any, images: Tensor, pixels: Tensor | None = None) -> LatentBatch:
    """The structure posteriors of ``images (B, n_y, n_x)`` under a :class:`~bayes_spi.guides.latent.LatentGuide`
    (evaluation mode, no weight floor; ``pixels`` for its class-aware scores, default all good)."""
    with torch.no_grad(), guide.evaluating():
        lp = guide.latent_posterior(images, pixels)
    return _latent_batch_of(lp)


def _latent_batch_of(lp: Any) -> LatentBatch:
    """:class:`LatentBatch` of a :class:`~bayes_spi.guides.latent.LatentPosterior`."""
    n_b, n_c = lp.class_probs.shape
    empty = np.zeros((n_b, n_c, 0))
    loc = _np(lp.latent_loc).astype(np.float64) if lp.latent_loc is not None else empty
    scale = _np(lp.latent_scale).astype(np.float64) if lp.latent_scale is not None else empty
    return LatentBatch(_np(lp.class_probs).astype(np.float64), loc, scale)


class PosteriorNetCDFWriter:
    """Create the file's groups, dims, coordinates and variables; :meth:`write` fills pattern slices.

    Args:
        path: the file to write (opened directly: wrap in :func:`bayes_spi.atomic.atomic_path`).
        patterns: ``(N,)`` the patterns' indices in the data file (the ``pattern`` coordinate).
        n_draws: ``D``.
        n_hypotheses: ``K``.
        levels: credible masses.
        attrs: extra attributes for the root and every group.
        chunk: patterns per HDF5 chunk.
        summaries_only: no ``posterior`` group (no draws): only ``sample_stats`` and ``observed_data``.

    Batches are written in the file's pattern order (a cursor, no per-pattern index in memory).
    """

    def __init__(self, path: str | os.PathLike[str], patterns: np.ndarray, n_draws: int, n_hypotheses: int,
                 levels: Sequence[float] = LEVELS, attrs: dict[str, Any] | None = None, chunk: int = 128,
                 summaries_only: bool = False, latent_shape: tuple[int, int] | None = None) -> None:
        self.patterns = np.asarray(patterns, dtype=np.int64)
        self.latent_shape = latent_shape  # (C, d) of a heterogeneous fit's structure posteriors, None without
        n = len(self.patterns)
        if n < 1:
            raise ValueError("expected at least one pattern, got 0")
        self.n_draws, self.n_hypotheses, self.levels = int(n_draws), int(n_hypotheses), tuple(levels)
        self._file = h5netcdf.File(path, "w")
        self._next = 0  # the position the next batch must start at
        self.summaries_only = bool(summaries_only)
        base = {**_arviz_attrs(), **(attrs or {})}
        self._file.attrs.update(base)
        chunk = max(1, min(int(chunk), n))
        str_t = h5py.string_dtype()
        d, k = self.n_draws, self.n_hypotheses

        def coords(grp: Any, names: Sequence[str]) -> None:
            values = {"chain": np.zeros(1, dtype=np.int64), "draw": np.arange(d, dtype=np.int64),
                      "pattern": self.patterns, "quaternion": np.array(list("wxyz"), dtype=object),
                      "rotvec": np.array(list("xyz"), dtype=object), "hypothesis": np.arange(k, dtype=np.int64),
                      "credible_mass": np.asarray(self.levels, dtype=np.float64),
                      "hdi": np.array(["lower", "higher"], dtype=object),
                      "class": np.arange(latent_shape[0] if latent_shape else 0, dtype=np.int64),
                      "latent": np.arange(latent_shape[1] if latent_shape else 0, dtype=np.int64)}
            grp.dimensions = {name: len(values[name]) for name in names}
            for name in names:
                val = values[name]
                grp.create_variable(name, (name,), data=val, dtype=str_t if val.dtype == object else val.dtype)

        def var(grp: Any, name: str, dims: tuple[str, ...], dtype: str = "f4", **attrs: Any) -> Any:
            shape = tuple(grp.dimensions[dd].size for dd in dims)
            chunks = tuple(chunk if dd == "pattern" else s for dd, s in zip(dims, shape))
            v = grp.create_variable(name, dims, dtype=dtype, chunks=chunks, compression="gzip",
                                    compression_opts=4, shuffle=True)
            v.attrs.update(attrs)
            return v

        self.post: dict[str, Any] = {}
        if not self.summaries_only:
            post = self._file.create_group("posterior")
            post.attrs.update(base)
            coords(post, ["chain", "draw", "pattern", "quaternion", "rotvec"]
                   + (["latent"] if latent_shape is not None and latent_shape[1] else []))
            cdp = ("chain", "draw", "pattern")
            self.post = {
                "pose_quaternion": var(post, "pose_quaternion", cdp + ("quaternion",),
                                       convention=QUATERNION_CONVENTION),
                "pose_rotvec": var(post, "pose_rotvec", cdp + ("rotvec",), units="rad", convention=ROTVEC_CONVENTION),
                "scale": var(post, "scale", cdp, note="relative fluence scale, defined up to one global factor"),
                "angle_to_mean_deg": var(post, "angle_to_mean_deg", cdp, units="deg"),
                "hypothesis_index": var(post, "hypothesis_index", cdp, dtype="i2"),
            }
            if latent_shape is not None:
                n_c, n_d = latent_shape
                if n_d:
                    self.post["latent_z"] = var(post, "latent_z", cdp + ("latent",),
                                                definition="draws of the structure latent z from sum_c q(c) q(z | c)")
                if n_c > 1:
                    self.post["class_index"] = var(post, "class_index", cdp, dtype="i2",
                                                   definition="the class of the draw, from q(c)")
        stats = self._file.create_group("sample_stats")
        stats.attrs.update(base)
        stats.attrs["note"] = "per-pattern posterior summaries (no chain/draw dimensions)"
        coords(stats, ["pattern", "quaternion", "rotvec", "hypothesis", "credible_mass", "hdi"]
               + ([] if latent_shape is None else ["class"] + (["latent"] if latent_shape[1] else [])))
        p = ("pattern",)
        self.stats = {
            "mean_pose_quaternion": var(stats, "mean_pose_quaternion", p + ("quaternion",),
                                        convention=QUATERNION_CONVENTION, definition=MEAN_POSE_DEFINITION),
            "mean_pose_rotvec": var(stats, "mean_pose_rotvec", p + ("rotvec",), units="rad"),
            "cone_radius_deg": var(stats, "cone_radius_deg", p + ("credible_mass",), units="deg"),
            "cone_radius_mod_rotz_deg": var(stats, "cone_radius_mod_rotz_deg", p + ("credible_mass",), units="deg",
                                            definition="angle to the nearer of the mean and mean @ Rz(pi)"),
            "rotz_flip_mass": var(stats, "rotz_flip_mass", p),
            "scale_mean": var(stats, "scale_mean", p), "scale_sd": var(stats, "scale_sd", p),
            "log_scale_mean": var(stats, "log_scale_mean", p), "log_scale_sd": var(stats, "log_scale_sd", p),
            "scale_hdi": var(stats, "scale_hdi", p + ("credible_mass", "hdi")),
            "scale_eti": var(stats, "scale_eti", p + ("credible_mass", "hdi"), definition="equal-tailed interval"),
            "hypothesis_weights": var(stats, "hypothesis_weights", p + ("hypothesis",)),
            "hypothesis_quaternion": var(stats, "hypothesis_quaternion", p + ("hypothesis", "quaternion"),
                                         convention=QUATERNION_CONVENTION),
            "hypothesis_sigma_deg": var(stats, "hypothesis_sigma_deg", p + ("hypothesis", "rotvec"), units="deg",
                                        definition="marginal tangent-space standard deviations, R = C exp(hat(eps))"),
            "hypothesis_log_scale_loc": var(stats, "hypothesis_log_scale_loc", p + ("hypothesis",)),
            "hypothesis_log_scale_sd": var(stats, "hypothesis_log_scale_sd", p + ("hypothesis",)),
        }
        if latent_shape is not None:
            n_c, n_d = latent_shape
            self.stats["class_probs"] = var(stats, "class_probs", p + ("class",), definition="q(c_i)")
            if n_d:
                pc, pl = p + ("latent",), p + ("class", "latent")
                self.stats.update({
                    "latent_mean": var(stats, "latent_mean", pc, definition="E_q[z_i] of the class mixture"),
                    "latent_sd": var(stats, "latent_sd", pc, definition="sd_q[z_i] of the class mixture"),
                    "latent_loc": var(stats, "latent_loc", pl, definition="mean of q(z_i | c) (Normal)"),
                    "latent_scale": var(stats, "latent_scale", pl, definition="sd of q(z_i | c) (Normal)")})
        obs = self._file.create_group("observed_data")
        obs.attrs.update(base)
        coords(obs, ["pattern"])
        self.obs = {"photons": var(obs, "photons", p, dtype="f8", definition="total counts on good pixels")}

    def write(self, indices: np.ndarray, photons: np.ndarray, post: MixturePosterior, draws: PosteriorDraws,
              summary: PosteriorSummary) -> None:
        """Write one batch: ``indices (B,)`` (file indices, consecutive in the file's ``pattern`` order)."""
        idx = np.asarray(indices, dtype=np.int64)
        if post.n_hypotheses != self.n_hypotheses or draws.rotations.shape[0] != self.n_draws:
            raise ValueError(f"expected {self.n_hypotheses} hypotheses and {self.n_draws} draws, got "
                             f"{post.n_hypotheses} and {draws.rotations.shape[0]}")
        s = self._next
        if s >= len(self.patterns) or int(self.patterns[s]) != int(idx[0]):
            hit = np.flatnonzero(self.patterns == int(idx[0]))  # out of order (rare): look it up
            if not len(hit):
                raise ValueError(f"pattern {int(idx[0])} is not among the file's patterns")
            s = int(hit[0])
        e = s + len(idx)
        if e > len(self.patterns) or not np.array_equal(self.patterns[s:e], idx):
            raise ValueError("expected consecutive patterns in the file's pattern order")
        self._next = e
        if self.post:
            rot = draws.rotations.double()
            self.post["pose_quaternion"][:, :, s:e] = _np(rotmat_to_quat_wxyz(rot))[None]
            self.post["pose_rotvec"][:, :, s:e] = _np(rotmat_to_rotvec(rot))[None]
            self.post["scale"][:, :, s:e] = _np(draws.log_scale.double().exp())[None]
            self.post["angle_to_mean_deg"][:, :, s:e] = np.degrees(_np(summary.angle_to_mean))[None]
            self.post["hypothesis_index"][:, :, s:e] = _np(draws.hypothesis).astype(np.int16)[None]
        st = self.stats
        st["mean_pose_quaternion"][s:e] = _np(rotmat_to_quat_wxyz(summary.mean_rotation))
        st["mean_pose_rotvec"][s:e] = _np(rotmat_to_rotvec(summary.mean_rotation))
        st["cone_radius_deg"][s:e] = np.degrees(_np(summary.cone_radius))
        st["cone_radius_mod_rotz_deg"][s:e] = np.degrees(_np(summary.cone_radius_mod_rotz))
        st["rotz_flip_mass"][s:e] = _np(summary.rotz_flip_mass)
        for name in ("scale_mean", "scale_sd", "log_scale_mean", "log_scale_sd", "scale_hdi", "scale_eti"):
            st[name][s:e] = _np(getattr(summary, name))
        st["hypothesis_weights"][s:e] = _np(post.weights)
        st["hypothesis_quaternion"][s:e] = _np(rotmat_to_quat_wxyz(post.rotations.double()))
        st["hypothesis_sigma_deg"][s:e] = np.degrees(_np(post.pose_sigmas))
        st["hypothesis_log_scale_loc"][s:e] = _np(post.log_scale_loc)
        st["hypothesis_log_scale_sd"][s:e] = _np(post.log_scale_sd)
        self.obs["photons"][s:e] = np.asarray(photons, dtype=np.float64)

    def write_latent(self, indices: np.ndarray, latent: "LatentBatch", seed: int = 0) -> None:
        """Write one batch's structure posteriors (after :meth:`write` of the same ``indices``)."""
        if self.latent_shape is None:
            raise ValueError("expected a writer made with latent_shape=(C, d) for structure posteriors, got none")
        idx = np.asarray(indices, dtype=np.int64)
        probs, loc, scale = latent.class_probs, latent.loc, latent.scale
        n_c, n_d = self.latent_shape
        if probs.shape != (len(idx), n_c) or loc.shape != (len(idx), n_c, n_d) or scale.shape != loc.shape:
            raise ValueError(f"expected class_probs ({len(idx)}, {n_c}) and loc/scale ({len(idx)}, {n_c}, {n_d}), got "
                             f"shapes {probs.shape}, {loc.shape}, {scale.shape}")
        e = self._next
        s = e - len(idx)
        if s < 0 or not np.array_equal(self.patterns[s:e], idx):
            raise ValueError("expected the indices of the batch just written by write()")
        st = self.stats
        st["class_probs"][s:e] = probs
        mean, sd = latent.moments()
        if n_d:
            st["latent_mean"][s:e], st["latent_sd"][s:e] = mean, sd
            st["latent_loc"][s:e], st["latent_scale"][s:e] = loc, scale
        if self.post:
            cls, z = latent.draw(self.n_draws, idx, seed)
            if "latent_z" in self.post:
                self.post["latent_z"][:, :, s:e] = z[None]
            if "class_index" in self.post:
                self.post["class_index"][:, :, s:e] = cls.astype(np.int16)[None]

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "PosteriorNetCDFWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def export_batches(
    batches: Iterable[tuple[np.ndarray, np.ndarray, MixturePosterior]],
    path: str | os.PathLike[str],
    patterns: np.ndarray,
    n_hypotheses: int,
    settings: ExportSettings | None = None,
    attrs: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    latent_shape: tuple[int, int] | None = None,
) -> Path:
    """Draw from and summarise each batch ``(indices (B,), photons (B,), posterior)`` and write the file
    atomically. The temperatures of ``settings`` are applied here. Returns ``path``.

    With ``latent_shape = (C, d)`` each batch carries a fourth element, its :class:`LatentBatch` (a heterogeneous
    fit's structure posteriors), written alongside."""
    settings = settings or ExportSettings()
    path = Path(path)
    all_attrs = {"software_version": __version__, "quaternion_convention": QUATERNION_CONVENTION,
                 "rotvec_convention": ROTVEC_CONVENTION, "mean_pose_definition": MEAN_POSE_DEFINITION,
                 **settings.attrs(), **(attrs or {})}
    with atomic_path(path) as tmp:
        with PosteriorNetCDFWriter(tmp, patterns, settings.n_draws, n_hypotheses, settings.levels, all_attrs,
                                   chunk=settings.batch_size, summaries_only=settings.summaries_only,
                                   latent_shape=latent_shape) as writer:
            for idx, photons, post, *latent in batches:
                post = post.tempered(settings.pose_temperature, settings.scale_temperature)
                post = post.inflated(math.radians(settings.field_pose_sigma_deg) ** 2)
                draws = draw(post, settings.n_draws, idx, seed=settings.seed)
                summary = summarize(post, draws, settings.levels)
                writer.write(idx, photons, post, draws, summary)
                if latent_shape is not None:
                    if not latent:
                        raise ValueError("expected (indices, photons, posterior, LatentBatch) batches with "
                                         "latent_shape, got 3-tuples")
                    writer.write_latent(idx, latent[0], seed=settings.seed)
                if progress is not None:
                    progress(len(idx))
    return path


def _cache_scores(model: Any, log_intensity: Callable[[Tensor], Tensor], gp: Any, images: Tensor, pixels: Tensor
                  ) -> Tensor:
    """The guide's semi-amortized weights ``softmax(logit + log p(y | R_k, s) + log p(R_k))`` ``(B, K)`` with
    ``log I`` from ``log_intensity`` instead of the field (``gp``: the guide's posterior without its scores)."""
    from bayes_spi.models.priors import UniformPosePrior

    R = gp.rotations.transpose(0, 1)  # (K, B, 3, 3)
    q = model.q[pixels]
    log_rate = (gp.scale_loc[:, None] + model.log_pixel_factor[pixels]
                + log_intensity(torch.einsum("kbij,mj->kbmi", R, q)))  # (K, B, M)
    y = images.reshape(images.shape[0], -1)[:, pixels].to(log_rate.dtype)
    ll = model.likelihood(log_rate).log_prob(y).sum(-1)  # (K, B)
    if not isinstance(model.pose_prior, UniformPosePrior):
        ll = ll + model.pose_prior(R.shape[-3]).log_prob(R)
    return torch.softmax(gp.weights.clamp(min=1e-30).log() + ll.T, dim=-1)


def guide_batches(trained: Any, dataset: SPIDataset, settings: ExportSettings,
                  device: torch.device | str = "cpu") -> Iterator[tuple[Any, ...]]:
    """Stream ``dataset`` through the trained guide (and the refinement): ``(indices, photons, posterior)``, and
    for a heterogeneous fit's guide a fourth element, the batch's :class:`LatentBatch`.

    ``trained`` is a :class:`bayes_spi.infer.load.Trained`. The guide's hypothesis scores and search use one
    fixed random subset of ``score_pixels`` good pixels; when the poses are refined on a cube the search
    proposes on every good pixel, or as many as its precomputed table allows
    (:meth:`~bayes_spi.guides.search.OrientationSearch.fixed_pixels`, as
    :func:`bayes_spi.infer.outputs.write_posterior`), and the refinement uses every good pixel.
    """
    guide, model = trained.guide, trained.model
    good = torch.nonzero(guide.mask.reshape(-1)).squeeze(-1)
    score = good
    if 0 < settings.score_pixels < good.numel():
        pick = torch.randperm(good.numel(), generator=torch.Generator().manual_seed(settings.seed))
        score = good[pick[: settings.score_pixels].to(good.device)].sort().values
    patterns = settings.pattern_range(dataset.n_patterns)
    mask = torch.as_tensor(dataset.mask) & guide.mask.cpu()  # the run's mask (e.g. fit's extra mask) too
    log_intensity = None
    hetero = hasattr(guide, "latent_posterior")
    class_cubes: list[Tensor] = []
    on_field = settings.refine_on == "field"
    if settings.refine and settings.refine_on == "cache":
        from bayes_spi.posterior.refine import cached_log_intensity

        grid = settings.cache_grid if settings.cache_grid is not None else export_cache_grid(guide)
        if not hetero:
            log_intensity = cached_log_intensity(export_log_cube(model.field, grid, model.q_max), model.q_max)
        elif int(guide.latent_dim) == 0:  # one cube per class field
            class_cubes = [export_log_cube(f, grid, model.q_max) for f in model.field.fields]
        else:  # a continuous latent has no cube: each pattern is refined on its class's field at its own latent
            on_field = True
    refiner = None
    if hetero and int(getattr(guide, "n_classes", 1)) > 1:
        config = getattr(trained, "config", None)
        choice = settings.class_posterior or getattr(config, "class_posterior", "guide")
        if choice == "refined":
            from bayes_spi.infer.heterogeneous import fit_class_grid
            from bayes_spi.posterior.class_refine import ClassModeRefiner

            rots = fit_class_grid(guide, config)
            refiner = ClassModeRefiner(model, rotations=rots.to(model.q.device), cache_grid=config.cache_grid,
                                       latent_per_dim=config.latent_nodes, symmetry=config.symmetry)
    # the refinement's work arrays grow with patterns x hypotheses x pixels (x the field's width when refined on
    # the field): fewer patterns per batch on a large detector (32x32: 128; 128x128: 32 on the field)
    budget = 2**20 if on_field else 2**22
    step = settings.batch_size
    if settings.refine:
        step = max(1, min(step, budget // max(1, settings.n_refine * int(good.numel()))))
    # refined (on a cube or on the field), the search proposes on every good pixel, or as many as its precomputed
    # table allows: on the guide's 512 score pixels a 128x128 pattern at 1e3 photons holds ~30 photons, and the
    # refinement started from random hypotheses (median error 129 deg on the field, 4 deg on the cube)
    search_pixels: Any = (guide.search.fixed_pixels(good, settings.seed)
                          if settings.refine and hasattr(getattr(guide, "search", None), "fixed_pixels")
                          else contextlib.nullcontext(good))
    with search_pixels as search_px:
        for first in range(0, len(patterns), step):
            idx = patterns[first:first + step]
            counts = torch.as_tensor(dataset.read(idx))
            photons = (counts * mask).sum(dim=(-2, -1)).double().numpy()
            images = counts.to(device)
            if hetero:  # a heterogeneous fit: the pose posterior given each pattern's most probable class
                with torch.no_grad(), guide.evaluating():
                    lp = guide.latent_posterior(images, score)
                if refiner is not None:  # the refined class posterior on every good pixel, as latent_posterior.h5's
                    y = images.reshape(images.shape[0], -1)[:, good]
                    lp = dataclasses.replace(lp, class_probs=refiner(y, good).class_probs.to(lp.class_probs.dtype))
                post, batch_log_intensity = _class_pose_posterior(model, lp, class_cubes)
                if settings.refine:
                    post = refine_posterior(model, images, post, n_refine=min(settings.n_refine, post.n_hypotheses),
                                            n_iter=settings.n_iter, pixels=good, log_intensity=batch_log_intensity,
                                            coarse_to_fine=settings.coarse_to_fine)
                yield idx, photons, post, _latent_batch_of(lp)
                continue
            with torch.no_grad(), guide.evaluating():
                if log_intensity is None:  # the guide as trained, or refined on the field: scored on the field
                    gp = guide.posterior(images, search_px if settings.refine else score)
                else:  # the guide's hypothesis scores on the same cube as the refinement; the search on every good
                    # pixel (on a 512-pixel subset its best grid rotation fell in the Rz(pi) twin's basin for 20% of
                    # 2CEX's patterns on 64x64 at 1e3 photons, and the refinement never saw the true basin)
                    gp = guide.posterior(images, search_px, score=False)
                    if getattr(guide, "_scorer", None):
                        gp.weights = _cache_scores(model, log_intensity, gp, images, score)
                post = MixturePosterior.from_guide(gp)
            if settings.refine:
                post = refine_posterior(model, images, post, n_refine=min(settings.n_refine, post.n_hypotheses),
                                        n_iter=settings.n_iter, pixels=good, log_intensity=log_intensity,
                                        coarse_to_fine=settings.coarse_to_fine)
            yield idx, photons, post


def _class_pose_posterior(model: Any, lp: Any, class_cubes: Sequence[Tensor]
                          ) -> tuple[MixturePosterior, Callable[[Tensor], Tensor]]:
    """A heterogeneous batch's pose posterior and the ``log I`` its refinement reads, both given each pattern's
    most probable class ``c_i = argmax q(c)`` and the mean of ``q(z_i | y_i, c_i)``: the hypotheses weighted by
    ``q(k | c_i)``, and ``log I_{c_i}(x; z_i)`` read from class ``c_i``'s cube (``class_cubes``, one
    ``(1, 1, n, n, n)`` per class, only without a continuous latent) or its field (``lp``: the guide's
    :class:`~bayes_spi.guides.latent.LatentPosterior`)."""
    from bayes_spi.posterior.refine import cached_log_intensity, class_log_intensity

    cls = lp.class_probs.argmax(-1)  # (B,)
    rows = torch.arange(cls.shape[0], device=cls.device)
    gp = dataclasses.replace(lp.pose, weights=lp.hypothesis_weights[rows, cls])
    z = None if lp.latent_loc is None else lp.latent_loc[rows, cls].detach()  # (B, d)
    if class_cubes:
        reads = [cached_log_intensity(cube, model.q_max) for cube in class_cubes]
        fields = [(lambda x, _z, read=read: read(x)) for read in reads]
    else:
        fields = [f.log_intensity for f in model.field.fields]
    return MixturePosterior.from_guide(gp), class_log_intensity(fields, cls, z)


def check_pattern_shape(trained: Any, dataset: Any) -> None:
    """Raise ``ValueError`` (naming the file and field) unless ``dataset``'s patterns have the run's detector shape."""
    shape = tuple(trained.guide.mask.shape)
    if tuple(dataset.shape) != shape:
        raise ValueError(f"{os.fspath(dataset.path)}: field /data/counts: expected patterns of shape {shape} "
                         f"(the run's detector), got {tuple(dataset.shape)}")


def write_posterior_netcdf(
    trained: Any,
    dataset: SPIDataset,
    path: str | os.PathLike[str],
    settings: ExportSettings | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Export the posterior of every pattern of ``dataset`` (or the first ``settings.max_patterns``).

    Args:
        trained: a :class:`bayes_spi.infer.load.Trained` (``load_trained(run)``).
        dataset: the data file the run was fitted on (or another with the same detector).
        path: the output ``.nc`` file (written atomically).
        settings: :class:`ExportSettings`.
        device: torch device of the model and guide.
        progress: called with the number of patterns after each batch.

    Raises:
        ValueError: the data file's pattern shape differs from the run's detector.
    """
    settings = settings or ExportSettings()
    if settings.refine and settings.refine_on == "cache" and settings.cache_grid is None:  # recorded in the file
        settings = dataclasses.replace(settings, cache_grid=export_cache_grid(trained.guide))
    check_pattern_shape(trained, dataset)
    patterns = settings.pattern_range(dataset.n_patterns)
    k = min(settings.n_refine, trained.guide.n_hypotheses) if settings.refine else trained.guide.n_hypotheses
    attrs = {"source_data": os.fspath(Path(dataset.path).resolve()),
             "run": os.fspath(Path(trained.path).resolve().parent),
             "model_file": os.fspath(Path(trained.path).resolve())}
    from bayes_spi.infer.verdict import read_verdict

    try:  # a failed or unconverged fit's posterior says so
        doc = read_verdict(Path(trained.path).resolve().parent)
    except ValueError:
        attrs["fit_verdict"] = "unknown (unreadable verdict.json)"
    else:
        if doc is not None:
            attrs["fit_verdict"] = str(doc.get("status", "unknown"))
            attrs["fit_verdict_reasons"] = "; ".join(str(r) for r in doc.get("reasons", [])) or "none"
    guide = trained.guide
    latent_shape = ((int(guide.n_classes), int(guide.latent_dim)) if hasattr(guide, "latent_posterior") else None)
    if latent_shape is not None:
        attrs["pose_posterior_structure"] = ("given each pattern's most probable class (argmax q(c)) and the mean of "
                                             "q(z | y, c) for it: hypotheses weighted by q(k | c), refined on that "
                                             "class's field at that latent")
        if settings.refine and settings.refine_on == "cache" and latent_shape[1] > 0:
            attrs["refine_on"] = "field"  # a continuous latent has no cube
    return export_batches(guide_batches(trained, dataset, settings, device), path, patterns, k, settings,
                          attrs, progress, latent_shape=latent_shape)
