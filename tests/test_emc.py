"""Dragonfly's photon (.emc) and detector files against the files Dragonfly's own tools wrote
(tests/data/dragonfly, see its README): counts per pixel as Dragonfly's reader gives them, q-vectors as the
detector file's in 1/A, and clear errors for damaged files."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from bayes_spi.dataio.dragonfly_detector import (detector_geometry, ewald_radius, good_pixels, q_inverse_angstrom,
                                                 read_dragonfly_detector)
from bayes_spi.dataio.emc import HEADER_BYTES, EmcDataset, EmcFile
from bayes_spi.dataio.h5 import DataFormatError
from bayes_spi.dataio.sources import open_dataset
from bayes_spi.geometry import HC_EV_A

DATA = Path(__file__).parent / "data" / "dragonfly"
PHOTONS = [DATA / "photons_a.emc", DATA / "photons_b.emc"]
DET_H5 = DATA / "det_16x12.h5"
#: config_a.ini: detd 75 mm, pixsize 1.92 mm, lambda 2 A, detsize 16 12 (x slow)
DETD_MM, PIX_MM, LAMBDA_A, DETS_X, DETS_Y = 75.0, 1.92, 2.0, 16, 12
ENERGY = HC_EV_A / LAMBDA_A


@pytest.fixture(scope="module")
def truth() -> np.ndarray:
    return np.load(DATA / "dragonfly_reader_truth.npz")["frames"]


def test_every_frame_equals_dragonfly_reader(truth: np.ndarray) -> None:
    with EmcDataset(PHOTONS, num_pix=192) as emc:
        assert emc.num_data == 96 and [f.num_data for f in emc.files] == [64, 32]
        assert np.array_equal(emc.read_pixels(np.arange(96)), truth)
        order = np.random.default_rng(0).permutation(96)  # random access across both files, any order
        assert np.array_equal(emc.read_pixels(order), truth[order])
        assert emc.read_pixels([95]).sum() == truth[95].sum() > 0
    assert truth.max() > 1  # the multi-photon lists are exercised


def test_photons_list_file_and_reads_of_one_frame(tmp_path: Path, truth: np.ndarray,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    listing = tmp_path / "photons.txt"
    listing.write_text(f"# in_photons_list\n{PHOTONS[0]}\n\n{PHOTONS[1]}\n")
    with EmcDataset(listing) as emc:
        assert np.array_equal(emc.read_pixels([3, 64, 70]), truth[[3, 64, 70]])
        reads: list[int] = []
        pread = os.pread
        monkeypatch.setattr(os, "pread", lambda fd, n, off: reads.append(n) or pread(fd, n, off))
        f = emc.files[1]
        assert np.array_equal(emc.read_pixels([64 + 17]), truth[[81]])
        # random access reads only that frame's lists: place_ones, place_multi, count_multi
        assert sum(reads) == 4 * (f.ones[17] + 2 * f.multi[17]) and len(reads) <= 3


def test_dragonfly_hdf5_photons(truth: np.ndarray, tmp_path: Path) -> None:
    """Dragonfly's HDF5 photon file (EMCWriter's default) mixed with a binary .emc in one set."""
    with EmcDataset([PHOTONS[0], DATA / "photons_b.h5"], num_pix=192) as emc:
        assert emc.num_data == 96
        assert np.array_equal(emc.read_pixels(np.arange(96)[::-1]), truth[::-1])
        assert np.array_equal(emc.read_pixels([90, 70, 71, 72, 70]), truth[[90, 70, 71, 72, 70]])
    bad = tmp_path / "bad.h5"
    shutil.copy(DATA / "photons_b.h5", bad)
    with h5py.File(bad, "r+") as f:
        ones = f["place_ones"][3].copy()
        ones[0] = 192
        f["place_ones"][3] = ones
    with pytest.raises(DataFormatError, match=r"bad\.h5: field /place_ones: expected pixel indices in \[0, 192\), "
                                              r"got .*192 in frame 3"):
        EmcDataset(bad).read_pixels([2, 3])


def test_old_ascii_detector_without_distance(tmp_path: Path) -> None:
    """The old ASCII format (first line num_pix only): q still converts; the layout needs the shape."""
    lines = (DATA / "det_16x12.dat").read_text().splitlines()
    old = tmp_path / "old.dat"
    old.write_text("\n".join(["192", *lines[1:]]) + "\n")
    det = read_dragonfly_detector(old)
    assert det.detd is None and det.ewald_rad is None
    with pytest.raises(ValueError, match="give the image shape"):
        detector_geometry(det, photon_energy_ev=ENERGY)
    geometry, layout = detector_geometry(det, photon_energy_ev=ENERGY, shape=(12, 16))
    assert geometry.kind == "q"
    expected = _expected_q(DATA / "det_16x12.dat")[layout.index]
    assert np.allclose(geometry.q_vectors(), expected, rtol=1e-9, atol=0)


def test_dense_emc_types(tmp_path: Path, truth: np.ndarray) -> None:
    """Dragonfly's dense int32 (type 1) and float64 (type 2) files read like the sparse one."""
    for type_word, dtype in ((1, "<i4"), (2, "<f8")):
        path = tmp_path / f"dense{type_word}.emc"
        header = np.zeros(HEADER_BYTES // 4, dtype="<i4")
        header[:3] = (96, 192, type_word)
        path.write_bytes(header.tobytes() + truth.astype(dtype).tobytes())
        f = EmcFile(path)
        assert np.array_equal(f.read_pixels(np.arange(96)), truth)


def _corrupt(tmp_path: Path, name: str, edit) -> Path:
    path = tmp_path / name
    shutil.copy(PHOTONS[0], path)
    words = np.fromfile(path, dtype="<i4")
    words = np.asarray(edit(words), dtype="<i4")
    path.write_bytes(words.tobytes())
    return path


def test_truncated_file_is_named(tmp_path: Path) -> None:
    cut = _corrupt(tmp_path, "cut.emc", lambda w: w[:-3])
    with pytest.raises(DataFormatError, match=r"cut\.emc: field file size: expected \d+ bytes .* got \d+ bytes "
                                              r"\(truncated\)"):
        EmcFile(cut)
    header_only = tmp_path / "short.emc"
    header_only.write_bytes(PHOTONS[0].read_bytes()[:500])
    with pytest.raises(DataFormatError, match="short.emc: field header: .* got a file of 500 bytes"):
        EmcFile(header_only)
    longer = _corrupt(tmp_path, "long.emc", lambda w: np.concatenate([w, [7]]))
    with pytest.raises(DataFormatError, match="4 trailing bytes"):
        EmcFile(longer)


def test_num_pix_mismatch(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"photons_a\.emc: field header num_pix: expected 191 .*got 192"):
        EmcDataset(PHOTONS, num_pix=191)
    other = _corrupt(tmp_path, "other.emc", lambda w: np.concatenate([w[:1], [300], w[2:]]))
    with pytest.raises(DataFormatError, match=r"other\.emc: field header num_pix: expected 192 \(the detector"):
        open_dataset([PHOTONS[0], other], detector=DET_H5, photon_energy_ev=ENERGY)


def test_bad_values_are_named(tmp_path: Path) -> None:
    emc = EmcFile(PHOTONS[0])
    base = HEADER_BYTES // 4 + 2 * emc.num_data
    first_multi = int(emc.ones_offset[-1]) + int(emc.multi_offset[-1])

    def bad_place(w: np.ndarray) -> np.ndarray:
        w = w.copy()
        w[base + int(emc.ones_offset[5])] = 5000  # first one-photon pixel of frame 5
        return w

    with pytest.raises(DataFormatError, match=r"field place_ones: expected pixel indices in \[0, num_pix = 192\), "
                                              r"got 5000 in frame 5"):
        EmcFile(_corrupt(tmp_path, "place.emc", bad_place)).read_pixels([5])
    frame = int(np.argmax(emc.multi > 0))

    def bad_count(w: np.ndarray) -> np.ndarray:
        w = w.copy()
        w[base + first_multi + int(emc.multi_offset[frame])] = -4
        return w

    with pytest.raises(DataFormatError, match=rf"field count_multi: expected photon counts >= 1, got -4 in frame "
                                              rf"{frame}"):
        EmcFile(_corrupt(tmp_path, "count.emc", bad_count)).read_pixels([frame])

    def bad_length(w: np.ndarray) -> np.ndarray:
        w = w.copy()
        w[HEADER_BYTES // 4 + 2] = -1  # ones[2]
        return w

    with pytest.raises(DataFormatError, match="field ones: expected non-negative pixel counts per frame, got -1 at frame 2"):
        EmcFile(_corrupt(tmp_path, "len.emc", bad_length))


def _expected_q(det_path: Path) -> np.ndarray:
    """The file's q in 1/A from config_a.ini, independently of the reader: Dragonfly's make_detector scales
    q by qscaling = 1 / (lambda q_sep), q_sep = 2 sin(atan(p / D) / 2) / lambda * D / (ewald_rad p)."""
    with h5py.File(DET_H5, "r") as f:
        ewald_rad = float(f["ewald_rad"][()])
    if det_path.suffix == ".dat":
        raw = np.loadtxt(det_path, skiprows=1)[:, :3]
    else:
        with h5py.File(det_path, "r") as f:
            raw = np.stack([f[k][()] for k in ("qx", "qy", "qz")], axis=1)
    q_sep = 2 * math.sin(0.5 * math.atan(PIX_MM / DETD_MM)) / LAMBDA_A * (DETD_MM / ewald_rad / PIX_MM)
    return raw * q_sep


@pytest.mark.parametrize("name", ["det_16x12.h5", "det_16x12.dat", "det_16x12_offcentre.dat"])
def test_q_vectors_equal_the_detector_files(name: str) -> None:
    det = read_dragonfly_detector(DATA / name)
    expected = _expected_q(DATA / name)
    q = q_inverse_angstrom(det, LAMBDA_A)
    rel = np.linalg.norm(q - expected, axis=1) / np.maximum(np.linalg.norm(expected, axis=1), 1e-300)
    assert rel.max() < 1e-9
    assert abs(ewald_radius(det) * LAMBDA_A * (2 * math.sin(0.5 * math.atan(PIX_MM / DETD_MM)) / LAMBDA_A)
               * (DETD_MM / PIX_MM) / det.ewald_rad - 1) < 1e-12
    geometry, layout = detector_geometry(det, photon_energy_ev=ENERGY)
    # the image's pixel (iy, ix) holds Dragonfly pixel layout.index[iy, ix]; its q is the file's
    q_img = geometry.q_vectors()
    exp_img = expected[layout.index]
    rel = np.linalg.norm(q_img - exp_img, axis=-1) / np.maximum(np.linalg.norm(exp_img, axis=-1), 1e-300)
    assert rel.max() < 1e-9
    assert layout.shape == (DETS_Y, DETS_X) and layout.complete


def test_square_grid_becomes_the_flat_geometry() -> None:
    det = read_dragonfly_detector(DET_H5)
    geometry, layout = detector_geometry(det, photon_energy_ev=ENERGY)
    assert geometry.kind == "grid" and geometry.beam.polarization == "x"
    assert geometry.shape == (12, 16)
    assert geometry.detector.distance_m / geometry.detector.pixel_size_m == pytest.approx(DETD_MM / PIX_MM, rel=1e-12)
    # make_detector's order: pixel t = x * dets_y + y, x slow -> image [iy, ix]
    assert np.array_equal(layout.index, np.arange(192).reshape(DETS_X, DETS_Y).T)
    # exact pixel solid angle x polarization vs Dragonfly's small-pixel corr (same up to O((p/D)^2))
    ratio = geometry.pixel_factor() / det.corr[layout.index]
    assert np.abs(ratio / ratio.mean() - 1).max() < 2e-3
    # mask: Dragonfly 0 and 1 good, 2 (beam stop) bad; with keep_mask_1=False only 0
    assert geometry.good_pixels().sum() == (det.raw_mask < 2).sum() == 188
    strict, _ = detector_geometry(det, photon_energy_ev=ENERGY, keep_mask_1=False)
    assert np.array_equal(strict.good_pixels(), (det.raw_mask == 0)[layout.index])
    assert np.array_equal(good_pixels(det, keep_mask_1=False), det.raw_mask == 0)
    ascii_geometry, _ = detector_geometry(read_dragonfly_detector(DATA / "det_16x12.dat"), photon_energy_ev=ENERGY)
    assert ascii_geometry == geometry


def test_off_centre_beam_becomes_a_per_pixel_geometry() -> None:
    det = read_dragonfly_detector(DATA / "det_16x12_offcentre.dat")
    geometry, layout = detector_geometry(det, photon_energy_ev=ENERGY)
    assert geometry.kind == "q"
    assert np.allclose(geometry.pixel_factor(), det.corr[layout.index], rtol=1e-15)
    # the beam hits pixel (x, y) = (6, 4): q there is 0
    assert np.linalg.norm(geometry.q_vectors()[4, 6]) < 1e-15


def test_panels_with_a_gap_are_laid_out_by_position(tmp_path: Path) -> None:
    """A pixel list with a missing column (two panels with a gap) goes back on its grid: the gap is masked
    and its q (from its position on the detector plane) is the full detector's."""
    gapped = tmp_path / "gapped.h5"
    keep = np.arange(192) // DETS_Y != 7  # drop Dragonfly x = 7 (image column ix = 7)
    with h5py.File(DET_H5, "r") as src, h5py.File(gapped, "w") as dst:
        for name in ("qx", "qy", "qz", "corr", "mask"):
            dst[name] = src[name][()][keep]
        dst["detd"] = src["detd"][()]
        dst["ewald_rad"] = src["ewald_rad"][()]
    full, _ = detector_geometry(read_dragonfly_detector(DET_H5), photon_energy_ev=ENERGY)
    geometry, layout = detector_geometry(read_dragonfly_detector(gapped), photon_energy_ev=ENERGY)
    assert layout.how == "positions" and layout.shape == (12, 16) and not layout.complete
    assert (layout.index[:, 7] == -1).all() and (layout.index >= 0).sum() == 180
    assert geometry.kind == "q" and not geometry.good_pixels()[:, 7].any()
    assert np.array_equal(geometry.good_pixels()[:, keep.reshape(16, 12)[:, 0]],
                          full.good_pixels()[:, keep.reshape(16, 12)[:, 0]])
    assert np.allclose(geometry.q_vectors(), full.q_vectors(), rtol=1e-9, atol=1e-15)


def test_detector_errors(tmp_path: Path) -> None:
    det = read_dragonfly_detector(DET_H5)
    with pytest.raises(ValueError, match="holds no wavelength: expected the photon energy \\(--photon-energy"):
        detector_geometry(det)
    bad = tmp_path / "bad.h5"
    shutil.copy(DET_H5, bad)
    with h5py.File(bad, "r+") as f:
        mask = f["mask"][()]
        mask[7] = 3
        f["mask"][...] = mask
    with pytest.raises(DataFormatError, match=r"bad\.h5: field mask: expected values 0 \(good\), 1 .*got 3"):
        read_dragonfly_detector(bad)
    with h5py.File(bad, "r+") as f:
        del f["corr"]
    with pytest.raises(DataFormatError, match=r"field /corr: expected a dataset"):
        read_dragonfly_detector(bad)
    off = tmp_path / "off.dat"
    lines = (DATA / "det_16x12.dat").read_text().splitlines()
    parts = lines[5].split()
    parts[2] = f"{float(parts[2]) * 1.01:.15e}"  # qz of pixel 4 off the Ewald sphere
    off.write_text("\n".join([*lines[:5], " ".join(parts), *lines[6:]]) + "\n")
    with pytest.raises(DataFormatError, match="pixel 4 off it"):
        ewald_radius(read_dragonfly_detector(off))
