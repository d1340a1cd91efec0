r"""Fourier shell correlation (FSC) of intensities and densities, and resolution at a threshold.

Conventions (as in the NeuroRient / X-RAI evaluations, see ``docs/DESIGN.md`` section 5):

* Reciprocal grids are odd cubes ``(n, n, n)`` indexed ``[ix, iy, iz]``; voxel ``i`` sits at
  ``q = (i - n//2) * dq`` (1/A, no ``2 pi``).
* Shell ``s`` (width ``w``, ``w = dq`` by default) holds the voxels with
  ``(s - 1/2) w <= |q| < (s + 1/2) w``; its centre is ``q_s = s w``. Shell 0 is the ``q = 0`` voxel.
* ``FSC(q_s) = Re sum_{shell} a conj(b) / sqrt(sum |a|^2 sum |b|^2)``.
* Intensity FSC (:func:`intensity_fsc`): the shell correlation of ``sqrt(max(I, 0))`` (the paper's
  replacement of ``F[rho]`` by ``sqrt(I)``).
* Density FSC (:func:`density_fsc`): the shell correlation of the centred FFTs of two real-space
  densities, frequency in 1/A with ``dq = 1 / (n voxel_A)``.
* Resolution at a threshold (0.5 and 0.143 are the usual ones): ``1 / q`` at the first downward crossing,
  linearly interpolated between shell centres (:func:`resolution_at`).

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> a = rng.random((17, 17, 17))
    >>> curve = shell_correlation(a, a, dq=0.01)
    >>> bool(np.allclose(curve.fsc, 1.0)), curve.q[:3].round(3).tolist(), curve.crosses(0.5)
    (True, [0.0, 0.01, 0.02], False)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from bayes_spi.grid import centred_index, radial_index

__all__ = [
    "FSCCurve",
    "resolution_at",
    "radial_index",
    "ball_mask",
    "centred_fft",
    "shell_correlation",
    "intensity_fsc",
    "density_fsc",
]


def resolution_at(q: np.ndarray, fsc: np.ndarray, threshold: float) -> tuple[float, bool]:
    """Resolution ``1 / q`` (A) where ``fsc`` first drops below ``threshold``.

    The crossing is the first shell ``i`` with ``fsc[i] < threshold`` whose predecessor (the previous
    shell with a finite value) is ``>= threshold``; ``q`` is linearly interpolated between the two shell
    centres. Shells with NaN (empty) are skipped.

    Args:
        q: ``(S,)`` increasing shell centres, 1/A.
        fsc: ``(S,)`` correlations.
        threshold: e.g. 0.5 or 0.143.

    Returns:
        ``(resolution_A, crossed)``. If the curve never drops below the threshold, ``crossed`` is False and
        the resolution is that of the last finite shell (a lower bound on the achievable resolution). If the
        first finite shell is already below, ``crossed`` is True and the resolution is ``1 / q`` of that
        shell (``inf`` at ``q = 0``).

    Example:
        >>> res, crossed = resolution_at(np.array([0.0, 0.1, 0.2]), np.array([1.0, 0.6, 0.4]), 0.5)
        >>> round(res, 6), crossed  # q = 0.15 at the crossing
        (6.666667, True)
    """
    q_arr = np.asarray(q, dtype=np.float64).reshape(-1)
    f_arr = np.asarray(fsc, dtype=np.float64).reshape(-1)
    if q_arr.shape != f_arr.shape:
        raise ValueError(f"expected q and fsc of the same shape, got {q_arr.shape} and {f_arr.shape}")
    if not np.isfinite(threshold):
        raise ValueError(f"threshold: expected a finite number, got {threshold!r}")
    keep = np.isfinite(f_arr) & np.isfinite(q_arr)
    q_arr, f_arr = q_arr[keep], f_arr[keep]
    if q_arr.size == 0:
        raise ValueError("expected at least one finite FSC value, got none")

    def inv(x: float) -> float:
        return math.inf if x <= 0 else 1.0 / x

    if f_arr[0] < threshold:
        return inv(float(q_arr[0])), True
    below = np.nonzero(f_arr < threshold)[0]
    if below.size == 0:
        return inv(float(q_arr[-1])), False
    i = int(below[0])
    q0, q1, f0, f1 = float(q_arr[i - 1]), float(q_arr[i]), float(f_arr[i - 1]), float(f_arr[i])
    q_cross = q0 + (f0 - threshold) / (f0 - f1) * (q1 - q0)
    return inv(q_cross), True


@dataclass(frozen=True)
class FSCCurve:
    """A Fourier shell correlation curve.

    Attributes:
        q: ``(S,)`` shell centres in 1/A.
        fsc: ``(S,)`` correlation per shell (NaN for an empty shell or a zero denominator).
        n_voxels: ``(S,)`` voxels per shell.
    """

    q: np.ndarray
    fsc: np.ndarray
    n_voxels: np.ndarray

    def __post_init__(self) -> None:
        q = np.asarray(self.q, dtype=np.float64).reshape(-1)
        fsc = np.asarray(self.fsc, dtype=np.float64).reshape(-1)
        n_vox = np.asarray(self.n_voxels, dtype=np.int64).reshape(-1)
        if not (q.shape == fsc.shape == n_vox.shape):
            raise ValueError(f"FSCCurve: expected q, fsc, n_voxels of one shape, got {q.shape}, {fsc.shape}, "
                             f"{n_vox.shape}")
        object.__setattr__(self, "q", q)
        object.__setattr__(self, "fsc", fsc)
        object.__setattr__(self, "n_voxels", n_vox)

    def resolution(self, threshold: float = 0.5) -> float:
        """Resolution in Angstrom at ``threshold`` (see :func:`resolution_at`; check :meth:`crosses`)."""
        return resolution_at(self.q, self.fsc, threshold)[0]

    def resolution_nm(self, threshold: float = 0.5) -> float:
        """Resolution in nanometres at ``threshold``."""
        return self.resolution(threshold) / 10.0

    def crosses(self, threshold: float = 0.5) -> bool:
        """Whether the curve drops below ``threshold`` (False: :meth:`resolution` is only a bound)."""
        return resolution_at(self.q, self.fsc, threshold)[1]

    def to_dict(self) -> dict[str, list[Any]]:
        """JSON-friendly ``{"q_inv_A": [...], "fsc": [...], "n_voxels": [...]}`` (NaN -> None)."""
        return {
            "q_inv_A": [float(v) for v in self.q],
            "fsc": [float(v) if np.isfinite(v) else None for v in self.fsc],
            "n_voxels": [int(v) for v in self.n_voxels],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FSCCurve:
        """Inverse of :meth:`to_dict` (None -> NaN).

        Raises:
            ValueError: a key is missing.
        """
        missing = [k for k in ("q_inv_A", "fsc", "n_voxels") if k not in data]
        if missing:
            raise ValueError(f"FSCCurve.from_dict: expected keys q_inv_A, fsc, n_voxels, missing {missing}")
        fsc = np.array([np.nan if v is None else float(v) for v in data["fsc"]], dtype=np.float64)
        return cls(np.asarray(data["q_inv_A"], dtype=np.float64), fsc, np.asarray(data["n_voxels"], dtype=np.int64))


def _check_pair(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> None:
    if a.ndim != 3 or len(set(a.shape)) != 1 or a.shape[0] % 2 == 0:
        raise ValueError(f"{names[0]}: expected an odd cube (n, n, n), got shape {a.shape}")
    if b.shape != a.shape:
        raise ValueError(f"{names[1]}: expected shape {a.shape} (as {names[0]}), got {b.shape}")


def ball_mask(n: int, dq: float, q_max: float) -> np.ndarray:
    """``(n, n, n)`` bool: the voxels of the centred odd grid (spacing ``dq``) with ``|q| <= q_max`` (1/A),
    e.g. the region a detector measured (its largest ``|q|``)."""
    axis = centred_index(n) * float(dq)
    qx, qy, qz = np.meshgrid(axis, axis, axis, indexing="ij")
    return qx**2 + qy**2 + qz**2 <= float(q_max) ** 2 * (1 + 1e-9)


def shell_correlation(
    a: np.ndarray,
    b: np.ndarray,
    dq: float,
    n_shells: int | None = None,
    q_max: float | None = None,
    mask: np.ndarray | None = None,
    centre: bool = False,
) -> FSCCurve:
    """Shell-by-shell correlation of two reciprocal-space volumes.

    Args:
        a, b: ``(n, n, n)`` real or complex volumes on the centred odd grid (voxel ``n//2`` at ``q = 0``).
        dq: voxel size, 1/A.
        n_shells: number of shells ``S`` (centres ``0, w, ..., (S-1) w`` with ``w = q_max / (S - 1)``);
            default: shell width ``w = dq``.
        q_max: centre of the last shell, 1/A (default ``n//2 * dq``, the last shell that reaches the
            cube faces).
        mask: optional ``(n, n, n)`` bool, voxels to use (e.g. the measured sphere).
        centre: subtract each volume's mean over the shell first (a Pearson correlation per shell).

    Returns:
        :class:`FSCCurve` with ``fsc = Re sum(a conj b) / sqrt(sum |a|^2 sum |b|^2)`` per shell.

    Example:
        >>> x = np.ones((5, 5, 5))
        >>> shell_correlation(x, -x, dq=0.1).fsc.tolist()
        [-1.0, -1.0, -1.0]
    """
    arr_a = np.asarray(a)
    arr_b = np.asarray(b)
    _check_pair(arr_a, arr_b, ("a", "b"))
    if not np.isfinite(dq) or dq <= 0:
        raise ValueError(f"dq: expected a positive number, got {dq!r}")
    n = arr_a.shape[0]
    q_top = float(q_max) if q_max is not None else (n // 2) * float(dq)
    if not np.isfinite(q_top) or q_top <= 0:
        raise ValueError(f"q_max: expected a positive number, got {q_max!r}")
    if n_shells is None:
        width = float(dq)
        count = int(math.floor(q_top / width + 1e-9)) + 1
    else:
        if isinstance(n_shells, bool) or int(n_shells) != n_shells or n_shells < 2:
            raise ValueError(f"n_shells: expected an integer >= 2, got {n_shells!r}")
        count = int(n_shells)
        width = q_top / (count - 1)
    shell = np.floor(radial_index(n) * float(dq) / width + 0.5).astype(np.int64)
    use = shell < count
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != arr_a.shape or m.dtype != np.bool_:
            raise ValueError(f"mask: expected a bool array of shape {arr_a.shape}, got {m.dtype} {m.shape}")
        use &= m
    idx = shell[use]
    va = arr_a[use]
    vb = arr_b[use]
    if centre:
        n_in = np.maximum(np.bincount(idx, minlength=count), 1)
        va = va - (np.bincount(idx, weights=va.real, minlength=count)
                   + 1j * np.bincount(idx, weights=np.imag(va), minlength=count))[idx] / n_in[idx]
        vb = vb - (np.bincount(idx, weights=vb.real, minlength=count)
                   + 1j * np.bincount(idx, weights=np.imag(vb), minlength=count))[idx] / n_in[idx]
        if not np.iscomplexobj(arr_a) and not np.iscomplexobj(arr_b):
            va, vb = va.real, vb.real
    cross = np.bincount(idx, weights=np.real(va * np.conj(vb)), minlength=count)
    pa = np.bincount(idx, weights=np.abs(va) ** 2, minlength=count)
    pb = np.bincount(idx, weights=np.abs(vb) ** 2, minlength=count)
    n_vox = np.bincount(idx, minlength=count)
    denom = np.sqrt(pa * pb)
    with np.errstate(invalid="ignore", divide="ignore"):
        fsc = np.where(denom > 0, cross / np.where(denom > 0, denom, 1.0), np.nan)
    return FSCCurve(np.arange(count) * width, fsc, n_vox)


def intensity_fsc(
    I_a: np.ndarray,
    I_b: np.ndarray,
    dq: float,
    n_shells: int | None = None,
    q_max: float | None = None,
    mask: np.ndarray | None = None,
    speckle: bool = False,
) -> FSCCurve:
    """FSC of two intensity volumes: :func:`shell_correlation` of ``sqrt(max(I, 0))``.

    The papers' definition (``speckle=False``) correlates the non-negative amplitudes as they are, so
    even two volumes that share only the radial fall-off score well above 0.5 in every shell. With
    ``speckle=True`` each shell's mean amplitude is removed first (``centre=True``): the curve then
    measures agreement of the speckle pattern, the information the orientations carry, and drops to
    about 0 for unrelated volumes.

    Args:
        I_a, I_b: ``(n, n, n)`` intensities on the centred odd grid (voxel ``dq`` 1/A).
        dq, n_shells, q_max, mask: as in :func:`shell_correlation`.
        speckle: remove each shell's mean first.

    Returns:
        :class:`FSCCurve`.
    """
    a = np.sqrt(np.clip(np.asarray(I_a, dtype=np.float64), 0.0, None))
    b = np.sqrt(np.clip(np.asarray(I_b, dtype=np.float64), 0.0, None))
    return shell_correlation(a, b, dq, n_shells=n_shells, q_max=q_max, mask=mask, centre=speckle)


def centred_fft(rho: np.ndarray) -> np.ndarray:
    """``fftshift(fftn(ifftshift(rho)))``: the transform of a centred odd cube, centred (complex128)."""
    return np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(np.asarray(rho, dtype=np.float64))))


def density_fsc(
    rho_a: np.ndarray,
    rho_b: np.ndarray,
    voxel_A: float,
    n_shells: int | None = None,
    q_max: float | None = None,
    mask: np.ndarray | None = None,
) -> FSCCurve:
    """FSC of two real-space densities (already aligned) on the same odd cube.

    Both are transformed with ``fftshift(fftn(ifftshift(rho)))`` (the sign of the exponent does not
    change the FSC of real densities) and correlated shell by shell with
    ``Re sum(Fa conj Fb) / sqrt(sum |Fa|^2 sum |Fb|^2)``.

    Args:
        rho_a, rho_b: ``(n, n, n)`` densities, centre voxel ``n//2``.
        voxel_A: real-space voxel size, Angstrom; frequencies are in 1/A with ``dq = 1 / (n voxel_A)``
            (Nyquist ``1 / (2 voxel_A)``, the default ``q_max`` is ``n//2 * dq`` just below it).
        n_shells, q_max, mask: as in :func:`shell_correlation` (mask in the centred reciprocal grid).

    Returns:
        :class:`FSCCurve`.

    Example:
        >>> rho = np.zeros((9, 9, 9)); rho[4, 4, 4] = 1.0
        >>> bool(np.allclose(density_fsc(rho, 2 * rho, voxel_A=2.0).fsc, 1.0))
        True
    """
    a = np.asarray(rho_a, dtype=np.float64)
    b = np.asarray(rho_b, dtype=np.float64)
    _check_pair(a, b, ("rho_a", "rho_b"))
    if not np.isfinite(voxel_A) or voxel_A <= 0:
        raise ValueError(f"voxel_A: expected a positive number, got {voxel_A!r}")
    dq = 1.0 / (a.shape[0] * float(voxel_A))
    return shell_correlation(centred_fft(a), centred_fft(b), dq, n_shells=n_shells, q_max=q_max, mask=mask)
