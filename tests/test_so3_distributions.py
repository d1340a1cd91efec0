"""Tests for the Pyro distributions on SO(3): normalisation, sampling vs density, gradients, shapes."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from scipy import stats
from scipy.integrate import cumulative_trapezoid

from bayes_spi.distributions import LieNormalSO3, UniformSO3, special_orthogonal
from bayes_spi.so3 import geodesic_angle, random_rotmat, rotvec_to_rotmat, sixd_to_rotmat

F64 = torch.float64


def _loc(seed: int) -> torch.Tensor:
    return random_rotmat(1, generator=torch.Generator().manual_seed(seed), dtype=F64)[0]


def _axis_angle_quadrature(n_sub: int = 12, n_gl: int = 16, n_cos: int = 24, n_az: int = 48):
    """Nodes (theta, u) and weights of the normalised Haar measure (1 - cos t)/(4 pi^2) dt dOmega."""
    x, w = np.polynomial.legendre.leggauss(n_gl)
    edges = np.linspace(0.0, np.pi, n_sub + 1)
    t = np.concatenate([0.5 * (b - a) * x + 0.5 * (b + a) for a, b in zip(edges[:-1], edges[1:])])
    wt = np.concatenate([0.5 * (b - a) * w for a, b in zip(edges[:-1], edges[1:])])
    c, wc = np.polynomial.legendre.leggauss(n_cos)  # cos(polar) in [-1, 1]
    az = np.arange(n_az) * 2 * np.pi / n_az
    waz = np.full(n_az, 2 * np.pi / n_az)
    s = np.sqrt(1 - c**2)
    u = np.stack(
        [s[:, None] * np.cos(az)[None, :], s[:, None] * np.sin(az)[None, :], np.broadcast_to(c[:, None], (n_cos, n_az))],
        -1,
    ).reshape(-1, 3)
    wu = (wc[:, None] * waz[None, :]).reshape(-1)
    haar_t = (1 - np.cos(t)) / (4 * np.pi**2) * wt
    v = t[:, None, None] * u[None, :, :]  # (T, U, 3)
    weights = haar_t[:, None] * wu[None, :]
    return torch.as_tensor(v.reshape(-1, 3)), torch.as_tensor(weights.reshape(-1))


@pytest.mark.parametrize(
    "scale",
    [
        [0.1, 0.1, 0.1],  # narrow
        [0.1, 0.2, 0.4],  # narrow, anisotropic
        [0.5, 0.5, 0.5],
        [1.5, 1.5, 1.5],  # broad: the wrapped shells matter
        [0.7, 1.2, 1.8],  # broad, anisotropic
    ],
)
def test_lie_normal_normalised_by_quadrature(scale):
    v, w = _axis_angle_quadrature()
    assert abs(float(w.sum()) - 1.0) < 1e-12  # the Haar weights themselves are normalised
    loc = _loc(1)
    d = LieNormalSO3(loc, torch.tensor(scale, dtype=F64))
    lp = d.log_prob(loc @ rotvec_to_rotmat(v))
    assert torch.isfinite(lp).all()
    total = float((lp.exp() * w).sum())
    assert abs(total - 1.0) < 2e-4, total


def test_lie_normal_normalised_by_haar_monte_carlo():
    loc = _loc(2)
    d = LieNormalSO3(loc, torch.tensor([0.6, 0.9, 1.2], dtype=F64))
    R = random_rotmat(200_000, generator=torch.Generator().manual_seed(7), dtype=F64)
    p = d.log_prob(R).exp()
    mean, se = float(p.mean()), float(p.std() / math.sqrt(p.numel()))
    assert abs(mean - 1.0) < 4 * se, (mean, se)
    assert se < 0.01


def _angle_cdf_from_log_prob(sigma: float, k0_only: bool = False):
    """CDF of the angle of loc^T R implied by log_prob (isotropic scale): p(t) (1 - cos t) / pi."""
    t = np.linspace(1e-6, np.pi, 4001)
    loc = _loc(3)
    d = LieNormalSO3(loc, torch.full((3,), sigma, dtype=F64))
    axis = torch.tensor([0.0, 0.6, 0.8], dtype=F64)
    R = loc @ rotvec_to_rotmat(torch.as_tensor(t)[:, None] * axis)
    dens = d.log_prob(R).exp().numpy() * (1 - np.cos(t)) / np.pi
    if k0_only:  # the un-wrapped Gaussian radial law, renormalised (wrong for broad scales)
        dens = t**2 * np.exp(-(t**2) / (2 * sigma**2))
    cdf = cumulative_trapezoid(dens, t, initial=0.0)
    return t, cdf, loc, d


@pytest.mark.parametrize("sigma", [0.3, 1.5])
def test_lie_normal_samples_match_log_prob(sigma):
    t, cdf, loc, d = _angle_cdf_from_log_prob(sigma)
    assert abs(cdf[-1] - 1.0) < 1e-3
    samples = d.sample((20000,))
    ang = geodesic_angle(loc, samples).numpy()
    assert stats.kstest(ang, lambda x: np.interp(x, t, cdf)).pvalue > 1e-3
    if sigma > 1.0:  # power check: ignoring the wrapping is detected
        t0, cdf0, _, _ = _angle_cdf_from_log_prob(sigma, k0_only=True)
        assert stats.kstest(ang, lambda x: np.interp(x, t0, cdf0 / cdf0[-1])).pvalue < 1e-6


def test_lie_normal_rsample_gradcheck():
    w = torch.tensor([0.3, -0.2, 0.5], dtype=F64, requires_grad=True)
    log_s = torch.tensor([-1.0, -0.5, 0.2], dtype=F64, requires_grad=True)

    def f(w, log_s):
        torch.manual_seed(0)
        return LieNormalSO3(rotvec_to_rotmat(w), log_s.exp()).rsample((4,))

    torch.autograd.gradcheck(f, (w, log_s))
    # and through the 6D parameterisation used by guides
    x6 = torch.tensor([1.0, 0.2, -0.1, 0.1, 0.9, 0.3], dtype=F64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: (torch.manual_seed(1), LieNormalSO3(sixd_to_rotmat(x), log_s.detach().exp()).rsample((3,)))[1], (x6,))


@pytest.mark.parametrize("scale", [[0.2, 0.3, 0.4], [1.2, 1.5, 1.8]])
def test_lie_normal_log_prob_gradcheck(scale):
    R = rotvec_to_rotmat(torch.tensor([[0.4, 0.1, -0.3], [2.5, -1.0, 0.5], [0.0, 0.0, 3.1]], dtype=F64))
    w = torch.tensor([0.1, 0.2, -0.1], dtype=F64, requires_grad=True)
    log_s = torch.tensor(scale, dtype=F64).log().requires_grad_()
    torch.autograd.gradcheck(lambda w, ls: LieNormalSO3(rotvec_to_rotmat(w), ls.exp()).log_prob(R), (w, log_s))


def test_lie_normal_log_prob_limits():
    loc = _loc(4)
    for sigma in [0.1, 1.5]:
        d = LieNormalSO3(loc, torch.full((3,), sigma, dtype=F64))
        # near the identity: matches the k=0 limit N(0) * 8 pi^2 for narrow scales; finite at R = loc
        lp0 = d.log_prob(loc)
        assert torch.isfinite(lp0)
        if sigma < 0.5:
            ref = -1.5 * math.log(2 * math.pi * sigma**2) + math.log(8 * math.pi**2)
            assert abs(float(lp0) - ref) < 1e-6
        # continuity across theta = pi (axis sign flips there)
        axis = torch.tensor([0.0, 0.6, 0.8], dtype=F64)
        a = d.log_prob(loc @ rotvec_to_rotmat(axis * (math.pi - 1e-7)))
        b = d.log_prob(loc @ rotvec_to_rotmat(-axis * (math.pi - 1e-7)))
        c = d.log_prob(loc @ rotvec_to_rotmat(axis * math.pi))
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        torch.testing.assert_close(a, c, rtol=0, atol=1e-5)


def test_lie_normal_shapes_and_expand():
    B, K = 5, 2
    loc = random_rotmat(B)
    d = LieNormalSO3(loc, torch.tensor([0.1, 0.2, 0.3]))
    assert d.batch_shape == (B,) and d.event_shape == (3, 3)
    assert d.rsample((7,)).shape == (7, B, 3, 3)
    assert d.log_prob(torch.eye(3)).shape == (B,)
    d2 = LieNormalSO3(torch.eye(3), torch.full((K, 1, 3), 0.2))
    assert d2.batch_shape == (K, 1)
    d3 = LieNormalSO3(loc, torch.full((K, 1, 3), 0.2))
    assert d3.batch_shape == (K, B)
    assert d3.log_prob(d3.sample()).shape == (K, B)
    e = d.expand([K, B])
    assert e.batch_shape == (K, B)
    assert e.rsample().shape == (K, B, 3, 3)
    assert e.log_prob(e.sample((3,))).shape == (3, K, B)
    torch.testing.assert_close(e.mode, loc.expand(K, B, 3, 3))
    assert d.has_rsample and isinstance(d.to_event(1), dist.Independent)


@pytest.mark.parametrize(
    "loc,scale",
    [
        (torch.eye(3)[:, :2], torch.ones(3)),  # loc not (..., 3, 3)
        (torch.eye(3), torch.ones(2)),  # scale not (..., 3)
        (torch.eye(3).expand(2, 3, 3), torch.ones(3, 3)),  # batch shapes do not broadcast
        (torch.eye(3), -torch.ones(3)),  # negative scale (validation)
        (torch.diag(torch.tensor([1.0, 1.0, -1.0])), torch.ones(3)),  # reflection (validation)
    ],
)
def test_lie_normal_bad_args_raise(loc, scale):
    with pytest.raises(ValueError, match="expected|Expected"):
        LieNormalSO3(loc, scale)


def test_bad_values_raise():
    d = LieNormalSO3(torch.eye(3), torch.ones(3))
    u = UniformSO3()
    for dd in (d, u):
        with pytest.raises(ValueError, match="expected value of shape"):
            dd.log_prob(torch.zeros(4, 3))
        with pytest.raises(ValueError):
            dd.log_prob(2 * torch.eye(3))  # not in the support


def test_special_orthogonal_constraint():
    R = random_rotmat(6)
    assert special_orthogonal.check(R).all()
    assert special_orthogonal.check(R).shape == (6,)
    assert not special_orthogonal.check(-R).any()  # det -1
    assert not special_orthogonal.check(R * 1.01).any()


def test_uniform_so3_is_haar_and_log_prob_zero():
    d = UniformSO3((4,))
    assert d.batch_shape == (4,) and d.event_shape == (3, 3) and not d.has_rsample
    R = d.sample((5000,)).to(F64)
    assert R.shape == (5000, 4, 3, 3)
    assert special_orthogonal.check(R).all()
    ang = geodesic_angle(torch.eye(3, dtype=F64), R).reshape(-1).numpy()
    assert stats.kstest(ang, lambda x: (x - np.sin(x)) / np.pi).pvalue > 1e-3
    # Haar is bi-invariant: angles relative to an arbitrary fixed rotation have the same law
    ang2 = geodesic_angle(_loc(5), R).reshape(-1).numpy()
    assert stats.kstest(ang2, lambda x: (x - np.sin(x)) / np.pi).pvalue > 1e-3
    lp = d.log_prob(R)
    assert lp.shape == (5000, 4) and bool((lp == 0).all())
    e = d.expand([3, 4])
    assert e.batch_shape == (3, 4) and e.sample().shape == (3, 4, 3, 3)
    assert UniformSO3(dtype=F64).sample().dtype == F64


def _svi_run(K: int | None):
    B = 6
    data = torch.randn(B) * 0.3
    shape = (B,) if K is None else (K, B)

    def model():
        with pyro.plate("data", B, dim=-1):
            if K is None:
                pose = pyro.sample("pose", UniformSO3().expand([B]))
            else:
                with pyro.plate("hyp", K, dim=-2):
                    pose = pyro.sample("pose", UniformSO3().expand([K, B]))
                    pyro.sample("obs", dist.Normal(pose[..., 0, 0], 0.2), obs=data)
                return
            pyro.sample("obs", dist.Normal(pose[..., 0, 0], 0.2), obs=data)

    def guide():
        x6 = pyro.param("x6", torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]).expand(*shape, 6).clone())
        s = pyro.param("s", torch.full((*shape, 3), 0.5), constraint=dist.constraints.positive)
        with pyro.plate("data", B, dim=-1):
            if K is None:
                pyro.sample("pose", LieNormalSO3(sixd_to_rotmat(x6), s))
            else:
                with pyro.plate("hyp", K, dim=-2):
                    pyro.sample("pose", LieNormalSO3(sixd_to_rotmat(x6), s))

    svi = SVI(model, guide, Adam({"lr": 0.05}), Trace_ELBO(max_plate_nesting=2))
    losses = [svi.step() for _ in range(20)]
    assert all(math.isfinite(x) for x in losses)
    assert pyro.param("x6").grad is None or torch.isfinite(pyro.param("x6")).all()
    assert not torch.allclose(pyro.param("s"), torch.tensor(0.5))
    return losses


def test_pyro_trace_elbo_with_plate():
    _svi_run(None)


def test_pyro_trace_elbo_with_extra_left_dim():
    _svi_run(3)


def test_pyro_sample_shapes_in_trace():
    B, K = 4, 3

    def guide():
        loc = random_rotmat((K, B))
        with pyro.plate("data", B, dim=-1):
            pyro.sample("pose", LieNormalSO3(loc, torch.full((K, B, 3), 0.1)))

    tr = pyro.poutine.trace(guide).get_trace()
    tr.compute_log_prob()
    assert tr.nodes["pose"]["value"].shape == (K, B, 3, 3)
    assert tr.nodes["pose"]["log_prob"].shape == (K, B)


@pytest.mark.parametrize("sigma", [1e-3, 0.1, 2.0])
def test_lie_normal_float32_matches_float64(sigma):
    loc = random_rotmat(500, generator=torch.Generator().manual_seed(8), dtype=F64)
    scale = torch.tensor([sigma, 2 * sigma, 0.5 * sigma], dtype=F64)
    d = LieNormalSO3(loc, scale)
    R = d.sample()
    loc32 = loc.float().requires_grad_()
    d32 = LieNormalSO3(loc32, scale.float())
    lp32 = d32.log_prob(R.float())
    torch.testing.assert_close(lp32.double(), d.log_prob(R), rtol=0, atol=1e-3)
    d32.log_prob(d32.rsample()).sum().backward()
    assert torch.isfinite(loc32.grad).all()
