"""Amortized guide of the heterogeneous model: class, pose hypothesis, pose, fluence and structure latent.

For pattern ``i`` with counts ``y_i`` and encoder features ``h_i`` (one encoder for everything)::

    c_i          ~ Categorical(rho(y_i))                     site "class", enumerated exactly
    hypothesis_i ~ Categorical(w(y_i, c_i))                   pose hypotheses, enumerated exactly
    R_i | k      ~ LieNormalSO3(R_k(y_i), sigma_k(y_i))       as AmortizedGuide
    s_i          ~ LogNormal(...)                             as AmortizedGuide
    z_i | c_i    ~ Normal(mu_c(h_i), sigma_c(h_i))            site "latent", rsample

**Pose and structure are entangled** (a rotated cube can look like a rounder shape): the guide handles it
by conditioning on the class, and by ranking each (class, pose hypothesis) pair with the model itself.
With a latent scorer (``LatentGuide(..., latent_scorer=model.class_hypothesis_logpost)``,
:meth:`~bayes_spi.models.heterogeneous.HeterogeneousSPIModel.class_hypothesis_logpost`) the weights are

    ``w_ck ∝ w_k exp(log p(y_i | R_k, s_i, mu_c, c) + log pi_c)``,
    ``rho_c ∝ exp(a_c(h_i) + logsumexp_k(log w_k + log p(y_i | R_k, s_i, mu_c, c) + log pi_c))``,

so the class and the pose are inferred jointly. With a class-aware search
(:class:`~bayes_spi.guides.class_search.ClassOrientationSearch`, ``n_search = C n_keep``) every class proposes
its own best grid rotations; all ``K`` hypotheses are scored under every class, so a proposal only moves where
``q`` puts mass (the ELBO stays a bound), and the search's per-class grid posterior mean of ``z`` centres
``q(z | y, c)`` (``weight_floor`` mixes ``floor / C`` into ``rho`` as it does
into the hypothesis weights: a constraint on the guide family, so the ELBO stays a bound): the pose hypotheses of class ``c`` are weighted by how
well class ``c``'s field at the pattern's latent explains the pattern at each pose (``w_k`` the encoder's
hypothesis weights, ``a_c`` a learned correction). The latent ``z`` is conditioned on the class but not on
the pose hypothesis: the guide family is ``q(c) q(k | c) q(R | k) q(z | c)``, a valid family, so the ELBO is
a bound; its gap from that choice is ``E_q(c) E_q(k|c) KL(q(z | c) || p(z | y, c, k))`` beyond the
mean-field gap. That gap vanishes when the hypotheses that carry the weight of a class agree on ``z``:
the Rz(pi) partners and symmetry mates of a shape give the same pattern, hence the same likelihood in
``z``; hypotheses that disagree carry exponentially small weight at ~1e3 photons once the pose is
resolved. A pattern whose pose stays ambiguous *and* whose shape depends on the pose gets a ``q(z)``
narrower than the truth (the usual mode-seeking of the ELBO); conditioning ``z`` on the hypothesis would
cost ``K`` times the latent heads and field evaluations.

Example:
    >>> import torch
    >>> guide = LatentGuide(torch.ones(16, 16, dtype=torch.bool), latent_dim=2, n_classes=3, n_heads=2)
    >>> post = guide.latent_posterior(torch.rand(4, 16, 16))
    >>> post.class_probs.shape, post.latent_loc.shape, post.hypothesis_weights.shape
    (torch.Size([4, 3]), torch.Size([4, 3, 2]), torch.Size([4, 3, 4]))
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayes_spi.distributions.so3 import LieNormalSO3
from bayes_spi.guides.amortized import AmortizedGuide, PosePosterior
from bayes_spi.models.spi import SPIBatch

__all__ = ["LatentGuide", "LatentPosterior", "LatentScorer"]

#: ``(R (K, B, 3, 3), log_s (B,), images (B, n_y, n_x), pixels (M,), z (C, B, d) or None) -> (C, K, B)``
LatentScorer = Callable[[Tensor, Tensor, Tensor, Tensor, "Tensor | None"], Tensor]


@dataclass
class LatentPosterior:
    """Per-pattern posterior parameters of the heterogeneous guide.

    Attributes:
        pose: the pose/scale posterior (its ``weights`` are the encoder's, before class conditioning).
        class_probs: ``(B, C)`` ``q(c_i)``.
        hypothesis_weights: ``(B, C, K)`` ``q(k | c)``.
        latent_loc, latent_scale: ``(B, C, d)`` ``q(z | c)`` (``None`` with ``latent_dim = 0``).
    """

    pose: PosePosterior
    class_probs: Tensor
    hypothesis_weights: Tensor
    latent_loc: Tensor | None
    latent_scale: Tensor | None

    def latent_mean(self) -> Tensor | None:
        """``E_q[z_i]`` ``(B, d)``: the class mixture's mean."""
        if self.latent_loc is None:
            return None
        return (self.class_probs[..., None] * self.latent_loc).sum(-2)

    def latent_sd(self) -> Tensor | None:
        """``sd_q[z_i]`` ``(B, d)`` of the class mixture (law of total variance)."""
        if self.latent_loc is None or self.latent_scale is None:
            return None
        mean = self.latent_mean()
        second = (self.class_probs[..., None] * (self.latent_scale**2 + self.latent_loc**2)).sum(-2)
        return (second - mean**2).clamp(min=0).sqrt()


class LatentGuide(AmortizedGuide):
    """:class:`AmortizedGuide` plus ``q(c_i | y_i)`` and ``q(z_i | y_i, c_i)`` heads on the same encoder.

    Args:
        mask: ``(n_y, n_x)`` good pixels.
        latent_dim: ``d >= 0``.
        n_classes: ``C >= 1``.
        latent_scale_init: initial ``sigma`` of ``q(z)`` (1 = the prior's).
        latent_scorer: a :data:`LatentScorer` that ranks (class, pose hypothesis) pairs with the model (module
            doc), e.g. ``model.class_hypothesis_logpost``; ``None``: the encoder's weights for every class.
        **kwargs: :class:`AmortizedGuide`'s (``n_heads``, ``features``, ``channels``, ``search``, ...), except
            ``scorer`` (the plain pose scorer ignores the class: use ``latent_scorer``) and ``field_guide``
            (the heterogeneous model's fields have no global latent).
    """

    def __init__(self, mask: Tensor, latent_dim: int = 0, n_classes: int = 1, latent_scale_init: float = 1.0,
                 *, latent_scorer: LatentScorer | None = None, **kwargs: object) -> None:
        if kwargs.get("scorer") is not None:
            raise ValueError("LatentGuide: expected the class-aware latent_scorer, got a plain pose scorer")
        if kwargs.get("field_guide") is not None:
            raise ValueError("LatentGuide: expected no field_guide (the heterogeneous model's fields have no global "
                             "latent), got one")
        super().__init__(mask, **kwargs)  # type: ignore[arg-type]
        if isinstance(latent_dim, bool) or int(latent_dim) != latent_dim or latent_dim < 0:
            raise ValueError(f"latent_dim: expected an integer >= 0, got {latent_dim!r}")
        if isinstance(n_classes, bool) or int(n_classes) != n_classes or n_classes < 1:
            raise ValueError(f"n_classes: expected a positive integer, got {n_classes!r}")
        if not latent_scale_init > 0:
            raise ValueError(f"latent_scale_init: expected a positive number, got {latent_scale_init!r}")
        self.latent_dim, self.n_classes = int(latent_dim), int(n_classes)
        features = self.rot_head.in_features
        self.latent_head = nn.Linear(features, self.n_classes * 2 * self.latent_dim) if self.latent_dim else None
        if self.latent_head is not None:
            # small random locations (patterns start apart, so the field's FiLM gets a signal), scales at init
            nn.init.normal_(self.latent_head.weight, std=0.1 / features**0.5)
            nn.init.zeros_(self.latent_head.bias)
            with torch.no_grad():
                w = self.latent_head.weight.view(self.n_classes, 2, self.latent_dim, features)
                w[:, 1].zero_()
                b = self.latent_head.bias.view(self.n_classes, 2, self.latent_dim)
                b[:, 1].fill_(float(torch.log(torch.expm1(torch.tensor(float(latent_scale_init))))))
        self.class_head = nn.Linear(features, self.n_classes) if self.n_classes > 1 else None
        if self.class_head is not None:
            nn.init.zeros_(self.class_head.weight)
            nn.init.zeros_(self.class_head.bias)
        # a plain list: the model is not a submodule of the guide
        self._latent_scorer: list[LatentScorer] = [] if latent_scorer is None else [latent_scorer]
        self.last_latent_posterior: LatentPosterior | None = None

    @property
    def latent_scorer(self) -> LatentScorer | None:
        """The class-aware scorer given at construction (``None`` if none)."""
        return self._latent_scorer[0] if self._latent_scorer else None

    def latent_posterior(self, images: Tensor, pixels: Tensor | None = None) -> LatentPosterior:
        """All posterior parameters for ``images (B, n_y, n_x)`` (likelihoods on ``pixels``, default all good)."""
        post = self.posterior(images, pixels)
        h = self.last_features
        n_batch, n_hyp = post.weights.shape
        loc = scale = None
        if self.latent_head is not None:
            out = self.latent_head(h).reshape(n_batch, self.n_classes, 2, self.latent_dim)
            loc = 5.0 * torch.tanh(out[:, :, 0] / 5.0)  # bounded: a huge input must not send z to infinity
            centre = getattr(self.search, "last_latent_mean", None) if self.search is not None else None
            if centre is not None and centre.shape == loc.shape:
                # the class-aware search's grid posterior mean of z (per class, against the current fields):
                # the centre of q(z | y, c), as the profile scale centres q(s); the head learns the correction
                loc = loc + centre.to(loc.dtype).detach()
            scale = (F.softplus(out[:, :, 1]) + 1e-4).clamp(max=5.0)
        class_logits = (self.class_head(h) if self.class_head is not None
                        else torch.zeros(n_batch, 1, device=images.device, dtype=h.dtype))
        log_w = post.weights.clamp(min=1e-30).log()  # (B, K)
        if self._latent_scorer:
            if pixels is None:
                pixels = torch.nonzero(self.mask.reshape(-1)).squeeze(-1)
            with torch.no_grad():
                z = None if loc is None else loc.transpose(0, 1).detach()  # (C, B, d)
                lp = self._latent_scorer[0](post.rotations.transpose(0, 1), post.scale_loc.detach(), images, pixels, z)
            joint = log_w[:, None, :] + lp.permute(2, 0, 1)  # (B, C, K)
            hyp = torch.softmax(joint, dim=-1)
            if self.weight_floor > 0:
                hyp = (1.0 - self.weight_floor) * hyp + self.weight_floor / n_hyp
            if self.n_classes > 1:
                class_logits = class_logits + torch.logsumexp(joint, dim=-1)
        else:
            hyp = post.weights[:, None, :].expand(n_batch, self.n_classes, n_hyp)
        class_probs = torch.softmax(class_logits, dim=-1)
        if self.weight_floor > 0 and self.n_classes > 1:  # early in a fit every class field keeps learning
            class_probs = (1.0 - self.weight_floor) * class_probs + self.weight_floor / self.n_classes
        result = LatentPosterior(post, class_probs, hyp, loc, scale)
        self.last_latent_posterior = result
        # what the trainer's amortization loss reads: the hypotheses weighted by q(c) q(k | c), not by the encoder
        self.last_posterior = replace(post, weights=(class_probs[..., None] * hyp).sum(1).detach())
        return result

    def forward(self, batch: SPIBatch, n_total: int) -> PosePosterior:  # type: ignore[override]
        pyro.module("guide", self)
        lp = self.latent_posterior(batch.images, batch.pixels)
        post = lp.pose
        rows = torch.arange(batch.images.shape[0], device=batch.images.device)
        with pyro.plate("patterns", n_total, subsample=batch.indices):
            if self.n_classes > 1:
                c = pyro.sample("class", dist.Categorical(probs=lp.class_probs), infer={"enumerate": "parallel"})
            else:
                c = torch.zeros_like(rows)
            k = pyro.sample("hypothesis", dist.Categorical(probs=lp.hypothesis_weights[rows, c]),
                            infer={"enumerate": "parallel"})
            pyro.sample("pose", LieNormalSO3(post.rotations[rows, k], post.sigmas[rows, k]))
            pyro.sample("scale", dist.LogNormal(post.scale_loc, post.scale_scale))
            if lp.latent_loc is not None and lp.latent_scale is not None:
                pyro.sample("latent", dist.Normal(lp.latent_loc[rows, c], lp.latent_scale[rows, c]).to_event(1))
        return post
