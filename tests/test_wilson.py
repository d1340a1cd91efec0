"""Wilson distributions, Sigma(|q|) profiles and the Wilson prior factor (use (a)): closed forms and SciPy."""

import math

import gemmi
import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from scipy import integrate, stats

from bayes_spi.distributions import WilsonAmplitude, WilsonIntensity, kl_lognormal_wilson, wilson_intensity_log_prob
from bayes_spi.geometry import get_preset
from bayes_spi.infer.build import detector_tensors
from bayes_spi.models.fields import SirenField
from bayes_spi.models.intensity_priors import (
    NoIntensityPrior,
    RadialProfile,
    WilsonPrior,
    composition_profile,
    composition_sigma,
    make_intensity_prior,
    sample_ball,
    shannon_count,
)
from bayes_spi.models.spi import SPIBatch, SPIModel
from bayes_spi.sim.structure import Structure

pytestmark = pytest.mark.usefixtures("one_thread")


SIGMAS = torch.tensor([0.3, 1.0, 7.5], dtype=torch.float64)


def _scipy(kind: str, centric: bool, sigma: float):
    if kind == "intensity":
        return stats.chi2(df=1, scale=sigma) if centric else stats.expon(scale=sigma)
    return stats.halfnorm(scale=math.sqrt(sigma)) if centric else stats.rayleigh(scale=math.sqrt(sigma / 2))


def _dist(kind: str, sigma, centric: bool):
    return (WilsonIntensity if kind == "intensity" else WilsonAmplitude)(sigma, centric=centric)


@pytest.mark.parametrize("kind", ["intensity", "amplitude"])
@pytest.mark.parametrize("centric", [False, True])
def test_log_prob_moments_cdf_entropy_match_scipy(kind, centric):
    d = _dist(kind, SIGMAS, centric)
    x = torch.tensor([0.05, 0.4, 1.3, 4.0, 11.0], dtype=torch.float64)[:, None].expand(5, 3)
    for j, sigma in enumerate(SIGMAS.tolist()):
        ref = _scipy(kind, centric, sigma)
        assert np.allclose(d.log_prob(x)[:, j].numpy(), ref.logpdf(x[:, j].numpy()), rtol=1e-10, atol=1e-12)
        assert np.allclose(d.cdf(x)[:, j].numpy(), ref.cdf(x[:, j].numpy()), rtol=1e-9, atol=1e-12)
        u = torch.tensor([0.01, 0.3, 0.9], dtype=torch.float64)
        assert np.allclose(d.icdf(u[:, None].expand(3, 3))[:, j].numpy(), ref.ppf(u.numpy()), rtol=1e-9)
        assert float(d.mean[j]) == pytest.approx(ref.mean(), rel=1e-12)
        assert float(d.variance[j]) == pytest.approx(ref.var(), rel=1e-12)
        assert float(d.entropy()[j]) == pytest.approx(float(ref.entropy()), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("kind", ["intensity", "amplitude"])
@pytest.mark.parametrize("centric", [False, True])
def test_densities_normalise_and_give_their_moments_by_quadrature(kind, centric):
    sigma = 2.5
    d = _dist(kind, torch.tensor(sigma, dtype=torch.float64), centric)

    def pdf(x: float) -> float:
        return float(d.log_prob(torch.tensor(x, dtype=torch.float64)).exp())

    # the centric intensity has an integrable 1/sqrt(I) singularity at 0: split the range
    pieces = [(0.0, 1e-3), (1e-3, 1.0), (1.0, np.inf)]
    mass = sum(integrate.quad(pdf, a, b, limit=200)[0] for a, b in pieces)
    mean = sum(integrate.quad(lambda x: x * pdf(x), a, b, limit=200)[0] for a, b in pieces)
    m2 = sum(integrate.quad(lambda x: x * x * pdf(x), a, b, limit=200)[0] for a, b in pieces)
    assert mass == pytest.approx(1.0, abs=1e-6)
    assert mean == pytest.approx(float(d.mean), rel=1e-6)
    assert m2 - mean**2 == pytest.approx(float(d.variance), rel=1e-5)
    if kind == "amplitude":  # E F^2 = Sigma: the definition of Sigma
        assert m2 == pytest.approx(sigma, rel=1e-6)


@pytest.mark.parametrize("centric", [False, True])
def test_squared_wilson_amplitude_is_wilson_intensity_ks(centric):
    torch.manual_seed(0)
    sigma = 3.0
    F = WilsonAmplitude(torch.tensor(sigma, dtype=torch.float64), centric=centric).sample((20000,))
    ref = WilsonIntensity(torch.tensor(sigma, dtype=torch.float64), centric=centric)
    res = stats.kstest((F**2).numpy(), lambda x: ref.cdf(torch.as_tensor(x)).numpy())
    assert res.pvalue > 0.01
    # and the amplitude samples themselves follow the closed-form amplitude law
    res_f = stats.kstest(F.numpy(), _scipy("amplitude", centric, sigma).cdf)
    assert res_f.pvalue > 0.01
    # a wrong Sigma is detected (the test has power)
    wrong = WilsonIntensity(torch.tensor(1.2 * sigma, dtype=torch.float64), centric=centric)
    assert stats.kstest((F**2).numpy(), lambda x: wrong.cdf(torch.as_tensor(x)).numpy()).pvalue < 1e-6


@pytest.mark.parametrize("cls", [WilsonIntensity, WilsonAmplitude])
@pytest.mark.parametrize("centric", [False, True])
def test_rsample_is_reparameterised(cls, centric):
    """d/dSigma of the sample mean of F^2 (amplitude) or I (intensity): E = Sigma, so the gradient -> 1."""
    torch.manual_seed(1)
    sigma = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    x = cls(sigma, centric=centric).rsample((200000,))
    (x**2 if cls is WilsonAmplitude else x).mean().backward()
    assert float(sigma.grad) == pytest.approx(1.0, abs=0.02)


def test_shapes_expand_and_validation():
    d = WilsonAmplitude(torch.ones(4, 1) * 2.0)
    assert d.batch_shape == (4, 1) and d.event_shape == ()
    assert d.sample((3,)).shape == (3, 4, 1)
    assert d.log_prob(torch.ones(5)).shape == (4, 5)
    e = d.expand((4, 6))
    assert e.batch_shape == (4, 6) and e.sample().shape == (4, 6) and e.centric is False
    assert WilsonIntensity(2.0, centric=True).expand((2,)).centric is True
    with pytest.raises(ValueError):
        WilsonIntensity(torch.tensor([-1.0, 1.0]), validate_args=True)
    with pytest.raises(ValueError):
        WilsonIntensity(torch.tensor(1.0), validate_args=True).log_prob(torch.tensor(-0.5))
    with pytest.raises(ValueError, match="expected centric to be a bool"):
        WilsonAmplitude(1.0, centric="yes")


def test_log_space_intensity_density_matches_log_prob():
    sigma = torch.tensor([0.5, 2.0, 40.0], dtype=torch.float64)
    i = torch.tensor([0.1, 3.0, 100.0], dtype=torch.float64)
    for centric in (False, True):
        ref = WilsonIntensity(sigma, centric=centric).log_prob(i)
        assert torch.allclose(wilson_intensity_log_prob(i.log(), sigma.log(), centric), ref, rtol=1e-12)
    # huge intensities stay finite in log space
    out = wilson_intensity_log_prob(torch.tensor(300.0), torch.tensor(299.0))
    assert float(out) == pytest.approx(-299.0 - math.e)


@pytest.mark.parametrize("centric", [False, True])
def test_kl_lognormal_to_wilson_matches_quadrature_and_monte_carlo(centric):
    loc, scale, sigma = 0.3, 0.4, 1.7
    kl = float(kl_lognormal_wilson(torch.tensor(loc), torch.tensor(scale), torch.tensor(sigma), centric))
    q = stats.lognorm(s=scale, scale=math.exp(loc))
    p = _scipy("amplitude", centric, sigma)
    quad = integrate.quad(lambda f: q.pdf(f) * (q.logpdf(f) - p.logpdf(f)), 0, np.inf, limit=200)[0]
    assert kl == pytest.approx(quad, rel=1e-6)
    # dispatch through torch.distributions.kl_divergence
    ln = torch.distributions.LogNormal(torch.tensor(loc), torch.tensor(scale))
    w = WilsonAmplitude(torch.tensor(sigma), centric=centric)
    assert float(torch.distributions.kl_divergence(ln, w)) == pytest.approx(kl, rel=1e-6)
    torch.manual_seed(0)
    f = ln.sample((200000,))
    assert float((ln.log_prob(f) - w.log_prob(f)).mean()) == pytest.approx(kl, abs=0.01)


# ---------------------------------------------------------------------------------- Sigma(|q|)
def test_composition_sigma_matches_hand_computation():
    """2 C (occupancy 1) and 1 O (occupancy 0.5): Sigma = 2 f_C^2 + 0.25 f_O^2, f from the IT92 coefficients."""
    st = Structure.from_arrays(["C", "C", "O"], np.array([[0.0, 0, 0], [1.5, 0, 0], [0, 2.0, 0]]),
                               occupancies=np.array([1.0, 1.0, 0.5]))
    q = np.array([0.0, 0.1, 0.37, 1.2])

    def f_hand(symbol: str) -> np.ndarray:
        c = gemmi.Element(symbol).it92.get_coefs()
        s2 = (q / 2.0) ** 2  # s = sin(theta)/lambda = |q| / 2
        return sum(c[i] * np.exp(-c[4 + i] * s2) for i in range(4)) + c[8]

    expected = 2.0 * f_hand("C") ** 2 + 0.25 * f_hand("O") ** 2
    assert np.allclose(composition_sigma(st, q), expected, rtol=1e-12)
    assert composition_sigma(st, np.array(0.0)) == pytest.approx(2 * 36 + 0.25 * 64, rel=5e-3)  # f(0) ~ Z
    assert composition_sigma(st, torch.tensor(q)).shape == (4,)


def test_random_molecule_intensities_follow_wilson_with_composition_sigma():
    """Wilson's law itself: |F|^2 of a random 300-atom molecule at |q| >> 1/D is Exp(mean sum f_j^2)."""
    rng = np.random.default_rng(0)
    n_atoms, radius = 300, 20.0
    pos = rng.normal(size=(n_atoms, 3))
    pos *= (radius * rng.random((n_atoms, 1)) ** (1 / 3)) / np.linalg.norm(pos, axis=1, keepdims=True)
    els = rng.choice(["C", "N", "O"], size=n_atoms)
    st = Structure.from_arrays(list(els), pos)
    q_abs = 0.35  # q D = 14
    dirs = rng.normal(size=(3000, 3))
    q = q_abs * dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    F = np.zeros(len(q), dtype=complex)
    for el in st.elements:
        from bayes_spi.sim.structure import form_factor

        F += form_factor(el, np.array(q_abs)) * np.exp(2j * np.pi * q @ st.positions[el].T).sum(axis=1)
    ratio = np.abs(F) ** 2 / composition_sigma(st, np.array(q_abs))
    assert stats.kstest(ratio, "expon").pvalue > 0.001
    assert ratio.mean() == pytest.approx(1.0, abs=0.1)


def test_radial_profile_flat_start_basis_and_composition_normalisation():
    p = RadialProfile(0.125, n_basis=5)
    q = torch.linspace(0, 0.2, 9)
    assert torch.allclose(p.log_sigma(q), torch.zeros(9))
    with torch.no_grad():
        p.coef.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, -1.0]))
        p.log_scale.fill_(0.5)
    out = p.log_sigma(torch.tensor([0.0, 0.125, 0.3])).detach()
    phi = lambda x: math.exp(-0.5 * (x / 0.25) ** 2)  # noqa: E731 -- basis spacing 1/4
    assert float(out[0]) == pytest.approx(0.5 + 1.0 - phi(1.0), abs=1e-6)
    assert float(out[1]) == pytest.approx(0.5 + phi(1.0) - 1.0, abs=1e-6)
    assert float(out[2]) == pytest.approx(float(out[1]))  # constant beyond q_max
    # composition profile: ball average of Sigma_rel is 1 at log_scale 0, shape follows sum f^2
    st = Structure.from_arrays(["C", "O"], np.array([[0.0, 0, 0], [1.2, 0, 0]]))
    q_max = 0.25
    cp = composition_profile(st, q_max)
    x = np.linspace(0, q_max, 2001)
    sig = cp(torch.as_tensor(x, dtype=torch.float32)).detach().double().numpy()
    assert integrate.trapezoid(sig * 3 * x**2 / q_max**3, x) == pytest.approx(1.0, rel=1e-3)
    ref = composition_sigma(st, x)
    assert np.allclose(sig / sig[0], ref / ref[0], rtol=2e-3)


# ---------------------------------------------------------------------------------- (a) the prior factor
def test_sample_ball_is_uniform():
    torch.manual_seed(0)
    q = sample_ball(20000, 0.2, dtype=torch.float64)
    r = q.norm(dim=-1)
    assert float(r.max()) <= 0.2
    assert stats.kstest(((r / 0.2) ** 3).numpy(), "uniform").pvalue > 0.01
    assert torch.allclose(q.mean(0), torch.zeros(3, dtype=torch.float64), atol=0.005)


def test_wilson_factor_equals_scipy_computation():
    torch.manual_seed(0)
    field = SirenField(0.125, width=16, depth=2, log_offset=3.0)
    profile = RadialProfile(0.125, n_basis=4)
    with torch.no_grad():
        profile.coef.copy_(torch.tensor([0.5, 0.1, -0.3, -1.0]))
    prior = WilsonPrior(profile, 0.125, weight=0.7, n_points=64, n_effective=shannon_count(60.0, 0.125))
    q = sample_ball(64, 0.125)
    got = float(prior.log_factor(field, q).detach())
    i = field(q).detach().double().numpy()
    sigma = np.exp(3.0 + profile.log_sigma(q.norm(dim=-1)).detach().double().numpy())
    n_eff = 0.5 * 4 / 3 * math.pi * (60 * 0.125) ** 3
    assert got == pytest.approx(0.7 * n_eff / 64 * stats.expon(scale=sigma).logpdf(i).sum(), rel=1e-5)
    # the log-intensity density adds log I
    prior_log = WilsonPrior(profile, 0.125, weight=0.7, n_points=64, n_effective=n_eff, density="log_intensity")
    expected = 0.7 * n_eff / 64 * (stats.expon(scale=sigma).logpdf(i) + np.log(i)).sum()
    assert float(prior_log.log_factor(field, q).detach()) == pytest.approx(expected, rel=1e-5)
    # gradients reach the field and the profile, not the field's offset through Sigma
    prior.log_factor(field).backward()
    assert field.net.first.grad is not None and profile.coef.grad is not None


def test_learned_profile_recovers_the_mean_intensity():
    """Maximising the Wilson log density over a constant Sigma gives Sigma = the field's mean intensity."""
    torch.manual_seed(0)
    field = SirenField(0.125, width=16, depth=2)
    for p in field.parameters():
        p.requires_grad_(False)
    prior = WilsonPrior(RadialProfile(0.125, n_basis=0), 0.125, n_points=2000, n_effective=1.0)
    q = sample_ball(2000, 0.125)
    opt = torch.optim.Adam(prior.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        (-prior.log_factor(field, q)).backward()
        opt.step()
    sigma = float(prior.profile(torch.tensor(0.05)).detach())  # constant profile: the exponential MLE is the mean of I
    assert sigma == pytest.approx(float(field(q).mean()), rel=2e-3)


def test_make_intensity_prior_and_its_errors():
    assert make_intensity_prior({"name": "none"}, 0.12) is None
    assert make_intensity_prior(None, 0.12) is None
    p = make_intensity_prior({"name": "wilson", "weight": 2.0, "diameter_A": 72, "n_points": 256}, 0.12)
    assert isinstance(p, WilsonPrior) and p.n_points == 256 and p.weight == 2.0
    assert p.n_effective == pytest.approx(0.5 * 4 / 3 * math.pi * (72 * 0.12) ** 3)
    c = make_intensity_prior({"name": "wilson", "sigma": "composition", "structure": "2CEX"}, 0.12)
    assert c.profile.base is not None
    assert c.n_effective == pytest.approx(shannon_count(72.57, 0.12), rel=0.01)  # D = 2 x radius of 2CEX
    with pytest.raises(ValueError, match=r"name: expected one of \['none', 'wilson'\]"):
        make_intensity_prior({"name": "gauss"}, 0.12)
    with pytest.raises(ValueError, match="unknown settings \\['wieght'\\]"):
        make_intensity_prior({"name": "wilson", "wieght": 1.0}, 0.12)
    with pytest.raises(ValueError, match="sigma: expected one of"):
        make_intensity_prior({"name": "wilson", "sigma": "flat"}, 0.12)
    with pytest.raises(ValueError, match="expected a structure"):
        make_intensity_prior({"name": "wilson", "sigma": "composition"}, 0.12)
    with pytest.raises(ValueError, match="weight"):
        make_intensity_prior({"name": "wilson", "weight": -1.0}, 0.12)
    with pytest.raises(ValueError, match="density"):
        make_intensity_prior({"name": "wilson", "density": "amplitude"}, 0.12)
    with pytest.raises(ValueError, match="expected no other settings"):
        make_intensity_prior({"name": "none", "weight": 1.0}, 0.12)


def test_model_adds_the_factor_once_outside_the_plate():
    q, factor, _ = detector_tensors(get_preset("reference-32"))
    q_max = float(q.norm(dim=-1).max())
    field = SirenField(q_max, width=16, depth=2)
    prior = make_intensity_prior({"name": "wilson", "diameter_A": 60, "n_points": 128}, q_max)
    model = SPIModel(field, q, factor, intensity_prior=prior)
    batch = SPIBatch(torch.poisson(torch.full((4, 32, 32), 2.0)), torch.arange(4), torch.arange(0, 1024, 9), 1026)
    pyro.set_rng_seed(3)
    tr = poutine.trace(model).get_trace(batch, 1000)
    site = tr.nodes["intensity_prior"]
    assert site["cond_indep_stack"] == () and site["scale"] == 1.0
    pyro.set_rng_seed(3)
    expected = float(prior.log_factor(field).detach())  # the same fresh points: the factor is drawn first
    assert float(site["fn"].log_prob(site["value"]).detach()) == pytest.approx(expected, rel=1e-6)
    # no prior, or NoIntensityPrior: the model is unchanged (no factor site)
    for none in (None, NoIntensityPrior()):
        tr0 = poutine.trace(SPIModel(field, q, factor, intensity_prior=none)).get_trace(batch, 1000)
        assert "intensity_prior" not in tr0.nodes
