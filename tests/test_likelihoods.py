"""Poisson + Gaussian read-out likelihood: brute-force sums (mpmath), the simulator's process (Monte
Carlo), the sigma -> 0 limit, the documented truncation bound, gradients, shapes, and the factory."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from scipy import stats

from bayes_spi.distributions.readout import PoissonGaussianCounts, log_normal_interval, window_half_width
from bayes_spi.models.likelihoods import (
    PoissonGaussianLikelihood,
    PoissonLikelihood,
    make_likelihood,
)
from bayes_spi.models.spi import SPIModel
from bayes_spi.models.fields import SirenField

F64 = torch.float64


def _brute_log_prob(lam: float, y: int, sigma: float) -> float:
    """log sum_k Pois(k; lam) P(round(max(k + sigma e, 0)) = y | k), every k, 60 digits."""
    with mpmath.workdps(60):
        lam_m, total = mpmath.mpf(lam), mpmath.mpf(0)
        for k in range(0, int(y + lam + 40 * sigma + 12 * math.sqrt(lam) + 40)):
            log_pois = k * mpmath.log(lam_m) - lam_m - mpmath.loggamma(k + 1)
            hi = (y + 0.5 - k) / mpmath.mpf(sigma)
            lo = (y - 0.5 - k) / mpmath.mpf(sigma)
            if y == 0:
                p = mpmath.ncdf(hi)
            elif lo > 0:  # both in the upper tail: mirror to avoid cancellation
                p = mpmath.ncdf(-lo) - mpmath.ncdf(-hi)
            else:
                p = mpmath.ncdf(hi) - mpmath.ncdf(lo)
            total += mpmath.exp(log_pois) * p
        return float(mpmath.log(total))


CASES = [
    # (rate, count, sigma): typical, far tails, tiny and huge rates
    (0.05, 0, 0.3), (0.05, 1, 0.3), (0.5, 0, 0.1), (2.0, 3, 0.3), (3.0, 1, 0.5), (20.0, 23, 1.0),
    (200.0, 150, 1.0), (200.0, 0, 0.3), (0.01, 20, 0.3), (1e-4, 3, 1.0), (7.0, 7, 2.0), (40.0, 40, 0.05),
]


@pytest.mark.parametrize("rate, y, sigma", CASES)
def test_log_prob_matches_brute_force_sum(rate: float, y: int, sigma: float) -> None:
    d = PoissonGaussianCounts(torch.tensor([rate], dtype=F64), sigma)
    got = float(d.log_prob(torch.tensor([float(y)], dtype=F64)))
    assert got == pytest.approx(_brute_log_prob(rate, y, sigma), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("sigma", [0.1, 0.3, 1.0])
def test_normalised_over_counts(sigma: float) -> None:
    rate = torch.tensor([0.02, 0.7, 5.0, 60.0], dtype=F64)[:, None]
    y = torch.arange(0, 200, dtype=F64)[None, :]
    p = PoissonGaussianCounts(rate.expand(4, 200), sigma).log_prob(y.expand(4, 200)).exp().sum(-1)
    assert torch.allclose(p, torch.ones(4, dtype=F64), atol=1e-10)


def test_matches_the_simulators_process() -> None:
    """Frequencies of the simulator's G artifact (numpy, same operations as bayes_spi.sim.simulate)."""
    rng = np.random.default_rng(0)
    sigma, n = 0.6, 400_000
    for lam in (0.3, 4.0):
        values = rng.poisson(np.full(n, lam)).astype(np.float64)
        values = values + sigma * rng.standard_normal(values.shape)  # as in simulate(): P, then G
        counts = np.rint(np.clip(values, 0.0, None))
        ys = np.arange(0, int(counts.max()) + 1)
        observed = np.bincount(counts.astype(int), minlength=ys.size)
        p = PoissonGaussianCounts(torch.full((ys.size,), lam, dtype=F64), sigma).log_prob(
            torch.as_tensor(ys, dtype=F64)).exp().numpy()
        keep = n * p > 20
        chi2 = (((observed - n * p) ** 2) / (n * p))[keep].sum()
        assert stats.chi2.sf(chi2, keep.sum() - 1) > 1e-3, (lam, chi2)
    # and the distribution's own sampler is that process
    torch.manual_seed(0)
    s = PoissonGaussianCounts(torch.full((200_000,), 4.0), sigma).sample()
    assert bool((s >= 0).all()) and bool((s == s.round()).all())
    p = PoissonGaussianCounts(torch.full((30,), 4.0, dtype=F64), sigma).log_prob(torch.arange(30, dtype=F64)).exp()
    freq = torch.bincount(s.long(), minlength=30)[:30].double() / s.numel()
    assert torch.all((freq - p).abs() < 5 * torch.sqrt(p * (1 - p) / s.numel()) + 1e-4)


def test_sigma_to_zero_recovers_poisson() -> None:
    rate = torch.tensor([0.1, 1.0, 7.5, 80.0], dtype=F64)[:, None].expand(4, 120)
    y = torch.arange(120, dtype=F64).expand(4, 120)
    poisson = torch.as_tensor(stats.poisson.logpmf(y.numpy(), rate.numpy()))
    exact = PoissonGaussianCounts(rate, 0.0).log_prob(y)
    assert torch.allclose(exact, poisson, atol=1e-9)
    for sigma in (1e-3, 0.05):  # P(|noise| > 1/2) = 2 Q(0.5 / sigma): 0 (1e-3), 2e-23 (0.05)
        got = PoissonGaussianCounts(rate, sigma).log_prob(y)
        ok = poisson > -500
        assert torch.allclose(got[ok], poisson[ok], atol=1e-9, rtol=1e-9)
    lik = PoissonGaussianLikelihood(0.0)
    assert torch.allclose(lik(rate.log()).log_prob(y), PoissonLikelihood()(rate.log()).log_prob(y), atol=1e-9)


def test_window_bound_holds() -> None:
    """The documented window: a much wider window changes log p by less than tol."""
    torch.manual_seed(1)
    rate = torch.exp(torch.empty(2000, dtype=F64).uniform_(-6, 6))
    y = torch.poisson(rate * torch.exp(torch.empty_like(rate).uniform_(-2, 2)))
    for sigma in (0.1, 0.3, 1.0, 1.5):
        d = PoissonGaussianCounts(rate, sigma, tol=1e-7)
        wide = PoissonGaussianCounts(rate, sigma, tol=1e-300, max_half_width=400)
        assert d.half_width(y) < wide.half_width(y)
        assert float((d.log_prob(y) - wide.log_prob(y)).abs().max()) < 1e-7
    assert window_half_width(math.log(1e3), 0.1) == 1
    assert window_half_width(math.log(1e3), 0.3) == 3
    assert window_half_width(0.0, 1.0) < 10


def test_log_normal_interval_tails() -> None:
    a = torch.tensor([-math.inf, -40.0, 30.0, -0.2, 5.0], dtype=F64)
    b = torch.tensor([-38.0, -39.0, 31.0, 0.3, 5.0 + 1e-6], dtype=F64)
    got = log_normal_interval(a, b)
    with mpmath.workdps(60):
        ref = [float(mpmath.log(mpmath.ncdf(-x) - mpmath.ncdf(-z))) if x > 0 else
               float(mpmath.log(mpmath.ncdf(z) - (0 if x == -math.inf else mpmath.ncdf(x))))
               for x, z in zip(a.tolist(), b.tolist())]
    assert torch.allclose(got, torch.tensor(ref, dtype=F64), rtol=1e-9)


def test_differentiable_in_rate() -> None:
    rate = torch.tensor([0.05, 0.8, 3.0, 25.0], dtype=F64, requires_grad=True)
    y = torch.tensor([1.0, 0.0, 5.0, 22.0], dtype=F64)
    assert torch.autograd.gradcheck(lambda r: PoissonGaussianCounts(r, 0.4).log_prob(y), (rate,))
    # through the likelihood object: d/d log_rate, finite everywhere incl. a clamp-free huge rate
    log_rate = torch.tensor([-8.0, 0.0, 4.0, 9.0], dtype=F64, requires_grad=True)
    PoissonGaussianLikelihood(0.3, background=0.01)(log_rate).log_prob(y).sum().backward()
    assert torch.isfinite(log_rate.grad).all()


def test_shapes_broadcast_like_the_model_uses_them() -> None:
    torch.manual_seed(2)
    log_rate = torch.randn(5, 3, 40, dtype=F64)  # (K hypotheses, B patterns, M pixels)
    y = torch.poisson(log_rate[0].exp())  # (B, M)
    lik = PoissonGaussianLikelihood(0.3)
    lp = lik(log_rate).log_prob(y)
    assert lp.shape == (5, 3, 40)
    for k in range(5):
        assert torch.allclose(lp[k], lik(log_rate[k]).log_prob(y))
    # inside the model: per-hypothesis log-likelihoods (K, B)
    q = torch.randn(64, 3) * 0.03
    model = SPIModel(SirenField(q_max=0.125), q, torch.full((64,), 1e-3), likelihood=lik)
    R = torch.eye(3).expand(4, 2, 3, 3)
    ll = model.hypothesis_loglik(R, torch.zeros(2), torch.poisson(torch.ones(2, 8, 8)), torch.arange(64))
    assert ll.shape == (4, 2) and torch.isfinite(ll).all()


def test_validation_and_factory() -> None:
    d = PoissonGaussianCounts(torch.ones(3), 0.3, validate_args=True)
    with pytest.raises(ValueError):
        d.log_prob(torch.tensor([0.5, 1.0, 2.0]))  # not an integer count
    with pytest.raises(ValueError):
        PoissonGaussianCounts(torch.ones(3), -0.1, validate_args=True)
    with pytest.raises(ValueError, match="readout_sigma"):
        PoissonGaussianLikelihood(-1.0)
    lik = make_likelihood("poisson-gaussian:sigma=0.3;background=0.05")
    assert isinstance(lik, PoissonGaussianLikelihood)
    assert lik.config() == {"name": "poisson-gaussian", "sigma": 0.3, "background": 0.05}
    assert isinstance(make_likelihood({"name": "poisson"}), PoissonLikelihood)
    with pytest.raises(ValueError, match="--likelihood poisson-gaussian: missing parameter sigma"):
        make_likelihood("poisson-gaussian")
    # background enters the rate
    y = torch.tensor([2.0])
    a = lik(torch.tensor([0.0])).log_prob(y)
    b = PoissonGaussianCounts(torch.tensor([1.05]), 0.3).log_prob(y)
    assert torch.allclose(a, b)
