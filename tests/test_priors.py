"""Pose and scale priors: normalisation (quadrature, Monte Carlo), sampling vs density, the empirical
scale prior's file formats and errors, spec parsing, and FitConfig's spec fields (old configs load)."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from scipy import integrate, stats

from bayes_spi.distributions import LogNormalMixture, PreferredOrientationSO3, UniformSO3
from bayes_spi.distributions.preferred import _frame, log_vmf_haar_normaliser, vmf_mean_resultant_length
from bayes_spi.infer.config import FitConfig
from bayes_spi.models.priors import (
    EmpiricalScalePrior,
    LogNormalScalePrior,
    PreferredOrientationPrior,
    UniformPosePrior,
    make_pose_prior,
    make_scale_prior,
)
from bayes_spi.config.specs import format_spec, normalize_spec, parse_spec
from bayes_spi.sim.fluence import pr772_histogram
from bayes_spi.so3 import geodesic_angle, random_rotmat

F64 = torch.float64


def _rotations_with_direction(w: torch.Tensor, axis: torch.Tensor, phi: float = 0.3) -> torch.Tensor:
    """Rotations ``(n, 3, 3)`` whose third column ``d`` has ``axis . d = w``."""
    b1, b2 = _frame(axis)
    r = torch.sqrt(1 - w**2)[:, None]
    d = w[:, None] * axis + r * (math.cos(phi) * b1 + math.sin(phi) * b2)
    e1, e2 = _frame(d)
    return torch.stack([e1, e2, d], dim=-1)


def _unit(v) -> torch.Tensor:
    t = torch.tensor(v, dtype=F64)
    return t / t.norm()


# ------------------------------------------------------------------------------------ preferred orientation
@pytest.mark.parametrize("kappa", [0.0, 1e-7, 0.3, 2.0, 10.0, 300.0])
def test_preferred_integrates_to_one_over_haar(kappa: float) -> None:
    """Under Haar, w = axis . (R e_z) is uniform on [-1, 1]: the integral is (1/2) int p dw."""
    axis = _unit([1.0, -2.0, 0.5])
    d = PreferredOrientationSO3(axis, torch.tensor(kappa, dtype=F64))

    def density(w: float) -> float:
        R = _rotations_with_direction(torch.tensor([w], dtype=F64), axis)
        return float(d.log_prob(R).exp())

    points = [1.0 - 1.0 / kappa] if kappa > 1 else None
    total, err = integrate.quad(density, -1.0, 1.0, points=points, limit=200, epsabs=1e-12)
    assert 0.5 * total == pytest.approx(1.0, abs=1e-7)


def test_preferred_monte_carlo_against_haar() -> None:
    axis = _unit([0.3, 0.4, -0.2])
    d = PreferredOrientationSO3(axis, torch.tensor(2.5, dtype=F64))
    R = random_rotmat(400_000, generator=torch.Generator().manual_seed(1), dtype=F64)
    p = d.log_prob(R).exp()
    se = float(p.std()) / math.sqrt(p.numel())
    assert abs(float(p.mean()) - 1.0) < 4 * se


def test_preferred_normaliser_small_and_large_kappa() -> None:
    for k in [0.0, 1e-12, 1e-6, 4.9e-5, 5.1e-5, 1e-3, 0.1, 1.0, 30.0, 1e4]:
        with mpmath.workdps(60):
            exact = 0.0 if k == 0 else float(mpmath.log(2 * mpmath.mpf(k) / (1 - mpmath.exp(-2 * mpmath.mpf(k)))))
        got = float(log_vmf_haar_normaliser(torch.tensor(k, dtype=F64)))
        assert got == pytest.approx(exact, rel=1e-10, abs=1e-15), k
    # huge kappa: finite, peaked at the axis
    d = PreferredOrientationSO3(torch.tensor([0.0, 0.0, 1.0]), torch.tensor(1e6))
    lp = d.log_prob(torch.eye(3))
    assert torch.isfinite(lp) and float(lp) == pytest.approx(math.log(2e6), rel=1e-6)


@pytest.mark.parametrize("kappa", [0.5, 3.0, 50.0])
def test_preferred_samples_follow_vmf(kappa: float) -> None:
    axis = _unit([2.0, -1.0, 2.0]).float()
    d = PreferredOrientationSO3(axis, torch.tensor(kappa)).expand([20_000])
    torch.manual_seed(0)
    R = d.sample()
    assert R.shape == (20_000, 3, 3)
    eye = torch.eye(3).expand_as(R)
    assert torch.allclose(R.transpose(-1, -2) @ R, eye, atol=1e-5)
    assert torch.allclose(torch.linalg.det(R), torch.ones(20_000), atol=1e-5)
    w = (R[..., :, 2] * axis).sum(-1).double()
    se = float(w.std()) / math.sqrt(w.numel())
    assert abs(float(w.mean()) - vmf_mean_resultant_length(kappa)) < 4 * se
    # the whole law of w = axis . d: F(w) = (exp(k (w - 1)) - exp(-2k)) / (1 - exp(-2k))
    cdf = lambda x: (np.exp(kappa * (np.clip(x, -1, 1) - 1)) - np.exp(-2 * kappa)) / -np.expm1(-2 * kappa)  # noqa: E731
    assert stats.kstest(w.numpy(), cdf).pvalue > 1e-3


def test_preferred_samples_match_density_including_in_plane_angle() -> None:
    """E_p[f(R)] from samples equals E_Haar[f(R) p(R)] for every matrix entry f = R_ij."""
    axis = _unit([0.2, 0.9, -0.4])
    d = PreferredOrientationSO3(axis, torch.tensor(3.0, dtype=F64))
    torch.manual_seed(2)
    R = d.sample((200_000,))
    H = random_rotmat(400_000, generator=torch.Generator().manual_seed(3), dtype=F64)
    weighted = H * d.log_prob(H).exp()[:, None, None]
    mean_p, se_p = R.mean(0), R.std(0) / math.sqrt(R.shape[0])
    mean_h, se_h = weighted.mean(0), weighted.std(0) / math.sqrt(H.shape[0])
    assert torch.all((mean_p - mean_h).abs() < 4.5 * torch.sqrt(se_p**2 + se_h**2) + 1e-3)
    # the in-plane axes average to zero, the beam direction to the vMF mean
    assert torch.allclose(mean_p[:, 2], vmf_mean_resultant_length(3.0) * axis, atol=0.01)
    assert mean_p[:, :2].abs().max() < 0.01


def test_preferred_kappa_zero_is_uniform() -> None:
    prior = PreferredOrientationPrior((1.0, 1.0, 0.0), concentration=0.0)
    R = random_rotmat(1000, generator=torch.Generator().manual_seed(4))
    assert torch.equal(prior(1000).log_prob(R), UniformPosePrior()(1000).log_prob(R))
    torch.manual_seed(5)
    S = prior(20_000).sample()
    # Haar: the rotation angle has density (1 - cos t) / pi on [0, pi]
    t = geodesic_angle(torch.eye(3).expand_as(S), S).double().numpy()
    assert stats.kstest(t, lambda x: (x - np.sin(x)) / np.pi).pvalue > 1e-3
    assert S.mean(0).abs().max() < 0.02


def test_preferred_prior_shapes_broadcast_and_validation() -> None:
    prior = PreferredOrientationPrior((0.0, 0.0, 2.0), concentration=4.0)
    assert torch.allclose(prior.axis, torch.tensor([0.0, 0.0, 1.0]))
    d = prior(5)
    assert d.batch_shape == (5,) and d.event_shape == (3, 3)
    R = d.sample()
    assert R.shape == (5, 3, 3)
    assert d.log_prob(R.expand(7, 5, 3, 3)).shape == (7, 5)  # hypotheses x patterns, as the trainer uses it
    d_val = PreferredOrientationSO3(prior.axis, prior.kappa, validate_args=True)
    with pytest.raises(ValueError):
        d_val.log_prob(torch.diag(torch.tensor([1.0, 1.0, -1.0])))  # a reflection
    with pytest.raises(ValueError, match="axis"):
        PreferredOrientationPrior((0.0, 0.0, 0.0), 1.0)
    with pytest.raises(ValueError, match="kappa"):
        PreferredOrientationPrior((0.0, 0.0, 1.0), -1.0)
    with pytest.raises(ValueError):
        PreferredOrientationSO3(torch.tensor([0.0, 0.0, 2.0]), torch.tensor(1.0), validate_args=True)  # not unit


def test_preferred_log_prob_gradient_in_kappa() -> None:
    axis = _unit([0.0, 1.0, 1.0])
    R = random_rotmat(4, generator=torch.Generator().manual_seed(6), dtype=F64)
    for k0 in (1e-6, 0.7, 20.0):
        kappa = torch.tensor(k0, dtype=F64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda k: PreferredOrientationSO3(axis, k).log_prob(R), (kappa,))


# ------------------------------------------------------------------------------------ empirical scale prior
def _check_proper(d: LogNormalMixture) -> None:
    """Density integrates to 1 and has mean 1 (numerically, in u = log s); the cdf matches it."""
    lp = lambda u: float(d.log_prob(torch.tensor(math.exp(u), dtype=F64)).exp()) * math.exp(u)  # noqa: E731
    lo, hi = float(d.locs.min()) - 12 * float(d.bandwidth), float(d.locs.max()) + 12 * float(d.bandwidth)
    mass, _ = integrate.quad(lp, lo, hi, limit=400)
    mean, _ = integrate.quad(lambda u: lp(u) * math.exp(u), lo, hi, limit=400)
    assert mass == pytest.approx(1.0, abs=1e-6)
    assert mean == pytest.approx(1.0, abs=1e-6)
    assert float(d.mean) == pytest.approx(1.0, abs=1e-6)
    for s in (0.5, 1.0, 1.7):
        part, _ = integrate.quad(lp, lo, math.log(s), limit=400)
        assert float(d.cdf(torch.tensor(s, dtype=F64))) == pytest.approx(part, abs=1e-6)


def _f64(d: LogNormalMixture) -> LogNormalMixture:
    return LogNormalMixture(d.locs.double(), d.logits.double(), d.bandwidth.double())


def test_lognormal_mixture_is_mixture_same_family_with_scipy_density() -> None:
    """LogNormalMixture is MixtureSameFamily(Categorical, LogNormal): density, cdf and moments against SciPy's
    log-normals; batch expansion shares the components; cdf 0 at s <= 0; one normal per sampled value."""
    import pyro.distributions as dist

    locs = torch.tensor([-0.4, 0.1, 0.9], dtype=F64)
    logits = torch.tensor([0.3, -1.0, 0.5], dtype=F64)
    d = LogNormalMixture(locs, logits, 0.35).expand([2])
    assert isinstance(d, dist.MixtureSameFamily) and d.batch_shape == (2,) and d.locs is locs
    w = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum()
    comps = [stats.lognorm(s=0.35, scale=math.exp(m)) for m in locs.tolist()]
    x = np.array([0.05, 0.4, 1.0, 2.5, 9.0])
    pdf = sum(wj * c.pdf(x) for wj, c in zip(w, comps))
    cdf = sum(wj * c.cdf(x) for wj, c in zip(w, comps))
    lp = d.log_prob(torch.as_tensor(x)[:, None])
    assert lp.shape == (5, 2) and np.allclose(lp[:, 0].numpy(), np.log(pdf), rtol=1e-12)
    assert np.allclose(d.cdf(torch.as_tensor(x)[:, None])[:, 1].numpy(), cdf, rtol=1e-12)
    assert torch.equal(d.cdf(torch.tensor([-1.0, 0.0], dtype=F64)[:, None]), torch.zeros(2, 2, dtype=F64))
    mean = sum(wj * c.mean() for wj, c in zip(w, comps))
    var = sum(wj * (c.var() + c.mean() ** 2) for wj, c in zip(w, comps)) - mean**2
    assert np.allclose(d.mean.numpy(), mean, rtol=1e-12) and np.allclose(d.variance.numpy(), var, rtol=1e-10)
    torch.manual_seed(3)
    s = d.sample((4,))
    torch.manual_seed(3)
    j = torch.distributions.Categorical(logits=logits).sample((4, 2))
    assert torch.equal(s, torch.exp(locs[j] + 0.35 * torch.randn(4, 2, dtype=F64)))


def test_pr772_prior_is_proper_mean_one_and_realistic() -> None:
    prior = EmpiricalScalePrior.pr772()
    d = prior(3)
    assert d.batch_shape == (3,) and d.event_shape == ()
    _check_proper(_f64(prior(1)))
    # spread of the packaged histogram: sd about 0.48 of the mean, range ~0.3x - 2.6x
    c, p = pr772_histogram()
    sd_hist = math.sqrt((p * (c - 1) ** 2).sum())
    assert math.sqrt(float(d.variance[0])) == pytest.approx(sd_hist, rel=0.1)
    grid = np.linspace(0.02, 5.0, 5000)
    cdf = _f64(prior(1)).cdf(torch.as_tensor(grid)[:, None]).squeeze(-1).numpy()
    assert 0.15 < np.interp(0.001, cdf, grid) < c[0] and c[-1] < np.interp(0.999, cdf, grid) < 3.5


def test_empirical_samples_match_cdf() -> None:
    prior = EmpiricalScalePrior.pr772()
    torch.manual_seed(7)
    s = prior(50_000).sample().double()
    assert bool((s > 0).all())
    d = _f64(prior(1))
    res = stats.kstest(s.numpy(), lambda x: d.cdf(torch.as_tensor(x, dtype=F64)).squeeze(-1).numpy())
    assert res.pvalue > 1e-3
    assert float(s.mean()) == pytest.approx(1.0, abs=4 * float(s.std()) / math.sqrt(s.numel()))


def test_empirical_from_per_image_totals_recovers_lognormal(tmp_path) -> None:
    rng = np.random.default_rng(0)
    totals = 2e4 * np.exp(0.3 * rng.standard_normal(20_000))
    np.save(tmp_path / "totals.npy", totals)
    prior = EmpiricalScalePrior.from_file(tmp_path / "totals.npy", bins=60)
    assert prior.locs.numel() <= 60
    d = _f64(prior(1))
    _check_proper(d)
    # the smoothed estimate is close to LogNormal(-0.045, 0.3): compare log densities where it matters
    ref = LogNormalScalePrior(0.3)(1)
    s = torch.linspace(0.5, 1.8, 50, dtype=F64)
    err = (d.log_prob(s).squeeze() - ref.log_prob(s.float()[:, None]).squeeze().double()).abs()
    assert float(err.max()) < 0.1


def test_empirical_file_formats_agree(tmp_path) -> None:
    edges = np.linspace(1e3, 5e3, 21)
    counts = np.array([0, 1, 3, 6, 10, 15, 20, 22, 21, 18, 14, 10, 7, 5, 3, 2, 1, 1, 0, 1], dtype=float)
    centres = 0.5 * (edges[1:] + edges[:-1])
    np.savez(tmp_path / "edges.npz", edges=edges, counts=counts)
    np.savez(tmp_path / "centres.npz", centres=centres, counts=counts)
    np.save(tmp_path / "table.npy", np.stack([centres, counts / counts.sum()]))
    lines = ["edges,counts"] + [f"{e},{c}" for e, c in zip(edges[:-1], counts)] + [f"{edges[-1]},"]
    (tmp_path / "edges.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "centres.csv").write_text("centre,count\n" + "\n".join(f"{a},{b}" for a, b in zip(centres, counts)))
    priors = {name: EmpiricalScalePrior.from_file(tmp_path / name)
              for name in ("edges.npz", "centres.npz", "table.npy", "edges.csv", "centres.csv")}
    ref = priors["edges.npz"]
    assert ref.locs.numel() == int((counts > 0).sum())
    for name, p in priors.items():
        assert torch.allclose(p.locs, ref.locs, atol=1e-6), name
        assert torch.allclose(p.logits, ref.logits, atol=1e-6), name
        assert float(p.bandwidth) == pytest.approx(float(ref.bandwidth), rel=1e-6), name
    # per-image values in .npz and .csv
    vals = np.array([900.0, 1000.0, 1100.0, 1300.0, 950.0])
    np.savez(tmp_path / "values.npz", values=vals)
    (tmp_path / "values.csv").write_text("value\n" + "\n".join(map(str, vals)))
    a = EmpiricalScalePrior.from_file(tmp_path / "values.npz")
    b = EmpiricalScalePrior.from_file(tmp_path / "values.csv")
    assert torch.allclose(a.locs, b.locs) and float(a.bandwidth) == float(b.bandwidth)
    # explicit smoothing is used as given
    explicit = EmpiricalScalePrior.from_file(tmp_path / "values.npz", smoothing=0.05)
    assert float(explicit.bandwidth) == pytest.approx(0.05)


def test_empirical_file_errors_name_file_and_field(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        EmpiricalScalePrior.from_file(tmp_path / "nope.npy")
    np.save(tmp_path / "cube.npy", np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match=r"cube\.npy: field array: expected shape \(N,\)"):
        EmpiricalScalePrior.from_file(tmp_path / "cube.npy")
    np.save(tmp_path / "neg.npy", np.array([1.0, -2.0, 3.0]))
    with pytest.raises(ValueError, match=r"neg\.npy: field array: expected finite photon totals > 0"):
        EmpiricalScalePrior.from_file(tmp_path / "neg.npy")
    np.savez(tmp_path / "bad.npz", edges=np.array([1.0, 2.0, 3.0]), counts=np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"bad\.npz: field counts: expected shape \(2,\)"):
        EmpiricalScalePrior.from_file(tmp_path / "bad.npz")
    np.savez(tmp_path / "keys.npz", foo=np.ones(3))
    with pytest.raises(ValueError, match=r"keys\.npz: field fields: expected 'values'.*got fields \['foo'\]"):
        EmpiricalScalePrior.from_file(tmp_path / "keys.npz")
    (tmp_path / "x.csv").write_text("photons,n\n1,2\n")
    with pytest.raises(ValueError, match=r"x\.csv: field header: expected columns 'value'"):
        EmpiricalScalePrior.from_file(tmp_path / "x.csv")
    (tmp_path / "y.csv").write_text("value\n1\nabc\n")
    with pytest.raises(ValueError, match=r"y\.csv: field value: expected numbers"):
        EmpiricalScalePrior.from_file(tmp_path / "y.csv")
    (tmp_path / "z.txt.json").write_text("{}")
    with pytest.raises(ValueError, match="suffix"):
        EmpiricalScalePrior.from_file(tmp_path / "z.txt.json")
    np.save(tmp_path / "same.npy", np.full(5, 7.0))
    with pytest.raises(ValueError, match="smoothing"):
        EmpiricalScalePrior.from_file(tmp_path / "same.npy")
    # through the spec, the flag is named too
    with pytest.raises(ValueError, match=r"--scale-prior empirical: .*neg\.npy"):
        make_scale_prior({"name": "empirical", "file": str(tmp_path / "neg.npy")})


# ------------------------------------------------------------------------------------ specs and registry
def test_spec_parsing_and_factories(tmp_path) -> None:
    assert parse_spec("preferred:axis=0,0,1;kappa=2") == {"name": "preferred", "axis": [0, 0, 1], "kappa": 2}
    assert parse_spec("preferred:axis=0,0,1:kappa=2") == parse_spec("preferred:axis=0,0,1;kappa=2")
    assert parse_spec("empirical:file=C:/d/x.npy;bins=50")["file"] == "C:/d/x.npy"
    spec = normalize_spec("pose_prior", "preferred:axis=0,3,4:kappa=2")
    assert spec == {"name": "preferred", "axis": [0.0, 0.6, 0.8], "kappa": 2.0}
    assert normalize_spec("pose_prior", parse_spec(format_spec(spec))) == spec
    prior = make_pose_prior(spec)
    assert isinstance(prior, PreferredOrientationPrior) and float(prior.kappa) == 2.0
    assert isinstance(make_pose_prior("uniform"), UniformPosePrior)
    assert isinstance(make_scale_prior("lognormal:sigma=0.2"), LogNormalScalePrior)
    assert isinstance(make_scale_prior("pr772"), EmpiricalScalePrior)
    np.save(tmp_path / "t.npy", np.array([1.0, 2.0, 3.0, 2.5]))
    p = make_scale_prior(f"empirical:file={tmp_path / 't.npy'}:smoothing=0.1")
    assert isinstance(p, EmpiricalScalePrior) and float(p.bandwidth) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "kind, text, message",
    [
        ("pose_prior", "gaussian", "unknown pose prior 'gaussian': expected one of uniform, preferred"),
        ("pose_prior", "preferred", "--pose-prior preferred: missing parameter kappa"),
        ("pose_prior", "preferred:kapa=2", "unknown parameter.*kapa: expected axis, kappa"),
        ("pose_prior", "preferred:kappa=-1", "kappa: expected a number >= 0, got -1"),
        ("pose_prior", "preferred:axis=0,0;kappa=1", "axis: expected 3 comma-separated numbers"),
        ("pose_prior", "preferred:kappa", "expected KEY=VALUE"),
        ("scale_prior", "gamma", "unknown scale prior 'gamma': expected one of lognormal, pr772, empirical"),
        ("scale_prior", "empirical", "--scale-prior empirical: missing parameter file"),
        ("scale_prior", "empirical:file=x.npy;bins=1.5", "bins: expected an integer >= 2"),
        ("likelihood", "gaussian", "unknown likelihood 'gaussian': expected one of poisson, poisson-gaussian"),
        ("likelihood", "poisson-gaussian:sigma=abc", "--likelihood poisson-gaussian: sigma: expected a number >= 0"),
        ("intensity_prior", "flat", "unknown intensity prior 'flat': expected one of none, wilson"),
        ("intensity_prior", "none:weight=1", "--intensity-prior none: unknown parameter"),
    ],
)
def test_spec_errors(kind: str, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        normalize_spec(kind, text)


def test_fitconfig_specs_roundtrip_and_old_configs() -> None:
    cfg = FitConfig(pose_prior="preferred:axis=1,0,0:kappa=3", scale_prior="pr772",
                    likelihood="poisson-gaussian:sigma=0.3", intensity_prior={"name": "wilson", "weight": 0.5})
    assert cfg.pose_prior == {"name": "preferred", "axis": [1.0, 0.0, 0.0], "kappa": 3.0}
    assert cfg.scale_prior == {"name": "pr772", "smoothing": None}
    assert cfg.likelihood == {"name": "poisson-gaussian", "sigma": 0.3, "background": 0.0}
    assert FitConfig.from_dict(cfg.to_dict()) == cfg
    # a config.yaml written before the specs existed: the old scalar fields become the specs
    old = FitConfig().to_dict()
    for key in ("pose_prior", "scale_prior", "likelihood", "intensity_prior"):
        del old[key]
    old.update(scale_prior_sigma=0.3, background=0.2)
    loaded = FitConfig.from_dict(old)
    assert loaded.scale_prior == {"name": "lognormal", "sigma": 0.3}
    assert loaded.likelihood == {"name": "poisson", "background": 0.2}
    assert loaded.pose_prior == {"name": "uniform"} and loaded.intensity_prior == {"name": "none"}
    # the old fields follow the specs, and a non-default old value fills a default spec value
    assert FitConfig(scale_prior="lognormal:sigma=0.2").scale_prior_sigma == 0.2
    assert FitConfig(scale_prior="lognormal", scale_prior_sigma=0.7).scale_prior == {"name": "lognormal", "sigma": 0.7}
    assert FitConfig(likelihood="poisson-gaussian:sigma=0.1", background=0.3).likelihood["background"] == 0.3
    with pytest.raises(ValueError, match="scale_prior_sigma"):
        FitConfig(scale_prior="lognormal:sigma=0.2", scale_prior_sigma=0.7)
    with pytest.raises(ValueError, match="scale_prior_sigma: applies to the lognormal"):
        FitConfig(scale_prior="pr772", scale_prior_sigma=0.7)
    with pytest.raises(ValueError, match="unknown pose prior"):
        FitConfig(pose_prior={"name": "bogus"})


def test_uniform_so3_reference_measure_is_shared() -> None:
    """Preferred prior and UniformSO3 use the same reference measure: kappa -> 0 gives log_prob -> 0."""
    R = random_rotmat(100, generator=torch.Generator().manual_seed(8), dtype=F64)
    small = PreferredOrientationSO3(_unit([1.0, 0.0, 0.0]), torch.tensor(1e-9, dtype=F64)).log_prob(R)
    assert torch.allclose(small, UniformSO3().log_prob(R), atol=1e-8)


def test_hypothesis_logpost_adds_the_pose_prior() -> None:
    """The guide ranks hypotheses by likelihood x pose prior: uniform adds 0, preferred adds its log density."""
    from bayes_spi.models.fields import SirenField
    from bayes_spi.models.priors import PreferredOrientationPrior
    from bayes_spi.models.spi import SPIModel
    from bayes_spi.so3 import random_rotmat

    torch.manual_seed(0)
    q = torch.randn(64, 3) * 0.03
    R = random_rotmat(6).reshape(3, 2, 3, 3)
    images = torch.poisson(torch.ones(2, 8, 8))
    log_s = torch.zeros(2)
    uniform = SPIModel(SirenField(q_max=0.125), q, torch.full((64,), 1e-3))
    ll = uniform.hypothesis_loglik(R, log_s, images, torch.arange(64))
    torch.testing.assert_close(uniform.hypothesis_logpost(R, log_s, images, torch.arange(64)), ll)
    prior = PreferredOrientationPrior(axis=(0.0, 0.0, 1.0), concentration=3.0)
    pref = SPIModel(uniform.field, q, torch.full((64,), 1e-3), pose_prior=prior)
    lp = pref.hypothesis_logpost(R, log_s, images, torch.arange(64))
    torch.testing.assert_close(lp - ll, prior(2).log_prob(R))
    assert float((lp - ll).detach().abs().max()) > 0.1  # the prior really moved the ranking scores
