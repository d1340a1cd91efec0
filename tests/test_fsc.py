"""Fourier shell correlation, resolution, and volume alignment (bayes_spi.analysis.fsc / .align)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from bayes_spi.analysis import (
    FSCCurve,
    align_density,
    align_intensity_rotation,
    centre_of_mass,
    density_fsc,
    fourier_shift,
    intensity_fsc,
    resolution_at,
    rotate_volume,
    shell_correlation,
)
from bayes_spi.sim.structure import Structure, load_structure
from bayes_spi.sim.transform import intensity_on_grid

Q_MAX = 0.1254787488545127  # q_max of the reference-* detector presets, 1/A


def _blobs(n: int, centres: np.ndarray, widths: np.ndarray, amps: np.ndarray) -> np.ndarray:
    """Sum of Gaussians; ``centres`` ``(K, 3)`` in voxel offsets from the centre voxel."""
    x = np.arange(n, dtype=np.float64) - n // 2
    X, Y, Z = np.meshgrid(x, x, x, indexing="ij")
    out = np.zeros((n, n, n))
    for c, w, a in zip(centres, widths, amps):
        out += a * np.exp(-((X - c[0]) ** 2 + (Y - c[1]) ** 2 + (Z - c[2]) ** 2) / (2 * w**2))
    return out


def _brute_force_fsc(a: np.ndarray, b: np.ndarray, width: float, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Loop implementation of the shell correlation (shell s: (s - 1/2) w <= |q| < (s + 1/2) w; dq = 1)."""
    n = a.shape[0]
    num = np.zeros(count)
    pa = np.zeros(count)
    pb = np.zeros(count)
    nv = np.zeros(count, dtype=int)
    for i in range(n):
        for j in range(n):
            for k in range(n):
                r = np.sqrt((i - n // 2) ** 2 + (j - n // 2) ** 2 + (k - n // 2) ** 2)
                s = int(np.floor(r / width + 0.5))
                if s >= count:
                    continue
                num[s] += (a[i, j, k] * np.conj(b[i, j, k])).real
                pa[s] += abs(a[i, j, k]) ** 2
                pb[s] += abs(b[i, j, k]) ** 2
                nv[s] += 1
    return num / np.sqrt(pa * pb), nv


# ============================================================ shell correlation
def test_shell_correlation_matches_brute_force_real_and_complex() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(9, 9, 9))
    b = a + 0.7 * rng.normal(size=(9, 9, 9))
    curve = shell_correlation(a, b, dq=0.02)
    ref, nv = _brute_force_fsc(a, b, 1.0, 5)
    np.testing.assert_allclose(curve.fsc, ref, rtol=1e-12)
    np.testing.assert_array_equal(curve.n_voxels, nv)
    np.testing.assert_allclose(curve.q, 0.02 * np.arange(5))
    ca = a + 1j * rng.normal(size=a.shape)
    cb = b - 0.5j * rng.normal(size=a.shape)
    curve_c = shell_correlation(ca, cb, dq=0.02, n_shells=4)  # width 4 / 3 voxels
    ref_c, nv_c = _brute_force_fsc(ca, cb, 4.0 / 3.0, 4)
    np.testing.assert_allclose(curve_c.fsc, ref_c, rtol=1e-12)
    np.testing.assert_array_equal(curve_c.n_voxels, nv_c)
    # a constant phase factor gives cos(phi) in every shell
    phi = 0.8
    np.testing.assert_allclose(shell_correlation(ca, ca * np.exp(1j * phi), dq=1.0).fsc, np.cos(phi), rtol=1e-12)


def test_shell_correlation_limits_and_mask() -> None:
    rng = np.random.default_rng(1)
    a = rng.random((17, 17, 17))
    np.testing.assert_allclose(shell_correlation(a, 3 * a, dq=0.1).fsc, 1.0)
    np.testing.assert_allclose(shell_correlation(a, -a, dq=0.1).fsc, -1.0)
    # independent white noise: |FSC| ~ 1/sqrt(N_shell)
    x = rng.normal(size=(33, 33, 33))
    y = rng.normal(size=(33, 33, 33))
    c = shell_correlation(x, y, dq=1.0)
    big = c.n_voxels > 200
    assert np.all(np.abs(c.fsc[big]) < 5 / np.sqrt(c.n_voxels[big]))
    # all voxels with (s + 1/2) <= 8.5 counted once
    r = np.sqrt(((np.indices((17, 17, 17)) - 8) ** 2).sum(axis=0))
    assert shell_correlation(a, a, dq=0.1).n_voxels.sum() == int((r < 8.5).sum())
    # q_max cuts shells; the mask removes voxels
    assert len(shell_correlation(a, a, dq=0.1, q_max=0.4).q) == 5
    mask = r > 3.5
    masked = shell_correlation(a, a, dq=0.1, mask=mask)
    assert np.all(masked.n_voxels[:4] == 0) and np.all(np.isnan(masked.fsc[:4]))
    np.testing.assert_allclose(masked.fsc[4:], 1.0)
    with pytest.raises(ValueError, match="odd cube"):
        shell_correlation(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), dq=0.1)
    with pytest.raises(ValueError, match="b: expected shape"):
        shell_correlation(a, a[:-2, :-2, :-2], dq=0.1)
    with pytest.raises(ValueError, match="mask"):
        shell_correlation(a, a, dq=0.1, mask=mask.astype(int))


def test_intensity_fsc_is_fsc_of_sqrt_clipped() -> None:
    rng = np.random.default_rng(2)
    I_a = rng.random((11, 11, 11))
    I_b = I_a + 0.3 * rng.normal(size=I_a.shape)  # has negative values
    curve = intensity_fsc(I_a, I_b, dq=0.01)
    ref = shell_correlation(np.sqrt(I_a), np.sqrt(np.clip(I_b, 0, None)), dq=0.01)
    np.testing.assert_allclose(curve.fsc, ref.fsc, rtol=1e-12)
    np.testing.assert_allclose(intensity_fsc(I_a, 4 * I_a, dq=0.01).fsc, 1.0)


def test_density_fsc_of_a_shifted_copy_is_a_sinc() -> None:
    """A translation by d Angstrom gives FSC(q) ~= sin(2 pi q d) / (2 pi q d) (shell average of cos)."""
    n, voxel = 41, 2.0
    rho = np.zeros((n, n, n))
    rho[n // 2, n // 2, n // 2] = 1.0  # flat spectrum
    shifted = np.roll(rho, 1, axis=0)  # d = 2 A
    curve = density_fsc(rho, shifted, voxel_A=voxel)
    np.testing.assert_allclose(curve.q, np.arange(n // 2 + 1) / (n * voxel))
    x = 2 * np.pi * curve.q[3:] * voxel
    np.testing.assert_allclose(curve.fsc[3:], np.sin(x) / x, atol=0.03)
    assert curve.fsc[0] == pytest.approx(1.0)


def test_resolution_at_interpolates_and_flags() -> None:
    q = np.array([0.0, 0.01, 0.02, 0.03, 0.04])
    fsc = np.array([1.0, 0.9, 0.6, 0.3, 0.1])
    res, crossed = resolution_at(q, fsc, 0.5)
    assert crossed and res == pytest.approx(1 / (0.02 + 0.1 / 0.3 * 0.01))
    res, crossed = resolution_at(q, fsc, 0.143)
    assert crossed and res == pytest.approx(1 / (0.03 + 0.157 / 0.2 * 0.01))
    # never below: the last shell, not crossed
    res, crossed = resolution_at(q, fsc, 0.05)
    assert not crossed and res == pytest.approx(25.0)
    # NaN shells are skipped; later recovery above the threshold does not matter (first crossing)
    res, crossed = resolution_at(q, np.array([1.0, np.nan, 0.4, 0.8, 0.1]), 0.5)
    assert crossed and res == pytest.approx(1 / (0.0 + 0.5 / 0.6 * 0.02))
    curve = FSCCurve(q, fsc, np.ones(5, dtype=int))
    assert curve.resolution_nm(0.5) == pytest.approx(curve.resolution(0.5) / 10)
    assert curve.crosses(0.143) and not curve.crosses(0.05)


def test_fsc_curve_json_round_trip() -> None:
    curve = FSCCurve(np.array([0.0, 0.1, 0.2]), np.array([1.0, np.nan, 0.3]), np.array([1, 0, 30]))
    data = json.loads(json.dumps(curve.to_dict()))
    assert set(data) == {"q_inv_A", "fsc", "n_voxels"} and data["fsc"][1] is None
    back = FSCCurve.from_dict(data)
    np.testing.assert_array_equal(back.q, curve.q)
    np.testing.assert_array_equal(back.n_voxels, curve.n_voxels)
    np.testing.assert_array_equal(np.isnan(back.fsc), [False, True, False])
    assert back.fsc[2] == 0.3
    with pytest.raises(ValueError, match="n_voxels"):
        FSCCurve.from_dict({"q_inv_A": [0.0], "fsc": [1.0]})


# ============================================================ alignment
def test_rotate_volume_convention_and_reference() -> None:
    vol = np.zeros((9, 9, 9))
    vol[6, 4, 4] = 1.0  # y = (2, 0, 0)
    Rz = Rotation.from_euler("z", 90, degrees=True).as_matrix()
    out = rotate_volume(vol, Rz)
    assert np.unravel_index(out.argmax(), out.shape) == (4, 6, 4)  # R y = (0, 2, 0)
    assert out.max() == pytest.approx(1.0)
    rng = np.random.default_rng(3)
    smooth = ndimage.gaussian_filter(rng.random((15, 15, 15)), 2.0)
    R = Rotation.random(random_state=4).as_matrix()
    c = np.full(3, 7.0)
    ref = ndimage.affine_transform(smooth, R.T, offset=c - R.T @ c, order=1, mode="constant", cval=0.0)
    np.testing.assert_allclose(rotate_volume(smooth, R, dq_or_voxel=0.02), ref, atol=1e-12)
    with pytest.raises(ValueError, match="rotation"):
        rotate_volume(smooth, np.diag([1.0, 1.0, -1.0]))


def test_centre_of_mass_and_fourier_shift() -> None:
    vol = _blobs(21, np.array([[0.0, 0.0, 0.0]]), np.array([1.5]), np.array([1.0]))
    moved = fourier_shift(vol, np.array([3.0, -2.0, 0.5]))
    np.testing.assert_allclose(fourier_shift(vol, np.array([3.0, -2.0, 0.0])), np.roll(vol, (3, -2, 0), (0, 1, 2)),
                               atol=1e-12)
    np.testing.assert_allclose(centre_of_mass(moved), [3.0, -2.0, 0.5], atol=1e-6)
    # periodic: a blob straddling the box edge
    wrapped = fourier_shift(vol, np.array([10.3, 0.0, 0.0]))
    assert (centre_of_mass(wrapped)[0] - 10.3) % 21 == pytest.approx(0.0, abs=1e-6)


def test_align_intensity_rotation_recovers_planted_rotation() -> None:
    """2CEX on a 33^3 grid: the moving intensity is the exact transform of the rotated molecule.

    I_mov(y) = I_ref(R_true y); the search must return R with I_mov(R^T x) = I_ref(x), i.e. R = R_true.
    Achieved precision: ~0.05 degrees (coarse grid alone: ~3-13 degrees).
    """
    mol = load_structure("2CEX")
    I_ref, _ = intensity_on_grid(mol, 33, Q_MAX)
    R_true = Rotation.from_rotvec([0.9, -1.7, 0.6]).as_matrix()
    rotated = Structure({el: p @ R_true for el, p in mol.positions.items()}, mol.occupancies, "rotated")
    I_mov, _ = intensity_on_grid(rotated, 33, Q_MAX)
    R, score = align_intensity_rotation(I_ref, I_mov, n_rotations=2000, return_score=True)
    err = np.degrees(Rotation.from_matrix(R @ R_true.T).magnitude())
    assert err < 1.0, err
    assert score > 0.85
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-10)
    assert np.linalg.det(R) == pytest.approx(1.0)
    # inversion needs no separate search: the inverted (Friedel-mate) volume gives the same answer
    coarse = align_intensity_rotation(I_ref, I_mov, n_rotations=300, refine=False)
    coarse_inv = align_intensity_rotation(I_ref, I_mov[::-1, ::-1, ::-1], n_rotations=300, refine=False)
    np.testing.assert_allclose(coarse_inv, coarse, atol=1e-12)


@pytest.mark.parametrize("enantiomer", [False, True])
def test_align_density_rotation_translation_hand(enantiomer: bool) -> None:
    n, voxel = 33, 2.0
    rng = np.random.default_rng(0)
    centres = rng.uniform(-6, 6, (8, 3))
    widths = rng.uniform(1.0, 2.0, 8)
    amps = rng.uniform(0.5, 1.5, 8)
    ref = _blobs(n, centres, widths, amps)
    R_true = Rotation.random(random_state=3).as_matrix()
    t_true = np.array([2.3, -1.7, 0.6])
    moved_centres = centres @ R_true.T  # mov(x) = ref(R_true^T (x - t)) [or ref(-R_true^T (x - t))]
    if enantiomer:
        moved_centres = -moved_centres
    mov = _blobs(n, moved_centres + t_true, widths, amps)
    before = density_fsc(ref, mov, voxel)
    aligned, info = align_density(ref, mov, voxel, n_rotations=1500)
    curve = density_fsc(ref, aligned, voxel)
    half_nyquist = 0.25 / voxel
    assert np.all(curve.fsc[curve.q <= half_nyquist] > 0.95), curve.fsc
    assert before.fsc[3] < 0.5
    assert info["enantiomer"] is enantiomer
    assert info["correlation"] > 0.99
    # aligned(x) = mov(c + s R^T (x - t)) undoes mov(x) = ref(s R_true^T (x - t_true)): R = R_true^T
    assert np.degrees(Rotation.from_matrix(info["rotation"] @ R_true).magnitude()) < 1.0
    assert set(info) >= {"rotation", "shift_voxels", "enantiomer", "correlation"}


def test_speckle_fsc_removes_the_shell_mean_baseline() -> None:
    """Two intensities that share only the radial fall-off: the papers' sqrt(I) FSC stays high, the
    speckle FSC (shell means removed) is ~0; identical volumes score 1 either way."""
    from bayes_spi.analysis.fsc import intensity_fsc, radial_index

    rng = np.random.default_rng(5)
    n = 25
    envelope = np.exp(-radial_index(n) ** 2 / 60.0)
    I_a = envelope * rng.exponential(size=(n, n, n))
    I_b = envelope * rng.exponential(size=(n, n, n))
    plain = intensity_fsc(I_a, I_b, 0.01)
    speck = intensity_fsc(I_a, I_b, 0.01, speckle=True)
    shells = slice(3, n // 2)
    assert np.nanmin(plain.fsc[shells]) > 0.6
    assert np.nanmax(np.abs(speck.fsc[shells])) < 0.3
    np.testing.assert_allclose(intensity_fsc(I_a, I_a, 0.01, speckle=True).fsc[1:], 1.0, atol=1e-12)
    # centring equals a per-shell Pearson correlation computed by hand
    r = np.floor(radial_index(n) + 0.5).astype(int)
    a, b = np.sqrt(I_a), np.sqrt(I_b)
    for s in (4, 8):
        sel = r == s
        assert speck.fsc[s] == pytest.approx(np.corrcoef(a[sel], b[sel])[0, 1], abs=1e-10)
