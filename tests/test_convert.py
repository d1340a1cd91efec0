"""``bayes-spi convert`` and foreign files given to ``fit``/``posterior`` directly, end to end through the CLI:
Dragonfly's own files (tests/data/dragonfly) and the generic NumPy/HDF5 stack + geometry file route."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from bayes_spi.cli.main import cli
from bayes_spi.dataio.h5 import DataFormatError, SPIDataset
from bayes_spi.dataio.sources import open_dataset, read_geometry_file
from bayes_spi.geometry import HC_EV_A

DATA = Path(__file__).parent / "data" / "dragonfly"
PHOTONS = [DATA / "photons_a.emc", DATA / "photons_b.emc"]
DET_H5 = DATA / "det_16x12.h5"
ENERGY = HC_EV_A / 2.0  # config_a.ini: lambda = 2 A
#: the smallest fit of tests/test_cli_fit.py
# one exact EMC iteration on a 512-rotation grid: a tiny fit at about half the cost (no test here is about either)
TINY = ["--batch-size", "16", "--epochs", "2", "--field-width", "16", "--n-heads", "1",
        "--polish-iterations", "1", "--search-rotations", "512",
        "--pixels-per-pattern", "64", "--grid", "17", "--no-progress"]


def _invoke(args: list[str]):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Dragonfly's reader's frames (96, 192) as images (96, n_y=12, n_x=16): pixel t = ix * 12 + iy."""
    frames = np.load(DATA / "dragonfly_reader_truth.npz")["frames"]
    return frames.reshape(96, 16, 12).transpose(0, 2, 1)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("convert") / "data.h5"
    res = _invoke(["convert", *PHOTONS, "--detector", DET_H5, "--photon-energy", ENERGY, "-o", out,
                   "--chunk", "32", "--no-progress"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "96 patterns of 12x16 (grid geometry, 188 good pixels)" in res.output
    return out


def test_convert_emc_gives_dragonflys_counts(converted: Path, images: np.ndarray) -> None:
    with SPIDataset(converted) as ds:
        assert ds.n_patterns == 96 and ds.shape == (12, 16) and ds.chunk_patterns == 32
        mask = ds.mask
        assert np.array_equal(ds.read(np.arange(96)), images * mask)  # every frame, every pixel
        assert images[:, ~mask].sum() == 0  # make_data puts no photons on Dragonfly's bad (2) pixels
        assert ds.geometry.kind == "grid" and ds.geometry.beam.polarization == "x"
        assert ds.geometry.wavelength_A == pytest.approx(2.0, rel=1e-12)
        assert not ds.has_truth and ds.attrs["source_kind"] == "dragonfly-emc"
    with h5py.File(converted, "r") as f:
        counts = f["/data/counts"]
        assert counts.compression == "gzip" and counts.chunks == (32, 12, 16)
    assert not Path(str(converted) + ".tmp").exists()


def test_convert_refuses_to_overwrite(converted: Path) -> None:
    before = converted.read_bytes()
    res = _invoke(["convert", PHOTONS[1], "--detector", DET_H5, "--photon-energy", ENERGY, "-o", converted,
                   "--no-progress"])
    assert res.exit_code == 2 and "exists: expected a new file (replace it with --force)" in res.output
    assert converted.read_bytes() == before
    other = converted.with_name("b.h5")
    res = _invoke(["convert", PHOTONS[1], "--detector", DET_H5, "--wavelength", "2", "-o", other, "--no-progress"])
    assert res.exit_code == 0, res.output
    res = _invoke(["convert", PHOTONS[0], "--detector", DET_H5, "--wavelength", "2", "-o", other, "--force",
                   "--max-patterns", "10", "--no-progress"])
    assert res.exit_code == 0, res.output
    with SPIDataset(other) as ds:
        assert ds.n_patterns == 10


def test_convert_then_fit_end_to_end(converted: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = _invoke(["fit", converted, "-o", run, *TINY])
    assert res.exit_code == 0, res.output + repr(res.exception)
    with h5py.File(run / "posterior.h5", "r") as f:
        rows = {f[k].shape[0] for k in f if isinstance(f[k], h5py.Dataset) and f[k].ndim >= 1}
    assert 96 in rows
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["n_patterns"] == 96 and "source" not in cfg["data"]


def _geometry_doc(tmp_path: Path, mask: np.ndarray) -> Path:
    np.save(tmp_path / "mask.npy", mask.astype(np.uint8))
    doc = {"wavelength_A": 2.0, "distance_m": 0.075, "pixel_size_m": 1.92e-3, "polarization": "x",
           "mask": "mask.npy", "name": "dragonfly-like"}
    path = tmp_path / "geometry.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_fit_and_posterior_read_a_npy_stack_directly(converted: Path, images: np.ndarray, tmp_path: Path) -> None:
    """The generic route: counts.npy + geometry.yaml, given straight to fit and posterior."""
    with SPIDataset(converted) as ds:
        mask = ds.mask
        q_dragonfly = ds.geometry.q_vectors()
    np.save(tmp_path / "counts.npy", images.astype(np.int16))
    geometry = _geometry_doc(tmp_path, mask)
    with open_dataset(tmp_path / "counts.npy", geometry=geometry) as src:
        assert src.geometry.kind == "grid" and np.array_equal(src.mask, mask)
        # the same physics as Dragonfly's detector file, from D, p and lambda
        assert np.allclose(src.geometry.q_vectors(), q_dragonfly, rtol=1e-12, atol=1e-15)
        assert np.array_equal(src.read([5, 90]), (images * mask)[[5, 90]])
    run = tmp_path / "run"
    res = _invoke(["fit", tmp_path / "counts.npy", "--geometry", geometry, "-o", run, *TINY])
    assert res.exit_code == 0, res.output + repr(res.exception)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["source"] == {"geometry": str(geometry.resolve())}
    res = _invoke(["fit", "-o", run, "--resume", "--no-progress"])  # DATA and --geometry from config.yaml
    assert res.exit_code == 0, res.output + repr(res.exception)
    out = tmp_path / "post.nc"
    res = _invoke(["posterior", run, tmp_path / "counts.npy", "-o", out, "--draws", "4", "--no-progress"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "96 patterns x 4 draws" in res.output


def test_hdf5_stack_with_an_off_centre_beam(images: np.ndarray, tmp_path: Path) -> None:
    """FILE.h5:/path counts and a JSON geometry with the beam off the middle -> a per-pixel geometry file."""
    stack = tmp_path / "stack.h5"
    with h5py.File(stack, "w") as f:
        f.create_dataset("entry/counts", data=images.astype(np.float32), chunks=(8, 12, 16))
    doc = {"photon_energy_ev": ENERGY, "distance_m": 0.075, "pixel_size_m": 1.92e-3, "beam_center_px": [6, 4]}
    geometry = tmp_path / "geometry.json"
    geometry.write_text(json.dumps(doc))
    out = tmp_path / "data.h5"
    res = _invoke(["convert", f"{stack}:/entry/counts", "--geometry", geometry, "-o", out, "--no-progress"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    with SPIDataset(out) as ds:
        assert ds.geometry.kind == "positions"
        assert np.array_equal(ds.read(np.arange(96)), images)
        q = ds.geometry.q_vectors()
    assert np.linalg.norm(q[4, 6]) == 0.0  # the beam's pixel
    # pixel (iy, ix) = (11, 15) sits at ((15 - 6) p, (11 - 4) p, D): q = k_out - k_in
    pos = np.array([9 * 1.92e-3, 7 * 1.92e-3, 0.075])
    expected = (pos / np.linalg.norm(pos) - [0, 0, 1]) / 2.0
    assert np.allclose(q[11, 15], expected, rtol=1e-12)
    with pytest.raises(DataFormatError, match=r"geometry\.json: field beam_center_px: expected two numbers"):
        geometry.write_text(json.dumps({**doc, "beam_center_px": "middle"}))
        read_geometry_file(geometry, (12, 16))


def test_convert_a_cxi_file(images: np.ndarray, tmp_path: Path) -> None:
    """A single-panel CXI file (distance, pixel sizes, source energy in J) converts through the same command."""
    cxi = tmp_path / "run.cxi"
    with h5py.File(cxi, "w") as f:
        det = f.create_group("entry_1/instrument_1/detector_1")
        det["data"] = images.astype(np.int32)
        det["distance"] = 0.075
        det["x_pixel_size"] = det["y_pixel_size"] = 1.92e-3
        f["entry_1/instrument_1/source_1/energy"] = ENERGY * 1.602176634e-19
    out = tmp_path / "data.h5"
    res = _invoke(["convert", cxi, "-o", out, "--no-progress"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    with SPIDataset(out) as ds, open_dataset(cxi) as src:
        assert ds.n_patterns == 96 and np.array_equal(ds.read(np.arange(96)), src.read(np.arange(96)))
        assert np.array_equal(src.read(np.arange(96)), images * src.mask)
        assert ds.attrs["source_kind"] == src.kind
        assert ds.geometry.wavelength_A == pytest.approx(2.0, rel=1e-9)


def test_npy_stack_with_a_crystfel_geometry(tmp_path: Path, write_agipd_geom: Callable[..., Path]) -> None:
    """AGIPD-like data (N, modules, ss, fs) with a CrystFEL .geom (conftest's, with its mask file): modules stacked
    along the rows, the .geom's masked pixels read as 0."""
    from bayes_spi.dataio.crystfel import read_crystfel_geom

    geom = write_agipd_geom()
    counts = np.random.default_rng(0).poisson(2.0, size=(20, 2, 6, 5)).astype(np.int32)
    np.save(tmp_path / "frames.npy", counts)
    out = tmp_path / "data.h5"
    res = _invoke(["convert", tmp_path / "frames.npy", "--geometry", geom, "-o", out, "--no-progress"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    expected = read_crystfel_geom(geom).geometry
    laid_out = np.where(expected.good_pixels(), counts.reshape(20, 12, 5), 0)
    with SPIDataset(out) as ds:
        assert ds.geometry == expected and ds.shape == (12, 5) and not ds.mask.all()
        assert np.array_equal(ds.read(np.arange(20)), laid_out)
        # row 6 is module 1's first row: its pixel (ss 0, fs 0) is panel p1a0's corner + half its fs and ss steps
        by_hand = [(19.75 - 0.5 * 0.0021 - 0.5 * 0.9999) / 5000, (-11.5 + 0.5 * 0.9999 - 0.5 * 0.0021) / 5000,
                   0.12 + 0.001 + 0.5 * 0.05 / 5000]
        assert np.allclose(ds.geometry.pixel_positions()[6, 0], by_hand, rtol=1e-13, atol=0)
    cxi = tmp_path / "frames.cxi"  # the same frames in a CXI file, its geometry from the .geom
    with h5py.File(cxi, "w") as f:
        f["entry_1/data_1/data"] = counts
    with open_dataset(cxi, geometry=geom) as src:
        assert src.geometry == expected
        assert np.array_equal(src.read(np.arange(20)), laid_out)
    np.save(tmp_path / "wrong.npy", counts[:, :, :5])
    res = _invoke(["convert", tmp_path / "wrong.npy", "--geometry", geom, "-o", tmp_path / "w.h5"])
    assert res.exit_code == 1 and "expected frames of shape (2, 6, 5)" in res.output


def test_source_errors(tmp_path: Path) -> None:
    out = tmp_path / "x.h5"
    res = _invoke(["convert", PHOTONS[0], "-o", out, "--no-progress"])
    assert res.exit_code == 1 and "expected --detector FILE, got none" in res.output
    res = _invoke(["convert", PHOTONS[0], "--detector", DET_H5, "-o", out, "--no-progress"])
    assert res.exit_code == 1 and "expected the photon energy (--photon-energy EV)" in res.output
    res = _invoke(["convert", PHOTONS[0], "--detector", DET_H5, "--photon-energy", "1", "--wavelength", "2",
                   "-o", out])
    assert res.exit_code == 2 and "not both" in res.output
    res = _invoke(["fit", PHOTONS[0], "-o", tmp_path / "run", "--no-progress"])
    assert res.exit_code == 1 and "photons_a.emc: Dragonfly photons need their detector file" in res.output
    assert not out.exists() and not (tmp_path / "run" / "config.yaml").exists()
    res = _invoke(["evaluate", tmp_path / "run", "--truth", PHOTONS[0]])
    assert res.exit_code == 1 and "got Dragonfly photons (experimental data has no truth" in res.output
    np.save(tmp_path / "c.npy", np.zeros((3, 12, 16), dtype=np.int32))
    bad = tmp_path / "g.yaml"
    bad.write_text("photon_energy_ev: 6000\ndistance_m: 0.1\n")
    with pytest.raises(DataFormatError, match=r"g\.yaml: field pixel_size_m: expected a positive number, got missing"):
        open_dataset(tmp_path / "c.npy", geometry=bad)
    bad.write_text("photon_energy_ev: 6000\ndistance_m: 0.1\npixel_size_m: 1e-4\npixelsize: 3\n")
    with pytest.raises(DataFormatError, match="field pixelsize: expected only the fields"):
        open_dataset(tmp_path / "c.npy", geometry=bad)
    np.save(tmp_path / "neg.npy", -np.ones((3, 12, 16), dtype=np.int32))
    bad.write_text("photon_energy_ev: 6000\ndistance_m: 0.1\npixel_size_m: 1e-4\n")
    with pytest.raises(DataFormatError, match=r"neg\.npy: field array: expected non-negative counts, got negative "
                                              r"value in pattern index 0"):
        open_dataset(tmp_path / "neg.npy", geometry=bad).read([0])
    assert math.isfinite(ENERGY)
