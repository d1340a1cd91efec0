"""Tests for bayes_spi.metrics: global pose alignment (with Rz(pi) flips, outliers), correlations."""

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from scipy.spatial.transform import Rotation

from bayes_spi.metrics import (
    align_rotations,
    fluence_correlation,
    intensity_correlation,
    orientation_error_summary,
)

RZ = np.diag([-1.0, -1.0, 1.0])


def _angle_deg(A, B):
    return np.degrees(Rotation.from_matrix(np.swapaxes(A, -1, -2) @ B).magnitude())


def _planted(n=400, noise_deg=0.0, flip_frac=0.3, outlier_frac=0.1, seed=0):
    rng = np.random.default_rng(seed)
    R_true = Rotation.random(n, random_state=seed).as_matrix()
    G = Rotation.random(random_state=seed + 100).as_matrix()
    noise = Rotation.from_rotvec(rng.normal(size=(n, 3)) * np.radians(noise_deg) / np.sqrt(3)).as_matrix()
    R_est = G.T @ R_true @ noise  # R_true = G @ R_est (up to noise)
    flips = rng.random(n) < flip_frac
    R_est[flips] = R_est[flips] @ RZ
    outliers = rng.random(n) < outlier_frac
    R_est[outliers] = Rotation.random(int(outliers.sum()), random_state=seed + 200).as_matrix()
    noise_ang = _angle_deg(np.eye(3), noise)
    return R_est, R_true, G, flips, outliers, noise_ang


def test_planted_noise_free_exact_recovery():
    R_est, R_true, G, flips, outliers, _ = _planted(noise_deg=0.0)
    G_hat, err, flipped = align_rotations(R_est, R_true, modulo_rotz_pi=True)
    assert _angle_deg(G_hat, G) < 0.1
    assert _angle_deg(G_hat, G) < 1e-6
    good = ~outliers
    assert err[good].max() < 1e-5
    np.testing.assert_array_equal(flipped[good], flips[good])
    assert err[outliers].mean() > 30.0  # outliers stay outliers


def test_planted_with_noise_errors_match_noise():
    R_est, R_true, G, flips, outliers, noise_ang = _planted(noise_deg=1.0, seed=1)
    G_hat, err, flipped = align_rotations(torch.as_tensor(R_est), torch.as_tensor(R_true), modulo_rotz_pi=True)
    assert _angle_deg(G_hat, G) < 0.25
    good = ~outliers
    np.testing.assert_array_equal(flipped[good], flips[good])
    assert np.abs(err[good] - noise_ang[good]).max() < 0.4
    assert abs(np.median(err[good]) - np.median(noise_ang[good])) < 0.1


def test_raw_versus_modulo_figures():
    R_est, R_true, G, flips, outliers, noise_ang = _planted(noise_deg=1.0, seed=2)
    s = orientation_error_summary(R_est, R_true)
    # raw alignment still finds G from the ~63% unflipped inliers, flipped images are ~180 deg off
    assert _angle_deg(s["G"], G) < 0.5
    good = ~outliers
    assert np.all(s["errors_deg"][good & flips] > 170.0)
    assert s["median_error_deg"] < 3.0
    assert s["mean_error_deg"] > 60.0
    assert s["median_error_mod_rotz_pi_deg"] < 2.0
    assert s["mean_error_mod_rotz_pi_deg"] < 15.0
    assert s["mean_error_mod_rotz_pi_deg"] < s["mean_error_deg"]
    assert np.all(s["errors_mod_rotz_pi_deg"] <= s["errors_deg"] + 1e-9) or _angle_deg(s["G"], s["G_mod_rotz_pi"]) < 0.5
    expected = np.mean(flips[good]) * good.mean()
    assert abs(s["wrong_mode_fraction"] - expected) < 0.5 * outliers.mean() + 1e-9
    assert s["errors_deg"].shape == s["errors_mod_rotz_pi_deg"].shape == s["flipped"].shape == (len(R_est),)


def test_flipped_majority_raw_alignment_keeps_errors_large():
    # with modulo_rotz_pi False, flipping every estimate cannot be undone by a global left factor
    R_est, R_true, _, _, _, _ = _planted(n=200, noise_deg=0.0, flip_frac=0.5, outlier_frac=0.0, seed=3)
    _, err_raw, flipped = align_rotations(R_est, R_true)
    assert not flipped.any()
    assert np.all((err_raw < 1e-5) | (err_raw > 179.9))  # G found exactly; flipped images 180 deg off
    assert np.mean(err_raw) > 60.0


def test_random_poses_mean_error_is_haar_mean():
    # exact mean of the Haar angle distribution: int_0^pi t (1 - cos t) / pi dt = pi/2 + 2/pi
    mean_haar = np.degrees(integrate.quad(lambda t: t * (1 - np.cos(t)) / np.pi, 0, np.pi)[0])
    assert abs(mean_haar - 126.5) < 0.1
    n = 3000
    R_est = Rotation.random(n, random_state=10).as_matrix()
    R_true = Rotation.random(n, random_state=11).as_matrix()
    s = orientation_error_summary(R_est, R_true)
    # the best global G can only fit noise: a bias of a few degrees at most
    assert abs(s["mean_error_deg"] - mean_haar) < 3.0
    assert s["mean_error_mod_rotz_pi_deg"] < s["mean_error_deg"] - 10.0
    assert 0.3 < s["wrong_mode_fraction"] < 0.7


def test_align_rotations_bad_shapes():
    R = Rotation.random(5, random_state=0).as_matrix()
    with pytest.raises(ValueError, match="expected"):
        align_rotations(R[:, :2], R[:, :2])
    with pytest.raises(ValueError, match="expected"):
        align_rotations(R, R[:4])


def test_fluence_correlation():
    rng = np.random.default_rng(0)
    s = rng.lognormal(0.0, 0.5, size=500)
    assert fluence_correlation(3.7 * s, s) == pytest.approx(1.0)
    noisy = s * rng.lognormal(0.0, 0.3, size=500)
    r = fluence_correlation(torch.as_tensor(noisy), s)
    assert r == pytest.approx(stats.pearsonr(noisy, s)[0])
    assert 0.5 < r < 0.99
    assert fluence_correlation(np.exp(s), s, method="spearman") == pytest.approx(1.0)
    assert fluence_correlation(np.exp(s), s) < 0.99
    with pytest.raises(ValueError):
        fluence_correlation(s, s[:-1])
    with pytest.raises(ValueError):
        fluence_correlation(s, s, method="kendall")


def test_intensity_correlation():
    rng = np.random.default_rng(1)
    I = rng.exponential(size=(8, 8, 8))
    assert intensity_correlation(5.0 * I, I) == pytest.approx(1.0)
    J = I + rng.exponential(size=I.shape)
    np.testing.assert_allclose(intensity_correlation(J, I), np.corrcoef(J.ravel(), I.ravel())[0, 1])
    np.testing.assert_allclose(
        intensity_correlation(J, I, transform="sqrt"), np.corrcoef(np.sqrt(J).ravel(), np.sqrt(I).ravel())[0, 1]
    )
    np.testing.assert_allclose(
        intensity_correlation(J, I, transform=np.log1p), intensity_correlation(J, I, transform="log1p")
    )
    mask = np.zeros(I.shape, dtype=bool)
    mask[:4] = True
    np.testing.assert_allclose(
        intensity_correlation(torch.as_tensor(J), I, mask=mask), np.corrcoef(J[mask], I[mask])[0, 1]
    )
    with pytest.raises(ValueError):
        intensity_correlation(J, I[:4])
    with pytest.raises(ValueError):
        intensity_correlation(J, I, transform="cube")


@pytest.mark.parametrize("mirror", [np.diag([1.0, 1.0, -1.0]), np.diag([-1.0, 1.0, 1.0]), -np.eye(3)])
def test_planted_inversion_is_a_rotation_of_the_poses(mirror):
    """A mirrored reconstruction I_est(x) = I_true(M x) (M improper: a mirror plane or the inversion) is,
    by Friedel, I_true(-M x): the global rotation G = -M (proper) of the poses. The alignment recovers it
    to within 0.1 degree, and the intensities agree exactly at matched points."""
    G = -mirror if np.linalg.det(mirror) < 0 else mirror
    assert np.linalg.det(G) == pytest.approx(1.0)
    G = G @ Rotation.from_rotvec([0.2, -0.4, 0.7]).as_matrix()  # plus a planted rotation
    R_true = Rotation.random(300, random_state=7).as_matrix()
    R_est = G.T @ R_true
    G_hat, err, _ = align_rotations(R_est, R_true)
    assert _angle_deg(G_hat, G) < 0.1 and err.max() < 0.1
    # the intensity side: a centrosymmetric I (Friedel) sampled at the mirror equals it at the rotation -M
    rng = np.random.default_rng(0)
    pos = rng.normal(size=(5, 3))
    q = rng.normal(size=(50, 3))

    def intensity(x):
        return np.abs(np.exp(2j * np.pi * x @ pos.T).sum(-1)) ** 2

    np.testing.assert_allclose(intensity(q @ mirror.T), intensity(q @ (-mirror).T), rtol=1e-10)
