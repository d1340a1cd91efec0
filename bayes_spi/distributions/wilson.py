r"""Wilson's distributions of diffracted intensities and amplitudes (Wilson 1949; Careless's prior).

For a molecule of many randomly placed atoms the structure factor ``F(q)`` at a given ``|q|`` is a sum
of many terms with random phases, so by the central limit theorem it is a complex Gaussian (acentric
case) with ``E|F|^2 = Sigma(|q|)``; where ``F`` is constrained to be real (centric case) it is a real
Gaussian with variance ``Sigma``. Hence, with ``Sigma > 0`` the mean intensity at that ``|q|``:

=========================  ======================================================  ==========================
distribution               density                                                 moments
=========================  ======================================================  ==========================
acentric intensity ``I``   ``exp(-I / Sigma) / Sigma`` (exponential)               mean ``Sigma``, var ``Sigma^2``
centric intensity ``I``    ``exp(-I / (2 Sigma)) / sqrt(2 pi Sigma I)``            mean ``Sigma``, var ``2 Sigma^2``
                           (``Sigma * chi^2_1`` = Gamma(1/2, rate 1/(2 Sigma)))
acentric amplitude ``F``   ``2 F / Sigma exp(-F^2 / Sigma)`` (Rayleigh,            mean ``sqrt(pi Sigma) / 2``,
                           scale ``sqrt(Sigma / 2)``)                              var ``Sigma (1 - pi / 4)``
centric amplitude ``F``    ``sqrt(2 / (pi Sigma)) exp(-F^2 / (2 Sigma))``          mean ``sqrt(2 Sigma / pi)``,
                           (half-normal, variance parameter ``Sigma``)             var ``Sigma (1 - 2 / pi)``
=========================  ======================================================  ==========================

``F ~ WilsonAmplitude(Sigma)`` implies ``F^2 ~ WilsonIntensity(Sigma)`` (same ``centric`` flag).
A single molecule in SPI has no crystallographic symmetry: use the acentric case (the default).

:func:`kl_lognormal_wilson` is the closed-form ``KL(LogNormal(mu, s) || WilsonAmplitude(Sigma))``
(registered with :func:`torch.distributions.kl_divergence`), the KL of the variational intensity field.

Example:
    >>> import torch
    >>> d = WilsonAmplitude(torch.tensor([1.0, 4.0]))
    >>> F = d.rsample((1000,))
    >>> F.shape, bool(torch.all(F >= 0))
    (torch.Size([1000, 2]), True)
    >>> WilsonIntensity(torch.tensor(2.0)).mean
    tensor(2.)
"""

from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution
from torch import Tensor
from torch.distributions import LogNormal, constraints, register_kl
from torch.distributions.utils import broadcast_all

__all__ = [
    "WilsonIntensity",
    "WilsonAmplitude",
    "wilson_intensity_log_prob",
    "kl_lognormal_wilson",
]

_LOG_2PI = math.log(2.0 * math.pi)
_EULER_GAMMA = 0.5772156649015329


def _as_sigma(sigma: Tensor | float) -> Tensor:
    if not isinstance(sigma, Tensor):
        sigma = torch.as_tensor(sigma, dtype=torch.get_default_dtype())
    if not sigma.is_floating_point():
        sigma = sigma.to(torch.get_default_dtype())
    return sigma


def wilson_intensity_log_prob(log_value: Tensor, log_sigma: Tensor, centric: bool = False) -> Tensor:
    """Wilson log density of the intensity ``I = exp(log_value)`` given ``log Sigma``, computed in log space.

    Stable for intensities spanning many decades (no ``exp`` of a large number). The density is with
    respect to ``dI`` (not ``d log I``): add ``log_value`` for the density of ``log I``.

    Args:
        log_value: ``log I`` ``(...)``.
        log_sigma: ``log Sigma`` broadcastable to ``log_value``.
        centric: centric (``Sigma chi^2_1``) instead of acentric (exponential).

    Returns:
        ``log p(I)`` with the broadcast shape.

    Example:
        >>> float(wilson_intensity_log_prob(torch.tensor(0.0), torch.tensor(0.0)))  # Exp(1) at I = 1
        -1.0
    """
    ratio = torch.exp(log_value - log_sigma)
    if centric:
        return -0.5 * (_LOG_2PI + log_sigma + log_value) - 0.5 * ratio
    return -log_sigma - ratio


class _Wilson(TorchDistribution):
    """Shared plumbing: one positive parameter ``sigma`` and a ``centric`` flag."""

    arg_constraints = {"sigma": constraints.positive}
    support = constraints.nonnegative

    def __init__(self, sigma: Tensor | float, centric: bool = False, validate_args: bool | None = None) -> None:
        if not isinstance(centric, bool):
            raise ValueError(f"expected centric to be a bool, got {type(centric).__name__} {centric!r}")
        self.sigma = _as_sigma(sigma)
        self.centric = centric
        super().__init__(self.sigma.shape, torch.Size(), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):  # type: ignore[no-untyped-def]
        new = self._get_checked_instance(type(self), _instance)
        batch_shape = torch.Size(batch_shape)
        new.sigma = self.sigma.expand(batch_shape)
        new.centric = self.centric
        super(_Wilson, new).__init__(batch_shape, torch.Size(), validate_args=False)
        new._validate_args = self._validate_args
        return new

    def _check_value(self, value: Tensor) -> Tensor:
        if not isinstance(value, Tensor):
            value = torch.as_tensor(value, dtype=self.sigma.dtype, device=self.sigma.device)
        if self._validate_args:
            self._validate_sample(value)
        return value

    def _uniform(self, sample_shape: torch.Size) -> Tensor:
        shape = self._extended_shape(sample_shape)
        u = torch.rand(shape, dtype=self.sigma.dtype, device=self.sigma.device)
        # keep u in (0, 1): -log(u) finite
        return u.clamp(min=torch.finfo(u.dtype).tiny)

    def _normal(self, sample_shape: torch.Size) -> Tensor:
        shape = self._extended_shape(sample_shape)
        return torch.randn(shape, dtype=self.sigma.dtype, device=self.sigma.device)


class WilsonIntensity(_Wilson):
    r"""Wilson distribution of an intensity with mean ``sigma``.

    Acentric (default): ``Exponential(rate = 1 / sigma)``. Centric: ``sigma * chi^2_1``, i.e.
    ``Gamma(concentration = 1/2, rate = 1 / (2 sigma))``.

    Args:
        sigma: mean intensity ``Sigma(|q|) > 0``, any shape (the batch shape).
        centric: centric instead of acentric.
        validate_args: validate ``sigma`` and values.

    Example:
        >>> d = WilsonIntensity(torch.tensor([1.0, 3.0]))
        >>> d.log_prob(torch.tensor([1.0, 3.0]))  # -log(Sigma) - 1
        tensor([-1.0000, -2.0986])
    """

    has_rsample = True

    @property
    def mean(self) -> Tensor:
        return self.sigma

    @property
    def mode(self) -> Tensor:
        return torch.zeros_like(self.sigma)

    @property
    def variance(self) -> Tensor:
        return (2.0 if self.centric else 1.0) * self.sigma**2

    def rsample(self, sample_shape=torch.Size()) -> Tensor:  # type: ignore[no-untyped-def]
        """Reparameterised samples ``sample_shape + batch_shape`` (differentiable in ``sigma``)."""
        sample_shape = torch.Size(sample_shape)
        if self.centric:
            return self.sigma * self._normal(sample_shape) ** 2
        return -self.sigma * torch.log(self._uniform(sample_shape))

    def log_prob(self, value: Tensor) -> Tensor:
        value = self._check_value(value)
        sigma = self.sigma
        if self.centric:
            return -0.5 * (_LOG_2PI + sigma.log() + value.log()) - 0.5 * value / sigma
        return -sigma.log() - value / sigma

    def cdf(self, value: Tensor) -> Tensor:
        value = self._check_value(value)
        if self.centric:
            return torch.erf(torch.sqrt(value / (2.0 * self.sigma)))
        return -torch.expm1(-value / self.sigma)

    def icdf(self, value: Tensor) -> Tensor:
        if self.centric:
            return 2.0 * self.sigma * torch.erfinv(value) ** 2
        return -self.sigma * torch.log1p(-value)

    def entropy(self) -> Tensor:
        if self.centric:
            # Gamma(1/2, rate 1/(2 Sigma)): k - log(rate) + lgamma(k) + (1 - k) digamma(k)
            # with k = 1/2, digamma(1/2) = -gamma - 2 log 2
            return 0.5 + torch.log(2.0 * self.sigma) + math.lgamma(0.5) + 0.5 * (-_EULER_GAMMA - 2.0 * math.log(2.0))
        return 1.0 + torch.log(self.sigma)


class WilsonAmplitude(_Wilson):
    r"""Wilson distribution of a structure-factor amplitude ``|F|`` with ``E|F|^2 = sigma``.

    Acentric (default): Rayleigh with scale ``sqrt(sigma / 2)``, density ``2F/sigma exp(-F^2/sigma)``.
    Centric: half-normal with variance parameter ``sigma``, density
    ``sqrt(2 / (pi sigma)) exp(-F^2 / (2 sigma))``.

    Args:
        sigma: mean intensity ``Sigma(|q|) > 0``, any shape (the batch shape).
        centric: centric instead of acentric.
        validate_args: validate ``sigma`` and values.

    Example:
        >>> d = WilsonAmplitude(torch.tensor(2.0))
        >>> float(d.log_prob(torch.tensor(1.0)))  # log(2 * 1 / 2) - 1 / 2
        -0.5
    """

    has_rsample = True

    @property
    def mean(self) -> Tensor:
        if self.centric:
            return torch.sqrt(2.0 * self.sigma / math.pi)
        return 0.5 * torch.sqrt(math.pi * self.sigma)

    @property
    def mode(self) -> Tensor:
        if self.centric:
            return torch.zeros_like(self.sigma)
        return torch.sqrt(0.5 * self.sigma)

    @property
    def variance(self) -> Tensor:
        if self.centric:
            return self.sigma * (1.0 - 2.0 / math.pi)
        return self.sigma * (1.0 - math.pi / 4.0)

    def rsample(self, sample_shape=torch.Size()) -> Tensor:  # type: ignore[no-untyped-def]
        """Reparameterised samples ``sample_shape + batch_shape`` (differentiable in ``sigma``)."""
        sample_shape = torch.Size(sample_shape)
        if self.centric:
            return torch.sqrt(self.sigma) * self._normal(sample_shape).abs()
        return torch.sqrt(-self.sigma * torch.log(self._uniform(sample_shape)))

    def log_prob(self, value: Tensor) -> Tensor:
        value = self._check_value(value)
        sigma = self.sigma
        if self.centric:
            return 0.5 * (math.log(2.0 / math.pi) - sigma.log()) - 0.5 * value**2 / sigma
        return math.log(2.0) + value.log() - sigma.log() - value**2 / sigma

    def cdf(self, value: Tensor) -> Tensor:
        value = self._check_value(value)
        if self.centric:
            return torch.erf(value / torch.sqrt(2.0 * self.sigma))
        return -torch.expm1(-(value**2) / self.sigma)

    def icdf(self, value: Tensor) -> Tensor:
        if self.centric:
            return torch.sqrt(2.0 * self.sigma) * torch.erfinv(value)
        return torch.sqrt(-self.sigma * torch.log1p(-value))

    def entropy(self) -> Tensor:
        if self.centric:
            return 0.5 * torch.log(0.5 * math.pi * self.sigma) + 0.5
        # Rayleigh with scale b = sqrt(Sigma / 2): 1 + log(b / sqrt 2) + gamma / 2
        return 1.0 + 0.5 * torch.log(0.25 * self.sigma) + 0.5 * _EULER_GAMMA


def kl_lognormal_wilson(loc: Tensor, scale: Tensor, sigma: Tensor, centric: bool = False) -> Tensor:
    r"""Closed-form ``KL(LogNormal(loc, scale) || WilsonAmplitude(sigma, centric))``, elementwise.

    With ``F = exp(loc + scale z)``: ``E log F = loc``, ``E F^2 = exp(2 loc + 2 scale^2)`` and the
    log-normal entropy ``loc + log(scale) + (1 + log 2 pi) / 2``, so (acentric)

    .. math:: KL = \log\Sigma - \log 2 - 2\,loc - \log s - \tfrac12(1 + \log 2\pi) + e^{2 loc + 2 s^2}/\Sigma

    and (centric) ``KL = -loc - log s - (1 + log 2 pi)/2 - log(2/(pi Sigma))/2 + e^{2 loc + 2 s^2}/(2 Sigma)``.

    Example:
        >>> kl_lognormal_wilson(torch.tensor(0.0), torch.tensor(0.5), torch.tensor(1.0)).shape
        torch.Size([])
    """
    loc, scale, sigma = broadcast_all(loc, scale, sigma)
    neg_entropy = -(loc + scale.log() + 0.5 * (1.0 + _LOG_2PI))
    m2 = torch.exp(2.0 * loc + 2.0 * scale**2 - sigma.log())  # E F^2 / Sigma
    if centric:
        return neg_entropy - 0.5 * (math.log(2.0 / math.pi) - sigma.log()) + 0.5 * m2
    return neg_entropy - math.log(2.0) - loc + sigma.log() + m2


@register_kl(LogNormal, WilsonAmplitude)
def _kl_lognormal_wilson(p: LogNormal, q: WilsonAmplitude) -> Tensor:
    return kl_lognormal_wilson(p.loc, p.scale, q.sigma, q.centric)
