"""The SPI image-formation model as a Pyro model.

For a mini-batch of patterns ``i`` (a subsample of the ``patterns`` plate) and a subset of the
detector's good pixels ``k``::

    hypothesis_i ~ Categorical(1/K)                      auxiliary: which pose hypothesis (see the guide)
    R_i          ~ pose_prior          (3, 3)            uniform on SO(3) by default
    s_i          ~ scale_prior                           fluence scale, LogNormal by default
    y_ik         ~ likelihood( s_i * Omega_k * P_k * I_theta(R_i q_k) + b_i B_k )   for good pixels k

Convention: pixel ``k`` of pattern ``i`` samples the molecule-frame intensity at ``R_i @ q_k``
(``q_k`` the pixel's lab-frame scattering vector in 1/A). The ``hypothesis`` site does not enter the
likelihood: it is the auxiliary variable that lets the guide be a mixture of ``K`` pose hypotheses
enumerated exactly by ``TraceEnum_ELBO`` (the ELBO stays a bound on ``log p(y)``: the model's
``Categorical(1/K)`` cancels the mixture's ``log K``).

Model and guide take the same arguments ``(batch, n_total)`` and share the site names
``hypothesis``, ``pose``, ``scale`` and the plate ``patterns`` (dim -1); the observed site is ``counts``.

Subsampling is written as plates, so that Pyro does the scaling: ``patterns`` (size ``n_total``,
subsample ``batch.indices``) scales every per-pattern term by ``n_total / B``, and ``counts`` sits in the
nested plate ``pixels`` (dim -2, size ``batch.n_pixels``, the eligible good pixels of this step;
subsample ``batch.pixels``, one subset for the whole batch), which scales the likelihood by
``n_pixels / M`` -- the unbiased estimate of the sum over all eligible pixels. ``counts`` therefore has
batch shape ``(..., M, B)`` (pixels left of patterns) and the inference needs
``max_plate_nesting = MAX_PLATE_NESTING`` (2), e.g. ``TraceEnum_ELBO(max_plate_nesting=MAX_PLATE_NESTING)``:
the enumerated hypotheses then live at dim -3 and below (the guide's pose has shape ``(K, 1, B, 3, 3)``).

An optional measured background ``B_k`` with its fitted scale ``b`` (global or per pattern:
:class:`~bayes_spi.models.background.PixelBackground`, the module ``background``) adds ``b B_k`` to the rate.

Optional global terms (outside the plate, counted once per step): an ``intensity_prior``
(:mod:`bayes_spi.models.intensity_priors`, e.g. the Wilson prior) adds the factor site
``intensity_prior``; a variational field (:mod:`bayes_spi.models.variational_field`) adds the latent
site ``amplitude``, which the guide must sample too (``AmortizedGuide(..., field_guide=...)``). Its draw
``A`` is passed along explicitly: ``I_theta(R q) = field.log_intensity(R q, A).exp()`` (the ``amplitude``
argument of :meth:`SPIModel.log_rate` and the methods built on it); nothing is kept on the field between
calls. Without a draw, a variational field gives its posterior mean intensity.

Example:
    >>> import torch
    >>> from bayes_spi.models.fields import SirenField
    >>> q = torch.randn(64, 3) * 0.03
    >>> model = SPIModel(SirenField(q_max=0.125), q, torch.full((64,), 1e-3), n_hypotheses=2)
    >>> batch = SPIBatch(images=torch.zeros(3, 8, 8), indices=torch.arange(3), pixels=torch.arange(16))
    >>> _ = model(batch, n_total=10)
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from bayes_spi.models.background import PixelBackground
from bayes_spi.models.fields import IntensityField
from bayes_spi.models.intensity_priors import IntensityPrior, NoIntensityPrior
from bayes_spi.models.likelihoods import Likelihood, PoissonLikelihood
from bayes_spi.models.priors import LogNormalScalePrior, PosePrior, ScalePrior, UniformPosePrior

__all__ = ["MAX_PLATE_NESTING", "PATTERNS_DIM", "PIXELS_DIM", "SCORE_CHUNK_POINTS", "SPIBatch", "SPIModel",
           "detector_q_max", "pixels_by_patterns"]

#: the plates' dims: ``patterns`` (every per-pattern site) and, nested in it, ``pixels`` (the site ``counts``)
PATTERNS_DIM: int = -1
PIXELS_DIM: int = -2
#: ``max_plate_nesting`` of any ELBO run on these models (enumerated sites go to the left of both plates)
MAX_PLATE_NESTING: int = 2
#: without gradients, :meth:`SPIModel.hypothesis_loglik` evaluates at most this many (hypothesis, pattern, pixel)
#: points at once: scoring 12 hypotheses of 128 patterns on all 16,384 pixels of a 128x128 detector in one
#: field evaluation took > 20 GB (a 128-wide SIREN's activations) and was killed
SCORE_CHUNK_POINTS: int = 1 << 20


def detector_q_max(q: Tensor) -> float:
    """The largest ``|q|`` (1/A) over the detector's pixel centres ``q (P, 3)``: the reach of the data,
    on which the fields and the search cube are built (computed in ``q``'s dtype)."""
    return float(q.norm(dim=-1).max())


@dataclass
class SPIBatch:
    """One mini-batch, as both model and guide receive it.

    Attributes:
        images: ``(B, n_y, n_x)`` photon counts (masked pixels hold 0 and are never used as data).
        indices: ``(B,)`` int64 pattern indices in the data set (the ``patterns`` plate subsample).
        pixels: ``(M,)`` int64 flat indices (into ``n_y * n_x``) of the good pixels in the likelihood (the
            ``pixels`` plate subsample, the same for every pattern of the batch).
        n_pixels: the number of eligible pixels ``pixels`` was drawn from (the ``pixels`` plate's size, an
            integer ``>= M``); ``None``: ``M`` (``pixels`` are all of them, no scaling).
    """

    images: Tensor
    indices: Tensor
    pixels: Tensor
    n_pixels: int | None = None

    def __post_init__(self) -> None:
        if self.images.dim() != 3:
            raise ValueError(f"expected images of shape (B, n_y, n_x), got shape {tuple(self.images.shape)}")
        if self.indices.shape != self.images.shape[:1]:
            raise ValueError(f"expected indices of shape ({self.images.shape[0]},), got shape {tuple(self.indices.shape)}")
        if self.pixels.dim() != 1:
            raise ValueError(f"expected pixels of shape (M,), got shape {tuple(self.pixels.shape)}")
        m = int(self.pixels.shape[0])
        if self.n_pixels is None:
            self.n_pixels = m
        if isinstance(self.n_pixels, bool) or not isinstance(self.n_pixels, numbers.Integral) or self.n_pixels < m:
            raise ValueError(f"expected n_pixels an integer >= M = {m} (the eligible pixels the subset was drawn "
                             f"from), got {self.n_pixels!r}")
        self.n_pixels = int(self.n_pixels)

    @property
    def pixel_weight(self) -> float:
        """``n_pixels / M``: the scale the ``pixels`` plate puts on the likelihood (1 without subsampling)."""
        return self.n_pixels / self.pixels.shape[0]

    def to(self, device: torch.device | str) -> "SPIBatch":
        return SPIBatch(self.images.to(device), self.indices.to(device), self.pixels.to(device), self.n_pixels)


def pixels_by_patterns(x: Tensor) -> Tensor:
    """``(..., B, M)`` per-pattern, per-pixel values -> ``(..., M, B)``, the layout of the ``pixels`` plate (dim -2)
    nested in ``patterns`` (dim -1).

    A per-pattern site under ``max_plate_nesting = 2`` holds a size-1 slot at dim -2 (the ``pixels`` plate it is
    not in): values computed from it have shape ``(..., 1, B, M)``; that slot is replaced by ``M``. Plain
    ``(B, M)`` values are transposed.
    """
    if x.dim() < 2:
        raise ValueError(f"expected values of shape (..., B, M), got shape {tuple(x.shape)}")
    if x.dim() == 2:
        return x.T
    if x.shape[-3] != 1:
        raise ValueError(f"expected values of shape (..., 1, B, M) (dim -2 is the pixels plate's), got shape "
                         f"{tuple(x.shape)}; run the ELBO with max_plate_nesting={MAX_PLATE_NESTING}")
    return x.transpose(-1, -3).squeeze(-1)


class SPIModel(nn.Module):
    """Poisson photon counts from a neural-field intensity sliced on the Ewald sphere.

    Args:
        field: the intensity field ``I_theta``.
        q: ``(n_y * n_x, 3)`` lab-frame scattering vectors of all detector pixels (1/A).
        pixel_factor: ``(n_y * n_x,)`` solid angle times polarization factor per pixel.
        pose_prior: a :class:`~bayes_spi.models.priors.PosePrior` (default uniform on SO(3)).
        scale_prior: a :class:`~bayes_spi.models.priors.ScalePrior` (default LogNormal, mean 1).
        likelihood: maps the log expected counts to a distribution over counts.
        n_hypotheses: ``K``, number of values of the auxiliary ``hypothesis`` site (match the guide).
        intensity_prior: an :class:`~bayes_spi.models.intensity_priors.IntensityPrior` whose
            ``log_factor(field)`` enters once per step as the factor site ``intensity_prior``
            (default ``None``: no prior). Not with a variational field (its prior is the ``amplitude`` site).
        background: a :class:`~bayes_spi.models.background.PixelBackground` (``b B_k`` added to every rate;
            its scale is a point estimate registered as the Pyro module ``background``); ``None``: none.
    """

    def __init__(
        self,
        field: IntensityField,
        q: Tensor,
        pixel_factor: Tensor,
        pose_prior: PosePrior | None = None,
        scale_prior: ScalePrior | None = None,
        likelihood: Likelihood | None = None,
        n_hypotheses: int = 1,
        intensity_prior: IntensityPrior | None = None,
        background: PixelBackground | None = None,
    ) -> None:
        super().__init__()
        if q.dim() != 2 or q.shape[-1] != 3:
            raise ValueError(f"expected q of shape (P, 3), got shape {tuple(q.shape)}")
        if pixel_factor.shape != q.shape[:1]:
            raise ValueError(f"expected pixel_factor of shape ({q.shape[0]},), got shape {tuple(pixel_factor.shape)}")
        if torch.any(pixel_factor <= 0):
            raise ValueError("expected a positive pixel_factor (solid angle x polarization) for every pixel")
        self.field = field
        self.register_buffer("q", q.float())
        self.register_buffer("log_pixel_factor", pixel_factor.double().log().float())
        self.pose_prior = pose_prior if pose_prior is not None else UniformPosePrior()
        self.scale_prior = scale_prior if scale_prior is not None else LogNormalScalePrior()
        self.likelihood = likelihood if likelihood is not None else PoissonLikelihood()
        self.n_hypotheses = int(n_hypotheses)
        if isinstance(intensity_prior, NoIntensityPrior):
            intensity_prior = None
        if intensity_prior is not None and getattr(field, "is_variational", False):
            raise ValueError("expected no intensity_prior with a variational field (its Wilson prior is the "
                             "'amplitude' site), got both")
        self.intensity_prior = intensity_prior
        if background is not None and background.rate.shape != q.shape[:1]:
            raise ValueError(f"expected a background of shape ({q.shape[0]},), got shape {tuple(background.rate.shape)}")
        self.background = background

    @property
    def q_max(self) -> float:
        """The largest ``|q|`` (1/A) of the pixel centres as the model holds them (float32 ``q``)."""
        return detector_q_max(self.q)

    def log_rate(self, R: Tensor, log_s: Tensor, pixels: Tensor, amplitude: Tensor | None = None) -> Tensor:
        """Log expected counts ``(..., B, M)`` for poses ``R (..., B, 3, 3)`` and log scales ``(..., B)``.

        ``amplitude``: a draw ``(L,)`` of a variational field's site ``amplitude``, passed to its
        ``log_intensity``; ``None``: the field's own ``log_intensity(q)`` (a variational field's posterior mean).
        """
        q = self.q[pixels]  # (M, 3)
        q_mol = torch.einsum("...ij,mj->...mi", R, q)  # (..., B, M, 3)
        log_i = self.field.log_intensity(q_mol) if amplitude is None else self.field.log_intensity(q_mol, amplitude)
        return log_s[..., None] + self.log_pixel_factor[pixels] + log_i

    def background_rate(self, pixels: Tensor, indices: Tensor | None = None) -> Tensor | None:
        """Expected background counts ``b B_k`` on ``pixels``: ``(M,)`` or, per pattern at ``indices``, ``(B, M)``;
        ``None`` without a background."""
        return None if self.background is None else self.background(pixels, indices)

    def total_log_rate(self, R: Tensor, log_s: Tensor, pixels: Tensor, indices: Tensor | None = None,
                       amplitude: Tensor | None = None) -> Tensor:
        """``log(s w I(R q) + b B)`` ``(..., B, M)``: :meth:`log_rate` (with ``amplitude``) plus the background,
        if any."""
        log_rate = self.log_rate(R, log_s, pixels, amplitude)
        bg = self.background_rate(pixels, indices)
        if bg is None:
            return log_rate
        return torch.logaddexp(log_rate, bg.clamp(min=1e-30).log())

    def hypothesis_loglik(self, R: Tensor, log_s: Tensor, images: Tensor, pixels: Tensor,
                          indices: Tensor | None = None, amplitude: Tensor | None = None) -> Tensor:
        """``log p(y_i | R_ki, s_i)`` on ``pixels`` for poses ``R (K, B, 3, 3)``: ``(K, B)`` (``indices``: the
        patterns, for a per-pattern background scale; without them its geometric mean is used; ``amplitude``:
        a variational field's draw ``(L,)``, as in :meth:`log_rate`). Without gradients it runs in chunks of
        patterns of at most :data:`SCORE_CHUNK_POINTS` points (the same numbers, bounded memory)."""
        n_k, n_b = R.shape[0], R.shape[1]
        step = max(1, SCORE_CHUNK_POINTS // max(n_k * pixels.numel(), 1))
        if not torch.is_grad_enabled() and n_b > step:  # in chunks of patterns: the same numbers, bounded memory
            def part(t: Tensor, s: int) -> Tensor:  # per-pattern along the last dim, or broadcast
                return t if t.dim() == 0 or t.shape[-1] == 1 else t[..., s:s + step]

            return torch.cat([self.hypothesis_loglik(R[:, s:s + step], part(log_s, s), images[s:s + step], pixels,
                                                     None if indices is None else indices[s:s + step], amplitude)
                              for s in range(0, n_b, step)], dim=1)
        y = images.reshape(images.shape[0], -1)[:, pixels]
        return self.likelihood(self.total_log_rate(R, log_s, pixels, indices, amplitude)).log_prob(y).sum(-1)

    def hypothesis_logpost(self, R: Tensor, log_s: Tensor, images: Tensor, pixels: Tensor,
                           amplitude: Tensor | None = None) -> Tensor:
        """``log p(y_i | R_ki, s_i) + log p(R_ki)`` ``(K, B)``: what ranks pose hypotheses (the guide's scorer;
        ``amplitude`` as in :meth:`log_rate`).

        The pose prior's log density (w.r.t. Haar) is 0 for the uniform prior; a preferred-orientation
        prior then shifts the hypothesis weights towards its favoured views.
        """
        ll = self.hypothesis_loglik(R, log_s, images, pixels, amplitude=amplitude)
        if isinstance(self.pose_prior, UniformPosePrior):
            return ll
        return ll + self.pose_prior(R.shape[-3]).log_prob(R)

    def forward(self, batch: SPIBatch, n_total: int) -> None:
        pyro.module("field", self.field)
        if self.background is not None:
            pyro.module("background", self.background)
        if self.intensity_prior is not None:
            pyro.module("intensity_prior", self.intensity_prior)
            pyro.factor("intensity_prior", self.intensity_prior.log_factor(self.field))
        # a variational field's global site "amplitude" (outside the plate); its draw enters the rate
        amplitude = self.field.model_sample() if getattr(self.field, "is_variational", False) else None
        n_batch = batch.images.shape[0]
        y = batch.images.reshape(n_batch, -1)[:, batch.pixels]
        with pyro.plate("patterns", n_total, subsample=batch.indices, dim=PATTERNS_DIM):
            pyro.sample(
                "hypothesis",
                dist.Categorical(logits=torch.zeros(self.n_hypotheses, device=y.device)),
            )
            R = pyro.sample("pose", self.per_pattern_pose_prior(n_batch))
            s = pyro.sample("scale", self.scale_prior(n_batch))
            log_rate = self.total_log_rate(R, s.log(), batch.pixels, batch.indices, amplitude)  # (..., B, M)
            self.observe_counts(log_rate, y, batch)

    def per_pattern_pose_prior(self, n_batch: int) -> dist.TorchDistribution:
        """The pose prior with batch shape ``(1, B)``: the ``patterns`` plate at dim -1 and an explicit size-1 slot
        for ``pixels`` (dim -2), the layout of every per-pattern site under ``max_plate_nesting = 2``. (Pyro 1.9's
        model/guide shape check mis-slices a ``(B, 3, 3)`` site, whose batch and event dims are fewer than
        ``max_plate_nesting + event_dim``, against the guide's enumerated ``(K, 1, B, 3, 3)``.)"""
        return self.pose_prior(n_batch).expand([1, n_batch])

    def observe_counts(self, log_rate: Tensor, y: Tensor, batch: SPIBatch) -> None:
        """The observed site ``counts`` in the ``pixels`` plate (scaled by ``n_pixels / M``), inside ``patterns``:
        ``log_rate (..., B, M)`` as computed from the per-pattern sites, ``y (B, M)``; the site's batch shape is
        ``(..., M, B)``."""
        with pyro.plate("pixels", batch.n_pixels, subsample=batch.pixels, dim=PIXELS_DIM):
            pyro.sample("counts", self.likelihood(pixels_by_patterns(log_rate)), obs=y.T)
