"""Trilinear reads of a centred cube, and their adjoint (splatting): the one place both are written.

A cube ``(1, 1, n, n, n)`` indexed ``[ix, iy, iz]`` holds values at ``linspace(-h, h, n)`` along each axis
(``h`` the half-width: ``q_max`` for the field caches and voxel fields). :func:`sample_cube` reads it at any
points (``torch.nn.functional.grid_sample``, ``align_corners=True``, border value outside);
:func:`splat_cube` scatters values at points into such a cube with the same trilinear weights (the
adjoint: ``<splat(x, v), V> = <v, sample(V, x)>``), as EMC's M-step merges photons.

Example:
    >>> import torch
    >>> cube = torch.arange(27.0).reshape(1, 1, 3, 3, 3)
    >>> float(sample_cube(cube, torch.tensor([[0.0, 0.0, 0.0]]), 1.0)[0])   # the centre voxel [1, 1, 1]
    13.0
    >>> float(splat_cube(torch.tensor([[0.0, 0.0, 0.5]]), torch.tensor([2.0]), 3, 1.0)[1, 1, 2])
    1.0
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sample_cube", "splat_cube"]


def sample_cube(cube: Tensor, x: Tensor, half_width: float) -> Tensor:
    """Trilinear values of ``cube (1, 1, n, n, n)`` over ``[-half_width, half_width]^3`` at points ``x (..., 3)``.

    Differentiable in ``x`` and in ``cube``; points outside the cube take the border value. Returns ``(...)``
    in the cube's dtype.
    """
    if cube.dim() != 5 or cube.shape[:2] != (1, 1):
        raise ValueError(f"expected a cube of shape (1, 1, n, n, n), got shape {tuple(cube.shape)}")
    if x.shape[-1] != 3:
        raise ValueError(f"expected points of shape (..., 3), got shape {tuple(x.shape)}")
    # grid_sample reads a (D, H, W) volume at (W, H, D) coordinates: the cube is (D=ix, H=iy, W=iz), so the
    # coordinates go in the order (iz, iy, ix)
    flat = (x / half_width).reshape(1, -1, 1, 1, 3).flip(-1).to(cube.dtype)
    out = F.grid_sample(cube, flat, mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(x.shape[:-1])


def splat_cube(x: Tensor, values: Tensor, n: int, half_width: float) -> Tensor:
    """Scatter ``values (P,)`` (or ``(P, C)``: ``C`` channels at once) at points ``x (P, 3)`` into an ``(n, n, n)``
    (or ``(n, n, n, C)``) cube over ``[-half_width, half_width]^3``.

    Trilinear weights (the adjoint of :func:`sample_cube`), indexed ``[ix, iy, iz]``; points outside the cube
    are dropped. The channels share the weights and indices (computed once); each channel's sums are the
    numbers a one-channel call gives.
    """
    if x.dim() != 2 or x.shape[-1] != 3 or values.dim() not in (1, 2) or values.shape[0] != x.shape[0]:
        raise ValueError(f"expected x (P, 3) and values (P,) or (P, C), got shapes {tuple(x.shape)} and "
                         f"{tuple(values.shape)}")
    u = (x / half_width + 1.0) * 0.5 * (n - 1)  # continuous voxel index
    inside = ((u >= 0) & (u <= n - 1)).all(-1)
    u, values = u[inside], values[inside]
    i0 = u.floor().clamp(max=n - 2).long()
    f = u - i0
    out = torch.zeros((n * n * n,) + values.shape[1:], dtype=values.dtype, device=values.device)
    col = (slice(None),) + (None,) * (values.dim() - 1)  # weights (P,) against values (P, ...)
    for dx in (0, 1):
        wx = f[:, 0] if dx else 1 - f[:, 0]
        for dy in (0, 1):
            wy = f[:, 1] if dy else 1 - f[:, 1]
            for dz in (0, 1):
                wz = f[:, 2] if dz else 1 - f[:, 2]
                flat = ((i0[:, 0] + dx) * n + (i0[:, 1] + dy)) * n + (i0[:, 2] + dz)
                out.index_add_(0, flat, values * wx[col] * wy[col] * wz[col])
    return out.reshape((n, n, n) + values.shape[1:])
