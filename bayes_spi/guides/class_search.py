"""Class-aware orientation search: pose proposals per class (and latent point) from the grid likelihood.

The homogeneous fit's :class:`~bayes_spi.guides.search.OrientationSearch` scores every pattern against one field
cache at every rotation of a fixed grid. A heterogeneous model (:class:`~bayes_spi.models.heterogeneous.
HeterogeneousSPIModel`) has one field per class ``c``, each conditional on a continuous latent ``z``; this search
caches ``log I_c(q; z_l)`` for every class at ``L`` latent points ``z_l`` (a Gauss-Hermite product grid of the latent
prior, :func:`latent_nodes`; one point ``z = 0`` without a latent) and scores every pattern against every
``(c, l)`` cache at every grid rotation (the fluence profiled out in closed form, as the homogeneous search)::

    ll_iclg = sum_k y_ik log lambda_clgk - N_i log sum_k lambda_clgk      (up to terms without c, l, g)

Per class, the rotations are ranked by ``logsumexp_l (log w_l + ll_iclg)`` (the latent integrated over the
prior's quadrature) and the best ``n_keep`` of **each** class are proposed: ``(B, C n_keep, 3, 3)``. The guide
(:class:`~bayes_spi.guides.latent.LatentGuide`) then weighs every proposal under every class with the model's own
likelihood, so a proposal only changes where ``q`` puts its mass: the ELBO stays a bound. The search also gives,
per class, the grid posterior mean of the latent over its points (:attr:`ClassOrientationSearch.last_latent_mean`
``(B, C, d)``), which the guide uses as the centre of ``q(z | y, c)`` (as the profile scale centres ``q(s)``),
and the profile log scale at the best ``(c, l, g)`` (:attr:`last_log_scale`).

Example:
    >>> import torch
    >>> from bayes_spi.models.fields import SirenField
    >>> from bayes_spi.models.heterogeneous import HeterogeneousSPIModel
    >>> model = HeterogeneousSPIModel(SirenField(0.125), torch.randn(64, 3) * 0.03, torch.full((64,), 1e-3),
    ...                               latent_dim=1, n_classes=2)
    >>> search = ClassOrientationSearch(model, n_rotations=128, n_keep=2, cache_grid=9)
    >>> search(torch.rand(3, 8, 8), torch.arange(64)).shape, search.last_latent_mean.shape
    (torch.Size([3, 4, 3, 3]), torch.Size([3, 2, 1]))
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from torch import Tensor

from bayes_spi.models.latent import LATENT_RULES
from bayes_spi.guides.search import BACKGROUND_SCREEN, GridSearchBase, cube_points, grid_profile_loglik

__all__ = ["ClassOrientationSearch", "class_caches", "class_grid_loglik", "latent_nodes"]


def latent_nodes(latent_prior: torch.nn.Module | None, latent_dim: int, per_dim: int = 3, rule: str = "hermite"
                 ) -> tuple[Tensor | None, Tensor]:
    """Quadrature points of the latent prior: ``(z (L, d) or None, log_w (L,))`` with ``sum exp(log_w) = 1``.

    A product grid of ``per_dim`` points per dimension (``L = per_dim^d``) on ``Normal(0, sd^2)`` with ``sd`` the
    prior's ``scale`` (1 if it has none), by ``rule``:

    - ``hermite``: the probabilists' Gauss-Hermite rule (exact for polynomials of degree ``< 2 per_dim``; its
      outer points carry little weight: 1/6 at 3 points, 0.011 at 5);
    - ``equal``: equal-probability bins of the Normal, each bin's point at its conditional mean
      ``E[z | bin]`` and weight ``1 / per_dim`` (3 points: 0 and +-1.091 sd, 1/3 each). Every point carries the
      same prior mass, so in an EM fit no latent point is starved of patterns by its prior weight alone.

    Either way the points are importance-weighted by ``p(z) / Normal(z; 0, sd^2)`` for another prior (e.g. a
    Student-t), then normalised. ``latent_dim = 0``: no points (``z = None``) and one weight ``log 1``.

    Example:
        >>> z, log_w = latent_nodes(None, 1, 3, rule="equal")
        >>> [round(v, 3) + 0.0 for v in z[:, 0].tolist()], [round(v, 3) for v in log_w.exp().tolist()]
        ([-1.091, 0.0, 1.091], [0.333, 0.333, 0.333])
    """
    if latent_dim == 0:
        return None, torch.zeros(1, dtype=torch.float64)
    if per_dim < 1:
        raise ValueError(f"per_dim: expected a positive integer, got {per_dim!r}")
    if rule == "hermite":
        x, w = np.polynomial.hermite_e.hermegauss(per_dim)
        w = w / math.sqrt(2 * math.pi)
    elif rule == "equal":
        from scipy.stats import norm

        edges = norm.ppf(np.linspace(0.0, 1.0, per_dim + 1))  # -inf ... inf
        x = (norm.pdf(edges[:-1]) - norm.pdf(edges[1:])) * per_dim  # E[z | edges[i] < z < edges[i+1]]
        w = np.full(per_dim, 1.0 / per_dim)
    else:
        raise ValueError(f"rule: expected one of {LATENT_RULES}, got {rule!r}")
    sd = float(getattr(latent_prior, "scale", 1.0)) if latent_prior is not None else 1.0
    pts = np.array(list(itertools.product(x, repeat=latent_dim)), dtype=np.float64) * sd  # (L, d)
    log_w = np.array([sum(math.log(w[i]) for i in idx) for idx in itertools.product(range(per_dim), repeat=latent_dim)])
    z = torch.as_tensor(pts)
    if latent_prior is not None:
        prior_lp = latent_prior(z.shape[0]).log_prob(z.to(latent_prior._zero.dtype)).double()
        normal_lp = torch.distributions.Normal(0.0, sd).log_prob(z).sum(-1)
        log_w = log_w + (prior_lp - normal_lp).detach().cpu().numpy()
    log_w = torch.as_tensor(log_w - np.logaddexp.reduce(log_w))
    return z, log_w


def class_caches(fields: torch.nn.Module, points: Tensor, z: Tensor | None) -> Tensor:
    """``log I_c(points; z_l)`` for every class and latent point: ``(C, L, P)`` (``L = 1`` for ``z = None``),
    differentiable w.r.t. the fields when grad is on. ``fields``: a
    :class:`~bayes_spi.models.conditional_field.LatentFields`; ``points (P, 3)``; ``z (L, d)``."""
    out = []
    for field in fields.fields:
        if z is None:
            out.append(field.log_intensity(points)[None])
        else:
            out.append(torch.stack([field.log_intensity(points, zl.to(points.dtype)) for zl in z]))
    return torch.stack(out)


def class_grid_loglik(caches: Tensor, rotations: Tensor, q: Tensor, log_w: Tensor, y: Tensor, q_max: float,
                      bg: Tensor | None = None, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """:func:`~bayes_spi.guides.search.grid_profile_loglik` for every cache of ``caches (C, L, n, n, n)``:
    ``ll (B, C, L, G)`` and the profile log scales ``(B, C, L, G)``."""
    n_c, n_l = caches.shape[:2]
    lls, scales = [], []
    for c in range(n_c):
        for l in range(n_l):
            ll, log_s = grid_profile_loglik(caches[c, l][None, None], rotations, q, log_w, y, q_max, chunk, bg=bg,
                                            screen=BACKGROUND_SCREEN)
            lls.append(ll)
            scales.append(log_s)
    b, g = lls[0].shape
    return torch.stack(lls, 1).reshape(b, n_c, n_l, g), torch.stack(scales, 1).reshape(b, n_c, n_l, g)


class ClassOrientationSearch(GridSearchBase):
    """Top-``n_keep`` grid rotations of each class for each pattern (the module doc).

    Args:
        model: a :class:`~bayes_spi.models.heterogeneous.HeterogeneousSPIModel` (not copied).
        n_rotations, n_keep, cache_grid, seed, grid, symmetry: as :class:`~bayes_spi.guides.search.OrientationSearch`
            (``n_keep`` per class).
        latent_per_dim: latent points per dimension (:func:`latent_nodes`).
    """

    def __init__(self, model: torch.nn.Module, n_rotations: int = 4096, n_keep: int = 2, cache_grid: int = 41,
                 seed: int = 12345, grid: str = "fibonacci", symmetry: str | None = None,
                 latent_per_dim: int = 3) -> None:
        super().__init__(model, n_rotations, n_keep, cache_grid, seed, grid, symmetry)
        self.n_classes = int(getattr(model, "n_classes", 1))
        self.latent_dim = int(getattr(model, "latent_dim", 0))
        #: proposals per pattern: ``n_keep`` per class (the guide's ``n_search``)
        self.n_proposals = self.n_keep * self.n_classes
        self.nodes, self.log_node_weights = latent_nodes(getattr(model, "latent_prior", None), self.latent_dim,
                                                         latent_per_dim, getattr(model, "latent_rule", "hermite"))
        self.last_latent_mean: Tensor | None = None
        self.last_class_loglik: Tensor | None = None

    def cache_lead(self) -> tuple[int, ...]:
        """The cache's leading shape ``(C, L)``: one cube per class and latent point."""
        return (self.n_classes, int(self.log_node_weights.shape[0]))

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-evaluate every class field at every latent point on the cache cube (after the fields changed)."""
        n = self.cache_grid
        q = cube_points(n, self.q_max, self.model.q.device)
        z = None if self.nodes is None else self.nodes.to(q.device)
        parts = [class_caches(self.model.field, q[i:i + 65536], z) for i in range(0, q.shape[0], 65536)]
        self._cache = torch.cat(parts, -1).reshape(self.n_classes, -1, n, n, n)

    @torch.no_grad()
    def grid_loglik(self, images: Tensor, pixels: Tensor, chunk: int = 1024, return_log_scale: bool = False
                    ) -> Tensor | tuple[Tensor, Tensor]:
        """The model's profile log-likelihood ``(B, G)`` at every grid rotation, the class and the latent summed out
        (``logsumexp_{c,l}(log pi_c + log w_l + ll_iclg)``), as :meth:`OrientationSearch.grid_loglik` gives it
        for one field (what the fit verdict reads); with ``return_log_scale`` also the profile log scale ``(B, G)``
        at each rotation's most probable ``(c, l)``."""
        ll, log_s = self.class_grid_loglik(images, pixels)
        n_b, g = ll.shape[0], ll.shape[-1]
        prior = self.model.class_prior.log_probs().detach().to(ll.dtype) if self.n_classes > 1 else ll.new_zeros(1)
        joint = (ll + prior[None, :, None, None]
                 + self.log_node_weights.to(ll.device, ll.dtype)[None, None, :, None]).reshape(n_b, -1, g)
        out = torch.logsumexp(joint, 1)
        if not return_log_scale:
            return out
        return out, log_s.reshape(n_b, -1, g).gather(1, joint.argmax(1, keepdim=True)).squeeze(1)

    @torch.no_grad()
    def class_grid_loglik(self, images: Tensor, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Profile log-likelihood ``(B, C, L, G)`` of every pattern for every class, latent point and grid rotation
        on ``pixels``, and the profile log scales ``(B, C, L, G)``."""
        if self._cache is None:
            self.refresh()
        model = self.model
        q = model.q[pixels]
        y = images.reshape(images.shape[0], -1)[:, pixels].to(q.dtype)
        bg = model.background_rate(pixels) if getattr(model, "background", None) is not None else None
        return class_grid_loglik(self._cache, self.rotations.to(q.device), q, model.log_pixel_factor[pixels], y,
                                 self.q_max, bg)

    @torch.no_grad()
    def __call__(self, images: Tensor, pixels: Tensor) -> Tensor:
        """Best ``n_keep`` grid rotations of each class: ``images (B, n_y, n_x)`` -> ``(B, C n_keep, 3, 3)``, class
        ``c``'s in rows ``c n_keep .. (c + 1) n_keep - 1``."""
        ll, log_s = self.class_grid_loglik(images, pixels)  # (B, C, L, G)
        n_b = ll.shape[0]
        lw = self.log_node_weights.to(ll.device, ll.dtype)[None, None, :, None]
        per_class = torch.logsumexp(ll + lw, dim=2)  # (B, C, G): the latent integrated over the quadrature
        top = per_class.topk(self.n_keep, dim=-1).indices  # (B, C, n_keep)
        flat = ll.reshape(n_b, -1).argmax(-1)
        self.last_log_scale = log_s.reshape(n_b, -1).gather(1, flat[:, None]).squeeze(1)
        if self.nodes is not None:  # the grid posterior mean of z per class: weights over (l, g) given c
            w = torch.softmax((ll + lw).reshape(n_b, self.n_classes, -1), -1).reshape(ll.shape).sum(-1)  # (B, C, L)
            self.last_latent_mean = w @ self.nodes.to(w.device, w.dtype)  # (B, C, d)
        prior = self.model.class_prior.log_probs().to(ll.dtype) if self.n_classes > 1 else ll.new_zeros(1)
        self.last_class_loglik = (torch.logsumexp(per_class, -1) - math.log(per_class.shape[-1])
                                  + prior.detach()[None])  # (B, C): up to a constant per pattern
        return self.rotations.to(images.device)[top].reshape(n_b, self.n_proposals, 3, 3)
