r"""A smooth distribution on ``(0, inf)`` from samples or a histogram: a Gaussian mixture in ``log s``.

:class:`LogNormalMixture` has density

.. math:: p(s) = \frac{1}{s} \sum_j w_j \, N(\log s; m_j, h^2), \qquad s > 0,

a weighted Gaussian kernel density estimate in ``log s`` (components ``m_j`` at the log of sample
values or histogram bin centres, one bandwidth ``h``), i.e. a mixture of log-normals: it *is* Pyro's
``MixtureSameFamily(Categorical(logits), LogNormal(m, h))`` (a thin subclass that keeps the constructor
``(locs, logits, bandwidth)``, shares the components over any batch shape and samples with one normal
draw per value). It is proper (integrates to 1), smooth, has closed-form ``cdf`` and
``mean = sum_j w_j exp(m_j + h^2 / 2)``, and ``log_prob`` costs ``O(J)`` per value (keep ``J``, the
number of components, to ~100 by binning: :func:`bin_log_values`; the width from Silverman's rule:
:func:`silverman_bandwidth`).

Example:
    >>> d = LogNormalMixture(torch.tensor([-0.5, 0.0, 0.3]), torch.zeros(3), torch.tensor(0.1))
    >>> d.expand([4]).sample().shape
    torch.Size([4])
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyro.distributions as dist
import torch
from torch import Tensor

__all__ = ["LogNormalMixture", "bin_log_values", "silverman_bandwidth", "weighted_quantile"]


class LogNormalMixture(dist.MixtureSameFamily):
    r"""Mixture of log-normals with shared width: ``log s ~ sum_j w_j N(m_j, h^2)``.

    ``MixtureSameFamily(Categorical(logits=logits), LogNormal(locs, bandwidth))`` with the components
    shared by every batch element (a prior over per-pattern scales): ``log_prob``, ``cdf``, ``mean`` and
    ``variance`` are the mixture's.

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
        shape = torch.Size(batch_shape) + locs.shape  # (..., J)
        super().__init__(dist.Categorical(logits=logits.expand(shape)),
                         dist.LogNormal(locs.expand(shape), bandwidth.expand(shape)), validate_args=validate_args)

    def expand(self, batch_shape: Sequence[int] | torch.Size, _instance: object = None) -> "LogNormalMixture":
        """The same mixture with batch shape ``batch_shape`` (components shared, nothing copied)."""
        new = LogNormalMixture(self.locs, self.logits, self.bandwidth, batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def log_weights(self) -> Tensor:
        """Normalised log weights ``(J,)``."""
        return self.logits - torch.logsumexp(self.logits, dim=-1)

    def cdf(self, value: Tensor) -> Tensor:
        """``P(S <= value)`` (0 for ``value <= 0``), shape ``broadcast(value.shape, batch_shape)``."""
        positive = value > 0
        c = super().cdf(torch.where(positive, value, torch.ones_like(value)))
        return torch.where(positive, c, torch.zeros_like(c))

    def sample(self, sample_shape: Sequence[int] | torch.Size = torch.Size()) -> Tensor:
        """Draws ``exp(m_J + h z)``, ``J ~ Categorical(w)``, ``z ~ N(0, 1)``: shape ``sample_shape + batch_shape``
        (one normal per value; ``MixtureSameFamily.sample`` would draw one from each of the ``J`` components)."""
        shape = torch.Size(sample_shape) + self.batch_shape
        with torch.no_grad():
            j = torch.distributions.Categorical(logits=self.logits).sample(shape)
            z = torch.randn(shape, dtype=self.locs.dtype, device=self.locs.device)
            return torch.exp(self.locs[j] + self.bandwidth * z)


def weighted_quantile(x: np.ndarray, w: np.ndarray, q: np.ndarray | float) -> np.ndarray:
    """Quantiles ``q`` of points ``x (J,)`` with weights ``w (J,)`` (linear in the cumulative weight)."""
    order = np.argsort(x)
    x, w = x[order], w[order]
    cum = np.cumsum(w) - 0.5 * w
    return np.interp(q, cum / w.sum(), x)


def silverman_bandwidth(x: np.ndarray, w: np.ndarray, n: float) -> float:
    """Silverman's rule ``0.9 min(sd, IQR / 1.34) n^(-1/5)`` for weighted points ``x`` (0 if no spread)."""
    p = w / w.sum()
    mean = float((p * x).sum())
    sd = float(np.sqrt((p * (x - mean) ** 2).sum()))
    q25, q75 = weighted_quantile(x, w, np.array([0.25, 0.75]))
    spread = min(sd, float(q75 - q25) / 1.34) if q75 > q25 else sd
    return 0.9 * spread * max(float(n), 1.0) ** -0.2


def bin_log_values(values: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Histogram positive ``values`` in ``bins`` equal bins of ``log value``.

    Returns:
        ``(log centres (J,), counts (J,), log bin width)`` with empty bins dropped (width 0 if all equal).
    """
    lv = np.log(values)
    lo, hi = float(lv.min()), float(lv.max())
    if hi <= lo:
        return np.array([lo]), np.array([float(lv.size)]), 0.0
    counts, edges = np.histogram(lv, bins=int(bins), range=(lo, hi))
    centres = 0.5 * (edges[1:] + edges[:-1])
    keep = counts > 0
    return centres[keep], counts[keep].astype(np.float64), float(edges[1] - edges[0])
