r"""Semi-amortized refinement: move the guide's best hypotheses to the likelihood's mode, Laplace spreads.

The amortized encoder puts each hypothesis centre a few degrees from where the model's likelihood
peaks (the *amortization gap*), while its spreads describe the likelihood's width (fractions of a degree
at ~1e4 photons). Taken as is, that posterior is far too confident about the wrong place: on the
foundation benchmark the 90% cones hold the true pose for only a small fraction of the patterns. Here
each pattern's ``n_refine`` most probable hypotheses are refined on **all** good pixels, given the trained
field, by Gauss-Newton (Fisher scoring) steps on ``theta = (eps, log s)``, ``R = C exp(hat(eps))``::

    f(theta) = log p(y | R, s) + log p(log s)
    g = J^T a + d/dlog s log p(log s),     H = J^T diag(-c) J + prior curvature
    J = d log lambda / d theta (M x 4): for pixel q, x = R q and d x / d eps_a = R (e_a x q), so
        J_eps = grad_x log I(x)^T R hat(e_a) q (one backward pass of the field); 1 for log s
    a, c = first and second derivative of the per-pixel log-likelihood in log lambda

(for Poisson ``a = y - lambda``, ``c = -lambda``; any likelihood works through autograd), with a step cap
and a back-tracking check. At the end the posterior of hypothesis ``j`` is the Laplace approximation
``N((eps, log s); mode, H^-1)`` (full 3 x 3 pose covariance, then marginal ``log s``), and the hypothesis
weights are the Laplace evidences ``w_j ∝ exp(f_j) det(H_j)^{-1/2}`` (the pose prior is uniform).
Hypotheses that converge onto the same mode (closer than 3 standard deviations) are merged (the
weaker is dropped), so a mode is not counted twice.

On the foundation benchmark (2CEX, 32x32, 1e4 photons) this takes the median error of the posterior mean
pose from 4.8 to 1.0 degrees and the 90% cone coverage from 5% to 77%. The rest of the gap is the
trained field's own error, which this posterior (conditional on the field) does not see: see the
temperatures of :mod:`bayes_spi.posterior.calibration`. Cost: about 3 field evaluations with gradient per
iteration at ``n_refine x M`` points per pattern (~10 patterns/s at 32x32 on 2 CPU cores); with
``log_intensity=cached_log_intensity(cube, q_max)`` the field is read from a cached ``log I`` cube instead,
7-10x faster: ``bayes-spi posterior``'s default, on a cube four times as fine as the orientation search's
(:func:`bayes_spi.posterior.netcdf.export_cache_grid`), fine enough that the same temperatures hold.

Example::

    post = MixturePosterior.from_guide(trained.guide.posterior(images, pixels))
    refined = refine_posterior(trained.model, images, post, n_refine=2)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from bayes_spi.models.spi import SPIModel
from bayes_spi.posterior.mixture import MixturePosterior
from bayes_spi.so3 import geodesic_angle, rotvec_to_rotmat

__all__ = ["cached_log_intensity", "class_log_intensity", "refine_posterior"]

_EYE3 = torch.eye(3)


def _evaluate(model: SPIModel, C: Tensor, log_s: Tensor, y: Tensor, pixels: Tensor,
              log_intensity: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Log rates ``L (J, B, M)`` at ``(C, log s)`` and ``d L / d (eps, log s)`` ``(J, B, M, 4)`` (exact, by
    autograd through ``log_intensity``'s input; default the model's field). With a measured background ``b B``
    (the model's ``background``; a per-pattern scale enters as its geometric mean, the patterns' indices being
    unknown here) ``L`` is the log of the total rate and both derivatives carry the signal share
    ``s w I / (s w I + b B)``."""
    q = model.q[pixels]  # (M, 3)
    log_intensity = model.field.log_intensity if log_intensity is None else log_intensity
    with torch.enable_grad():
        x = torch.einsum("jbik,mk->jbmi", C, q).detach().requires_grad_(True)
        log_i = log_intensity(x)
        (grad_x,) = torch.autograd.grad(log_i.sum(), x)
    L = log_s[..., None] + model.log_pixel_factor[pixels] + log_i.detach()
    # d x / d eps_a = C (e_a x q) = -C hat(q) e_a  ->  J_a = grad_x . C (e_a x q) = (C^T grad_x) . (e_a x q)
    body = torch.einsum("jbik,jbmi->jbmk", C, grad_x)  # C^T grad_x, (J, B, M, 3)
    jac = torch.cross(q.expand_as(body), body, dim=-1)  # (e_a x q) . v = e_a . (q x v)
    jac = torch.cat([jac, torch.ones_like(jac[..., :1])], dim=-1)  # (J, B, M, 4): the log s column
    bg = model.background_rate(pixels) if getattr(model, "background", None) is not None else None
    if bg is not None:
        L_tot = torch.logaddexp(L, bg.to(L.dtype).clamp(min=1e-30).log())
        jac = jac * (L - L_tot).exp()[..., None]
        L = L_tot
    return L, jac


def _pixel_derivatives(model: SPIModel, L: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Log-likelihood ``(J, B)`` summed over pixels, and its first/second derivatives in ``L`` ``(J, B, M)``."""
    with torch.enable_grad():
        L = L.detach().requires_grad_(True)
        ll = model.likelihood(L).log_prob(y)
        (a,) = torch.autograd.grad(ll.sum(), L, create_graph=True)
        (c,) = torch.autograd.grad(a.sum(), L)
    return ll.detach().sum(-1), a.detach(), c.detach()


def _prior_terms(model: SPIModel, log_s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``log p(log s)`` and its first and second derivatives, each ``(J, B)``."""
    with torch.enable_grad():
        ls = log_s.detach().requires_grad_(True)
        prior = model.scale_prior(ls.shape[-1])
        lp = prior.log_prob(ls.exp()) + ls
        (d1,) = torch.autograd.grad(lp.sum(), ls, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), ls)
    return lp.detach(), d1.detach(), d2.detach()


def _newton_system(model: SPIModel, log_s: Tensor, L: Tensor, jac: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Objective ``f (J, B)``, gradient ``g (J, B, 4)`` and Gauss-Newton precision ``H (J, B, 4, 4)``."""
    ll, a, c = _pixel_derivatives(model, L, y)
    lp, d1, d2 = _prior_terms(model, log_s)
    g = torch.einsum("jbm,jbmp->jbp", a, jac)
    g[..., 3] += d1
    H = torch.einsum("jbm,jbmp,jbmq->jbpq", (-c).clamp(min=0), jac, jac)
    H[..., 3, 3] += (-d2).clamp(min=0)
    return ll + lp, g, H


def cached_log_intensity(cache: Tensor, q_max: float) -> Callable[[Tensor], Tensor]:
    """``log I`` read trilinearly from a cube ``(1, 1, n, n, n)`` over ``[-q_max, q_max]^3`` (differentiable in the
    points): the field's stand-in for :func:`refine_posterior` (``posterior.h5`` refines on the same cube)."""
    from bayes_spi.trilinear import sample_cube

    return lambda x: sample_cube(cache, x, q_max).to(x.dtype)


def class_log_intensity(fields: Sequence[Callable[[Tensor, Tensor | None], Tensor]], classes: Tensor,
                        z: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """``log I`` for a batch whose patterns each have their own class and latent (a heterogeneous fit).

    Args:
        fields: per class ``c``, ``log I_c(x, z)`` at points ``x (J, B_c, M, 3)`` and latents ``z (B_c, d)``
            (or ``None``), differentiable in ``x``: e.g. ``ConditionalField.log_intensity``, or a read of
            class ``c``'s cached cube that ignores ``z``.
        classes: ``(B,)`` each pattern's class (e.g. its most probable one).
        z: ``(B, d)`` each pattern's latent (e.g. the mean of ``q(z | y, c)``), or ``None``.

    Returns:
        ``x (J, B, M, 3) -> log I (J, B, M)``: pattern ``b`` read from ``fields[classes[b]]`` at ``z[b]``
        (each class's field evaluated at its own patterns only): :func:`refine_posterior`'s ``log_intensity``.
    """
    if classes.dim() != 1:
        raise ValueError(f"expected classes of shape (B,), got shape {tuple(classes.shape)}")
    if z is not None and (z.dim() != 2 or z.shape[0] != classes.shape[0]):
        raise ValueError(f"expected z of shape ({classes.shape[0]}, d), got shape {tuple(z.shape)}")
    if classes.numel() and not 0 <= int(classes.min()) <= int(classes.max()) < len(fields):
        raise ValueError(f"expected classes in [0, {len(fields)}), got values in "
                         f"[{int(classes.min())}, {int(classes.max())}]")
    members = [torch.nonzero(classes == c).squeeze(-1) for c in range(len(fields))]

    def log_intensity(x: Tensor) -> Tensor:
        if x.dim() < 3 or x.shape[-3] != classes.shape[0]:
            raise ValueError(f"expected points of shape (..., {classes.shape[0]}, M, 3), got shape {tuple(x.shape)}")
        parts = x.new_zeros(x.shape[:-1])
        for c, sel in enumerate(members):
            if sel.numel():
                parts = parts.index_copy(-2, sel, fields[c](x.index_select(-3, sel),
                                                             None if z is None else z[sel]).to(x.dtype))
        return parts

    return log_intensity


@torch.no_grad()
def refine_posterior(
    model: SPIModel,
    images: Tensor,
    post: MixturePosterior,
    n_refine: int = 2,
    n_iter: int = 3,
    pixels: Tensor | None = None,
    max_step: float = 0.1,
    log_intensity: Callable[[Tensor], Tensor] | None = None,
    coarse_to_fine: Sequence[float] = (),
) -> MixturePosterior:
    """Refine each pattern's ``n_refine`` most probable hypotheses (see the module doc).

    Args:
        model: the trained model (field, priors, likelihood), eval mode.
        images: ``(B, n_y, n_x)`` counts.
        post: the guide's posterior for these patterns (:meth:`MixturePosterior.from_guide`).
        n_refine: hypotheses kept and refined per pattern (``J <= K``).
        n_iter: Gauss-Newton iterations.
        pixels: ``(M,)`` flat pixel indices of the likelihood (default: every pixel; pass the good ones).
        max_step: cap on the pose update per iteration (rad).
        log_intensity: ``log I`` at points ``(..., 3)``, differentiable (default: the model's field); e.g. a
            trilinear read of a cached cube (:func:`cached_log_intensity`: ~10x faster, interpolated).
        coarse_to_fine: fractions in ``(0, 1)`` of the largest ``|q|`` among ``pixels``: first refine on the
            pixels inside each (in the order given, e.g. ``(0.5,)``), then on all of them. The likelihood's basins
            are as wide as a speckle, which shrinks with ``|q|``: a start a few degrees off lies in a wrong basin of
            the outer pixels but in the right one of the inner ones (the 141 A assembly at 1e3 photons: median
            error 1.6 -> 1.1 deg on 64x64, 4.4 -> 1.1 deg on 128x128; BENCHMARKS.md).

    Returns:
        A :class:`MixturePosterior` with ``K = J`` refined hypotheses (ordered as the guide ranked them),
        full tangent covariances and Laplace-evidence weights; ``refined=True``.
    """
    if coarse_to_fine:
        if any(not 0 < float(c) < 1 for c in coarse_to_fine):
            raise ValueError(f"expected coarse_to_fine fractions in (0, 1), got {tuple(coarse_to_fine)}")
        all_px = (pixels if pixels is not None
                  else torch.arange(images.shape[-2] * images.shape[-1], device=post.rotations.device))
        qn = model.q.reshape(-1, 3).norm(dim=-1)[all_px]
        for frac in coarse_to_fine:
            inner = all_px[qn < float(frac) * qn.max()]
            if inner.numel() >= 16:
                post = refine_posterior(model, images, post, n_refine, n_iter, inner, max_step, log_intensity)
                n_refine = min(n_refine, post.n_hypotheses)
        return refine_posterior(model, images, post, n_refine, n_iter, all_px, max_step, log_intensity)
    n_batch, k = post.weights.shape
    if not 1 <= n_refine <= k:
        raise ValueError(f"expected 1 <= n_refine <= {k} (the guide's hypotheses), got {n_refine}")
    if n_iter < 0:
        raise ValueError(f"expected n_iter >= 0, got {n_iter}")
    dev = post.rotations.device
    if pixels is None:
        pixels = torch.arange(images.shape[-2] * images.shape[-1], device=dev)
    y = images.reshape(n_batch, -1)[:, pixels].to(post.rotations.dtype)
    top = post.weights.topk(n_refine, dim=-1).indices.T  # (J, B)
    cols = torch.arange(n_batch, device=dev).expand(n_refine, n_batch)
    C = post.rotations[cols, top]  # (J, B, 3, 3)
    ls = post.log_scale_loc[cols, top].clone()  # (J, B)
    L, jac = _evaluate(model, C, ls, y, pixels, log_intensity)
    f, g, H = _newton_system(model, ls, L, jac, y)
    eye = torch.eye(4, dtype=C.dtype, device=dev)
    for _ in range(n_iter):
        damp = 1e-6 * H.diagonal(dim1=-2, dim2=-1).sum(-1).clamp(min=1.0)
        step = torch.linalg.solve(H + damp[..., None, None] * eye, g.unsqueeze(-1)).squeeze(-1)
        norm = step[..., :3].norm(dim=-1, keepdim=True)
        step = torch.cat([step[..., :3] * (max_step / norm.clamp(min=max_step)), step[..., 3:].clamp(-0.5, 0.5)], -1)
        accepted = torch.zeros_like(f, dtype=torch.bool)
        for frac in (1.0, 0.25):
            todo = ~accepted
            if not todo.any():
                break
            C_new = C @ rotvec_to_rotmat(frac * step[..., :3])
            ls_new = ls + frac * step[..., 3]
            L_new, jac_new = _evaluate(model, C_new, ls_new, y, pixels, log_intensity)
            f_new, g_new, H_new = _newton_system(model, ls_new, L_new, jac_new, y)
            ok = todo & (f_new >= f)
            C = torch.where(ok[..., None, None], C_new, C)
            ls = torch.where(ok, ls_new, ls)
            f = torch.where(ok, f_new, f)
            g = torch.where(ok[..., None], g_new, g)
            H = torch.where(ok[..., None, None], H_new, H)
            accepted |= ok
    damp = 1e-6 * H.diagonal(dim1=-2, dim2=-1).sum(-1).clamp(min=1.0)
    cov = torch.linalg.inv(H + damp[..., None, None] * eye)
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    pose_cov = cov[..., :3, :3] + 1e-12 * _EYE3.to(cov)
    tril = torch.linalg.cholesky(pose_cov)
    sd_ls = cov[..., 3, 3].clamp(min=1e-12).sqrt()
    log_w = f + 0.5 * torch.linalg.slogdet(cov).logabsdet
    # merge hypotheses that converged onto the same mode: keep the one with the larger evidence
    sd_max = pose_cov.diagonal(dim1=-2, dim2=-1).amax(-1).sqrt()  # (J, B)
    for i in range(n_refine):
        for j in range(i + 1, n_refine):
            close = geodesic_angle(C[i], C[j]) < 3.0 * torch.maximum(sd_max[i], sd_max[j])
            drop_j = close & (log_w[j] <= log_w[i])
            drop_i = close & ~drop_j
            log_w[j] = torch.where(drop_j, torch.full_like(log_w[j], -torch.inf), log_w[j])
            log_w[i] = torch.where(drop_i, torch.full_like(log_w[i], -torch.inf), log_w[i])
    weights = torch.softmax(log_w, dim=0)
    return MixturePosterior(
        rotations=C.transpose(0, 1).contiguous(),
        pose_tril=tril.transpose(0, 1).contiguous(),
        weights=weights.T.contiguous(),
        log_scale_loc=ls.T.contiguous(),
        log_scale_sd=sd_ls.T.contiguous(),
        n_encoder=0,
        refined=True,
    )
