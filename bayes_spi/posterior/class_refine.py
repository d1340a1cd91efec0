r"""Off-grid class posteriors of a heterogeneous fit: each class's best coarse poses refined, Laplace evidence.

The class posterior of a fit with ``C`` class fields (and ``L`` latent quadrature points) is

    p(c, z_l | y) ∝ pi_c w_l p(y | c, z_l),      p(y | c, z_l) = ∫_SO(3) p(y | R, c, z_l) dR / |SO(3)|

with the fluence at its profile (maximum-likelihood) value, as in the search, the EMC warm start and
:func:`~bayes_spi.posterior.latent.grid_class_posteriors`. Summed over a coarse orientation grid the integral is
limited by the grid: two conformations differ in speckles a few degrees wide, a 15-degree grid blurs them alike
(BENCHMARKS.md: the same fields classify a two-state protein at 0.88 on 4,096 orientations and 0.96 on 32,768).
Here the integral is evaluated where it matters, off the grid:

1. the coarse grid's log-likelihood ``ll_clg`` of every pattern (:func:`~bayes_spi.guides.class_search.
   class_grid_loglik`, all good pixels);
2. for every ``(c, l)`` the ``n_modes`` best grid rotations that lie more than a grid spacing apart (a neighbour of
   the best usually climbs to the same mode; the Ewald twin or another basin is worth more) are moved to the modes
   of that field's likelihood (:func:`~bayes_spi.posterior.local.refine_on_cache`: Gauss-Newton on the right
   perturbation ``eps``, steps capped at half the grid spacing) and each mode carries its Laplace evidence
   ``f_m + 3/2 log 2 pi - 1/2 log det H_m`` (``∫ exp f`` over ``eps``: the Haar measure in the units of
   ``|SO(3)| = 8 pi^2``; ``H`` is the profiled Fisher information, the Gauss-Newton curvature: on a trilinearly
   read likelihood ~0.25 nats above a brute-force integral, tests/test_class_refine.py); modes within a tenth of
   the grid spacing of a better one are one mode (:func:`~bayes_spi.posterior.local.distinct_modes`);
3. the rest of SO(3) stays a grid sum: every grid rotation that is not a refined seed and lies farther than one
   grid spacing from every refined mode adds ``exp(ll_g)`` times its cell's volume ``|zone| / G``. Only *sharp*
   modes (largest Laplace sd under half the spacing) enter as modes: a broader peak is resolved by the grid itself
   (and a Laplace volume of a nearly flat likelihood would exceed SO(3)), so there the grid sum stays whole:

    p(y | c, z_l) |SO(3)| ≈ sum_{distinct modes m} exp(ev_m) + (|zone| / G) sum_{far g} exp(ll_g)

   When a pattern's likelihood is concentrated (many photons, fine speckles) the modes carry it and the grid
   term vanishes; when it is broad the grid term dominates and the answer tends to the grid's own.

**Tempering.** ``beta`` has the meaning it has in :class:`~bayes_spi.infer.class_emc.ClassGridMarginal`: the joint
``beta (log pi_c + log w_l + ll)`` is normalised, so the modes' Laplace terms are those of ``exp(beta f)``
(``beta f_m + 3/2 log 2 pi - 1/2 log det(beta H_m)``) and the grid term sums ``exp(beta ll_g)``. ``beta = 1``
(the default, and what ``fit`` exports) is the model's untempered posterior, as the guide's ``q(c)`` and
:func:`grid_class_posteriors` give it; a warm start's ``emc_beta`` tempers training, not the exported posterior.

Cost per pattern: one coarse pass (``C L G`` rotations, as :func:`grid_class_posteriors` on the coarse grid) plus
``C L n_modes`` refinements of ``n_iter`` Gauss-Newton steps on all pixels: on the two-state protein about a
fifth of the 32,768-orientation pass, and more accurate (BENCHMARKS.md, heterogeneity, fourth version). Memory:
one batch's ``B x C x L x G`` log-likelihoods.

Example:
    >>> import torch
    >>> from bayes_spi.models.fields import SirenField
    >>> from bayes_spi.models.heterogeneous import HeterogeneousSPIModel
    >>> model = HeterogeneousSPIModel(SirenField(0.125), torch.randn(64, 3) * 0.03, torch.full((64,), 1e-3),
    ...                               latent_dim=1, n_classes=2)
    >>> post = ClassModeRefiner(model, n_rotations=128, cache_grid=9)(torch.poisson(torch.ones(4, 64)))
    >>> post.class_probs.shape, post.node_probs.shape
    (torch.Size([4, 2]), torch.Size([4, 2, 3]))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from bayes_spi.guides.class_search import class_grid_loglik
from bayes_spi.posterior.local import distinct_modes, refine_on_cache

__all__ = ["ClassModeRefiner", "RefinedClassBatch", "RefinedClassSummary", "refined_class_posteriors"]


@dataclass
class RefinedClassBatch:
    """The refined posterior of one batch.

    Attributes:
        log_evidence: ``(B, C, L)`` ``log p_beta(y | c, z_l)`` (``+ log |SO(3)|``, up to terms in ``y`` only).
        node_probs: ``(B, C, L)`` ``p(c, z_l | y)``.
        n_modes: ``(B, C, L)`` distinct refined modes that entered.
        mode_share: ``(B, C, L)`` the modes' share of ``p(y | c, z_l)`` (the rest: the grid term).
    """

    log_evidence: Tensor
    node_probs: Tensor
    n_modes: Tensor
    mode_share: Tensor

    @property
    def class_probs(self) -> Tensor:
        """``(B, C)`` ``p(c | y)``."""
        return self.node_probs.sum(-1)


class ClassModeRefiner:
    """The refined class posterior of the module doc for a heterogeneous ``model``.

    Args:
        model: a :class:`~bayes_spi.models.heterogeneous.HeterogeneousSPIModel` (its fields are read once, into
            one ``log I`` cube per class and latent point: rebuild the refiner after the fields change).
        rotations: ``(G, 3, 3)`` the coarse grid (``None``: :func:`~bayes_spi.guides.search.orientation_grid` of
            ``n_rotations``, ``grid``, ``seed``, ``symmetry``: the search's with the fit's settings).
        cache_grid: odd voxels per side of the cubes.
        latent_per_dim: latent quadrature points per dimension (:func:`~bayes_spi.guides.class_search.latent_nodes`).
        n_modes: best grid rotations refined per class and latent point.
        n_iter: Gauss-Newton steps per refinement.
        beta: tempering (module doc); 1: the untempered posterior.
        symmetry: the point group of the grid's zone (its volume ``8 pi^2 / |G|`` sets the cell volume).
    """

    def __init__(self, model: torch.nn.Module, rotations: Tensor | None = None, n_rotations: int = 4096,
                 cache_grid: int = 41, latent_per_dim: int = 3, n_modes: int = 3, n_iter: int = 4, beta: float = 1.0,
                 grid: str = "fibonacci", seed: int = 12345, symmetry: str | None = None) -> None:
        from bayes_spi.guides.search import orientation_grid
        from bayes_spi.infer.class_emc import ClassGridMarginal
        from bayes_spi.symmetry import point_group

        if not 0 < beta <= 1:
            raise ValueError(f"beta: expected 0 < beta <= 1, got {beta}")
        if n_modes < 1 or n_iter < 0:
            raise ValueError(f"expected n_modes >= 1 and n_iter >= 0, got {n_modes} and {n_iter}")
        device, dtype = model.q.device, model.q.dtype
        rots = orientation_grid(n_rotations, grid, seed, symmetry) if rotations is None else rotations
        if rots.dim() != 3 or rots.shape[-2:] != (3, 3):
            raise ValueError(f"expected rotations of shape (G, 3, 3), got shape {tuple(rots.shape)}")
        self.model = model
        self.rotations = rots.to(device, dtype)
        self.n_modes = min(int(n_modes), self.rotations.shape[0])
        self.n_iter = int(n_iter)
        self.beta = float(beta)
        #: dtype of the refinements (float32: the model's; float64 costs ~2x on a CPU)
        self.dtype = dtype
        emc = ClassGridMarginal(model, self.rotations, cache_grid=cache_grid, latent_per_dim=latent_per_dim)
        with torch.no_grad():
            self.caches = emc.caches().detach()  # (C, L, n, n, n)
        self.nodes = emc.nodes  # (L, d) or None
        self.log_node_weights = emc.log_node_weights.to(device, torch.float64)
        self.n_classes = emc.n_classes
        self.q_max = float(model.q_max)
        G = self.rotations.shape[0]
        #: one grid cell's volume (Haar measure in rad^3: SO(3) has 8 pi^2, a point group's zone 8 pi^2 / |G|)
        self.log_cell = math.log(8 * math.pi ** 2 / point_group(symmetry).order / G)
        #: the grid's typical spacing (rad): the cube root of a cell
        self.spacing = math.exp(self.log_cell / 3)
        #: a refined mode replaces the grid near it only when its largest Laplace sd is below this many spacings
        self.sharp = 0.5

    def _seeds(self, ll: Tensor) -> Tensor:
        """Indices ``(B, K)`` of the ``n_modes`` best grid rotations of ``ll (B, G)`` that lie more than one grid
        spacing apart (neighbours of a better rotation usually climb to the same mode: a seed elsewhere, e.g. at
        the Ewald twin, is worth more); the best remaining ones fill up when too few are apart."""
        k = self.n_modes
        cand = ll.topk(min(4 * k, ll.shape[1]), dim=-1).indices  # (B, 4K), best first
        if k == 1:
            return cand[:, :1]
        R = self.rotations[cand]  # (B, 4K, 3, 3)
        cos = (torch.einsum("bjxy,bkxy->bjk", R, R) - 1.0) / 2.0  # (B, 4K, 4K)
        apart = torch.ones(cand.shape, dtype=torch.bool, device=ll.device)
        close = cos > math.cos(self.spacing)
        for j in range(1, cand.shape[1]):
            apart[:, j] = ~(close[:, j, :j] & apart[:, :j]).any(-1)
        # the apart ones first (best first), then the others (best first)
        rank = torch.argsort((~apart).to(torch.int8), dim=-1, stable=True)[:, :k]
        return cand.gather(1, rank)

    def _log_prior(self) -> Tensor:
        """``(C, L)`` ``log pi_c + log w_l``."""
        model = self.model
        prior = (model.class_prior.log_probs().detach().to(torch.float64).cpu() if self.n_classes > 1
                 else torch.zeros(1, dtype=torch.float64))
        return prior[:, None] + self.log_node_weights.cpu()[None, :]

    @torch.no_grad()
    def __call__(self, y: Tensor, pixels: Tensor | None = None) -> RefinedClassBatch:
        """The refined posterior of counts ``y (B, M)`` on ``pixels (M,)`` (default: every pixel of the model)."""
        model = self.model
        if pixels is None:
            pixels = torch.arange(model.q.shape[0], device=model.q.device)
        q = model.q[pixels]
        log_w = model.log_pixel_factor[pixels]
        if y.dim() != 2 or y.shape[1] != q.shape[0]:
            raise ValueError(f"expected counts of shape (B, {q.shape[0]}), got shape {tuple(y.shape)}")
        y = y.to(q.device, q.dtype)
        bg = model.background_rate(pixels) if getattr(model, "background", None) is not None else None
        ll, _ = class_grid_loglik(self.caches, self.rotations, q, log_w, y, self.q_max, bg)  # (B, C, L, G)
        ll = ll.double()
        n_b, n_c, n_l, _ = ll.shape
        beta = self.beta
        dt = self.dtype
        qd, wd, yd = q.to(dt), log_w.to(dt), y.to(dt)
        bgd = None if bg is None else bg.to(dt)
        rots = self.rotations.to(dt)
        cos_far = math.cos(self.spacing)
        log_ev = torch.empty(n_b, n_c, n_l, dtype=torch.float64, device=y.device)
        n_modes = torch.empty(n_b, n_c, n_l, dtype=torch.int64, device=y.device)
        share = torch.empty(n_b, n_c, n_l, dtype=torch.float64, device=y.device)
        rows = torch.arange(n_b, device=y.device)[:, None]
        for c in range(n_c):
            for l in range(n_l):
                llg = ll[:, c, l]  # (B, G)
                top = self._seeds(llg)  # (B, K)
                modes = refine_on_cache(self.caches[c, l][None, None].to(dt), rots[top], qd, wd, yd, self.q_max,
                                        n_iter=self.n_iter, max_step_deg=math.degrees(0.5 * self.spacing), bg=bgd)
                # the Laplace integral of exp(beta f): beta f + 3/2 log 2 pi - 1/2 log det(beta H)
                score = (modes.log_evidence.double() + (beta - 1.0) * modes.loglik.double() - 1.5 * math.log(beta))
                order = score.argsort(dim=-1, descending=True)
                modes, score = modes.select(order), score.gather(1, order)
                # a mode as broad as the grid's spacing is integrated by the grid already (and its Laplace volume
                # can exceed SO(3) when the likelihood is nearly flat): only sharp modes replace the grid there
                sharp = modes.sigmas.max(-1).values.double() < self.sharp * self.spacing
                keep = distinct_modes(modes.rotations, score, 0.1 * self.spacing) & sharp
                log_modes = torch.logsumexp(torch.where(keep, score, torch.full_like(score, -math.inf)), -1)  # (B,)
                # the grid term: rotations that are no seed and lie farther than one spacing from every kept mode
                cos_ang = (torch.einsum("bkij,gij->bkg", modes.rotations, rots).double() - 1.0) / 2.0  # (B, K, G)
                near = ((cos_ang > cos_far) & keep[..., None]).any(1)
                near[rows, top] |= sharp.any(-1, keepdim=True)  # the seeds' cells, when a sharp mode replaces them
                log_grid = torch.logsumexp(torch.where(near, torch.full_like(llg, -math.inf), beta * llg), -1)
                log_grid = log_grid + self.log_cell
                log_ev[:, c, l] = torch.logaddexp(log_modes, log_grid)
                n_modes[:, c, l] = keep.sum(-1)
                share[:, c, l] = torch.exp(log_modes - log_ev[:, c, l])
        joint = log_ev + beta * self._log_prior().to(y.device)[None]
        probs = torch.softmax(joint.reshape(n_b, -1), -1).reshape(n_b, n_c, n_l)
        return RefinedClassBatch(log_ev, probs, n_modes, share)


@dataclass
class RefinedClassSummary:
    """Per-pattern refined posteriors (numpy).

    Attributes:
        class_probs: ``(N, C)`` ``p(c | y_i)``.
        node_probs: ``(N, C, L)`` ``p(c, z_l | y_i)`` over the latent quadrature points.
        z_loc, z_scale: ``(N, C, d)`` mean and sd of ``z`` given the class over those points.
        z_mean, z_sd: ``(N, d)`` the same, the class summed out.
        mode_share: ``(N,)`` the refined modes' share of the evidence of each pattern's most probable ``(c, l)``.
    """

    class_probs: np.ndarray
    node_probs: np.ndarray
    z_loc: np.ndarray
    z_scale: np.ndarray
    z_mean: np.ndarray
    z_sd: np.ndarray
    mode_share: np.ndarray


def refined_class_posteriors(model: torch.nn.Module, dataset: object, batch_size: int = 64,
                             indices: np.ndarray | None = None,
                             progress: Callable[[int, int], None] | None = None, **kwargs: object
                             ) -> RefinedClassSummary:
    """The refined class (and latent-point) posterior of every pattern of ``dataset`` (or of ``indices``), batch by
    batch on every good pixel (the work arrays are one batch's; the result holds ``N x C x L`` numbers, as
    :func:`~bayes_spi.posterior.latent.latent_posteriors`'); ``kwargs``: :class:`ClassModeRefiner`'s settings."""
    refiner = ClassModeRefiner(model, **kwargs)  # type: ignore[arg-type]
    device = model.q.device
    pixels = torch.nonzero(torch.as_tensor(np.asarray(dataset.mask).reshape(-1), device=device)).squeeze(-1)
    idx_all = np.arange(dataset.n_patterns) if indices is None else np.asarray(indices, dtype=np.int64)
    nodes = (torch.zeros(1, 0, dtype=torch.float64) if refiner.nodes is None
             else refiner.nodes.to(torch.float64).cpu())  # (L, d)
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    for start in range(0, len(idx_all), batch_size):
        idx = idx_all[start:start + batch_size]
        counts = torch.as_tensor(dataset.read(idx), device=device).reshape(len(idx), -1)[:, pixels]
        out = refiner(counts, pixels)
        best = out.node_probs.reshape(len(idx), -1).argmax(-1, keepdim=True)
        parts.append((out.node_probs.cpu().numpy(), out.mode_share.reshape(len(idx), -1).gather(1, best)[:, 0]
                      .cpu().numpy()))
        if progress is not None:
            progress(len(idx), len(idx_all))
    node_probs = np.concatenate([p[0] for p in parts])  # (N, C, L)
    share = np.concatenate([p[1] for p in parts])
    class_probs = node_probs.sum(-1)
    z = nodes.numpy()  # (L, d)
    given_c = node_probs / np.maximum(class_probs[..., None], 1e-300)
    z_loc = given_c @ z  # (N, C, d)
    z_scale = np.sqrt(np.maximum(given_c @ (z ** 2) - z_loc ** 2, 0.0))
    flat = node_probs.reshape(len(node_probs), -1)
    z_all = np.tile(z, (node_probs.shape[1], 1))  # (C L, d)
    z_mean = flat @ z_all
    z_sd = np.sqrt(np.maximum(flat @ (z_all ** 2) - z_mean ** 2, 0.0))
    return RefinedClassSummary(class_probs, node_probs, z_loc, z_scale, z_mean, z_sd, share)
