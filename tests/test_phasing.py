"""Phase retrieval (bayes_spi.analysis.phasing) and the true density of simulations (transform, HDF5)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from bayes_spi.analysis import PhasingResult, align_density, density_fsc, fourier_error, measured_sphere, phase_retrieval
from bayes_spi.dataio import DataFormatError, H5Writer, SPIDataset
from bayes_spi.geometry import get_preset
from bayes_spi.sim.simulate import simulate
from bayes_spi.sim.structure import Structure, load_structure
from bayes_spi.sim.transform import density_on_grid, intensity_on_grid, molecular_transform

Q_MAX = 0.1254787488545127  # q_max of the reference-* detector presets, 1/A


def _blobs(n: int, seed: int = 0) -> np.ndarray:
    """A compact asymmetric density: 8 Gaussians within ~8 voxels of the centre, cut at 1% of the max."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-5, 5, (8, 3))
    widths = rng.uniform(0.8, 1.5, 8)
    amps = rng.uniform(0.5, 1.5, 8)
    x = np.arange(n, dtype=np.float64) - n // 2
    X, Y, Z = np.meshgrid(x, x, x, indexing="ij")
    rho = np.zeros((n, n, n))
    for c, w, a in zip(centres, widths, amps):
        rho += a * np.exp(-((X - c[0]) ** 2 + (Y - c[1]) ** 2 + (Z - c[2]) ** 2) / (2 * w**2))
    rho[rho < 0.01 * rho.max()] = 0.0
    return rho


def _intensity(rho: np.ndarray) -> np.ndarray:
    return np.abs(np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(rho)))) ** 2


@pytest.fixture(scope="module")
def blob_case() -> tuple[np.ndarray, np.ndarray, PhasingResult]:
    n = 35
    rho = _blobs(n)
    extent = np.ptp(np.argwhere(rho > 0), axis=0) + 1
    assert np.all(n / extent >= 2.0)  # oversampling >= 2 per dimension
    intensity = _intensity(rho)
    return rho, intensity, phase_retrieval(intensity, dq=0.01, n_starts=4, seed=0)


# ============================================================ phase retrieval
def test_phasing_recovers_a_compact_density(blob_case: tuple[np.ndarray, np.ndarray, PhasingResult]) -> None:
    rho, _, res = blob_case
    assert res.density.shape == rho.shape and res.density.dtype == np.float64
    assert res.voxel_A == pytest.approx(1 / (35 * 0.01))
    aligned, info = align_density(rho, res.density, res.voxel_A, rotation_search=False)
    curve = density_fsc(rho, aligned, res.voxel_A)
    half_nyquist = 0.25 / res.voxel_A
    assert np.all(curve.fsc[curve.q <= half_nyquist] > 0.9), curve.fsc
    assert curve.resolution(0.5) < 3.0 * res.voxel_A  # ~2.5 voxels achieved (Nyquist: 2)
    assert info["correlation"] > 0.95
    # the unaligned result is centred: centre of mass within a voxel of the box centre
    com = np.array([np.sum(np.indices(rho.shape)[k] * np.clip(res.density, 0, None)) for k in range(3)])
    np.testing.assert_allclose(com / np.clip(res.density, 0, None).sum(), 17.0, atol=1.0)
    # the scale is absolute: electrons per voxel as the input (|FFT(rho)| = sqrt(I))
    assert res.density.sum() == pytest.approx(rho.sum(), rel=0.05)


def test_phasing_errors_are_consistent(blob_case: tuple[np.ndarray, np.ndarray, PhasingResult]) -> None:
    _, intensity, res = blob_case
    assert res.errors.shape == (4,) and res.best == int(np.argmin(res.errors))
    # independent recomputation from the returned density over the measured ball
    F = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(res.density)))
    amp = np.sqrt(intensity)
    ball = measured_sphere(35)
    manual = np.sum((np.abs(F[ball]) - amp[ball]) ** 2) / np.sum(intensity[ball])
    assert res.errors[res.best] == pytest.approx(manual, rel=1e-6)
    assert fourier_error(res.density, intensity) == pytest.approx(manual, rel=1e-9)
    assert res.errors[res.best] < 0.01
    assert len(res.error_history) == 4 and res.error_history[0].shape == (300 + 50,)
    assert res.error_history[res.best][-1] < 0.2 * res.error_history[res.best][0]
    # support and positivity hold for the returned density
    assert res.density.min() >= 0.0
    assert np.all(res.density[~res.support] == 0.0)


def test_shrinkwrap_reduces_the_support(blob_case: tuple[np.ndarray, np.ndarray, PhasingResult]) -> None:
    rho, intensity, res = blob_case
    for sizes in res.support_sizes:
        assert len(sizes) == 1 + 300 // 20
        assert sizes[-1] < 0.5 * sizes[0]  # autocorrelation support is ~8x the object volume
    assert res.support.sum() == res.support_sizes[res.best][-1]
    assert res.support.sum() < 1.5 * (rho > 0).sum()
    fixed = phase_retrieval(intensity, dq=0.01, n_starts=1, n_iter=40, n_er_final=5, shrinkwrap_every=0)
    assert len(fixed.support_sizes[0]) == 1 and fixed.support.sum() == fixed.support_sizes[0][0]
    assert fixed.support.sum() > 2 * (rho > 0).sum()


def test_unmeasured_voxels_are_free_and_input_is_symmetrised() -> None:
    n = 25
    rho = _blobs(n, seed=1)
    intensity = _intensity(rho)
    mask = measured_sphere(n)
    r = np.sqrt(((np.indices((n, n, n)) - n // 2) ** 2).sum(axis=0))
    mask &= r > 1.5  # a small "beam stop"
    kwargs = {"n_starts": 2, "n_iter": 60, "n_er_final": 10, "seed": 3, "measured_mask": mask}
    base = phase_retrieval(intensity, dq=0.02, **kwargs)
    corrupted = intensity.copy()
    corrupted[~mask] = np.random.default_rng(0).uniform(-5, 5, int((~mask).sum())) * intensity.max()
    other = phase_retrieval(corrupted, dq=0.02, **kwargs)
    np.testing.assert_allclose(other.density, base.density, rtol=1e-5, atol=1e-6 * base.density.max())
    np.testing.assert_allclose(other.errors, base.errors, rtol=1e-5)
    # negative values are clipped and the input is Friedel-symmetrised (same result as the clean input)
    noisy = intensity.copy()
    noisy[0, 0, 0] = -1.0  # a corner: outside the default ball anyway
    noisy[5, 12, 12] *= 1.2
    noisy[19, 12, 12] *= 0.8
    sym = intensity.copy()
    sym[5, 12, 12] = sym[19, 12, 12] = 0.5 * (1.2 * intensity[5, 12, 12] + 0.8 * intensity[19, 12, 12])
    a = phase_retrieval(noisy, dq=0.02, n_starts=1, n_iter=20, n_er_final=5)
    b = phase_retrieval(sym, dq=0.02, n_starts=1, n_iter=20, n_er_final=5)
    np.testing.assert_allclose(a.density, b.density, rtol=1e-5, atol=1e-6 * b.density.max())


def test_phasing_validation() -> None:
    with pytest.raises(ValueError, match="odd cube"):
        phase_retrieval(np.ones((8, 8, 8)), dq=0.1)
    with pytest.raises(ValueError, match="dq"):
        phase_retrieval(np.ones((9, 9, 9)), dq=0.0)
    with pytest.raises(ValueError, match="positive values"):
        phase_retrieval(np.zeros((9, 9, 9)), dq=0.1)
    with pytest.raises(ValueError, match="measured_mask"):
        phase_retrieval(np.ones((9, 9, 9)), dq=0.1, measured_mask=np.ones((9, 9, 9)))
    with pytest.raises(ValueError, match="n_starts"):
        phase_retrieval(np.ones((9, 9, 9)), dq=0.1, n_starts=0)


# ============================================================ true density of a simulation
def test_density_on_grid_matches_intensity_and_electron_count() -> None:
    mol = load_structure("2CEX")
    rho, voxel = density_on_grid(mol, 33, Q_MAX)
    intensity, dq = intensity_on_grid(mol, 33, Q_MAX)
    assert voxel == pytest.approx(1 / (33 * dq))
    back = _intensity(rho)
    assert np.abs(back - intensity).max() / intensity.max() < 1e-6
    f0 = molecular_transform(mol, np.zeros(3)).real
    assert rho.sum() == pytest.approx(f0, rel=1e-9)
    assert rho.sum() == pytest.approx(mol.n_electrons, rel=1e-3)
    # centred on the centre of electron mass
    com = np.array([np.sum((np.indices(rho.shape)[k] - 16) * np.clip(rho, 0, None)) for k in range(3)])
    np.testing.assert_allclose(com / np.clip(rho, 0, None).sum(), 0.0, atol=0.5)


def test_density_on_grid_keeps_the_hand() -> None:
    """An off-centre heavy atom appears at +r (not the mirror -r)."""
    positions = np.array([[6.0, 2.0, -1.0], [-3.0, 0.0, 0.0], [-2.0, -4.0, 1.0], [0.0, -1.0, 3.0], [-4.0, 2.0, -2.0],
                          [-1.0, 3.0, -3.0]])
    mol = Structure.from_arrays(["S", "C", "C", "N", "O", "C"], positions)
    n, q_max = 31, 0.5
    rho, voxel = density_on_grid(mol, n, q_max)
    r_s = mol.positions["S"][0]
    assert np.linalg.norm(r_s) > 4 * voxel  # the mirror image -r would be far away
    peak = np.array(np.unravel_index(rho.argmax(), rho.shape)) - n // 2
    np.testing.assert_allclose(peak * voxel, r_s, atol=voxel)


def test_truth_density_h5_round_trip_and_missing(tmp_path: Path) -> None:
    geom = get_preset("reference-32")
    path = tmp_path / "d.h5"
    rng = np.random.default_rng(0)
    dens = rng.random((5, 5, 5))
    with H5Writer(path, geom, with_truth=True) as w:
        w.append(np.zeros((2, 32, 32), dtype=np.int32), np.tile([1.0, 0, 0, 0], (2, 1)), np.ones(2))
        w.write_truth_density(dens, 2.5)
        with pytest.raises(ValueError, match="odd cube"):
            w.write_truth_density(np.zeros((4, 4, 4)), 1.0)
    with SPIDataset(path) as ds:
        got, voxel = ds.truth_density()
        assert voxel == 2.5 and got.dtype == np.float32
        np.testing.assert_allclose(got, dens.astype(np.float32))
        with pytest.raises(DataFormatError, match="/truth/intensity"):
            ds.truth_intensity()
    with h5py.File(path) as f:
        assert f["truth/density"].attrs["axis_order"] == "x,y,z" and f["truth/density"].attrs["centre_index"] == 2
    no_truth = tmp_path / "n.h5"
    with H5Writer(no_truth, geom) as w:
        w.append(np.zeros((1, 32, 32), dtype=np.int32))
    with SPIDataset(no_truth) as ds, pytest.raises(DataFormatError, match="/truth/density"):
        ds.truth_density()
    with h5py.File(path, "r+") as f:
        del f["truth/density"].attrs["voxel_size_A"]
    with pytest.raises(DataFormatError, match="voxel_size_A"):
        SPIDataset(path)


def test_simulate_writes_the_truth_density(tmp_path: Path) -> None:
    path = tmp_path / "sim.h5"
    simulate("2CEX", "reference-32", 3, path, truth_grid=17, progress=False, seed=1)
    mol = load_structure("2CEX")
    with SPIDataset(path) as ds:
        rho, voxel = ds.truth_density()
        intensity, dq = ds.truth_intensity()
    expected, expected_voxel = density_on_grid(mol, 17, get_preset("reference-32").q_max)
    assert voxel == pytest.approx(expected_voxel) and voxel == pytest.approx(1 / (17 * dq))
    np.testing.assert_allclose(rho, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(_intensity(rho.astype(np.float64)), intensity, rtol=1e-4,
                               atol=1e-5 * intensity.max())
