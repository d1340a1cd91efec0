"""The run report: the numbers behind the figures (closed forms, planted answers, Monte Carlo), every figure
produced and non-empty from a tiny fitted run with synthetic fsc.json / density.mrc / posterior.nc, the page
saying what is missing, and `bayes-spi report` end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import matplotlib.image as mpimg
import mrcfile
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import stats
from scipy.spatial.transform import Rotation

from bayes_spi.cli.main import cli
from bayes_spi.report import FIGURES, build_report
from bayes_spi.report.figures import (direction_cells, fsc_resolution_text, fsc_resolutions, overview_size_px,
                                      pattern_indices)
from bayes_spi.report.numbers import (
    cone_radius_deg,
    equal_area_histogram,
    geodesic_deg,
    hammer_xy,
    histogram_counts,
    lon_lat,
    pose_errors,
    predicted_counts,
    resolution_crossing,
    sample_aligned,
    viewing_directions,
)
from bayes_spi.report.rundata import RunData

N_PATTERNS = 48
# one exact EMC iteration on a 512-rotation grid: a tiny fit at about half the cost (no test here is about either)
TINY = ["--batch-size", "16", "--epochs", "1", "--field-width", "16", "--n-heads", "1",
        "--polish-iterations", "1", "--search-rotations", "512",
        "--pixels-per-pattern", "64", "--grid", "17", "--no-progress", "--log-every", "1"]
ROTZ_PI = np.diag([-1.0, -1.0, 1.0])


# ------------------------------------------------------------------------------------------- numbers
def test_viewing_directions_and_lon_lat_planted() -> None:
    a = np.radians([10.0, 35.0, 80.0])
    R = Rotation.from_rotvec(np.outer(a, [1.0, 0.0, 0.0])).as_matrix()  # R e_z = (0, -sin a, cos a)
    d = viewing_directions(R)
    np.testing.assert_allclose(d, np.stack([0 * a, -np.sin(a), np.cos(a)], 1), atol=1e-12)
    lon, lat = lon_lat(d)
    np.testing.assert_allclose(np.degrees(lat), 90.0 - np.degrees(a), atol=1e-9)
    np.testing.assert_allclose(np.degrees(lon), -90.0, atol=1e-9)
    # the Rz(pi) twin R Rz(pi) has the same viewing direction
    np.testing.assert_allclose(viewing_directions(R @ ROTZ_PI), d, atol=1e-12)


def _polygon_area(x: np.ndarray, y: np.ndarray) -> float:
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def test_hammer_projection_is_equal_area() -> None:
    # the sphere's outline maps to the ellipse x^2/8 + y^2/2 = 1, of area 4 pi
    t = np.linspace(-np.pi / 2, np.pi / 2, 50)
    x, y = hammer_xy(np.full_like(t, np.pi), t)
    np.testing.assert_allclose(x**2 / 8 + y**2 / 2, 1.0, atol=1e-12)
    # any lon/lat cell maps to a region whose area equals its solid angle
    rng = np.random.default_rng(0)
    for _ in range(5):
        lo0, lo1 = np.sort(rng.uniform(-np.pi, np.pi, 2))
        la0, la1 = np.sort(rng.uniform(-np.pi / 2, np.pi / 2, 2))
        s = np.linspace(0, 1, 400)
        lon = np.concatenate([lo0 + (lo1 - lo0) * s, np.full_like(s, lo1), lo1 - (lo1 - lo0) * s, np.full_like(s, lo0)])
        lat = np.concatenate([np.full_like(s, la0), la0 + (la1 - la0) * s, np.full_like(s, la1), la1 - (la1 - la0) * s])
        area = _polygon_area(*hammer_xy(lon, lat))
        solid = (lo1 - lo0) * (np.sin(la1) - np.sin(la0))
        assert area == pytest.approx(solid, rel=2e-3)


def test_equal_area_histogram_uniform_and_planted() -> None:
    n_lon, n_lat = direction_cells(20000)
    lon, lat = lon_lat(viewing_directions(Rotation.random(20000, random_state=1).as_matrix()))
    counts, dens, le, be = equal_area_histogram(lon, lat, n_lon, n_lat)
    assert counts.shape == (n_lat, n_lon) and counts.sum() == 20000
    # cells of equal solid angle, summing to 4 pi
    solid = np.diff(le)[None, :] * np.diff(np.sin(be))[:, None]
    np.testing.assert_allclose(solid, 4 * np.pi / (n_lat * n_lon), rtol=1e-12)
    # uniform directions fill them uniformly: chi-square test, density 1 on average
    assert stats.chisquare(counts.ravel()).pvalue > 1e-3
    assert dens.mean() == pytest.approx(1.0)
    # directions near the north pole all land in the top band
    c, _, _, _ = equal_area_histogram(np.linspace(-3, 3, 7), np.full(7, np.radians(89.0)), 6, 3)
    assert c[2].sum() == 7 and c[:2].sum() == 0


def test_cone_radius_matches_lienormal_draws() -> None:
    from bayes_spi.distributions.so3 import LieNormalSO3

    sigma = 0.05
    loc = torch.as_tensor(Rotation.random(1, random_state=2).as_matrix(), dtype=torch.float64)
    n = 20000
    draws = LieNormalSO3(loc.expand(n, 3, 3), torch.full((n, 3), sigma, dtype=torch.float64)).sample()
    ang = geodesic_deg(draws.numpy(), loc.expand(n, 3, 3).numpy())
    for level in (0.5, 0.9):
        r = float(cone_radius_deg(np.full((1, 3), sigma), level)[0])
        assert np.quantile(ang, level) == pytest.approx(r, rel=0.025)
        assert float(np.mean(ang <= r)) == pytest.approx(level, abs=0.012)
    # closed form: isotropic sigma -> sigma * chi_3 quantile
    assert float(cone_radius_deg(np.full((1, 3), sigma), 0.9)[0]) == pytest.approx(
        np.degrees(sigma * stats.chi(3).ppf(0.9)), rel=1e-12)
    with pytest.raises(ValueError, match="level"):
        cone_radius_deg(np.ones((2, 3)), 1.5)


def test_pose_errors_and_histogram_planted() -> None:
    rng = np.random.default_rng(3)
    n = 300
    R_true = Rotation.random(n, random_state=4).as_matrix()
    G = Rotation.from_rotvec([0.4, -1.1, 0.7]).as_matrix()
    planted = rng.choice([2.0, 6.0, 10.0], size=n)
    axes = rng.normal(size=(n, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    D = Rotation.from_rotvec(np.radians(planted)[:, None] * axes).as_matrix()
    R_est = G.T @ R_true @ D  # R_true = G R_est D^T: error of pattern i is exactly planted[i]
    flip = np.arange(n) < 30
    R_est[flip] = R_est[flip] @ ROTZ_PI  # the Rz(pi) twin for 10% of them
    res = pose_errors(R_est, R_true, max_align=200)
    assert geodesic_deg(res["G_mod_rotz_pi"][None], G[None])[0] < 1.5
    np.testing.assert_allclose(res["errors_mod_rotz_pi_deg"], planted, atol=1.5)
    assert res["flipped"][flip].all() and not res["flipped"][~flip].any()
    assert np.all(res["errors_deg"][flip] > 150)
    counts = histogram_counts(res["errors_mod_rotz_pi_deg"], [0, 4, 8, 12, 180])
    assert counts.tolist() == [int((planted == 2).sum()), int((planted == 6).sum()), int((planted == 10).sum()), 0]
    assert histogram_counts([1.0, np.nan, 179.0, 180.0], [0, 90, 180]).tolist() == [1, 2]


def test_sample_aligned_puts_truth_on_reconstruction_coordinates() -> None:
    # truth f on a grid; poses R_est = G^T R_true, so the reconstruction is I_est(x) = f(G x)
    A = np.diag([300.0, 900.0, 1500.0])
    n, dq = 33, 0.005
    ax = (np.arange(n) - n // 2) * dq
    q = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1)
    f_grid = np.exp(-np.einsum("...i,ij,...j->...", q, A, q))
    G = Rotation.from_rotvec([0.3, 0.8, -0.5]).as_matrix()
    R_true = Rotation.random(200, random_state=5).as_matrix()
    G_hat = pose_errors(G.T @ R_true, R_true)["G_mod_rotz_pi"]
    x = np.random.default_rng(6).uniform(-0.04, 0.04, size=(500, 3))
    Gx = x @ G.T
    want = np.exp(-np.einsum("ni,ij,nj->n", Gx, A, Gx))
    got = sample_aligned(f_grid, dq, G_hat, x)
    np.testing.assert_allclose(got, want, atol=0.02)
    assert np.all(np.isnan(sample_aligned(f_grid, dq, np.eye(3), np.array([[0.2, 0.0, 0.0]]))))


def test_resolution_crossing_and_fsc_resolutions() -> None:
    q = np.linspace(0.0, 0.2, 21)
    f = 1.0 - q / 0.2  # crosses 0.5 at q = 0.1 (1 nm), 0.143 at q = 0.1714
    assert resolution_crossing(q, f, 0.5) == pytest.approx(0.1)
    assert resolution_crossing(q, f, 0.143) == pytest.approx(0.2 * (1 - 0.143))
    assert resolution_crossing(q, np.ones_like(q), 0.5) is None
    assert resolution_crossing([0.01, 0.02], [0.1, 0.05], 0.5) == pytest.approx(0.01)
    res = fsc_resolutions({"q": q, "fsc": f, "given_0.5": True, "res_nm_0.5": 3.0, "given_0.143": False})
    assert res["0.5"] == 3.0 and res["0.143"] == pytest.approx(0.1 / (0.2 * (1 - 0.143)))
    # the evaluation writes the last shell's resolution as a bound with crosses_*: false
    bound = {"q": q, "fsc": np.ones_like(q), "given_0.5": True, "res_nm_0.5": 0.5, "crosses_0.5": False}
    assert fsc_resolutions(bound)["0.5"] is None
    assert fsc_resolution_text(bound, "0.5") == "not reached (< 0.50 nm)"


def test_cones_from_posterior_h5_and_netcdf_by_name(tmp_path: Path) -> None:
    import h5netcdf

    run = tmp_path / "run"
    run.mkdir()
    sigma = np.radians(np.array([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [0.5, 1.0, 1.5]]))
    with h5py.File(run / "posterior.h5", "w") as f:
        f["pose_quaternion"] = np.tile([1.0, 0.0, 0.0, 0.0], (3, 1))
        f["pose_sigma_rad"] = sigma
    c = RunData(run).cones  # fallback: isotropic approximation with the rms sigma
    np.testing.assert_allclose(c["r90"], cone_radius_deg(sigma, 0.9))
    assert c["index"].tolist() == [0, 1, 2] and c["R_center"] is None
    with h5netcdf.File(run / "posterior.nc", "w") as nc:  # per-level variables found by name, radians
        nc.dimensions = {"pattern": 3}
        for name, val in (("cone50_rad", 0.01), ("cone90_rad", 0.02)):
            v = nc.create_variable(name, ("pattern",), data=np.full(3, val))
            v.attrs["units"] = "rad"
    c = RunData(run).cones
    np.testing.assert_allclose(c["r90"], np.degrees(0.02))
    assert c["label"] == "posterior.nc"


def test_pattern_indices_and_direction_cells() -> None:
    assert pattern_indices(100, 3).tolist() == [0, 50, 99]
    assert pattern_indices(2, 6).tolist() == [0, 1]
    assert direction_cells(10) == (12, 6) and direction_cells(10**7) == (48, 24)


# ------------------------------------------------------------------------------------------- tiny run
@pytest.fixture(scope="module")
def data_file(simulated) -> Path:
    return simulated(N_PATTERNS, truth_grid=17, chunk=32)


@pytest.fixture(scope="module")
def fitted_run(data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("fit") / "run"
    result = CliRunner().invoke(cli, ["fit", str(data_file), "-o", str(run), *TINY])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return run


def _copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoint.pt"))
    return dest


def _synthesise_products(run: Path, n_patterns: int) -> None:
    """fsc.json, density.mrc and posterior.nc as the other commands write them (see the report's contract)."""
    import h5netcdf

    q = np.linspace(0.004, 0.12, 30)
    fsc = {"intensity": {"q_inv_A": q.tolist(), "fsc": (1 / (1 + np.exp((q - 0.07) / 0.01))).tolist(),
                         "res_nm_0.5": 1 / 0.7, "res_nm_0.143": None},
           "halfset": {"q_inv_A": q.tolist(), "fsc": (1 - q / 0.2).tolist()},
           "corner_res_nm": 0.797}
    (run / "fsc.json").write_text(json.dumps(fsc))
    n, vox = 33, 4.0
    ax = (np.arange(n) - n // 2) * vox
    X, Y, Z = np.meshgrid(ax, ax, ax, indexing="ij")
    rho = np.exp(-((X - 8) ** 2 + Y**2 + Z**2) / 50.0) + np.exp(-(X**2 + (Y + 6) ** 2 + Z**2) / 30.0)
    with mrcfile.new(run / "density.mrc", overwrite=True) as m:
        m.set_data(np.ascontiguousarray(rho.transpose(2, 1, 0)).astype(np.float32))
        m.voxel_size = vox
    # the ArviZ layout of `bayes-spi posterior`: per-pattern summaries in sample_stats, here for a subset of patterns
    sub = np.arange(0, n_patterns, 2)
    with h5py.File(run / "posterior.h5", "r") as f:
        mean_q = f["pose_quaternion"][()][sub]
    with h5netcdf.File(run / "posterior.nc", "w") as nc:
        g = nc.create_group("sample_stats")
        g.dimensions = {"pattern": len(sub), "credible_mass": 2}
        g.create_variable("pattern", ("pattern",), data=sub)
        g.create_variable("credible_mass", ("credible_mass",), data=np.array([0.5, 0.9]))
        g.dimensions["quaternion"] = 4
        g.create_variable("mean_pose_quaternion", ("pattern", "quaternion"), data=mean_q)
        for name, r in (("cone_radius_deg", (3.0, 7.0)), ("cone_radius_mod_rotz_deg", (2.0, 5.0))):
            v = g.create_variable(name, ("pattern", "credible_mass"), data=np.tile(r, (len(sub), 1)))
            v.attrs["units"] = "deg"


def _check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    img = mpimg.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 300, path
    assert img[..., :3].std() > 0.05, f"{path} looks blank"


def test_fit_writes_the_report(fitted_run: Path) -> None:
    run = fitted_run
    page = (run / "report.html").read_text()
    made = {"elbo", "speed", "slices", "patterns", "orientations", "spread", "errors"}  # fit evaluates: truth given
    for name, product in (("fsc", "fsc.json"), ("density", "density.mrc")):  # made when the fit wrote them
        if (run / product).is_file():
            made.add(name)
        else:
            assert not (run / "report" / f"{name}.png").exists()
            assert f"Not made: missing {product}" in page
    for name in made:
        _check_png(run / "report" / f"{name}.png")
        assert f'src="report/{name}.png"' in page
    img = mpimg.imread(run / "report.png")
    assert img.shape[:2] == overview_size_px()
    assert not list(run.rglob("*.tmp"))
    # the verdict's information limit is on the page, with its caveat exactly when it is inside the inscribed circle
    import json

    from bayes_spi.infer.verdict import information_limit_note

    checks = json.loads((run / "verdict.json").read_text())["checks"]
    assert len(checks["shell_gain_per_photon"]) == 8 and checks["inscribed_q"] > 0
    assert "predicted better than by the radial average out to" in page
    note = information_limit_note(checks)
    assert ("information limit" in page) == (note is not None)


def test_predicted_patterns_equal_direct_computation(fitted_run: Path) -> None:
    from bayes_spi.infer.load import load_trained

    trained = load_trained(fitted_run)
    rd = RunData(fitted_run)
    idx = np.array([0, 5, 17])
    R, s = rd.posterior["R"][idx], rd.posterior["scale_mean"][idx]
    lam = predicted_counts(trained.model, R, s, trained.geometry.shape)
    geom = trained.geometry
    qv = geom.q_vectors().reshape(-1, 3)
    factor = (geom.solid_angle() * geom.polarization_factor()).reshape(-1)
    with torch.no_grad():
        for j in range(len(idx)):
            I = trained.model.field(torch.as_tensor(qv @ R[j].T, dtype=torch.float32)).double().numpy()
            want = s[j] * factor * I  # float32 field: relative agreement, absolute far below a photon
            np.testing.assert_allclose(lam[j].reshape(-1), want, rtol=2e-4, atol=1e-7 * float(want.max()))
    assert lam.shape == (3, *geom.shape)


def test_report_cli_makes_every_figure(fitted_run: Path, data_file: Path, tmp_path: Path) -> None:
    run = _copy_run(fitted_run, tmp_path / "run")
    _synthesise_products(run, N_PATTERNS)
    result = CliRunner().invoke(cli, ["report", str(run), "--truth", str(data_file), "--n-patterns", "4"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    page = (run / "report.html").read_text()
    for spec in FIGURES:
        _check_png(run / "report" / f"{spec.name}.png")
        assert f'src="report/{spec.name}.png"' in page
    assert "Not made" not in page
    # cone radii came from posterior.nc (3 and 7 deg planted), FSC numbers from fsc.json (given and computed)
    rd = RunData(run, truth_path=data_file)
    cones, cal = rd.cones, rd.calibration
    assert cones["source"].startswith("posterior.nc") and cones["index"].tolist() == list(range(0, N_PATTERNS, 2))
    np.testing.assert_allclose(cones["r90"], 7.0)
    np.testing.assert_allclose(cones["r50"], 3.0)
    # calibration: the cones' centre is posterior.h5's pose here, so its errors are the aligned errors of those
    # patterns, compared with the 90% cone mod Rz(pi)
    np.testing.assert_allclose(cal["errors_deg"], rd.alignment["errors_mod_rotz_pi_deg"][cones["index"]], atol=1e-6)
    np.testing.assert_allclose(cal["r90_deg"], 5.0)
    assert "median 90% cone radius</td><td class=\"v\">7 deg" in page
    inside = float(np.mean(cal["errors_deg"] <= 5.0))
    assert f"{inside:.1%} of {N_PATTERNS // 2} patterns (nominal 90%)" in page
    assert "1.43 nm" in page and "1.00 nm" in page  # intensity at 0.5 (given); half-set at 0.5 (computed: q=0.1)
    assert "log-intensity correlation" in page and "config.yaml" in page
    assert "wrote" in result.output


def test_report_says_what_is_missing_and_removes_stale_figures(fitted_run: Path, tmp_path: Path) -> None:
    run = _copy_run(fitted_run, tmp_path / "run")
    for name in ("model.pt", "fsc.json", "density.mrc"):  # the fit may write fsc.json (its evaluation)
        (run / name).unlink(missing_ok=True)
    (run / "report" / "density.png").write_bytes(b"stale")
    res = build_report(run, overview=False)  # no truth given; the data file comes from config.yaml
    page = res.html.read_text()
    assert res.figures["patterns"] is None and res.figures["errors"] is None and res.figures["fsc"] is None
    assert not (run / "report" / "density.png").exists()
    assert "missing model.pt" in page
    assert "bayes-spi report RUN/ --truth DATA.h5" in page  # what the error histogram needs
    assert "bayes-spi phase RUN/" in page and "bayes-spi evaluate RUN/ --truth DATA.h5" in page
    for name in ("elbo", "speed", "slices", "orientations", "spread"):
        _check_png(run / "report" / f"{name}.png")


def test_malformed_input_is_reported_not_fatal(fitted_run: Path, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    from bayes_spi.infer.report import write_report

    run = _copy_run(fitted_run, tmp_path / "run")
    for name in ("model.pt", "intensity.h5"):  # fewer figures: a faster test
        (run / name).unlink()
    (run / "fsc.json").write_text(json.dumps({"intensity": {"q_inv_A": [0.1, 0.2], "fsc": [1.0]}}))
    with h5py.File(run / "posterior.h5", "a") as f:
        del f["pose_sigma_rad"]  # no spread in posterior.h5 and no posterior.nc: the spread figure is left out
    out = write_report(run)  # the wrapper the fit calls: returns the page
    assert out == run / "report.html"
    page = out.read_text()
    assert "fsc.json: field intensity: expected q_inv_A and fsc of equal length" in page
    assert any("fsc.png not made" in r.getMessage() for r in caplog.records)
    assert (run / "report" / "elbo.png").is_file() and not (run / "report" / "spread.png").exists()
    assert "missing intensity.h5" in page


def test_report_cli_bad_arguments(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["report", str(tmp_path / "nope")])
    assert r.exit_code != 0 and "not found" in r.output
    (tmp_path / "run").mkdir()
    r = CliRunner().invoke(cli, ["report", str(tmp_path / "run"), "--truth", str(tmp_path / "no.h5")])
    assert r.exit_code != 0 and "no.h5" in r.output
    # a directory that is not a run: refused (issue 8)
    r = CliRunner().invoke(cli, ["report", str(tmp_path / "run")])
    assert r.exit_code != 0 and "expected a run directory" in r.output
    # a run that has only just started (run.log): a page that says everything is missing
    (tmp_path / "run" / "run.log").write_text("")
    r = CliRunner().invoke(cli, ["report", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "run" / "report.html").read_text()
    assert page.count("Not made: missing") == len(FIGURES)
    assert not (tmp_path / "run" / "report.png").exists()
