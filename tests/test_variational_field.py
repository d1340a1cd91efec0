"""The variational intensity field (use (b)): symmetry, interpolation, exact moments, KL, ELBO, shrinkage."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from pyro.poutine.util import site_is_subsample
from scipy import stats

from bayes_spi.geometry import get_preset
from bayes_spi.guides.amortized import AmortizedGuide, count_hypotheses
from bayes_spi.infer.build import detector_tensors
from bayes_spi.infer.outputs import field_on_grid
from bayes_spi.models.fields import SirenField
from bayes_spi.models.intensity_priors import RadialProfile, make_intensity_prior
from bayes_spi.models.priors import LogNormalScalePrior
from bayes_spi.models.spi import MAX_PLATE_NESTING, SPIBatch, SPIModel
from bayes_spi.models.variational_field import (
    VariationalAmplitudeField,
    lognormal_cumulants,
    make_variational_field,
    moments_on_grid,
)

Q_MAX = 0.12


pytestmark = pytest.mark.usefixtures("one_thread")


def _field(grid=9, **kw) -> VariationalAmplitudeField:
    torch.manual_seed(0)
    f = VariationalAmplitudeField(Q_MAX, grid=grid, width=16, depth=2, w0=6.0, scale_init=0.3, **kw)
    with torch.no_grad():  # make loc and scale vary over q
        f.net.out.weight.mul_(5.0)
        f.net.out.bias[0] = 1.0
    return f


def _inside(n: int, radius: float = 0.95 * Q_MAX) -> torch.Tensor:
    q = torch.randn(n, 3)
    return q / q.norm(dim=-1, keepdim=True) * radius * torch.rand(n, 1) ** (1 / 3)


def test_friedel_symmetric_and_positive_with_and_without_a_draw():
    f = _field()
    q = _inside(300)
    mean_path = f.log_intensity(q)
    assert torch.allclose(mean_path, f.log_intensity(-q), atol=1e-5)
    amp = f.latent_posterior().sample()
    drawn = f.log_intensity(q, amp)
    assert torch.allclose(drawn, f.log_intensity(-q, amp), atol=1e-5)
    assert torch.all(torch.isfinite(drawn)) and drawn.std() > 0.05
    assert not torch.allclose(drawn, mean_path)  # the draw is used when given
    assert torch.allclose(f.log_intensity(q), mean_path)  # and only then
    with pytest.raises(ValueError, match="expected an amplitude sample of shape"):
        f.log_intensity(q, torch.ones(3))


def test_latent_nodes_are_the_friedel_half_of_the_reachable_ball():
    f = _field(grid=11)
    n = 11
    dq = Q_MAX / 5
    idx = torch.arange(n**3)
    node_q = torch.stack(torch.meshgrid(*[(torch.arange(n) - 5) * dq] * 3, indexing="ij"), -1).reshape(-1, 3)
    reach = node_q.norm(dim=-1) <= Q_MAX + math.sqrt(3) * dq + 1e-9
    # every reachable node maps to a latent, unreachable ones to the zero slot, mirrors to the same latent
    assert torch.all(f.node_latent[reach] < f.n_latent) and torch.all(f.node_latent[~reach] == f.n_latent)
    assert torch.equal(f.node_latent, f.node_latent.flip(0))
    assert f.n_latent == (int(reach.sum()) + 1) // 2
    assert torch.allclose(f.latent_q, node_q[f.latent_index].float())
    # points inside the ball never touch the zero slot
    lat, w = f.corners(_inside(2000, Q_MAX))
    assert torch.all(lat < f.n_latent) and torch.allclose(w.sum(-1), torch.ones(2000))
    assert idx.numel() == n**3


def test_interpolation_is_exact_at_nodes_linear_between_and_radially_clamped():
    f = _field()
    amp = f.latent_posterior().sample()
    inner = f.latent_q.norm(dim=-1) < 0.9 * Q_MAX
    qn = f.latent_q[inner]
    assert torch.allclose(f.amplitude(qn, amp), amp[inner], rtol=1e-5)
    assert torch.allclose(f.amplitude(-qn, amp), amp[inner], rtol=1e-5)  # the mirrored node
    # midpoint along x between two nodes: the mean of the two
    a, b = qn[0], qn[0] + torch.tensor([f.dq, 0.0, 0.0])
    mid = f.amplitude(((a + b) / 2)[None], amp)
    assert torch.allclose(mid, (f.amplitude(a[None], amp) + f.amplitude(b[None], amp)) / 2, rtol=1e-5)
    # beyond q_max: the value on the sphere in the same direction
    u = torch.tensor([[0.3, -0.5, 0.8]]) / math.sqrt(0.98)
    assert torch.allclose(f.amplitude(1.7 * Q_MAX * u, amp), f.amplitude(Q_MAX * u, amp))
    # gradients reach the draw and the query points (poses)
    q = _inside(5).requires_grad_(True)
    a_ = amp.clone().requires_grad_(True)
    f.amplitude(q, a_).sum().backward()
    assert q.grad.abs().sum() > 0 and a_.grad.abs().sum() > 0


def test_intensity_moments_closed_form_at_nodes_and_monte_carlo_between():
    f = _field()
    loc, scale = (t.detach().double() for t in f.posterior_params(f.latent_q))
    inner = f.latent_q.norm(dim=-1) < 0.9 * Q_MAX
    mean, sd = (t.double() for t in f.intensity_moments(f.latent_q[inner]))
    l, s = loc[inner], scale[inner]
    assert torch.allclose(mean, torch.exp(2 * l + 2 * s**2), rtol=1e-5)
    assert torch.allclose(sd**2, torch.expm1(4 * s**2) * torch.exp(4 * l + 4 * s**2), rtol=1e-4)
    # between nodes: exact moments of the interpolated field vs 40,000 draws (a moderate, constant scale:
    # heavy log-normal tails would make the Monte Carlo check itself unreliable)
    with torch.no_grad():
        f.net.out.weight[1] = 0.0
        f.net.out.bias[1] = math.log(math.expm1(0.3))
    loc, scale = (t.detach().double() for t in f.posterior_params(f.latent_q))
    torch.manual_seed(1)
    q = _inside(6)
    draws = dist.LogNormal(loc, scale).sample((40000,))  # (S, L) float64
    idx, w = f.corners(q)
    amp = (w.double() * torch.cat([draws, draws.new_zeros(40000, 1)], 1)[:, idx]).sum(-1)  # (S, 6)
    m, sdq = (t.double() for t in f.intensity_moments(q))
    i = amp**2
    se = i.std(0) / math.sqrt(40000)
    assert torch.all((i.mean(0) - m.detach()).abs() < 4 * se)
    assert torch.allclose(i.std(0), sdq.detach(), rtol=0.05)
    # the cumulants are stable at small scale (no cancellation): leading orders s^2, 3 s^4, 16 s^6
    zero, small = torch.tensor(0.0, dtype=torch.float64), torch.tensor(1e-4, dtype=torch.float64)
    k1, k2, k3, k4 = lognormal_cumulants(zero, small)
    assert float(k2) == pytest.approx(1e-8, rel=1e-6) and float(k3) == pytest.approx(3e-16, rel=1e-6)
    assert float(k4) == pytest.approx(16e-24, rel=1e-6)


def test_kl_closed_form_matches_monte_carlo_of_the_site_log_densities():
    f = _field()
    with torch.no_grad():
        f.profile.coef.copy_(torch.linspace(1.0, -1.0, f.profile.n_basis))
    pyro.set_rng_seed(0)
    diffs = []
    with torch.no_grad():
        for _ in range(300):
            g = poutine.trace(f.guide_sample).get_trace()
            m = poutine.trace(poutine.replay(f.model_sample, trace=g)).get_trace()
            assert g.nodes["amplitude"]["cond_indep_stack"] == () and m.nodes["amplitude"]["scale"] == 1.0
            diffs.append(float(g.log_prob_sum() - m.log_prob_sum()))
        kl = float(f.kl())
    mc, err = np.mean(diffs), np.std(diffs) / math.sqrt(len(diffs))
    assert abs(mc - kl) < 4 * err + 1e-3 * abs(kl)
    # and per node against torch's registered closed form
    per_node = torch.distributions.kl_divergence(f.latent_posterior(), f.latent_prior())
    assert float(per_node.sum().detach()) == pytest.approx(kl, rel=1e-5)
    assert f.model_sample().shape == (f.n_latent,)  # a prior draw without a guide


def _tiny(n_total=18, kl_weight=1.0):
    q, factor, mask = detector_tensors(get_preset("reference-32"))
    q_max = float(q.norm(dim=-1).max())
    torch.manual_seed(0)
    field = make_variational_field(q_max, grid=9, width=16, depth=2, w0=6.0, kl_weight=kl_weight)
    with torch.no_grad():
        field.log_offset.fill_(5.0)
    model = SPIModel(field, q, factor, n_hypotheses=count_hypotheses(n_heads=1))
    guide = AmortizedGuide(mask, n_heads=1, features=16, channels=4, scorer=model.hypothesis_loglik,
                           field_guide=field.guide_sample)
    images = torch.poisson(torch.full((6, 32, 32), 3.0))
    batch = SPIBatch(images, torch.arange(6), torch.arange(0, 1024, 7), 1029)
    return model, guide, batch


def test_model_and_guide_sites_with_the_amplitude_as_a_global_latent():
    model, guide, batch = _tiny(kl_weight=0.5)
    gtr = poutine.trace(guide).get_trace(batch, 100)
    mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(batch, 100)
    g_sites = {n for n, s in gtr.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)}
    assert g_sites == {"amplitude", "hypothesis", "pose", "scale"}
    for tr in (gtr, mtr):
        site = tr.nodes["amplitude"]
        assert site["cond_indep_stack"] == () and site["scale"] == 0.5  # global: not scaled by N / B
        assert site["fn"].event_shape == (model.field.n_latent,)
    with pytest.raises(ValueError, match="no intensity_prior with a variational field"):
        SPIModel(model.field, model.q, model.log_pixel_factor.exp(),
                 intensity_prior=make_intensity_prior({"name": "wilson"}, 0.12))


def test_the_amplitude_draw_is_an_argument_and_nothing_is_kept_on_the_field():
    """Two model calls with different amplitude draws give different intensities, each the one of its own
    draw; the field's state (attributes, buffers, parameters) is the same before and after the calls; the
    guide scores its hypotheses against its own draw, which the model then replays."""
    model, guide, batch = _tiny()
    field = model.field
    before = (dict(vars(field)), {k: v.clone() for k, v in field.state_dict().items()})
    pyro.set_rng_seed(5)
    traces = [poutine.trace(model).get_trace(batch, 18) for _ in range(2)]
    amps = [tr.nodes["amplitude"]["value"] for tr in traces]
    assert not torch.allclose(amps[0], amps[1])
    rates = []
    for tr, amp in zip(traces, amps):
        rate = tr.nodes["counts"]["fn"].rate.T  # (B, M): the rate the likelihood used (the site holds (M, B))
        R, s = tr.nodes["pose"]["value"][0], tr.nodes["scale"]["value"]  # (1, B, 3, 3): dim -2 is the pixels plate's
        expected = model.log_rate(R, s.log(), batch.pixels, amp).exp()
        torch.testing.assert_close(rate, expected, rtol=1e-5, atol=0.0)
        rates.append(rate)
    assert (rates[0] / rates[1] - 1).abs().max() > 0.05  # different draws, different intensities
    # with the other draw, the first call's poses give the second draw's intensities: nothing else differs
    R, s = traces[0].nodes["pose"]["value"][0], traces[0].nodes["scale"]["value"]
    assert not torch.allclose(model.log_rate(R, s.log(), batch.pixels, amps[1]).exp(), rates[0])
    after = (dict(vars(field)), field.state_dict())
    assert after[0].keys() == before[0].keys() and not any(isinstance(v, torch.Tensor) and v.shape == amps[0].shape
                                                           for v in vars(field).values())
    assert all(torch.equal(after[1][k], v) for k, v in before[1].items())
    # the guide's draw: scored against by the guide, replayed by the model
    gtr = poutine.trace(guide).get_trace(batch, 18)
    g_amp = gtr.nodes["amplitude"]["value"]
    assert vars(field).keys() == before[0].keys()  # the guide's draw is not left on the field either
    assert not any(v is g_amp for v in vars(field).values())
    mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(batch, 18)
    assert torch.equal(mtr.nodes["amplitude"]["value"], g_amp)
    post = guide.last_posterior
    with torch.no_grad():
        ll = model.hypothesis_loglik(post.rotations.transpose(0, 1), post.scale_loc, batch.images, batch.pixels,
                                     amplitude=g_amp)
        mean_ll = model.hypothesis_loglik(post.rotations.transpose(0, 1), post.scale_loc, batch.images,
                                          batch.pixels)
        logits = guide.logit_head(guide.last_features)
    torch.testing.assert_close(post.weights, torch.softmax(logits + ll.T, -1))
    assert not torch.allclose(post.weights, torch.softmax(logits + mean_ll.T, -1))


def test_trace_enum_elbo_accepts_the_field_and_equals_the_hand_computation():
    model, guide, batch = _tiny()
    n_total, B = 18, 6
    elbo = TraceEnum_ELBO(max_plate_nesting=MAX_PLATE_NESTING)
    torch.manual_seed(0)
    loss = elbo.differentiable_loss(model, guide, batch, n_total)
    torch.manual_seed(0)  # the same draws, traced by hand
    gtr = poutine.trace(poutine.enum(guide, first_available_dim=-1 - MAX_PLATE_NESTING)).get_trace(batch, n_total)
    field = model.field
    amp = gtr.nodes["amplitude"]["value"].detach()
    R, s = gtr.nodes["pose"]["value"].squeeze(1), gtr.nodes["scale"]["value"]  # (K, B, 3, 3), (B,)
    w = gtr.nodes["hypothesis"]["fn"].probs
    k = w.shape[1]
    y = batch.images.reshape(B, -1)[:, batch.pixels]
    ll = dist.Poisson(model.log_rate(R, s.log().expand(k, B), batch.pixels, amp).exp()).log_prob(y).sum(-1)
    per_hyp = ll * (1029 / 147) - gtr.nodes["pose"]["fn"].log_prob(R[:, None]).squeeze(1)
    per_pattern = (w.T * per_hyp).sum(0) - (w * (w.log() + math.log(k))).sum(-1)
    per_pattern = per_pattern + LogNormalScalePrior()(B).log_prob(s) - gtr.nodes["scale"]["fn"].log_prob(s)
    # the global amplitude term, once, with SciPy's densities
    loc, scale = (t.detach().double().numpy() for t in field.posterior_params(field.latent_q))
    sigma = field.prior_log_sigma().exp().detach().double().numpy()
    a = amp.double().numpy()
    amp_term = (stats.rayleigh(scale=np.sqrt(sigma / 2)).logpdf(a)
                - stats.lognorm(s=scale, scale=np.exp(loc)).logpdf(a)).sum()
    expected = float(per_pattern.sum().detach()) * n_total / B + amp_term
    assert float(-loss.detach()) == pytest.approx(expected, rel=1e-5)
    # a few SVI steps: finite, and the field's posterior moves
    params = list(model.parameters()) + list(guide.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    before = field.net.out.bias.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        loss = elbo.differentiable_loss(model, guide, batch, n_total)
        assert math.isfinite(float(loss.detach()))
        loss.backward()
        opt.step()
    assert not torch.allclose(field.net.out.bias, before)


def test_posterior_sd_shrinks_where_data_are_plentiful():
    """Known poses (all the identity): nodes on the Ewald slice get data, the others only the prior."""
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    geom = get_preset("reference-32")
    q, factor, _ = detector_tensors(geom)
    q_max = float(q.norm(dim=-1).max())
    truth = SirenField(q_max, width=16, depth=2, w0=4.0)
    B = 16
    with torch.no_grad():
        lam = truth(q.float()) * factor.float()
        lam = lam * 1e5 / lam.sum()  # 1e5 photons per pattern
        images = torch.poisson(lam.expand(B, -1)).reshape(B, 32, 32)
        level = float(torch.log((lam / factor.float()).mean()))
    field = VariationalAmplitudeField(q_max, grid=17, width=32, depth=2, w0=4.0, scale_init=0.5, log_offset=level)
    model = SPIModel(field, q, factor)
    cond = poutine.condition(model, data={"pose": torch.eye(3).expand(B, 3, 3), "scale": torch.ones(B)})
    batch = SPIBatch(images, torch.arange(B), torch.arange(1024), 1024)

    def guide(batch, n_total):
        field.guide_sample()
        with pyro.plate("patterns", n_total, subsample=batch.indices):
            pyro.sample("hypothesis", dist.Categorical(logits=torch.zeros(1)))

    opt = torch.optim.Adam(field.parameters(), lr=2e-2)
    elbo = Trace_ELBO()
    for _ in range(150):
        opt.zero_grad()
        elbo.differentiable_loss(cond, guide, batch, 64).backward()
        opt.step()
    with torch.no_grad():
        nodes = field.latent_q
        qn = nodes.norm(dim=-1)
        wavelength = geom.wavelength_A
        off_slice = (nodes[:, 2] + 0.5 * wavelength * qn**2).abs()  # pixels: q_z = -lambda |q|^2 / 2
        observed = (off_slice < 0.5 * field.dq) & (qn < 0.8 * q_max)
        unobserved = (off_slice > 3 * field.dq) & (qn < q_max)
        mean, sd = field.intensity_moments(nodes)
        rel = sd / mean
        # Wilson prior: sd(I) / E(I) = 1; merged data: a few percent; no data: stays prior-like
        assert observed.sum() > 30 and unobserved.sum() > 200
        assert float(rel[observed].median()) < 0.1
        assert float(rel[unobserved].median()) > 0.5
        # where observed, the posterior mean has the truth's shape (up to the global level)
        ratio = mean[observed] / truth(nodes[observed])
        assert float(ratio.std() / ratio.mean()) < 0.1


def test_factory_errors_and_grid_export():
    f = make_variational_field(0.12, grid=9, width=16, depth=2, prior={"sigma": "composition", "structure": "2CEX"})
    assert f.profile.base is not None
    with pytest.raises(ValueError, match="unknown settings"):
        make_variational_field(0.12, grid=9, prior={"sigma": "learned", "weight": 2})
    with pytest.raises(ValueError, match="odd grid size"):
        make_variational_field(0.12, grid=10)
    with pytest.raises(ValueError, match="sigma: expected one of"):
        make_variational_field(0.12, grid=9, prior={"sigma": "radial"})
    assert isinstance(make_variational_field(0.12, grid=9, prior=RadialProfile(0.12, 3)).profile, RadialProfile)
    # export: the MRC volume (field_on_grid, the posterior mean) and the sd volume on the same grid
    mean, sd, dq = moments_on_grid(f, 7, 0.12)
    vol, dq2 = field_on_grid(f, 7, 0.12)
    assert mean.shape == sd.shape == (7, 7, 7) and dq == dq2
    assert np.allclose(vol, mean, rtol=1e-5) and np.all(sd > 0)
    assert np.allclose(sd, sd[::-1, ::-1, ::-1], rtol=1e-5)  # Friedel
