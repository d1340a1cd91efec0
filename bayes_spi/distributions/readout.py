r"""Photon counts with Gaussian read-out noise, exactly as the simulator's ``G`` artifact makes them.

Generative process (:func:`bayes_spi.sim.simulate.simulate`, artifacts ``P`` then ``G``)::

    k ~ Poisson(rate)                   photons
    y = round(max(k + sigma * e, 0))    e ~ N(0, 1); read-out noise in photon units, clipped, rounded

so for an integer ``y >= 0``

.. math::
    p(y) = \sum_{k \ge 0} \mathrm{Pois}(k; \lambda) \, P(y \mid k), \qquad
    P(y \mid k) = \begin{cases}
        \Phi\big(\frac{y + 1/2 - k}{\sigma}\big) - \Phi\big(\frac{y - 1/2 - k}{\sigma}\big) & y \ge 1 \\
        \Phi\big(\frac{1/2 - k}{\sigma}\big) & y = 0 \end{cases}

(rounding ties have probability 0). ``P(y | k)`` is evaluated in log space without cancellation
(reflected so both normal CDFs are lower tails, then ``log(1 - exp(.))``).

**The window.** The sum is truncated to ``k in [y - W, y + W]`` (and ``k >= 0``). Write
``t_k = Pois(k) P(y | k)``, ``j = |k - y|``. For ``j >= 1``, ``P(y | k)`` is a normal probability of a
unit-length interval at distance ``(j - 1/2) / sigma``, and for such intervals
``D(x + d) <= exp(-x d - d^2 / 2) D(x)`` (``d = 1/sigma``), so stepping one further away from ``y``
multiplies the Gaussian factor by at most ``exp(-j / sigma^2)``; the Poisson factor changes by
``lambda / (k + 1) <= lambda / (y + 1)`` upwards and ``k / lambda <= y / lambda`` downwards. With
``A = max(1, lambda / (y + 1), y / lambda)`` (the maximum over all elements of the call) every step
beyond ``W`` has ratio at most ``rho = A exp(-W / sigma^2)``, and ``t_{y +- W} <= t_y
A^W exp(-W (W - 1) / (2 sigma^2))``. Hence the omitted mass, relative to the sum that is kept, is at most

.. math:: \epsilon(W) = 2 \min\big(1, A^W e^{-W (W - 1) / (2 \sigma^2)}\big) \, \frac{\rho}{1 - \rho}.

``W`` is the smallest integer ``>= 1`` with ``epsilon(W) <= tol`` (default ``1e-7``: an error below
``1e-7`` nats per pixel, under float32 rounding). It is found per call from the data, e.g. ``W = 1`` for
``sigma = 0.1``, 3 for ``sigma = 0.3`` and ``A = 1e3``, 16 for ``sigma = 1``; the cost is ``2 W + 1``
terms per pixel. ``W`` is capped at ``max_half_width``; only then can the bound fail, and the result is
a lower bound of the true log-probability (the dropped terms are positive).

Example:
    >>> d = PoissonGaussianCounts(torch.tensor([0.5, 3.0]), 0.3)
    >>> d.log_prob(torch.tensor([0.0, 4.0])).shape
    torch.Size([2])
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor
from torch.distributions.constraints import Constraint

__all__ = ["PoissonGaussianCounts", "log_normal_interval", "window_half_width"]

_LN2 = math.log(2.0)


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate near 0 and for very negative ``x``."""
    return torch.where(x > -_LN2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def log_normal_interval(a: Tensor, b: Tensor) -> Tensor:
    """``log(Phi(b) - Phi(a))`` for ``a < b`` (``a`` may be ``-inf``), without cancellation in either tail.

    Example:
        >>> round(float(log_normal_interval(torch.tensor(-float("inf")), torch.tensor(0.0))), 6)   # log(1/2)
        -0.693147
    """
    flip = a > 0  # both in the upper tail: use the mirror image Phi(-a) - Phi(-b)
    lo = torch.where(flip, -b, a)
    hi = torch.where(flip, -a, b)
    log_hi = torch.special.log_ndtr(hi)
    return log_hi + _log1mexp(torch.special.log_ndtr(lo) - log_hi)


def window_half_width(log_a: float, sigma: float, tol: float = 1e-7, max_half_width: int = 64) -> int:
    """Smallest ``W >= 1`` with relative truncation error ``epsilon(W) <= tol`` (see the module doc), capped.

    Args:
        log_a: ``log A >= 0``, ``A = max(1, lambda / (y + 1), y / lambda)`` over all elements.
        sigma: read-out noise (photons), ``> 0``.
        tol: relative error bound.
        max_half_width: the cap.

    Example:
        >>> window_half_width(math.log(1e3), 0.3)
        3
    """
    inv_s2 = 1.0 / (sigma * sigma)
    log_tol = math.log(tol / 2.0)
    for w in range(1, max_half_width + 1):
        log_rho = log_a - w * inv_s2
        if log_rho >= 0:
            continue
        log_edge = min(0.0, w * log_a - 0.5 * w * (w - 1) * inv_s2)
        if log_edge + log_rho - math.log1p(-math.exp(log_rho)) <= log_tol:
            return w
    return max_half_width


class PoissonGaussianCounts(TorchDistribution):
    r"""``y = round(max(Poisson(rate) + N(0, sigma^2), 0))``: counts of a detector with read-out noise.

    Args:
        rate: expected photons ``lambda >= 0``, shape ``batch_shape``.
        sigma: read-out noise standard deviation in photons, ``>= 0`` (0: plain Poisson).
        tol: bound on the relative truncation error of ``log_prob`` (see the module doc).
        max_half_width: cap on the window half-width ``W``.
        validate_args: validate arguments and values.

    Example:
        >>> d = PoissonGaussianCounts(torch.full((3,), 2.0), 0.5)
        >>> y = d.sample((10,))                 # (10, 3) non-negative integers (as floats)
        >>> bool((y >= 0).all() and (y == y.round()).all())
        True
    """

    arg_constraints: dict[str, Constraint] = {"rate": constraints.nonnegative, "sigma": constraints.nonnegative}
    support = constraints.nonnegative_integer
    has_rsample = False

    def __init__(
        self,
        rate: Tensor,
        sigma: Tensor | float,
        tol: float = 1e-7,
        max_half_width: int = 64,
        validate_args: bool | None = None,
    ) -> None:
        if not isinstance(rate, Tensor):
            raise ValueError(f"expected rate to be a tensor, got {type(rate).__name__}")
        if not isinstance(sigma, Tensor):
            sigma = torch.as_tensor(float(sigma), dtype=rate.dtype, device=rate.device)
        if sigma.dim() != 0:
            raise ValueError(f"expected a scalar sigma, got shape {tuple(sigma.shape)}")
        if not 0 < tol < 1:
            raise ValueError(f"expected 0 < tol < 1, got {tol}")
        if int(max_half_width) < 1:
            raise ValueError(f"expected max_half_width >= 1, got {max_half_width}")
        self.rate = rate
        self.sigma = sigma
        self.tol = float(tol)
        self.max_half_width = int(max_half_width)
        super().__init__(rate.shape, torch.Size(), validate_args=validate_args)

    def expand(self, batch_shape: Sequence[int] | torch.Size, _instance=None) -> "PoissonGaussianCounts":
        new = self._get_checked_instance(PoissonGaussianCounts, _instance)
        batch_shape = torch.Size(batch_shape)
        new.rate = self.rate.expand(batch_shape)
        new.sigma, new.tol, new.max_half_width = self.sigma, self.tol, self.max_half_width
        super(PoissonGaussianCounts, new).__init__(batch_shape, torch.Size(), validate_args=False)
        new._validate_args = self._validate_args
        return new

    def sample(self, sample_shape: Sequence[int] | torch.Size = torch.Size()) -> Tensor:
        """The simulator's process ``round(clip(Poisson(rate) + sigma z, 0))``: ``sample_shape + batch_shape``."""
        shape = torch.Size(sample_shape) + self.batch_shape
        with torch.no_grad():
            k = torch.poisson(self.rate.expand(shape))
            noisy = k + self.sigma * torch.randn(shape, dtype=k.dtype, device=k.device)
            return torch.round(noisy.clamp_min(0.0))

    def half_width(self, value: Tensor) -> int:
        """The window half-width ``W`` for ``value`` (see the module doc); 0 when ``sigma == 0``."""
        sigma = float(self.sigma)
        if sigma == 0.0:
            return 0
        with torch.no_grad():
            log_rate = self.rate.detach().clamp_min(torch.finfo(self.rate.dtype).tiny).log()
            y = value.detach().to(log_rate.dtype)
            log_a = torch.maximum(log_rate - torch.log1p(y), y.clamp_min(torch.finfo(y.dtype).tiny).log() - log_rate)
            log_a = float(log_a.max().clamp_min(0.0)) if log_a.numel() else 0.0
        return window_half_width(log_a, sigma, self.tol, self.max_half_width)

    def log_prob(self, value: Tensor) -> Tensor:
        """``log p(y)``, shape ``broadcast(value.shape, batch_shape)``; differentiable in ``rate``."""
        if self._validate_args:
            self._validate_sample(value)
        rate = self.rate
        value = value.to(rate.dtype)
        tiny = torch.finfo(rate.dtype).tiny
        log_rate = rate.clamp_min(tiny).log()
        w = self.half_width(value)
        if w == 0:  # sigma == 0: plain Poisson
            return value * log_rate - rate - torch.lgamma(value + 1.0)
        shape = (2 * w + 1,) + (1,) * max(value.dim(), rate.dim())
        j = torch.arange(-w, w + 1, dtype=rate.dtype, device=rate.device).reshape(shape)
        k = value + j  # (2W + 1, 1.., *value.shape)
        valid = k >= 0
        k = k.clamp_min(0.0)
        # log Pois(k) P(y | k) = [y log(rate) - rate] + j log(rate) + [log P(y | k) - log k!]; the last
        # bracket depends on y only (no gradient path) and is computed once, not per hypothesis
        inv_sigma = 1.0 / self.sigma.to(rate.dtype)
        b = (value + 0.5 - k) * inv_sigma
        a = torch.where(value == 0, torch.full_like(b, -math.inf), b - inv_sigma)
        c = log_normal_interval(a, b) - torch.lgamma(k + 1.0)
        c = torch.where(valid, c, torch.full_like(c, -math.inf))
        return value * log_rate - rate + torch.logsumexp(j * log_rate + c, dim=0)
