r"""Per-pattern posterior as a mixture on SO(3) x R+, its draws and its summaries.

For pattern ``b`` with ``K`` hypotheses (weights ``w_bk``)::

    k      ~ Categorical(w_b)
    R | k  = C_bk exp(hat(L_bk z)),       z ~ N(0, I_3)     (tangent Gaussian, right perturbation)
    log s | k ~ N(m_bk, t_bk^2)

``L_bk`` is a lower-triangular factor of the tangent covariance (diagonal ``diag(sigma)`` for the
amortized guide's :class:`~bayes_spi.distributions.so3.LieNormalSO3`, full after the Laplace refinement
of :mod:`bayes_spi.posterior.refine`). Poses follow the package convention: pixel ``q`` samples
``I(R q)``.

**Posterior mean pose.** We use the chordal L2 mean ``M = argmin_{M in SO(3)} E ||R - M||_F^2``, i.e.
``E[R]`` projected onto SO(3) (SVD), estimated from the draws: the Bayes estimate under the chordal loss.
For the genuine two-fold ambiguity (a mode ``C`` with weight ``w > 1/2`` and its partner ``C Rz(pi)``)
``E[R] = C diag(2w - 1, 2w - 1, 1)`` up to the spreads, whose projection is ``C``: the mean sits on the
dominant mode, not between the two. **Credible cones** are geodesic balls around ``M``: their radius at
mass ``p`` is the ``p``-quantile of the angle between the draws and ``M``; the "mod Rz(pi)" radius
measures the angle to the nearer of ``M`` and ``M Rz(pi)``.

Draws are reproducible per pattern: pattern ``i`` uses the random stream ``numpy.random.default_rng(
[seed, i])``, so the result does not depend on the batch size or on which other patterns are drawn.

Example:
    >>> import torch
    >>> post = MixturePosterior(torch.eye(3).expand(2, 1, 3, 3), torch.diag_embed(torch.full((2, 1, 3), 0.05)),
    ...                         torch.ones(2, 1), torch.zeros(2, 1), torch.full((2, 1), 0.1))
    >>> d = draw(post, 100, indices=[0, 1])
    >>> d.rotations.shape, d.log_scale.shape
    (torch.Size([100, 2, 3, 3]), torch.Size([100, 2]))
    >>> s = summarize(post, d)
    >>> s.cone_radius.shape           # (B, levels): 50% and 90% cones, radians
    torch.Size([2, 2])
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from bayes_spi.guides.amortized import PosePosterior
from bayes_spi.so3 import geodesic_angle, rotvec_to_rotmat, rotz_pi

__all__ = [
    "LEVELS",
    "MixturePosterior",
    "PosteriorDraws",
    "PosteriorSummary",
    "draw",
    "chordal_mean",
    "summarize",
    "hdi_from_draws",
]

#: default credible masses of the cones and intervals
LEVELS: tuple[float, ...] = (0.5, 0.9)


@dataclass
class MixturePosterior:
    """Posterior parameters of ``B`` patterns with ``K`` hypotheses each (see the module doc).

    Attributes:
        rotations: ``(B, K, 3, 3)`` hypothesis centres ``C``.
        pose_tril: ``(B, K, 3, 3)`` lower-triangular factor ``L`` of the tangent covariance (rad).
        weights: ``(B, K)`` hypothesis probabilities (rows sum to 1).
        log_scale_loc, log_scale_sd: ``(B, K)`` Normal parameters of ``log s`` given the hypothesis.
        n_encoder: how many of the ``K`` hypotheses come from the guide's encoder (the first ones).
        refined: whether the centres were refined (:func:`bayes_spi.posterior.refine.refine_posterior`).
    """

    rotations: Tensor
    pose_tril: Tensor
    weights: Tensor
    log_scale_loc: Tensor
    log_scale_sd: Tensor
    n_encoder: int = 0
    refined: bool = False

    def __post_init__(self) -> None:
        if self.rotations.dim() != 4 or tuple(self.rotations.shape[-2:]) != (3, 3):
            raise ValueError(f"expected rotations of shape (B, K, 3, 3), got shape {tuple(self.rotations.shape)}")
        b, k = self.rotations.shape[:2]
        for name, shape in (("pose_tril", (b, k, 3, 3)), ("weights", (b, k)), ("log_scale_loc", (b, k)),
                            ("log_scale_sd", (b, k))):
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"expected {name} of shape {shape}, got shape {got}")

    @property
    def n_hypotheses(self) -> int:
        """``K``."""
        return int(self.rotations.shape[1])

    @property
    def pose_sigmas(self) -> Tensor:
        """``(B, K, 3)`` marginal tangent standard deviations (rad), ``sqrt(diag(L L^T))``."""
        return self.pose_tril.pow(2).sum(-1).sqrt()

    @classmethod
    def from_guide(cls, post: PosePosterior) -> "MixturePosterior":
        """From the amortized guide's :class:`PosePosterior` (diagonal spreads, one scale posterior per pattern)."""
        k = post.rotations.shape[1]
        return cls(
            rotations=post.rotations,
            pose_tril=torch.diag_embed(post.sigmas),
            weights=post.weights,
            log_scale_loc=post.scale_loc[:, None].expand(-1, k),
            log_scale_sd=post.scale_scale[:, None].expand(-1, k),
            n_encoder=int(post.n_encoder),
        )

    def tempered(self, pose_temperature: float = 1.0, scale_temperature: float = 1.0) -> "MixturePosterior":
        """Spreads multiplied by the temperatures: ``L -> T_pose L``, ``t -> T_scale t`` (weights unchanged)."""
        for name, value in (("pose_temperature", pose_temperature), ("scale_temperature", scale_temperature)):
            if not value > 0:
                raise ValueError(f"expected {name} > 0, got {value}")
        if pose_temperature == 1.0 and scale_temperature == 1.0:
            return self
        return replace(self, pose_tril=self.pose_tril * pose_temperature,
                       log_scale_sd=self.log_scale_sd * scale_temperature)

    def inflated(self, pose_variance: float) -> "MixturePosterior":
        """Every hypothesis' tangent covariance plus ``pose_variance I`` (rad^2): ``L -> chol(L L^T + v I)``, the
        pose error of the field itself (:mod:`bayes_spi.posterior.fielderror`) added to the photons' (weights and
        scale posteriors unchanged)."""
        if not pose_variance >= 0:
            raise ValueError(f"expected pose_variance >= 0, got {pose_variance}")
        if pose_variance == 0:
            return self
        eye = torch.eye(3, dtype=self.pose_tril.dtype, device=self.pose_tril.device)
        cov = self.pose_tril @ self.pose_tril.transpose(-1, -2) + pose_variance * eye
        return replace(self, pose_tril=torch.linalg.cholesky(cov))


@dataclass
class PosteriorDraws:
    """``D`` draws for ``B`` patterns: ``rotations (D, B, 3, 3)``, ``log_scale (D, B)``, ``hypothesis (D, B)`` int64."""

    rotations: Tensor
    log_scale: Tensor
    hypothesis: Tensor


@dataclass
class PosteriorSummary:
    """Per-pattern summaries (see :func:`summarize`); angles in radians.

    Attributes:
        mean_rotation: ``(B, 3, 3)`` chordal mean pose ``M``.
        angle_to_mean: ``(D, B)`` angle of each draw to ``M``.
        cone_radius: ``(B, L)`` credible-cone radii at ``levels``.
        cone_radius_mod_rotz: ``(B, L)`` the same with the angle to the nearer of ``M``, ``M Rz(pi)``.
        rotz_flip_mass: ``(B,)`` fraction of draws nearer ``M Rz(pi)`` than ``M``.
        scale_mean, scale_sd: ``(B,)`` exact mixture moments of ``s``.
        log_scale_mean, log_scale_sd: ``(B,)`` exact mixture moments of ``log s``.
        scale_hdi, scale_eti: ``(B, L, 2)`` highest-density and equal-tailed intervals of ``s`` from the draws.
        levels: the credible masses.
    """

    mean_rotation: Tensor
    angle_to_mean: Tensor
    cone_radius: Tensor
    cone_radius_mod_rotz: Tensor
    rotz_flip_mass: Tensor
    scale_mean: Tensor
    scale_sd: Tensor
    log_scale_mean: Tensor
    log_scale_sd: Tensor
    scale_hdi: Tensor
    scale_eti: Tensor
    levels: tuple[float, ...]


def draw(post: MixturePosterior, n_draws: int, indices: Sequence[int] | np.ndarray, seed: int = 0) -> PosteriorDraws:
    """``n_draws`` draws from each pattern's mixture; pattern ``indices[b]`` uses ``default_rng([seed, index])``.

    Args:
        post: ``B`` patterns' posterior parameters.
        n_draws: ``D >= 1``.
        indices: ``(B,)`` the patterns' indices in their file (they key the random streams).
        seed: base seed.

    Returns:
        :class:`PosteriorDraws` in ``post``'s dtype and device.
    """
    if int(n_draws) != n_draws or n_draws < 1:
        raise ValueError(f"expected n_draws >= 1, got {n_draws!r}")
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    n_batch, k = post.weights.shape
    if idx.shape != (n_batch,):
        raise ValueError(f"expected indices of shape ({n_batch},), got shape {idx.shape}")
    uni = np.empty((n_draws, n_batch))
    gauss = np.empty((n_draws, n_batch, 4))
    for b, i in enumerate(idx):
        rng = np.random.default_rng([int(seed), int(i)])
        uni[:, b] = rng.random(n_draws)
        gauss[:, b] = rng.standard_normal((n_draws, 4))
    dev, dt = post.rotations.device, post.rotations.dtype
    cdf = torch.cumsum(post.weights.detach().double().cpu(), dim=-1)
    cdf = cdf / cdf[:, -1:]
    u = torch.as_tensor(uni).T.contiguous()  # (B, D)
    hyp = torch.searchsorted(cdf, u, right=True).clamp(max=k - 1).T.to(dev)  # (D, B)
    z = torch.as_tensor(gauss, dtype=dt, device=dev)
    rows = torch.arange(n_batch, device=dev).expand(n_draws, n_batch)
    centre = post.rotations[rows, hyp]  # (D, B, 3, 3)
    eps = (post.pose_tril[rows, hyp] @ z[..., :3, None]).squeeze(-1)
    rot = centre @ rotvec_to_rotmat(eps)
    log_s = post.log_scale_loc[rows, hyp] + post.log_scale_sd[rows, hyp] * z[..., 3]
    return PosteriorDraws(rot, log_s, hyp)


def chordal_mean(rotations: Tensor) -> Tensor:
    """Chordal L2 mean of rotations ``(D, B, 3, 3)`` over the first axis: ``(B, 3, 3)``, the mean matrix
    projected onto SO(3) (SVD with the determinant fixed to +1)."""
    m = rotations.double().mean(0)
    u, _, vt = torch.linalg.svd(m)
    d = torch.ones(m.shape[:-1], dtype=m.dtype, device=m.device)
    d[..., -1] = torch.sign(torch.linalg.det(u @ vt))
    d[d == 0] = 1.0
    return (u * d[..., None, :]) @ vt


def hdi_from_draws(x: Tensor, mass: float) -> Tensor:
    """Shortest interval holding ``ceil(mass * D)`` of the draws ``x (D, B)``: ``(B, 2)`` (as ``arviz.hdi``)."""
    if not 0 < mass < 1:
        raise ValueError(f"expected 0 < mass < 1, got {mass}")
    xs = x.sort(dim=0).values
    n = xs.shape[0]
    n_in = int(np.floor(mass * n))
    n_cand = n - n_in
    if n_cand < 1 or n_in < 1:
        return torch.stack([xs[0], xs[-1]], dim=-1)
    width = xs[n_in:] - xs[:n_cand]  # (n_cand, B)
    lo = width.argmin(dim=0)
    cols = torch.arange(xs.shape[1], device=xs.device)
    return torch.stack([xs[lo, cols], xs[lo + n_in, cols]], dim=-1)


def summarize(post: MixturePosterior, draws: PosteriorDraws, levels: Sequence[float] = LEVELS) -> PosteriorSummary:
    """Per-pattern summaries of ``post`` from its ``draws`` (mean pose, cones, fluence moments and intervals)."""
    lv = tuple(float(p) for p in levels)
    if not lv or any(not 0 < p < 1 for p in lv):
        raise ValueError(f"expected credible masses in (0, 1), got {levels!r}")
    q = torch.tensor(lv, dtype=torch.float64)
    rot = draws.rotations.double()
    mean = chordal_mean(rot)  # (B, 3, 3)
    ang = geodesic_angle(mean.unsqueeze(0), rot)  # (D, B)
    ang_flip = geodesic_angle((mean @ rotz_pi(dtype=torch.float64, device=mean.device)).unsqueeze(0), rot)
    ang_mod = torch.minimum(ang, ang_flip)
    radius = torch.quantile(ang, q.to(ang.device), dim=0).T  # (B, L)
    radius_mod = torch.quantile(ang_mod, q.to(ang.device), dim=0).T
    w = post.weights.double()
    m, t = post.log_scale_loc.double(), post.log_scale_sd.double()
    s1 = (w * torch.exp(m + t**2 / 2)).sum(-1)
    s2 = (w * torch.exp(2 * m + 2 * t**2)).sum(-1)
    l1 = (w * m).sum(-1)
    l2 = (w * (t**2 + m**2)).sum(-1)
    scale = draws.log_scale.double().exp()
    hdi = torch.stack([hdi_from_draws(scale, p) for p in lv], dim=1)  # (B, L, 2)
    tails = torch.tensor([[(1 - p) / 2, (1 + p) / 2] for p in lv], dtype=torch.float64, device=scale.device)
    eti = torch.quantile(scale, tails.reshape(-1), dim=0).T.reshape(-1, len(lv), 2)
    return PosteriorSummary(
        mean_rotation=mean,
        angle_to_mean=ang,
        cone_radius=radius,
        cone_radius_mod_rotz=radius_mod,
        rotz_flip_mass=(ang_flip < ang).double().mean(0),
        scale_mean=s1,
        scale_sd=(s2 - s1**2).clamp(min=0).sqrt(),
        log_scale_mean=l1,
        log_scale_sd=(l2 - l1**2).clamp(min=0).sqrt(),
        scale_hdi=hdi,
        scale_eti=eti,
        levels=lv,
    )
