"""Photon-count likelihoods: objects that turn a log expected count into a Pyro distribution.

The model calls ``likelihood(log_rate)`` with ``log_rate`` of shape ``(..., B, M)`` (``M`` pixels)
and observes the counts ``(B, M)`` under the returned distribution with ``.to_event(1)``.

Example:
    >>> import torch
    >>> lik = PoissonLikelihood()
    >>> lik(torch.zeros(2, 5)).log_prob(torch.ones(2, 5)).shape
    torch.Size([2, 5])
"""

from __future__ import annotations

import pyro.distributions as dist
from torch import Tensor

__all__ = ["Likelihood", "PoissonLikelihood"]


class Likelihood:
    """Interface: ``__call__(log_rate (..., M)) -> Distribution`` with batch shape ``(..., M)``."""

    name: str = "likelihood"

    def __call__(self, log_rate: Tensor) -> dist.TorchDistribution:
        raise NotImplementedError

    def config(self) -> dict:
        """Settings to write to ``config.yaml``."""
        return {"name": self.name}


class PoissonLikelihood(Likelihood):
    """``y ~ Poisson(exp(log_rate) + background)``: photon counting, the exact model for an ideal detector.

    Args:
        background: expected background photons per pixel (``b_k`` in DESIGN section 3), >= 0.
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
