"""Pyro distributions used by bayes-spi (currently: distributions on SO(3)).

Example:
    >>> from bayes_spi.distributions import LieNormalSO3, UniformSO3
    >>> UniformSO3((2,)).sample().shape
    torch.Size([2, 3, 3])
"""

from bayes_spi.distributions.so3 import LieNormalSO3, UniformSO3, special_orthogonal

__all__ = ["LieNormalSO3", "UniformSO3", "special_orthogonal"]
