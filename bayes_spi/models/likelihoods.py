"""Photon-count likelihoods: objects that turn a log expected count into a Pyro distribution.

A likelihood is elementwise: ``likelihood(log_rate)`` returns a distribution with batch shape
``log_rate.shape``, one count per element. The model calls it with ``log_rate`` of shape ``(..., M, B)``
(``M`` pixels, ``B`` patterns: the ``pixels`` plate at dim -2, ``patterns`` at dim -1) and observes the
counts ``(M, B)``; tools such as the guide's scorer call it with ``(..., B, M)``.

Built-ins and their spec names (:func:`make_likelihood`, :mod:`bayes_spi.config.specs`):
:class:`PoissonLikelihood` (``poisson``) and :class:`PoissonGaussianLikelihood` (``poisson-gaussian``:
Poisson photons plus Gaussian read-out noise, clipped at 0 and rounded, as the simulator's ``G``).

Example:
    >>> import torch
    >>> lik = PoissonLikelihood()
    >>> lik(torch.zeros(2, 5)).log_prob(torch.ones(2, 5)).shape
    torch.Size([2, 5])
    >>> make_likelihood("poisson-gaussian:sigma=0.3")(torch.zeros(2, 5)).log_prob(torch.ones(2, 5)).shape
    torch.Size([2, 5])
"""

from __future__ import annotations

from typing import Any, Callable

import pyro.distributions as dist
from torch import Tensor

from bayes_spi.distributions.readout import PoissonGaussianCounts
from bayes_spi.config.specs import normalize_spec

__all__ = ["Likelihood", "PoissonLikelihood", "PoissonGaussianLikelihood", "LIKELIHOODS", "make_likelihood"]


class Likelihood:
    """Interface: ``__call__(log_rate) -> Distribution`` with batch shape ``log_rate.shape`` (elementwise: no
    per-pixel parameters that assume where the pixel dim is)."""

    name: str = "likelihood"

    def __call__(self, log_rate: Tensor) -> dist.TorchDistribution:
        raise NotImplementedError

    def config(self) -> dict:
        """Settings to write to ``config.yaml``."""
        return {"name": self.name}


class PoissonLikelihood(Likelihood):
    """``y ~ Poisson(exp(log_rate) + background)``: photon counting, the exact model for an ideal detector.

    Args:
        background: expected background photons per pixel (``b_k`` in docs/DESIGN.md section 3), >= 0.
        max_log_rate: the log rate is clamped above at this value (guards ``exp`` overflow in the first
            steps of a fit; far above any physical count).
    """

    name = "poisson"

    def __init__(self, background: float = 0.0, max_log_rate: float = 30.0) -> None:
        if background < 0:
            raise ValueError(f"expected background >= 0, got {background}")
        self.background = float(background)
        self.max_log_rate = float(max_log_rate)

    def __call__(self, log_rate: Tensor) -> dist.TorchDistribution:
        rate = log_rate.clamp(max=self.max_log_rate).exp()
        if self.background > 0:
            rate = rate + self.background
        return dist.Poisson(rate.clamp(min=1e-30))

    def config(self) -> dict:
        return {"name": self.name, "background": self.background}


class PoissonGaussianLikelihood(Likelihood):
    """``y = round(max(Poisson(rate) + N(0, readout_sigma^2), 0))``, ``rate = exp(log_rate) + background``.

    The exact likelihood of a detector with Gaussian read-out noise (the simulator's ``G`` artifact):
    :class:`~bayes_spi.distributions.readout.PoissonGaussianCounts`, whose ``log_prob`` sums the Poisson
    photon number over a window around each count chosen so the truncation error is below ``tol``
    (relative), at ``2 W + 1`` terms per pixel (``W = 1`` for ``sigma = 0.1``, about 3 for 0.3).

    Args:
        readout_sigma: read-out noise standard deviation in photons, >= 0 (0: plain Poisson).
        background: expected background photons per pixel, >= 0.
        max_log_rate: clamp of the log rate (as :class:`PoissonLikelihood`).
        tol, max_half_width: truncation tolerance and window cap of the sum.

    Example:
        >>> import torch
        >>> lik = PoissonGaussianLikelihood(0.3)
        >>> float(lik(torch.zeros(1)).log_prob(torch.zeros(1))) < 0
        True
    """

    name = "poisson-gaussian"

    def __init__(self, readout_sigma: float, background: float = 0.0, max_log_rate: float = 30.0,
                 tol: float = 1e-7, max_half_width: int = 64) -> None:
        if not readout_sigma >= 0:
            raise ValueError(f"expected readout_sigma >= 0, got {readout_sigma}")
        if not background >= 0:
            raise ValueError(f"expected background >= 0, got {background}")
        self.readout_sigma = float(readout_sigma)
        self.background = float(background)
        self.max_log_rate = float(max_log_rate)
        self.tol = float(tol)
        self.max_half_width = int(max_half_width)

    def __call__(self, log_rate: Tensor) -> dist.TorchDistribution:
        rate = log_rate.clamp(max=self.max_log_rate).exp()
        if self.background > 0:
            rate = rate + self.background
        return PoissonGaussianCounts(rate.clamp(min=1e-30), self.readout_sigma, tol=self.tol,
                                     max_half_width=self.max_half_width)

    def config(self) -> dict:
        return {"name": self.name, "sigma": self.readout_sigma, "background": self.background}


#: likelihood spec name -> factory taking the spec's parameters (see :data:`bayes_spi.config.specs.SCHEMAS`)
LIKELIHOODS: dict[str, Callable[..., Likelihood]] = {
    "poisson": lambda background: PoissonLikelihood(background=background),
    "poisson-gaussian": lambda sigma, background: PoissonGaussianLikelihood(sigma, background=background),
}


def make_likelihood(spec: str | dict[str, Any]) -> Likelihood:
    """The likelihood of a spec, e.g. ``"poisson"`` or ``{"name": "poisson-gaussian", "sigma": 0.3}``.

    Raises:
        ValueError: unknown name or bad parameters (the message names ``--likelihood`` and what was expected).
    """
    s = normalize_spec("likelihood", spec)
    return LIKELIHOODS[s["name"]](**{k: v for k, v in s.items() if k != "name"})
