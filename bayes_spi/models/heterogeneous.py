"""The SPI model with a latent structure per pattern: a continuous ``z_i`` and/or a discrete class ``c_i``.

For a mini-batch of patterns ``i`` (as :class:`~bayes_spi.models.spi.SPIModel`)::

    hypothesis_i ~ Categorical(1/K)                 auxiliary pose hypothesis (see the guide)
    c_i          ~ Categorical(pi)                  site "class", only with n_classes >= 2
    z_i          ~ latent_prior (d,)                site "latent", only with latent_dim >= 1
    R_i          ~ pose_prior, s_i ~ scale_prior
    y_ik         ~ likelihood( s_i * Omega_k * P_k * I_theta(R_i q_k; z_i, c_i) )

The field is a :class:`~bayes_spi.models.conditional_field.LatentFields` (one FiLM-conditioned SIREN per
class). The class is enumerated exactly in the guide (``TraceEnum_ELBO``, like the pose hypotheses;
:class:`~bayes_spi.guides.latent.LatentGuide`): the ELBO holds the ``q(c_i | y_i)``-weighted sum over
classes of the per-class terms, plus ``E_q[log pi_c - log q(c)]``; at the optimum ``q(c_i | y_i)`` is
the posterior ``softmax_c(log pi_c + log p(y_i | c, ...))``. With ``n_classes = 1`` and
``latent_dim = 0`` the model is :class:`SPIModel` (same sites, same log density).

Example:
    >>> import torch
    >>> from bayes_spi.models.fields import SirenField
    >>> from bayes_spi.models.spi import SPIBatch
    >>> q = torch.randn(64, 3) * 0.03
    >>> model = HeterogeneousSPIModel(SirenField(q_max=0.125), q, torch.full((64,), 1e-3), latent_dim=2,
    ...                               n_classes=2)
    >>> batch = SPIBatch(images=torch.zeros(3, 8, 8), indices=torch.arange(3), pixels=torch.arange(16))
    >>> model(batch, n_total=10)
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from bayes_spi.models.background import PixelBackground
from bayes_spi.models.conditional_field import LatentFields
from bayes_spi.models.fields import SirenField
from bayes_spi.models.intensity_priors import IntensityPrior
from bayes_spi.models.latent import LATENT_RULES, ClassPrior, LatentPrior, NormalLatentPrior, UniformClassPrior
from bayes_spi.models.likelihoods import Likelihood
from bayes_spi.models.priors import PosePrior, ScalePrior, UniformPosePrior
from bayes_spi.models.spi import PATTERNS_DIM, SPIBatch, SPIModel

__all__ = ["HeterogeneousSPIModel"]


class HeterogeneousSPIModel(SPIModel):
    """:class:`SPIModel` whose field depends on a per-pattern latent ``z_i`` and class ``c_i``.

    Args:
        field: the class-0 base field (a SIREN-family field), or a ready :class:`LatentFields`.
        q, pixel_factor, pose_prior, scale_prior, likelihood, n_hypotheses, intensity_prior: as
            :class:`SPIModel`.
        latent_dim: ``d >= 0`` (0: no continuous latent).
        n_classes: ``K >= 1`` (1: no class site).
        latent_prior: a :class:`~bayes_spi.models.latent.LatentPrior` (default ``Normal(0, I_d)``).
        class_prior: a :class:`~bayes_spi.models.latent.ClassPrior` (default uniform).
        background: as :class:`SPIModel` (``b B_k`` added to every rate).
        latent_rule: the quadrature rule by which the grid search and the EMC warm start integrate the latent
            prior (:func:`~bayes_spi.guides.class_search.latent_nodes`): ``hermite`` or ``equal``.
    """

    def __init__(
        self,
        field: SirenField | LatentFields,
        q: Tensor,
        pixel_factor: Tensor,
        pose_prior: PosePrior | None = None,
        scale_prior: ScalePrior | None = None,
        likelihood: Likelihood | None = None,
        n_hypotheses: int = 1,
        intensity_prior: IntensityPrior | None = None,
        latent_dim: int = 0,
        n_classes: int = 1,
        latent_prior: LatentPrior | None = None,
        class_prior: ClassPrior | None = None,
        background: PixelBackground | None = None,
        latent_rule: str = "hermite",
    ) -> None:
        if latent_rule not in LATENT_RULES:
            raise ValueError(f"latent_rule: expected one of {LATENT_RULES}, got {latent_rule!r}")
        fields = field if isinstance(field, LatentFields) else LatentFields(field, latent_dim, n_classes)
        if fields.latent_dim != latent_dim or fields.n_classes != n_classes:
            raise ValueError(f"expected a LatentFields with latent_dim={latent_dim}, n_classes={n_classes}, got "
                             f"{fields.latent_dim}, {fields.n_classes}")
        if intensity_prior is not None:
            raise ValueError("expected no intensity_prior with a heterogeneous model (one prior per class field is "
                             "not implemented), got one")
        super().__init__(fields, q, pixel_factor, pose_prior, scale_prior, likelihood, n_hypotheses,  # type: ignore[arg-type]
                         background=background)
        self.latent_dim = int(latent_dim)
        self.n_classes = int(n_classes)
        self.latent_rule = latent_rule
        if self.latent_dim:
            self.latent_prior = latent_prior if latent_prior is not None else NormalLatentPrior(self.latent_dim)
            if self.latent_prior.latent_dim != self.latent_dim:
                raise ValueError(f"expected a latent prior of dimension {self.latent_dim}, got "
                                 f"{self.latent_prior.latent_dim}")
        elif latent_prior is not None:
            raise ValueError("expected no latent_prior with latent_dim=0, got one")
        if self.n_classes > 1:
            self.class_prior = class_prior if class_prior is not None else UniformClassPrior(self.n_classes)
            if self.class_prior.n_classes != self.n_classes:
                raise ValueError(f"expected a class prior over {self.n_classes} classes, got {self.class_prior.n_classes}")
        elif class_prior is not None:
            raise ValueError("expected no class_prior with n_classes=1, got one")

    def latent_log_rate(self, R: Tensor, log_s: Tensor, pixels: Tensor, z: Tensor | None, c: Tensor | None,
                        indices: Tensor | None = None) -> Tensor:
        """Log expected counts ``(..., B, M)`` for poses ``R (..., B, 3, 3)``, ``log_s (..., B)``,
        latents ``z (..., B, d)`` and classes ``c (..., B)`` (broadcastable), plus the background ``b B_k`` if
        any (``indices``: the patterns, for a per-pattern background scale)."""
        q_mol = torch.einsum("...ij,mj->...mi", R, self.q[pixels])  # (..., B, M, 3)
        log_rate = log_s[..., None] + self.log_pixel_factor[pixels] + self.field.log_intensity(q_mol, z, c)
        return self._with_background(log_rate, pixels, indices)

    def _with_background(self, log_rate: Tensor, pixels: Tensor, indices: Tensor | None) -> Tensor:
        bg = self.background_rate(pixels, indices)
        return log_rate if bg is None else torch.logaddexp(log_rate, bg.clamp(min=1e-30).log())

    def class_hypothesis_logpost(self, R: Tensor, log_s: Tensor, images: Tensor, pixels: Tensor,
                                 z: Tensor | None) -> Tensor:
        """``log p(y_i | R_ki, s_i, z_ci, c) + log p(R_ki) + log pi_c`` ``(C, K, B)`` for hypotheses ``R (K, B, 3, 3)``
        and per-class latents ``z (C, B, d)`` (or ``None``): what ranks the (class, pose) pairs in the guide."""
        y = images.reshape(images.shape[0], -1)[:, pixels]
        q_mol = torch.einsum("kbij,mj->kbmi", R, self.q[pixels])  # (K, B, M, 3)
        base = log_s[:, None] + self.log_pixel_factor[pixels]  # (B, M)
        out = []
        for k, field in enumerate(self.field.fields):
            zk = None if z is None else z[k]
            log_rate = self._with_background(base + field.log_intensity(q_mol, zk), pixels, None)
            out.append(self.likelihood(log_rate).log_prob(y).sum(-1))
        lp = torch.stack(out)  # (C, K, B)
        if not isinstance(self.pose_prior, UniformPosePrior):
            lp = lp + self.pose_prior(R.shape[-3]).log_prob(R)
        if self.n_classes > 1:
            lp = lp + self.class_prior.log_probs()[:, None, None]
        return lp

    def forward(self, batch: SPIBatch, n_total: int) -> None:
        pyro.module("field", self.field)
        if self.background is not None:
            pyro.module("background", self.background)
        if self.n_classes > 1:
            pyro.module("class_prior", self.class_prior)
        n_batch = batch.images.shape[0]
        y = batch.images.reshape(n_batch, -1)[:, batch.pixels]
        with pyro.plate("patterns", n_total, subsample=batch.indices, dim=PATTERNS_DIM):
            pyro.sample("hypothesis", dist.Categorical(logits=torch.zeros(self.n_hypotheses, device=y.device)))
            c = pyro.sample("class", self.class_prior(n_batch)) if self.n_classes > 1 else None
            z = pyro.sample("latent", self.latent_prior(n_batch)) if self.latent_dim else None
            R = pyro.sample("pose", self.per_pattern_pose_prior(n_batch))
            s = pyro.sample("scale", self.scale_prior(n_batch))
            log_rate = self.latent_log_rate(R, s.log(), batch.pixels, z, c, batch.indices)  # (..., B, M)
            self.observe_counts(log_rate, y, batch)
