"""Training a heterogeneous model: the :class:`~bayes_spi.infer.trainer.Trainer` with per-class starting profiles.

A mixture of ``K`` class fields that all start from the same spherically averaged intensity is a symmetric
start: every class explains every pattern equally, the class posteriors stay at ``1/K``, and the fields
receive the same gradients (or one class takes every pattern and the others starve). The usual cure for
mixture models is a data-driven start: :func:`class_radial_profiles` clusters the first patterns by a
rotation-invariant statistic -- the shape of their radial profile (counts per ``|q|`` shell over the
pixel factor inside the detector's inscribed circle, normalised by the pattern's total, in logs, standardised) -- by a Gaussian mixture (full
covariances, EM) on its first 3 principal components (k-means when there are too few patterns), and each
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import torch

from bayes_spi.analysis.sampling import radial_profile
from bayes_spi.atomic import atomic_path
from bayes_spi.guides.amortized import count_hypotheses
from bayes_spi.guides.class_search import ClassOrientationSearch
from bayes_spi.guides.latent import LatentGuide
from bayes_spi.guides.search import orientation_grid
from bayes_spi.infer.class_emc import ClassGridMarginal
from bayes_spi.infer.config import FitConfig
from bayes_spi.infer.latent_start import start_node_log_weights
from bayes_spi.infer.trainer import Trainer
from bayes_spi.models.background import PixelBackground
from bayes_spi.models.fields import IntensityField
from bayes_spi.models.heterogeneous import HeterogeneousSPIModel
from bayes_spi.models.latent import make_class_prior, make_latent_prior
from bayes_spi.models.likelihoods import Likelihood, make_likelihood
from bayes_spi.models.priors import PosePrior, ScalePrior, make_pose_prior, make_scale_prior
from bayes_spi.models.spi import SPIBatch

if TYPE_CHECKING:
    from bayes_spi.posterior.class_refine import RefinedClassSummary

__all__ = ["HeterogeneousTrainer", "build_heterogeneous", "class_radial_profiles", "fit_class_grid", "latent_anneal_beta",
           "gaussian_mixture_labels", "kmeans"]

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


def gaussian_mixture_labels(x: np.ndarray, k: int = 2, seed: int = 0, iters: int = 200) -> np.ndarray:
    """Labels ``(N,)`` of a ``k``-component Gaussian mixture (full covariances) fitted to ``x (N, F)`` by EM, best of
    10 random starts by log likelihood."""
    rng = np.random.default_rng(seed)
    n, d = x.shape
    if n < k * (d + 1):
        raise ValueError(f"expected at least {k * (d + 1)} points of shape (N, {d}) for {k} components, got {n}")
    best, best_ll = np.zeros(n, dtype=np.int64), -np.inf
    for _ in range(10):
        resp = np.zeros((n, k))
        resp[np.arange(n), rng.integers(0, k, n)] = 1.0
        ll = -np.inf
        for _ in range(iters):
            w = resp.sum(0) + 1e-9
            mu = (resp.T @ x) / w[:, None]
            logp = np.empty((n, k))
            for j in range(k):
                diff = x - mu[j]
                cov = (resp[:, j, None] * diff).T @ diff / w[j] + 1e-6 * np.eye(d)
                _, logdet = np.linalg.slogdet(cov)
                logp[:, j] = (np.log(w[j] / n) - 0.5 * logdet
                              - 0.5 * np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff))
            top = logp.max(1, keepdims=True)
            total = top[:, 0] + np.log(np.exp(logp - top).sum(1))
            resp = np.exp(logp - total[:, None])
            new_ll = float(total.sum())
            if new_ll - ll < 1e-8 * abs(new_ll):
                break
            ll = new_ll
        if ll > best_ll:
            best, best_ll = resp.argmax(1), ll
    return best


def class_radial_profiles(counts: np.ndarray, q_norm: np.ndarray, factor: np.ndarray, k: int, seed: int = 0,
                          n_cluster_shells: int = 12, n_components: int = 3, q_limit: float | None = None) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Cluster patterns by their radial profile shape; the mean profile of each cluster.

    Args:
        counts: ``(N, P)`` counts on the good pixels.
        q_norm: ``(P,)`` their ``|q|`` (1/A).
        factor: ``(P,)`` their pixel factor (solid angle x polarization).
        k: clusters.
        q_limit: only pixels with ``|q| <= q_limit`` enter the clustering (the detector's inscribed circle:
            complete shells, whose means do not depend on which corner pixels a shell happens to hold).

    Returns:
        ``(labels (N,), [(q_centres (S,), log I (S,)) per cluster])``: the profiles as the fields'
        ``set_radial_profile`` takes them (shell means of counts / factor over the cluster's patterns).
    """
    flat = counts.astype(np.float64) / factor[None, :]
    inner = q_norm <= (q_limit if q_limit is not None else np.inf)
    if inner.sum() < n_cluster_shells:
        inner = np.ones_like(q_norm, dtype=bool)
    qi, fi = q_norm[inner], flat[:, inner]
    edges = np.linspace(float(qi.min()), float(qi.max()) * (1 + 1e-9), n_cluster_shells + 1)
    shell = np.clip(np.digitize(qi, edges) - 1, 0, n_cluster_shells - 1)
    per_shell = np.stack([fi[:, shell == s].mean(1) for s in range(n_cluster_shells) if np.any(shell == s)], 1)
    shape = np.log(per_shell / per_shell.sum(1, keepdims=True) + 1e-3 / per_shell.shape[1])
    shape = (shape - shape.mean(0)) / np.maximum(shape.std(0), 1e-9)
    u, sv, _ = np.linalg.svd(shape - shape.mean(0), full_matrices=False)
    pcs = u[:, :n_components] * sv[:n_components]
    try:
        labels = gaussian_mixture_labels(pcs, k, seed=seed)
    except (ValueError, np.linalg.LinAlgError):  # too few patterns for a full-covariance mixture
        labels = kmeans(shape, k, seed=seed)
    n_shells = max(8, int(math.sqrt(len(q_norm))))
    profiles = []
    for j in range(k):
        members = flat[labels == j] if np.any(labels == j) else flat
        qc, prof = radial_profile(q_norm, members.mean(0), n_shells)
        floor = max(float(prof[prof > 0].min()) if np.any(prof > 0) else 1e-12, 1e-30) * 0.5
        profiles.append((qc, np.log(np.maximum(prof, floor))))
    return labels, profiles


def latent_anneal_beta(config: FitConfig, step: int, emc_end: int) -> float:
    """The latent tempering exponent at ``step`` of an EMC warm start that ends at ``emc_end``: rising geometrically
    from ``config.latent_anneal_beta`` at step 0 to 1 at ``config.latent_anneal * emc_end``, then 1 (also with no
    continuous latent or ``latent_anneal = 0``).

    Example:
        >>> c = FitConfig(latent_dim=1, latent_anneal=0.5, latent_anneal_beta=0.01)
        >>> [round(latent_anneal_beta(c, s, 100), 3) for s in (0, 25, 50, 90)]
        [0.01, 0.1, 1.0, 1.0]
    """
    end = config.latent_anneal * emc_end
    if config.latent_dim == 0 or end <= 0 or step >= end:
        return 1.0
    return float(config.latent_anneal_beta ** (1.0 - step / end))


def fit_class_grid(guide: Any, config: FitConfig) -> torch.Tensor:
    """The coarse orientation grid ``(G, 3, 3)`` of a heterogeneous fit: its guide's search's, or (without a
    search) the grid that search would have (the fit's ``search_rotations``, ``search_grid``, seed and symmetry)."""
    search = getattr(guide, "search", None)
    if search is not None:
        return search.rotations
    return orientation_grid(config.search_rotations, config.search_grid, config.seed + 12345, config.symmetry)


class HeterogeneousTrainer(Trainer):
    """:class:`Trainer` whose class fields start from the radial profiles of clusters of the data, whose EMC warm
    start is the exact marginal over classes, latent points and orientations
    (:class:`~bayes_spi.infer.class_emc.ClassGridMarginal`), and whose SVI stage proposes poses per class
    (:class:`~bayes_spi.guides.class_search.ClassOrientationSearch`, built by :func:`build_heterogeneous`)."""

    @property
    def emc(self) -> ClassGridMarginal:  # type: ignore[override]
        """The class-aware grid marginal (built on first use, on the search's grid when there is one)."""
        if self._emc is None:
            c = self.config
            rots = fit_class_grid(self.guide, c)
            self._emc = ClassGridMarginal(self.model, rots.to(self.device), cache_grid=c.cache_grid,
                                          latent_per_dim=c.latent_nodes)
        return self._emc

    def emc_step(self, batch: SPIBatch) -> float:
        """As :meth:`Trainer.emc_step`; during the data start of the latent (the first ``config.latent_start`` of
        the EMC stage, :mod:`bayes_spi.infer.latent_start`) each pattern's latent point weights are pulled towards
        its anisotropy score's start latent; during the latent's annealing (the first ``config.latent_anneal``) its
        points' posterior is tempered (:func:`latent_anneal_beta`)."""
        self.emc.latent_beta = latent_anneal_beta(self.config, self.state.step, self.emc_end)
        start = getattr(self, "_latent_start", None)
        if start is not None and self.state.step < int(self.config.latent_start * self.emc_end):
            emc = self.emc
            z0 = start(batch.images).to(emc.nodes.device)
            emc.pattern_log_node_weights = start_node_log_weights(z0, emc.nodes, emc.log_node_weights)
        return super().emc_step(batch)

    @torch.no_grad()
    def _shift_level(self, level_log_scale: float) -> float:
        """As :meth:`Trainer._shift_level`, for every class field (they share the fluence scales)."""
        shift = level_log_scale - self._prior_log_scale()
        if not math.isfinite(shift):
            return 0.0
        for field in getattr(self.model.field, "fields", [self.model.field]):
            field.log_offset.add_(shift)
        return shift

    @torch.no_grad()
    def initialise_offset(self, n_images: int = 1024) -> None:
        super().initialise_offset(n_images)
        fields = self.model.field
        n_classes = getattr(fields, "n_classes", 1)
        start_latent = getattr(fields, "latent_dim", 0) > 0 and self.config.latent_start > 0
        if n_classes < 2 and not start_latent:
            return
        _, counts = next(iter(self.dataset.iter_batches(n_images, shuffle=False)))
        border = self.dataset.geometry.q_inscribed  # also for per-pixel detectors
        if start_latent:
            from bayes_spi.infer.latent_start import AnisotropyScore

            self._latent_start = AnisotropyScore.fit(torch.as_tensor(counts), self.model.q, self._good.reshape(-1),
                                                     q_limit=border)
            log.info("the latent starts from the ring anisotropy of %d patterns for the first %.0f%% of the EMC stage",
                     counts.shape[0], 100 * self.config.latent_start)
        if n_classes < 2:
            return
        good = self._good.cpu().numpy()
        flat = counts.reshape(counts.shape[0], -1)[:, good]
        factor = self.model.log_pixel_factor[self._good].exp().cpu().double().numpy()
        qn = self._qnorm[self._good].cpu().double().numpy()
        labels, profiles = class_radial_profiles(flat, qn, factor, n_classes, seed=self.config.seed,
                                                 q_limit=border)
        for field, (qc, log_i) in zip(fields.fields, profiles):
            field.base.set_radial_profile(torch.as_tensor(qc), torch.as_tensor(log_i))
        log.info("class fields start from clusters of the radial profiles of %d patterns: %s", len(flat),
                 ", ".join(str(int(n)) for n in np.bincount(labels, minlength=n_classes)))

    def refined_class_posteriors(self) -> "RefinedClassSummary":
        """The refined class posterior of every pattern on the final fields (:mod:`bayes_spi.posterior.class_refine`,
        the search's coarse grid, cube and latent points; all good pixels; untempered), batch by batch."""
        import time

        from bayes_spi.posterior.class_refine import refined_class_posteriors

        c = self.config
        rots = fit_class_grid(self.guide, c)
        t0 = time.perf_counter()
        log.info("refining the class posterior of %d patterns off the %d-orientation grid", self.dataset.n_patterns,
                 rots.shape[0])
        was = self.model.training
        self.model.eval()
        try:
            out = refined_class_posteriors(self.model, self.dataset, rotations=rots.to(self.device),
                                           cache_grid=c.cache_grid, latent_per_dim=c.latent_nodes, symmetry=c.symmetry)
        finally:
            self.model.train(was)
        log.info("refined class posterior: %.1f s, class fractions %s", time.perf_counter() - t0,
                 ", ".join(f"{x:.3f}" for x in np.bincount(out.class_probs.argmax(1), minlength=out.class_probs.shape[1])
                           / max(len(out.class_probs), 1)))
        return out

    def save_outputs(self, grid: int = 65, verdict: "object | None" = None) -> dict[str, Path]:
        """``model.pt``, ``intensity.*`` (class 0 at the prior mean ``z = 0``), ``posterior.h5`` (the guide's pose
        hypotheses as they are: no local refinement on a cube), plus
        ``latent_posterior.h5`` (per-pattern ``q(c_i)``, ``q(z_i)``: :mod:`bayes_spi.posterior.latent`; with
        ``config.class_posterior = "refined"``, the default, and two or more classes the class probabilities are the
        refined posterior of :meth:`refined_class_posteriors`, the guide's kept beside them) and
        ``intensity_latent.h5``: ``/class_<c>/intensity`` ``(J, n, n, n)`` for every class at ``J = 5`` points
        ``/class_<c>/z`` ``(J, d)`` along the first principal axis of the posterior means (5% to 95%), or at
        ``z = 0`` without a continuous latent; ``intensity_class<c>.mrc``/``.h5`` (every class's intensity at the
        mean of ``q(z | y, c)`` over the patterns most probably of class ``c``, as ``intensity.*``: to phase or
        compare one state); and ``report/latent.png``, the latent space coloured by the data
        file's ``/truth/latent`` or ``/truth/class`` when it has them (:mod:`bayes_spi.report.latent`)."""
        from bayes_spi.posterior.latent import (
            intensity_at_latents,
            latent_posteriors,
            principal_latent_path,
            refine_classes,
            write_latent_posterior,
        )

        from bayes_spi import __version__
        from bayes_spi.infer.outputs import field_on_grid, write_intensity, write_posterior
        from bayes_spi.infer.rundir import FORMAT_VERSION_KEY, RunDir
        from bayes_spi.infer.trainer import atomic_torch_save

        self.guide.weight_floor = 0.0
        if self.guide.search is not None:
            self.guide.search.refresh()  # search against the final fields
        run = RunDir(self.run_dir)
        atomic_torch_save(
            {FORMAT_VERSION_KEY: RunDir.format_version("model"), "version": __version__, "config": self.config.to_dict(),
             "geometry": self.dataset.geometry.to_dict(),
             "mask": self.dataset.mask, "model": self.model.state_dict(), "guide": self.guide.state_dict(),
             "state": self.state.__dict__}, run.path("model"))
        vol, dq = field_on_grid(self.model.field, grid, self._q_max)
        mrc, h5 = write_intensity(vol, dq, self.run_dir)
        attrs = {}
        if verdict is not None:
            attrs = {"fit_verdict": verdict.status, "fit_verdict_reasons": "; ".join(verdict.reasons) or "none"}
        # the guide's own pose hypotheses (no local refinement on a cube), weights before class conditioning: the
        # class-conditioned ones are in latent_posterior.h5's model, per class
        post = write_posterior(self.guide, self.dataset, run.path("posterior"), device=self.device, attrs=attrs,
                               refine=0)
        out: dict[str, Path] = {"model": run.path("model"), "intensity_mrc": mrc, "intensity_h5": h5, "posterior": post}
        summary = latent_posteriors(self.guide, self.dataset)
        if self.config.class_posterior == "refined" and getattr(self.model, "n_classes", 1) > 1:
            summary = refine_classes(summary, self.refined_class_posteriors().class_probs)
        out["latent_posterior"] = write_latent_posterior(self.run_dir / "latent_posterior.h5", summary)
        fields = self.model.field
        path = self.run_dir / "intensity_latent.h5"
        class_volumes: list[tuple[int, np.ndarray]] = []
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            for cls in range(fields.n_classes):
                members = summary.map_class == cls
                if fields.latent_dim and members.sum() >= 2:
                    z = principal_latent_path(summary.z_mean[members], 5, (0.05, 0.95))
                else:
                    z = np.zeros((1, fields.latent_dim))
                grp = f.create_group(f"class_{cls}")
                vol = intensity_at_latents(fields, z, grid, self._q_max, cls)
                ds = grp.create_dataset("intensity", data=vol, compression="gzip", compression_opts=4)
                ds.attrs["voxel_size_inv_A"] = float(self._q_max / (grid // 2))
                ds.attrs["axis_order"] = "j,x,y,z"
                grp.create_dataset("z", data=z.astype(np.float32))
                grp.attrs["n_patterns"] = int(members.sum())
                z_c = (summary.z_loc[members, cls].mean(0) if fields.latent_dim and members.any()
                       else np.zeros(fields.latent_dim))
                grp.attrs["members_mean_z"] = np.asarray(z_c, dtype=np.float64)
                class_volumes.append((cls, intensity_at_latents(fields, z_c[None], grid, self._q_max, cls)[0]))
        out["intensity_latent"] = path
        for cls, vol in class_volumes:  # one volume per class, as intensity.* (`bayes-spi phase RUN/intensity_classC.h5`)
            out[f"intensity_class{cls}_mrc"], out[f"intensity_class{cls}_h5"] = write_intensity(
                vol, dq, self.run_dir, stem=f"intensity_class{cls}")
        from bayes_spi.report.latent import latent_figure
        from bayes_spi.sim.ensemble import read_truth_labels

        truth_latent, truth_class = read_truth_labels(self.dataset.path)
        out["latent_figure"] = latent_figure(summary, self.run_dir / "report" / "latent.png", truth_latent, truth_class)
        return out


def build_heterogeneous(field: IntensityField, q: torch.Tensor, factor: torch.Tensor, mask: torch.Tensor,
                        config: FitConfig, device: torch.device | str = "cpu", *, pose_prior: PosePrior | None = None,
                        scale_prior: ScalePrior | None = None, likelihood: Likelihood | None = None,
                        background: PixelBackground | None = None, pixel_q: torch.Tensor | None = None
                        ) -> tuple[HeterogeneousSPIModel, LatentGuide]:
    """The heterogeneous model and guide of ``config`` (``latent_dim``, ``n_classes``, their priors) on ``device``,
    the guide given the model's class-aware scorer (see :func:`bayes_spi.infer.build.build_model_and_guide`; ``pixel_q``
    ``(n_y, n_x, 3)`` for a detector given by pixel positions, as there)."""
    if config.intensity_prior.get("name", "none") != "none":
        raise ValueError("fit setting intensity_prior: expected none with latent_dim > 0 or n_classes > 1, got "
                         f"{config.intensity_prior.get('name')!r}")
    model = HeterogeneousSPIModel(
        field, q, factor,
        pose_prior=pose_prior if pose_prior is not None else make_pose_prior(config.pose_prior),
        scale_prior=scale_prior if scale_prior is not None else make_scale_prior(config.scale_prior),
        likelihood=likelihood if likelihood is not None else make_likelihood(config.likelihood),
        n_hypotheses=count_hypotheses(config.n_heads, config.n_search * config.n_classes), latent_dim=config.latent_dim, n_classes=config.n_classes,
        latent_prior=make_latent_prior(config.latent_prior, config.latent_dim) if config.latent_dim else None,
        class_prior=make_class_prior(config.class_prior, config.n_classes) if config.n_classes > 1 else None,
        background=background, latent_rule=config.latent_rule).to(device)
    search = None
    if config.n_search:
        search = ClassOrientationSearch(model, config.search_rotations, config.n_search, seed=config.seed + 12345,
                                        cache_grid=config.cache_grid, grid=config.search_grid,
                                        symmetry=config.symmetry, latent_per_dim=config.latent_nodes)
    guide = LatentGuide(mask, latent_dim=config.latent_dim, n_classes=config.n_classes, n_heads=config.n_heads,
                        features=config.encoder_features, channels=config.encoder_channels, transform=config.transform,
                        pixel_q=pixel_q, latent_scorer=model.class_hypothesis_logpost,
                        n_search=0 if search is None else search.n_proposals, search=search).to(device)
    return model, guide
