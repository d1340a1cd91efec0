"""EMC as a loss: the exact marginal likelihood of each pattern over a full orientation grid.

Why: at a few hundred to a few thousand photons a pattern rarely pins its orientation. EMC
(expand-maximize-compress; Dragonfly) keeps each pattern's full posterior over thousands of orientations
and merges with those weights, so it never commits a weak pattern to a point and does not collapse. This
module is that E-step, used as the first stage of a fit (the *EMC warm start*, see
:class:`~bayes_spi.infer.trainer.Trainer`): for the model's field read through a voxel cache,

    log p(y_i | theta) = log (1/G) sum_g p(y_i | R_g, s_ig, theta)                       (B,)

over a fixed quasi-uniform grid of ``G`` rotations ``R_g``, with each pattern's fluence scale at its
maximum-likelihood value for each rotation (``s_ig = N_i / sum_k lambda_gk``, as EMC/Dragonfly do).
Its gradient with respect to the field is the posterior-weighted sum over **all** ``G`` orientations,
``sum_g w_ig grad log p(y_i | R_g)`` with ``w_ig`` the exact posterior over the grid: EMC's M-step as a
gradient step on the neural field. The cost does not depend on how broad the posterior is.

The field enters through its values on a cube of ``n^3`` voxels (``n`` from the particle size, about two
voxels per speckle), computed with gradient every step and read by trilinear interpolation at the rotated
pixel ``q`` of every grid rotation (one ``grid_sample`` shared by all patterns of the batch), so a step
costs one field evaluation on the cube, ``G x M`` interpolations and one ``(B, M) x (M, G)`` product.

Example:
    >>> import torch
    >>> from bayes_spi.models.fields import SirenField
    >>> from bayes_spi.models.spi import SPIModel
    >>> from bayes_spi.so3 import super_fibonacci_rotmat
    >>> model = SPIModel(SirenField(0.125), torch.randn(64, 3) * 0.03, torch.full((64,), 1e-3))
    >>> emc = GridMarginal(model, super_fibonacci_rotmat(256), cache_grid=9)
    >>> out = emc(torch.poisson(torch.ones(4, 8, 8)), torch.arange(64))
    >>> out.log_marginal.shape, out.weights.shape
    (torch.Size([4]), torch.Size([4, 256]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bayes_spi.guides.search import BACKGROUND_SCREEN, cube_points, grid_profile_loglik
from bayes_spi.models.spi import SPIModel

__all__ = ["GridMarginal", "GridPosterior", "cache_grid_for"]


def cache_grid_for(q_max: float, diameter_A: float, voxels_per_speckle: float = 2.5,
                   smallest: int = 33, largest: int = 81) -> int:
    """Odd cube size ``n`` resolving speckles of width ``1/D`` over ``[-q_max, q_max]`` (clamped)."""
    n = int(math.ceil(2 * q_max * diameter_A * voxels_per_speckle)) + 1
    n += 1 - n % 2
    return int(min(max(n, smallest), largest))


@dataclass
class GridPosterior:
    """One batch's E-step.

    Attributes:
        log_marginal: ``(B,)`` ``log p(y_i | theta)`` over the grid (differentiable w.r.t. the field).
        weights: ``(B, G)`` the posterior over the grid rotations (detached).
        log_scale: ``(B,)`` the profile log fluence scale at each pattern's most probable rotation.
    """

    log_marginal: Tensor
    weights: Tensor
    log_scale: Tensor

    @property
    def effective_orientations(self) -> Tensor:
        """``(B,)`` ``exp(entropy)`` of each posterior: how many grid rotations it spreads over."""
        w = self.weights.clamp(min=1e-30)
        return (-(w * w.log()).sum(-1)).exp()


class GridMarginal:
    """The grid marginal likelihood of :mod:`bayes_spi.infer.emc` for ``model``'s field and detector.

    Args:
        model: the :class:`~bayes_spi.models.spi.SPIModel` (its field, pixel ``q`` and pixel factors).
        rotations: ``(G, 3, 3)`` the orientation grid.
        cache_grid: odd voxels per side of the cube over ``[-q_max, q_max]^3``.
        chunk: rotations per interpolation chunk (memory).
    """

    def __init__(self, model: SPIModel, rotations: Tensor, cache_grid: int = 41, chunk: int = 1024) -> None:
        if rotations.dim() != 3 or rotations.shape[-2:] != (3, 3):
            raise ValueError(f"expected rotations of shape (G, 3, 3), got shape {tuple(rotations.shape)}")
        if cache_grid < 3 or cache_grid % 2 == 0:
            raise ValueError(f"expected an odd cache_grid >= 3, got {cache_grid}")
        self._model = [model]  # a list: not a submodule of whoever holds this
        self.rotations = rotations
        self.n = int(cache_grid)
        self.chunk = int(chunk)
        self.q_max = model.q_max
        pts = cube_points(self.n, self.q_max, model.q.device)
        dq = 2 * self.q_max / (self.n - 1)
        # only voxels an interpolation at |q| <= q_max can touch need the field
        self.inside = torch.nonzero(pts.norm(dim=-1) <= self.q_max + math.sqrt(3) * dq + 1e-9).squeeze(-1)
        self.points = pts[self.inside]

    @property
    def model(self) -> SPIModel:
        return self._model[0]

    def cache(self) -> Tensor:
        """``log I`` on the cube ``(1, 1, n, n, n)``, differentiable w.r.t. the field's parameters."""
        field = self.model.field
        vals = field.log_intensity(self.points.to(self.model.q.device))
        full = vals.detach().min().expand(self.n**3).clone()
        full = full.index_put((self.inside.to(vals.device),), vals)
        return full.reshape(1, 1, self.n, self.n, self.n)

    def loglik(self, images: Tensor, pixels: Tensor, cache: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Profile log-likelihood ``(B, G)`` (up to terms without ``g``) and profile log scales ``(B, G)``."""
        model = self.model
        cache = self.cache() if cache is None else cache
        q = model.q[pixels]
        y = images.reshape(images.shape[0], -1)[:, pixels].to(q.dtype)
        bg = model.background_rate(pixels) if getattr(model, "background", None) is not None else None
        return grid_profile_loglik(cache, self.rotations, q, model.log_pixel_factor[pixels], y, self.q_max, self.chunk,
                                   bg=bg, screen=BACKGROUND_SCREEN)

    def __call__(self, images: Tensor, pixels: Tensor, pixel_weight: float = 1.0, beta: float = 1.0
                 ) -> GridPosterior:
        """E-step of a batch ``images (B, n_y, n_x)`` on ``pixels (M,)``.

        ``pixel_weight`` (``n_eligible / M``) scales the log-likelihood of a pixel subsample to the full
        pattern; ``beta`` (<= 1) tempers it (deterministic annealing, as Dragonfly's ``beta``): the
        marginal is then ``(1/beta) log mean_g p^beta``, whose gradient uses the tempered posterior.
        """
        if not beta > 0:
            raise ValueError(f"expected beta > 0, got {beta}")
        ll, log_s = self.loglik(images, pixels)
        # the terms without g: the profile Poisson log-likelihood is then exact (N log N - N - sum log y!)
        y = images.reshape(images.shape[0], -1)[:, pixels].to(ll.dtype)
        n_tot = y.sum(-1)
        const = n_tot * n_tot.clamp(min=1.0).log() - n_tot - torch.lgamma(y + 1).sum(-1)
        ll = (ll + const[:, None]) * (pixel_weight * beta)
        log_marg = (torch.logsumexp(ll, dim=-1) - math.log(ll.shape[-1])) / beta
        w = torch.softmax(ll.detach(), dim=-1)
        best = w.argmax(-1, keepdim=True)
        return GridPosterior(log_marg, w, log_s.gather(1, best).squeeze(1))
