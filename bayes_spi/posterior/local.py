r"""Local pose refinement on the cached field: every hypothesis and its Rz(pi) twin moved to its mode.

The guide's hypotheses are coarse: the orientation search returns grid rotations (~10 degrees apart at
7,000 rotations) and the encoder's heads sit a few degrees from the likelihood's peak. Choosing between a
pose ``R`` and its Ewald twin ``R Rz(pi)`` at those unrefined points is a coin toss whenever the grid's
quantisation costs more likelihood than the twin's (small) deficit; yet with the true intensity the two are
decisively different at ~1e3 photons (``benchmarks/oracle_twin.py``: median log-likelihood ratio ~50 for
2CEX on the 32x32 reference detector). So every candidate *and its twin* is refined before they are
compared.

The objective is the Poisson log-likelihood with the fluence scale profiled out (``s = N / sum lambda``),
on the voxel cache of ``log I`` that the orientation search already keeps (trilinear interpolation), so
a refinement costs a few table look-ups per pixel, not field evaluations::

    f(eps) = sum_k y_k log lt_k - N log sum_k lt_k,      lt_k = w_k I(R exp(hat(eps)) q_k)
    g = J^T (y - N p),   H = N (J^T diag(p) J - (J^T p)(J^T p)^T)   (the profiled Fisher information)
    J_k = d log I(R exp(hat(eps)) q_k) / d eps |_0 = q_k x (R^T grad_x log I(R q_k))

(``p = lt / sum lt``); damped Gauss-Newton steps with a per-hypothesis step cap and back-tracking, so
``f`` never decreases. At the end each hypothesis carries its Laplace spread ``sqrt(diag(H^-1))`` and its
Laplace evidence ``f + 3/2 log 2 pi - 1/2 log det H`` for the weights.

Example:
    >>> import torch
    >>> from bayes_spi.so3 import random_rotmat
    >>> n = 17
    >>> ax = torch.linspace(-1, 1, n)
    >>> x = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1)
    >>> cache = (-8 * ((x - torch.tensor([0.3, 0.1, 0.0])) ** 2).sum(-1)).reshape(1, 1, n, n, n)
    >>> q = torch.randn(200, 3) * 0.4
    >>> out = refine_on_cache(cache, random_rotmat(2, generator=torch.Generator().manual_seed(0))[:, None],
    ...                       q, torch.zeros(200), torch.ones(2, 200), q_max=1.0)
    >>> out.rotations.shape, out.loglik.shape, out.sigmas.shape
    (torch.Size([2, 1, 3, 3]), torch.Size([2, 1]), torch.Size([2, 1, 3]))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from bayes_spi.so3 import geodesic_angle, rotvec_to_rotmat, rotz_pi

__all__ = ["LocalModes", "distinct_modes", "profile_loglik", "refine_on_cache", "refine_with_twins"]


def profile_loglik(log_lt: Tensor, y: Tensor) -> Tensor:
    """``sum_k y_k log lt_k - N log sum_k lt_k`` for log rates ``(..., B, M)`` (scale-free) and counts ``(B, M)``."""
    n_tot = y.sum(-1)
    return (y * log_lt).sum(-1) - n_tot * torch.logsumexp(log_lt, dim=-1)


@dataclass
class LocalModes:
    """Refined hypotheses of ``B`` patterns, ``K`` each.

    Attributes:
        rotations: ``(B, K, 3, 3)`` the modes found.
        loglik: ``(B, K)`` profiled log-likelihood at the modes (up to terms in the counts only).
        sigmas: ``(B, K, 3)`` Laplace standard deviations (rad) of the right-perturbation ``eps``.
        log_evidence: ``(B, K)`` ``loglik + 3/2 log(2 pi) - 1/2 log det H``.
        log_scale: ``(B, K)`` profile (maximum-likelihood) log fluence scale ``log(N / sum lt)``.
    """

    rotations: Tensor
    loglik: Tensor
    sigmas: Tensor
    log_evidence: Tensor
    log_scale: Tensor

    def select(self, idx: Tensor) -> "LocalModes":
        """The hypotheses ``idx (B, K')`` of every pattern, in that order."""
        return LocalModes(*(_take(t, idx) for t in (self.rotations, self.loglik, self.sigmas, self.log_evidence,
                                                     self.log_scale)))


def _take(t: Tensor, idx: Tensor) -> Tensor:
    """``t (B, K, ...)`` at hypotheses ``idx (B, K')`` along dim 1: ``(B, K', ...)``."""
    return t.gather(1, idx.reshape(idx.shape + (1,) * (t.dim() - 2)).expand(idx.shape + t.shape[2:]))


def _read(cache: Tensor, x: Tensor) -> Tensor:
    """Trilinear values of ``cache (1, 1, n, n, n)`` at ``x (..., 3)`` in units of the half-width (border outside)."""
    cube = cache.permute(0, 1, 4, 3, 2)  # [iz, iy, ix]: grid_sample's (D, H, W) for (x, y, z) coordinates
    out = F.grid_sample(cube, x.reshape(1, -1, 1, 1, 3), mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(x.shape[:-1])


def _terms(cache: Tensor, R: Tensor, q: Tensor, log_w: Tensor, y: Tensor, q_max: float, grad: bool,
           bg: Tensor | None = None):
    """Profiled log-likelihood ``(B, K)``; with ``grad`` also ``g (B, K, 3)``, ``H (B, K, 3, 3)``, log scale.

    The Jacobian is formed in the lab frame of the points ``x = R q``: ``q x (R^T grad_x) = R^T (x x grad_x)``,
    so ``g`` and ``H`` are sums over pixels of ``x x grad_x`` and are rotated back once per hypothesis. With a
    background ``bg`` (expected counts ``(M,)`` or ``(B, M)``) the scale is profiled numerically
    (:func:`bayes_spi.models.background.profile_with_background`) and ``g``, ``H`` come from
    :func:`_background_terms`.
    """
    # points in units of q_max and the cube's axes reversed to grid_sample's (x, y, z) = (W, H, D) order: the
    # same trilinear read as bayes_spi.trilinear.sample_cube without its per-call rescale and flip copies
    x = torch.einsum("bkij,mj->bkmi", R.to(cache.dtype), (q / q_max).to(cache.dtype))
    if grad:
        x.requires_grad_(True)
    c = None
    with torch.set_grad_enabled(grad):
        log_lt = _read(cache, x).to(q.dtype) + log_w
        if bg is not None:
            from bayes_spi.models.background import profile_with_background

            c = bg[:, None, :] if bg.dim() == 2 else bg
            ll_bg, log_s_bg = profile_with_background(log_lt.detach(), y[:, None, :], c)
            if not grad:
                return ll_bg, None, None, None
        elif not grad:
            return profile_loglik(log_lt, y[:, None, :]), None, None, None
        (gx,) = torch.autograd.grad(log_lt.sum(), x)
    log_lt = log_lt.detach()
    # (B, K, M, 3): R jac, jac = q x (R^T grad_x) (the q_max of x and of grad_x cancel)
    jac_lab = torch.cross(x.detach(), gx, dim=-1).to(q.dtype)
    Rt = R.transpose(-1, -2)
    if c is not None:  # g and H are linear and quadratic in the Jacobian: formed in the lab frame, rotated back
        g_lab, H_lab, log_s = _background_terms(log_lt, log_s_bg, y, c, jac_lab)
        return ll_bg, (Rt @ g_lab[..., None]).squeeze(-1), Rt @ H_lab @ R, log_s
    ll = profile_loglik(log_lt, y[:, None, :])
    n_tot = y.sum(-1)[:, None]  # (B, 1)
    lse = torch.logsumexp(log_lt, dim=-1)  # (B, K)
    p = torch.exp(log_lt - lse[..., None])  # softmax over pixels, (B, K, M)
    resid = y[:, None, :] - n_tot[..., None] * p
    g_lab = (resid[..., None, :] @ jac_lab).squeeze(-2)  # (B, K, 3)
    jp = (p[..., None, :] @ jac_lab).squeeze(-2)
    H_lab = n_tot[..., None, None] * ((jac_lab * p[..., None]).transpose(-1, -2) @ jac_lab
                                      - jp[..., :, None] * jp[..., None, :])
    g = (Rt @ g_lab[..., None]).squeeze(-1)
    H = Rt @ H_lab @ R
    log_scale = n_tot.clamp(min=1.0).log() - lse
    return ll, g, H, log_scale


def _background_terms(log_lt: Tensor, log_s: Tensor, y: Tensor, c: Tensor, jac: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient and profiled Fisher information with a background ``c``: rate ``mu = s lt + c``, the scale ``s``
    at its profile value. ``g = sum_k (y_k r_k - s lt_k) J_k`` (``r = s lt / mu``, the signal share of a count;
    envelope theorem), ``H = I_ee - I_es I_es^T / I_ss`` with ``I = sum_k (s lt_k)^2 / mu_k (J_k, 1)(J_k, 1)^T``
    (the Schur complement that profiles ``log s`` out; with ``c = 0`` it is the background-free ``H``)."""
    sig = (log_lt + log_s[..., None]).exp()  # s lt (B, K, M)
    mu = sig + c
    v = sig * sig / mu.clamp(min=1e-30)
    resid = y[:, None, :] * sig / mu.clamp(min=1e-30) - sig
    g = torch.einsum("bkm,bkma->bka", resid, jac)
    jv = torch.einsum("bkm,bkma->bka", v, jac)
    v_sum = v.sum(-1).clamp(min=1e-30)[..., None, None]
    H = torch.einsum("bkm,bkma,bkmc->bkac", v, jac, jac) - jv[..., :, None] * jv[..., None, :] / v_sum
    return g, H, log_s


@torch.no_grad()
def refine_on_cache(cache: Tensor, R0: Tensor, q: Tensor, log_w: Tensor, y: Tensor, q_max: float,
                    n_iter: int = 6, max_step_deg: float = 4.0, damping: float = 1e-3,
                    bg: Tensor | None = None) -> LocalModes:
    """Move every hypothesis ``R0 (B, K, 3, 3)`` uphill on the profiled likelihood of its pattern.

    Args:
        cache: ``(1, 1, n, n, n)`` ``log I`` over ``[-q_max, q_max]^3``.
        R0: ``(B, K, 3, 3)`` starting rotations.
        q: ``(M, 3)`` pixel ``q`` (1/A); log_w: ``(M,)`` log pixel factors; y: ``(B, M)`` counts.
        q_max: half-width of the cube (1/A).
        n_iter: Gauss-Newton iterations.
        max_step_deg: largest rotation per iteration (degrees); halved per hypothesis after a rejected step.
        damping: Levenberg damping, relative to the mean diagonal of ``H``.
        bg: expected background counts ``b B_k`` ``(M,)`` or ``(B, M)`` (the rate is ``s lt + bg``; the scale is
            profiled numerically, :func:`bayes_spi.models.background.profile_with_background`); ``None``: none.

    Returns:
        :class:`LocalModes`; ``loglik`` is never below the starting value.
    """
    if R0.dim() != 4 or R0.shape[-2:] != (3, 3):
        raise ValueError(f"expected R0 of shape (B, K, 3, 3), got shape {tuple(R0.shape)}")
    if y.dim() != 2 or y.shape[0] != R0.shape[0] or y.shape[1] != q.shape[0]:
        raise ValueError(f"expected y of shape ({R0.shape[0]}, {q.shape[0]}), got shape {tuple(y.shape)}")
    y = y.to(q.dtype)
    R = R0.to(q.dtype).clone()
    cap = torch.full(R.shape[:2], math.radians(max_step_deg), dtype=q.dtype, device=q.device)
    eye = torch.eye(3, dtype=q.dtype, device=q.device)
    if bg is not None:
        bg = bg.to(q.dtype)
    ll, g, H, log_scale = _terms(cache, R, q, log_w, y, q_max, grad=True, bg=bg)
    for _ in range(n_iter):
        lam = damping * H.diagonal(dim1=-2, dim2=-1).mean(-1).clamp(min=1e-6)[..., None, None]
        step = torch.linalg.solve(H + lam * eye, g[..., None]).squeeze(-1)  # (B, K, 3)
        norm = step.norm(dim=-1).clamp(min=1e-12)
        step = step * (cap / norm).clamp(max=1.0)[..., None]
        R_new = R @ rotvec_to_rotmat(step)
        # one pass at the trial point gives its value and, if accepted, its g and H (a rejected step keeps
        # the terms of R: the same numbers as re-evaluating there)
        ll_new, g_new, H_new, ls_new = _terms(cache, R_new, q, log_w, y, q_max, grad=True, bg=bg)
        ok = ll_new > ll
        R = torch.where(ok[..., None, None], R_new, R)
        cap = torch.where(ok, cap, cap * 0.5)
        ll = torch.where(ok, ll_new, ll)
        g = torch.where(ok[..., None], g_new, g)
        H = torch.where(ok[..., None, None], H_new, H)
        log_scale = torch.where(ok, ls_new, log_scale)
    Hs = H + 1e-6 * H.diagonal(dim1=-2, dim2=-1).mean(-1).clamp(min=1e-6)[..., None, None] * eye
    cov = torch.linalg.inv(Hs)
    sig = cov.diagonal(dim1=-2, dim2=-1).clamp(min=1e-10).sqrt().clamp(max=math.pi)
    logdet = torch.linalg.slogdet(Hs).logabsdet
    evidence = ll + 1.5 * math.log(2 * math.pi) - 0.5 * logdet
    return LocalModes(R, ll, sig, evidence, log_scale)


def distinct_modes(rotations: Tensor, score: Tensor, tol_rad: float) -> Tensor:
    """Which of the modes ``rotations (B, K, 3, 3)`` with scores ``score (B, K)`` are distinct: ``(B, K)`` bool. A
    mode within ``tol_rad`` of a kept mode scored at least as high is the same mode (refinements that converged
    onto one) and is dropped; the first mode is always kept."""
    keep = torch.ones(score.shape, dtype=torch.bool, device=score.device)
    for j in range(1, score.shape[1]):
        d = geodesic_angle(rotations[:, j:j + 1], rotations[:, :j])  # (B, j)
        dup = ((d < tol_rad) & keep[:, :j] & (score[:, :j] >= score[:, j:j + 1])).any(-1)
        keep[:, j] &= ~dup
    return keep


@torch.no_grad()
def refine_with_twins(cache: Tensor, R0: Tensor, q: Tensor, log_w: Tensor, y: Tensor, q_max: float,
                      n_keep: int = 4, merge_deg: float = 2.0, bg: Tensor | None = None,
                      coarse_to_fine: Sequence[float] = (), **kwargs: float) -> tuple[LocalModes, Tensor]:
    """Refine the candidates ``R0 (B, K, 3, 3)`` and their Rz(pi) twins; keep the best ``n_keep`` distinct modes.

    The candidates are first ranked (on the cache, unrefined) and the ``ceil(n_keep / 2)`` best distinct ones
    are refined together with their twins; modes closer than ``merge_deg`` to a better one are dropped.
    ``bg``: expected background counts ``(M,)`` or ``(B, M)`` (see :func:`refine_on_cache`).
    ``coarse_to_fine``: fractions in ``(0, 1)`` of the largest ``|q|``: the refinement first runs on the pixels
    inside each, in order, then on all of them (a start a few degrees off lies in a wrong speckle basin of the
    outer pixels but in the right one of the inner ones).

    Returns:
        the kept :class:`LocalModes` ``(B, n_keep, ...)``, best first, and their normalised Laplace
        weights ``(B, n_keep)`` (a dropped or missing mode has weight 0).
    """
    n_b, n_k = R0.shape[:2]
    rz = rotz_pi(dtype=q.dtype, device=q.device)
    y = y.to(q.dtype)
    n_seed = min(n_k, max(1, (n_keep + 1) // 2))
    if bg is not None:
        bg = bg.to(q.dtype)
    ll0, *_ = _terms(cache, R0.to(q.dtype), q, log_w, y, q_max, grad=False, bg=bg)
    order = ll0.argsort(dim=-1, descending=True)[:, :n_seed]
    seeds = _take(R0.to(q.dtype), order)
    cand = torch.cat([seeds, seeds @ rz], dim=1)  # (B, 2 S, 3, 3)
    if coarse_to_fine:
        if any(not 0 < float(c) < 1 for c in coarse_to_fine):
            raise ValueError(f"expected coarse_to_fine fractions in (0, 1), got {tuple(coarse_to_fine)}")
        qn = q.norm(dim=-1)
        for frac in coarse_to_fine:
            inner = qn < float(frac) * qn.max()
            if int(inner.sum()) >= 16:
                cand = refine_on_cache(cache, cand, q[inner], log_w[inner], y[:, inner], q_max,
                                       bg=None if bg is None else bg[..., inner], **kwargs).rotations
    modes = refine_on_cache(cache, cand, q, log_w, y, q_max, bg=bg, **kwargs)
    modes = modes.select(modes.log_evidence.argsort(dim=-1, descending=True))
    keep = distinct_modes(modes.rotations, modes.log_evidence, math.radians(merge_deg))
    logw = torch.where(keep, modes.log_evidence, torch.full_like(modes.log_evidence, -math.inf))
    w = torch.softmax(logw, dim=-1)
    # the kept modes first (stable), then the dropped ones with weight 0
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[:, :n_keep]
    return modes.select(order), _take(w, order)
