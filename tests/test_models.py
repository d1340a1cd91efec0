"""Intensity fields, the Pyro model and the amortized guide: symmetry, gradients, sites, enumeration."""

import math

import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from pyro.infer import TraceEnum_ELBO

from bayes_spi.geometry import get_preset
from bayes_spi.guides.encoder import PatternEncoder, transform_counts
from bayes_spi.infer.build import build_model_and_guide, detector_tensors
from bayes_spi.infer.config import FitConfig
from bayes_spi.models.fields import FourierNetField, SirenField, SirenVoxelField, VoxelField
from bayes_spi.models.likelihoods import PoissonLikelihood
from bayes_spi.models.priors import LogNormalScalePrior
from bayes_spi.models.spi import MAX_PLATE_NESTING, SPIBatch, SPIModel
from bayes_spi.so3 import random_rotmat, rotvec_to_rotmat, rotz_pi

Q_MAX = 0.125


@pytest.mark.parametrize("cls", [SirenField, FourierNetField, VoxelField, SirenVoxelField])
def test_fields_are_friedel_symmetric_and_positive(cls):
    torch.manual_seed(1)
    field = cls(Q_MAX)
    if isinstance(field, VoxelField):
        field.grid.data.normal_()
    if isinstance(field, SirenVoxelField):
        field.residual.data.normal_()
    q = (torch.rand(500, 3) * 2 - 1) * Q_MAX
    a, b = field(q), field(-q)
    assert torch.all(a > 0)
    assert torch.allclose(a, b, rtol=1e-5)
    # and not trivially constant
    assert a.std() / a.mean() > 1e-3


def test_voxel_field_interpolates_grid_values_exactly():
    torch.manual_seed(0)
    n = 9
    field = VoxelField(Q_MAX, n=n)
    field.grid.data.normal_()
    sym = field.symmetric_grid()
    dq = 2 * Q_MAX / (n - 1)
    idx = torch.tensor([[0, 4, 8], [2, 3, 5], [7, 1, 6]])
    q = (idx - n // 2).float() * dq
    expected = sym[idx[:, 0], idx[:, 1], idx[:, 2]]
    assert torch.allclose(field.log_intensity(q), expected, atol=1e-5)
    # midpoint between two grid points along z is their mean (trilinear)
    qm = q[0] + torch.tensor([0.0, 0.0, -0.5 * dq])
    mid = 0.5 * (sym[0, 4, 8] + sym[0, 4, 7])
    assert torch.allclose(field.log_intensity(qm[None]), mid[None], atol=1e-5)


def test_hybrid_field_is_the_siren_plus_the_interpolated_residual():
    """SirenVoxelField: a zero residual gives exactly the SirenField of the same weights; a residual adds its
    symmetrised trilinear value (the VoxelField's) to log I (below the soft clamp)."""
    torch.manual_seed(2)
    hybrid = SirenVoxelField(Q_MAX, width=16, n_voxel=9)
    siren = SirenField(Q_MAX, width=16)
    siren.load_state_dict({k: v for k, v in hybrid.state_dict().items() if k != "residual"})
    q = (torch.rand(300, 3) * 2 - 1) * Q_MAX
    assert torch.equal(hybrid.log_intensity(q), siren.log_intensity(q))
    voxel = VoxelField(Q_MAX, n=9)
    voxel.grid.data.normal_(std=0.3)
    hybrid.residual.data.copy_(voxel.grid.data)
    g_siren = torch.atanh((siren.log_intensity(q) - siren.log_offset) / siren.log_clamp) * siren.log_clamp
    g_hybrid = torch.atanh((hybrid.log_intensity(q) - hybrid.log_offset) / hybrid.log_clamp) * hybrid.log_clamp
    assert torch.allclose(g_hybrid - g_siren, voxel.log_intensity(q), atol=1e-4)
    # every parameter gets a gradient (the residual too)
    hybrid.log_intensity(q).sum().backward()
    assert hybrid.residual.grad is not None and float(hybrid.residual.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="n_voxel"):
        SirenVoxelField(Q_MAX, n_voxel=2)


def test_field_rejects_bad_shape():
    with pytest.raises(ValueError, match="expected q of shape"):
        SirenField(Q_MAX)(torch.zeros(4, 2))


def test_gradcheck_through_ewald_slicing():
    """d(log rate)/d(pose, log scale) and d/d(field params) through rotation, slicing and the field (float64)."""
    torch.manual_seed(0)
    q, factor, _ = detector_tensors(get_preset("reference-32"))
    field = SirenField(Q_MAX, width=8, depth=2).double()
    model = SPIModel(field, q, factor).double()
    pixels = torch.arange(0, q.shape[0], 97)
    v = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    log_s = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, s: model.log_rate(rotvec_to_rotmat(v), s, pixels), (v, log_s))

    names = [k for k, _ in field.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in field.named_parameters())
    q_mol = torch.einsum("bij,mj->bmi", random_rotmat(2, dtype=torch.float64), q[pixels].double())
    assert torch.autograd.gradcheck(
        lambda *vals: torch.func.functional_call(field, dict(zip(names, vals)), (q_mol,)), params)


def _tiny(n_heads=2, n_search=2):
    geom = get_preset("reference-32")
    cfg = FitConfig(field_width=16, n_heads=n_heads, encoder_channels=8, encoder_features=32, n_search=n_search,
                    search_rotations=256)
    model, guide = build_model_and_guide(geom, cfg)
    images = torch.poisson(torch.full((6, 32, 32), 3.0))
    batch = SPIBatch(images, torch.arange(6), torch.arange(0, 1024, 7), 1029)
    return model, guide, batch


def test_model_and_guide_share_sites_and_plates():
    model, guide, batch = _tiny()
    gtr = poutine.trace(guide).get_trace(batch, 100)
    mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(batch, 100)
    g_sites = {n for n, s in gtr.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)}
    m_sites = {n for n, s in mtr.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)}
    assert g_sites == {"hypothesis", "pose", "scale"}
    assert m_sites == g_sites | {"counts"}
    for name in g_sites:
        assert [f.name for f in gtr.nodes[name]["cond_indep_stack"]] == ["patterns"]
        assert [f.name for f in mtr.nodes[name]["cond_indep_stack"]] == ["patterns"]
    # plate subsampling scales the per-pattern terms by n_total / B, and the pixels plate (nested, dim -2; no
    # poutine.scale) the likelihood by n_pixels / M = 1029 / 147
    counts = mtr.nodes["counts"]
    assert sorted((f.name, f.dim, f.size) for f in counts["cond_indep_stack"]) == [("patterns", -1, 6), ("pixels", -2, 147)]
    assert counts["scale"] == pytest.approx(100 / 6 * 7.0)
    assert counts["fn"].batch_shape == (147, 6) and torch.equal(counts["value"], batch.images.reshape(6, -1)[:, batch.pixels].T)
    assert torch.equal(mtr.nodes["pixels"]["value"], batch.pixels)


def test_batch_takes_the_pixel_population_size_not_a_weight():
    images, idx, pixels = torch.zeros(2, 4, 4), torch.arange(2), torch.arange(0, 16, 2)
    assert SPIBatch(images, idx, pixels).pixel_weight == 1.0 and SPIBatch(images, idx, pixels).n_pixels == 8
    assert SPIBatch(images, idx, pixels, 14).pixel_weight == pytest.approx(14 / 8)
    for bad in (7.0, 7, True):  # a float (e.g. the old n_eligible / M weight) or fewer than M pixels
        with pytest.raises(ValueError, match="expected n_pixels an integer >= M = 8"):
            SPIBatch(images, idx, pixels, bad)


def test_enumerated_elbo_equals_weighted_sum_over_hypotheses():
    """TraceEnum_ELBO with the guide's hypotheses enumerated = sum_k w_k ELBO_k - KL(w || uniform)."""
    model, guide, batch = _tiny(n_heads=1)
    with torch.no_grad():
        guide.logit_head.bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    n_total = 6
    torch.manual_seed(0)
    loss = TraceEnum_ELBO(max_plate_nesting=MAX_PLATE_NESTING).differentiable_loss(model, guide, batch, n_total)
    torch.manual_seed(0)  # the same draws, traced by hand
    gtr = poutine.trace(poutine.enum(guide, first_available_dim=-1 - MAX_PLATE_NESTING)).get_trace(batch, n_total)
    R, s = gtr.nodes["pose"]["value"].squeeze(1), gtr.nodes["scale"]["value"]  # (K, B, 3, 3), (B,)
    w = gtr.nodes["hypothesis"]["fn"].probs  # (B, K)
    k = w.shape[1]
    y = batch.images.reshape(6, -1)[:, batch.pixels]
    ll = dist.Poisson(model.log_rate(R, s.log().expand(k, 6), batch.pixels).exp()).log_prob(y).sum(-1)
    per_hyp = ll * (1029 / 147) - gtr.nodes["pose"]["fn"].log_prob(R[:, None]).squeeze(1)  # (K, B); log prior of pose = 0
    elbo = (w.T * per_hyp).sum(0) - (w * (w.log() + math.log(k))).sum(-1)
    elbo = elbo + LogNormalScalePrior()(6).log_prob(s) - gtr.nodes["scale"]["fn"].log_prob(s)
    assert float(-loss.detach()) == pytest.approx(float(elbo.sum().detach()), rel=1e-5)


def test_guide_pairs_each_head_with_its_rotz_pi_partner_and_weights_sum_to_one():
    _, guide, batch = _tiny(n_heads=3, n_search=2)
    post = guide.posterior(batch.images)
    assert post.rotations.shape == (6, 8, 3, 3) and post.n_encoder == 6
    assert torch.allclose(post.rotations[:, 3:6], post.rotations[:, :3] @ rotz_pi(), atol=1e-6)
    assert torch.allclose(post.weights.sum(-1), torch.ones(6), atol=1e-6)
    guide.weight_floor = 0.5
    w = guide.posterior(batch.images).weights
    assert torch.all(w >= 0.5 / 8 - 1e-7)


def test_hypothesis_weights_are_the_posterior_given_the_centres():
    """With a uniform logit head, w_k = softmax_k log p(y | R_k, s): the Bayes posterior over hypotheses."""
    model, guide, batch = _tiny(n_heads=2, n_search=2)
    post = guide.posterior(batch.images, batch.pixels)
    ll = model.hypothesis_loglik(post.rotations.transpose(0, 1), post.scale_loc, batch.images, batch.pixels)
    assert torch.allclose(post.weights, torch.softmax(ll.T, dim=-1), atol=1e-5)


def test_guide_is_built_with_its_scorer_and_search_and_holds_no_model_state():
    """The guide gets the model's scorer and the search at construction (no attach_* step); they stay outside
    its module tree; the search is a plain attribute, refused by a guide built without search slots."""
    from bayes_spi.guides.amortized import AmortizedGuide

    model, guide, batch = _tiny(n_heads=1, n_search=2)
    assert not [name for name in dir(guide) if name.startswith("attach_")]
    assert guide.scorer == model.hypothesis_logpost and guide.search.model is model and guide.field_guide is None
    assert not any(k.startswith(("field.", "_model")) for k in guide.state_dict())
    assert model.n_hypotheses == guide.n_hypotheses == 4
    search = guide.search
    guide.search = None
    with pytest.raises(RuntimeError, match="no search"):
        guide.posterior(batch.images)
    guide.search = search
    assert guide.posterior(batch.images).rotations.shape == (6, 4, 3, 3)
    plain = AmortizedGuide(guide.mask, n_heads=1, features=8, channels=4)
    with pytest.raises(ValueError, match="n_search=0"):
        plain.search = search
    with pytest.raises(ValueError, match="n_search=0"):
        AmortizedGuide(guide.mask, n_heads=1, features=8, channels=4, search=search)


def test_orientation_search_finds_the_generating_rotation():
    """Patterns simulated from the model's own field at grid rotations: the search returns those rotations."""
    torch.manual_seed(3)
    model, guide, _ = _tiny(n_heads=1, n_search=1)
    model.field = VoxelField(Q_MAX * 1.01, n=7)  # smooth but strongly anisotropic: the 41^3 cache is accurate
    model.field.grid.data.normal_(0.0, 2.0)
    search = guide.search
    search.refresh()
    truth = torch.tensor([5, 77, 140, 201])
    R = search.rotations[truth]
    pixels = torch.nonzero(guide.mask.reshape(-1)).squeeze(-1)
    rate = model.log_rate(R, torch.zeros(4), pixels).exp().detach()
    rate = rate * 2e4 / rate.sum(-1, keepdim=True)  # 2e4 photons per pattern: a sharp likelihood
    images = torch.zeros(4, 32 * 32)
    images[:, pixels] = torch.poisson(rate)
    found = search(images.reshape(4, 32, 32), pixels)[:, 0]
    assert torch.allclose(found, R)
    # the profile likelihood is invariant to the fluence scale: 10x the counts, same answer
    found10 = search(10 * images.reshape(4, 32, 32), pixels)[:, 0]
    assert torch.allclose(found10, R)


def test_scale_posterior_starts_at_relative_total_counts():
    _, guide, batch = _tiny()
    images = batch.images.clone()
    images[1] *= 3.0
    post = guide.posterior(images)
    assert float((post.scale_loc[1] - post.scale_loc[0]).detach()) == pytest.approx(
        math.log(float(images[1].sum() / images[0].sum())), abs=0.3)


def test_encoder_input_is_fluence_invariant_and_mask_aware():
    torch.manual_seed(0)
    mask = torch.ones(16, 16, dtype=torch.bool)
    mask[7:9, 7:9] = False
    y = torch.poisson(torch.full((2, 16, 16), 5.0))
    a = transform_counts(y, mask)
    b = transform_counts(10 * y, mask)
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.all(a[:, ~mask] == 0)
    enc = PatternEncoder(16, 16, features=8, channels=4)
    with pytest.raises(ValueError, match="expected images of shape"):
        enc(torch.zeros(2, 8, 8), mask)


def test_model_rejects_bad_geometry_tensors():
    with pytest.raises(ValueError, match="expected q of shape"):
        SPIModel(SirenField(Q_MAX), torch.zeros(5, 2), torch.ones(5))
    with pytest.raises(ValueError, match="expected pixel_factor"):
        SPIModel(SirenField(Q_MAX), torch.zeros(5, 3), torch.ones(4))


def test_poisson_likelihood_matches_scipy():
    from scipy.stats import poisson

    lik = PoissonLikelihood(background=0.5)
    log_rate = torch.tensor([0.0, 1.0, 2.5], dtype=torch.float64)
    y = torch.tensor([0.0, 3.0, 11.0], dtype=torch.float64)
    expected = poisson.logpmf(y.numpy(), log_rate.exp().numpy() + 0.5)
    assert torch.allclose(lik(log_rate).log_prob(y), torch.as_tensor(expected), atol=1e-10)


def test_hypothesis_scoring_without_gradients_runs_in_chunks_with_the_same_numbers(monkeypatch):
    """Scoring all pixels of a large detector is chunked over patterns (bounded memory); the numbers do not change."""
    import bayes_spi.models.spi as spi

    geom = get_preset("reference-32")
    q, pf, _ = detector_tensors(geom)
    q, pf = q.float(), pf.float()
    model = SPIModel(SirenField(float(q.norm(dim=-1).max()) * 1.001, width=16), q, pf)
    g = torch.Generator().manual_seed(1)
    R = random_rotmat(3 * 10, generator=g).reshape(3, 10, 3, 3)
    log_s = torch.randn(10, generator=g)
    images = torch.poisson(torch.full((10, 32, 32), 0.5), generator=g)
    pixels = torch.arange(0, 1024, 3)
    with torch.no_grad():
        whole = model.hypothesis_loglik(R, log_s, images, pixels)
        monkeypatch.setattr(spi, "SCORE_CHUNK_POINTS", 3 * pixels.numel() * 4)  # 4 patterns per chunk
        chunked = model.hypothesis_loglik(R, log_s, images, pixels)
        scalar = model.hypothesis_loglik(R, torch.tensor(0.3), images, pixels)
        monkeypatch.setattr(spi, "SCORE_CHUNK_POINTS", 1 << 30)
        scalar_whole = model.hypothesis_loglik(R, torch.tensor(0.3), images, pixels)
    assert whole.shape == (3, 10)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(scalar, scalar_whole)
