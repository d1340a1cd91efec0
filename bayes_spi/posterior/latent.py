"""Per-pattern structure-latent posteriors of a heterogeneous fit, and intensities at chosen latent points.

:func:`latent_posteriors` streams a data file through :class:`~bayes_spi.guides.latent.LatentGuide`
(memory independent of ``N``) and returns, per pattern, ``q(c_i)`` and the mean and sd of ``q(z_i)``
(the class mixture's); :func:`refine_classes` puts the refined class posterior of
:mod:`bayes_spi.posterior.class_refine` in place of ``q(c_i)`` (what ``fit`` exports by default for ``C >= 2``);
:func:`write_latent_posterior` stores them atomically in an HDF5 file::

    /latent/class_probs   (N, C) float32   p(c_i | y_i)                 (only with C >= 2; attr source: refined
                                                                         or guide, see below)
    /latent/guide_class_probs (N, C)       the guide's q(c_i)           (only when class_probs are refined)
    /latent/z_mean        (N, d) float32   E_q[z_i]                     (only with d >= 1)
    /latent/z_sd          (N, d) float32   sd_q[z_i]
    /latent/z_loc         (N, C, d)        per-class q(z_i | c) location and scale
    /latent/z_scale       (N, C, d)
    attrs: n_classes, latent_dim

:func:`intensity_at_latents` evaluates the field of class ``c`` at latent points ``z_j`` on the centred
odd cube of :func:`bayes_spi.grid.grid_q` (e.g. along the first principal axis of the posterior means,
:func:`principal_latent_path`).

Example:
    >>> import numpy as np
    >>> path = principal_latent_path(np.array([[0.0, 0.0], [1.0, 2.0], [2.0, 4.0]]), n_points=3)
    >>> (np.round(path, 3) + 0.0).tolist()
    [[0.0, 0.0], [1.0, 2.0], [2.0, 4.0]]
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from bayes_spi.atomic import atomic_path
from bayes_spi.dataio.h5 import SPIDataset
from bayes_spi.grid import grid_q
from bayes_spi.guides.latent import LatentGuide
from bayes_spi.models.conditional_field import LatentFields

__all__ = ["LatentSummary", "latent_posteriors", "grid_class_posteriors", "refine_classes", "write_latent_posterior",
           "read_latent_posterior", "intensity_at_latents", "principal_latent_path"]


@dataclass
class LatentSummary:
    """Per-pattern latent posteriors (numpy, float32).

    Attributes:
        class_probs: ``(N, C)``.
        z_mean, z_sd: ``(N, d)`` (``(N, 0)`` with no continuous latent).
        z_loc, z_scale: ``(N, C, d)``.
        guide_class_probs: ``(N, C)`` the guide's ``q(c_i)`` when ``class_probs`` are another posterior's.
        class_source: where ``class_probs`` come from: ``guide`` or ``refined``.
    """

    class_probs: np.ndarray
    z_mean: np.ndarray
    z_sd: np.ndarray
    z_loc: np.ndarray
    z_scale: np.ndarray
    guide_class_probs: np.ndarray | None = None
    class_source: str = "guide"

    @property
    def map_class(self) -> np.ndarray:
        """``(N,)`` the most probable class."""
        return self.class_probs.argmax(axis=1)


@torch.no_grad()
def latent_posteriors(guide: LatentGuide, dataset: SPIDataset, batch_size: int = 256,
                      indices: np.ndarray | None = None,
                      progress: Callable[[int, int], None] | None = None) -> LatentSummary:
    """``q(c_i)`` and ``q(z_i)`` of every pattern (or of ``indices``), in file order, batch by batch.

    The class-aware scorer, if attached, is used (all good pixels), as in training.
    """
    idx_all = np.arange(dataset.n_patterns) if indices is None else np.asarray(indices, dtype=np.int64)
    device = guide.mask.device
    was = guide.training
    guide.eval()
    floor, guide.weight_floor = guide.weight_floor, 0.0
    parts: list[tuple[np.ndarray, ...]] = []
    try:
        for start in range(0, len(idx_all), batch_size):
            idx = idx_all[start:start + batch_size]
            images = torch.as_tensor(dataset.read(idx), device=device, dtype=torch.float32)
            post = guide.latent_posterior(images)
            d = guide.latent_dim
            n = len(idx)
            mean = post.latent_mean() if d else images.new_zeros(n, 0)
            sd = post.latent_sd() if d else images.new_zeros(n, 0)
            loc = post.latent_loc if post.latent_loc is not None else images.new_zeros(n, guide.n_classes, 0)
            scale = post.latent_scale if post.latent_scale is not None else images.new_zeros(n, guide.n_classes, 0)
            parts.append(tuple(t.float().cpu().numpy() for t in (post.class_probs, mean, sd, loc, scale)))
            if progress is not None:
                progress(n, len(idx_all))
    finally:
        guide.weight_floor = floor
        guide.train(was)
    cols = [np.concatenate([p[k] for p in parts]) for k in range(5)]
    return LatentSummary(*cols)


@torch.no_grad()
def grid_class_posteriors(model: torch.nn.Module, dataset: SPIDataset, n_rotations: int = 32768,
                          cache_grid: int = 41, latent_per_dim: int = 3, batch_size: int = 64,
                          indices: np.ndarray | None = None) -> np.ndarray:
    """``p(c | y_i)`` ``(N, C)`` of the fitted model by the exact sum over a fine orientation grid of ``n_rotations``
    (and the latent's quadrature points), the fluence profiled out, on every good pixel
    (:class:`~bayes_spi.infer.class_emc.ClassGridMarginal` on its own grid, no encoder).

    Two conformations of one protein differ in speckles a few degrees wide: a pose grid coarser than that blurs
    them alike, so the search's 4,096 orientations classify worse than the fields allow (BENCHMARKS.md: 0.88 on
    a two-state protein, 0.96 with the same fields on 32,768 orientations). Memory: ``batch_size x C x L x
    n_rotations`` responsibilities.
    """
    from bayes_spi.guides.search import orientation_grid
    from bayes_spi.infer.class_emc import ClassGridMarginal

    device = model.q.device
    emc = ClassGridMarginal(model, orientation_grid(n_rotations).to(device, model.q.dtype), cache_grid=cache_grid,
                            latent_per_dim=latent_per_dim)
    pixels = torch.nonzero(torch.as_tensor(dataset.mask.reshape(-1), device=device)).squeeze(-1)
    caches = emc.caches()
    emc.caches = lambda: caches  # type: ignore[method-assign]  # the fields are fixed: one cache for every batch
    idx_all = np.arange(dataset.n_patterns) if indices is None else np.asarray(indices, dtype=np.int64)
    out = []
    for start in range(0, len(idx_all), batch_size):
        images = torch.as_tensor(dataset.read(idx_all[start:start + batch_size]), device=device, dtype=model.q.dtype)
        out.append(emc(images, pixels).class_probs.double().cpu().numpy())
    return np.concatenate(out)


def refine_classes(summary: LatentSummary, class_probs: np.ndarray) -> LatentSummary:
    """``summary`` with ``class_probs (N, C)`` (the refined class posterior) in place of the guide's ``q(c_i)``: the
    per-class ``q(z | y, c)`` stay the guide's, the mixture's mean and sd are recomputed with the new weights
    (law of total variance); the guide's ``q(c_i)`` is kept as ``guide_class_probs``."""
    p = np.asarray(class_probs, dtype=np.float64)
    if p.shape != summary.class_probs.shape:
        raise ValueError(f"expected class probabilities of shape {summary.class_probs.shape}, got shape {p.shape}")
    w = p[..., None]
    loc, scale = summary.z_loc.astype(np.float64), summary.z_scale.astype(np.float64)
    mean = (w * loc).sum(1)
    sd = np.sqrt(np.maximum((w * (scale ** 2 + loc ** 2)).sum(1) - mean ** 2, 0.0))
    return LatentSummary(p.astype(np.float32), mean.astype(np.float32), sd.astype(np.float32), summary.z_loc,
                         summary.z_scale, summary.class_probs, "refined")


def write_latent_posterior(path: str | os.PathLike[str], summary: LatentSummary) -> Path:
    """Write ``summary`` to ``path`` (atomically; layout in the module docstring)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        grp = f.create_group("latent")
        n_classes, latent_dim = summary.class_probs.shape[1], summary.z_mean.shape[1]
        grp.attrs["n_classes"] = n_classes
        grp.attrs["latent_dim"] = latent_dim
        if n_classes > 1:
            ds = grp.create_dataset("class_probs", data=summary.class_probs.astype(np.float32))
            ds.attrs["source"] = summary.class_source
            if summary.guide_class_probs is not None:
                grp.create_dataset("guide_class_probs", data=summary.guide_class_probs.astype(np.float32))
        if latent_dim:
            for name in ("z_mean", "z_sd", "z_loc", "z_scale"):
                grp.create_dataset(name, data=getattr(summary, name).astype(np.float32))
    return Path(path)


def read_latent_posterior(path: str | os.PathLike[str]) -> LatentSummary:
    """Read what :func:`write_latent_posterior` wrote."""
    from bayes_spi.dataio.h5 import DataFormatError
    from bayes_spi.dataio.h5open import open_h5

    with open_h5(path, "a latent posterior file (HDF5)") as f:
        if "latent" not in f:
            raise DataFormatError(path, "/latent", "a group of per-pattern latent posteriors", "missing")
        grp = f["latent"]
        c, d = int(grp.attrs["n_classes"]), int(grp.attrs["latent_dim"])
        n = None
        arrays: dict[str, np.ndarray] = {}
        for name in ("class_probs", "z_mean", "z_sd", "z_loc", "z_scale", "guide_class_probs"):
            if name in grp:
                arrays[name] = np.asarray(grp[name][()])
                n = arrays[name].shape[0]
        if n is None:
            raise DataFormatError(path, "/latent", "class_probs or z_mean", "neither")
        source = str(grp["class_probs"].attrs.get("source", "guide")) if "class_probs" in grp else "guide"
    return LatentSummary(
        arrays.get("class_probs", np.ones((n, 1), np.float32)),
        arrays.get("z_mean", np.zeros((n, d), np.float32)), arrays.get("z_sd", np.zeros((n, d), np.float32)),
        arrays.get("z_loc", np.zeros((n, c, d), np.float32)), arrays.get("z_scale", np.zeros((n, c, d), np.float32)),
        arrays.get("guide_class_probs"), source)


@torch.no_grad()
def intensity_at_latents(fields: LatentFields, z: np.ndarray | None, n: int, q_max: float, cls: int = 0,
                         chunk: int = 8192) -> np.ndarray:
    """``I_c(q; z_j)`` on the centred odd cube of ``n^3`` voxels up to ``q_max``: ``(J, n, n, n)`` float32
    (``J = len(z)``; one volume, ``J = 1``, at the prior mean when ``z`` is ``None``)."""
    if not 0 <= cls < fields.n_classes:
        raise ValueError(f"class: expected 0 <= class < {fields.n_classes}, got {cls}")
    pts = np.zeros((1, fields.latent_dim)) if z is None else np.atleast_2d(np.asarray(z, dtype=np.float64))
    if pts.shape[1] != fields.latent_dim:
        raise ValueError(f"expected latent points of shape (J, {fields.latent_dim}), got shape {pts.shape}")
    q, _ = grid_q(n, q_max)
    field = fields.fields[cls]
    device = field.log_offset.device
    qt = torch.as_tensor(q.reshape(-1, 3), dtype=torch.float32, device=device)
    out = np.empty((len(pts), qt.shape[0]), dtype=np.float32)
    for j, zj in enumerate(pts):
        zt = torch.as_tensor(zj, dtype=torch.float32, device=device) if fields.latent_dim else None
        for start in range(0, qt.shape[0], chunk):
            out[j, start:start + chunk] = field(qt[start:start + chunk], zt).cpu().numpy()
    return out.reshape(len(pts), n, n, n)


def principal_latent_path(z_mean: np.ndarray, n_points: int = 5, quantiles: tuple[float, float] = (0.0, 1.0)
                          ) -> np.ndarray:
    """``n_points`` latent points ``(n_points, d)`` along the first principal axis of the posterior means
    ``z_mean (N, d)``, from the ``quantiles[0]`` to the ``quantiles[1]`` quantile of the projections."""
    z = np.asarray(z_mean, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"expected posterior means of shape (N >= 2, d), got shape {z.shape}")
    centre = z.mean(axis=0)
    _, _, vt = np.linalg.svd(z - centre, full_matrices=False)
    axis = vt[0] * np.sign(vt[0][np.argmax(np.abs(vt[0]))])
    proj = (z - centre) @ axis
    lo, hi = np.quantile(proj, quantiles)
    return centre + np.linspace(lo, hi, n_points)[:, None] * axis
