"""CXI reader: geometry (modular, multi-detector, centred fallback), CXI mask bits, photon energy, streaming,
photon conversion, errors; and a CXI file in the CXIDB layout fitted end to end through the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from bayes_spi.dataio.cxi import CXI_PIXEL_HAS_SIGNAL, JOULE_PER_EV, open_cxi
from bayes_spi.dataio.h5 import DataFormatError, SPIDataset
from bayes_spi.geometry import get_preset

P, D, E = 3.125e-3, 0.2, 4600.0
TILT = math.radians(10.0)
#: two modules of 16 x 32 pixels: the upper one facing the beam, the lower one tilted by 10 degrees about x,
#: 2.5 pixels apart, the beam 2.3 / 1.7 pixels off the middle
CORNERS = np.array([[2.3 * P + 16 * P, 1.7 * P + 1.25 * P + 16 * P, D], [2.3 * P + 16 * P, 1.7 * P - 1.25 * P, D]])
BASIS = np.array([[[0, -P, 0], [-P, 0, 0]], [[0, -P * math.cos(TILT), P * math.sin(TILT)], [-P, 0, 0]]])


def _flags() -> np.ndarray:
    flags = np.zeros((2, 16, 32), dtype=np.uint32)
    flags[0, 3, 4] = 0x1  # invalid
    flags[1, :, 7] = 0x200  # missing (a gap column)
    flags[0, 9, 20] = 0x4 | CXI_PIXEL_HAS_SIGNAL  # hot
    flags[0, 5, 5] = CXI_PIXEL_HAS_SIGNAL  # signal only: a good pixel
    flags[1, 2, 2] = 0x10000  # a user bit (no standard meaning): bad by default
    return flags


def write_modular(path: Path, counts: np.ndarray, *, flags: np.ndarray | None = None, energy: bool = True) -> Path:
    """A CXI file in the CXIDB modular layout: data (N, 2, 16, 32), corner_positions (2, 3), basis (2, 2, 3)."""
    with h5py.File(path, "w") as f:
        f["cxi_version"] = 160
        det = f.create_group("entry_1/instrument_1/detector_1")
        det.create_dataset("data", data=counts, chunks=(min(8, len(counts)), *counts.shape[1:]))
        det["data"].attrs["axes"] = "experiment_identifier:module_identifier:y:x"
        det["corner_positions"] = CORNERS
        det["basis_vectors"] = BASIS
        det["distance"] = D
        det["x_pixel_size"] = P
        det["y_pixel_size"] = P
        det["mask"] = _flags() if flags is None else flags
        det["module_identifier"] = np.array([b"upper", b"lower"])
        if energy:
            f["entry_1/instrument_1/source_1/energy"] = E * JOULE_PER_EV
        f["entry_1/data_1"] = h5py.SoftLink("/entry_1/instrument_1/detector_1")
    return path


def _hand_positions() -> np.ndarray:
    """Pixel centres by the CXI rule, one pixel at a time: corner + (s + 1/2) basis[0] + (f + 1/2) basis[1]."""
    out = np.zeros((32, 32, 3))
    for m in range(2):
        for s in range(16):
            for f in range(32):
                out[16 * m + s, f] = CORNERS[m] + (s + 0.5) * BASIS[m, 0] + (f + 0.5) * BASIS[m, 1]
    return out


def _hand_q(pos: np.ndarray, energy_ev: float) -> np.ndarray:
    lam = 12398.4198 / energy_ev
    k_out = pos / np.linalg.norm(pos, axis=-1, keepdims=True) / lam
    return k_out - np.array([0.0, 0.0, 1.0 / lam])


def test_modular_geometry_mask_energy_and_frames(tmp_path: Path) -> None:
    counts = np.random.default_rng(0).poisson(1.5, (20, 2, 16, 32)).astype(np.int32)
    path = write_modular(tmp_path / "a.cxi", counts)
    with open_cxi(path) as data:
        geom = data.geometry
        assert geom.kind == "positions" and data.shape == (32, 32) and data.n_patterns == 20
        assert geom.beam.photon_energy_ev == pytest.approx(E, rel=1e-12) and geom.beam.polarization == "x"
        pos = _hand_positions()
        np.testing.assert_allclose(geom.pixel_positions(), pos, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(geom.q_vectors(), _hand_q(pos, E), rtol=1e-9, atol=0)
        expected = np.ones((32, 32), dtype=bool)
        expected[3, 4] = False
        expected[16:, 7] = False
        expected[9, 20] = False
        expected[16 + 2, 2] = False
        np.testing.assert_array_equal(data.mask, expected)
        assert data.mask[5, 5]  # CXI_PIXEL_HAS_SIGNAL alone is not a defect
        # frames: the modules stacked along the rows, masked pixels 0, any order, streamed in batches
        stacked = counts.reshape(20, 32, 32)
        np.testing.assert_array_equal(data.read([7, 2, 7]), np.where(expected, stacked[[7, 2, 7]], 0))
        seen = np.concatenate([idx for idx, _ in data.iter_batches(6, shuffle=True, seed=1)])
        np.testing.assert_array_equal(np.sort(seen), np.arange(20))
        assert data.chunk_patterns == 8
    # the bad bits can be chosen: only "invalid" -> the gap column is good
    with open_cxi(path, bad_bits=0x1) as data:
        assert data.mask[16:, 7].all() and not data.mask[3, 4]


def test_multi_detector_layout_gives_the_same_geometry(tmp_path: Path) -> None:
    """Two detectors (detector_1, detector_2), each a panel with its own corner and basis, equal the modular file."""
    counts = np.random.default_rng(2).poisson(1.0, (6, 2, 16, 32)).astype(np.int32)
    modular = write_modular(tmp_path / "m.cxi", counts)
    path = tmp_path / "two.cxi"
    with h5py.File(path, "w") as f:
        for m in range(2):
            det = f.create_group(f"entry_1/instrument_1/detector_{m + 1}")
            det["data"] = counts[:, m]
            det["corner_position"] = CORNERS[m]
            det["basis_vectors"] = BASIS[m]
            det["mask"] = _flags()[m]
        f["entry_1/instrument_1/source_1/energy"] = E * JOULE_PER_EV
    with open_cxi(path) as two, open_cxi(modular) as one:
        assert two.geometry == one.geometry
        np.testing.assert_array_equal(two.read(slice(None)), one.read(slice(None)))


def test_centred_panel_from_distance_and_pixel_size(tmp_path: Path) -> None:
    """An older CXIDB file (distance and pixel sizes, no corner or basis): a panel centred on the beam with the
    CXI default axes (first data axis along -y, second along -x): the reference-32 detector turned by 180 deg."""
    ref = get_preset("reference-32")
    path = tmp_path / "old.cxi"
    counts = np.random.default_rng(3).poisson(1.0, (4, 32, 32))
    with h5py.File(path, "w") as f:
        det = f.create_group("entry_1/instrument_1/detector_1")
        det["data"] = counts.astype(np.float32)  # photon counts stored as floats
        det["distance"] = 0.2
        det["x_pixel_size"] = 0.1 / 32
        det["y_pixel_size"] = 0.1 / 32
        f["entry_1/data_1/data"] = h5py.SoftLink("/entry_1/instrument_1/detector_1/data")
    with open_cxi(path, photon_energy_ev=4600.0) as data:
        np.testing.assert_allclose(data.geometry.q_vectors(), ref.q_vectors()[::-1, ::-1], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(data.geometry.pixel_factor(), ref.pixel_factor()[::-1, ::-1], rtol=1e-9)
        np.testing.assert_array_equal(data.read([1, 3]), counts[[1, 3]])


def test_photon_converted_floats(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    photons = rng.poisson(2.0, (5, 2, 16, 32))
    adu = 7.3
    values = (photons * adu + rng.uniform(-0.4, 0.4, photons.shape) * adu).astype(np.float32)
    path = write_modular(tmp_path / "f.cxi", values)
    with open_cxi(path, adu_per_photon=adu) as data:
        np.testing.assert_array_equal(data.read(slice(None)), np.where(data.mask, photons.reshape(5, 32, 32), 0))
    with open_cxi(path) as data, pytest.raises(DataFormatError, match="whole photon counts"):
        data.read([0])


def test_errors_name_the_file_and_field(tmp_path: Path) -> None:
    counts = np.zeros((2, 2, 16, 32), dtype=np.int32)
    path = write_modular(tmp_path / "noenergy.cxi", counts, energy=False)
    with pytest.raises(DataFormatError, match=r"noenergy.cxi: field /entry_1/instrument_1/source_1/energy"):
        open_cxi(path)
    with open_cxi(path, photon_energy_ev=E) as data:
        assert data.geometry.beam.photon_energy_ev == E
    bad = write_modular(tmp_path / "mask.cxi", counts, flags=np.zeros((16, 32), dtype=np.uint32))
    with pytest.raises(DataFormatError, match=r"detector_1/mask: expected one mask of shape \(2, 16, 32\)"):
        open_cxi(bad)
    with h5py.File(tmp_path / "empty.cxi", "w") as f:
        f.create_group("entry_1")
    with pytest.raises(DataFormatError, match="entry_1/data_1/data: expected a dataset of frames"):
        open_cxi(tmp_path / "empty.cxi")
    with pytest.raises(FileNotFoundError):
        open_cxi(tmp_path / "nothing.cxi")


TINY = ["--batch-size", "16", "--epochs", "1", "--field-width", "16", "--n-heads", "1",
        "--pixels-per-pattern", "64", "--grid", "17", "--polish-iterations", "1", "--no-progress"]


def test_cxidb_file_fits_end_to_end(tmp_path: Path) -> None:
    """Patterns simulated on the CXI file's own geometry (two modules, a tilted one, a gap, a mask, an
    off-centre beam), stored in the CXIDB layout, read back exactly, and fitted from the .cxi by the CLI."""
    from bayes_spi.cli.main import cli
    from bayes_spi.infer.load import load_trained
    from bayes_spi.sim.simulate import simulate

    geometry_only = write_modular(tmp_path / "geometry.cxi", np.zeros((1, 2, 16, 32), dtype=np.int32))
    with open_cxi(geometry_only) as data:
        geometry = data.geometry
    sim = tmp_path / "sim.h5"
    simulate("2CEX", geometry, 192, sim, truth_grid=0, chunk=64, progress=False, mean_photons=1e4, seed=3,
             beamstop_radius=0.0)
    with SPIDataset(sim) as ds:
        counts = ds.read(slice(None)).astype(np.int32)
        assert ds.geometry == geometry  # the file's mask kept (beamstop off)
    cxi = write_modular(tmp_path / "run.cxi", counts.reshape(192, 2, 16, 32))
    with open_cxi(cxi) as data:
        assert data.geometry == geometry
        streamed = np.zeros_like(counts)
        for idx, batch in data.iter_batches(64, shuffle=True, seed=2):
            streamed[idx] = batch
        np.testing.assert_array_equal(streamed, counts)
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["fit", str(cxi), "-o", str(run), *TINY])
    assert result.exit_code == 0, result.output + repr(result.exception)
    for name in ("model.pt", "intensity.mrc", "posterior.h5", "metrics.csv", "config.yaml", "report.html",
                 "report/patterns.png"):
        assert (run / name).is_file(), name
    with h5py.File(run / "posterior.h5") as f:
        assert f["pose_quaternion"].shape == (192, 4) and np.isfinite(f["pose_quaternion"][()]).all()
    trained = load_trained(run)
    assert trained.geometry == geometry and trained.geometry.kind == "positions"
    assert trained.guide.encoder.assembled is not None  # the encoder sees the modules assembled in (q_x, q_y)
    # the model's pixels are the CXI file's (a float32 buffer)
    np.testing.assert_allclose(trained.model.q.reshape(-1, 3).double().numpy(), geometry.q_vectors().reshape(-1, 3),
                               rtol=1e-6, atol=1e-9)
