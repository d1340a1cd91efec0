"""Coarse orientation search: the best rotations of a fixed grid for each pattern, at almost no cost.

The guide's encoder learns slowly from scratch; an exhaustive search over a fixed set of ``G`` rotations
against the current intensity gives every pattern good pose proposals from the first steps (the EMC
idea, used here only to propose hypotheses to the guide's mixture and to teach the encoder).

It is cheap because the rotated pixel coordinates ``R_g q_k`` do not depend on the pattern: the field
is cached on a voxel grid (refreshed every few steps), looked up once at the ``G x M`` rotated points,
and the Poisson log-likelihood of every pattern at every grid rotation, with the fluence scale profiled
out in closed form (``s = sum y / sum lambda``), is one matrix product::

    ll_ig = sum_k y_ik log lambda_gk  -  N_i log sum_k lambda_gk      (up to terms without g)

Example:
    >>> import torch
    >>> from bayes_spi.models.fields import SirenField
    >>> from bayes_spi.models.spi import SPIModel
    >>> model = SPIModel(SirenField(0.125), torch.randn(64, 3) * 0.03, torch.full((64,), 1e-3))
    >>> search = OrientationSearch(model, n_rotations=128, n_keep=2)
    >>> search(torch.rand(3, 8, 8), torch.arange(64)).shape
    torch.Size([3, 2, 3, 3])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bayes_spi.models.spi import SPIModel
from bayes_spi.so3 import random_rotmat, super_fibonacci_rotmat

__all__ = ["OrientationSearch"]


class OrientationSearch:
    """Top-``n_keep`` rotations of a fixed random grid of ``n_rotations`` for each pattern.

    Args:
        model: the model whose field and detector are searched against (not copied).
        n_rotations: grid size ``G``; spacing about ``(8 pi^2 / G)^(1/3)`` rad (4096: ~16 degrees).
        grid: ``"fibonacci"`` (default: the deterministic quasi-uniform Super-Fibonacci spiral, randomly
            rotated as a whole by ``seed``; no gaps) or ``"random"`` (Haar-random rotations from ``seed``).
        n_keep: proposals per pattern.
        cache_grid: voxels per side of the cached ``log I`` cube over ``[-q_max, q_max]^3``.
        seed: seed of the rotation grid.
    """

    def __init__(self, model: SPIModel, n_rotations: int = 4096, n_keep: int = 2, cache_grid: int = 41,
                 seed: int = 12345, grid: str = "fibonacci") -> None:
        if n_rotations < n_keep or n_keep < 1:
            raise ValueError(f"expected 1 <= n_keep <= n_rotations, got n_keep={n_keep}, n_rotations={n_rotations}")
        if cache_grid < 3:
            raise ValueError(f"expected cache_grid >= 3, got {cache_grid}")
        self._model = [model]  # a list: not a submodule of whoever holds the search
        gen = torch.Generator().manual_seed(seed)
        if grid == "fibonacci":
            self.rotations = random_rotmat(1, generator=gen)[0] @ super_fibonacci_rotmat(n_rotations)
        elif grid == "random":
            self.rotations = random_rotmat(n_rotations, generator=gen)
        else:
            raise ValueError(f"expected grid 'fibonacci' or 'random', got {grid!r}")
        self.last_log_scale: Tensor | None = None
        self.n_keep = int(n_keep)
        self.cache_grid = int(cache_grid)
        self.q_max = float(model.q.norm(dim=-1).max())
        self._cache: Tensor | None = None

    @property
    def model(self) -> SPIModel:
        return self._model[0]

    @property
    def cache(self) -> Tensor | None:
        """The cached ``log I`` cube ``(1, 1, n, n, n)`` (``None`` before the first refresh)."""
        return self._cache

    @cache.setter
    def cache(self, value: Tensor | None) -> None:
        n = self.cache_grid
        if value is not None and value.shape != (1, 1, n, n, n):
            raise ValueError(f"expected a cache of shape (1, 1, {n}, {n}, {n}), got shape {tuple(value.shape)}")
        self._cache = value

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-evaluate the field on the cache cube (call after the field changed)."""
        n = self.cache_grid
        dev = self.model.q.device
        ax = torch.linspace(-self.q_max, self.q_max, n, device=dev)
        q = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), dim=-1).reshape(-1, 3)
        log_i = torch.cat([self.model.field.log_intensity(q[i:i + 65536]) for i in range(0, q.shape[0], 65536)])
        self._cache = log_i.reshape(1, 1, n, n, n)

    @torch.no_grad()
    def grid_loglik(self, images: Tensor, pixels: Tensor, chunk: int = 1024, return_log_scale: bool = False
                    ) -> Tensor | tuple[Tensor, Tensor]:
        """Profile log-likelihood ``(B, G)`` of every pattern at every grid rotation on ``pixels``.

        With ``return_log_scale`` also the profile (maximum-likelihood) log fluence scale
        ``log(N_i / sum_k lambda_gk)`` ``(B, G)``."""
        if self._cache is None:
            self.refresh()
        model = self.model
        dev = model.q.device
        q = model.q[pixels]  # (M, 3)
        log_w = model.log_pixel_factor[pixels]
        y = images.reshape(images.shape[0], -1)[:, pixels].to(q.dtype)  # (B, M)
        n_tot = y.sum(-1, keepdim=True)
        rots = self.rotations.to(dev, q.dtype)
        out, scales = [], []
        log_n = n_tot.clamp(min=1.0).log()
        for s in range(0, rots.shape[0], chunk):
            qr = torch.einsum("gij,mj->gmi", rots[s:s + chunk], q) / self.q_max  # (g, M, 3) in [-1, 1]
            # grid_sample: volume (D=ix, H=iy, W=iz) wants coordinates ordered (iz, iy, ix)
            log_i = F.grid_sample(self._cache, qr.flip(-1)[None, :, :, None, :], mode="bilinear",
                                  padding_mode="border", align_corners=True).reshape(qr.shape[:2])
            log_lam = log_i + log_w  # (g, M)
            lse = torch.logsumexp(log_lam, dim=-1)[None]  # (1, g)
            out.append(y @ log_lam.T - n_tot * lse)
            if return_log_scale:
                scales.append(log_n - lse)
        if return_log_scale:
            return torch.cat(out, dim=-1), torch.cat(scales, dim=-1)
        return torch.cat(out, dim=-1)

    @torch.no_grad()
    def __call__(self, images: Tensor, pixels: Tensor) -> Tensor:
        """Best ``n_keep`` grid rotations per pattern: ``images (B, n_y, n_x)`` -> ``(B, n_keep, 3, 3)``."""
        ll, log_s = self.grid_loglik(images, pixels, return_log_scale=True)
        top = ll.topk(self.n_keep, dim=-1).indices  # (B, S)
        # the profile fluence scale at the best rotation: the guide's closed-form scale estimate
        self.last_log_scale = log_s.gather(1, top[:, :1]).squeeze(1)
        return self.rotations.to(images.device)[top]
