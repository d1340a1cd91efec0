"""Final outputs of a fit: the trained model, the 3D intensity on a grid, per-image posteriors.

Files written into the run directory (each to a temporary name first, then renamed, so a file that
exists is complete):

- ``model.pt``: ``{"config", "geometry", "model", "guide", "version"}`` state dicts; reload with
  :func:`load_trained`.
- ``intensity.mrc``: ``I(q)`` on an ``(n, n, n)`` cube centred on ``q = 0``; the MRC voxel size is the
  grid spacing **in 1/A** (not A: this is reciprocal space) and the origin is set so the centre voxel
  is ``q = 0``. MRC data order is ``[z, y, x]``.
- ``intensity.h5``: ``/intensity`` ``(n, n, n)`` float32 indexed ``[ix, iy, iz]`` with attrs
  ``voxel_size_inv_A``, ``centre_index``, ``axis_order = "x,y,z"``.
- ``posterior.h5``: per pattern ``i`` (rows in file order):
  ``pose_quaternion (N, 4)`` the most probable hypothesis' centre (scalar-first, same convention
  as the data file's truth: pixel samples ``I(R q)``), ``pose_sigma_rad (N, 3)`` its tangent-space
  spread, ``hypothesis_quaternions (N, K, 4)``, ``hypothesis_sigma_rad (N, K, 3)``,
  ``hypothesis_weights (N, K)`` (by default ``K = 4`` local modes: the guide's two best hypotheses and their
  Rz(pi) twins refined on all good pixels, with Laplace spreads and weights, attr ``refined = 1``; with
  ``refine=0`` the guide's raw hypotheses, attr ``n_encoder_hypotheses``: the first ones come from the
  encoder, the rest from the orientation search), ``scale_mean (N,)``, ``scale_sd (N,)`` (LogNormal moments).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import contextlib
import logging
import os
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from bayes_spi import __version__
from bayes_spi.atomic import atomic_path
from bayes_spi.dataio.h5 import SPIDataset
from bayes_spi.grid import grid_q
from bayes_spi.guides.amortized import AmortizedGuide
from bayes_spi.infer.rundir import FORMAT_VERSION_KEY, RunDir
from bayes_spi.models.fields import IntensityField
from bayes_spi.mrc import write_mrc
from bayes_spi.so3 import rotmat_to_quat_wxyz

if TYPE_CHECKING:  # bayes_spi.posterior imports SciPy: only where it is used
    from bayes_spi.guides.amortized import PosePosterior
    from bayes_spi.posterior.local import LocalModes

__all__ = ["PoseRefiner", "Throughput", "field_log_cache", "field_on_grid", "grid_q", "refine_cache_grid",
           "write_intensity", "write_posterior"]

log = logging.getLogger("bayes_spi")


@torch.no_grad()
def field_on_grid(field: IntensityField, n: int, q_max: float, rotation: np.ndarray | None = None,
                  chunk: int = 65536) -> tuple[np.ndarray, float]:
    """``I(q)`` on the grid of :func:`grid_q` (optionally at ``rotation @ q``): ``(n, n, n)`` float64, ``dq``."""
    q, dq = grid_q(n, q_max)
    flat = torch.as_tensor(q.reshape(-1, 3), dtype=torch.float32)
    if rotation is not None:
        flat = flat @ torch.as_tensor(rotation, dtype=torch.float32).T
    dev = next(field.parameters()).device
    out = torch.cat([field(flat[i:i + chunk].to(dev)).double().cpu() for i in range(0, flat.shape[0], chunk)])
    return out.reshape(n, n, n).numpy(), dq


def write_intensity(volume: np.ndarray, dq: float, run_dir: str | os.PathLike, stem: str = "intensity") -> tuple[Path, Path]:
    """Write ``volume (n, n, n)`` (indexed ``[ix, iy, iz]``) as ``stem.mrc`` and ``stem.h5``."""
    run_dir = Path(run_dir)
    n = volume.shape[0]
    mrc_path, h5_path = run_dir / f"{stem}.mrc", run_dir / f"{stem}.h5"
    write_mrc(mrc_path, volume, dq, "bayes-spi intensity I(q); voxel size and origin in 1/A")
    with atomic_path(h5_path) as tmp:
        with h5py.File(tmp, "w") as f:
            d = f.create_dataset("intensity", data=volume.astype(np.float32), compression="gzip")
            d.attrs.update({"voxel_size_inv_A": dq, "centre_index": n // 2, "axis_order": "x,y,z",
                            "software_version": __version__})
    return mrc_path, h5_path


def refine_cache_grid(guide: AmortizedGuide) -> int:
    """Voxels per side of the ``log I`` cube the export refines poses on: twice as fine as the search's cube."""
    base = guide.search.cache_grid if guide.search is not None else 41
    return int(min(2 * base - 1, 129))


@torch.no_grad()
def field_log_cache(field: IntensityField, n: int, q_max: float, chunk: int = 65536) -> torch.Tensor:
    """``log I`` on the ``n^3`` cube over ``[-q_max, q_max]^3`` (:func:`~bayes_spi.guides.search.cube_points`), ``(1, 1, n, n, n)``."""
    from bayes_spi.guides.search import cube_points

    dev = next(field.parameters()).device
    pts = cube_points(n, q_max, dev)
    out = torch.cat([field.log_intensity(pts[i:i + chunk]) for i in range(0, pts.shape[0], chunk)])
    return out.reshape(1, 1, n, n, n)


class PoseRefiner:
    """The guide's hypotheses refined on the final field: the step ``posterior.h5`` and the verdict share.

    The guide proposes (encoder heads, orientation search; its own hypothesis scores are skipped: they
    are replaced), then its ``ceil(n_keep / 2)`` best proposals and their Rz(pi) twins are moved to their
    modes on all good pixels of a ``log I`` cube twice as fine as the search's, first on the inner half of ``|q|``
    (:func:`bayes_spi.posterior.local.refine_with_twins`, ``polish.REFINE_COARSE``), with Laplace spreads and
    evidence weights.

    Args:
        guide: a guide with an orientation search (its model and cube).
        pixels: ``(M,)`` flat indices of the pixels refined on (default: the guide's good pixels).

    Raises:
        ValueError: the guide has no orientation search.
    """

    def __init__(self, guide: AmortizedGuide, pixels: torch.Tensor | None = None) -> None:
        model = guide.search.model if guide.search is not None else None
        if model is None:
            raise ValueError("refine: expected a guide with an orientation search (its model and cube), got none; "
                             "use refine=0")
        self.guide = guide
        self.model = model
        self.pixels = (torch.nonzero(guide.mask.reshape(-1)).squeeze(-1) if pixels is None else pixels)
        self.q = model.q[self.pixels]
        self.log_w = model.log_pixel_factor[self.pixels]
        self.q_max = model.q_max
        self.cache = field_log_cache(model.field, refine_cache_grid(guide), self.q_max)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, search_pixels: torch.Tensor | None = None, n_keep: int = 4,
                 indices: torch.Tensor | None = None) -> "tuple[LocalModes, torch.Tensor, PosePosterior]":
        """Refine ``images (B, n_y, n_x)``: ``(LocalModes (B, n_keep), weights (B, n_keep), guide posterior)``.

        ``search_pixels``: the pixels the orientation search scores on (default: the refinement's).
        ``indices``: ``(B,)`` the patterns' indices in the data (a per-pattern background scale; without
        them, or for a global scale, the model's background rate as for any pattern).
        """
        from bayes_spi.infer.polish import REFINE_COARSE
        from bayes_spi.posterior.local import refine_with_twins

        with self.guide.evaluating():
            post = self.guide.posterior(images, self.pixels if search_pixels is None else search_pixels, score=False)
        y = images.reshape(images.shape[0], -1)[:, self.pixels].to(self.q.dtype)
        bg = None
        if getattr(self.model, "background", None) is not None:
            bg = self.model.background_rate(self.pixels, indices) if indices is not None else \
                self.model.background_rate(self.pixels)
        modes, weights = refine_with_twins(self.cache, post.rotations, self.q, self.log_w, y, self.q_max,
                                           n_keep=n_keep, bg=bg, coarse_to_fine=REFINE_COARSE)
        return modes, weights, post


class Throughput:
    """Progress of a long pass over patterns as log lines: done/total, patterns/s, ETA (at most every ``every`` s).

    Args:
        what: the name in the lines (e.g. ``"posterior.h5"``).
        total: patterns in the pass.
        every: seconds between lines (the last line is always written by :meth:`finish`).
    """

    def __init__(self, what: str, total: int, every: float = 30.0) -> None:
        self.what, self.total, self.every = what, int(total), float(every)
        self.t0 = time.perf_counter()
        self._last = self.t0
        self.done = 0

    def update(self, done: int) -> None:
        self.done = int(done)
        now = time.perf_counter()
        if now - self._last >= self.every and self.done < self.total:
            self._last = now
            log.info("%s", self.line())

    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.t0, 1e-9)

    def line(self) -> str:
        rate = self.rate()
        eta = (self.total - self.done) / max(rate, 1e-9)
        return (f"{self.what}: {self.done}/{self.total} patterns, {rate:.1f} patterns/s, "
                f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")

    def finish(self) -> str:
        wall = time.perf_counter() - self.t0
        msg = f"{self.what}: {self.done} patterns in {wall:.1f} s ({self.rate():.1f} patterns/s)"
        log.info("%s", msg)
        return msg


@torch.no_grad()
def write_posterior(guide: AmortizedGuide, dataset: SPIDataset, path: str | os.PathLike,
                    batch_size: int = 512, device: torch.device | str = "cpu", score_pixels: int = 512,
                    seed: int = 0, attrs: dict[str, Any] | None = None, refine: int = 4,
                    progress: Any = None, chunk: int = 4096, max_points: int = 2**22) -> Path:
    """Stream the data set through the guide and write per-image posterior summaries (see module doc).

    With ``refine > 0`` (the default) the guide's hypotheses are only seeds: its ``refine // 2`` best
    and their Rz(pi) twins are moved to their modes on all good pixels and weighted by their Laplace
    evidences (:class:`PoseRefiner`, :func:`bayes_spi.posterior.local.refine_with_twins`, on a ``log I`` cube
    twice as fine as the search's); ``K = refine`` hypotheses per pattern are written, with Laplace spreads.
    The guide's own hypothesis scores are then skipped (the refinement replaces them), and the search
    proposes on all good pixels, or a fixed random subset when its table ``G x M`` would exceed
    :data:`~bayes_spi.guides.search.SEARCH_TABLE_NUMBERS` (:func:`~bayes_spi.guides.search.search_pixels_for`;
    ``score_pixels`` is not used). With ``refine = 0`` the guide's own
    hypotheses are written as they are: then the hypothesis weights (and the search proposals) are evaluated
    on that subset (0: all good pixels).

    Memory does not grow with the data set: patterns are read ``batch_size`` at a time (fewer on a large
    detector: at most ``max_points`` pattern x hypothesis x pixel points per batch, ~0.5 GB of work arrays at
    the default, so 128x128 patterns go ~25 at a time and 32x32 ones 400) and the rows are
    written in ``chunk``-pattern HDF5 chunks (gzip) of datasets allocated up front; the file is written to
    ``PATH.tmp`` and renamed when complete. ``progress(done, total)`` is called after each batch, and
    ``run.log`` gets a line with patterns/s and the ETA every 30 s and the throughput at the end. The file's
    attributes ``mean_best_weight`` and ``ambiguous_fraction`` (patterns whose best hypothesis has weight
    < 0.9) say how decisive the poses are; ``patterns_per_s`` records the export's throughput.
    """
    path = Path(path)
    n = dataset.n_patterns
    k = int(refine) if refine > 0 else guide.n_hypotheses
    all_good = torch.nonzero(guide.mask.reshape(-1)).squeeze(-1)
    good = all_good
    if 0 < score_pixels < good.numel():
        pick = torch.randperm(good.numel(), generator=torch.Generator().manual_seed(seed))[:score_pixels]
        good = good[pick.to(good.device)].sort().values
    refiner = PoseRefiner(guide, all_good) if refine > 0 else None
    # the search on every good pixel, or as many as its precomputed table allows (one matrix product per batch;
    # one field's search, not a class search)
    search_pixels: Any = (guide.search.fixed_pixels(all_good, seed)
                          if refiner is not None and hasattr(guide.search, "fixed_pixels")
                          else contextlib.nullcontext(all_good))
    batch_size = max(1, min(int(batch_size), max_points // max(1, guide.n_hypotheses * int(all_good.numel()))))
    how = ("local modes: the guide's best hypotheses (encoder heads and orientation search) and their Rz(pi) "
           "twins, refined by Gauss-Newton on all good pixels (profiled fluence, cached log I); Laplace "
           "spreads and evidence weights" if refine > 0 else
           "first n_encoder_hypotheses from the encoder (its heads, then their Rz(pi) partners), the rest from "
           "the orientation search")
    meter = Throughput(path.name, n)
    rows_per_chunk = max(1, min(int(chunk), n))
    with atomic_path(path) as tmp, search_pixels as search_px:
        with h5py.File(tmp, "w") as f:
            f.attrs.update({FORMAT_VERSION_KEY: RunDir.format_version("posterior"),
                            "software_version": __version__, "source": str(dataset.path),
                            "quaternion_convention": "scalar-first (w, x, y, z); pixel samples I(R @ q)",
                            "n_encoder_hypotheses": 0 if refine > 0 else guide.n_encoder_hypotheses,
                            "score_pixels": int(search_px.numel() if refine > 0 else good.numel()),
                            "refined": int(refine > 0), "hypotheses": how})
            f.attrs.update(attrs or {})
            ds = {name: f.create_dataset(name, shape=shape, dtype="f4", chunks=(rows_per_chunk,) + shape[1:],
                                         compression="gzip")
                  for name, shape in [("pose_quaternion", (n, 4)), ("pose_sigma_rad", (n, 3)),
                                      ("hypothesis_quaternions", (n, k, 4)), ("hypothesis_sigma_rad", (n, k, 3)),
                                      ("hypothesis_weights", (n, k)), ("scale_mean", (n,)), ("scale_sd", (n,))]}
            done, best_w_sum, n_ambiguous = 0, 0.0, 0
            for idx, counts in dataset.iter_batches(batch_size, shuffle=False):
                images = torch.as_tensor(counts, device=device)
                if refiner is not None:
                    # the search proposes on every good pixel (at most SEARCH_TABLE_NUMBERS / G): on a 512-pixel
                    # subset its best grid rotation fell in the Rz(pi) twin's basin for 20% of 2CEX's patterns on
                    # 64x64 at 1e3 photons, 2% on all of them (BENCHMARKS.md); the refinement then never saw the
                    # true basin
                    modes, weights, post = refiner(images, search_px, n_keep=k,
                                                   indices=torch.as_tensor(idx, device=device))
                    rots, sigmas, sd = modes.rotations, modes.sigmas, post.scale_scale
                    mu = modes.log_scale.gather(1, weights.argmax(-1, keepdim=True)).squeeze(1)
                    if rots.shape[1] < k:  # fewer seeds than asked: pad with zero-weight copies
                        pad = k - rots.shape[1]
                        rots = torch.cat([rots, rots[:, :1].expand(-1, pad, -1, -1)], 1)
                        sigmas = torch.cat([sigmas, sigmas[:, :1].expand(-1, pad, -1)], 1)
                        weights = torch.cat([weights, weights.new_zeros(weights.shape[0], pad)], 1)
                else:
                    with guide.evaluating():
                        post = guide.posterior(images, good)
                    rots, sigmas, weights = post.rotations, post.sigmas, post.weights
                    mu, sd = post.scale_loc, post.scale_scale
                best = weights.argmax(-1)
                rows = torch.arange(len(idx), device=best.device)
                quats = rotmat_to_quat_wxyz(rots)
                mean = torch.exp(mu + sd**2 / 2)
                s, e = int(idx[0]), int(idx[-1]) + 1
                ds["pose_quaternion"][s:e] = quats[rows, best].cpu().numpy()
                ds["pose_sigma_rad"][s:e] = sigmas[rows, best].cpu().numpy()
                ds["hypothesis_quaternions"][s:e] = quats.cpu().numpy()
                ds["hypothesis_sigma_rad"][s:e] = sigmas.cpu().numpy()
                ds["hypothesis_weights"][s:e] = weights.cpu().numpy()
                ds["scale_mean"][s:e] = mean.cpu().numpy()
                ds["scale_sd"][s:e] = (mean * torch.sqrt(torch.expm1(sd**2))).cpu().numpy()
                top = weights.max(-1).values
                best_w_sum += float(top.sum())
                n_ambiguous += int((top < 0.9).sum())
                done += len(idx)
                meter.update(done)
                if progress is not None:
                    progress(done, n)
            # truth-free pose summaries: how decisive the hypotheses are (with the true intensity the Rz(pi)
            # twin is decisively worse at ~1e3 photons: benchmarks/oracle_twin.py)
            f.attrs["mean_best_weight"] = best_w_sum / max(done, 1)
            f.attrs["ambiguous_fraction"] = n_ambiguous / max(done, 1)
            f.attrs["patterns_per_s"] = meter.rate()
    meter.finish()
    return path
