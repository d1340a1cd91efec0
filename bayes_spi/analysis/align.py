r"""Alignment of volumes: rotation of intensities, rotation + translation + hand of densities.

Conventions
-----------
Volumes are centred odd cubes ``(n, n, n)`` indexed ``[ix, iy, iz]``; the voxel ``i`` is at the offset
``x = i - n//2`` (in voxels; times ``dq`` or ``voxel_A`` for physical units, which cancel for rotations).

* :func:`rotate_volume` ``(vol, R)`` returns ``out(x) = vol(R^T x)``: the content is rotated by ``R``
  about the centre voxel (a feature at ``y`` moves to ``R y``).
* :func:`align_intensity_rotation` ``(I_ref, I_mov)`` returns the ``R`` that maximises the agreement of
  ``rotate_volume(I_mov, R)`` with ``I_ref``, i.e. ``I_mov(R^T x) ~= I_ref(x)``. With ``I_ref = I_true`` and
  ``I_mov = I_est`` in the pose convention of :mod:`bayes_spi.metrics` (``I_est(x) = I_true(G x)``) this
  ``R`` is the global factor ``G`` (``R_true ~= G R_est``).
* Intensities are centrosymmetric (Friedel, ``I(-q) = I(q)``; inputs are symmetrised first), so an
  improper alignment ``-R`` gives exactly the same match as ``R``: searching SO(3) covers the
  Friedel-equivalent inversions too, and the hand of the molecule cannot be seen in the intensity.
* :func:`align_density` therefore finds the rotation on the (translation-invariant) intensities
  ``|FFT(rho)|^2`` and then decides the hand (``rho(x)`` or its enantiomer ``rho(-x)``) and the translation
  in real space: ``aligned(x) = rho_mov(c + s R^T (x - t))`` with ``c`` the centre of mass of ``rho_mov``
  (offset from the box centre), ``s = -1`` for the enantiomer, ``t`` the shift (voxels).

Example:
    >>> import numpy as np
    >>> vol = np.zeros((9, 9, 9)); vol[6, 4, 4] = 1.0               # a voxel at x = (2, 0, 0)
    >>> Rz = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])           # 90 degrees about z
    >>> out = rotate_volume(vol, Rz)
    >>> np.unravel_index(out.argmax(), out.shape)                   # now at R x = (0, 2, 0)
    (np.int64(4), np.int64(6), np.int64(4))
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from scipy import ndimage, optimize
from scipy.spatial.transform import Rotation

from bayes_spi.grid import centred_index

__all__ = [
    "rotate_volume",
    "centre_of_mass",
    "intensity_features",
    "align_intensity_rotation",
    "align_density",
    "fourier_shift",
]


def _check_cube(arr: np.ndarray, name: str) -> int:
    if arr.ndim != 3 or len(set(arr.shape)) != 1 or arr.shape[0] % 2 == 0:
        raise ValueError(f"{name}: expected an odd cube (n, n, n), got shape {arr.shape}")
    return int(arr.shape[0])


def _check_rotation(R: np.ndarray) -> np.ndarray:
    rot = np.asarray(R, dtype=np.float64)
    if rot.shape != (3, 3):
        raise ValueError(f"R: expected shape (3, 3), got {rot.shape}")
    if not np.allclose(rot @ rot.T, np.eye(3), atol=1e-6) or np.linalg.det(rot) < 0:
        raise ValueError("R: expected a rotation matrix (orthogonal, det +1), got another matrix")
    return rot


def _offsets(n: int) -> np.ndarray:
    """``(n^3, 3)`` voxel offsets ``i - n//2`` in C order."""
    axis = centred_index(n)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1)
    return grid.reshape(-1, 3)


def _sample(vol: np.ndarray, points: np.ndarray, order: int, mode: str = "constant") -> np.ndarray:
    """Values of ``vol`` at offsets ``points (P, 3)`` from the centre (zero outside)."""
    c = vol.shape[0] // 2
    coords = (points + c).T
    return ndimage.map_coordinates(vol, coords, order=order, mode=mode, cval=0.0, prefilter=order > 1)


def rotate_volume(vol: np.ndarray, R: np.ndarray, dq_or_voxel: float = 1.0, order: int = 1) -> np.ndarray:
    """Rotate a centred cube about its centre voxel: ``out(x) = vol(R^T x)``.

    ``x`` is the position of a voxel relative to the centre voxel ``n//2`` (in voxels times
    ``dq_or_voxel``; the spacing cancels, it is accepted for clarity of the call site). A feature at ``y``
    in ``vol`` appears at ``R y`` in ``out``. Values from outside the cube are 0.

    Args:
        vol: ``(n, n, n)`` real volume, odd ``n``.
        R: ``(3, 3)`` rotation matrix.
        dq_or_voxel: grid spacing (1/A or A); positive.
        order: spline order of :func:`scipy.ndimage.map_coordinates` (1 = trilinear, 3 = cubic).

    Returns:
        ``(n, n, n)`` float64.
    """
    arr = np.asarray(vol, dtype=np.float64)
    n = _check_cube(arr, "vol")
    rot = _check_rotation(R)
    if not np.isfinite(dq_or_voxel) or dq_or_voxel <= 0:
        raise ValueError(f"dq_or_voxel: expected a positive number, got {dq_or_voxel!r}")
    pts = _offsets(n) @ rot  # rows: (R^T x)^T = x^T R
    return _sample(arr, pts, order).reshape(arr.shape)


def centre_of_mass(vol: np.ndarray) -> np.ndarray:
    """Periodic centre of mass of ``max(vol, 0)`` as an offset ``(3,)`` from the centre voxel (voxels).

    Uses the circular mean per axis, so a density that wraps around the box edges (as phase retrieval
    returns) is handled; values in ``[-n/2, n/2)``.
    """
    arr = np.clip(np.asarray(vol, dtype=np.float64), 0.0, None)
    n = _check_cube(arr, "vol")
    if arr.sum() <= 0:
        return np.zeros(3)
    phase = np.exp(2j * np.pi * np.arange(n) / n)
    out = np.empty(3)
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        profile = arr.sum(axis=other)
        angle = np.angle(np.sum(profile * phase))
        pos = angle * n / (2 * np.pi)  # index in (-n/2, n/2]
        out[axis] = (pos - n // 2 + n / 2) % n - n / 2
    return out


def fourier_shift(vol: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Periodic (sub-voxel) translation by a phase ramp: ``out(x) = vol(x - shift)`` (odd cube, real).

    Args:
        vol: ``(n, n, n)`` real, odd ``n`` (no Nyquist plane, so the result is real).
        shift: ``(3,)`` voxels.

    Returns:
        ``(n, n, n)`` float64; equals ``np.roll(vol, shift)`` for integer shifts.
    """
    arr = np.asarray(vol, dtype=np.float64)
    n = _check_cube(arr, "vol")
    t = np.asarray(shift, dtype=np.float64).reshape(3)
    k = np.fft.fftfreq(n)
    ramp = (
        np.exp(-2j * np.pi * k[:, None, None] * t[0])
        * np.exp(-2j * np.pi * k[None, :, None] * t[1])
        * np.exp(-2j * np.pi * k[None, None, :] * t[2])
    )
    return np.fft.ifftn(np.fft.fftn(arr) * ramp).real


def intensity_features(
    intensity: np.ndarray,
    transform: Literal["log", "sqrt"] = "log",
    r_min: float = 2.0,
    r_max: float | None = None,
    eps: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray]:
    """Feature volume for rotational alignment of an intensity.

    ``f = log(max(I, 0) + eps max(I))`` (or ``sqrt(max(I, 0))``), Friedel-symmetrised, then standardised
    shell by shell (zero mean and unit variance over each one-voxel shell), so that every resolution
    shell counts equally and the isotropic fall-off (which carries no orientation) is removed.

    Args:
        intensity: ``(n, n, n)`` centred odd cube.
        transform: ``"log"`` or ``"sqrt"``.
        r_min, r_max: radial band in voxels from the centre (default ``r_max = n//2``).
        eps: relative offset of the logarithm.

    Returns:
        ``(features (n, n, n) float64, band (n, n, n) bool)``; features are 0 outside the band.
    """
    arr = np.asarray(intensity, dtype=np.float64)
    n = _check_cube(arr, "intensity")
    arr = np.clip(arr, 0.0, None)
    arr = 0.5 * (arr + arr[::-1, ::-1, ::-1])
    if transform == "log":
        top = float(arr.max())
        f = np.log(arr + eps * (top if top > 0 else 1.0))
    elif transform == "sqrt":
        f = np.sqrt(arr)
    else:
        raise ValueError(f"transform: expected 'log' or 'sqrt', got {transform!r}")
    r = np.sqrt((_offsets(n) ** 2).sum(axis=1)).reshape(arr.shape)
    top_r = float(n // 2) if r_max is None else float(r_max)
    band = (r >= r_min) & (r <= top_r)
    shell = np.floor(r + 0.5).astype(np.int64)
    idx = shell[band]
    vals = f[band]
    count = np.bincount(idx)
    safe = np.where(count > 0, count, 1)
    mean = np.bincount(idx, weights=vals) / safe
    var = np.bincount(idx, weights=vals**2) / safe - mean**2
    std = np.sqrt(np.clip(var, 0.0, None))
    std = np.where(std > 1e-12 * (np.abs(mean) + 1.0), std, np.inf)
    out = np.zeros_like(f)
    out[band] = (vals - mean[idx]) / std[idx]
    return out, band


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else 0.0


def _corr_many(ref: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """Pearson correlation of ``ref (P,)`` with every row of ``vals (K, P)``."""
    r = ref - ref.mean()
    v = vals - vals.mean(axis=1, keepdims=True)
    den = np.sqrt((r * r).sum() * (v * v).sum(axis=1))
    return np.where(den > 0, (v @ r) / np.where(den > 0, den, 1.0), 0.0)


def align_intensity_rotation(
    I_ref: np.ndarray,
    I_mov: np.ndarray,
    n_rotations: int = 4000,
    refine: bool = True,
    *,
    seed: int = 0,
    transform: Literal["log", "sqrt"] = "log",
    r_min: float = 2.0,
    r_max: float | None = None,
    coarse_points: int = 4000,
    fine_points: int = 40000,
    top_k: int = 6,
    return_score: bool = False,
) -> np.ndarray | tuple[np.ndarray, float]:
    """Rotation ``R`` with ``I_mov(R^T x) ~= I_ref(x)`` (apply with ``rotate_volume(I_mov, R)``).

    Both intensities become :func:`intensity_features` (shell-standardised ``log I``). A coarse search
    scores ``n_rotations`` Haar-random rotations (seeded, plus the identity) on about ``coarse_points``
    voxels of a stride grid, with both feature volumes smoothed by a Gaussian of half the stride (widening
    the basin); the ``top_k`` best are refined with Nelder-Mead on a rotation-vector perturbation on the
    same coarse sample, and the best of those again on up to ``fine_points`` unsmoothed voxels. The score
    is the Pearson correlation of the features over the sampled voxels. Inversions need no separate
    search (centrosymmetric intensities, see the module docstring).

    Precision: on a 33^3 grid of 2CEX (a few thousand rotations, the default) a planted rotation is
    recovered to a fraction of a degree; the coarse grid alone is good to ~10 degrees (its spacing).

    Args:
        I_ref, I_mov: ``(n, n, n)`` intensities on the same centred odd grid.
        n_rotations: size of the coarse rotation set.
        refine: run the local refinement (otherwise return the best coarse rotation).
        seed: seed of the coarse rotation set and of the voxel subsampling.
        transform, r_min, r_max: passed to :func:`intensity_features`.
        coarse_points, fine_points: number of sampled voxels in the coarse and fine stages.
        top_k: coarse candidates refined.
        return_score: also return the final correlation.

    Returns:
        ``R (3, 3)``, or ``(R, score)`` with ``return_score``.

    Example:
        >>> from scipy.spatial.transform import Rotation
        >>> rng = np.random.default_rng(1)
        >>> x = np.arange(17) - 8.0
        >>> X, Y, Z = np.meshgrid(x, x, x, indexing="ij")
        >>> I = sum(np.exp(-((X - a) ** 2 + (Y - b) ** 2 + (Z - c) ** 2) / 4) for a, b, c in rng.uniform(-5, 5, (6, 3)))
        >>> R_true = Rotation.from_rotvec([0.3, -0.2, 0.5]).as_matrix()
        >>> R = align_intensity_rotation(I, rotate_volume(I, R_true.T, order=3), n_rotations=500)
        >>> bool(np.degrees(Rotation.from_matrix(R @ R_true.T).magnitude()) < 3)
        True
    """
    ref = np.asarray(I_ref, dtype=np.float64)
    mov = np.asarray(I_mov, dtype=np.float64)
    n = _check_cube(ref, "I_ref")
    if mov.shape != ref.shape:
        raise ValueError(f"I_mov: expected shape {ref.shape} (as I_ref), got {mov.shape}")
    if isinstance(n_rotations, bool) or int(n_rotations) != n_rotations or n_rotations < 1:
        raise ValueError(f"n_rotations: expected a positive integer, got {n_rotations!r}")
    f_ref, band = intensity_features(ref, transform, r_min, r_max)
    f_mov, _ = intensity_features(mov, transform, r_min, r_max)
    rng = np.random.default_rng(seed)
    offsets = _offsets(n)
    in_band = band.reshape(-1)
    # ---- coarse sample: a stride grid inside the band, smoothed volumes
    n_band = int(in_band.sum())
    stride = max(1, int(round((n_band / max(coarse_points, 1)) ** (1.0 / 3.0))))
    on_stride = np.all(np.mod(offsets, stride) == 0, axis=1)
    coarse_idx = np.nonzero(in_band & on_stride)[0]
    sigma = 0.5 * stride if stride > 1 else 0.0
    fr_s = ndimage.gaussian_filter(f_ref, sigma) if sigma else f_ref
    fm_s = ndimage.gaussian_filter(f_mov, sigma) if sigma else f_mov
    pts_c = offsets[coarse_idx]
    ref_c = fr_s.reshape(-1)[coarse_idx]

    def score(R: np.ndarray, pts: np.ndarray, ref_vals: np.ndarray, vol: np.ndarray) -> float:
        return _corr(ref_vals, _sample(vol, pts @ R, order=1))

    rots = Rotation.random(int(n_rotations), random_state=rng.integers(2**32)).as_matrix()
    rots = np.concatenate([np.eye(3)[None], rots])
    scores = np.empty(len(rots))
    block = max(1, 2_000_000 // max(len(pts_c), 1))
    for start in range(0, len(rots), block):
        chunk = rots[start : start + block]
        pts = np.einsum("pj,kji->kpi", pts_c, chunk).reshape(-1, 3)  # x^T R per rotation
        vals = _sample(fm_s, pts, order=1).reshape(len(chunk), -1)
        scores[start : start + len(chunk)] = _corr_many(ref_c, vals)
    order = np.argsort(-scores)
    best_R = rots[order[0]]
    best_score = float(scores[order[0]])
    if not refine:
        return (best_R, best_score) if return_score else best_R

    def refine_from(R0: np.ndarray, pts: np.ndarray, ref_vals: np.ndarray, vol: np.ndarray, step: float,
                    max_evals: int) -> tuple[np.ndarray, float]:
        def objective(v: np.ndarray) -> float:
            return -score(Rotation.from_rotvec(v).as_matrix() @ R0, pts, ref_vals, vol)

        simplex = np.vstack([np.zeros(3), step * np.eye(3)])
        res = optimize.minimize(objective, np.zeros(3), method="Nelder-Mead",
                                options={"initial_simplex": simplex, "xatol": 1e-4, "fatol": 1e-7,
                                         "maxfev": max_evals})
        return Rotation.from_rotvec(res.x).as_matrix() @ R0, -float(res.fun)

    # spacing of the coarse set ~ (8 pi^2 / N)^(1/3) rad; start the simplex at about half of it
    spacing = (8 * np.pi**2 / len(rots)) ** (1.0 / 3.0)
    candidates = []
    for k in order[: max(1, int(top_k))]:
        candidates.append(refine_from(rots[k], pts_c, ref_c, fm_s, 0.5 * spacing, 150))
    R1, _ = max(candidates, key=lambda c: c[1])
    band_idx = np.nonzero(in_band)[0]
    if len(band_idx) > fine_points:
        band_idx = np.sort(rng.choice(band_idx, size=int(fine_points), replace=False))
    pts_f = offsets[band_idx]
    ref_f = f_ref.reshape(-1)[band_idx]
    R2, s2 = refine_from(R1, pts_f, ref_f, f_mov, 0.02, 200)
    return (R2, s2) if return_score else R2


def _translation(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Shift ``t`` (voxels, sub-voxel by a parabola through the peak) maximising ``sum ref(x) cand(x - t)``."""
    n = ref.shape[0]
    xc = np.fft.ifftn(np.fft.fftn(ref) * np.conj(np.fft.fftn(cand))).real
    peak = np.array(np.unravel_index(int(np.argmax(xc)), xc.shape))
    t = peak.astype(np.float64)
    for axis in range(3):
        lo = peak.copy()
        hi = peak.copy()
        lo[axis] = (lo[axis] - 1) % n
        hi[axis] = (hi[axis] + 1) % n
        y0, y1, y2 = xc[tuple(lo)], xc[tuple(peak)], xc[tuple(hi)]
        den = y0 - 2 * y1 + y2
        if den < 0:
            t[axis] += float(np.clip(0.5 * (y0 - y2) / den, -0.5, 0.5))
    return (t + n / 2) % n - n / 2


def _resample(vol: np.ndarray, centre: np.ndarray, sign: float, R: np.ndarray, shift: np.ndarray, order: int,
              pts: np.ndarray | None = None) -> np.ndarray:
    """``vol(centre + sign R^T (x - shift))`` at the offsets ``pts`` (default: the whole cube)."""
    n = vol.shape[0]
    x = _offsets(n) if pts is None else pts
    src = centre + sign * ((x - shift) @ R)
    out = _sample(vol, src, order)
    return out.reshape(vol.shape) if pts is None else out


def align_density(
    rho_ref: np.ndarray,
    rho_mov: np.ndarray,
    voxel_A: float,
    rotation_search: bool = True,
    *,
    n_rotations: int = 4000,
    refine: bool = True,
    order: int = 3,
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Align ``rho_mov`` onto ``rho_ref``: rotation, translation and hand (enantiomer).

    1. The rotation comes from the intensities ``|FFT(rho)|^2`` (translation-invariant) with
       :func:`align_intensity_rotation`, about the centre of mass ``c`` of ``rho_mov``; skipped (``R = I``)
       when ``rotation_search=False``.
    2. For the rotated density and its enantiomer (inversion through ``c``) the translation comes from the
       peak of the FFT cross-correlation with ``rho_ref`` (sub-voxel by a parabola); the candidate with
       the larger real-space correlation wins.
    3. With ``refine`` and a rotation search, rotation and shift are polished together by Nelder-Mead on
       the real-space correlation.

    Result: ``aligned(x) = rho_mov(c + s R^T (x - t))`` (``x`` offsets from the centre voxel, ``s = -1``
    for the enantiomer), evaluated by splines of ``order`` (zero outside the box); without a rotation the
    translation is applied exactly by a Fourier phase ramp (periodic).

    Args:
        rho_ref, rho_mov: ``(n, n, n)`` real densities on the same grid (odd ``n``).
        voxel_A: voxel size, Angstrom (used to validate and report ``shift_A``).
        rotation_search: search the rotation (False: only translation and hand).
        n_rotations: coarse rotation set of :func:`align_intensity_rotation`.
        refine: local refinements (rotation search and real-space polish).
        order: spline order of the final resampling.
        seed: seed of the rotation search.

    Returns:
        ``(aligned (n, n, n) float64, info)`` with info ``{"rotation": R (3, 3), "shift_voxels": t (3,),
        "centre_voxels": c (3,), "enantiomer": bool, "correlation": float, "shift_A": t * voxel_A}``.
    """
    ref = np.asarray(rho_ref, dtype=np.float64)
    mov = np.asarray(rho_mov, dtype=np.float64)
    n = _check_cube(ref, "rho_ref")
    if mov.shape != ref.shape:
        raise ValueError(f"rho_mov: expected shape {ref.shape} (as rho_ref), got {mov.shape}")
    if not np.isfinite(voxel_A) or voxel_A <= 0:
        raise ValueError(f"voxel_A: expected a positive number, got {voxel_A!r}")
    centre = centre_of_mass(mov)
    if rotation_search:
        I_ref = np.abs(np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(ref)))) ** 2
        I_mov = np.abs(np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(mov)))) ** 2
        R = np.asarray(align_intensity_rotation(I_ref, I_mov, n_rotations=n_rotations, refine=refine, seed=seed))
    else:
        R = np.eye(3)
    zero = np.zeros(3)
    best: tuple[float, float, np.ndarray, np.ndarray] = (-np.inf, 1.0, zero, mov)
    for sign in (1.0, -1.0):
        if rotation_search:
            base = _resample(mov, centre, sign, R, zero, order)
        elif sign > 0:
            base = fourier_shift(mov, -centre)  # mov(x + c)
        else:
            base = fourier_shift(mov[::-1, ::-1, ::-1], centre)  # mov(c - x)
        t = _translation(ref, base)
        moved = fourier_shift(base, t)
        c = _corr(ref.reshape(-1), moved.reshape(-1))
        if c > best[0]:
            best = (c, sign, t, moved)
    corr, sign, shift, aligned = best
    if rotation_search:
        if refine:
            weight = ndimage.gaussian_filter(np.abs(ref) + np.abs(aligned), 1.0)
            sel = np.nonzero(weight.reshape(-1) > 0.01 * weight.max())[0]
            pts = _offsets(n)[sel]
            ref_vals = ref.reshape(-1)[sel]

            def objective(p: np.ndarray) -> float:
                Rp = R @ Rotation.from_rotvec(p[:3]).as_matrix().T
                vals = _resample(mov, centre, sign, Rp, shift + p[3:], 1, pts)
                return -_corr(ref_vals, vals)

            simplex = np.vstack([np.zeros(6), np.diag([0.03, 0.03, 0.03, 0.5, 0.5, 0.5])])
            res = optimize.minimize(objective, np.zeros(6), method="Nelder-Mead",
                                    options={"initial_simplex": simplex, "xatol": 1e-3, "fatol": 1e-8,
                                             "maxfev": 600})
            R = R @ Rotation.from_rotvec(res.x[:3]).as_matrix().T
            shift = shift + res.x[3:]
        aligned = _resample(mov, centre, sign, R, shift, order)
        corr = _corr(ref.reshape(-1), aligned.reshape(-1))
    info: dict[str, Any] = {
        "rotation": R,
        "shift_voxels": np.asarray(shift, dtype=np.float64),
        "centre_voxels": centre,
        "enantiomer": bool(sign < 0),
        "correlation": float(corr),
        "shift_A": np.asarray(shift, dtype=np.float64) * float(voxel_A),
    }
    return aligned, info
