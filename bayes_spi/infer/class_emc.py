"""The EMC warm start of a heterogeneous model: the exact marginal over classes, latent points and orientations.

The homogeneous warm start (:mod:`bayes_spi.infer.emc`) ascends each pattern's grid marginal likelihood over a
fixed orientation grid. For a heterogeneous model (one field per class ``c``, FiLM-conditional on a latent ``z``)
the marginal likelihood also sums over the class and integrates the latent over its prior, by the quadrature of
:func:`~bayes_spi.guides.class_search.latent_nodes` (points ``z_l``, weights ``w_l``; one point without a latent)::

    log p(y_i | theta) = log sum_c pi_c sum_l w_l (1/G) sum_g p(y_i | R_g, s_iclg, z_l, c)            (B,)

with the fluence at its profile (maximum-likelihood) value per ``(c, l, g)`` as in EMC/Dragonfly. With
:attr:`ClassGridMarginal.latent_beta` ``gamma < 1`` the latent points' posterior is tempered (deterministic
annealing of the latent, the class and the pose untempered)::

    m_icl = log sum_g p(y_i | R_g, s_iclg, z_l, c) / G + log w_l
    log p_gamma(y_i | theta) = log sum_c pi_c exp( (1 / gamma) log sum_l exp(gamma m_icl) )

so that early in a fit every latent point is trained by every pattern (responsibilities near the prior weights),
and the points separate as ``gamma`` rises to 1 (the exact marginal); without it a point that loses the patterns
at the start is never trained again (a dead point of an EM mixture).

The exact marginal's gradient is the EM M-step on every class field at once: ``sum_{c,l,g} r_iclg grad log p(y_i | R_g, z_l, c)`` with the exact
responsibilities ``r_iclg = p(c, z_l, R_g | y_i)`` (:attr:`ClassGridPosterior.responsibilities`), so each class
field is trained by the patterns in proportion to how well it explains them, and the FiLM latent by which latent
point explains them. The class fields start from the radial-profile mixture
(:meth:`bayes_spi.infer.heterogeneous.HeterogeneousTrainer.initialise_offset`); the class prior ``pi`` is learned
with them when it is a learned prior.

Example:
    >>> import torch
    >>> from bayes_spi.models.fields import SirenField
    >>> from bayes_spi.models.heterogeneous import HeterogeneousSPIModel
    >>> from bayes_spi.so3 import super_fibonacci_rotmat
    >>> model = HeterogeneousSPIModel(SirenField(0.125), torch.randn(64, 3) * 0.03, torch.full((64,), 1e-3),
    ...                               latent_dim=1, n_classes=2)
    >>> emc = ClassGridMarginal(model, super_fibonacci_rotmat(64), cache_grid=9)
    >>> out = emc(torch.poisson(torch.ones(4, 8, 8)), torch.arange(64))
    >>> out.log_marginal.shape, out.responsibilities.shape, out.class_probs.shape
    (torch.Size([4]), torch.Size([4, 2, 3, 64]), torch.Size([4, 2]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bayes_spi.guides.class_search import class_caches, class_grid_loglik, latent_nodes
from bayes_spi.guides.search import cube_points

__all__ = ["ClassGridMarginal", "ClassGridPosterior"]


@dataclass
class ClassGridPosterior:
    """One batch's E-step over classes x latent points x orientations.

    Attributes:
        log_marginal: ``(B,)`` ``log p(y_i | theta)`` (differentiable w.r.t. the fields and the class prior).
        responsibilities: ``(B, C, L, G)`` ``p(c, z_l, R_g | y_i)`` (detached).
        log_scale: ``(B,)`` the profile log fluence scale at each pattern's most probable ``(c, l, g)``.
    """

    log_marginal: Tensor
    responsibilities: Tensor
    log_scale: Tensor

    @property
    def class_probs(self) -> Tensor:
        """``(B, C)`` ``p(c | y_i)``."""
        return self.responsibilities.sum((-2, -1))

    @property
    def weights(self) -> Tensor:
        """``(B, G)`` the posterior over the grid rotations, classes and latent points summed out."""
        return self.responsibilities.sum((1, 2))

    @property
    def effective_orientations(self) -> Tensor:
        """``(B,)`` ``exp(entropy)`` of the orientation posterior (:attr:`weights`)."""
        w = self.weights.clamp(min=1e-30)
        return (-(w * w.log()).sum(-1)).exp()


class ClassGridMarginal:
    """The marginal likelihood of the module doc for ``model`` (a
    :class:`~bayes_spi.models.heterogeneous.HeterogeneousSPIModel`).

    Args:
        model: the heterogeneous model (its class fields, latent and class priors, pixel ``q`` and factors).
        rotations: ``(G, 3, 3)`` the orientation grid.
        cache_grid: odd voxels per side of the cubes over ``[-q_max, q_max]^3``.
        latent_per_dim: latent quadrature points per dimension.
        chunk: rotations per interpolation chunk (memory).
    """

    def __init__(self, model: torch.nn.Module, rotations: Tensor, cache_grid: int = 41, latent_per_dim: int = 3,
                 chunk: int = 1024) -> None:
        if rotations.dim() != 3 or rotations.shape[-2:] != (3, 3):
            raise ValueError(f"expected rotations of shape (G, 3, 3), got shape {tuple(rotations.shape)}")
        if cache_grid < 3 or cache_grid % 2 == 0:
            raise ValueError(f"expected an odd cache_grid >= 3, got {cache_grid}")
        self._model = [model]
        self.rotations = rotations
        self.n = int(cache_grid)
        self.chunk = int(chunk)
        self.q_max = model.q_max
        self.n_classes = int(getattr(model, "n_classes", 1))
        self.nodes, self.log_node_weights = latent_nodes(getattr(model, "latent_prior", None),
                                                         int(getattr(model, "latent_dim", 0)), latent_per_dim,
                                                         getattr(model, "latent_rule", "hermite"))
        #: per-pattern latent point log-weights ``(B, L)`` for the next call only, in place of the prior's
        #: (the data start of :mod:`bayes_spi.infer.latent_start`); ``None``: the prior's
        self.pattern_log_node_weights: Tensor | None = None
        #: tempering ``gamma`` in (0, 1] of the latent points' posterior (deterministic annealing of the latent,
        #: see :meth:`__call__`); 1: the exact marginal
        self.latent_beta = 1.0
        pts = cube_points(self.n, self.q_max, model.q.device)
        dq = 2 * self.q_max / (self.n - 1)
        self.inside = torch.nonzero(pts.norm(dim=-1) <= self.q_max + math.sqrt(3) * dq + 1e-9).squeeze(-1)
        self.points = pts[self.inside]

    @property
    def model(self) -> torch.nn.Module:
        return self._model[0]

    def caches(self) -> Tensor:
        """``log I_c(q; z_l)`` on the cube ``(C, L, n, n, n)``, differentiable w.r.t. the fields."""
        z = None if self.nodes is None else self.nodes.to(self.points.device)
        vals = class_caches(self.model.field, self.points, z)  # (C, L, P_inside)
        n_c, n_l = vals.shape[:2]
        full = vals.detach().amin(-1, keepdim=True).expand(n_c, n_l, self.n**3).clone()
        full[..., self.inside.to(vals.device)] = vals  # differentiable in vals (a copy, not a leaf)
        return full.reshape(n_c, n_l, self.n, self.n, self.n)

    def __call__(self, images: Tensor, pixels: Tensor, pixel_weight: float = 1.0, beta: float = 1.0
                 ) -> ClassGridPosterior:
        """E-step of a batch ``images (B, n_y, n_x)`` on ``pixels (M,)`` (``pixel_weight``, ``beta`` as
        :meth:`bayes_spi.infer.emc.GridMarginal.__call__`)."""
        if not beta > 0:
            raise ValueError(f"expected beta > 0, got {beta}")
        model = self.model
        q = model.q[pixels]
        y = images.reshape(images.shape[0], -1)[:, pixels].to(q.dtype)
        bg = model.background_rate(pixels) if getattr(model, "background", None) is not None else None
        ll, log_s = class_grid_loglik(self.caches(), self.rotations.to(q.device), q, model.log_pixel_factor[pixels],
                                      y, self.q_max, bg, self.chunk)  # (B, C, L, G)
        n_tot = y.sum(-1)
        const = n_tot * n_tot.clamp(min=1.0).log() - n_tot - torch.lgamma(y + 1).sum(-1)
        ll = (ll + const[:, None, None, None]) * (pixel_weight * beta)
        log_prior = (model.class_prior.log_probs().to(ll.dtype) if self.n_classes > 1
                     else ll.new_zeros(1))[None, :, None, None]
        node_w, self.pattern_log_node_weights = self.pattern_log_node_weights, None
        if node_w is None:
            node_w = self.log_node_weights.to(ll.device, ll.dtype)[None, :]
        elif node_w.shape != (ll.shape[0], ll.shape[2]):
            raise ValueError(f"expected per-pattern latent point log-weights of shape {(ll.shape[0], ll.shape[2])}, "
                             f"got shape {tuple(node_w.shape)}")
        node_w = node_w.to(ll.device, ll.dtype)
        n_b, n_g = ll.shape[0], ll.shape[-1]
        gamma = float(self.latent_beta)
        if not 0 < gamma <= 1:
            raise ValueError(f"expected latent_beta in (0, 1], got {gamma}")
        if gamma == 1.0 or ll.shape[2] == 1:
            joint = ll + beta * (log_prior + node_w[:, None, :, None])
            log_marg = (torch.logsumexp(joint.reshape(n_b, -1), -1) - math.log(n_g)) / beta
            resp = torch.softmax(joint.detach().reshape(n_b, -1), -1).reshape(joint.shape)
        else:  # the latent points' posterior tempered by gamma: every point shares the patterns early on
            m = torch.logsumexp(ll, -1) - math.log(n_g) + beta * node_w[:, None, :]  # (B, C, L)
            per_class = torch.logsumexp(gamma * m, -1) / gamma + beta * log_prior[..., 0, 0]  # (B, C)
            log_marg = torch.logsumexp(per_class, -1) / beta
            resp = (torch.softmax(per_class.detach(), -1)[:, :, None, None]
                    * torch.softmax(gamma * m.detach(), -1)[..., None] * torch.softmax(ll.detach(), -1))
        best = resp.reshape(n_b, -1).argmax(-1, keepdim=True)
        return ClassGridPosterior(log_marg, resp, log_s.reshape(n_b, -1).gather(1, best).squeeze(1))

