r"""A smooth distribution on ``(0, inf)`` from samples or a histogram: a Gaussian mixture in ``log s``.

:class:`LogNormalMixture` has density

.. math:: p(s) = \frac{1}{s} \sum_j w_j \, N(\log s; m_j, h^2), \qquad s > 0,

a weighted Gaussian kernel density estimate in ``log s`` (components ``m_j`` at the log of sample
values or histogram bin centres, one bandwidth ``h``), i.e. a mixture of log-normals. It is proper
(integrates to 1), smooth, has closed-form ``cdf`` and ``mean = sum_j w_j exp(m_j + h^2 / 2)``, and
``log_prob`` costs ``O(J)`` per value (keep ``J``, the number of components, to ~100 by binning).

Example:
    >>> d = LogNormalMixture(torch.tensor([-0.5, 0.0, 0.3]), torch.zeros(3), torch.tensor(0.1))
    >>> d.expand([4]).sample().shape
    torch.Size([4])
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor
from torch.distributions.constraints import Constraint

__all__ = ["LogNormalMixture"]


class LogNormalMixture(TorchDistribution):
    r"""Mixture of log-normals with shared width: ``log s ~ sum_j w_j N(m_j, h^2)``.

    The components are shared by every batch element (a prior over per-pattern scales).

    Args:
        locs: ``m_j``, shape ``(J,)`` (log of the component centres).
        logits: unnormalised log weights, shape ``(J,)``.
        bandwidth: ``h > 0``, scalar tensor (width in ``log s``).
        batch_shape: batch shape of the distribution.
        validate_args: validate arguments and values.

    Example:
        >>> d = LogNormalMixture(torch.tensor([0.0]), torch.zeros(1), torch.tensor(0.5))
        >>> round(float(d.mean), 4)                  # exp(h^2 / 2)
        1.1331
    """

    arg_constraints: dict[str, Constraint] = {
        "locs": constraints.independent(constraints.real, 1),
        "logits": constraints.independent(constraints.real, 1),
        "bandwidth": constraints.positive,
    }
    support = constraints.positive
    has_rsample = False

    def __init__(
        self,
        locs: Tensor,
        logits: Tensor,
        bandwidth: Tensor | float,
        batch_shape: Sequence[int] | torch.Size = (),
        validate_args: bool | None = None,
    ) -> None:
        if not isinstance(locs, Tensor) or locs.dim() != 1 or locs.numel() < 1:
            raise ValueError(f"expected locs of shape (J,), J >= 1, got shape {tuple(getattr(locs, 'shape', ()))}")
        if not isinstance(logits, Tensor) or logits.shape != locs.shape:
            raise ValueError(f"expected logits of shape {tuple(locs.shape)}, got shape "
                             f"{tuple(getattr(logits, 'shape', ()))}")
        if not isinstance(bandwidth, Tensor):
            bandwidth = torch.as_tensor(bandwidth, dtype=locs.dtype, device=locs.device)
        if bandwidth.dim() != 0:
            raise ValueError(f"expected a scalar bandwidth, got shape {tuple(bandwidth.shape)}")
        self.locs = locs
        self.logits = logits
        self.bandwidth = bandwidth
        super().__init__(torch.Size(batch_shape), torch.Size(), validate_args=validate_args)

    def expand(self, batch_shape: Sequence[int] | torch.Size, _instance=None) -> "LogNormalMixture":
        new = self._get_checked_instance(LogNormalMixture, _instance)
        new.locs, new.logits, new.bandwidth = self.locs, self.logits, self.bandwidth
        super(LogNormalMixture, new).__init__(torch.Size(batch_shape), torch.Size(), validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def log_weights(self) -> Tensor:
        """Normalised log weights ``(J,)``."""
        return self.logits - torch.logsumexp(self.logits, dim=-1)

    @property
    def mean(self) -> Tensor:
        """``sum_j w_j exp(m_j + h^2 / 2)``, shape ``batch_shape``."""
        m = torch.logsumexp(self.log_weights + self.locs, dim=-1) + 0.5 * self.bandwidth**2
        return m.exp().expand(self.batch_shape)

    @property
    def variance(self) -> Tensor:
        """``E[s^2] - E[s]^2`` with ``E[s^2] = sum_j w_j exp(2 m_j + 2 h^2)``, shape ``batch_shape``."""
        m2 = torch.logsumexp(self.log_weights + 2.0 * self.locs, dim=-1).exp() * torch.exp(2.0 * self.bandwidth**2)
        return (m2 - self.mean**2).expand(self.batch_shape)

    @staticmethod
    def _log(value: Tensor) -> Tensor:
        value = value if value.is_floating_point() else value.to(torch.get_default_dtype())
        return value.clamp_min(torch.finfo(value.dtype).tiny).log()

    def _z(self, value: Tensor) -> Tensor:
        return (self._log(value)[..., None] - self.locs) / self.bandwidth  # (..., J)

    def log_prob(self, value: Tensor) -> Tensor:
        """Log density on ``(0, inf)``, shape ``broadcast(value.shape, batch_shape)``."""
        if self._validate_args:
            self._validate_sample(value)
        z = self._z(value)
        log_norm = -0.5 * z * z - math.log(math.sqrt(2.0 * math.pi)) - self.bandwidth.log()
        lp = torch.logsumexp(self.log_weights + log_norm, dim=-1) - self._log(value)
        return lp.expand(torch.broadcast_shapes(lp.shape, self.batch_shape))

    def cdf(self, value: Tensor) -> Tensor:
        """``P(S <= value)``, shape ``broadcast(value.shape, batch_shape)``."""
        c = (self.log_weights.exp() * torch.special.ndtr(self._z(value))).sum(-1)
        c = torch.where(value > 0, c, torch.zeros_like(c))
        return c.expand(torch.broadcast_shapes(c.shape, self.batch_shape))

    def sample(self, sample_shape: Sequence[int] | torch.Size = torch.Size()) -> Tensor:
        """Draws ``exp(m_J + h z)``, ``J ~ Categorical(w)``, ``z ~ N(0, 1)``: shape ``sample_shape + batch_shape``."""
        shape = torch.Size(sample_shape) + self.batch_shape
        with torch.no_grad():
            j = torch.distributions.Categorical(logits=self.logits).sample(shape)
            z = torch.randn(shape, dtype=self.locs.dtype, device=self.locs.device)
            return torch.exp(self.locs[j] + self.bandwidth * z)
