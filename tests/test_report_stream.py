"""Memory flat in N for `report` and `evaluate`: above a cap the report reads one even stride of the patterns, the
same rows of posterior.h5, posterior.nc and /truth (a mis-pairing would show as large pose errors), and only those
rows; evaluate streams posterior.h5 and /truth in chunks with results equal to all at once. Files are written
directly (no fit)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy import stats
from scipy.spatial.transform import Rotation

import bayes_spi.infer.evaluate as ev_mod
import bayes_spi.report.rundata as rd_mod
from bayes_spi.dataio.h5 import quaternions_to_rotations, write_simulation
from bayes_spi.geometry import get_preset
from bayes_spi.metrics import orientation_error_summary
from bayes_spi.report import build_report
from bayes_spi.report.numbers import cone_radius_deg, pose_errors
from bayes_spi.report.rundata import RunData

N = 500
ROTZ_PI = np.diag([-1.0, -1.0, 1.0])
G = Rotation.from_rotvec([0.4, -0.9, 0.3]).as_matrix()


def _quat(R: np.ndarray) -> np.ndarray:
    return Rotation.from_matrix(R).as_quat(scalar_first=True)


def _truth_file(path: Path, R_true: np.ndarray, scales: np.ndarray) -> Path:
    n = len(R_true)
    return write_simulation(path, np.zeros((n, 32, 32), dtype=np.int32), get_preset("reference-32"),
                            quaternions=_quat(R_true), scales=scales)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Poses ``R_est = G^T R_true`` (exact: every error 0 when paired right), per-pattern values that encode the
    pattern number, and posterior.nc listing every 3rd pattern."""
    import h5netcdf

    tmp = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(0)
    R_true = Rotation.random(N, random_state=3).as_matrix()
    scales = np.exp(rng.normal(0.0, 0.3, N))
    data = _truth_file(tmp / "truth.h5", R_true, scales)
    run = tmp / "run"
    run.mkdir()
    R_est = G.T[None] @ R_true
    k = np.arange(N)
    sigma = np.radians(np.stack([0.01 * k + 1.0] * 3, axis=1))  # cone radius grows with the pattern number
    weights = np.stack([1.0 - k / (2.0 * N), k / (2.0 * N)], axis=1)  # best weight 1 - k / (2N)
    with h5py.File(run / "posterior.h5", "w") as f:
        f["pose_quaternion"] = _quat(R_est)
        f["scale_mean"] = 2.0 * scales
        f["pose_sigma_rad"] = sigma
        f["hypothesis_weights"] = weights
    sub = np.arange(0, N, 3)
    with h5netcdf.File(run / "posterior.nc", "w") as nc:
        g = nc.create_group("sample_stats")
        g.dimensions = {"pattern": len(sub), "credible_mass": 2, "quaternion": 4}
        g.create_variable("pattern", ("pattern",), data=sub)
        g.create_variable("credible_mass", ("credible_mass",), data=np.array([0.5, 0.9]))
        g.create_variable("mean_pose_quaternion", ("pattern", "quaternion"), data=_quat(R_est[sub]))
        v = g.create_variable("cone_radius_deg", ("pattern", "credible_mass"),
                              data=np.stack([sub / 100.0, sub / 10.0], axis=1))
        v.attrs["units"] = "deg"
    return {"run": run, "data": data, "R_true": R_true, "R_est": R_est, "scales": scales, "sigma": sigma, "tmp": tmp}


def test_report_reads_one_strided_subset_paired_across_files(planted: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rd_mod, "MAX_REPORT_PATTERNS", 50)
    monkeypatch.setattr(rd_mod, "READ_CHUNK", 60)
    reads: list[tuple[str, tuple[int, ...]]] = []
    getitem = h5py.Dataset.__getitem__

    def spy(self: h5py.Dataset, key: object) -> object:
        out = getitem(self, key)
        reads.append((self.name, np.shape(out)))
        return out

    read_direct = h5py.Dataset.read_direct

    def spy_direct(self: h5py.Dataset, dest: np.ndarray, source_sel: object = None, dest_sel: object = None) -> None:
        read_direct(self, dest, source_sel, dest_sel)
        reads.append((self.name, np.empty(self.shape[0])[source_sel].shape))

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    monkeypatch.setattr(h5py.Dataset, "read_direct", spy_direct)
    rd = RunData(planted["run"], truth_path=planted["data"])
    assert (rd.n_patterns, rd.stride, rd.n_used) == (N, 10, 50)
    np.testing.assert_array_equal(rd.used_index, np.arange(0, N, 10))
    post, truth = rd.posterior, rd.truth
    np.testing.assert_allclose(post["R"], planted["R_est"][::10], atol=1e-12)
    np.testing.assert_allclose(post["best_weight"], 1.0 - np.arange(0, N, 10) / (2.0 * N))
    np.testing.assert_allclose(truth["scales"], planted["scales"][::10])
    np.testing.assert_allclose(post["scale_mean"], 2.0 * truth["scales"])
    # paired right, every error vanishes; the same arrays off by one pattern would give errors of tens of degrees
    al = rd.alignment
    assert al["errors_deg"].shape == (50,) and al["errors_mod_rotz_pi_deg"].max() < 1e-5
    assert al["errors_deg"].max() < 1e-5 and np.allclose(al["G"], G, atol=1e-8)
    shifted = pose_errors(post["R"], planted["R_true"][1:N:10])
    assert np.median(shifted["errors_mod_rotz_pi_deg"]) > 20.0
    # posterior.nc lists every 3rd pattern: the cones keep those on the stride (every 30th), with their own values
    cones = rd.cones
    np.testing.assert_array_equal(cones["index"], np.arange(0, N, 30))
    np.testing.assert_allclose(cones["r90"], np.arange(0, N, 30) / 10.0)
    cal = rd.calibration
    assert cal["errors_deg"].shape == (17,) and cal["errors_deg"].max() < 1e-5
    # posterior.h5 and posterior.nc were read in blocks of at most READ_CHUNK rows (then subsampled)
    per_pattern = [(name, s) for name, s in reads if s and name.rsplit("/", 1)[-1] in
                   ("pose_quaternion", "scale_mean", "pose_sigma_rad", "hypothesis_weights", "pattern",
                    "cone_radius_deg", "mean_pose_quaternion")]
    assert len(per_pattern) > 20 and max(s[0] for _, s in per_pattern) <= 60, per_pattern
    # without posterior.nc: the posterior.h5 sigmas of the same patterns
    (planted["run"] / "posterior.nc").rename(planted["tmp"] / "posterior.nc")
    try:
        rd2 = RunData(planted["run"], truth_path=planted["data"])
        np.testing.assert_array_equal(rd2.cones["index"], np.arange(0, N, 10))
        np.testing.assert_allclose(rd2.cones["r90"], cone_radius_deg(planted["sigma"][::10], 0.9))
        assert rd2.calibration["errors_deg"].max() < 1e-5
    finally:
        (planted["tmp"] / "posterior.nc").rename(planted["run"] / "posterior.nc")


def test_report_page_says_how_many_patterns(planted: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(rd_mod, "MAX_REPORT_PATTERNS", 50)
    res = build_report(planted["run"], truth_path=planted["data"], overview=False)
    page = res.html.read_text()
    assert "use 50 of 500 patterns (one in 10" in page and "50 of 500 (one pattern in 10, an even stride)" in page
    assert res.figures["errors"] is not None and res.figures["orientations"] is not None
    # N is checked on the datasets' shapes: a truth file of another N is refused, naming both files
    other = _truth_file(tmp_path / "other.h5", planted["R_true"][:N - 1], planted["scales"][:N - 1])
    with pytest.raises(ValueError, match=r"other\.h5: field /truth/quaternions: expected 500 patterns"):
        RunData(planted["run"], truth_path=other).truth


def _noisy_run(tmp: Path, n: int) -> tuple[Path, Path, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Poses ``G^T R_true`` with 3-degree noise, every 5th pattern in its Rz(pi) twin, 4% outliers; noisy scales."""
    rng = np.random.default_rng(1)
    R_true = Rotation.random(n, random_state=5).as_matrix()
    noise = Rotation.from_rotvec(rng.normal(0.0, np.radians(3.0) / np.sqrt(3.0), (n, 3))).as_matrix()
    R_est = G.T[None] @ R_true @ noise
    flips = np.arange(n) % 5 == 0
    R_est[flips] = R_est[flips] @ ROTZ_PI
    out = rng.choice(n, n // 25, replace=False)
    R_est[out] = Rotation.random(len(out), random_state=6).as_matrix()
    scales = np.exp(rng.normal(0.0, 0.3, n))
    s_est = scales * np.exp(rng.normal(0.0, 0.1, n))
    data = _truth_file(tmp / "truth.h5", R_true, scales)
    run = tmp / "run"
    run.mkdir()
    with h5py.File(run / "posterior.h5", "w") as f:
        f["pose_quaternion"] = _quat(R_est)
        f["scale_mean"] = s_est
    return run, data, R_true, quaternions_to_rotations(_quat(R_est)), scales, s_est


def test_evaluate_streams_in_chunks_with_the_all_at_once_numbers(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    run, data, R_true, R_est, scales, s_est = _noisy_run(tmp_path, N)
    chunked = ev_mod.evaluate_run_full(run, data, density=False, chunk=7)
    whole = ev_mod.evaluate_run_full(run, data, density=False, chunk=10**6)
    pose_keys = ("median_pose_error_deg", "mean_pose_error_deg", "median_pose_error_mod_rotz_deg",
                 "mean_pose_error_mod_rotz_deg", "wrong_mode_fraction", "n_patterns")
    for key in pose_keys:
        assert chunked.scalars[key] == whole.scalars[key], key
    np.testing.assert_array_equal(chunked.pose_errors_deg, whole.pose_errors_deg)
    assert chunked.scalars["fluence_corr"] == pytest.approx(whole.scalars["fluence_corr"], rel=1e-13)
    # the reference: every pattern in memory at once (the former implementation)
    ref = orientation_error_summary(R_est, R_true)
    for key, rkey in (("median_pose_error_deg", "median_error_deg"), ("mean_pose_error_deg", "mean_error_deg"),
                      ("median_pose_error_mod_rotz_deg", "median_error_mod_rotz_pi_deg"),
                      ("mean_pose_error_mod_rotz_deg", "mean_error_mod_rotz_pi_deg"),
                      ("wrong_mode_fraction", "wrong_mode_fraction")):
        assert chunked.scalars[key] == pytest.approx(ref[rkey], rel=1e-12, abs=1e-12), key
    assert chunked.scalars["fluence_corr"] == pytest.approx(stats.pearsonr(s_est, scales)[0], rel=1e-12)
    # planted: ~3 deg noise, a fifth of the patterns (less the outliers among them) in the other mode
    assert 2.0 < chunked.scalars["median_pose_error_mod_rotz_deg"] < 4.0
    assert chunked.scalars["mean_pose_error_deg"] > 30.0 > 10.0 > chunked.scalars["mean_pose_error_mod_rotz_deg"]
    assert abs(chunked.scalars["wrong_mode_fraction"] - 0.2) < 0.02
    # G fitted on an even stride of 50 patterns: close to the all-pattern numbers, chunking still exact
    monkeypatch.setattr(ev_mod, "MAX_ALIGN_PATTERNS", 50)
    sub = ev_mod.evaluate_run_full(run, data, density=False, chunk=7)
    sub_whole = ev_mod.evaluate_run_full(run, data, density=False, chunk=10**6)
    assert any("50 of 500 patterns" in note for note in sub.notes)
    for key in pose_keys:
        assert sub.scalars[key] == sub_whole.scalars[key], key
    assert sub.scalars["median_pose_error_mod_rotz_deg"] == pytest.approx(ref["median_error_mod_rotz_pi_deg"],
                                                                          abs=0.3)
    assert sub.scalars["wrong_mode_fraction"] == pytest.approx(ref["wrong_mode_fraction"], abs=0.01)
    with pytest.raises(ValueError, match="chunk: expected a positive integer"):
        ev_mod.evaluate_run_full(run, data, density=False, chunk=0)


def test_read_rows_equals_numpy_slicing(tmp_path: Path) -> None:
    from bayes_spi.dataio.h5 import read_rows

    a = np.arange(1003 * 3, dtype=np.float32).reshape(1003, 3)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("a", data=a, chunks=(64, 3))
    with h5py.File(tmp_path / "x.h5", "r") as f:
        for rows in (slice(None), slice(None, None, 10), slice(5, 999, 7), slice(3, 4, 1000), slice(10, 10, 3)):
            for block in (1, 6, 64, 10**6):
                np.testing.assert_array_equal(read_rows(f["a"], rows, block), a[rows], err_msg=f"{rows} {block}")
        with pytest.raises(ValueError, match="positive step"):
            read_rows(f["a"], slice(None, None, -1))
