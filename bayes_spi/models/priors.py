"""Prior objects injected into :class:`~bayes_spi.models.spi.SPIModel`.

A prior is a small ``nn.Module`` (so it moves with ``.to(device)`` and may hold learnable
parameters) whose call returns a Pyro distribution for ``n`` patterns:

- a pose prior returns a distribution on SO(3) with batch shape ``(n,)`` and event shape ``(3, 3)``;
- a scale prior returns a distribution on ``(0, inf)`` with batch shape ``(n,)``.

Swapping a prior means passing another such object to the model's constructor.

Example:
    >>> prior = LogNormalScalePrior(sigma=0.5)
    >>> prior(4).sample().shape
    torch.Size([4])
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from bayes_spi.distributions.so3 import UniformSO3

__all__ = ["PosePrior", "ScalePrior", "UniformPosePrior", "LogNormalScalePrior"]


class PosePrior(nn.Module):
    """Interface: ``prior(n) -> Distribution`` on SO(3), batch shape ``(n,)``, event shape ``(3, 3)``."""

    def forward(self, n: int) -> dist.TorchDistribution:
        raise NotImplementedError


class ScalePrior(nn.Module):
    """Interface: ``prior(n) -> Distribution`` on ``(0, inf)``, batch shape ``(n,)``."""

    def forward(self, n: int) -> dist.TorchDistribution:
        raise NotImplementedError


class UniformPosePrior(PosePrior):
    """Uniform (Haar) prior on SO(3): every orientation equally likely (log density 0)."""

    def forward(self, n: int) -> dist.TorchDistribution:
        return UniformSO3().expand([n])


class LogNormalScalePrior(ScalePrior):
    """Fluence scale ``s ~ LogNormal(-sigma^2/2, sigma)``: mean 1, the field carries the absolute scale."""

    def __init__(self, sigma: float = 0.5) -> None:
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"expected a positive log-normal sigma, got {sigma}")
        self.register_buffer("sigma", torch.tensor(float(sigma)))

    def forward(self, n: int) -> dist.TorchDistribution:
        return dist.LogNormal(-0.5 * self.sigma**2, self.sigma).expand([n])
