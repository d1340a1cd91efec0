"""benchmarks/peer/h5_to_dragonfly.py: a bayes-spi data file -> Dragonfly's photon, detector and config files.

The detector is checked against the file Dragonfly's own ``make_detector`` wrote for the same geometry
(tests/data/dragonfly/det_16x12.h5, config_a.ini); the photons by reading them back with bayes-spi's ``.emc``
reader and through the Dragonfly source (``EmcSource``), which must give back the counts and the q-vectors.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from bayes_spi.dataio.dragonfly_detector import pixel_layout, read_dragonfly_detector
from bayes_spi.dataio.emc import EmcFile
from bayes_spi.dataio.h5 import H5Writer
from bayes_spi.dataio.sources import EmcSource
from bayes_spi.geometry import HC_EV_A, Beam, Detector, Geometry

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "dragonfly"
#: config_a.ini of Dragonfly's make_detector: detd 75 mm, pixsize 1.92 mm, lambda 2 A, detsize 16 12, stoprad 1.5
DETD_M, PIX_M, LAMBDA_A, N_X, N_Y = 0.075, 1.92e-3, 2.0, 16, 12


def _module():
    spec = importlib.util.spec_from_file_location("h5_to_dragonfly", ROOT / "benchmarks" / "peer" / "h5_to_dragonfly.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


m = _module()


def _geometry() -> tuple[Geometry, np.ndarray]:
    """config_a's detector as a bayes-spi geometry, bad pixels = Dragonfly's beam stop (mask 2)."""
    det = read_dragonfly_detector(DATA / "det_16x12.h5")
    index = pixel_layout(det, (N_Y, N_X)).index
    mask = det.raw_mask[index] < 2
    return Geometry(Beam(HC_EV_A / LAMBDA_A, "x"), Detector(N_X, N_Y, PIX_M, DETD_M, mask=mask)), det


def test_detector_equals_make_detectors_file() -> None:
    geom, det = _geometry()
    q_sep = m.dragonfly_q_sep(geom)
    arrays = m.dragonfly_detector_arrays(geom, q_sep)
    q = np.stack([arrays["qx"], arrays["qy"], arrays["qz"]], 1)
    # same pixel order, same voxel units, same mask convention (0 good, 1 corners, 2 beam stop) as make_detector
    assert np.abs(q - det.q_voxel).max() / np.abs(det.q_voxel).max() < 1e-12
    assert np.array_equal(arrays["mask"], det.raw_mask)
    assert set(np.unique(det.raw_mask)) == {0, 1, 2}
    assert arrays["detd"] == pytest.approx(det.detd, rel=1e-12)
    # exact solid angle x polarization vs make_detector's small-pixel corr: equal up to O((p/D)^2) once normalised
    ratio = arrays["corr"] / det.corr
    assert np.abs(ratio / ratio.mean() - 1).max() < 2e-3
    corners = m.dragonfly_detector_arrays(geom, q_sep, corners_orient=True)["mask"]
    assert np.array_equal(corners, np.where(det.raw_mask == 2, 2, 0))


def test_round_trip_counts_and_q(tmp_path: Path) -> None:
    geom, _ = _geometry()
    rng = np.random.default_rng(3)
    n = 37
    counts = rng.poisson(rng.gamma(0.5, 0.8, size=(n, N_Y, N_X))).astype(np.int32)  # ones and multi-photon pixels
    counts[0] = 0  # an empty frame
    assert (counts > 1).any() and (counts == 1).any()
    data = tmp_path / "tiny.h5"
    with H5Writer(data, geom, with_truth=False, chunk_patterns=8, expected_patterns=n) as w:
        w.append(counts[:20])
        w.append(counts[20:])
    out = tmp_path / "run"
    s = m.convert(data, out, num_div=3, chunk=5, progress=False)  # chunks that do not divide n
    good = geom.good_pixels()
    assert s["photons_dropped_bad_pixels"] == int(counts[:, ~good].sum()) > 0
    assert s["photons"] == int(counts[:, good].sum())
    expected = np.where(good, counts, 0)
    # our own .emc reader: frame t = ix * n_y + iy
    emc = EmcFile(out / "data" / "photons.emc")
    try:
        assert (emc.num_data, emc.num_pix, emc.kind) == (n, N_X * N_Y, "sparse")
        frames = emc.read_pixels(np.arange(n))
    finally:
        emc.close()
    assert np.array_equal(frames, expected.transpose(0, 2, 1).reshape(n, -1))
    # as a Dragonfly data set (photons + detector): the same images and geometry come back; corr is the exact
    # solid angle (not make_detector's small-pixel one), so the reader keeps it per pixel (kind "q")
    src = EmcSource(out / "data" / "photons.emc", out / "data" / "det.h5")  # wavelength from the file
    try:
        assert src.shape == (N_Y, N_X) and src.geometry.kind == "q"
        assert np.array_equal(src.read(np.arange(n)), expected)
        assert np.array_equal(src.geometry.good_pixels(), good)
        rel = np.linalg.norm(src.geometry.q_vectors() - geom.q_vectors(), axis=-1) / geom.q_magnitudes()
        assert rel.max() < 1e-9
        assert np.abs(src.geometry.pixel_factor() / geom.pixel_factor() - 1).max() < 1e-12
    finally:
        src.close()
    # the detector's q scaled back by the voxel equal ours
    det = read_dragonfly_detector(out / "data" / "det.h5")
    q_back = (det.q_voxel * s["voxel_inv_A"])[m.dragonfly_pixel_order((N_Y, N_X)).argsort()].reshape(N_Y, N_X, 3)
    assert np.abs(q_back - geom.q_vectors()).max() / geom.q_max < 1e-6
    cfg = configparser.ConfigParser()
    cfg.read(out / "config.ini")
    assert cfg["emc"]["num_div"] == "3" and cfg["emc"]["need_scaling"] == "0" and "beta" not in cfg["emc"]
    assert (out / "output").is_dir() and (out / "logs").is_dir()
    assert json.loads((out / "conversion.json").read_text())["num_orientations"] == 1380


def test_orientation_count_and_num_div_rule() -> None:
    # Dragonfly's counts (its logs: num_div 4 -> 3240 rotations; 600-cell vertices x refinements)
    assert [m.num_orientations(k) for k in (1, 4, 6, 8)] == [60, 3240, 10860, 25680]
    assert m.orientation_spacing_rad(4) == pytest.approx((8 * np.pi**2 / 3240) ** (1 / 3))
    # spacing <= 2 speckle angles 1/(D q): 156 A at q = 0.0891 1/A needs 8.2 deg -> n = 8 (8.3 deg just above, cap)
    assert m.choose_num_div(156.0, 0.0891, max_num_div=8) == 8
    assert m.choose_num_div(156.0, 0.0891, max_num_div=20) == 9
    assert np.degrees(m.orientation_spacing_rad(9)) <= np.degrees(2 / (156.0 * 0.0891)) < np.degrees(
        m.orientation_spacing_rad(8))
    with pytest.raises(ValueError, match="expected positive"):
        m.choose_num_div(0.0, 0.1)


def test_scorer_resamples_emc_voxels_onto_the_truth_grid() -> None:
    spec = importlib.util.spec_from_file_location("score_emc_h5", ROOT / "benchmarks" / "peer" / "score_emc_h5.py")
    sc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sc)
    # a linear function of q (1/A) sampled on EMC's grid is reproduced exactly on the truth grid by trilinear
    # interpolation, wherever the truth grid lies inside EMC's volume; outside it is 0
    m, v, n, dq = 21, 0.003, 9, 0.0055
    x = (np.arange(m) - m // 2) * v
    qx, qy, qz = np.meshgrid(x, x, x, indexing="ij")
    out = sc.resample_to_grid(1.0 + 3 * qx - 2 * qy + 5 * qz, v, n, dq)
    y = (np.arange(n) - n // 2) * dq
    gx, gy, gz = np.meshgrid(y, y, y, indexing="ij")
    assert np.abs(out - (1.0 + 3 * gx - 2 * gy + 5 * gz)).max() < 1e-12
    assert sc.resample_to_grid(np.ones((m, m, m)), v, 15, dq)[0, 7, 7] == 0.0  # |q| 0.0385 > EMC's 0.030


def test_dragonflys_rotation_matrix_is_the_transpose_of_the_usual_one() -> None:
    from scipy.spatial.transform import Rotation

    spec = importlib.util.spec_from_file_location("score_emc_h5", ROOT / "benchmarks" / "peer" / "score_emc_h5.py")
    sc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sc)
    q = Rotation.random(5, random_state=0).as_quat()  # scalar last
    rot = sc.dragonfly_rotations(q[:, [3, 0, 1, 2]])  # make_rot_quat of (q0, q1, q2, q3)
    assert np.allclose(rot, np.transpose(Rotation.from_quat(q).as_matrix(), (0, 2, 1)), atol=1e-12)
