"""Per-pixel detector geometry: positions (exact solid angle, polarization), q given directly, panels, format
version 2, the encoder's assembled image, and the pipeline on a per-pixel geometry."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from scipy import integrate

from bayes_spi.dataio.h5 import DataFormatError, H5Writer, SPIDataset, write_simulation
from bayes_spi.geometry import Beam, Detector, Geometry, Panel, get_preset, parallelogram_solid_angle
from bayes_spi.guides.encoder import PatternEncoder, assembly_map

LAMBDA = 12398.4198 / 4600.0


def _flat_positions(geom: Geometry) -> Geometry:
    det = geom.detector
    return Geometry.from_positions(geom.pixel_positions(), photon_energy_ev=geom.beam.photon_energy_ev,
                                   polarization=geom.beam.polarization, pixel_size_m=det.pixel_size_m,
                                   mask=geom.good_pixels())


@pytest.mark.parametrize("polarization", ["x", "y", "unpolarized", "none"])
def test_positions_of_flat_centred_detector_reproduce_the_grid(polarization: str) -> None:
    grid = Geometry(Beam(6000.0, polarization), Detector(40, 30, 1.7e-3, 0.15))
    pix = _flat_positions(grid)
    assert pix.kind == "positions" and grid.kind == "grid" and pix.shape == grid.shape
    np.testing.assert_allclose(pix.q_vectors(), grid.q_vectors(), rtol=1e-9, atol=0)
    np.testing.assert_allclose(pix.solid_angle(), grid.solid_angle(), rtol=1e-9, atol=0)
    np.testing.assert_allclose(pix.polarization_factor(), grid.polarization_factor(), rtol=1e-9, atol=0)
    np.testing.assert_allclose(pix.pixel_factor(), grid.pixel_factor(), rtol=1e-9, atol=0)
    assert pix.q_max == pytest.approx(grid.q_max, rel=1e-12)  # the outer corner of the corner pixel
    assert pix.q_inscribed == pytest.approx(grid.q_inscribed, rel=0.02)
    assert pix.field_of_view_A == pytest.approx(grid.field_of_view_A, rel=2e-3)


def _numerical_solid_angle(corner: np.ndarray, fs: np.ndarray, ss: np.ndarray) -> float:
    normal = np.cross(fs, ss)
    area = np.linalg.norm(normal)

    def integrand(t: float, s: float) -> float:
        r = corner + s * fs + t * ss
        return abs(float(r @ normal)) / float(r @ r) ** 1.5

    value, err = integrate.dblquad(integrand, 0.0, 1.0, 0.0, 1.0, epsabs=1e-14, epsrel=1e-12)
    assert err < 1e-10
    return value * 1.0 if area else 0.0


@pytest.mark.parametrize("tilt_deg, twist_deg", [(0.0, 0.0), (35.0, 0.0), (50.0, 20.0)])
def test_tilted_pixel_solid_angle_matches_integration(tilt_deg: float, twist_deg: float) -> None:
    """A large pixel close to the sample, tilted and twisted: the exact solid angle is the integral of
    ``n . r / |r|^3`` over its area (the small-pixel formula ``A cos(alpha) / r^2`` is visibly off)."""
    t, w = math.radians(tilt_deg), math.radians(twist_deg)
    size = 0.02
    fs = size * np.array([math.cos(w), math.sin(w), 0.0])
    ss = size * np.array([-math.sin(w) * math.cos(t), math.cos(w) * math.cos(t), math.sin(t)])
    centre = np.array([0.013, -0.021, 0.05])
    geom = Geometry.from_positions(centre[None, None], photon_energy_ev=8000.0, fs_m=fs, ss_m=ss)
    exact = _numerical_solid_angle(centre - fs / 2 - ss / 2, fs, ss)
    assert geom.solid_angle()[0, 0] == pytest.approx(exact, rel=1e-9)
    normal = np.cross(fs, ss)
    small = abs(centre @ normal) / np.linalg.norm(centre) ** 3
    assert abs(small / exact - 1) > 1e-3  # the test can tell the exact value from the approximation
    # polarization at the pixel centre (E along x): 1 - (x / r)^2
    assert geom.polarization_factor()[0, 0] == pytest.approx(1 - centre[0] ** 2 / (centre @ centre), rel=1e-14)


def test_solid_angles_add_up_to_the_whole_tilted_panel() -> None:
    """Pixels of a tilted panel tile it: their solid angles sum to the panel's (exact, additive)."""
    t = math.radians(25.0)
    p = 1e-3
    fs, ss = np.array([p, 0, 0]), np.array([0, p * math.cos(t), p * math.sin(t)])
    panel = Panel((-0.02, -0.01, 0.08), fs, ss, n_fs=40, n_ss=30)
    geom = Geometry.from_panels([panel], photon_energy_ev=5000.0)
    whole = parallelogram_solid_angle(np.array(panel.corner_m), 40 * fs, 30 * ss)
    assert geom.solid_angle().sum() == pytest.approx(float(whole), rel=1e-11)
    assert float(whole) == pytest.approx(_numerical_solid_angle(np.array(panel.corner_m), 40 * fs, 30 * ss), rel=1e-9)


def test_centred_square_solid_angle_closed_form() -> None:
    a, d = 0.1, 0.2
    total = parallelogram_solid_angle(np.array([-a / 2, -a / 2, d]), np.array([a, 0, 0]), np.array([0, a, 0]))
    assert float(total) == pytest.approx(4 * math.asin(a * a / (a * a + 4 * d * d)), rel=1e-13)


def test_panels_stack_along_rows_with_padding_and_masks() -> None:
    p = 2e-3
    top = Panel((0.01, 0.004, 0.1), (-p, 0, 0), (0, p, 0), n_fs=5, n_ss=3,
                mask=np.array([[1, 1, 1, 1, 0]] * 3, dtype=bool))
    bottom = Panel((0.01, -0.01, 0.1), (-p, 0, 0), (0, p, 0), n_fs=4, n_ss=2)
    geom = Geometry.from_panels([top, bottom], photon_energy_ev=4600.0)
    assert geom.shape == (5, 5)
    pos = geom.pixel_positions()
    # pixel (s, f) of a panel at corner + (f + 1/2) fs + (s + 1/2) ss
    np.testing.assert_allclose(pos[1, 2], [0.01 - 2.5 * p, 0.004 + 1.5 * p, 0.1], rtol=1e-15)
    np.testing.assert_allclose(pos[3 + 1, 3], [0.01 - 3.5 * p, -0.01 + 1.5 * p, 0.1], rtol=1e-15)
    good = geom.good_pixels()
    assert not good[:3, 4].any() and good[:3, :4].all()  # the top panel's own mask
    assert not good[3:, 4].any() and good[3:, :4].all()  # padding of the narrower bottom panel
    with pytest.raises(ValueError, match="at least one panel"):
        Geometry.from_panels([], photon_energy_ev=4600.0)


def test_from_q_geometry_and_its_limits() -> None:
    ref = get_preset("reference-32")
    geom = Geometry.from_q(ref.q_vectors(), ref.pixel_factor(), photon_energy_ev=4600.0, name="dragonfly")
    assert geom.kind == "q" and geom.beam.polarization == "none"
    np.testing.assert_array_equal(geom.q_vectors(), ref.q_vectors())
    np.testing.assert_array_equal(geom.pixel_factor(), ref.pixel_factor())
    assert geom.q_max == pytest.approx(ref.q_max_pixel_centres, rel=1e-15)
    assert geom.field_of_view_A == pytest.approx(ref.field_of_view_A, rel=2e-3)
    for call in (geom.solid_angle, geom.polarization_factor, geom.pixel_positions):
        with pytest.raises(ValueError, match="kind 'q'"):
            call()
    with pytest.raises(ValueError, match="flat grid"):
        geom.binned(2)
    with pytest.raises(ValueError, match="flat grid"):
        _ = geom.detector.pixel_size_m
    with pytest.raises(ValueError, match="already holds the polarization"):
        geom.with_polarization("y")
    # q must lie on the Ewald sphere: a missing 2 pi, or q from another energy, is refused
    with pytest.raises(ValueError, match="Ewald sphere"):
        Geometry.from_q(2 * math.pi * ref.q_vectors(), ref.pixel_factor(), photon_energy_ev=4600.0)
    with pytest.raises(ValueError, match="Ewald sphere"):
        Geometry.from_q(ref.q_vectors(), ref.pixel_factor(), photon_energy_ev=9200.0)
    with pytest.raises(ValueError, match=r"expected shape \(n_y, n_x, 3\)"):
        Geometry.from_q(ref.q_vectors()[..., :2], ref.pixel_factor(), photon_energy_ev=4600.0)
    with pytest.raises(ValueError, match="pixel_factor: expected shape"):
        Geometry.from_q(ref.q_vectors(), ref.pixel_factor()[:3], photon_energy_ev=4600.0)


def test_dict_round_trip_and_equality() -> None:
    ref = get_preset("reference-32")
    mask = np.ones(ref.shape, dtype=bool)
    mask[3, 4] = False
    pix = _flat_positions(ref).with_mask(mask)
    qgeom = Geometry.from_q(ref.q_vectors(), ref.pixel_factor(), photon_energy_ev=4600.0)
    for geom in (pix, qgeom):
        back = Geometry.from_dict({k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v
                                   for k, v in geom.to_dict().items()}, mask=geom.good_pixels())
        assert back == geom and back.kind == geom.kind
    assert pix != _flat_positions(ref)  # the mask differs
    assert Geometry.from_dict(ref.to_dict()) == ref and "kind" not in ref.to_dict()  # grid dict as before
    with pytest.raises(ValueError, match="geometry kind"):
        Geometry.from_dict({**pix.to_dict(), "kind": "hexagons"})


def test_format_version_2_round_trip(tmp_path: Path) -> None:
    ref = get_preset("reference-32")
    mask = np.ones(ref.shape, dtype=bool)
    mask[:, 15:17] = False
    shifted = Geometry.from_positions(ref.pixel_positions() + [0.004, -0.002, 0.0], photon_energy_ev=4600.0,
                                      pixel_size_m=ref.detector.pixel_size_m, mask=mask, name="shifted")
    qgeom = Geometry.from_q(ref.q_vectors(), ref.pixel_factor(), photon_energy_ev=4600.0, mask=mask)
    counts = np.random.default_rng(1).poisson(2.0, (5, 32, 32))
    for geom in (shifted, qgeom):
        path = tmp_path / f"{geom.kind}.h5"
        write_simulation(path, counts, geom)
        with h5py.File(path) as f:
            assert f.attrs["format_version"] == 2 and f["geometry"].attrs["kind"] == geom.kind
            np.testing.assert_array_equal(f["geometry/q"][()], geom.q_vectors())
            np.testing.assert_array_equal(f["geometry/pixel_factor"][()], geom.pixel_factor())
            assert ("positions_m" in f["geometry"]) == (geom.kind == "positions")
        with SPIDataset(path) as ds:
            assert ds.geometry == geom and ds.geometry.name == geom.name
            np.testing.assert_array_equal(ds.read(slice(None)), np.where(mask, counts, 0))
    # a grid geometry still writes version 1
    write_simulation(tmp_path / "grid.h5", counts, ref)
    with h5py.File(tmp_path / "grid.h5") as f:
        assert f.attrs["format_version"] == 1 and "q" not in f["geometry"]
    # a broken version-2 geometry names its field
    with h5py.File(tmp_path / "q.h5", "a") as f:
        del f["geometry/q"]
        f["geometry/q"] = np.zeros((32, 31, 3))
    with pytest.raises(DataFormatError, match=r"/geometry/q: expected shape \(32, 32, 3\)"):
        SPIDataset(tmp_path / "q.h5")


def test_version_1_file_written_by_hand_still_reads(tmp_path: Path) -> None:
    """A version-1 file as the previous release wrote it (h5py directly, no bayes-spi writer)."""
    path = tmp_path / "v1.h5"
    counts = np.arange(2 * 4 * 6, dtype=np.int32).reshape(2, 4, 6) % 5
    with h5py.File(path, "w") as f:
        f.attrs.update({"format": "bayes-spi", "format_version": 1, "software_version": "0.1.0"})
        f.create_dataset("data/counts", data=counts, chunks=(2, 4, 6), maxshape=(None, 4, 6))
        g = f.create_group("geometry")
        g.attrs.update({"name": "", "photon_energy_ev": 4600.0, "polarization": "x", "pixel_size_m": 0.002,
                        "distance_m": 0.1, "n_x": 6, "n_y": 4})
        g["mask"] = np.ones((4, 6), dtype=np.uint8)
    with SPIDataset(path) as ds:
        assert ds.geometry == Geometry(Beam(4600.0, "x"), Detector(6, 4, 0.002, 0.1)) and ds.geometry.kind == "grid"
        np.testing.assert_array_equal(ds.read([1]), counts[1:2])


def test_assembly_places_pixels_by_projected_q() -> None:
    ref = get_preset("reference-32")
    # two panels with a gap of 3 pixel rows and the beam off the middle
    p = ref.detector.pixel_size_m
    upper = Panel((16.3 * p, 18 * p, 0.2), (-p, 0, 0), (0, -p, 0), n_fs=32, n_ss=16)
    lower = Panel((16.3 * p, -1 * p, 0.2), (-p, 0, 0), (0, -p, 0), n_fs=32, n_ss=16)
    geom = Geometry.from_panels([upper, lower], photon_energy_ev=4600.0)
    q = geom.q_vectors()
    cell, size, side = assembly_map(q)
    assert size % 2 == 1
    assert side == pytest.approx(1 / geom.field_of_view_A, rel=0.02)  # one cell per pixel pitch near the beam
    rows, cols = np.divmod(cell.numpy().reshape(geom.shape), size)
    np.testing.assert_array_equal(cols, np.rint(q[..., 0] / side).astype(int) + size // 2)
    np.testing.assert_array_equal(rows, np.rint(q[..., 1] / side).astype(int) + size // 2)
    enc = PatternEncoder(*geom.shape, features=8, channels=4, pixel_q=q)
    images = torch.zeros(2, *geom.shape)
    images[0, 5, 7] = 3.0
    mask = torch.ones(geom.shape, dtype=torch.bool)
    img, cells = enc.assemble(images, mask)
    assert img.shape == (2, size, size) and cells.shape == (size, size)
    # the photon lands in the cell of its pixel's q, as the mean of the good pixels sharing that cell
    r, c = rows[5, 7], cols[5, 7]
    sharing = int(((rows == r) & (cols == c)).sum())
    assert float(img[0, r, c]) == pytest.approx(3.0 / sharing) and float(img.sum()) == pytest.approx(3.0 / sharing)
    # the gap between the panels (|q_y| around the beam row) is masked, and so is a masked pixel's lone cell
    gap_row = int(round(float(q[15, 0, 1] + q[16, 0, 1]) / 2 / side)) + size // 2
    assert not cells[gap_row].any()
    assert int(cells.sum()) == len(np.unique(cell.numpy()))
    out = enc(torch.rand(4, *geom.shape), mask)
    assert out.shape == (4, 8) and torch.isfinite(out).all()
    assert tuple(enc.pixel_mean.shape) == (size, size)


def test_fit_pieces_accept_a_per_pixel_geometry(tmp_path: Path) -> None:
    """The model and guide are built on a per-pixel geometry: the model's q and factors are the geometry's,
    the encoder assembles, the sampling report and the voxel grid use the per-pixel quantities."""
    from bayes_spi.analysis.sampling import estimate_sampling
    from bayes_spi.infer.build import build_model_and_guide, detector_tensors
    from bayes_spi.infer.config import FitConfig
    from bayes_spi.sim.simulate import simulate

    ref = get_preset("reference-32")
    tilted = Panel((16.5 * ref.detector.pixel_size_m, 15.2 * ref.detector.pixel_size_m, 0.2),
                   (-ref.detector.pixel_size_m, 0, 0),
                   (0, -ref.detector.pixel_size_m * math.cos(0.1), ref.detector.pixel_size_m * math.sin(0.1)),
                   n_fs=32, n_ss=32)
    geom = Geometry.from_panels([tilted], photon_energy_ev=4600.0)
    path = tmp_path / "pix.h5"
    simulate("2CEX", geom, 64, path, truth_grid=0, chunk=32, progress=False, mean_photons=1e4, seed=1)
    with SPIDataset(path) as ds:
        assert ds.geometry.kind == "positions"
        # the beamstop (2 pixels) is the |q| disc of 2 pixel steps
        qn = geom.q_magnitudes()
        np.testing.assert_array_equal(ds.mask, qn > 2 / geom.field_of_view_A)
        report = estimate_sampling(ds, n_patterns=64)
        assert report.q_max == pytest.approx(geom.q_max) and report.q_edge == pytest.approx(geom.q_inscribed)
        model, guide = build_model_and_guide(ds.geometry, FitConfig(n_heads=1, encoder_features=8, encoder_channels=4))
        q, factor, mask = detector_tensors(ds.geometry)
        np.testing.assert_array_equal(q.numpy(), geom.q_vectors().reshape(-1, 3))
        np.testing.assert_array_equal(factor.numpy(), geom.pixel_factor().reshape(-1))
        assert guide.encoder.assembled is not None
        post = guide.posterior(torch.as_tensor(ds.read(slice(0, 4))))
        assert post.rotations.shape[:2] == (4, guide.n_hypotheses)
