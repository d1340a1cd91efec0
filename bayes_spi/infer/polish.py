r"""EMC polish: exact expectation-maximisation iterations over the whole data set, into the field's voxels.

The stochastic stages (EMC warm start, SVI) move the field by gradient steps on mini-batches; on a ~190 A
particle at ~1e3 photons they plateau at a speckle correlation of ~0.92 while Dragonfly's EMC, whose M-step
is the exact weighted average of all frames, goes on to ~0.96 (BENCHMARKS.md). This module runs that exact
iteration on the same model, starting from the fitted field:

E-step, every pattern ``i`` against every rotation ``g`` of the orientation grid (all good pixels, the field
read from its ``log I`` cube, the fluence scale profiled out)::

    w_ig = softmax_g(beta * log p(y_i | R_g, s_ig)),      s_ig = N_i / sum_k lambda_gk

M-step, for the intensity on the voxels ``v`` of the field's grid (trilinear splatting ``T_v(x)``)::

    I(v) = sum_g T_v(R_g q_k) Y_gk / sum_g T_v(R_g q_k) S_g w_k,     Y_gk = sum_i w_ig y_ik,  S_g = sum_i w_ig s_ig

(``Y`` is one matrix product per batch, so a pass costs about one E-step: ``N x G x M``).

With a measured background (``lambda_igk = s_ig w_k I_gk + c_ik``, ``c_ik = b_i B_k``; :mod:`bayes_spi.models.background`)
the M-step is EM with each count split into its signal and background parts: the signal share
``r_igk = s_ig w_k I_gk / lambda_igk`` gives ``Y_gk = sum_i w_ig r_igk y_ik``, the background share
``Z_i = sum_g w_ig sum_k (1 - r_igk) y_ik`` gives the background scale ``b = sum_i Z_i / (N sum_k B_k)`` (global)
or ``b_i = Z_i / sum_k B_k`` (per pattern), and ``s_ig`` is profiled numerically in the presence of the
background (:func:`~bayes_spi.models.background.profile_with_background`). Exactly, that costs ``N x G x M`` per
Newton step instead of one matrix product; each pattern's E-step is therefore evaluated exactly on its 256
best rotations under the background-free closed form of the background-subtracted counts (the rest, whose
weights are negligible once the poses are found, get weight 0; ``background_screen = 0``: all rotations). Friedel mates are
merged (``I(v) = I(-v)``); with a point group (the field's ``symmetry_fold``) every rotated pixel is splatted at
each folded image the field reads (:class:`~bayes_spi.symmetry.QFold`: one for ``I``), so the merge and the
symmetric field's read are adjoint and each voxel of the fundamental wedge averages ``|G|`` times the data. The result is the maximiser of the expected complete-data Poisson
log-likelihood (for nearest-voxel assignment; trilinear splatting is its usual smooth version, as in
Dragonfly). It is written into the field: a :class:`~bayes_spi.models.fields.SirenVoxelField`'s residual
(``log I - SIREN``) or a :class:`~bayes_spi.models.fields.VoxelField`'s grid; voxels no pixel reaches keep
their value.

Example::

    polish = EMCPolish(model, rotations, cache_grid=49)
    for it in range(3):
        stats = polish.iterate(dataset)   # one pass over the data; the field is updated in place
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bayes_spi.config.fields import FIELDS, names_text
from bayes_spi.guides.search import grid_log_lambda
from bayes_spi.models.fields import SirenVoxelField, VoxelField
from bayes_spi.models.spi import SPIModel
from bayes_spi.so3 import rotz_pi
from bayes_spi.trilinear import splat_cube

__all__ = ["MERGE_PSEUDO_PHOTONS", "REFINE_COARSE", "REFINE_SPREAD", "EMCPolish", "PolishStats", "background_em_step", "gamma_prior_sums",
           "polish_beta_schedule"]

#: the exact M-step's prior weight, in photons a voxel at the field's intensity before the merge (a Gamma prior: the
#: merge is ``(photons + P) / (exposure + P / I_before)``). With a voxel grid fine enough for 1e4-photon poses the
#: outer voxels receive a handful of photons or none, and the plain average put them at 0 or at Poisson noise: 2CEX
#: on 32x32 at 89^3 voxels, log-intensity correlation 0.58 where 45^3 gave 0.92 (BENCHMARKS.md, fourteenth session)
MERGE_PSEUDO_PHOTONS = 1.0

#: a pattern whose grid posterior spreads over at most this many rotations (``exp(H)``: narrower than the grid
#: spacing) is merged at its refined modes when an iteration refines (``EMCPolish.refine_spread``); broader ones
#: keep the grid's weights
REFINE_SPREAD = 2.0

#: coarse-to-fine refinement of the refined merges (``EMCPolish.refine_coarse``): first on the pixels inside this
#: fraction of the largest ``|q|``, then on all of them (as ``bayes-spi posterior`` refines). The merge's poses of
#: the 141 A 4-mer at 1e4 photons on 128x128: median error 0.58 -> 0.49 deg, 90th percentile 1.05 -> 0.90; on
#: 64x64 at 1e3 photons unchanged (0.95 deg); ~10% more time per refined iteration (BENCHMARKS.md, fifteenth session)
REFINE_COARSE: tuple[float, ...] = (0.5,)


def gamma_prior_sums(photons: Tensor, exposure: Tensor, log_prior: Tensor, pseudo_photons: float
                     ) -> tuple[Tensor, Tensor]:
    """The M-step's sums with a Gamma prior of ``P = pseudo_photons`` photons at the intensity ``exp(log_prior)``:
    ``(photons + P, exposure + P / I_prior)``, so that their ratio is the MAP intensity
    ``(y + P) / (e + P / I_prior)`` (the plain average ``y / e`` for ``P = 0``; ``I_prior`` where ``e I_prior << P``).

    Example:
        >>> import torch
        >>> num, den = gamma_prior_sums(torch.tensor([0.0, 400.0]), torch.tensor([0.01, 100.0]),
        ...                             torch.tensor([0.0, 0.0]), 1.0)
        >>> [round(float(x), 3) for x in num / den]   # no photons: ~the prior 1.0; many: ~400 / 100
        [0.99, 3.97]
    """
    if pseudo_photons < 0:
        raise ValueError(f"expected pseudo_photons >= 0, got {pseudo_photons}")
    return photons + pseudo_photons, exposure + pseudo_photons * torch.exp(-log_prior).clamp(max=1e30)


def polish_beta_schedule(start: float, iterations: int, refined: int = 1) -> list[float]:
    """The tempering of each exact EMC iteration: the grid iterations anneal geometrically from ``start``, the
    last ``refined`` (merged at refined modes, ``polish_refined``) run untempered.

    With ``g = iterations - refined`` grid iterations, ``beta_k = start ** (1 - k / g)`` for ``k < g`` (``start``
    first, never 1) and ``beta_k = 1`` for the refined ones; with no refined iteration the last grid iteration is
    at 1 instead (``beta_k = start ** (1 - k / (g - 1))``). A small ``start`` broadens the first iterations'
    orientation posteriors (deterministic annealing, as Dragonfly's ``beta``, whose automatic start is
    ``exp(-6.5 (photons x 1e-5) ** 0.15)`` ~ 0.04 at 1e3 photons per frame), so that a field fitted at the wrong
    poses is merged over many of them instead of reinforced at its own argmax; the refined merges then sharpen
    it at beta 1 (they only take patterns whose posterior is pinned).

    >>> [round(b, 4) for b in polish_beta_schedule(0.04, 3, refined=1)]
    [0.04, 0.2, 1.0]
    >>> [round(b, 4) for b in polish_beta_schedule(0.04, 4, refined=2)]
    [0.04, 0.2, 1.0, 1.0]
    >>> [round(b, 4) for b in polish_beta_schedule(0.04, 3, refined=0)]
    [0.04, 0.2, 1.0]
    >>> polish_beta_schedule(0.5, 1, refined=0), polish_beta_schedule(1.0, 2, refined=1)
    ([1.0], [1.0, 1.0])
    """
    if not 0 < start <= 1:
        raise ValueError(f"expected 0 < start <= 1, got {start}")
    if iterations < 0 or refined < 0:
        raise ValueError(f"expected iterations >= 0 and refined >= 0, got {iterations} and {refined}")
    refined = min(refined, iterations)
    g = iterations - refined
    if refined == 0:
        return [1.0] if g == 1 else [float(start ** (1 - k / (g - 1))) for k in range(g)]
    return [float(start ** (1 - k / g)) for k in range(g)] + [1.0] * refined


def background_em_step(log_lam: Tensor, y: Tensor, c: Tensor, Y: Tensor, beta: float = 1.0, screen: int = 0
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """E-step of a batch with an additive background, and the EM split of its counts (module docstring).

    Args:
        log_lam: ``(G, M)`` log signal per unit fluence (``log w_k + log I_gk``) at every grid rotation.
        y: ``(B, M)`` counts; c: ``(M,)`` or ``(B, M)`` expected background counts ``b B_k``.
        Y: ``(G, M)`` accumulator: the signal parts ``sum_i w_ig r_igk y_ik`` are added to it in place.
        beta: posterior tempering.
        screen: ``K > 0``: only each pattern's ``K`` best rotations under the background-free closed form on
            ``max(y - c, 0)`` are evaluated exactly (the others get weight 0); 0: all ``G``.

    Returns:
        ``ll (B, G)`` (profiled, :func:`~bayes_spi.models.background.profile_with_background`; ``-inf`` off the
        screen), profile ``log s (B, G)``, ``log w (B, G)`` and the background parts
        ``Z_i = sum_g w_ig sum_k (1 - r_igk) y_ik`` ``(B,)``.
    """
    from bayes_spi.models.background import profile_with_background

    cc = c[:, None, :] if c.dim() == 2 else c
    n_b, m = y.shape
    G = log_lam.shape[0]
    if 0 < screen < G:
        y0 = (y - c).clamp(min=0)
        lse = torch.logsumexp(log_lam, dim=-1)
        rank = y0 @ log_lam.T - y0.sum(-1, keepdim=True) * lse  # the closed form, background subtracted
        top = rank.topk(screen, dim=-1).indices  # (B, K)
        log_s = y.sum(-1, keepdim=True).clamp(min=1.0).log() - lse  # closed-form scales off the screen
    else:
        top = torch.arange(G, device=y.device).expand(n_b, G)
        log_s = torch.zeros(n_b, G, dtype=y.dtype, device=y.device)
    k = top.shape[1]
    step = max(1, int(4e6 // max(n_b * m, 1)))
    parts = [profile_with_background(log_lam[top[:, s:s + step]], y[:, None, :], cc) for s in range(0, k, step)]
    ll_top = torch.cat([p[0] for p in parts], -1)
    log_s_top = torch.cat([p[1] for p in parts], -1)
    logw_top = torch.log_softmax(beta * ll_top, dim=-1)
    w_top = logw_top.exp()
    z = torch.zeros(n_b, dtype=y.dtype, device=y.device)
    for s in range(0, k, step):
        idx = top[:, s:s + step]
        sig = (log_lam[idx] + log_s_top[:, s:s + step, None]).exp()  # (B, g, M)
        r = sig / (sig + cc).clamp(min=1e-30)  # the signal share of each count
        wy = w_top[:, s:s + step, None] * y[:, None, :]  # (B, g, M)
        Y.index_add_(0, idx.reshape(-1), (wy * r).reshape(-1, m))
        z += (wy * (1.0 - r)).sum((1, 2))
    ll = torch.full((n_b, G), -torch.inf, dtype=ll_top.dtype, device=y.device).scatter(1, top, ll_top)
    logw = torch.full((n_b, G), -torch.inf, dtype=ll_top.dtype, device=y.device).scatter(1, top, logw_top)
    return ll, log_s.scatter(1, top, log_s_top.to(log_s.dtype)), logw, z


def _entropy(w: Tensor, logw: Tensor) -> Tensor:
    """Entropy (nats) of each posterior ``w (B, G)`` with its logarithm ``logw``: ``(B,)`` (0 log 0 = 0)."""
    return -torch.where(w > 0, w * logw, torch.zeros_like(w)).sum(-1)


@dataclass
class PolishStats:
    """One EMC iteration: ``mean_loglik`` (E-step log marginal per pattern, profiled scale), ``mean_entropy``
    (nats) and ``mean_max_weight`` of the orientation posteriors, ``filled`` (fraction of voxels reached),
    ``change`` (RMS change of ``log I`` over the reached voxels), ``refined`` (fraction of the patterns merged
    at their refined modes)."""

    mean_loglik: float
    mean_entropy: float
    mean_max_weight: float
    filled: float
    change: float
    refined: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


class EMCPolish:
    """Exact EMC iterations on ``model``'s field (see the module docstring).

    Args:
        model: the fitted model; its field must be a :class:`SirenVoxelField` or a :class:`VoxelField`.
        rotations: ``(G, 3, 3)`` orientation grid.
        cache_grid: voxels per side of the ``log I`` cube the E-step reads.
        beta: posterior tempering (``<= 1``).
        batch_size: patterns per E-step batch.
        exclude: pattern indices never used (e.g. the held-out probe).
        max_patterns: merge only the first ``max_patterns`` patterns of the file per iteration (0: all), so that
            an iteration's cost does not grow with the data set (a merge of 20,000 frames already beats EMC's
            best on a 195 A particle at 1e3 photons, BENCHMARKS.md).
    """

    def __init__(self, model: SPIModel, rotations: Tensor, cache_grid: int = 49, beta: float = 1.0,
                 batch_size: int = 256, exclude: np.ndarray | None = None, max_patterns: int = 0,
                 refine_spread: float = 0.0, refine_modes: int = 2, refine_twins: bool = True) -> None:
        field = model.field
        if not isinstance(field, (SirenVoxelField, VoxelField)):
            raise ValueError(f"expected a field with voxels ({names_text(n for n, k in FIELDS.items() if k.voxels)}), "
                             f"got {type(field).__name__}")
        if not 0 < beta <= 1:
            raise ValueError(f"expected 0 < beta <= 1, got {beta}")
        self.model = model
        self.rotations = rotations.to(model.q.device, model.q.dtype)
        self.cache_grid = int(cache_grid)
        self.beta = float(beta)
        self.batch_size = int(batch_size)
        self.exclude = np.asarray([] if exclude is None else exclude, dtype=np.int64)
        if max_patterns < 0:
            raise ValueError(f"expected max_patterns >= 0, got {max_patterns}")
        self.max_patterns = int(max_patterns)
        #: with a measured background: rotations per pattern evaluated exactly (ranked first by the closed form on
        #: background-subtracted counts; 0: all, the E-step then costs B x G x M per Newton step)
        self.background_screen = 256
        if refine_spread < 0 or refine_modes < 1:
            raise ValueError(f"expected refine_spread >= 0 and refine_modes >= 1, got {refine_spread} and {refine_modes}")
        #: patterns whose grid posterior spreads over at most this many rotations (``exp(H)``) are merged at their
        #: refined modes instead of the grid rotations (0: never); see :meth:`_refined_modes`
        self.refine_spread = float(refine_spread)
        self.refine_modes = int(refine_modes)
        #: also refine the Rz(pi) twin of each refined grid rotation: on a sharp field the coarse grid's best
        #: rotation sits in the twin's basin for ~10% of 2CEX's patterns at 1e3 photons on 64x64, the true pose
        #: refined beats it by ~35 nats (BENCHMARKS.md); with the twin refined too, the better basin is found
        self.refine_twins = bool(refine_twins)
        #: Gauss-Newton iterations of each refinement (steps capped at half the grid spacing)
        self.refine_iterations = 3
        #: coarse-to-fine refinement: fractions of the largest pixel ``|q|``; each refinement first runs on the pixels
        #: inside each of them, in order, then on all pixels (``()``: all pixels only); see :meth:`_refined_modes`
        self.refine_coarse: tuple[float, ...] = REFINE_COARSE
        #: photons a voxel of the M-step's Gamma prior at the field's current intensity (0: the plain average)
        self.pseudo_photons = MERGE_PSEUDO_PHOTONS
        G = self.rotations.shape[0]
        #: the grid's typical spacing (rad): the volume of SO(3) (pi^2 in the angle-axis ball measure, 8 pi^2 in
        #: Haar units of rad^3) over G
        self.spacing = (8 * math.pi ** 2 / max(G, 1)) ** (1 / 3)

    @torch.no_grad()
    def iterate(self, dataset: Any, pixels: Tensor | None = None,
                progress: Callable[[int, int], None] | None = None, dist: Any = None) -> PolishStats:
        """One pass over ``dataset``: E-step on every pattern, exact M-step, field updated in place.

        ``pixels``: flat indices of the good pixels to use (default: ``dataset.mask``). ``dist``: a
        :class:`~bayes_spi.infer.distributed.Dist` with more than one rank shares the E-step's batches out
        round-robin and sums ``Y``, ``S`` and the statistics over ranks before the (identical) M-step."""
        from bayes_spi.infer.outputs import field_log_cache

        model, field = self.model, self.model.field
        if pixels is None:
            mask = torch.as_tensor(np.asarray(dataset.mask).reshape(-1), device=model.q.device)
            pixels = torch.nonzero(mask).squeeze(-1)
        q = model.q[pixels]
        log_w = model.log_pixel_factor[pixels]
        q_max = model.q_max
        cache = field_log_cache(field, self.cache_grid, q_max)
        G, M = self.rotations.shape[0], q.shape[0]
        # log lambda of every grid rotation at every pixel, once per pass (the cube is fixed during the E-step)
        log_lam = grid_log_lambda(cache, self.rotations, q, log_w, q_max, chunk=512)  # (G, M)
        lse = torch.logsumexp(log_lam, dim=-1)  # (G,)
        Y = torch.zeros(G, M, dtype=q.dtype, device=q.device)
        S = torch.zeros(G, dtype=q.dtype, device=q.device)
        ll_sum = ent_sum = wmax_sum = 0.0
        n_used = n_refined = 0
        n = field.n_voxel if isinstance(field, SirenVoxelField) else field.n
        # the M-step's sums of the patterns merged at their refined modes, splatted batch by batch
        num_ref = torch.zeros(n, n, n, dtype=q.dtype, device=q.device)
        den_ref = torch.zeros(n, n, n, dtype=q.dtype, device=q.device)
        pw = log_w.exp()
        background = getattr(model, "background", None)
        bg_sum = torch.zeros((), dtype=q.dtype, device=q.device)
        n_total = int(getattr(dataset, "n_patterns", 0)) or len(dataset)
        if self.max_patterns:
            n_total = min(n_total, self.max_patterns)
        sharded = dist is not None and dist.active
        batches = (dataset.iter_batches(self.batch_size, shuffle=False) if not sharded else
                   ((idx, dataset.read(idx)) for b, idx in enumerate(dataset.batch_indices(self.batch_size, shuffle=False))
                    if dist.owns_block(b)))
        for idx, counts in batches:
            if self.max_patterns and int(idx[0]) >= self.max_patterns:
                break
            keep = ~np.isin(idx, self.exclude) & (idx < (self.max_patterns or np.iinfo(np.int64).max))
            if not keep.any():
                continue
            y = torch.as_tensor(counts[keep], device=q.device).reshape(int(keep.sum()), -1)[:, pixels].to(q.dtype)
            if background is not None:
                kept = torch.as_tensor(idx[keep], device=q.device)
                c = model.background_rate(pixels, kept if background.mode == "per-pattern" else None)
                ll, log_s, logw, bg_part = background_em_step(log_lam, y, c.to(q.dtype), Y, self.beta,
                                                              self.background_screen)
                if background.mode == "per-pattern":  # EM: b_i = Z_i / sum_k B_k
                    background.set_scale(bg_part / background.rate[pixels].sum().clamp(min=1e-30), kept)
                bg_sum += bg_part.sum()
                w = logw.exp()
            else:
                n_tot = y.sum(-1, keepdim=True)
                ll = y @ log_lam.T - n_tot * lse  # (B, G): profiled Poisson log-likelihood (up to terms in y)
                log_s = n_tot.clamp(min=1.0).log() - lse  # profile log scales (B, G)
                logw = torch.log_softmax(self.beta * ll, dim=-1)
                w = logw.exp()
                w_grid = w
                if self.refine_spread > 0:
                    pinned = _entropy(w, logw).exp() <= self.refine_spread
                    if bool(pinned.any()):
                        R, wy, ws = self._refined_modes(cache, w[pinned], y[pinned], q, log_w, q_max)
                        self._splat(R, wy, ws, q, pw, num_ref, den_ref, chunk=64)
                        w_grid = torch.where(pinned[:, None], torch.zeros_like(w), w)
                        n_refined += int(pinned.sum())
                Y += w_grid.T @ y
                S += (w_grid * log_s.exp()).sum(0)
            if background is not None:
                S += (w * log_s.exp()).sum(0)
            ll_sum += float((torch.logsumexp(ll, -1) - math.log(G)).sum())
            ent_sum += float(_entropy(w, logw).sum())
            wmax_sum += float(w.max(-1).values.sum())
            n_used += y.shape[0]
            if progress is not None:
                progress(len(idx) * (dist.world_size if sharded else 1), n_total)
        if sharded:  # the sums over all ranks' patterns: every rank then makes the same M-step
            dist.all_reduce_(Y)
            dist.all_reduce_(S)
            dist.all_reduce_(bg_sum)
            sums = dist.all_reduce_(torch.tensor([ll_sum, ent_sum, wmax_sum, float(n_used)], dtype=torch.float64,
                                                 device=Y.device)).tolist()
            ll_sum, ent_sum, wmax_sum, n_used = sums[0], sums[1], sums[2], int(round(sums[3]))
        if background is not None and background.mode == "global" and n_used:
            # EM: b = sum_i Z_i / (N sum_k B_k)
            background.set_scale(bg_sum / (n_used * background.rate[pixels].sum().clamp(min=1e-30)))
        if sharded and self.refine_spread > 0:
            dist.all_reduce_(num_ref)
            dist.all_reduce_(den_ref)
            n_refined = int(round(float(dist.all_reduce_(torch.tensor([float(n_refined)], dtype=torch.float64,
                                                                            device=Y.device)))))
        num, den = num_ref, den_ref
        self._splat(self.rotations, Y, S, q, pw, num, den, chunk=256)  # the grid rotations' sums
        num = num + num.flip(0, 1, 2)  # Friedel: I(q) = I(-q)
        den = den + den.flip(0, 1, 2)
        reached = den > 1e-6 * float(den.max())
        before = self._grid_log_intensity(num.shape[0])  # the field the merge replaces
        if self.pseudo_photons > 0:
            # MAP under a Gamma prior centred on the field before the merge: `pseudo_photons` photons a voxel at
            # its intensity, so a voxel few photons reach keeps the field's value instead of a noisy or zero one
            num, den = gamma_prior_sums(num, den, before.to(num.dtype), self.pseudo_photons)
        log_i = torch.log(num.clamp(min=1e-30) / den.clamp(min=1e-30))
        # a reached voxel with no photons: floor at the smallest positive merged intensity
        pos = reached & (num > 0)
        floor = float(log_i[pos].min()) if bool(pos.any()) else 0.0
        log_i = torch.where(num > 0, log_i, torch.full_like(log_i, floor))
        change = self._write(log_i, reached, before)
        m = max(n_used, 1)
        return PolishStats(ll_sum / m, ent_sum / m, wmax_sum / m, float(reached.double().mean()), change,
                           n_refined / m)

    def _splat(self, R: Tensor, photons: Tensor, exposure: Tensor, q: Tensor, pw: Tensor, num: Tensor, den: Tensor,
               chunk: int) -> None:
        """Add the M-step sums of rotations ``R (P, 3, 3)`` with their weighted counts ``photons (P, M)`` and
        weighted scales ``exposure (P,)`` into ``num`` and ``den`` ``(n, n, n)``: trilinear splatting of the rotated
        pixels (one pass of weights for the photons and the exposure), at every folded image the field reads
        with a point group (fields.py), ``chunk`` rotations at a time."""
        field = self.model.field
        fold = field.symmetry_fold
        for j in range(0, R.shape[0], chunk):
            x = torch.einsum("pij,mj->pmi", R[j:j + chunk], q).reshape(-1, 3)
            vals = torch.stack([photons[j:j + chunk].reshape(-1), (exposure[j:j + chunk, None] * pw[None]).reshape(-1)],
                               -1)
            for xi in (x[None] if fold is None else fold(x)):
                both = splat_cube(xi, vals, num.shape[0], field.q_max)
                num += both[..., 0]
                den += both[..., 1]

    def _refined_modes(self, cache: Tensor, w: Tensor, y: Tensor, q: Tensor, log_w: Tensor, q_max: float
                       ) -> tuple[Tensor, Tensor, Tensor]:
        """The merge terms of patterns whose grid posterior is concentrated: their ``refine_modes`` best grid
        rotations moved to the modes of their likelihood (:func:`~bayes_spi.posterior.local.refine_on_cache`,
        all pixels, the fluence profiled), weighted by their Laplace evidence (tempered by ``beta``); modes
        within a tenth of the grid spacing of a better one are merged into it, weights under 1e-3 dropped.

        Args:
            cache: ``(1, 1, n, n, n)`` the ``log I`` cube the E-step reads.
            w: ``(P, G)`` grid posteriors; y: ``(P, M)`` counts.

        Returns:
            rotations ``(P', 3, 3)``, weighted counts ``w y`` ``(P', M)`` and weighted profile scales ``w s``
            ``(P',)`` of the kept modes (``P' <= P * refine_modes``).
        """
        from bayes_spi.posterior.local import distinct_modes, refine_on_cache

        k = min(self.refine_modes, w.shape[1])
        w_top, top = w.topk(k, dim=-1)  # (P, K)
        # a grid rotation whose weight is negligible is not refined (most patterns: one mode)
        live = (w_top >= 1e-3) | (torch.arange(k, device=w.device) == 0)
        starts = self.rotations[top]  # (P, K, 3, 3)
        if self.refine_twins:
            # the Rz(pi) twin of every live start too: columns K..2K-1 (live where the start is)
            starts = torch.cat([starts, starts @ rotz_pi(dtype=starts.dtype, device=starts.device)], dim=1)
            live = torch.cat([live, live], dim=1)
        pat, slot = torch.nonzero(live, as_tuple=True)
        step = math.degrees(0.5 * self.spacing)
        begin = starts[pat, slot][:, None]  # (L, 1, 3, 3)
        yl = y[pat]
        if self.refine_coarse:
            # the likelihood's basins are as wide as a speckle, which shrinks with |q|: a grid rotation half a
            # spacing off lies in the right basin of the inner pixels and often in a wrong one of the outer ones
            qn = q.norm(dim=-1)
            for frac in self.refine_coarse:
                inner = qn < float(frac) * qn.max()
                if int(inner.sum()) >= 16:
                    begin = refine_on_cache(cache, begin, q[inner], log_w[inner], yl[:, inner], q_max,
                                            n_iter=self.refine_iterations, max_step_deg=step).rotations
        modes = refine_on_cache(cache, begin, q, log_w, yl, q_max, n_iter=self.refine_iterations, max_step_deg=step)
        score = torch.full(live.shape, -math.inf, dtype=modes.log_evidence.dtype, device=w.device)
        score[pat, slot] = self.beta * modes.log_evidence[:, 0]
        rots = starts.clone()
        rots[pat, slot] = modes.rotations[:, 0]
        log_scale = torch.zeros_like(score)
        log_scale[pat, slot] = modes.log_scale[:, 0]
        # best first, so that a mode that converged onto a better one is dropped, not the better one
        order = score.argsort(dim=-1, descending=True)
        score, log_scale = score.gather(1, order), log_scale.gather(1, order)
        rots = rots.gather(1, order[..., None, None].expand(-1, -1, 3, 3))
        # a mode that converged onto a better one is the same mode
        score = torch.where(distinct_modes(rots, score, 0.1 * self.spacing), score, torch.full_like(score, -math.inf))
        wm = torch.softmax(score, dim=-1)
        wm = torch.where(wm >= 1e-3, wm, torch.zeros_like(wm))
        wm = wm / wm.sum(-1, keepdim=True)
        keep = wm > 0
        R = rots[keep]
        wy = (wm[..., None] * y[:, None, :])[keep]
        ws = (wm * log_scale.exp())[keep]
        return R, wy, ws

    def _grid_log_intensity(self, n: int) -> Tensor:
        """The field's ``log I`` at the centres of the ``n^3`` merge voxels ``(n, n, n)``."""
        from bayes_spi.grid import grid_q

        field = self.model.field
        q, _ = grid_q(n, field.q_max)
        qt = torch.as_tensor(q.reshape(-1, 3), dtype=self.model.q.dtype, device=self.model.q.device)
        return torch.cat([field.log_intensity(qt[i:i + 65536]) for i in range(0, qt.shape[0], 65536)]).reshape(n, n, n)

    def _write(self, log_i: Tensor, reached: Tensor, before: Tensor | None = None) -> float:
        """Set the field's voxels so that ``log I`` equals ``log_i`` on the reached voxels; RMS change (``before``:
        the field's ``log I`` on these voxels before, :meth:`_grid_log_intensity`, if the caller has it)."""
        from bayes_spi.grid import grid_q

        field = self.model.field
        n = log_i.shape[0]
        if before is None:
            before = self._grid_log_intensity(n)
        q, _ = grid_q(n, field.q_max)
        qt = torch.as_tensor(q.reshape(-1, 3), dtype=self.model.q.dtype, device=log_i.device)
        if isinstance(field, SirenVoxelField):
            # log I = offset + c tanh(g / c), g = siren + radial + residual: solve for the residual
            c = field.log_clamp
            target = ((log_i - field.log_offset) / c).clamp(-0.999999, 0.999999)
            g_target = c * torch.atanh(target)
            base = torch.cat([field._raw(qt[i:i + 65536] / field.q_max)
                              + field.radial_log_profile(qt[i:i + 65536].norm(dim=-1))
                              for i in range(0, qt.shape[0], 65536)]).reshape(n, n, n)
            new = torch.where(reached, g_target - base, field.residual.data[0, 0].to(base.dtype))
            field.residual.data.copy_(new.to(field.residual.dtype)[None, None])
        else:
            new = torch.where(reached, log_i - field.log_offset, field.grid.data[0, 0].to(log_i.dtype))
            field.grid.data.copy_(new.to(field.grid.dtype)[None, None])
        d = (self._grid_log_intensity(n) - before)[reached]
        return float(d.pow(2).mean().sqrt()) if d.numel() else 0.0
