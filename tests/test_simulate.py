"""Simulation and the `bayes-spi simulate` CLI, end to end on tiny problems."""

from __future__ import annotations

import importlib
from pathlib import Path

import h5py
import re

import numpy as np
import pytest
from click.testing import CliRunner

from bayes_spi.cli.main import cli
from bayes_spi.dataio import SPIDataset, quaternions_to_rotations
from bayes_spi.geometry import get_preset
from bayes_spi.sim.fluence import CLASSICAL_ELECTRON_RADIUS_A, fluence_from_pulse, sample_jitter
from bayes_spi.sim.simulate import beamstop_mask, expected_photons, pixel_weights, random_quaternions, simulate
from bayes_spi.sim.structure import load_structure
from bayes_spi.sim.transform import molecular_transform_direct

DATA = Path(__file__).resolve().parent / "data"  # small files carried in the repository


def _run(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["simulate", *args, "--no-progress"])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def cli_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "tiny.h5"
    code, output = _run(["-o", str(out), "--geometry", "reference-32", "--n-patterns", "20", "--truth-grid", "17",
                         "--mean-photons", "1e4", "--artifacts", "FPB", "--chunk", "8", "--seed", "5"])
    assert code == 0, output
    assert "20 patterns" in output and str(out) in output
    return out


def test_cli_file_validates_and_respects_mask(cli_file: Path) -> None:
    with SPIDataset(cli_file) as ds:
        assert ds.n_patterns == 20 and ds.shape == (32, 32) and ds.has_truth
        # beam stop radius 2 px on a 32x32 grid: centre offsets (+-0.5, +-0.5), (+-0.5, +-1.5), (+-1.5, +-0.5)
        assert (~ds.mask).sum() == 12
        np.testing.assert_array_equal(ds.mask, beamstop_mask(get_preset("reference-32"), 2.0))
        with h5py.File(cli_file) as f:
            raw = f["data/counts"][()]
            assert raw.dtype == np.int32
            assert np.all(raw[:, ~ds.mask] == 0)
            assert f["simulation"].attrs["seed"] == 5 and f["simulation"].attrs["artifacts"] == "FPB"
        scales = ds.truth_scales()
        assert np.all(scales > 0) and not np.allclose(scales, 1.0)
        grid, voxel = ds.truth_intensity()
        assert grid.shape == (17, 17, 17)
        assert voxel == pytest.approx(get_preset("reference-32").q_max / 8)
        np.testing.assert_array_equal(grid, grid[::-1, ::-1, ::-1])
        assert grid.argmax() == np.ravel_multi_index((8, 8, 8), grid.shape)


def test_cli_counts_follow_the_forward_model(cli_file: Path) -> None:
    """Per-pattern totals agree with the expectation recomputed from the stored truth (Poisson tolerance)."""
    mol = load_structure("2CEX")
    with SPIDataset(cli_file) as ds:
        counts = ds.read(np.arange(20))
        good = ds.mask
        c = ds.photons_per_unit_intensity
        assert c is not None
        geom = ds.geometry
        lam = expected_photons(mol, geom.q_vectors()[good], pixel_weights(geom)[good], ds.truth_rotations(), c,
                               ds.truth_scales())
    totals = counts[:, good].sum(axis=1)
    expected = lam.sum(axis=1)
    assert np.all(np.abs(totals - expected) < 5 * np.sqrt(expected))
    # mean over patterns of the gamma = 1 expectation is near the requested 1e4 (calibration on 128 poses)
    assert np.mean(expected / ds_scales(cli_file)) == pytest.approx(1e4, rel=0.15)
    assert totals.mean() == pytest.approx(1e4, rel=0.35)


def ds_scales(path: Path) -> np.ndarray:
    with SPIDataset(path) as ds:
        return ds.truth_scales()


def test_cli_seed_reproducibility(cli_file: Path, tmp_path: Path) -> None:
    args = ["--geometry", "reference-32", "--n-patterns", "20", "--truth-grid", "17", "--chunk", "8"]
    same, other = tmp_path / "same.h5", tmp_path / "other.h5"
    assert _run(["-o", str(same), *args, "--seed", "5"])[0] == 0
    assert _run(["-o", str(other), *args, "--seed", "6"])[0] == 0
    with SPIDataset(cli_file) as a, SPIDataset(same) as b, SPIDataset(other) as c:
        np.testing.assert_array_equal(a.read(np.arange(20)), b.read(np.arange(20)))
        np.testing.assert_array_equal(a.truth_quaternions(), b.truth_quaternions())
        assert not np.array_equal(a.read(np.arange(20)), c.read(np.arange(20)))


def test_cli_errors(tmp_path: Path) -> None:
    out = str(tmp_path / "e.h5")
    code, text = _run(["-o", out, "--geometry", "reference-7"])
    assert code != 0 and "reference-7" in text and "Traceback" not in text
    code, text = _run([str(tmp_path / "missing.pdb"), "-o", out])
    assert code != 0 and "missing.pdb" in text
    mask_path = DATA / "pnccd_back_260x257_mask.byt"
    code, text = _run(["-o", out, "--mask", str(mask_path), "--n-patterns", "2"])
    assert code != 0 and "pnccd_back_260x257_mask.byt" in text and "1024 bytes" in text and "66820" in text
    bad_npy = tmp_path / "mask.npy"
    np.save(bad_npy, np.ones((16, 16), dtype=bool))
    code, text = _run(["-o", out, "--mask", str(bad_npy), "--n-patterns", "2"])
    assert code != 0 and "mask.npy" in text and "(32, 32)" in text and "(16, 16)" in text
    code, text = _run(["-o", out, "--artifacts", "FXQ"])
    assert code != 0 and "FXQ" in text
    assert not Path(out).exists() and not Path(out + ".tmp").exists()


def test_cli_user_mask_and_explicit_geometry(tmp_path: Path) -> None:
    mask = np.ones((16, 16), dtype=bool)
    mask[:, 3] = False  # a panel gap
    mask_file = tmp_path / "gap.npy"
    np.save(mask_file, mask)
    out = tmp_path / "g.h5"
    code, text = _run(["-o", str(out), "--pixels", "16", "--distance-m", "0.3", "--polarization", "unpolarized",
                       "--n-patterns", "3", "--truth-grid", "0", "--mask", str(mask_file), "--artifacts", "PB",
                       "--beamstop-radius", "0"])
    assert code == 0, text
    with SPIDataset(out) as ds:
        np.testing.assert_array_equal(ds.mask, mask)
        geom = ds.geometry
        assert geom.shape == (16, 16) and geom.detector.distance_m == 0.3
        assert geom.detector.pixel_size_m == pytest.approx(0.1 / 16) and geom.beam.polarization == "unpolarized"
        np.testing.assert_array_equal(ds.truth_scales(), 1.0)
        assert "intensity" not in h5py.File(out)["truth"]


def test_noise_free_counts_are_rounded_expectation(tmp_path: Path) -> None:
    """No artifacts + fixed poses: counts = rint(c * P * Omega * |F(R q)|^2), F by the direct sum."""
    mol = load_structure("2CEX")
    geom = get_preset("reference-32")
    quats = np.array([[1.0, 0, 0, 0], [np.cos(0.4), 0.3 * np.sin(0.4), -0.5 * np.sin(0.4), 0.0]])
    quats /= np.linalg.norm(quats, axis=1, keepdims=True)
    summary = simulate(mol, geom, 2, tmp_path / "nf.h5", artifacts="", photons_per_pulse=1e13,
                       beam_radius_nm=50.0, orientations=quats, truth_grid=0, progress=False)
    fluence = 1e13 / (np.pi * 500.0**2)
    assert summary.fluence == pytest.approx(fluence) == fluence_from_pulse(1e13, 50.0)
    c = fluence * CLASSICAL_ELECTRON_RADIUS_A**2
    q = geom.q_vectors()
    weights = geom.polarization_factor() * geom.solid_angle()
    with SPIDataset(tmp_path / "nf.h5") as ds:
        counts = ds.read([0, 1])
        assert ds.mask.all()
        rotations = ds.truth_rotations()
    for i in range(2):
        rotated = np.einsum("ij,yxj->yxi", quaternions_to_rotations(quats[i : i + 1])[0], q)
        lam = c * weights * np.abs(molecular_transform_direct(mol, rotated)) ** 2
        assert np.abs(counts[i] - np.rint(lam)).max() <= 1  # rounding ties only
        assert (counts[i] == np.rint(lam)).mean() > 0.99
    np.testing.assert_allclose(rotations, quaternions_to_rotations(quats))


def test_random_quaternions_uniform_and_jitter_means() -> None:
    rng = np.random.default_rng(0)
    rot = quaternions_to_rotations(random_quaternions(20000, rng))
    # Haar measure on SO(3): E[R] = 0 and E[trace R] = 0; each column is uniform on the sphere
    assert np.abs(rot.mean(axis=0)).max() < 0.03
    np.testing.assert_allclose((rot[:, :, 0] ** 2).mean(axis=0), 1 / 3, atol=0.02)
    g = sample_jitter("lognormal:0.3", 20000, rng)
    assert g.mean() == pytest.approx(1.0, abs=0.01) and np.log(g).std() == pytest.approx(0.3, abs=0.01)
    p = sample_jitter("pr772", 20000, rng)
    assert p.mean() == pytest.approx(1.0, abs=0.015) and p.std() == pytest.approx(0.48, abs=0.02)
    assert 0.3 < p.min() and p.max() < 2.62
    np.testing.assert_array_equal(sample_jitter("none", 4, rng), 1.0)
    with pytest.raises(ValueError, match="lognormal:SIGMA"):
        sample_jitter("gauss", 3, rng)


def test_bad_orientations_and_interrupted_run_leave_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    orients = tmp_path / "few.npy"
    np.save(orients, np.tile([1.0, 0, 0, 0], (3, 1)))
    out = tmp_path / "never.h5"
    with pytest.raises(ValueError, match=r"few\.npy.*\(>= 5, 4\).*\(3, 4\)"):
        simulate("2CEX", "reference-32", 5, out, orientations=orients, truth_grid=0, progress=False)
    assert not out.exists() and not (tmp_path / "never.h5.tmp").exists()
    # an interruption after the first chunk was written: no file at PATH, temporary removed
    # (the package attribute bayes_spi.sim.simulate is the function; fetch the module itself)
    sim_module = importlib.import_module("bayes_spi.sim.simulate")

    real = sim_module.expected_photons
    calls = {"n": 0}

    def flaky(*args: object, **kwargs: object) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 3:  # 1 = calibration, 2 = first chunk, 3 = second chunk
            raise KeyboardInterrupt
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sim_module, "expected_photons", flaky)
    with pytest.raises(KeyboardInterrupt):
        simulate("2CEX", "reference-32", 10, out, chunk=4, truth_grid=0, progress=False)
    assert calls["n"] == 3
    assert not out.exists() and not (tmp_path / "never.h5.tmp").exists()


def test_cli_reports_speckle_oversampling_and_warns_when_undersampled(tmp_path: Path) -> None:
    """2CEX (~65 A) on reference-32 (field of view 172 A) is sampled; on a detector with 4x the pixel size
    (field of view 43 A) it is not, and simulate says so."""
    code, output = _run(["-o", str(tmp_path / "ok.h5"), "--geometry", "reference-32", "--n-patterns", "2",
                         "--truth-grid", "0"])
    assert code == 0, output
    m = re.search(r"speckle oversampling ([0-9.]+)", output)
    assert m and 2.0 < float(m.group(1)) < 3.5, output
    assert "WARNING" not in output
    code, output = _run(["-o", str(tmp_path / "bad.h5"), "--geometry", "reference-32", "--n-patterns", "2",
                         "--truth-grid", "0", "--pixel-size-m", "0.0125", "--pixels", "8"])
    assert code == 0, output
    m = re.search(r"speckle oversampling ([0-9.]+)", output)
    assert m and float(m.group(1)) < 2.0 and "WARNING: oversampling < 2" in output, output
