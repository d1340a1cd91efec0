"""Training a heterogeneous model: the :class:`~bayes_spi.infer.trainer.Trainer` with per-class starting profiles.

A mixture of ``K`` class fields that all start from the same spherically averaged intensity is a symmetric
start: every class explains every pattern equally, the class posteriors stay at ``1/K``, and the fields
receive the same gradients (or one class takes every pattern and the others starve). The usual cure for
mixture models is a data-driven start: :func:`class_radial_profiles` clusters the first patterns by a
rotation-invariant statistic -- the shape of their radial profile (counts per ``|q|`` shell over the
pixel factor, normalised by the pattern's total, in logs) -- by k-means (k-means++ seeding), and each
class field starts from its cluster's spherically averaged intensity. Nothing else is fixed: the classes
then move freely with the data (their anisotropic parts, latents and the class posteriors are learned).

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = np.r_[rng.normal(0, 0.1, (20, 2)), rng.normal(3, 0.1, (20, 2))]
    >>> lab = kmeans(x, 2, seed=0)
    >>> bool(lab[:20].std() == 0 and lab[20:].std() == 0 and lab[0] != lab[-1])
    True
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from bayes_spi.analysis.sampling import radial_profile
from bayes_spi.infer.trainer import Trainer

__all__ = ["HeterogeneousTrainer", "class_radial_profiles", "kmeans"]

log = logging.getLogger("bayes_spi")


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 100, restarts: int = 5) -> np.ndarray:
    """Labels ``(N,)`` of ``x (N, F)`` by Lloyd's k-means with k-means++ seeding, best of ``restarts``."""
    if x.ndim != 2 or len(x) < k:
        raise ValueError(f"expected at least {k} points of shape (N, F), got shape {x.shape}")
    rng = np.random.default_rng(seed)
    best, best_cost = np.zeros(len(x), dtype=np.int64), np.inf
    for _ in range(restarts):
        centres = [x[rng.integers(len(x))]]
        for _ in range(1, k):
            d2 = ((x[:, None] - np.asarray(centres)[None]) ** 2).sum(-1).min(1)
            centres.append(x[rng.choice(len(x), p=d2 / d2.sum()) if d2.sum() > 0 else rng.integers(len(x))])
        c = np.asarray(centres, dtype=np.float64)
        lab = np.zeros(len(x), dtype=np.int64)
        for _ in range(iters):
            lab_new = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
            c = np.stack([x[lab_new == j].mean(0) if np.any(lab_new == j) else c[j] for j in range(k)])
            if np.array_equal(lab_new, lab):
                break
            lab = lab_new
        cost = float(((x - c[lab]) ** 2).sum())
        if cost < best_cost:
            best, best_cost = lab, cost
    return best


def class_radial_profiles(counts: np.ndarray, q_norm: np.ndarray, factor: np.ndarray, k: int, seed: int = 0,
                          n_cluster_shells: int = 12) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Cluster patterns by their radial profile shape; the mean profile of each cluster.

    Args:
        counts: ``(N, P)`` counts on the good pixels.
        q_norm: ``(P,)`` their ``|q|`` (1/A).
        factor: ``(P,)`` their pixel factor (solid angle x polarization).
        k: clusters.

    Returns:
        ``(labels (N,), [(q_centres (S,), log I (S,)) per cluster])``: the profiles as the fields'
        ``set_radial_profile`` takes them (shell means of counts / factor over the cluster's patterns).
    """
    flat = counts.astype(np.float64) / factor[None, :]
    edges = np.linspace(0.0, float(q_norm.max()) * (1 + 1e-9), n_cluster_shells + 1)
    shell = np.clip(np.digitize(q_norm, edges) - 1, 0, n_cluster_shells - 1)
    per_shell = np.stack([flat[:, shell == s].mean(1) for s in range(n_cluster_shells) if np.any(shell == s)], 1)
    shape = np.log(per_shell / per_shell.sum(1, keepdims=True) + 1e-3 / per_shell.shape[1])
    shape = (shape - shape.mean(0)) / np.maximum(shape.std(0), 1e-9)
    labels = kmeans(shape, k, seed=seed)
    n_shells = max(8, int(math.sqrt(len(q_norm))))
    profiles = []
    for j in range(k):
        members = flat[labels == j] if np.any(labels == j) else flat
        qc, prof = radial_profile(q_norm, members.mean(0), n_shells)
        floor = max(float(prof[prof > 0].min()) if np.any(prof > 0) else 1e-12, 1e-30) * 0.5
        profiles.append((qc, np.log(np.maximum(prof, floor))))
    return labels, profiles


class HeterogeneousTrainer(Trainer):
    """:class:`Trainer` whose class fields start from the radial profiles of k-means clusters of the data."""

    @torch.no_grad()
    def initialise_offset(self, n_images: int = 1024) -> None:
        super().initialise_offset(n_images)
        fields = self.model.field
        n_classes = getattr(fields, "n_classes", 1)
        if n_classes < 2:
            return
        _, counts = next(iter(self.dataset.iter_batches(n_images, shuffle=False)))
        good = self._good.cpu().numpy()
        flat = counts.reshape(counts.shape[0], -1)[:, good]
        factor = self.model.log_pixel_factor[self._good].exp().cpu().double().numpy()
        qn = self._qnorm[self._good].cpu().double().numpy()
        labels, profiles = class_radial_profiles(flat, qn, factor, n_classes, seed=self.config.seed)
        for field, (qc, log_i) in zip(fields.fields, profiles):
            field.base.set_radial_profile(torch.as_tensor(qc), torch.as_tensor(log_i))
        log.info("class fields start from k-means clusters of the radial profiles of %d patterns: %s", len(flat),
                 ", ".join(str(int(n)) for n in np.bincount(labels, minlength=n_classes)))
