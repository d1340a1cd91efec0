r"""Rotation utilities on SO(3) (torch, batched).

Conventions
-----------
* Rotation matrices act on **column vectors**: ``x' = R @ x``. All functions accept any number of
  leading batch dimensions, ``(..., 3, 3)``.
* Quaternions are **scalar-first** ``(w, x, y, z)``, as stored in our data files. Note that ``roma``
  uses scalar-**last** ``(x, y, z, w)``; every conversion to or from roma goes through this module.
  The quaternion ``(cos(t/2), sin(t/2) * axis)`` is the rotation by angle ``t`` about ``axis``
  (right-handed), i.e. the same rotation as the rotation vector ``t * axis``.
* Rotation vectors (axis-angle) have norm in ``[0, pi]`` when produced by :func:`rotmat_to_rotvec`.
* The numpy helpers (suffix ``_numpy``) are the float64 counterparts of the torch ones, for the
  analysis and report code that works on numpy arrays.
* 6D representation (Zhou et al. 2019): ``x[..., :3]`` is the first column ``a1`` and ``x[..., 3:]``
  the second column ``a2`` of a ``3 x 2`` matrix that is Gram-Schmidt orthonormalised; roma's
  :func:`roma.special_gramschmidt` wants that matrix shaped ``(..., 3, 2)`` (columns last), so a plain
  ``x.reshape(..., 3, 2)`` would *interleave* the two vectors; we stack them explicitly.

Example:
    >>> R = random_rotmat(4)
    >>> q = rotmat_to_quat_wxyz(R)
    >>> torch.allclose(quat_wxyz_to_rotmat(q), R, atol=1e-5)
    True
"""

from __future__ import annotations

import math  # noqa: F401  (used in doctest examples)
from typing import Sequence

import numpy as np
import roma
import torch
from torch import Tensor

__all__ = [
    "quat_wxyz_to_rotmat",
    "rotmat_to_quat_wxyz",
    "rotvec_to_rotmat",
    "rotmat_to_rotvec",
    "hat",
    "vee",
    "random_rotmat",
    "super_fibonacci_rotmat",
    "geodesic_angle",
    "geodesic_angle_numpy",
    "rotz_pi",
    "rotz_pi_numpy",
    "sixd_to_rotmat",
]


def _check_last(x: Tensor, shape: tuple[int, ...], name: str) -> None:
    if x.dim() < len(shape) or tuple(x.shape[-len(shape) :]) != shape:
        trailing = ", ".join(str(s) for s in shape)
        raise ValueError(f"expected {name} of shape (..., {trailing}), got shape {tuple(x.shape)}")


def quat_wxyz_to_rotmat(q: Tensor) -> Tensor:
    r"""Scalar-first quaternions to rotation matrices.

    The quaternion is normalised first, so slightly non-unit inputs are accepted; ``q`` and ``-q``
    give the same rotation.

    Args:
        q: quaternions ``(w, x, y, z)``, shape ``(..., 4)``.

    Returns:
        Rotation matrices, shape ``(..., 3, 3)``.

    Example:
        >>> quat_wxyz_to_rotmat(torch.tensor([1.0, 0.0, 0.0, 0.0]))
        tensor([[1., 0., 0.],
                [0., 1., 0.],
                [0., 0., 1.]])
    """
    _check_last(q, (4,), "q")
    q = q / torch.linalg.vector_norm(q, dim=-1, keepdim=True)
    q_xyzw = torch.cat([q[..., 1:], q[..., :1]], dim=-1)
    return roma.unitquat_to_rotmat(q_xyzw)


def rotmat_to_quat_wxyz(R: Tensor) -> Tensor:
    r"""Rotation matrices to scalar-first unit quaternions, canonicalised to ``w >= 0``.

    Args:
        R: rotation matrices, shape ``(..., 3, 3)``.

    Returns:
        Unit quaternions ``(w, x, y, z)`` with ``w >= 0``, shape ``(..., 4)``.

    Example:
        >>> rotmat_to_quat_wxyz(torch.eye(3))
        tensor([1., 0., 0., 0.])
    """
    _check_last(R, (3, 3), "R")
    q_xyzw = roma.rotmat_to_unitquat(R)
    q = torch.cat([q_xyzw[..., 3:], q_xyzw[..., :3]], dim=-1)
    sign = torch.where(q[..., :1] < 0, -torch.ones_like(q[..., :1]), torch.ones_like(q[..., :1]))
    return q * sign


def rotvec_to_rotmat(v: Tensor) -> Tensor:
    r"""Exponential map: rotation vectors (axis * angle) to rotation matrices.

    Args:
        v: rotation vectors, shape ``(..., 3)``; any norm.

    Returns:
        Rotation matrices ``exp(hat(v))``, shape ``(..., 3, 3)``.

    Example:
        >>> R = rotvec_to_rotmat(torch.tensor([0.0, 0.0, math.pi / 2]))
        >>> torch.allclose(R @ torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
        True
    """
    _check_last(v, (3,), "v")
    return roma.rotvec_to_rotmat(v)


def rotmat_to_rotvec(R: Tensor) -> Tensor:
    r"""Logarithm map: rotation matrices to rotation vectors with norm in ``[0, pi]``.

    Args:
        R: rotation matrices, shape ``(..., 3, 3)``.

    Returns:
        Rotation vectors, shape ``(..., 3)``. At angle ``pi`` the sign of the axis is arbitrary.

    Example:
        >>> v = torch.tensor([0.1, -0.2, 0.3])
        >>> torch.allclose(rotmat_to_rotvec(rotvec_to_rotmat(v)), v, atol=1e-6)
        True
    """
    _check_last(R, (3, 3), "R")
    return roma.rotmat_to_rotvec(R)


def hat(v: Tensor) -> Tensor:
    r"""Skew-symmetric matrix ``[v]_x`` such that ``hat(v) @ u = cross(v, u)``.

    Args:
        v: vectors, shape ``(..., 3)``.

    Returns:
        Skew-symmetric matrices, shape ``(..., 3, 3)``.

    Example:
        >>> hat(torch.tensor([1.0, 2.0, 3.0]))
        tensor([[ 0., -3.,  2.],
                [ 3.,  0., -1.],
                [-2.,  1.,  0.]])
    """
    _check_last(v, (3,), "v")
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], dim=-1).reshape(*v.shape[:-1], 3, 3)


def vee(S: Tensor) -> Tensor:
    r"""Inverse of :func:`hat` (uses the antisymmetric part): ``(..., 3, 3) -> (..., 3)``.

    Example:
        >>> vee(hat(torch.tensor([1.0, 2.0, 3.0])))
        tensor([1., 2., 3.])
    """
    _check_last(S, (3, 3), "S")
    return 0.5 * torch.stack(
        [S[..., 2, 1] - S[..., 1, 2], S[..., 0, 2] - S[..., 2, 0], S[..., 1, 0] - S[..., 0, 1]], dim=-1
    )


def random_rotmat(
    n: int | Sequence[int],
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""Rotations drawn uniformly from the Haar measure (normalised Gaussian quaternions).

    Args:
        n: number of rotations, or a batch shape.
        generator: optional torch generator for reproducibility.
        dtype: floating dtype (default: ``torch.get_default_dtype()``).
        device: device.

    Returns:
        Rotation matrices, shape ``(n, 3, 3)`` or ``(*n, 3, 3)``.

    Example:
        >>> random_rotmat(5, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([5, 3, 3])
    """
    shape = (int(n),) if isinstance(n, int) else tuple(int(s) for s in n)
    dtype = dtype or torch.get_default_dtype()
    q = torch.randn(*shape, 4, generator=generator, dtype=dtype, device=device)
    return quat_wxyz_to_rotmat(q)


def super_fibonacci_rotmat(n: int, dtype: torch.dtype | None = None,
                           device: torch.device | str | None = None) -> Tensor:
    r"""``n`` quasi-uniform rotations ``(n, 3, 3)``: the Super-Fibonacci spiral (Alexa, CVPR 2022).

    Deterministic, and much more even than random rotations of the same number (no gaps: the largest
    distance from any rotation to its nearest grid point is close to the typical spacing
    ``(8 pi^2 / n)^(1/3)`` rad), which is what an exhaustive orientation search needs.

    Example:
        >>> super_fibonacci_rotmat(100).shape
        torch.Size([100, 3, 3])
    """
    if n < 1:
        raise ValueError(f"expected n >= 1, got {n}")
    phi = math.sqrt(2.0)
    psi = 1.533751168755204288118041
    s = torch.arange(n, dtype=torch.float64) + 0.5
    r = torch.sqrt(s / n)
    big_r = torch.sqrt(1.0 - s / n)
    alpha = 2 * math.pi * s / phi
    beta = 2 * math.pi * s / psi
    q = torch.stack([r * torch.sin(alpha), r * torch.cos(alpha), big_r * torch.sin(beta), big_r * torch.cos(beta)], -1)
    return quat_wxyz_to_rotmat(q).to(dtype=dtype or torch.get_default_dtype(), device=device)


def geodesic_angle(R1: Tensor, R2: Tensor) -> Tensor:
    r"""Geodesic distance (rotation angle of ``R1^T R2``) in radians, in ``[0, pi]``.

    Uses ``atan2(sin, cos)`` with ``sin`` from the antisymmetric part and ``cos`` from the trace,
    which is accurate near both ``0`` and ``pi`` (unlike ``acos`` of the trace) and has finite
    gradients everywhere except exactly at angle 0 and pi, where it is clamped.

    Args:
        R1: rotations, shape ``(..., 3, 3)``.
        R2: rotations, shape ``(..., 3, 3)`` (broadcast against ``R1``).

    Returns:
        Angles, shape ``(...)``.

    Example:
        >>> R = rotvec_to_rotmat(torch.tensor([0.0, 0.3, 0.0]))
        >>> round(float(geodesic_angle(torch.eye(3), R)), 4)
        0.3
    """
    _check_last(R1, (3, 3), "R1")
    _check_last(R2, (3, 3), "R2")
    M = R1.transpose(-1, -2) @ R2
    cos = 0.5 * (M.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0)
    a = vee(M)
    tiny = torch.finfo(M.dtype).tiny
    sin = torch.sqrt(torch.clamp_min((a * a).sum(-1), tiny))
    return torch.atan2(sin, cos)


def rotz_pi(dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Tensor:
    r"""Rotation by 180 degrees about the z (beam) axis, ``diag(-1, -1, 1)``, shape ``(3, 3)``.

    Example:
        >>> rotz_pi()
        tensor([[-1.,  0.,  0.],
                [ 0., -1.,  0.],
                [ 0.,  0.,  1.]])
    """
    return torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=dtype or torch.get_default_dtype(), device=device))


def rotz_pi_numpy() -> np.ndarray:
    r"""Rotation by 180 degrees about the z (beam) axis, ``diag(-1, -1, 1)``, float64 ``(3, 3)`` (a new array).

    Example:
        >>> rotz_pi_numpy()
        array([[-1.,  0.,  0.],
               [ 0., -1.,  0.],
               [ 0.,  0.,  1.]])
    """
    return np.diag([-1.0, -1.0, 1.0])


def geodesic_angle_numpy(R1: np.ndarray, R2: np.ndarray) -> np.ndarray:
    r"""Geodesic distance (rotation angle of ``R1^T R2``) in radians, in ``[0, pi]``: numpy, float64.

    The same ``atan2(sin, cos)`` as :func:`geodesic_angle` (stable near 0 and pi), without the clamp.

    Args:
        R1: rotations, shape ``(..., 3, 3)``.
        R2: rotations, shape ``(..., 3, 3)`` (broadcast against ``R1``).

    Returns:
        Angles, shape ``(...)``.

    Example:
        >>> R = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
        >>> round(float(np.degrees(geodesic_angle_numpy(np.eye(3), R))), 6)
        90.0
    """
    M = np.swapaxes(R1, -1, -2) @ R2
    cos = 0.5 * (np.trace(M, axis1=-2, axis2=-1) - 1.0)
    a = 0.5 * np.stack([M[..., 2, 1] - M[..., 1, 2], M[..., 0, 2] - M[..., 2, 0], M[..., 1, 0] - M[..., 0, 1]], -1)
    return np.arctan2(np.linalg.norm(a, axis=-1), cos)


def sixd_to_rotmat(x: Tensor) -> Tensor:
    r"""6D representation (Zhou et al. 2019) to rotation matrices by Gram-Schmidt.

    ``x[..., :3]`` gives the first column of ``R`` (after normalisation), ``x[..., 3:]`` the direction
    of the second column (after removing its component along the first); the third is their cross
    product. Differentiable; ill-defined when the two vectors are colinear.

    Args:
        x: 6D vectors, shape ``(..., 6)``.

    Returns:
        Rotation matrices, shape ``(..., 3, 3)``.

    Example:
        >>> sixd_to_rotmat(torch.tensor([2.0, 0.0, 0.0, 1.0, 1.0, 0.0]))
        tensor([[1., 0., 0.],
                [0., 1., 0.],
                [0., 0., 1.]])
    """
    _check_last(x, (6,), "x")
    M = torch.stack([x[..., :3], x[..., 3:]], dim=-1)  # (..., 3, 2): columns a1, a2
    return roma.special_gramschmidt(M)

