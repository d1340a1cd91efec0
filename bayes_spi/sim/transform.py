"""Molecular transform ``F(q) = sum_j f_j(|q|) exp(2 pi i q . r_j)`` and the ground-truth intensity grid.

``q`` in 1/A without ``2 pi`` (see :mod:`bayes_spi.geometry`), positions in A. The fast path is a type-3
non-uniform FFT (``finufft.nufft3d3``), one transform per element (all atoms of an element share
``f_e(|q|)``): ``F(q) = sum_e f_e(|q|) sum_{j in e} occ_j exp(2 pi i q . r_j)``.

Grids (:func:`intensity_on_grid`, :func:`density_on_grid`): odd cubes, index ``i`` <-> ``(i - n//2) * dq``
in reciprocal space and ``(i - n//2) * voxel_A`` in real space with ``voxel_A = 1 / (n dq)``. The
band-limited density is ``rho(r_m) = (1/n^3) sum_k F(q_k) exp(-2 pi i q_k . r_m)`` (electrons per voxel,
``sum(rho) = F(0)``), i.e. ``fftshift(fftn(ifftshift(F))) / n^3``; its transform
``sum_m rho(r_m) exp(+2 pi i q . r_m)`` gives back ``F`` on the grid (the sign keeps the hand of the
molecule: the density is not mirrored).
"""

from __future__ import annotations

import finufft
import numpy as np

from bayes_spi.grid import grid_axis
from bayes_spi.sim.structure import Structure, form_factor

__all__ = [
    "molecular_transform",
    "molecular_transform_direct",
    "intensity_on_grid",
    "grid_axis",
    "transform_on_grid",
    "intensity_from_transform",
    "density_from_transform",
    "density_on_grid",
]

_TWO_PI = 2.0 * np.pi


def _check_q(q: np.ndarray) -> np.ndarray:
    arr = np.asarray(q, dtype=np.float64)
    if arr.ndim < 1 or arr.shape[-1] != 3:
        raise ValueError(f"q: expected shape (..., 3), got {arr.shape}")
    return arr


def molecular_transform(structure: Structure, q: np.ndarray, *, eps: float = 1e-9) -> np.ndarray:
    """Molecular transform by type-3 NUFFT.

    Args:
        structure: the molecule.
        q: scattering vectors ``(..., 3)`` in 1/A.
        eps: requested NUFFT relative precision.

    Returns:
        ``F(q)`` complex128, shape ``(...)``, in electrons.
    """
    arr = _check_q(q)
    flat = np.ascontiguousarray(arr.reshape(-1, 3))
    out = np.zeros(flat.shape[0], dtype=np.complex128)
    if flat.shape[0] == 0:
        return out.reshape(arr.shape[:-1])
    qnorm = np.linalg.norm(flat, axis=1)
    s = np.ascontiguousarray(_TWO_PI * flat[:, 0])
    t = np.ascontiguousarray(_TWO_PI * flat[:, 1])
    u = np.ascontiguousarray(_TWO_PI * flat[:, 2])
    elements = [el for el in structure.elements if len(structure.positions[el])]
    pos = np.concatenate([structure.positions[el] for el in elements])
    # one NUFFT with n_trans = n_elements: row e holds the occupancies of element e's atoms, 0 elsewhere
    strengths = np.zeros((len(elements), len(pos)), dtype=np.complex128)
    start = 0
    for row, el in enumerate(elements):
        count = len(structure.positions[el])
        strengths[row, start : start + count] = structure.occupancies[el]
        start += count
    partial = finufft.nufft3d3(
        np.ascontiguousarray(pos[:, 0]),
        np.ascontiguousarray(pos[:, 1]),
        np.ascontiguousarray(pos[:, 2]),
        strengths,
        s,
        t,
        u,
        eps=eps,
        isign=1,
    ).reshape(len(elements), -1)
    for row, el in enumerate(elements):
        out += form_factor(el, qnorm) * partial[row]
    return out.reshape(arr.shape[:-1])


def molecular_transform_direct(structure: Structure, q: np.ndarray) -> np.ndarray:
    """Reference implementation by the explicit sum over atoms (``O(N_atoms * N_q)``; for tests).

    Args:
        structure: the molecule.
        q: ``(..., 3)`` in 1/A.

    Returns:
        ``F(q)`` complex128, shape ``(...)``.
    """
    arr = _check_q(q)
    flat = arr.reshape(-1, 3)
    qnorm = np.linalg.norm(flat, axis=1)
    out = np.zeros(flat.shape[0], dtype=np.complex128)
    for el in structure.elements:
        phase = np.exp(1j * _TWO_PI * flat @ structure.positions[el].T)  # (Q, N_e)
        out += form_factor(el, qnorm) * (phase @ structure.occupancies[el])
    return out.reshape(arr.shape[:-1])


def transform_on_grid(structure: Structure, n: int, q_max: float) -> tuple[np.ndarray, float]:
    """Complex molecular transform ``F(q)`` on the centred odd cube of :func:`intensity_on_grid`.

    Returns:
        ``(F (n, n, n) complex128, dq)``; ``F[ix, iy, iz]`` at ``q = ((ix - n//2) dq, ...)``.
    """
    axis, dq = grid_axis(n, q_max)
    qx, qy, qz = np.meshgrid(axis, axis, axis, indexing="ij")
    q = np.stack([qx, qy, qz], axis=-1)
    return molecular_transform(structure, q), dq


def _check_cube(arr: np.ndarray, name: str) -> None:
    if arr.ndim != 3 or len(set(arr.shape)) != 1 or arr.shape[0] % 2 == 0:
        raise ValueError(f"{name}: expected an odd cube (n, n, n), got shape {arr.shape}")


def intensity_from_transform(transform: np.ndarray) -> np.ndarray:
    """``|F|^2`` of a grid from :func:`transform_on_grid`, Friedel-symmetrised (``I[i] = I[n-1-i]``).

    Args:
        transform: ``(n, n, n)`` complex ``F`` on a centred odd cube.

    Returns:
        ``(n, n, n)`` float64 intensity in electrons^2.
    """
    arr = np.asarray(transform)
    _check_cube(arr, "transform")
    intensity = np.abs(arr) ** 2
    return 0.5 * (intensity + intensity[::-1, ::-1, ::-1])


def density_from_transform(transform: np.ndarray, dq: float) -> tuple[np.ndarray, float]:
    """Band-limited real-space density from ``F`` on a centred odd cube (see the module docstring).

    Args:
        transform: ``(n, n, n)`` complex ``F``, centre voxel ``n//2`` at ``q = 0``.
        dq: reciprocal voxel size, 1/A.

    Returns:
        ``(rho (n, n, n) float64, voxel_A)``: electrons per voxel at ``r = (i - n//2) * voxel_A``,
        ``voxel_A = 1 / (n dq)``; ``sum(rho) = F(0)``. The imaginary part (round-off of a Hermitian
        ``F``) is dropped.

    Example:
        >>> F = np.ones((5, 5, 5), dtype=complex)  # a point scatterer at the origin
        >>> rho, voxel = density_from_transform(F, 0.1)
        >>> float(rho[2, 2, 2]), float(rho.sum()), voxel
        (1.0, 1.0, 2.0)
    """
    arr = np.asarray(transform)
    _check_cube(arr, "transform")
    if not np.isfinite(dq) or dq <= 0:
        raise ValueError(f"dq: expected a positive number, got {dq!r}")
    n = arr.shape[0]
    rho = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(arr))).real / float(n) ** 3
    return np.ascontiguousarray(rho, dtype=np.float64), 1.0 / (n * float(dq))


def intensity_on_grid(structure: Structure, n: int, q_max: float) -> tuple[np.ndarray, float]:
    """Ground-truth intensity ``|F(q)|^2`` (electrons^2) on a centred odd cube.

    Index ``I[ix, iy, iz]`` <-> ``q = ((ix - n//2) dq, (iy - n//2) dq, (iz - n//2) dq)`` with
    ``dq = q_max / (n//2)``: axis order x, y, z, the centre voxel ``n//2`` is ``q = 0``, and the grid is
    exactly Friedel-symmetric (``I[i] = I[n-1-i]`` per axis, enforced by symmetrising).

    Returns:
        ``(I (n, n, n) float64, dq)`` with ``dq`` the voxel size in 1/A.
    """
    transform, dq = transform_on_grid(structure, n, q_max)
    return intensity_from_transform(transform), dq


def density_on_grid(structure: Structure, n: int, q_max: float) -> tuple[np.ndarray, float]:
    """Band-limited true electron density matching :func:`intensity_on_grid` ``(structure, n, q_max)``.

    ``|FFT(rho)|^2`` on the same grid equals the intensity grid, and ``sum(rho) = F(0)`` (the
    occupancy-weighted electron count up to the form-factor fit error). The structure is centred on its
    centre of electron mass (:class:`Structure`), so the density sits at the box centre voxel ``n//2``.
    Real-space box: ``n`` voxels of ``voxel_A = 1 / (n dq)`` Angstrom (``dq = q_max / (n//2)``).

    Returns:
        ``(rho (n, n, n) float64 electrons per voxel, voxel_A)``, axis order x, y, z.

    Example:
        >>> from bayes_spi.sim.structure import Structure
        >>> mol = Structure.from_arrays(["C", "O"], np.array([[0.0, 0, 0], [1.2, 0, 0]]))
        >>> rho, voxel = density_on_grid(mol, 15, 0.5)
        >>> rho.shape, round(voxel, 3)
        ((15, 15, 15), 0.933)
    """
    transform, dq = transform_on_grid(structure, n, q_max)
    return density_from_transform(transform, dq)
