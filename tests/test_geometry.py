"""Geometry: q vectors, Ewald sphere, solid angle, polarization, presets (closed forms)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bayes_spi.geometry import PRESETS, Beam, Detector, Geometry, get_preset

LAMBDA_4600 = 12398.4198 / 4600.0


def test_wavelength() -> None:
    assert Beam(4600.0).wavelength_A == pytest.approx(2.695309, abs=1e-6)
    assert Beam(12398.4198).wavelength_A == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["reference-128", "reference-64", "reference-32"])
def test_corner_resolution_is_797_at_detector_edge_corner(name: str) -> None:
    """7.97 A is 1/|q| at the OUTER corner of the detector (0.05 m, 0.05 m, 0.2 m), not a pixel centre."""
    geom = get_preset(name)
    two_theta = math.atan(math.hypot(0.05, 0.05) / 0.2)
    q_corner = 2 * math.sin(two_theta / 2) / LAMBDA_4600
    assert geom.q_max == pytest.approx(q_corner, rel=1e-12)
    assert geom.corner_resolution_A == pytest.approx(7.97, abs=0.01)
    # pixel centres lie strictly inside the edge corner
    assert geom.q_max_pixel_centres < geom.q_max


def test_binned_presets_match_and_keep_corner_resolution() -> None:
    ref = get_preset("reference-128")
    for factor, name in ((2, "reference-64"), (4, "reference-32")):
        binned = ref.binned(factor)
        assert binned == get_preset(name)
        assert binned.corner_resolution_A == pytest.approx(ref.corner_resolution_A, rel=1e-12)
    with pytest.raises(ValueError, match="expected a divisor"):
        ref.binned(3)


@pytest.mark.parametrize("name, fov", [("reference-128", 690.0), ("reference-64", 345.0), ("reference-32", 172.5)])
def test_field_of_view(name: str, fov: float) -> None:
    geom = get_preset(name)
    assert geom.field_of_view_A == pytest.approx(fov, abs=0.5)
    # it is 1 / (q spacing of the two central pixels along x), to small-angle accuracy
    q = geom.q_vectors()
    n = geom.detector.n_x
    dq = q[n // 2, n // 2, 0] - q[n // 2, n // 2 - 1, 0]
    assert 1.0 / dq == pytest.approx(geom.field_of_view_A, rel=1e-4)


def _independent_pixel_geometry(geom: Geometry) -> tuple[np.ndarray, np.ndarray, float]:
    det = geom.detector
    iy, ix = np.mgrid[0 : det.n_y, 0 : det.n_x]
    u = (ix - (det.n_x - 1) / 2) * det.pixel_size_m
    v = (iy - (det.n_y - 1) / 2) * det.pixel_size_m
    return u, v, det.distance_m


def test_q_magnitude_matches_scattering_angle() -> None:
    geom = Geometry(Beam(6000.0), Detector(40, 30, 1.7e-3, 0.15))
    u, v, d = _independent_pixel_geometry(geom)
    two_theta = np.arctan2(np.hypot(u, v), d)
    expected = 2 * np.sin(two_theta / 2) / geom.wavelength_A
    q = geom.q_vectors()
    assert q.shape == (30, 40, 3)
    np.testing.assert_allclose(np.linalg.norm(q, axis=-1), expected, rtol=1e-12, atol=1e-15)
    # direction: q_x along ix, q_y along iy
    assert q[0, -1, 0] > 0 and q[-1, 0, 1] > 0 and q[0, -1, 1] < 0


def test_q_on_ewald_sphere_and_friedel_pair_structure() -> None:
    geom = get_preset("reference-64")
    q = geom.q_vectors()
    lam = geom.wavelength_A
    np.testing.assert_allclose(np.linalg.norm(q + geom.k_in, axis=-1), 1 / lam, rtol=1e-13)
    flipped = q[::-1, ::-1]
    np.testing.assert_allclose(flipped[..., :2], -q[..., :2], atol=1e-15)
    np.testing.assert_allclose(flipped[..., 2], q[..., 2], rtol=1e-12)
    assert np.all(q[..., 2] <= 0)


def test_solid_angle_sums_to_exact_angular_area() -> None:
    for geom in (get_preset("reference-32"), Geometry(Beam(5000.0), Detector(17, 9, 2e-3, 0.05))):
        det = geom.detector
        a, b, d = det.n_x * det.pixel_size_m, det.n_y * det.pixel_size_m, det.distance_m
        exact = 4 * math.asin(a * b / math.sqrt((a * a + 4 * d * d) * (b * b + 4 * d * d)))
        omega = geom.solid_angle()
        assert omega.shape == geom.shape
        assert omega.sum() == pytest.approx(exact, rel=1e-12)
        assert np.all(omega > 0)


def test_solid_angle_small_pixel_limit() -> None:
    geom = Geometry(Beam(5000.0), Detector(21, 21, 1e-5, 0.1))
    u, v, d = _independent_pixel_geometry(geom)
    r = np.sqrt(u * u + v * v + d * d)
    approx = (1e-5) ** 2 * d / r**3
    np.testing.assert_allclose(geom.solid_angle(), approx, rtol=1e-6)
    # a large off-axis-free detector: centre pixel is darker at the edge than at the centre
    big = get_preset("reference-32").solid_angle()
    assert big[0, 0] < big[15, 15]


def test_polarization_factors() -> None:
    base = get_preset("reference-32")
    u, v, d = _independent_pixel_geometry(base)
    r2 = u * u + v * v + d * d
    px = base.with_polarization("x").polarization_factor()
    py = base.with_polarization("y").polarization_factor()
    np.testing.assert_allclose(px, 1 - u * u / r2, rtol=1e-14)
    np.testing.assert_allclose(py, 1 - v * v / r2, rtol=1e-14)
    cos2t = d / np.sqrt(r2)
    unpol = base.with_polarization("unpolarized").polarization_factor()
    np.testing.assert_allclose(unpol, (1 + cos2t**2) / 2, rtol=1e-14)
    # unpolarized = average of two orthogonal linear polarizations
    np.testing.assert_allclose(unpol, (px + py) / 2, rtol=1e-14)
    np.testing.assert_array_equal(base.with_polarization("none").polarization_factor(), 1.0)
    # x polarization suppresses scattering along x more than along y
    assert px[16, 0] < px[0, 16]
    with pytest.raises(ValueError, match="polarization"):
        Beam(5000.0, "z")


def test_bad_preset_names_the_preset() -> None:
    with pytest.raises(ValueError, match="reference-999") as info:
        get_preset("reference-999")
    for name in PRESETS:
        assert name in str(info.value)


def test_mask_validation_good_pixels_and_dict_round_trip() -> None:
    geom = get_preset("reference-32")
    assert geom.good_pixels().all()
    with pytest.raises(ValueError, match=r"expected shape .*\(32, 32\), got \(31, 32\)"):
        geom.with_mask(np.ones((31, 32), dtype=bool))
    mask = np.ones((32, 32), dtype=bool)
    mask[3, 5] = False
    masked = geom.with_mask(mask)
    np.testing.assert_array_equal(masked.good_pixels(), mask)
    assert masked.binned(2).good_pixels().sum() == 16 * 16 - 1
    again = Geometry.from_dict(masked.to_dict(), mask=mask)
    assert again == masked and again.name == "reference-32"
    assert again != geom
    with pytest.raises(ValueError, match="photon_energy_ev"):
        Beam(-1.0)
    with pytest.raises(ValueError, match="n_x"):
        Detector(0, 3, 1e-3, 0.1)
