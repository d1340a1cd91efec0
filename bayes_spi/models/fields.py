"""Intensity fields ``I_theta(q) >= 0``: the 3D diffraction intensity as a function of ``q`` (1/A).

Every field takes ``q`` of shape ``(..., 3)`` in the molecule frame (1/A, ``|q| = 2 sin(theta)/lambda``)
and returns the intensity ``(...)``, non-negative and Friedel-symmetric (``I(q) = I(-q)``).

Fields work internally with ``log I``; :meth:`IntensityField.log_intensity` is what the model uses
(the Poisson likelihood is evaluated from the log rate, which is stable over the many decades an SPI
intensity spans).

- :class:`SirenField` -- a SIREN whose first layer is ``cos(w0 W q)`` without bias, so every
  downstream feature is even in ``q``: the field is Friedel-symmetric by construction, at the cost of
  one evaluation.
- :class:`FourierNetField` -- X-RAI's FourierNet: two SIRENs, ``log I = small(q) + large(q)`` (the
  product ``exp(small) * exp(large)`` of a low-capacity envelope and a high-capacity detail network).
- :class:`VoxelField` -- log-intensity on a cubic grid, trilinear interpolation, symmetrised under
  ``q -> -q``; the ablation the X-RAI paper reports.

Example:
    >>> import torch
    >>> field = SirenField(q_max=0.125)
    >>> field(torch.randn(10, 3) * 0.05).shape
    torch.Size([10])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bayes_spi.symmetry import QFold, point_group
from bayes_spi.trilinear import sample_cube

__all__ = ["IntensityField", "SirenField", "FourierNetField", "SirenVoxelField", "VoxelField"]


class IntensityField(nn.Module):
    """Base class: subclasses implement :meth:`_log_intensity` (the base's :meth:`log_intensity` adds the
    point-group symmetry, :meth:`set_symmetry`).

    Args:
        q_max: the largest ``|q|`` the field must represent (1/A); inputs are scaled by ``1/q_max``.
        log_offset: initial value of ``log I`` (set it near the log of the data's mean intensity).
    """

    def __init__(self, q_max: float, log_offset: float = 0.0) -> None:
        super().__init__()
        if not (q_max > 0 and math.isfinite(q_max)):
            raise ValueError(f"expected a positive finite q_max, got {q_max}")
        self.q_max = float(q_max)
        self.log_offset = nn.Parameter(torch.tensor(float(log_offset)))
        #: the point group's fold (``None``: Friedel symmetry only); see :meth:`set_symmetry`
        self.symmetry_fold: QFold | None = None

    def set_symmetry(self, name: str | None) -> None:
        """Make the field invariant under the point group ``name`` (``C1``, ``Cn``, ``Dn``, ``T``, ``O``, ``I``
        in the standard orientations of :mod:`bayes_spi.symmetry`; ``None``/``C1``: no group).

        By construction: :meth:`log_intensity` averages :meth:`_log_intensity` over the folded images of ``q``
        (:class:`~bayes_spi.symmetry.QFold`: one image for ``I``, ``O`` and even ``Dn``), so ``I(g q) = I(q)``
        holds to float precision for every ``g``, whatever the parameters. Nothing is added to the state dict.
        """
        group = point_group(name)
        self.symmetry_fold = None if group.is_trivial else QFold(group).to(self.log_offset.device)

    @property
    def symmetry(self) -> str:
        """The field's point group name (``"C1"`` without one)."""
        return "C1" if self.symmetry_fold is None else self.symmetry_fold.group.name

    def _log_intensity(self, q: Tensor) -> Tensor:
        """``log I(q)`` before the point-group symmetrisation: ``q`` (..., 3) in 1/A -> (...)."""
        raise NotImplementedError

    def log_intensity(self, q: Tensor) -> Tensor:
        """``log I(q)``: ``q`` (..., 3) in 1/A -> (...), invariant under the field's point group."""
        self._check(q)
        if self.symmetry_fold is None:
            return self._log_intensity(q)
        images = self.symmetry_fold(q)  # (C, ..., 3)
        out = self._log_intensity(images)
        return out[0] if images.shape[0] == 1 else out.mean(0)

    def forward(self, q: Tensor) -> Tensor:
        """``I(q)``: ``q`` (..., 3) in 1/A -> (...) non-negative."""
        return self.log_intensity(q).exp()

    def _check(self, q: Tensor) -> None:
        if q.shape[-1] != 3:
            raise ValueError(f"expected q of shape (..., 3), got shape {tuple(q.shape)}")


class _SineLayer(nn.Module):
    """``sin(w0 (W x + b))`` with SIREN initialisation (Sitzmann et al. 2020)."""

    def __init__(self, n_in: int, n_out: int, w0: float) -> None:
        super().__init__()
        self.w0 = w0
        self.linear = nn.Linear(n_in, n_out)
        bound = math.sqrt(6.0 / n_in) / w0
        nn.init.uniform_(self.linear.weight, -bound, bound)
        nn.init.uniform_(self.linear.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        z = self.linear(x)
        return torch.sin(z if self.w0 == 1.0 else self.w0 * z)  # w0 = 1 (hidden layers): no multiply, same numbers


class _EvenSiren(nn.Module):
    """SIREN with an even first layer ``cos(w0 W x)`` (no bias): ``g(x) = g(-x)`` exactly."""

    def __init__(self, width: int, depth: int, w0_first: float, out_scale: float = 0.1) -> None:
        super().__init__()
        self.w0_first = w0_first
        self.first = nn.Parameter(torch.empty(width, 3).uniform_(-1.0, 1.0))
        # hidden layers with w0 = 1: the SIREN scale lives in the weights (bound sqrt(6 / width))
        self.hidden = nn.ModuleList([_SineLayer(width, width, 1.0) for _ in range(depth - 1)])
        self.out = nn.Linear(width, 1)
        nn.init.uniform_(self.out.weight, -math.sqrt(6.0 / width) * out_scale, math.sqrt(6.0 / width) * out_scale)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.cos(self.w0_first * (x @ self.first.T))
        for layer in self.hidden:
            h = layer(h)
        return self.out(h).squeeze(-1)


class SirenField(IntensityField):
    """Plain SIREN with ``exp`` output: ``log I(q) = offset + r(|q|) + g(q / q_max)``, ``g`` even in ``q``.

    ``r`` is a learned radial profile (piecewise linear in ``|q|`` on ``n_radial`` knots over
    ``[0, 2 q_max]``), initialised from the data's spherically averaged intensity
    (:meth:`set_radial_profile`); ``g`` starts close to 0 (``out_scale``), so a new field is nearly
    isotropic: its slices fit every orientation about equally well and the orientation posteriors start
    broad (symmetry is broken by the data, not by the random initialisation).

    Args:
        q_max: largest ``|q|`` (1/A).
        width: hidden width.
        depth: number of periodic layers (first ``cos`` layer included).
        w0: frequency of the first layer; the field resolves detail down to about ``q_max / w0``
            in ``q``; the molecule's extent ``L`` needs ``w0 >~ pi L q_max``.
        log_offset: initial ``log I``.
        log_clamp: ``log I - offset`` is soft-clamped to ``(-log_clamp, log_clamp)``.
        n_radial: knots of the radial profile ``r``.
        out_scale: initial scale of the SIREN's output layer relative to the SIREN default (0.1 before
            the radial profile existed; 0.01: a nearly isotropic start).
    """

    def __init__(
        self,
        q_max: float,
        width: int = 64,
        depth: int = 3,
        w0: float = 10.0,
        log_offset: float = 0.0,
        log_clamp: float = 25.0,
        n_radial: int = 48,
        out_scale: float = 0.01,
    ) -> None:
        super().__init__(q_max, log_offset)
        self.net = _EvenSiren(width, depth, w0, out_scale)
        self.log_clamp = float(log_clamp)
        self.radial = nn.Parameter(torch.zeros(int(n_radial)))

    def radial_log_profile(self, q_norm: Tensor) -> Tensor:
        """``r(|q|)`` ``(...)``: linear interpolation of the knots (``|q|`` in 1/A, flat beyond ``2 q_max``)."""
        n = self.radial.shape[0]
        x = (q_norm / (2 * self.q_max) * (n - 1)).clamp(0, n - 1)
        i0 = x.floor().long().clamp(max=n - 2)
        f = x - i0
        return self.radial[i0] * (1 - f) + self.radial[i0 + 1] * f

    @torch.no_grad()
    def set_radial_profile(self, q_norm: Tensor, log_i: Tensor) -> None:
        """Set ``log_offset`` and the radial knots from a measured profile ``log I`` at ``|q|`` (both ``(S,)``)."""
        order = torch.argsort(q_norm)
        qs, li = q_norm[order].double(), log_i[order].double()
        knots = torch.linspace(0, 2 * self.q_max, self.radial.shape[0], dtype=torch.float64)
        import numpy as np

        vals = torch.as_tensor(np.interp(knots.numpy(), qs.cpu().numpy(), li.cpu().numpy()))
        self.log_offset.fill_(float(vals.mean()))
        self.radial.copy_((vals - vals.mean()).to(self.radial))

    def _raw(self, x: Tensor) -> Tensor:
        """Network output ``(...)`` for scaled coordinates ``x = q / q_max`` ``(..., 3)``."""
        return self.net(x)

    def _log_intensity(self, q: Tensor) -> Tensor:
        g = self._raw(q / self.q_max) + self.radial_log_profile(q.norm(dim=-1))
        return self.log_offset + self.log_clamp * torch.tanh(g / self.log_clamp)


class FourierNetField(SirenField):
    """X-RAI's FourierNet: ``I(q) = exp(small(q)) * exp(large(q))``, both SIRENs even in ``q``.

    ``small`` is a narrow, low-frequency network (the smooth radial envelope of the intensity);
    the large one (``net``, as in :class:`SirenField`) a wide, higher-frequency one (the speckle detail).
    """

    def __init__(
        self,
        q_max: float,
        width: int = 64,
        depth: int = 3,
        w0: float = 10.0,
        small_width: int = 16,
        small_w0: float = 3.0,
        log_offset: float = 0.0,
        log_clamp: float = 25.0,
    ) -> None:
        super().__init__(q_max, width, depth, w0, log_offset, log_clamp)
        self.small = _EvenSiren(small_width, 2, small_w0)

    def _raw(self, x: Tensor) -> Tensor:
        return self.small(x) + self.net(x)


class SirenVoxelField(SirenField):
    """SIREN plus a voxel residual: ``log I(q) = offset + r(|q|) + g(q / q_max) + v(q)``.

    ``v`` is a Friedel-symmetrised log-intensity grid of ``n_voxel^3`` over ``[-q_max, q_max]^3``
    (trilinear), starting at 0, so the field starts as the plain :class:`SirenField` (smooth, quick to
    converge from a nearly isotropic start) and gains one free parameter per voxel: the detail a network
    of fixed width cannot hold (EMC's merged volume has this freedom; at ~2.5 voxels per speckle the
    grid resolves the speckles). Choose ``n_voxel`` as the orientation search's / EMC stage's cache grid.

    Args:
        q_max, width, depth, w0, log_offset, log_clamp, n_radial, out_scale: as :class:`SirenField`.
        n_voxel: odd voxels per side of the residual grid.
    """

    def __init__(self, q_max: float, width: int = 64, depth: int = 3, w0: float = 10.0, log_offset: float = 0.0,
                 log_clamp: float = 25.0, n_radial: int = 48, out_scale: float = 0.01, n_voxel: int = 33) -> None:
        super().__init__(q_max, width, depth, w0, log_offset, log_clamp, n_radial, out_scale)
        if n_voxel < 3:
            raise ValueError(f"expected n_voxel >= 3, got {n_voxel}")
        self.n_voxel = int(n_voxel)
        self.residual = nn.Parameter(torch.zeros(1, 1, self.n_voxel, self.n_voxel, self.n_voxel))

    def residual_log_intensity(self, q: Tensor) -> Tensor:
        """``v(q)`` ``(...)``: the symmetrised residual grid, trilinear at ``q (..., 3)`` (edge value outside)."""
        v = self.residual
        return sample_cube(0.5 * (v + v.flip(2, 3, 4)), q, self.q_max).to(q.dtype)

    def _log_intensity(self, q: Tensor) -> Tensor:
        g = self._raw(q / self.q_max) + self.radial_log_profile(q.norm(dim=-1)) + self.residual_log_intensity(q)
        return self.log_offset + self.log_clamp * torch.tanh(g / self.log_clamp)


class VoxelField(IntensityField):
    """Log-intensity on an ``(n, n, n)`` grid over ``[-q_max, q_max]^3``, trilinear interpolation.

    Friedel symmetry: the grid is symmetrised, ``(V + flip(V)) / 2``, before interpolation (the grid
    is centred, so ``flip`` maps ``q`` to ``-q`` exactly). Outside the cube the edge value is used.
    """

    def __init__(self, q_max: float, n: int = 33, log_offset: float = 0.0) -> None:
        super().__init__(q_max, log_offset)
        if n < 3:
            raise ValueError(f"expected a grid size n >= 3, got {n}")
        self.n = int(n)
        self.grid = nn.Parameter(torch.zeros(1, 1, n, n, n))

    def symmetric_grid(self) -> Tensor:
        """The Friedel-symmetrised log-intensity grid ``(n, n, n)`` indexed ``[ix, iy, iz]`` (no offset)."""
        v = self.grid[0, 0]
        return 0.5 * (v + v.flip(0, 1, 2))

    def _log_intensity(self, q: Tensor) -> Tensor:
        return self.log_offset + sample_cube(self.symmetric_grid()[None, None], q, self.q_max)

