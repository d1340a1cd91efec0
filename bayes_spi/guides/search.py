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

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from bayes_spi.models.spi import SPIModel
from bayes_spi.so3 import random_rotmat, super_fibonacci_rotmat
from bayes_spi.trilinear import sample_cube

__all__ = ["BACKGROUND_SCREEN", "SEARCH_TABLE_NUMBERS", "GridSearchBase", "OrientationSearch", "cube_points",
           "grid_log_lambda", "grid_profile_loglik", "orientation_grid", "search_grid", "search_pixels_for"]

#: with a measured background, rotations per pattern evaluated exactly by the search and the EMC stages
#: (the others are ranked by the closed form on background-subtracted counts; see :func:`grid_profile_loglik`)
BACKGROUND_SCREEN: int = 64


def orientation_grid(n_rotations: int, grid: str = "fibonacci", seed: int = 12345, symmetry: str | None = None
                     ) -> Tensor:
    """The search's rotation grid ``(G, 3, 3)`` (float32).

    Without a point group: ``n_rotations`` rotations of SO(3). With ``symmetry`` (a
    :func:`bayes_spi.symmetry.point_group` name), poses are defined modulo ``R ~ g R``, so the grid covers only
    the pose fundamental zone at the spacing of a full grid of ``n_rotations * |G|``: ``grid="fibonacci"``
    keeps the rotations of that Super-Fibonacci spiral inside the zone (about ``n_rotations``),
    ``grid="random"`` maps ``n_rotations`` Haar-random rotations into it.
    """
    from bayes_spi.symmetry import point_group

    group = point_group(symmetry)
    gen = torch.Generator().manual_seed(seed)
    if grid == "fibonacci":
        if group.is_trivial:
            return random_rotmat(1, generator=gen)[0] @ super_fibonacci_rotmat(n_rotations)
        return torch.as_tensor(group.fundamental_zone_grid(n_rotations * group.order, seed), dtype=torch.float32)
    if grid == "random":
        rots = random_rotmat(n_rotations, generator=gen)
        if group.is_trivial:
            return rots
        return torch.as_tensor(group.canonical_pose(rots.double().numpy())[0], dtype=torch.float32)
    raise ValueError(f"expected grid 'fibonacci' or 'random', got {grid!r}")


def search_grid(n_rotations: int, n_keep: int, cache_grid: int, grid: str = "fibonacci", seed: int = 12345,
                symmetry: str | None = None) -> Tensor:
    """A search's :func:`orientation_grid` ``(G, 3, 3)`` after checking its settings: ``1 <= n_keep <= n_rotations``,
    ``cache_grid >= 3``, and at least ``n_keep`` rotations in the pose fundamental zone.

    Raises:
        ValueError: a setting out of range (named, with its value).
    """
    if n_rotations < n_keep or n_keep < 1:
        raise ValueError(f"expected 1 <= n_keep <= n_rotations, got n_keep={n_keep}, n_rotations={n_rotations}")
    if cache_grid < 3:
        raise ValueError(f"expected cache_grid >= 3, got {cache_grid}")
    rotations = orientation_grid(n_rotations, grid, seed, symmetry)
    if rotations.shape[0] < n_keep:
        raise ValueError(f"expected at least n_keep={n_keep} rotations in the fundamental zone of {symmetry}, got "
                         f"{rotations.shape[0]} (raise n_rotations)")
    return rotations


def cube_points(n: int, q_max: float, device: torch.device | str | None = None) -> Tensor:
    """``q`` of the voxels of the ``n^3`` cube over ``[-q_max, q_max]^3``, ``(n^3, 3)``, indexed ``[ix, iy, iz]``."""
    ax = torch.linspace(-q_max, q_max, n, device=device)
    return torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), dim=-1).reshape(-1, 3)


def grid_profile_loglik(cache: Tensor, rotations: Tensor, q: Tensor, log_w: Tensor, y: Tensor, q_max: float,
                        chunk: int = 1024, bg: Tensor | None = None, screen: int = 0) -> tuple[Tensor, Tensor]:
    """Poisson log-likelihood of patterns at every rotation of a grid, the fluence profiled out.

    Args:
        cache: ``(1, 1, n, n, n)`` ``log I`` on :func:`cube_points` (differentiable if it carries a gradient).
        rotations: ``(G, 3, 3)``; q: ``(M, 3)`` pixel ``q`` (1/A); log_w: ``(M,)`` log pixel factors;
        y: ``(B, M)`` counts; q_max: half-width of the cube (1/A).
    Returns:
        ``ll (B, G)`` = ``sum_k y_k log lambda_gk - N log sum_k lambda_gk`` (up to terms in ``y`` only) and the
        profile log scales ``log(N / sum_k lambda_gk)`` ``(B, G)`` (detached).

    With ``bg`` (expected background counts ``b B_k``, ``(M,)`` or ``(B, M)``) the rate is ``s lambda_gk + bg_k``
    and the scale is profiled numerically (:func:`bayes_spi.models.background.profile_with_background`, same
    ``ll`` convention), in chunks of rotations that keep ``B x g x M`` at about 4e6 numbers. That costs
    ``B x G x M`` per Newton step instead of one matrix product; with ``screen = K > 0`` only each pattern's ``K``
    best rotations under the background-free closed form on the background-subtracted counts ``max(y - bg, 0)``
    are evaluated exactly, the others get ``ll = -inf`` (and their closed-form scale).
    """
    if bg is not None:
        if 0 < screen < rotations.shape[0]:
            return _screened_loglik_bg(cache, rotations, q, log_w, y, q_max, bg, screen, chunk)
        return _grid_profile_loglik_bg(cache, rotations, q, log_w, y, q_max, bg)
    rots = rotations.to(q.device, q.dtype)
    parts = []
    for s in range(0, rots.shape[0], chunk):
        log_lam = grid_log_lambda(cache, rots[s:s + chunk], q, log_w, q_max)  # (g, M)
        parts.append(_profile_loglik(y, log_lam, torch.logsumexp(log_lam, dim=-1)))
    return torch.cat([p[0] for p in parts], -1), torch.cat([p[1] for p in parts], -1)


def grid_log_lambda(cache: Tensor, rotations: Tensor, q: Tensor, log_w: Tensor, q_max: float, chunk: int = 1024
                    ) -> Tensor:
    """``log lambda (G, M)`` = ``log I(R_g q_k) + log w_k`` of every rotation ``(G, 3, 3)`` at every pixel ``q (M, 3)``
    (log pixel factors ``log_w (M,)``), read from the ``log I`` cube (trilinear), ``chunk`` rotations at a time."""
    rots = rotations.to(q.device, q.dtype)
    return torch.cat([sample_cube(cache, torch.einsum("gij,mj->gmi", rots[s:s + chunk], q), q_max)
                      for s in range(0, rots.shape[0], chunk)]) + log_w


def _profile_loglik(y: Tensor, log_lam: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """``ll (B, G)`` and the profile log scales ``(B, G)`` (detached) of counts ``y (B, M)`` at the rates
    ``log_lam (G, M)`` with their log-sums ``lse (G,)`` (:func:`grid_profile_loglik`'s closed form)."""
    n_tot = y.sum(-1, keepdim=True)
    return y @ log_lam.T - n_tot * lse[None], (n_tot.clamp(min=1.0).log() - lse[None]).detach()


def _grid_profile_loglik_bg(cache: Tensor, rotations: Tensor, q: Tensor, log_w: Tensor, y: Tensor, q_max: float,
                            bg: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`grid_profile_loglik` with an additive background ``bg (M,)`` or ``(B, M)``."""
    from bayes_spi.models.background import profile_with_background

    rots = rotations.to(q.device, q.dtype)
    bg = bg.to(q.dtype)
    c = bg[:, None, :] if bg.dim() == 2 else bg
    step = max(1, int(4e6 // max(y.shape[0] * q.shape[0], 1)))
    lls, scales = [], []
    for s in range(0, rots.shape[0], step):
        log_lam = sample_cube(cache, torch.einsum("gij,mj->gmi", rots[s:s + step], q), q_max) + log_w  # (g, M)
        ll, log_s = profile_with_background(log_lam, y[:, None, :], c)  # (B, g)
        lls.append(ll)
        scales.append(log_s)
    return torch.cat(lls, -1), torch.cat(scales, -1)


def _screened_loglik_bg(cache: Tensor, rotations: Tensor, q: Tensor, log_w: Tensor, y: Tensor, q_max: float,
                        bg: Tensor, screen: int, chunk: int) -> tuple[Tensor, Tensor]:
    """:func:`grid_profile_loglik` with a background, exact on each pattern's ``screen`` best-ranked rotations."""
    from bayes_spi.models.background import profile_with_background

    with torch.no_grad():
        rank, log_s0 = grid_profile_loglik(cache.detach(), rotations, q, log_w, (y - bg).clamp(min=0), q_max, chunk)
        top = rank.topk(screen, dim=-1).indices  # (B, K)
    rots = rotations.to(q.device, q.dtype)[top]  # (B, K, 3, 3)
    log_lam = sample_cube(cache, torch.einsum("bkij,mj->bkmi", rots, q), q_max) + log_w  # (B, K, M)
    c = bg.to(q.dtype)
    ll_top, log_s_top = profile_with_background(log_lam, y[:, None, :], c[:, None, :] if c.dim() == 2 else c)
    ll = torch.full(rank.shape, -torch.inf, dtype=ll_top.dtype, device=ll_top.device).scatter(1, top, ll_top)
    return ll, log_s0.scatter(1, top, log_s_top.to(log_s0.dtype))


#: at most this many numbers (``G x M``) in a search's precomputed table (:meth:`OrientationSearch.fixed_pixels`):
#: 256 MiB in float32
SEARCH_TABLE_NUMBERS = 2**26


def search_pixels_for(n_rotations: int, good: Tensor, seed: int = 0, budget: int = SEARCH_TABLE_NUMBERS) -> Tensor:
    """The pixels ``(M,)`` an export's orientation search scores on: every good pixel ``good (P,)`` when the
    table ``n_rotations x P`` fits in ``budget`` numbers, else a fixed random subset (sorted) of
    ``budget // n_rotations`` of them (a 64x64 detector with 7,097 rotations: all; 128x128 with 16,384: 4,096).

    Example:
        >>> good = torch.arange(16384)
        >>> search_pixels_for(4096, good[:3700]).shape, search_pixels_for(16384, good).shape
        (torch.Size([3700]), torch.Size([4096]))
    """
    m = max(1, int(budget) // max(int(n_rotations), 1))
    if good.numel() <= m:
        return good
    pick = torch.randperm(good.numel(), generator=torch.Generator().manual_seed(seed))[:m]
    return good[pick.to(good.device)].sort().values


class GridSearchBase:
    """What every grid search holds and checks: the model (not a submodule), the rotation grid ``(G, 3, 3)``
    (:func:`search_grid`), ``n_keep``, the cache cube's size and ``q_max``, and the cached ``log I`` cubes
    ``(*cache_lead, n, n, n)`` behind :attr:`cache`, whose leading shape :meth:`cache_lead` gives
    (shared by :class:`OrientationSearch` and :class:`~bayes_spi.guides.class_search.ClassOrientationSearch`).
    """

    def __init__(self, model: torch.nn.Module, n_rotations: int, n_keep: int, cache_grid: int, seed: int,
                 grid: str, symmetry: str | None) -> None:
        self._model = [model]  # a list: not a submodule of whoever holds the search
        self.rotations = search_grid(n_rotations, n_keep, cache_grid, grid, seed, symmetry)
        self.last_log_scale: Tensor | None = None
        self.n_keep = int(n_keep)
        self.cache_grid = int(cache_grid)
        self.q_max = model.q_max
        self._cache: Tensor | None = None
        #: ``(pixels, log lambda (G, M), log-sums (G,))`` while :meth:`OrientationSearch.fixed_pixels` is active
        self._table: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self._model[0]

    def cache_lead(self) -> tuple[int, ...]:
        """The leading shape of the cache, before the cube ``(n, n, n)``."""
        return (1, 1)

    @property
    def cache(self) -> Tensor | None:
        """The cached ``log I`` cubes ``(*cache_lead(), n, n, n)`` (``None`` before the first refresh)."""
        return self._cache

    @cache.setter
    def cache(self, value: Tensor | None) -> None:
        n, lead = self.cache_grid, self.cache_lead()
        if value is not None and value.shape != (*lead, n, n, n):
            raise ValueError(f"expected a cache of shape {(*lead, n, n, n)}, got shape {tuple(value.shape)}")
        self._cache = value
        self._table = None


class OrientationSearch(GridSearchBase):
    """Top-``n_keep`` rotations of a fixed random grid of ``n_rotations`` for each pattern.

    Args:
        model: the model whose field and detector are searched against (not copied).
        n_rotations: grid size ``G``; spacing about ``(8 pi^2 / G)^(1/3)`` rad (4096: ~16 degrees).
        grid: ``"fibonacci"`` (default: the deterministic quasi-uniform Super-Fibonacci spiral, randomly
            rotated as a whole by ``seed``; no gaps) or ``"random"`` (Haar-random rotations from ``seed``).
        n_keep: proposals per pattern.
        cache_grid: voxels per side of the cached ``log I`` cube over ``[-q_max, q_max]^3``.
        seed: seed of the rotation grid.
        symmetry: the field's point group: the grid covers the pose fundamental zone only, ``n_rotations``
            rotations there, at the spacing of a full grid ``|G|`` times larger (:func:`orientation_grid`).
    """

    def __init__(self, model: SPIModel, n_rotations: int = 4096, n_keep: int = 2, cache_grid: int = 41,
                 seed: int = 12345, grid: str = "fibonacci", symmetry: str | None = None) -> None:
        super().__init__(model, n_rotations, n_keep, cache_grid, seed, grid, symmetry)

    @property
    def model(self) -> SPIModel:
        return self._model[0]

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-evaluate the field on the cache cube (call after the field changed)."""
        n = self.cache_grid
        q = cube_points(n, self.q_max, self.model.q.device)
        log_i = torch.cat([self.model.field.log_intensity(q[i:i + 65536]) for i in range(0, q.shape[0], 65536)])
        self._cache = log_i.reshape(1, 1, n, n, n)
        self._table = None

    @contextmanager
    def fixed_pixels(self, good: Tensor, seed: int = 0, budget: int = SEARCH_TABLE_NUMBERS) -> Iterator[Tensor]:
        """Within the block, searches on the pixels it yields (``good (P,)``, or the subset
        :func:`search_pixels_for` allows within ``budget``) read one precomputed ``log lambda`` table ``(G, M)``
        (and its log-sums) instead of interpolating the cube at every rotation for every batch.

        For a pass over many patterns with a fixed field and pixel set (the export): on 128x128 with 16,384
        rotations the interpolation cost ~1.5 s per pattern at 25 patterns a batch; the table makes each batch
        one matrix product. Without a background only (with one the search is screened per pattern: the pixels
        are chosen the same way, without a table).
        """
        pixels = search_pixels_for(self.rotations.shape[0], good, seed, budget)
        model = self.model
        if getattr(model, "background", None) is not None:
            yield pixels
            return
        if self._cache is None:
            self.refresh()
        log_lam = grid_log_lambda(self._cache, self.rotations, model.q[pixels], model.log_pixel_factor[pixels],
                                  self.q_max)
        self._table = (pixels, log_lam, torch.logsumexp(log_lam, dim=-1))
        try:
            yield pixels
        finally:
            self._table = None

    @torch.no_grad()
    def grid_loglik(self, images: Tensor, pixels: Tensor, chunk: int = 1024, return_log_scale: bool = False
                    ) -> Tensor | tuple[Tensor, Tensor]:
        """Profile log-likelihood ``(B, G)`` of every pattern at every grid rotation on ``pixels``.

        With ``return_log_scale`` also the profile (maximum-likelihood) log fluence scale
        ``log(N_i / sum_k lambda_gk)`` ``(B, G)``."""
        if self._cache is None:
            self.refresh()
        model = self.model
        q = model.q[pixels]  # (M, 3)
        y = images.reshape(images.shape[0], -1)[:, pixels].to(q.dtype)  # (B, M)
        if self._table is not None and torch.equal(self._table[0], pixels):
            ll, log_s = _profile_loglik(y, *self._table[1:])  # fixed_pixels: the same numbers, interpolated once
            return (ll, log_s) if return_log_scale else ll
        bg = model.background_rate(pixels) if getattr(model, "background", None) is not None else None
        ll, log_s = grid_profile_loglik(self._cache, self.rotations, q, model.log_pixel_factor[pixels], y, self.q_max,
                                        chunk, bg=bg, screen=BACKGROUND_SCREEN)
        return (ll, log_s) if return_log_scale else ll

    @torch.no_grad()
    def __call__(self, images: Tensor, pixels: Tensor) -> Tensor:
        """Best ``n_keep`` grid rotations per pattern: ``images (B, n_y, n_x)`` -> ``(B, n_keep, 3, 3)``."""
        ll, log_s = self.grid_loglik(images, pixels, return_log_scale=True)
        top = ll.topk(self.n_keep, dim=-1).indices  # (B, S)
        # the profile fluence scale at the best rotation: the guide's closed-form scale estimate
        self.last_log_scale = log_s.gather(1, top[:, :1]).squeeze(1)
        return self.rotations.to(images.device)[top]
