"""CrystFEL .geom: an AGIPD-like hand-written file (modules along dim1, asics, rotated modules, coffset, a z
component, bad regions, no_index, a mask file) against hand-computed pixel positions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from bayes_spi.dataio.crystfel import parse_vector, read_crystfel_geom
from bayes_spi.dataio.h5 import DataFormatError
from bayes_spi.geometry import get_preset

AGIPD_GEOM = Path(__file__).parent / "data" / "crystfel" / "agipd.geom"

#: the AGIPD-like geometry (written by the fixture ``write_agipd_geom`` of conftest.py with its mask.h5)
GEOM = AGIPD_GEOM.read_text()


def _hand_position(corner: tuple[float, float], fs: tuple[float, ...], ss: tuple[float, ...], f: int, s: int,
                   z0: float) -> np.ndarray:
    """Centre of pixel (f, s) of a panel, written out: (corner + (f + 1/2) fs + (s + 1/2) ss) / res, z from clen."""
    res = 5000.0
    x = (corner[0] + (f + 0.5) * fs[0] + (s + 0.5) * ss[0]) / res
    y = (corner[1] + (f + 0.5) * fs[1] + (s + 0.5) * ss[1]) / res
    z = z0 + ((f + 0.5) * fs[2] + (s + 0.5) * ss[2]) / res
    return np.array([x, y, z])


def test_positions_layout_and_q_by_hand(write_agipd_geom: Callable[..., Path]) -> None:
    cg = read_crystfel_geom(write_agipd_geom())
    geom = cg.geometry
    assert geom.kind == "positions" and geom.shape == (12, 5) and cg.data_shape == (2, 6, 5)
    assert geom.beam.photon_energy_ev == 9300.0 and cg.adu_per_ev == 0.0075
    assert cg.data_path == "/entry_1/instrument_1/detector_1/data" and [p.name for p in cg.panels][:2] == ["p0a0", "p0a1"]
    pos = geom.pixel_positions()
    # module 0, asic 1, data (ss=4, fs=3): panel pixel (f=3, s=1); layout row 0 * 6 + 4
    np.testing.assert_allclose(pos[4, 3], _hand_position((-16.9, 12.26), (0.0021, -0.9999, 0), (0.9999, 0.0021, 0),
                                                         3, 1, 0.12 + 0.0005), rtol=1e-13)
    # module 1, asic 0 (a z component along ss), data (ss=2, fs=0): layout row 1 * 6 + 2
    np.testing.assert_allclose(pos[8, 0], _hand_position((19.75, -11.5), (-0.0021, 0.9999, 0), (-0.9999, -0.0021, 0.05),
                                                         0, 2, 0.12 + 0.001), rtol=1e-13)
    # pixel edge vectors in metres
    np.testing.assert_allclose(geom.detector.ss_m[8, 0], np.array([-0.9999, -0.0021, 0.05]) / 5000, rtol=1e-14)
    lam = 12398.4198 / 9300.0
    k = pos / np.linalg.norm(pos, axis=-1, keepdims=True) / lam
    np.testing.assert_allclose(geom.q_vectors(), k - [0, 0, 1 / lam], rtol=1e-9)
    # the mask: no_index panel, the lab box, the panel region
    good = geom.good_pixels()
    assert not good[9:12].any()
    box = (pos[..., 0] * 5000 >= -20.0) & (pos[..., 0] * 5000 <= -18.5) & (pos[..., 1] * 5000 >= 10.0) & (
        pos[..., 1] * 5000 <= 13.0)
    assert box.any()
    expected = ~box
    expected[9:12] = False
    expected[6 + 1, 3:5] = False
    np.testing.assert_array_equal(good, expected)
    # frames (B, modules, ss, fs) -> the layout
    frames = np.arange(2 * 60).reshape(2, 2, 6, 5)
    np.testing.assert_array_equal(cg.frame_to_pixels(frames)[1, 6 + 4, 2], frames[1, 1, 4, 2])
    with pytest.raises(ValueError, match=r"expected shape \(B, 2, 6, 5\)"):
        cg.frame_to_pixels(frames[:, :, :5])


def test_mask_file_flags(write_agipd_geom: Callable[..., Path]) -> None:
    flags = np.zeros((2, 6, 5), np.uint16)
    flags[0, 1, 1] = 0x4
    cg = read_crystfel_geom(write_agipd_geom(flags=flags))
    assert not cg.geometry.good_pixels()[1, 1] and cg.geometry.good_pixels()[1, 2]
    # mask_good: bits that must be set (here 0x1), mask_bad none
    flags = np.ones((2, 6, 5), np.uint16)
    flags[1, 0, 0] = 0
    text = GEOM.replace("mask_good = 0x0", "mask_good = 0x1").replace("mask_bad = 0xffff", "mask_bad = 0x0")
    cg = read_crystfel_geom(write_agipd_geom(text, flags))
    assert not cg.geometry.good_pixels()[6, 0] and cg.geometry.good_pixels()[6, 1]


def test_flat_2d_layout_and_global_clen_override(tmp_path: Path) -> None:
    """A panel without a module dimension (data (ss, fs)) centred on the beam at clen: the flat grid's q."""
    from bayes_spi.geometry import Beam, Detector, Geometry

    text = ("photon_energy = 4600\nclen = /LCLS/detector_1/EncoderValue\nres = 320\n"
            "p/min_fs = 0\np/max_fs = 31\np/min_ss = 0\np/max_ss = 31\np/fs = +1x\np/ss = +1y\n"
            "p/corner_x = -16\np/corner_y = -16\n")
    path = tmp_path / "flat.geom"
    path.write_text(text)
    with pytest.raises(DataFormatError, match="p/clen: expected a camera length"):
        read_crystfel_geom(path)
    cg = read_crystfel_geom(path, clen_m=0.2)
    grid = Geometry(Beam(4600.0), Detector(32, 32, 1 / 320, 0.2))
    np.testing.assert_allclose(cg.geometry.q_vectors(), grid.q_vectors(), rtol=1e-9, atol=1e-16)
    np.testing.assert_allclose(cg.geometry.pixel_factor(), grid.pixel_factor(), rtol=1e-9)
    assert cg.data_shape == (32, 32)


def test_vectors_and_errors(tmp_path: Path, write_agipd_geom: Callable[..., Path]) -> None:
    assert parse_vector("+0.0012x -1.0000y") == (0.0012, -1.0, 0.0)
    assert parse_vector("-y +0.5z") == (0.0, -1.0, 0.5)
    assert parse_vector("1e-3x") == (0.001, 0.0, 0.0)
    with pytest.raises(ValueError, match="expected a vector"):
        parse_vector("+1.0q")
    bad = write_agipd_geom(GEOM.replace("p0a0/fs = +0.0021x -0.9999y", "p0a0/fs = sideways"))
    with pytest.raises(DataFormatError, match="agipd.geom: field p0a0/fs: expected a vector"):
        read_crystfel_geom(bad)
    bad = write_agipd_geom(GEOM.replace("p0a1/min_ss = 3", "p0a1/min_ss = 2"))
    with pytest.raises(DataFormatError, match="p0a1/min_fs..max_ss: expected panels that do not overlap"):
        read_crystfel_geom(bad)
    bad = write_agipd_geom(GEOM.replace("photon_energy = 9300 ; eV", ""))
    with pytest.raises(DataFormatError, match="field photon_energy: expected a photon energy"):
        read_crystfel_geom(bad)
    assert read_crystfel_geom(bad, photon_energy_ev=8000.0).geometry.beam.photon_energy_ev == 8000.0
    bad = write_agipd_geom(GEOM.replace("p1a1/corner_y = -11.52\n", ""))
    with pytest.raises(DataFormatError, match="p1a1/corner_y: expected a value"):
        read_crystfel_geom(bad)
    bad = write_agipd_geom(GEOM.replace("badasic/panel = p1a0", "badasic/panel = p9"))
    with pytest.raises(DataFormatError, match="badasic/panel: expected one of the panels"):
        read_crystfel_geom(bad)
    with pytest.raises(FileNotFoundError):
        read_crystfel_geom(tmp_path / "none.geom")


def test_cxi_frames_with_a_crystfel_geometry(tmp_path: Path, write_agipd_geom: Callable[..., Path]) -> None:
    """AGIPD-like frames (N, modules, ss, fs) in a CXI file without geometry fields, read with the .geom's geometry:
    the modules stacked along the rows as the .geom lays them out, the file's CXI mask combined with the .geom's."""
    from bayes_spi.dataio.cxi import open_cxi

    cg = read_crystfel_geom(write_agipd_geom())
    frames = np.random.default_rng(5).poisson(3.0, (7, 2, 6, 5)).astype(np.int16)
    flags = np.zeros((2, 6, 5), np.uint32)
    flags[0, 0, 0] = 0x8  # dead
    path = tmp_path / "agipd.cxi"
    with h5py.File(path, "w") as f:
        f["entry_1/instrument_1/detector_1/data"] = frames
        f["entry_1/instrument_1/detector_1/mask"] = flags
    with open_cxi(path, geometry=cg.geometry) as data:
        good = cg.geometry.good_pixels()
        good[0, 0] = False
        np.testing.assert_array_equal(data.mask, good)
        assert data.geometry.with_mask(None) == cg.geometry.with_mask(None)
        np.testing.assert_array_equal(data.read(slice(None)), np.where(good, cg.frame_to_pixels(frames), 0))
    with pytest.raises(ValueError, match=r"geometry: expected shape \(12, 5\).*got shape \(32, 32\)"):
        open_cxi(path, geometry=get_preset("reference-32"))
    with pytest.raises(ValueError, match="photon_energy_ev: expected none with geometry"):
        open_cxi(path, geometry=cg.geometry, photon_energy_ev=9300.0)
