"""Compare a reconstructed intensity with a reference volume alone (no poses needed).

Independent simulators (Dragonfly) and experiments rarely provide true orientations; what they do provide
is a reference 3D intensity (a simulation's truth, or another program's reconstruction). The score used
throughout the robustness and peer benchmarks is the **speckle correlation**: the Pearson correlation of
``sqrt(I)`` between the two volumes over the measured shell ``q_min <= |q| <= q_max``, after removing
each ``|q|`` shell's mean from both and dividing by the shell's spread (so the shared radial fall-off
does not count, only the speckles do, and every shell counts by its number of voxels rather than by its
brightness: the few low-``q`` voxels would otherwise dominate),
after the best rotational alignment of the reconstruction onto the reference
(:func:`bayes_spi.analysis.align.align_intensity_rotation`; inversion needs no search because
intensities are centrosymmetric).

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> a = rng.random((9, 9, 9)); a = a + a[::-1, ::-1, ::-1]
    >>> round(speckle_correlation(a, 2 * a, dq=0.01, q_max=0.04), 6)
    1.0
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bayes_spi.analysis.align import align_intensity_rotation, rotate_volume
from bayes_spi.analysis.fsc import FSCCurve, intensity_fsc, radial_index

__all__ = ["speckle_correlation", "ReferenceComparison", "compare_to_reference"]


def speckle_correlation(I_a: np.ndarray, I_b: np.ndarray, dq: float, q_max: float, q_min: float = 0.0) -> float:
    """Correlation of ``sqrt(I)`` with each shell standardised (mean removed, divided by its spread), over
    ``q_min <= |q| <= q_max``: the Pearson correlation of the shell z-scores (each voxel's shell mean and
    spread interpolated at its own ``|q|``, so a steep fall-off inside one shell does not count).

    Args:
        I_a, I_b: ``(n, n, n)`` intensities on the same centred odd grid (voxel ``dq`` 1/A).
        q_max, q_min: the measured shell (1/A).
    """
    a = np.sqrt(np.clip(np.asarray(I_a, dtype=np.float64), 0.0, None))
    b = np.sqrt(np.clip(np.asarray(I_b, dtype=np.float64), 0.0, None))
    if a.shape != b.shape or a.ndim != 3 or len(set(a.shape)) != 1:
        raise ValueError(f"expected two cubes of one shape (n, n, n), got {a.shape} and {b.shape}")
    r = radial_index(a.shape[0]) * float(dq)
    use = (r <= q_max * (1 + 1e-9)) & (r >= q_min)
    shell = np.floor(r / float(dq) + 0.5).astype(np.int64)[use]
    va, vb = a[use], b[use]
    cnt = np.maximum(np.bincount(shell), 1)
    rv = r[use]
    r_mean = np.bincount(shell, weights=rv) / cnt
    filled = np.bincount(shell) > 0

    def standardise(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # the shell mean interpolated at each voxel's own |q|: a steep radial fall-off varies inside a shell
        m = np.bincount(shell, weights=v) / cnt
        v = v - np.interp(rv, r_mean[filled], m[filled])
        sd = np.sqrt(np.bincount(shell, weights=v**2) / cnt)
        return v, np.interp(rv, r_mean[filled], sd[filled])

    va, sa = standardise(va)
    vb, sb = standardise(vb)
    ok = (sa > 0) & (sb > 0)
    if not ok.any():
        return float("nan")
    za, zb = va[ok] / sa[ok], vb[ok] / sb[ok]
    return float((za * zb).sum() / np.sqrt((za**2).sum() * (zb**2).sum()))


@dataclass
class ReferenceComparison:
    """The result of :func:`compare_to_reference`.

    Attributes:
        speckle_corr: speckle correlation after alignment (see the module docstring).
        rotation: ``(3, 3)`` the rotation applied to the reconstruction (``rotate_volume(I_est, rotation)``).
        aligned: ``(n, n, n)`` the aligned reconstruction.
        fsc, speckle_fsc: :class:`FSCCurve` of ``sqrt(I)`` and with shell means removed.
    """

    speckle_corr: float
    rotation: np.ndarray
    aligned: np.ndarray
    fsc: FSCCurve
    speckle_fsc: FSCCurve

    def scalars(self) -> dict[str, float]:
        return {"speckle_corr": self.speckle_corr,
                "intensity_fsc_res_nm_0.5": self.fsc.resolution_nm(0.5),
                "speckle_fsc_res_nm_0.5": self.speckle_fsc.resolution_nm(0.5),
                "speckle_fsc_res_nm_0.143": self.speckle_fsc.resolution_nm(0.143)}


def compare_to_reference(I_est: np.ndarray, I_ref: np.ndarray, dq: float, q_max: float, q_min: float = 0.0,
                         n_rotations: int = 4000, seed: int = 0) -> ReferenceComparison:
    """Align ``I_est`` onto ``I_ref`` (same centred odd grid, voxel ``dq``) and score it.

    ``q_max``/``q_min``: the shell the data measured (1/A); voxels outside it are not scored.
    """
    I_est = np.asarray(I_est, dtype=np.float64)
    I_ref = np.asarray(I_ref, dtype=np.float64)
    if I_est.shape != I_ref.shape:
        raise ValueError(f"expected volumes of one shape, got {I_est.shape} and {I_ref.shape}")
    n = I_ref.shape[0]
    r_max = min(q_max / dq, n // 2)
    R = align_intensity_rotation(I_ref, I_est, n_rotations=n_rotations, seed=seed, r_max=r_max,
                                 r_min=max(2.0, q_min / dq))
    aligned = rotate_volume(I_est, R)
    sc = speckle_correlation(aligned, I_ref, dq, q_max, q_min)
    use = radial_index(n) * dq <= q_max
    q_last = dq * np.floor(q_max / dq)
    fsc = intensity_fsc(aligned, I_ref, dq, q_max=q_last, mask=use)
    sfsc = intensity_fsc(aligned, I_ref, dq, q_max=q_last, mask=use, speckle=True)
    return ReferenceComparison(sc, R, aligned, fsc, sfsc)
