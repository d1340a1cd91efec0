r"""Pyro distributions on the rotation group SO(3).

Both distributions have ``event_shape == (3, 3)`` (rotation matrices acting on column vectors, see
:mod:`bayes_spi.so3`) and their densities are taken with respect to the **same** reference measure,
the Haar measure normalised to total mass 1. Hence :class:`UniformSO3` has ``log_prob == 0`` and
``LieNormalSO3(...).log_prob(R) - UniformSO3().log_prob(R)`` is a proper log density ratio, so ELBO
and KL terms mixing the two are consistent.

In exponential coordinates ``R = exp(hat(v))``, ``|v| <= pi``, the normalised Haar measure is

.. math:: dH(v) = \frac{1 - \cos|v|}{4 \pi^2 |v|^2} \, dv ,

which integrates to 1 over the ball of radius ``pi`` (the angle ``t = |v|`` then has density
``(1 - cos t) / pi`` on ``[0, pi]``).

Example:
    >>> import pyro
    >>> loc = torch.eye(3).expand(5, 3, 3)
    >>> d = LieNormalSO3(loc, torch.full((5, 3), 0.2))
    >>> R = d.rsample()
    >>> d.log_prob(R).shape
    torch.Size([5])
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from pyro.distributions import TorchDistribution
from torch import Tensor
from torch.distributions import constraints
from torch.distributions.constraints import Constraint

from bayes_spi.so3 import random_rotmat, rotmat_to_rotvec, rotvec_to_rotmat

__all__ = ["special_orthogonal", "UniformSO3", "LieNormalSO3"]


class _SpecialOrthogonal(Constraint):
    r"""Constraint for rotation matrices ``(..., 3, 3)``: ``R^T R = I`` and ``det R = +1``.

    The tolerance (``1e-3``, max-abs) is deliberately loose: it catches non-rotations (reflections,
    arbitrary matrices, wrong layouts), not float32 rounding.
    """

    event_dim = 2
    is_discrete = False
    tol = 1e-3

    def check(self, value: Tensor) -> Tensor:
        if value.dim() < 2 or tuple(value.shape[-2:]) != (3, 3):
            return torch.zeros(value.shape[:-2] if value.dim() >= 2 else (), dtype=torch.bool, device=value.device)
        eye = torch.eye(3, dtype=value.dtype, device=value.device)
        orth = (value.transpose(-1, -2) @ value - eye).abs().amax(dim=(-1, -2)) < self.tol
        det = (torch.linalg.det(value) - 1.0).abs() < self.tol
        return orth & det

    def __repr__(self) -> str:
        return "SpecialOrthogonal()"


#: Support of distributions over rotation matrices, ``event_dim == 2``.
special_orthogonal = _SpecialOrthogonal()


def _check_rotmat_value(value: Tensor) -> None:
    if value.dim() < 2 or tuple(value.shape[-2:]) != (3, 3):
        raise ValueError(f"expected value of shape (..., 3, 3), got shape {tuple(value.shape)}")


class UniformSO3(TorchDistribution):
    r"""Uniform (Haar) distribution on SO(3), normalised to total mass 1: ``log_prob(R) = 0``.

    Args:
        batch_shape: batch shape.
        dtype: dtype of samples (default ``torch.get_default_dtype()``).
        device: device of samples.
        validate_args: validate values against :data:`special_orthogonal`.

    Example:
        >>> d = UniformSO3((4,))
        >>> R = d.sample()            # (4, 3, 3)
        >>> d.log_prob(R)
        tensor([0., 0., 0., 0.])
    """

    arg_constraints: dict[str, Constraint] = {}
    support = special_orthogonal
    has_rsample = False

    def __init__(
        self,
        batch_shape: Sequence[int] | torch.Size = (),
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        validate_args: bool | None = None,
    ) -> None:
        self._dtype = dtype or torch.get_default_dtype()
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        super().__init__(torch.Size(batch_shape), torch.Size((3, 3)), validate_args=validate_args)

    def expand(self, batch_shape: Sequence[int] | torch.Size, _instance=None) -> "UniformSO3":
        new = self._get_checked_instance(UniformSO3, _instance)
        new._dtype = self._dtype
        new._device = self._device
        super(UniformSO3, new).__init__(torch.Size(batch_shape), self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def sample(self, sample_shape: Sequence[int] | torch.Size = torch.Size()) -> Tensor:
        """Haar-uniform rotations, shape ``sample_shape + batch_shape + (3, 3)``."""
        shape = torch.Size(sample_shape) + self.batch_shape
        with torch.no_grad():
            return random_rotmat(shape, dtype=self._dtype, device=self._device)

    def log_prob(self, value: Tensor) -> Tensor:
        """Zeros of shape ``broadcast(value.shape[:-2], batch_shape)``."""
        _check_rotmat_value(value)
        if self._validate_args:
            self._validate_sample(value)
        shape = torch.broadcast_shapes(value.shape[:-2], self.batch_shape)
        return torch.zeros(shape, dtype=value.dtype, device=value.device)

    def entropy(self) -> Tensor:
        """Zero (w.r.t. the normalised Haar measure), shape ``batch_shape``."""
        return torch.zeros(self.batch_shape, dtype=self._dtype, device=self._device)


class LieNormalSO3(TorchDistribution):
    r"""Lie-group reparameterised Gaussian on SO(3) (Falorsi et al. 2019).

    ``R = loc @ exp(hat(eps))`` with ``eps ~ N(0, diag(scale**2))`` in the tangent space at ``loc``
    (right perturbation, i.e. ``eps`` is expressed in the body frame of ``loc``).

    ``log_prob`` is the density with respect to the normalised Haar measure (the reference measure of
    :class:`UniformSO3`). With ``v = log(loc^T R)`` of angle ``t in [0, pi]`` and unit axis ``u``,
    every ``v_k = u (t + 2 pi k)``, ``k`` integer, maps to ``R``, so

    .. math::
        p(R) = \sum_k \frac{N(v_k; 0, \mathrm{diag}(\sigma^2))}{h(v_k)}, \qquad
        h(v) = \frac{1 - \cos|v|}{4\pi^2 |v|^2}.

    The sum is truncated to ``k = -(num_wraps + 1) .. num_wraps`` (``num_wraps=2``: the three nearest
    shells on each side, symmetric at ``t = pi``); the omitted terms lie at ``|v| >= 6 pi``, so the
    truncation error is negligible for ``scale`` up to about ``pi`` (beyond that the distribution is
    close to uniform anyway). The ``k = 0`` term uses ``(1 - cos t) / t^2 = sinc(t/2)^2 / 2``, which
    is stable as ``t -> 0``. The wrapped terms ``k != 0`` make the exact density diverge like
    ``1 / t^2`` at ``R = loc`` (a shell ``|v| = 2 pi k`` collapses onto the identity); this singularity
    is integrable and carries mass ``~ exp(-2 pi^2 / scale^2)``; we clamp ``t >= 1e-3`` inside the
    wrapped terms only, so ``log_prob`` stays finite (mass error ``< 1e-5`` for ``scale <= pi``).

    Args:
        loc: rotation matrices, shape ``(..., 3, 3)``.
        scale: standard deviations (radians) of the tangent-space Gaussian along the body axes of
            ``loc``, shape ``(..., 3)``; broadcast against ``loc``'s batch shape.
        num_wraps: number of wrapped shells on each side in ``log_prob``.
        validate_args: validate arguments and values.

    Example:
        >>> loc = rotvec_to_rotmat(torch.tensor([0.0, 0.0, 1.0]))
        >>> d = LieNormalSO3(loc, torch.tensor([0.1, 0.1, 0.3]))
        >>> R = d.rsample((100,))              # (100, 3, 3), differentiable in loc and scale
        >>> d.log_prob(R).shape
        torch.Size([100])
    """

    arg_constraints = {"loc": special_orthogonal, "scale": constraints.independent(constraints.positive, 1)}
    support = special_orthogonal
    has_rsample = True

    #: Angle below which the wrapped (k != 0) terms are evaluated at this angle.
    wrap_angle_floor = 1e-3

    def __init__(self, loc: Tensor, scale: Tensor, num_wraps: int = 2, validate_args: bool | None = None) -> None:
        if not isinstance(loc, Tensor) or loc.dim() < 2 or tuple(loc.shape[-2:]) != (3, 3):
            raise ValueError(f"expected loc of shape (..., 3, 3), got shape {tuple(getattr(loc, 'shape', ()))}")
        if not isinstance(scale, Tensor):
            scale = torch.as_tensor(scale, dtype=loc.dtype, device=loc.device)
        if scale.dim() < 1 or scale.shape[-1] != 3:
            raise ValueError(f"expected scale of shape (..., 3), got shape {tuple(scale.shape)}")
        if int(num_wraps) < 0:
            raise ValueError(f"expected num_wraps >= 0, got {num_wraps}")
        try:
            batch_shape = torch.broadcast_shapes(loc.shape[:-2], scale.shape[:-1])
        except RuntimeError as e:
            raise ValueError(
                f"expected broadcastable batch shapes, got loc shape {tuple(loc.shape)} "
                f"and scale shape {tuple(scale.shape)}"
            ) from e
        self.loc = loc.expand(batch_shape + (3, 3))
        self.scale = scale.expand(batch_shape + (3,))
        self.num_wraps = int(num_wraps)
        super().__init__(batch_shape, torch.Size((3, 3)), validate_args=validate_args)

    def expand(self, batch_shape: Sequence[int] | torch.Size, _instance=None) -> "LieNormalSO3":
        new = self._get_checked_instance(LieNormalSO3, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + (3, 3))
        new.scale = self.scale.expand(batch_shape + (3,))
        new.num_wraps = self.num_wraps
        super(LieNormalSO3, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mode(self) -> Tensor:
        """``loc``, shape ``batch_shape + (3, 3)`` (the mode for scales below about ``pi / 2``)."""
        return self.loc

    def rsample(self, sample_shape: Sequence[int] | torch.Size = torch.Size()) -> Tensor:
        """Reparameterised samples ``loc @ exp(hat(scale * z))``, shape ``sample_shape + batch_shape + (3, 3)``."""
        shape = torch.Size(sample_shape) + self.batch_shape + (3,)
        z = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc @ rotvec_to_rotmat(self.scale * z)

    def log_prob(self, value: Tensor) -> Tensor:
        """Log density w.r.t. the normalised Haar measure, shape ``broadcast(value.shape[:-2], batch_shape)``."""
        _check_rotmat_value(value)
        if self._validate_args:
            self._validate_sample(value)
        v = rotmat_to_rotvec(self.loc.transpose(-1, -2) @ value)  # (..., 3), |v| in [0, pi]
        scale = self.scale.expand(v.shape)
        tiny = torch.finfo(v.dtype).tiny
        theta = torch.sqrt(torch.clamp_min((v * v).sum(-1), tiny))

        const = -1.5 * math.log(2 * math.pi) - scale.log().sum(-1) + math.log(4 * math.pi**2)
        # k = 0: log N(v) - log[(1 - cos t) / t^2],  (1 - cos t) / t^2 = sinc(t / 2)^2 / 2.
        terms = [-0.5 * ((v / scale) ** 2).sum(-1) - math.log(0.5) - 2.0 * torch.log(torch.sinc(theta / (2 * math.pi)))]
        theta_c = torch.clamp_min(theta, self.wrap_angle_floor)
        u = v / theta_c.unsqueeze(-1)
        quad = torch.where(
            theta < self.wrap_angle_floor,
            (scale**-2).mean(-1),  # direction average of u^T S^-2 u when the axis is undefined
            ((u / scale) ** 2).sum(-1),
        )
        log_1mcos = math.log(2.0) + 2.0 * torch.log(torch.sin(0.5 * theta_c))
        for k in range(-(self.num_wraps + 1), self.num_wraps + 1):
            if k == 0:
                continue
            r = (theta_c + 2 * math.pi * k).abs()
            terms.append(-0.5 * r**2 * quad - log_1mcos + 2.0 * torch.log(r))
        return const + torch.logsumexp(torch.stack(terms, dim=-1), dim=-1)
