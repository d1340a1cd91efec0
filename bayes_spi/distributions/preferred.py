r"""Preferred-orientation distribution on SO(3): a von Mises-Fisher beam direction, uniform in-plane angle.

With our pose convention (pixel ``q`` of a pattern with pose ``R`` samples the molecule-frame intensity
at ``R @ q``), the beam axis ``e_z`` of the lab is the molecule-frame direction

.. math:: d = R e_z \quad (\text{the third column of } R).

:class:`PreferredOrientationSO3` draws ``d`` from a von Mises-Fisher distribution on the unit sphere
about the unit vector ``axis`` with concentration ``kappa >= 0`` and the rotation about ``d`` (the
in-plane angle) uniformly. Under the Haar measure ``d`` is uniform on the sphere (density
``1 / (4 pi)``), so the density with respect to the **normalised Haar measure** (the reference measure
of :class:`~bayes_spi.distributions.so3.UniformSO3`) is

.. math::
    p(R) = 4 \pi \, \mathrm{vMF}(d; \mathrm{axis}, \kappa)
         = \frac{2 \kappa}{1 - e^{-2\kappa}} \exp\big(\kappa (\mathrm{axis} \cdot d - 1)\big),

written in this form so that it is stable for large ``kappa`` (no ``sinh`` overflow) and, with the
series ``log(x / (1 - e^{-x})) = x/2 - x^2/24 + ...`` for ``x = 2 kappa -> 0``, for small ``kappa``;
``kappa = 0`` is exactly the uniform distribution (``log_prob == 0``).

Sampling is exact: ``w = axis . d`` by inverting its CDF in closed form (the 3D case of Wood 1994),
``w = 1 + log(u + (1 - u) e^{-2 kappa}) / kappa``, a uniform azimuth about ``axis``, then a uniform
in-plane rotation ``R = [e1, e2, d] @ Rz(psi)``.

Example:
    >>> d = PreferredOrientationSO3(torch.tensor([0.0, 0.0, 1.0]), torch.tensor(4.0)).expand([5])
    >>> R = d.sample()               # (5, 3, 3)
    >>> d.log_prob(R).shape
    torch.Size([5])
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor
from torch.distributions.constraints import Constraint

from bayes_spi.distributions.so3 import _check_rotmat_value, special_orthogonal

__all__ = ["PreferredOrientationSO3", "vmf_mean_resultant_length", "log_vmf_haar_normaliser"]

#: below this ``x = 2 kappa`` the normaliser uses its Taylor series
_SMALL_X = 1e-4


def log_vmf_haar_normaliser(kappa: Tensor) -> Tensor:
    r"""``log(2 kappa / (1 - exp(-2 kappa)))``, stable for all ``kappa >= 0`` (0 at ``kappa = 0``).

    Args:
        kappa: concentrations ``(...)``, ``>= 0``.

    Returns:
        ``(...)``, same dtype.

    Example:
        >>> float(log_vmf_haar_normaliser(torch.tensor(0.0)))
        0.0
    """
    x = 2.0 * kappa
    small = x < _SMALL_X
    xs = torch.where(small, torch.ones_like(x), x)  # keeps the unused branch finite (and its gradient)
    big = torch.log(xs) - torch.log(-torch.expm1(-xs))
    series = x / 2.0 - x * x / 24.0
    return torch.where(small, series, big)


def vmf_mean_resultant_length(kappa: float) -> float:
    """``E[axis . d] = coth(kappa) - 1/kappa`` of the 3D von Mises-Fisher distribution (0 at ``kappa = 0``).

    Example:
        >>> round(vmf_mean_resultant_length(2.0), 4)
        0.5373
    """
    k = float(kappa)
    if k < 1e-3:
        return k / 3.0 - k**3 / 45.0
    return 1.0 / math.tanh(k) - 1.0 / k


def _frame(d: Tensor) -> tuple[Tensor, Tensor]:
    """Two unit vectors ``e1, e2 (..., 3)`` with ``[e1, e2, d]`` a right-handed orthonormal frame."""
    ex = torch.zeros_like(d)
    ex[..., 0] = 1.0
    ey = torch.zeros_like(d)
    ey[..., 1] = 1.0
    helper = torch.where((d[..., :1].abs() < 0.9), ex, ey)  # never (nearly) parallel to d
    e1 = helper - (helper * d).sum(-1, keepdim=True) * d
    e1 = e1 / e1.norm(dim=-1, keepdim=True)
    e2 = torch.cross(d, e1, dim=-1)
    return e1, e2


class PreferredOrientationSO3(TorchDistribution):
    r"""Rotations whose beam direction ``R @ e_z`` is von Mises-Fisher about ``axis``; uniform in-plane.

    ``log_prob`` is the log density with respect to the normalised Haar measure (see the module doc),
    so it can be mixed with :class:`~bayes_spi.distributions.so3.UniformSO3` and
    :class:`~bayes_spi.distributions.so3.LieNormalSO3` in ELBO/KL terms.

    Args:
        axis: unit vectors ``(..., 3)`` (molecule frame), the preferred beam direction.
        concentration: ``kappa >= 0``, shape ``(...)``; 0 is uniform, large values concentrate ``d``
            within about ``1 / sqrt(kappa)`` rad of ``axis``.
        validate_args: validate arguments and values.

    Example:
        >>> d = PreferredOrientationSO3(torch.tensor([1.0, 0.0, 0.0]), torch.tensor(10.0))
        >>> R = d.sample((1000,))
        >>> bool(R[..., 0, 2].mean() > 0.85)        # E[axis . d] = coth(10) - 1/10 = 0.9
        True
    """

    arg_constraints: dict[str, Constraint] = {"axis": constraints.sphere, "concentration": constraints.nonnegative}
    support = special_orthogonal
    has_rsample = False

    def __init__(self, axis: Tensor, concentration: Tensor | float, validate_args: bool | None = None) -> None:
        if not isinstance(axis, Tensor) or axis.dim() < 1 or axis.shape[-1] != 3:
            raise ValueError(f"expected axis of shape (..., 3), got shape {tuple(getattr(axis, 'shape', ()))}")
        if not isinstance(concentration, Tensor):
            concentration = torch.as_tensor(concentration, dtype=axis.dtype, device=axis.device)
        try:
            batch_shape = torch.broadcast_shapes(axis.shape[:-1], concentration.shape)
        except RuntimeError as e:
            raise ValueError(
                f"expected broadcastable batch shapes, got axis shape {tuple(axis.shape)} "
                f"and concentration shape {tuple(concentration.shape)}"
            ) from e
        self.axis = axis.expand(batch_shape + (3,))
        self.concentration = concentration.expand(batch_shape)
        super().__init__(batch_shape, torch.Size((3, 3)), validate_args=validate_args)

    def expand(self, batch_shape: Sequence[int] | torch.Size, _instance=None) -> "PreferredOrientationSO3":
        new = self._get_checked_instance(PreferredOrientationSO3, _instance)
        batch_shape = torch.Size(batch_shape)
        new.axis = self.axis.expand(batch_shape + (3,))
        new.concentration = self.concentration.expand(batch_shape)
        super(PreferredOrientationSO3, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def sample_direction(self, sample_shape: Sequence[int] | torch.Size = torch.Size()) -> Tensor:
        """Exact von Mises-Fisher draws of the beam direction ``d``, shape ``sample_shape + batch_shape + (3,)``."""
        shape = torch.Size(sample_shape) + self.batch_shape
        axis, kappa = self.axis.expand(shape + (3,)), self.concentration.expand(shape)
        with torch.no_grad():
            u = torch.rand(shape, dtype=axis.dtype, device=axis.device).clamp_min(torch.finfo(axis.dtype).tiny)
            small = kappa < 1e-8
            ks = torch.where(small, torch.ones_like(kappa), kappa)
            # inverse CDF of w = axis . d (density prop. to exp(kappa w) on [-1, 1]), log-sum-exp form
            w_vmf = 1.0 + torch.logaddexp(u.log(), torch.log1p(-u) - 2.0 * ks) / ks
            w = torch.where(small, 2.0 * u - 1.0, w_vmf).clamp(-1.0, 1.0)
            phi = 2.0 * math.pi * torch.rand(shape, dtype=axis.dtype, device=axis.device)
            b1, b2 = _frame(axis)
            r = torch.sqrt((1.0 - w * w).clamp_min(0.0))
            d = w[..., None] * axis + r[..., None] * (torch.cos(phi)[..., None] * b1 + torch.sin(phi)[..., None] * b2)
            return d / d.norm(dim=-1, keepdim=True)

    def sample(self, sample_shape: Sequence[int] | torch.Size = torch.Size()) -> Tensor:
        """Rotations ``(sample_shape + batch_shape + (3, 3))`` with ``R @ e_z`` vMF and a uniform in-plane angle."""
        d = self.sample_direction(sample_shape)
        with torch.no_grad():
            e1, e2 = _frame(d)
            psi = 2.0 * math.pi * torch.rand(d.shape[:-1], dtype=d.dtype, device=d.device)
            c, s = torch.cos(psi)[..., None], torch.sin(psi)[..., None]
            # [e1, e2, d] @ Rz(psi): columns (c e1 + s e2, -s e1 + c e2, d)
            return torch.stack([c * e1 + s * e2, c * e2 - s * e1, d], dim=-1)

    def log_prob(self, value: Tensor) -> Tensor:
        """Log density w.r.t. the normalised Haar measure, shape ``broadcast(value.shape[:-2], batch_shape)``."""
        _check_rotmat_value(value)
        if self._validate_args:
            self._validate_sample(value)
        d = value[..., :, 2]  # R @ e_z
        cos = (d * self.axis).sum(-1)
        kappa = self.concentration
        return log_vmf_haar_normaliser(kappa) + kappa * (cos - 1.0)
