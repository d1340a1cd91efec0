"""Pyro distributions used by bayes-spi: on SO(3) (poses: uniform, Lie-normal, preferred orientation),
Wilson's (intensities, amplitudes), a smooth empirical law on (0, inf) (fluence scales) and photon
counts with Gaussian read-out noise.

Example:
    >>> from bayes_spi.distributions import LieNormalSO3, UniformSO3
    >>> UniformSO3((2,)).sample().shape
    torch.Size([2, 3, 3])
"""

from bayes_spi.distributions.empirical import LogNormalMixture
from bayes_spi.distributions.preferred import PreferredOrientationSO3
from bayes_spi.distributions.readout import PoissonGaussianCounts
from bayes_spi.distributions.so3 import LieNormalSO3, UniformSO3, special_orthogonal
from bayes_spi.distributions.wilson import (
    WilsonAmplitude,
    WilsonIntensity,
    kl_lognormal_wilson,
    wilson_intensity_log_prob,
)

__all__ = [
    "LieNormalSO3",
    "UniformSO3",
    "special_orthogonal",
    "WilsonAmplitude",
    "WilsonIntensity",
    "kl_lognormal_wilson",
    "wilson_intensity_log_prob",
    "PreferredOrientationSO3",
    "LogNormalMixture",
    "PoissonGaussianCounts",
]
