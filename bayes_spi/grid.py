r"""The centred odd cube on which every volume of the package lives (reciprocal or real space).

Convention: a cube of ``n`` voxels per side (``n`` odd) has its centre voxel at index ``n // 2``; voxel
``i`` sits at ``(i - n // 2) * d`` along each axis, with ``d`` the spacing (``dq`` in 1/A for an
intensity, ``voxel_A`` in A for a density). With ``q_max`` the largest ``|q|`` along an axis,
``dq = q_max / (n // 2)``. Arrays are indexed ``[ix, iy, iz]``.

This module only depends on numpy, so that ``models/``, ``analysis/``, ``sim/`` and ``infer/`` can all
share it without importing each other.

Example:
    >>> centred_index(5)
    array([-2., -1.,  0.,  1.,  2.])
    >>> axis, dq = grid_axis(5, 0.1)
    >>> dq, float(axis[-1])
    (0.05, 0.1)
    >>> grid_q(3, 1.0)[0].shape
    (3, 3, 3, 3)
"""

from __future__ import annotations

import numpy as np

__all__ = ["centred_index", "grid_axis", "grid_q", "radial_index"]


def centred_index(n: int) -> np.ndarray:
    """``i - n // 2`` for ``i = 0 .. n - 1``, float64 ``(n,)``: voxel offsets from the centre of the cube."""
    return np.arange(n, dtype=np.float64) - n // 2


def grid_axis(n: int, q_max: float) -> tuple[np.ndarray, float]:
    """1D axis of the centred odd-size cube: ``q_i = (i - n//2) * dq`` with ``dq = q_max / (n//2)``.

    Returns:
        ``(axis (n,), dq)``.

    Raises:
        ValueError: ``n`` is not an odd integer ``>= 3`` or ``q_max`` is not a positive number.
    """
    if isinstance(n, bool) or int(n) != n or n < 3 or n % 2 == 0:
        raise ValueError(f"n: expected an odd integer >= 3, got {n!r}")
    if not np.isfinite(q_max) or q_max <= 0:
        raise ValueError(f"q_max: expected a positive number, got {q_max!r}")
    n = int(n)
    dq = float(q_max) / (n // 2)
    return centred_index(n) * dq, dq


def grid_q(n: int, q_max: float) -> tuple[np.ndarray, float]:
    """Centred cubic grid: ``q (n, n, n, 3)`` indexed ``[ix, iy, iz]`` and its spacing ``dq`` (1/A).

    ``n`` odd puts a voxel at ``q = 0``; index ``i`` is ``q = (i - n // 2) * dq``, ``dq = q_max / (n // 2)``.

    Raises:
        ValueError: ``n`` is not odd or below 3.
    """
    if n < 3 or n % 2 == 0:
        raise ValueError(f"expected an odd grid size n >= 3, got {n}")
    dq = q_max / (n // 2)
    ax = centred_index(n) * dq
    q = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), axis=-1)
    return q, dq


def radial_index(n: int) -> np.ndarray:
    """``|q| / dq`` of every voxel of the centred odd cube ``(n, n, n)`` (float64)."""
    axis = centred_index(n)
    return np.sqrt(axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2)
