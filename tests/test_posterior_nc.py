"""Posterior export (ArviZ netCDF), Laplace refinement and coverage (bayes_spi.posterior, `bayes-spi posterior`).

Known answers: for an isotropic tangent Gaussian the angle to the centre is ``sigma * chi_3``, so the cone
radii are SciPy's chi(3) quantiles; truths drawn from the posterior itself are covered at the nominal rate
(within Monte Carlo error); the refinement finds a planted pose and its Laplace covariance equals the
inverse of the autograd Hessian of the log posterior.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import stats

from bayes_spi.cli.main import cli
from bayes_spi.dataio.h5 import quaternions_to_rotations, write_simulation
from bayes_spi.geometry import get_preset
from bayes_spi.models.fields import SirenField
from bayes_spi.models.spi import SPIModel
from bayes_spi.posterior import (
    ExportSettings,
    MixturePosterior,
    coverage_from_netcdf,
    draw,
    export_batches,
    fit_temperatures,
    load_calibration,
    pose_coverage,
    refine_posterior,
    summarize,
)
from bayes_spi.posterior.netcdf import DEFAULT_POSE_TEMPERATURE
from bayes_spi.so3 import geodesic_angle, hat, random_rotmat, rotvec_to_rotmat, rotz_pi

az = pytest.importorskip("arviz")
ROTZ = rotz_pi(torch.float64)


def _posterior(n: int, seed: int, bimodal: bool = True) -> MixturePosterior:
    """Random centres, anisotropic spreads 1-6 degrees, a Rz(pi) partner with weight 0.2 (if bimodal)."""
    gen = torch.Generator().manual_seed(seed)
    C = random_rotmat(n, generator=gen, dtype=torch.float64)
    sig = torch.empty(n, 3, dtype=torch.float64).uniform_(0.02, 0.1, generator=gen)
    ls = torch.randn(n, generator=gen, dtype=torch.float64) * 0.3
    sd = torch.empty(n, dtype=torch.float64).uniform_(0.02, 0.2, generator=gen)
    if not bimodal:
        return MixturePosterior(C[:, None], torch.diag_embed(sig)[:, None], torch.ones(n, 1, dtype=torch.float64),
                                ls[:, None], sd[:, None])
    rots = torch.stack([C, C @ ROTZ], dim=1)
    w = torch.tensor([0.8, 0.2], dtype=torch.float64).expand(n, 2)
    return MixturePosterior(rots, torch.diag_embed(sig)[:, None].expand(-1, 2, -1, -1), w,
                            torch.stack([ls, ls + 0.05], 1), torch.stack([sd, sd], 1))


def _slice(post: MixturePosterior, s: slice) -> MixturePosterior:
    return MixturePosterior(post.rotations[s], post.pose_tril[s], post.weights[s], post.log_scale_loc[s],
                            post.log_scale_sd[s])


# ------------------------------------------------------------------------------------------------ draws
def _export_with_truths(tmp_path: Path, post: MixturePosterior, R_true: np.ndarray, s_true: np.ndarray,
                        name: str) -> tuple[Path, Path]:
    from scipy.spatial.transform import Rotation

    n = len(R_true)
    nc = tmp_path / f"{name}.nc"
    export_batches(((np.arange(a, min(a + 256, n)), np.ones(min(a + 256, n) - a), _slice(post, slice(a, a + 256)))
                    for a in range(0, n, 256)), nc, np.arange(n), 1, ExportSettings(n_draws=200, refine=False))
    q = Rotation.from_matrix(R_true).as_quat()
    data = tmp_path / f"{name}.h5"
    write_simulation(data, np.zeros((n, 32, 32), dtype=np.int32), get_preset("reference-32"),
                     quaternions=np.concatenate([q[:, 3:], q[:, :3]], 1), scales=s_true)
    return nc, data


def test_calibration_is_not_blown_up_by_truths_in_another_mode(tmp_path: Path) -> None:
    """12% of the truths 180 deg away from unimodal posteriors: no temperature covers them; they count as misses
    (the 50% temperature covers half of all patterns) but must not inflate the 90% temperature to ~180 deg cones."""
    n = 500
    post = _posterior(n, seed=3, bimodal=False)
    truth = draw(post, 1, indices=np.arange(n), seed=77)
    R_true, s_true = truth.rotations[0].numpy(), np.exp(truth.log_scale[0].numpy())
    cal = fit_temperatures(*_export_with_truths(tmp_path, post, R_true, s_true, "plain"))
    assert cal["far_mode_fraction"] == 0.0
    assert abs(cal["pose_temperature_for_50"] - 1) < 0.12 and abs(cal["pose_temperature_for_90"] - 1) < 0.12, cal
    far = np.arange(n) % 25 < 3  # 12%
    R_far = R_true.copy()
    R_far[far] = R_true[far] @ np.diag([1.0, -1.0, -1.0])  # Rx(pi): 180 deg away
    nc, data = _export_with_truths(tmp_path, post, R_far, s_true, "far")
    cal_far = fit_temperatures(nc, data)
    assert cal_far["far_mode_fraction"] == pytest.approx(0.12, abs=0.005), cal_far
    # half of all patterns covered: the 50% level of the others is 0.5 / 0.88
    t50 = cal_far["pose_temperature_for_50"]
    assert cal["pose_temperature_for_50"] < t50 < 1.35, cal_far
    cov = coverage_from_netcdf(nc, data)
    assert cov["pose_coverage_90"] < 0.9  # out of reach at any sane temperature ...
    assert cal_far["pose_temperature_for_90"] < 1.6, cal_far  # ... so it stays a cone, not a hemisphere


def test_cone_radii_match_sigma_chi3() -> None:
    sigma = 0.04
    n = 3
    post = MixturePosterior(random_rotmat(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)[:, None],
                            torch.diag_embed(torch.full((n, 1, 3), sigma, dtype=torch.float64)),
                            torch.ones(n, 1, dtype=torch.float64), torch.zeros(n, 1, dtype=torch.float64),
                            torch.full((n, 1), 0.1, dtype=torch.float64))
    d = draw(post, 20000, indices=np.arange(n), seed=3)
    s = summarize(post, d, levels=(0.5, 0.9))
    expected = sigma * stats.chi(3).ppf([0.5, 0.9])
    np.testing.assert_allclose(s.cone_radius.numpy(), np.broadcast_to(expected, (n, 2)), rtol=0.025)
    # the mean pose is the centre; the fluence moments are the LogNormal's, the HDI holds 90% of the draws
    assert float(geodesic_angle(s.mean_rotation, post.rotations[:, 0]).max()) < 3e-3
    np.testing.assert_allclose(s.scale_mean.numpy(), np.exp(0.1**2 / 2), rtol=1e-12)
    np.testing.assert_allclose(s.scale_sd.numpy(), np.sqrt((np.exp(0.01) - 1) * np.exp(0.01)), rtol=1e-12)
    np.testing.assert_allclose(s.scale_eti[:, 1].log().numpy(), np.broadcast_to([-0.1645, 0.1645], (n, 2)), atol=0.01)
    sc = d.log_scale.exp()
    inside = ((sc >= s.scale_hdi[:, 1, 0]) & (sc <= s.scale_hdi[:, 1, 1])).double().mean(0)
    np.testing.assert_allclose(inside.numpy(), 0.9, atol=1e-3)


def test_draws_are_independent_of_batching_and_mean_sits_on_the_dominant_mode() -> None:
    post = _posterior(6, seed=2)
    whole = draw(post, 50, indices=np.arange(10, 16), seed=5)
    part = draw(_slice(post, slice(2, 4)), 50, indices=[12, 13], seed=5)
    torch.testing.assert_close(part.rotations, whole.rotations[:, 2:4])
    torch.testing.assert_close(part.log_scale, whole.log_scale[:, 2:4])
    big = draw(post, 4000, indices=np.arange(6), seed=0)
    s = summarize(post, big)
    assert float(geodesic_angle(s.mean_rotation, post.rotations[:, 0]).max()) < 0.02  # not between the modes
    np.testing.assert_allclose(s.rotz_flip_mass.numpy(), 0.2, atol=0.035)
    frac = (big.hypothesis == 1).double().mean(0)
    np.testing.assert_allclose(frac.numpy(), 0.2, atol=0.035)
    # the 90% cone reaches the 20% twin only modulo Rz(pi)
    assert bool((s.cone_radius[:, 1] > 2.5).all()) and bool((s.cone_radius_mod_rotz[:, 1] < 0.4).all())


# --------------------------------------------------------------------------------------------- coverage
def test_coverage_of_truths_drawn_from_the_posterior_is_nominal(tmp_path: Path) -> None:
    n = 400
    post = _posterior(n, seed=7)
    truth = draw(post, 1, indices=np.arange(n), seed=999)  # independent of the export's streams
    G = rotvec_to_rotmat(torch.tensor([0.3, -0.2, 1.0], dtype=torch.float64))
    R_true = (G @ truth.rotations[0]).numpy()
    s_true = np.exp(truth.log_scale[0].numpy() + 0.7)  # one global factor
    nc = tmp_path / "post.nc"
    settings = ExportSettings(n_draws=200, batch_size=256, refine=False)
    export_batches(((np.arange(a, min(a + 256, n)), np.ones(min(a + 256, n) - a), _slice(post, slice(a, a + 256)))
                    for a in range(0, n, 256)), nc, np.arange(n), 2, settings)
    from scipy.spatial.transform import Rotation

    quat_xyzw = Rotation.from_matrix(R_true).as_quat()
    data = tmp_path / "truth.h5"
    write_simulation(data, np.zeros((n, 32, 32), dtype=np.int32), get_preset("reference-32"),
                     quaternions=np.concatenate([quat_xyzw[:, 3:], quat_xyzw[:, :3]], 1), scales=s_true)
    cov = coverage_from_netcdf(nc, data)
    # binomial sd: 0.025 at 50%, 0.015 at 90%; allow ~3.5 sd
    for kind in ("pose", "pose_mod_rotz", "scale"):
        assert abs(cov[f"{kind.replace('pose_mod_rotz', 'pose')}_coverage{'_mod_rotz' if 'mod' in kind else ''}_50"]
                   - 0.5) < 0.085, cov
    assert abs(cov["pose_coverage_90"] - 0.9) < 0.05 and abs(cov["pose_coverage_mod_rotz_90"] - 0.9) < 0.05, cov
    assert abs(cov["scale_coverage_90"] - 0.9) < 0.05, cov
    assert cov["log_scale_offset"] == pytest.approx(0.7, abs=0.01)
    np.testing.assert_allclose(np.asarray(cov["G"]), G.numpy(), atol=0.02)
    # a calibrated posterior needs no temperature
    cal = fit_temperatures(nc, data)
    assert abs(cal["pose_temperature_for_50"] - 1.0) < 0.12 and abs(cal["scale_temperature"] - 1.0) < 0.12, cal
    assert cal["far_mode_fraction"] == pytest.approx(0.2, abs=0.05)  # truths drawn from the 20% twin mode
    # the same truths, but cones a third too small: coverage must drop clearly
    d = draw(post, 200, indices=np.arange(n))
    s = summarize(post, d)
    low = pose_coverage(s.mean_rotation.numpy(), s.cone_radius.numpy() / 3, R_true, (0.5, 0.9), G=G.numpy())
    assert low["pose_coverage_50"] < 0.2


# ------------------------------------------------------------------------------------------------ file
def _export(path: Path, post: MixturePosterior, sizes: list[int], first: int = 10) -> None:
    batches, a = [], 0
    for size in sizes:
        idx = np.arange(first + a, first + a + size)
        batches.append((idx, 100.0 * (idx + 1), _slice(post, slice(a, a + size))))
        a += size
    export_batches(batches, path, np.arange(first, first + a), post.n_hypotheses,
                   ExportSettings(n_draws=40, batch_size=4, refine=False, seed=1), attrs={"source_data": "x.h5"})


def test_netcdf_opens_in_arviz_with_dims_coords_and_equals_one_batch(tmp_path: Path) -> None:
    post = _posterior(8, seed=4)
    _export(tmp_path / "a.nc", post, [3, 4, 1])
    _export(tmp_path / "b.nc", post, [8])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ia, ib = az.from_netcdf(tmp_path / "a.nc"), az.from_netcdf(tmp_path / "b.nc")
        for group in ("posterior", "sample_stats", "observed_data"):
            xa, xb = getattr(ia, group), getattr(ib, group)
            for name in xa.data_vars:
                np.testing.assert_array_equal(xa[name].values, xb[name].values, err_msg=f"{group}/{name}")
        p = ia.posterior
        assert dict(p.sizes) == {"chain": 1, "draw": 40, "pattern": 8, "quaternion": 4, "rotvec": 3}
        assert list(p["quaternion"].values) == ["w", "x", "y", "z"] and list(p["rotvec"].values) == ["x", "y", "z"]
        assert list(p["pattern"].values) == list(range(10, 18))
        assert p["pose_quaternion"].dims == ("chain", "draw", "pattern", "quaternion")
        q = p["pose_quaternion"].values.reshape(-1, 4).astype(np.float64)
        np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
        assert bool((q[:, 0] >= 0).all())
        R_q = quaternions_to_rotations(q)
        R_v = rotvec_to_rotmat(torch.as_tensor(p["pose_rotvec"].values.reshape(-1, 3).astype(np.float64))).numpy()
        np.testing.assert_allclose(R_q, R_v, atol=1e-5)
        ss = ia.sample_stats
        assert ss["cone_radius_deg"].dims == ("pattern", "credible_mass")
        assert list(ss["credible_mass"].values) == [0.5, 0.9]
        assert ss["hypothesis_weights"].shape == (8, 2)
        np.testing.assert_allclose(ss["hypothesis_weights"].values.sum(1), 1.0, atol=1e-6)
        np.testing.assert_allclose(ia.observed_data["photons"].values, 100.0 * np.arange(11, 19))
        for key in ("created_at", "arviz_version", "inference_library", "quaternion_convention", "source_data"):
            assert key in p.attrs, key
        assert "scalar-first" in p.attrs["quaternion_convention"]
        summ = az.summary(ia, var_names=["scale", "angle_to_mean_deg"], kind="stats")
        assert summ.shape[0] == 16
        np.testing.assert_allclose(summ.loc["scale[10]", "mean"], p["scale"].sel(pattern=10).values.mean(), atol=1e-3)
        hdi = az.hdi(ia, var_names=["scale"], hdi_prob=0.9)
        assert hdi["scale"].shape == (8, 2)
        np.testing.assert_allclose(hdi["scale"].values, ss["scale_hdi"].sel(credible_mass=0.9).values, rtol=1e-5)
    # arviz >= 1 (Python >= 3.12) reads the file as an xarray DataTree: the same groups must open that way
    import xarray as xr

    with xr.open_datatree(tmp_path / "a.nc", engine="h5netcdf") as tree:
        assert set(tree.children) == {"posterior", "sample_stats", "observed_data"}
        np.testing.assert_array_equal(tree["posterior"]["scale"].values, ia.posterior["scale"].values)


# ---------------------------------------------------------------------------------------------- refine
def test_coarse_to_fine_refinement_escapes_the_outer_speckles_wrong_basins() -> None:
    """Starts 8.6 deg off on a field with fine outer speckles (w0 40): Gauss-Newton on all pixels stops in a
    wrong basin of the outer pixels for most patterns; refining first on the inner half of |q| (whose basins
    are twice as wide) and then on all pixels finds the planted pose."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    side, n = 24, 64
    u = torch.linspace(-1, 1, side)
    X, Y = torch.meshgrid(u, u, indexing="ij")
    q = torch.stack([X, Y, -(X**2 + Y**2) * 0.05], -1).reshape(-1, 3) * 0.05
    model = SPIModel(SirenField(float(q.norm(dim=-1).max()), width=32, depth=2, w0=40.0, out_scale=0.3), q,
                     torch.full((side * side,), 1e-3))
    model.eval()
    R_true = random_rotmat(n, generator=gen)
    pix = torch.arange(side * side)
    with torch.no_grad():
        log_s = float(np.log(5.0)) - model.log_rate(R_true, torch.zeros(n), pix).mean(-1)  # ~5 photons a pixel
        y = torch.poisson(model.log_rate(R_true, log_s, pix).exp(), generator=gen)
    d = torch.randn(n, 3, generator=gen)
    start = R_true @ rotvec_to_rotmat(d / d.norm(dim=-1, keepdim=True) * 0.15)
    post = MixturePosterior(start[:, None], torch.diag_embed(torch.full((n, 1, 3), 0.01)), torch.ones(n, 1),
                            (log_s + 0.1)[:, None], torch.full((n, 1), 0.05))
    err = {}
    for stages in ((), (0.5,)):
        ref = refine_posterior(model, y.reshape(n, side, side), post, n_refine=1, n_iter=5, coarse_to_fine=stages)
        err[stages] = torch.rad2deg(geodesic_angle(ref.rotations[:, 0], R_true))
    assert float((err[()] < 1).float().mean()) < 0.5, err[()]  # all pixels at once: mostly stuck
    assert float((err[(0.5,)] < 1).float().mean()) > 0.85, err[(0.5,)]
    assert float(err[(0.5,)].median()) < 0.25 * float(err[()].median())
    with pytest.raises(ValueError, match="coarse_to_fine"):
        refine_posterior(model, y.reshape(n, side, side), post, n_refine=1, coarse_to_fine=(1.5,))


def test_refinement_finds_planted_pose_with_laplace_covariance() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    n_pix, n = 400, 6
    q = torch.randn(n_pix, 3, generator=gen) * 0.04
    q[:, 2] = -(q[:, :2] ** 2).sum(-1) * 2.0  # a curved (Ewald-like) sheet
    # out_scale 0.1: a clearly anisotropic random field (the default starts nearly isotropic, for fitting)
    model = SPIModel(SirenField(float(q.norm(dim=-1).max()), width=32, depth=2, out_scale=0.1), q,
                     torch.full((n_pix,), 1e-3))
    model.eval()
    R_true = random_rotmat(n, generator=gen)
    with torch.no_grad():
        base = model.log_rate(R_true, torch.zeros(n), torch.arange(n_pix))
        log_s = float(np.log(2000.0)) - base.mean(-1)  # ~2000 photons per pixel: a sharp likelihood
        y = torch.poisson(model.log_rate(R_true, log_s, torch.arange(n_pix)).exp(), generator=gen)
    start = R_true @ rotvec_to_rotmat(torch.randn(n, 3, generator=gen) * 0.03)
    post = MixturePosterior(start[:, None], torch.diag_embed(torch.full((n, 1, 3), 0.01)), torch.ones(n, 1),
                            (log_s + 0.1)[:, None], torch.full((n, 1), 0.05))
    ref = refine_posterior(model, y.reshape(n, 20, 20), post, n_refine=1, n_iter=5)
    assert ref.refined and ref.rotations.shape == (n, 1, 3, 3)
    err = geodesic_angle(ref.rotations[:, 0], R_true)
    sd = ref.pose_sigmas[:, 0].max(-1).values
    assert bool((err < 5 * sd).all()), (err, sd)
    assert float(err.mean()) < 0.5 * float(geodesic_angle(start, R_true).mean())
    # Laplace: the covariance is the inverse Hessian of the log posterior in (eps, log s) at the mode
    i = 0
    C, ls0 = ref.rotations[i, 0].detach(), ref.log_scale_loc[i, 0].detach()

    def f(theta: torch.Tensor) -> torch.Tensor:
        R = C @ torch.linalg.matrix_exp(hat(theta[:3]))  # smooth at 0 (unlike the closed-form exp map)
        ll = model.hypothesis_loglik(R[None, None], (ls0 + theta[3])[None], y[i:i + 1], torch.arange(n_pix))[0, 0]
        return ll + model.scale_prior(1).log_prob((ls0 + theta[3]).exp()[None])[0] + ls0 + theta[3]

    H = torch.autograd.functional.hessian(f, torch.zeros(4))
    cov_ref = torch.linalg.inv(-H)
    cov = ref.pose_tril[i, 0] @ ref.pose_tril[i, 0].T
    np.testing.assert_allclose(cov.detach().numpy(), cov_ref[:3, :3].numpy(), rtol=0.1,
                               atol=0.05 * float(cov_ref.diagonal()[:3].max()))
    assert float(ref.log_scale_sd[i, 0]) == pytest.approx(float(cov_ref[3, 3].sqrt()), rel=0.1)


# ------------------------------------------------------------------------------------------------- CLI
TINY = ["--batch-size", "16", "--epochs", "1", "--field-width", "16", "--n-heads", "1",
        "--pixels-per-pattern", "64", "--grid", "9", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_run(simulated, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    data = simulated(32, truth_grid=9, chunk=16, artifacts="FP")
    run = tmp_path_factory.mktemp("post") / "run"
    res = CliRunner().invoke(cli, ["fit", str(data), "-o", str(run), *TINY])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return run, data


def test_cli_posterior_end_to_end(tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, data = tiny_run
    out = tmp_path / "sub" / "posterior.nc"
    res = CliRunner().invoke(cli, ["posterior", str(run), str(data), "-o", str(out), "--draws", "30",
                                   "--batch-size", "4", "--max-patterns", "8", "--truth", "--calibrate",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "pose" in res.output and "fluence scale" in res.output
    cov = json.loads((out.parent / "coverage.json").read_text())
    for key in ("pose_coverage_50", "pose_coverage_90", "scale_coverage_50", "scale_coverage_90"):
        assert 0.0 <= cov[key] <= 1.0
    assert cov["n_patterns"] == 8 and cov["refine"] == 1.0
    assert not out.with_name(out.name + ".tmp").exists()
    pose_t, scale_t = load_calibration(out.parent / "calibration.json")
    assert pose_t > 0 and scale_t > 0
    # the stored temperatures are applied and recorded
    out2 = tmp_path / "cal.nc"
    res = CliRunner().invoke(cli, ["posterior", str(run), str(data), "-o", str(out2), "--draws", "10", "--max-patterns",
                                   "4", "--calibration", str(out.parent / "calibration.json"), "--no-progress"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata = az.from_netcdf(out)
        assert dict(idata.posterior.sizes)["draw"] == 30 and dict(idata.posterior.sizes)["pattern"] == 8
        assert idata.sample_stats.sizes["hypothesis"] == 2
        assert np.all(np.isfinite(idata.sample_stats["cone_radius_deg"].values))
        assert str(data.resolve()) == idata.posterior.attrs["source_data"]
        attrs = az.from_netcdf(out2).posterior.attrs
        assert attrs["pose_temperature"] == pytest.approx(pose_t)
        assert attrs["scale_temperature"] == pytest.approx(scale_t)
    # summaries only, refined on the cached cube: no draws, the same summary variables
    out3 = tmp_path / "summ.nc"
    res = CliRunner().invoke(cli, ["posterior", str(run), str(data), "-o", str(out3), "--max-patterns", "8",
                                   "--summaries-only", "--refine-on", "cache", "--cache-grid", "33", "--no-progress"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "8 patterns x summaries" in res.output and "patterns/s" in res.output
    # without a truth the temperatures are self-calibrated by default (at least 64 simulated patterns)
    assert "self-calibration on 64 patterns simulated from the fit" in res.output
    self_cal = json.loads((out3.parent / "calibration.json").read_text())
    assert self_cal["source"] == "self-simulation" and self_cal["n_patterns"] == 64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summ = az.from_netcdf(out3)
        assert "posterior" not in summ.groups()
        assert summ.sample_stats["cone_radius_deg"].shape == (8, 2)
        assert summ.sample_stats.attrs["refine_on"] == "cache" and summ.sample_stats.attrs["cache_grid"] == 33
        assert summ.sample_stats.attrs["pose_temperature"] == pytest.approx(self_cal["pose_temperature"])
        assert np.all(np.isfinite(summ.sample_stats["hypothesis_sigma_deg"].values))
    # the field's own pose error is measured (no truth) and widens every cone; off when the temperatures come
    # from a truth calibration, which already holds it
    assert "field pose error" in res.output
    out4 = tmp_path / "nofe.nc"
    res = CliRunner().invoke(cli, ["posterior", str(run), str(data), "-o", str(out4), "--max-patterns", "8",
                                   "--summaries-only", "--refine-on", "cache", "--cache-grid", "33", "--no-progress",
                                   "--no-field-error"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with_fe, without = summ.sample_stats, az.from_netcdf(out4).sample_stats
        assert with_fe.attrs["field_pose_sigma_deg"] > 0 and with_fe.attrs["field_error_probes"] == 4
        assert without.attrs["field_pose_sigma_deg"] == 0
        assert az.from_netcdf(out).sample_stats.attrs["field_pose_sigma_deg"] == 0  # --calibrate: off
        assert without.attrs["pose_temperature"] == pytest.approx(self_cal["pose_temperature"])
        wide, narrow = with_fe["cone_radius_deg"].values, without["cone_radius_deg"].values
        assert np.all(wide >= narrow - 0.05) and wide.mean() > narrow.mean()
    # --self-calibrate 0: the stored temperatures, no calibration run
    out5 = tmp_path / "stored" / "stored.nc"
    res = CliRunner().invoke(cli, ["posterior", str(run), str(data), "-o", str(out5), "--max-patterns", "4",
                                   "--summaries-only", "--self-calibrate", "0", "--no-field-error", "--no-progress"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "self-calibration" not in res.output and not (out5.parent / "calibration.json").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stored = az.from_netcdf(out5).sample_stats.attrs
    assert stored["pose_temperature"] == pytest.approx(DEFAULT_POSE_TEMPERATURE)
    res = CliRunner().invoke(cli, ["posterior", str(run), str(data), "-o", str(tmp_path / "even.nc"),
                                   "--cache-grid", "64"])
    assert res.exit_code != 0 and "--cache-grid" in res.output and "odd" in res.output
    # a missing run is a clean error
    res = CliRunner().invoke(cli, ["posterior", str(tmp_path / "nope"), str(data), "-o", str(out)])
    assert res.exit_code != 0 and "not found" in res.output


def test_self_calibration_simulates_from_the_fit(tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    """--self-calibrate: temperatures fitted on patterns simulated from the fitted model (no truth needed), and
    the export carries the fit's truth-free verdict."""
    from bayes_spi.dataio.h5 import SPIDataset
    from bayes_spi.infer.load import load_trained
    from bayes_spi.posterior.selfsim import simulate_from_fit

    run, data = tiny_run
    sim = simulate_from_fit(load_trained(run), 64, tmp_path / "sim.h5", photons=500.0, seed=2)
    with SPIDataset(sim) as ds:
        counts = ds.read(np.arange(64))
        assert ds.truth_rotations().shape == (64, 3, 3) and ds.truth_scales().shape == (64,)
        assert np.all(counts[:, ~ds.mask] == 0)
        # the requested photon level, up to the scale prior's spread and Poisson noise
        assert counts.sum(axis=(1, 2)).mean() == pytest.approx(500.0, rel=0.3)
    out = tmp_path / "selfcal" / "posterior.nc"
    res = CliRunner().invoke(cli, ["posterior", str(run), str(data), "-o", str(out), "--draws", "10",
                                   "--max-patterns", "4", "--self-calibrate", "24", "--no-progress"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    cal = json.loads((out.parent / "calibration.json").read_text())
    assert cal["source"] == "self-simulation" and cal["pose_temperature"] > 0 and cal["scale_temperature"] > 0
    assert not list(out.parent.glob("tmp*")), "the self-simulation's temporary files are removed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attrs = az.from_netcdf(out).posterior.attrs
    assert attrs["pose_temperature"] == pytest.approx(cal["pose_temperature"])
    verdict = json.loads((run / "verdict.json").read_text())["status"]
    assert attrs["fit_verdict"] == verdict
    if verdict != "converged":
        assert "WARNING" in res.output



# bitwise: both cubes' field evaluations must round alike, which a multi-threaded matmul over batches of another
# shape does not promise (two threads, make test's default, differed in the last bit)
@pytest.mark.usefixtures("one_thread")
def test_export_cube_reads_as_the_full_cube_and_converges_as_h_squared() -> None:
    """The export's cube evaluates the field only inside the ball a read at ``|x| <= q_max`` can touch, yet every
    such read equals the full cube's (bitwise); trilinear reads converge to the field as ``h^2`` (error / ~4 per
    halving of the voxel spacing), which is what the default cube four times as fine as the search's buys."""
    from bayes_spi.infer.outputs import field_log_cache
    from bayes_spi.posterior.netcdf import export_log_cube
    from bayes_spi.trilinear import sample_cube

    torch.manual_seed(0)
    q_max = 0.1
    field = SirenField(q_max, width=32, depth=2, w0=5.0)
    gen = torch.Generator().manual_seed(1)
    d = torch.randn(4000, 3, generator=gen)
    d = d / d.norm(dim=-1, keepdim=True)
    x = d * q_max * torch.rand(4000, 1, generator=gen) ** (1 / 3)
    x[:200] = d[:200] * q_max  # on the sphere |x| = q_max (the detector's corners)
    with torch.no_grad():
        ref = field.log_intensity(x)
        err = []
        for n in (17, 33, 65):
            cube, full = export_log_cube(field, n, q_max), field_log_cache(field, n, q_max)
            assert cube.shape == full.shape == (1, 1, n, n, n)
            assert torch.equal(sample_cube(cube, x, q_max), sample_cube(full, x, q_max))
            assert 0.25 < float((cube != full).float().mean()) < 0.5  # the corners: not evaluated
            err.append(float((sample_cube(cube, x, q_max) - ref).abs().max()))
    assert err[0] / err[1] > 2.5 and err[1] / err[2] > 2.5, err


def test_default_export_refines_on_a_fine_cube_that_agrees_with_the_field(tiny_run: tuple[Path, Path],
                                                                          tmp_path: Path) -> None:
    """The default export refines on the cached cube four times as fine as the search's (recorded in the file),
    and its posterior agrees with the one refined on the field itself (mean poses, 90% cones, fluence) better
    than one refined on the search's own cube (the same code, 4x coarser)."""
    import h5netcdf

    from bayes_spi.dataio.h5 import SPIDataset
    from bayes_spi.infer.load import load_trained
    from bayes_spi.posterior import write_posterior_netcdf
    from bayes_spi.posterior.coverage import angles_rad, read_summaries
    from bayes_spi.posterior.netcdf import export_cache_grid

    run, data = tiny_run
    trained = load_trained(run)
    default = ExportSettings()
    assert default.refine and default.refine_on == "cache" and default.cache_grid is None
    search_grid = trained.guide.search.cache_grid
    grid = export_cache_grid(trained.guide)
    assert grid == 4 * (search_grid - 1) + 1
    out = {}
    for name, kw in (("default", {}), ("field", {"refine_on": "field"}), ("coarse", {"cache_grid": search_grid})):
        out[name] = tmp_path / f"{name}.nc"
        with SPIDataset(data) as ds:
            write_posterior_netcdf(trained, ds, out[name], ExportSettings(n_draws=50, max_patterns=32,
                                                                            summaries_only=True, **kw))
    with h5netcdf.File(out["default"], "r") as f:
        assert f.attrs["refine_on"] == "cache" and int(f.attrs["cache_grid"]) == grid
    s = {name: read_summaries(path, data) for name, path in out.items()}
    err = {name: np.median(np.degrees(angles_rad(s[name]["mean_rotation"], s["field"]["mean_rotation"])))
           for name in ("default", "coarse")}
    r90 = np.median(s["default"]["cone_radius"][:, 1] / s["field"]["cone_radius"][:, 1])
    dlog = np.abs(s["default"]["log_scale_mean"] - s["field"]["log_scale_mean"])
    # this barely trained field is rough (its 50% cones: ~0.3 deg); on the demo's fit the median is 0.23 deg
    assert err["default"] < 0.7 and err["coarse"] > 2 * err["default"], err
    assert 0.8 < r90 < 1.2 and np.median(dlog) < 0.02 and dlog.max() < 0.1, (r90, dlog)
