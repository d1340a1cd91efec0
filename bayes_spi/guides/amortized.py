"""Amortized guide: a CNN maps each pattern to its posterior over pose and fluence scale.

For pattern ``i`` with counts ``y_i``::

    hypothesis_i ~ Categorical(w(y_i))                        K = 2 H hypotheses, enumerated exactly
    R_i | k      ~ LieNormalSO3(R_k(y_i), sigma_k(y_i))       reparameterised Gaussian on SO(3)
    s_i          ~ LogNormal(log(N_i / N_ref) + a(y_i), b(y_i))

The encoder proposes ``H`` rotations ``R_h``; each is paired with ``R_h @ Rz(pi)``, the pose that gives
the same pattern up to Ewald curvature (docs/DESIGN.md section 4), so the genuine two-fold ambiguity is always
represented and its weight is inferred. The mixture over hypotheses is the Bayesian form of X-RAI's
"keep the better of K": with ``TraceEnum_ELBO`` the ELBO is the exact ``w``-weighted sum of the
per-hypothesis ELBOs plus ``KL(w || uniform)``, so the weights become the posterior probabilities
of the hypotheses. The guide computes those weights from the model itself when it is given a scorer
(``AmortizedGuide(..., scorer=model.hypothesis_logpost)``): ``w_k ∝ exp(logit_k + log p(y_i | R_k, s_i))``, the
posterior probability of each hypothesis given its centre, so the best-fitting hypothesis wins from
the first step (multiple-choice learning, the Bayesian way) instead of waiting for a head to learn to
predict it. ``weight_floor`` mixes ``floor / K`` into the weights (a constraint on the guide
family, so the ELBO stays a bound): early in a fit it keeps every head learning, like the
``0.05 * mean`` term of multiple-choice learning.

``N_i`` is the pattern's total count and ``N_ref`` a fixed reference (the mean total of the first
batch seen), so the scale posterior starts at the closed-form Poisson estimate.

Example:
    >>> import torch
    >>> from bayes_spi.models.spi import SPIBatch
    >>> guide = AmortizedGuide(torch.ones(16, 16, dtype=torch.bool), n_heads=2)
    >>> post = guide.posterior(torch.rand(3, 16, 16))
    >>> post.rotations.shape, post.weights.shape
    (torch.Size([3, 4, 3, 3]), torch.Size([3, 4]))
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayes_spi.distributions.so3 import LieNormalSO3
from bayes_spi.guides.encoder import PatternEncoder
from bayes_spi.models.spi import SPIBatch
from bayes_spi.so3 import rotz_pi, sixd_to_rotmat

__all__ = ["AmortizedGuide", "FieldGuide", "PosePosterior", "Scorer", "Search", "count_hypotheses"]

#: ``(R (K, B, 3, 3), log_s (B,), images (B, n_y, n_x), pixels (M,)) -> (K, B)`` log-likelihoods (or
#: log-posteriors) of the pose hypotheses, e.g. :meth:`bayes_spi.models.spi.SPIModel.hypothesis_logpost`;
#: with a ``field_guide``, also called with the keyword ``amplitude=`` (the field's draw, ``(L,)``).
Scorer = Callable[..., Tensor]
#: ``(images (B, n_y, n_x), pixels (M,)) -> (B, n_search, 3, 3)`` proposals, e.g.
#: :class:`bayes_spi.guides.search.OrientationSearch`.
Search = Callable[[Tensor, Tensor], Tensor]
#: ``() -> Tensor``: the guide side of a global latent of the model's field (samples the site ``amplitude``),
#: called first in ``forward``; returns the draw ``(L,)``, which the scorer gets as ``amplitude=``.
FieldGuide = Callable[[], Tensor]

_ROTZ_PI = rotz_pi()


def count_hypotheses(n_heads: int, n_search: int = 0) -> int:
    """``K = 2 n_heads + n_search``: the number of pose hypotheses of a guide (the model's ``n_hypotheses``).

    Example:
        >>> count_hypotheses(4, 2)
        10
    """
    return 2 * int(n_heads) + int(n_search)


@dataclass
class PosePosterior:
    """Per-pattern posterior parameters.

    Attributes:
        rotations: ``(B, K, 3, 3)`` hypothesis centres: ``2 H`` from the encoder (heads, then their
            Rz(pi) partners), then ``n_search`` from the orientation search.
        sigmas: ``(B, K, 3)`` tangent-space standard deviations (rad).
        weights: ``(B, K)`` hypothesis probabilities.
        scale_loc, scale_scale: ``(B,)`` LogNormal parameters of the fluence scale.
        n_encoder: how many of the ``K`` hypotheses come from the encoder (the first ones).
    """

    rotations: Tensor
    sigmas: Tensor
    weights: Tensor
    scale_loc: Tensor
    scale_scale: Tensor
    n_encoder: int = 0


class AmortizedGuide(nn.Module):
    """Careless-style amortized posterior over pose (mixture on SO(3)) and fluence scale.

    Args:
        mask: ``(n_y, n_x)`` bool, True for good pixels.
        n_heads: ``H`` rotation proposals per pattern; ``K = 2 H`` hypotheses with the Rz(pi) partners.
        features: encoder output width.
        channels: encoder base channels.
        transform: encoder input transform (``log1p``, ``sqrt``, ``root10``).
        sigma_init: initial pose spread (rad).
        n_search: proposals per pattern from ``search`` (``0``: none).
        pixel_q: optional ``(n_y, n_x, 3)`` pixel ``q`` of a per-pixel geometry: the encoder assembles the
            patterns in ``(q_x, q_y)`` (:mod:`bayes_spi.guides.encoder`).
        scorer: a :data:`Scorer` that weighs the hypotheses with the model (semi-amortized weights; see the
            module doc), e.g. ``model.hypothesis_logpost``; ``None``: the weights are the logit head's alone.
        search: a :data:`Search` giving ``n_search`` proposals per pattern (required when ``n_search > 0``,
            refused when ``n_search == 0``). Available as the attribute :attr:`search`.
        field_guide: a :data:`FieldGuide` called at the start of :meth:`forward`, outside the ``patterns``
            plate: the guide side of a global latent of the model's field, e.g.
            :meth:`bayes_spi.models.variational_field.VariationalAmplitudeField.guide_sample` (site
            ``amplitude``); its draw is passed to ``scorer`` (``amplitude=``), so the hypotheses are scored
            against the same field the model's likelihood then uses.

    The model is not a submodule of the guide: ``scorer``, ``search`` and ``field_guide`` are held outside
    the module tree (not in the guide's ``state_dict``, not moved by ``guide.to``).
    """

    def __init__(
        self,
        mask: Tensor,
        n_heads: int = 4,
        features: int = 256,
        channels: int = 32,
        transform: str = "log1p",
        sigma_init: float = 0.1,
        n_search: int = 0,
        pixel_q: Tensor | None = None,
        *,
        scorer: Scorer | None = None,
        search: Search | None = None,
        field_guide: FieldGuide | None = None,
    ) -> None:
        super().__init__()
        if mask.dim() != 2:
            raise ValueError(f"expected mask of shape (n_y, n_x), got shape {tuple(mask.shape)}")
        if n_heads < 1:
            raise ValueError(f"expected n_heads >= 1, got {n_heads}")
        self.register_buffer("mask", mask.bool())
        self.register_buffer("rotz_pi", _ROTZ_PI.clone())
        self.register_buffer("log_n_ref", torch.tensor(float("nan")))
        if n_search < 0:
            raise ValueError(f"expected n_search >= 0, got {n_search}")
        self.n_heads = int(n_heads)
        self.n_search = int(n_search)
        self.n_encoder_hypotheses = 2 * self.n_heads
        self.n_hypotheses = count_hypotheses(self.n_heads, self.n_search)
        self.encoder = PatternEncoder(mask.shape[0], mask.shape[1], features, channels, transform, pixel_q=pixel_q)
        self.rot_head = nn.Linear(features, self.n_heads * 6)
        self.sigma_head = nn.Linear(features, self.n_hypotheses * 3)
        self.logit_head = nn.Linear(features, self.n_hypotheses)
        self.scale_head = nn.Linear(features, 2)
        # broad initial pose proposals: different patterns start at very different rotations
        nn.init.normal_(self.rot_head.weight, std=3.0 / features**0.5)
        nn.init.zeros_(self.sigma_head.weight)
        nn.init.constant_(self.sigma_head.bias, float(torch.log(torch.expm1(torch.tensor(sigma_init)))))
        for head in (self.logit_head, self.scale_head):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        nn.init.constant_(self.scale_head.bias[1:], -2.69)  # initial spread 2 sigmoid(-2.69) = 0.127
        self.weight_floor = 0.0
        # plain lists, not attributes: a scorer or search holding the model must not make it a submodule
        self._scorer: list[Scorer] = [] if scorer is None else [scorer]
        self._field_guide: list[FieldGuide] = [] if field_guide is None else [field_guide]
        self._search: list[Search] = []
        self.search = search
        self.last_posterior: PosePosterior | None = None

    @property
    def scorer(self) -> Scorer | None:
        """The hypothesis scorer given at construction (``None`` if none)."""
        return self._scorer[0] if self._scorer else None

    @property
    def field_guide(self) -> FieldGuide | None:
        """The field's guide-side sampler given at construction (``None`` if none)."""
        return self._field_guide[0] if self._field_guide else None

    @property
    def search(self) -> Search | None:
        """The orientation search (``None`` if none); assignable, e.g. to search a half-set's model."""
        return self._search[0] if self._search else None

    @search.setter
    def search(self, search: Search | None) -> None:
        if search is not None and self.n_search == 0:
            raise ValueError("this guide was built with n_search=0: expected n_search > 0 to use a search")
        self._search = [] if search is None else [search]

    def __setattr__(self, name: str, value: object) -> None:
        if name == "search":  # through the property even for a Module-valued search (never a submodule)
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _log_totals(self, images: Tensor) -> Tensor:
        totals = (images * self.mask.to(images.dtype)).sum(dim=(-2, -1))
        log_n = totals.clamp(min=1.0).log()
        if torch.isnan(self.log_n_ref):
            self.log_n_ref.fill_(float(log_n.mean()))
        return log_n - self.log_n_ref

    @contextmanager
    def evaluating(self) -> Iterator["AmortizedGuide"]:
        """Eval mode and no weight floor inside the block (the posterior as a user reads it), restored after."""
        was, floor = self.training, self.weight_floor
        self.eval()
        self.weight_floor = 0.0
        try:
            yield self
        finally:
            self.weight_floor = floor
            self.train(was)

    def posterior(self, images: Tensor, pixels: Tensor | None = None, score: bool = True,
                  amplitude: Tensor | None = None) -> PosePosterior:
        """Posterior parameters for ``images (B, n_y, n_x)``.

        With a scorer, the hypothesis weights are ``softmax(logit_head + log p(y | R_k, s))``
        with the likelihood evaluated at each hypothesis' centre on ``pixels`` (default: all good
        pixels), against the field's draw ``amplitude (L,)`` when given (:meth:`forward` passes its
        ``field_guide``'s), else the field's own intensity (a variational field's posterior mean); without
        a scorer, or with ``score=False`` (a caller that re-weighs the hypotheses itself and skips the field
        evaluations), ``softmax(logit_head)``.
        """
        h = self.encoder(images, self.mask)
        self.last_features = h  # (B, features): subclasses' extra heads (bayes_spi.guides.latent) read it
        n_batch = images.shape[0]
        r6 = self.rot_head(h).reshape(n_batch, self.n_heads, 6)
        rots = sixd_to_rotmat(r6)  # (B, H, 3, 3)
        rots = torch.cat([rots, rots @ self.rotz_pi], dim=1)  # (B, 2H, 3, 3)
        if self.n_search:
            if not self._search:
                raise RuntimeError("guide built with n_search > 0 but no search: expected search=... at construction")
            if pixels is None:
                pixels = torch.nonzero(self.mask.reshape(-1)).squeeze(-1)
            found = self._search[0](images, pixels).to(rots.dtype)
            if found.shape != (n_batch, self.n_search, 3, 3):
                raise ValueError(f"expected search proposals of shape ({n_batch}, {self.n_search}, 3, 3), "
                                 f"got shape {tuple(found.shape)}")
            rots = torch.cat([rots, found], dim=1)  # (B, K, 3, 3)
        sc = self.scale_head(h)
        # bounded heads: the scale's location stays within a factor e^3 of the closed-form Poisson estimate
        # and its spread within (1e-3, 2], whatever the encoder's inputs (a huge input must not send a
        # LogNormal site to 0 or infinity)
        loc = self._log_totals(images)
        if self.n_search and getattr(self._search[0], "last_log_scale", None) is not None:
            # the search's profile (maximum-likelihood) scale at the best grid rotation, against the current
            # field: the scale stays in step with the field's level, which it is otherwise degenerate with
            loc = self._search[0].last_log_scale.to(loc.dtype).detach()
        loc = loc + 3.0 * torch.tanh(sc[:, 0] / 3.0)
        scale = 2.0 * torch.sigmoid(sc[:, 1]) + 1e-3
        sig = (F.softplus(self.sigma_head(h)).reshape(n_batch, self.n_hypotheses, 3) + 1e-3).clamp(max=3.0)
        logits = self.logit_head(h)
        if self._scorer and score:
            if pixels is None:
                pixels = torch.nonzero(self.mask.reshape(-1)).squeeze(-1)
            field_draw = {} if amplitude is None else {"amplitude": amplitude}
            with torch.no_grad():
                ll = self._scorer[0](rots.transpose(0, 1), loc.detach(), images, pixels, **field_draw)  # (K, B)
            logits = logits + ll.T
        w = torch.softmax(logits, dim=-1)
        if self.weight_floor > 0:
            w = (1.0 - self.weight_floor) * w + self.weight_floor / self.n_hypotheses
        post = PosePosterior(rots, sig, w, loc, scale, self.n_encoder_hypotheses)
        self.last_posterior = post
        return post

    def forward(self, batch: SPIBatch, n_total: int) -> PosePosterior:
        pyro.module("guide", self)
        # a global field latent first (site "amplitude"): the hypotheses are scored against its draw
        amplitude = self._field_guide[0]() if self._field_guide else None
        post = self.posterior(batch.images, batch.pixels, amplitude=amplitude)
        n_batch = batch.images.shape[0]
        rows = torch.arange(n_batch, device=batch.images.device)
        with pyro.plate("patterns", n_total, subsample=batch.indices):
            k = pyro.sample("hypothesis", dist.Categorical(probs=post.weights), infer={"enumerate": "parallel"})
            pyro.sample("pose", LieNormalSO3(post.rotations[rows, k], post.sigmas[rows, k]))
            pyro.sample("scale", dist.LogNormal(post.scale_loc, post.scale_scale))
        return post
