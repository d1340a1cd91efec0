"""Heterogeneous samples: the conditional field, the enumerated class ELBO, latent posteriors, the ensemble simulator."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO
from scipy.special import logsumexp
from scipy.stats import poisson

from bayes_spi.dataio.h5 import SPIDataset, quaternions_to_rotations
from bayes_spi.geometry import get_preset
from bayes_spi.guides.latent import LatentGuide
from bayes_spi.infer.build import detector_tensors
from bayes_spi.models.conditional_field import ConditionalField, LatentFields
from bayes_spi.models.fields import FourierNetField, SirenField, SirenVoxelField, VoxelField
from bayes_spi.models.heterogeneous import HeterogeneousSPIModel
from bayes_spi.models.latent import LearnedClassPrior, make_class_prior, make_latent_prior
from bayes_spi.models.spi import MAX_PLATE_NESTING, SPIBatch, SPIModel
from bayes_spi.sim.ensemble import (
    parse_ensemble,
    read_truth_labels,
    simulate_ensemble,
    sphere_transform,
    superellipsoid_half_width,
    superellipsoid_transform,
    superellipsoid_voxels,
    superellipsoid_volume,
)
from bayes_spi.so3 import random_rotmat as random_rotations

pytestmark = pytest.mark.usefixtures("one_thread")

Q_MAX = 0.125


def _randomise_film(field: ConditionalField, std: float = 0.3) -> None:
    """Give the FiLM MLP a non-zero output layer (a 'trained' conditional field)."""
    with torch.no_grad():
        field.film.mlp[-1].weight.normal_(0.0, std)
        field.film.mlp[-1].bias.normal_(0.0, std / 3)


@pytest.fixture(scope="module")
def detector() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return detector_tensors(get_preset("reference-32"))


# ---------------------------------------------------------------------- conditional field
@pytest.mark.parametrize("kind", [SirenField, FourierNetField, SirenVoxelField])
def test_conditional_field_reduces_to_todays_field(kind: type) -> None:
    torch.manual_seed(1)
    base = kind(q_max=Q_MAX)
    if isinstance(base, SirenVoxelField):
        with torch.no_grad():
            base.residual.normal_(0.0, 0.3)
    q = torch.randn(4, 50, 3) * 0.05
    z = torch.randn(4, 2) * 3.0
    cond = ConditionalField(base, latent_dim=2)
    # FiLM starts at zero: for every z (constant or not) the field is exactly the wrapped field
    assert torch.equal(cond.log_intensity(q, z), base.log_intensity(q))
    assert torch.equal(cond.log_intensity(q), base.log_intensity(q))
    assert torch.equal(ConditionalField(base, latent_dim=0).log_intensity(q, None), base.log_intensity(q))
    # a trained FiLM: a constant z gives one homogeneous field (the same for every pattern), z matters,
    # and Friedel symmetry holds for every z
    _randomise_film(cond)
    z0 = torch.randn(2)
    per_pattern = cond.log_intensity(q, z0.expand(4, 2))
    lone = cond.log_intensity(q, z0)
    torch.testing.assert_close(per_pattern, lone, rtol=0, atol=1e-6)
    spread = base.net(q / Q_MAX).std()  # the wrapped field's anisotropic part
    assert (cond.log_intensity(q, z) - base.log_intensity(q)).abs().max() > 0.5 * spread
    torch.testing.assert_close(cond.log_intensity(-q, z), cond.log_intensity(q, z), rtol=0, atol=1e-5)


def test_conditional_field_keeps_the_point_group() -> None:
    """A field with --symmetry O: the conditional field equals it at the start and stays invariant under the
    group (a 90 degree turn about z) for every z once the FiLM is trained."""
    torch.manual_seed(8)
    base = SirenField(q_max=Q_MAX, out_scale=1.0)
    base.set_symmetry("O")
    cond = ConditionalField(base, latent_dim=2)
    q = torch.randn(3, 20, 3) * 0.05
    z = torch.randn(3, 2)
    torch.testing.assert_close(cond.log_intensity(q, z), base.log_intensity(q), rtol=0, atol=1e-6)
    _randomise_film(cond)
    turn = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(cond.log_intensity(q @ turn.T, z), cond.log_intensity(q, z), rtol=0, atol=1e-5)
    assert (cond.log_intensity(q, z) - base.log_intensity(q)).abs().max() > 1e-3


def test_conditional_field_rejects_non_siren_and_bad_z() -> None:
    with pytest.raises(ValueError, match="SIREN-family"):
        ConditionalField(VoxelField(q_max=Q_MAX), latent_dim=1)  # type: ignore[arg-type]
    cond = ConditionalField(SirenField(q_max=Q_MAX), latent_dim=2)
    with pytest.raises(ValueError, match=r"expected z of shape \(\.\.\., B, 2\)"):
        cond.log_intensity(torch.zeros(3, 4, 3), torch.zeros(3, 5))


@pytest.mark.parametrize("with_background", [False, True])
def test_homogeneous_special_case_has_todays_log_density(detector, with_background: bool) -> None:
    """latent_dim = 0 and one class: the heterogeneous model's joint log density is SPIModel's (with a measured
    background too)."""
    from bayes_spi.models.background import PixelBackground

    q, factor, _ = detector
    torch.manual_seed(2)
    field = SirenField(q_max=float(q.norm(dim=-1).max()))
    bg = PixelBackground(torch.rand(q.shape[0]) * 0.5, "per-pattern", n_patterns=10) if with_background else None
    het = HeterogeneousSPIModel(field, q, factor, n_hypotheses=2, background=bg)
    hom = SPIModel(field, q, factor, n_hypotheses=2, background=bg)
    images = torch.poisson(torch.full((3, 32, 32), 2.0))
    batch = SPIBatch(images, torch.arange(3), torch.arange(0, 1024, 3))
    values = {"hypothesis": torch.tensor([0, 1, 1]), "pose": random_rotations(3), "scale": torch.tensor([0.5, 1.0, 2.0])}
    log_p = [pyro.poutine.trace(pyro.poutine.condition(m, data=values)).get_trace(batch, 10).log_prob_sum()
             for m in (het, hom)]
    torch.testing.assert_close(log_p[0], log_p[1], rtol=1e-6, atol=1e-3)
    assert "class" not in pyro.poutine.trace(het).get_trace(batch, 10).nodes


# ---------------------------------------------------------------------- enumerated class ELBO
def test_enumerated_class_elbo_equals_hand_computation(detector) -> None:
    """Classes and (class-dependent) pose hypotheses enumerated by TraceEnum_ELBO against the explicit sum.

    Poses and scales are fixed (Delta guides), so the ELBO has no Monte-Carlo part:
    ``sum_i sum_c q_c sum_k q_k|c [ll_ick + log pi_c + log(1/K) + log p(s_i) - log q_c - log q_k|c]``, and with
    ``q`` the exact posterior (one hypothesis) it is ``sum_i [logsumexp_c(ll_ic + log pi_c) + log p(s_i)]``.
    """
    q, factor, _ = detector
    torch.manual_seed(3)
    n_classes, n_hyp, n_batch = 3, 2, 4
    pixels = torch.arange(0, 1024, 7)
    class_prior = LearnedClassPrior(n_classes)
    with torch.no_grad():
        class_prior.logits.copy_(torch.tensor([0.3, -0.5, 0.1]))
    fields = LatentFields(SirenField(q_max=float(q.norm(dim=-1).max()), out_scale=1.0), 0, n_classes)
    model = HeterogeneousSPIModel(fields, q, factor, n_hypotheses=n_hyp, n_classes=n_classes, class_prior=class_prior)
    with torch.no_grad():
        model.field.fields[0].base.log_offset.fill_(math.log(3.0) - float(factor.log().mean()))
        for k in (1, 2):
            model.field.fields[k].base.log_offset.copy_(model.field.fields[0].base.log_offset)
    rots = random_rotations(n_batch * n_hyp).reshape(n_batch, n_hyp, 3, 3)
    scales = torch.tensor([0.8, 1.0, 1.3, 0.9])
    with torch.no_grad():
        log_rate = model.latent_log_rate(rots[:, 0], scales.log(), torch.arange(1024), None, torch.tensor([0, 1, 2, 1]))
    images = torch.poisson(log_rate.exp()).reshape(n_batch, 32, 32)
    batch = SPIBatch(images, torch.arange(n_batch), pixels)
    q_class = torch.softmax(torch.randn(n_batch, n_classes), -1)
    q_hyp = torch.softmax(torch.randn(n_batch, n_classes, n_hyp), -1)

    def guide(batch: SPIBatch, n_total: int, q_class: torch.Tensor = q_class.log(), q_hyp: torch.Tensor = q_hyp,
              poses: torch.Tensor = rots) -> None:
        rows = torch.arange(n_batch)
        with pyro.plate("patterns", n_total, subsample=batch.indices):
            # logits, not probs: a near-certain class keeps the exact log q of the others (probs would be clamped)
            c = pyro.sample("class", dist.Categorical(logits=q_class), infer={"enumerate": "parallel"})
            k = pyro.sample("hypothesis", dist.Categorical(logits=q_hyp[rows, c].log()), infer={"enumerate": "parallel"})
            pyro.sample("pose", dist.Delta(poses[rows, k], event_dim=2))
            pyro.sample("scale", dist.Delta(scales))

    elbo = -TraceEnum_ELBO(max_plate_nesting=MAX_PLATE_NESTING).differentiable_loss(model, guide, batch, n_batch).detach()
    # by hand: Poisson log pmf (SciPy) of every pattern under every class field and pose hypothesis
    y = images.reshape(n_batch, -1)[:, pixels].numpy()
    ll = np.zeros((n_batch, n_classes, n_hyp))
    with torch.no_grad():
        for c in range(n_classes):
            for k in range(n_hyp):
                qm = torch.einsum("bij,mj->bmi", rots[:, k], model.q[pixels])
                rate = scales[:, None] * factor[pixels].float() * model.field.fields[c](qm)
                ll[:, c, k] = poisson.logpmf(y, rate.double().numpy()).sum(-1)
    log_pi = class_prior.log_probs().detach().double().numpy()
    log_ps = dist.LogNormal(-0.125, 0.5).log_prob(scales).double().numpy()  # the default prior: mean 1, sigma 0.5
    qc, qk = q_class.double().numpy(), q_hyp.double().numpy()
    hand = (qc[:, :, None] * qk * (ll + log_pi[None, :, None] - math.log(n_hyp) - np.log(qc)[:, :, None]
                                   - np.log(qk))).sum() + log_ps.sum()
    assert float(elbo) == pytest.approx(hand, abs=1e-2)
    # both hypotheses at the true pose (uniform q_k|c) and q(c) the exact class posterior: the bound is tight,
    # log p(y, s) = sum_i [logsumexp_c(ll_ic + log pi_c) + log p(s_i)]
    ll_true = ll[:, :, 0]
    post = torch.as_tensor(ll_true + log_pi, dtype=torch.float32)  # unnormalised log posterior over classes
    same = rots[:, :1].expand(n_batch, n_hyp, 3, 3)
    tight = -TraceEnum_ELBO(max_plate_nesting=MAX_PLATE_NESTING).differentiable_loss(
        model, lambda b, n: guide(b, n, post, torch.full((n_batch, n_classes, n_hyp), 1.0 / n_hyp), same), batch,
        n_batch).detach()
    exact = logsumexp(ll_true + log_pi, axis=1).sum() + log_ps.sum()
    assert float(tight) == pytest.approx(exact, abs=1e-2)
    assert float(tight) > float(elbo)


def test_latent_guide_enumerates_classes_and_latents(detector) -> None:
    """The amortized guide: class and hypothesis weights normalised, the class-aware scorer ranks the classes
    (a pattern simulated from class c's field is given to class c), and TraceEnum_ELBO differentiates through
    the latent's rsample into the FiLM parameters."""
    q, factor, mask = detector
    torch.manual_seed(4)
    model = HeterogeneousSPIModel(SirenField(q_max=float(q.norm(dim=-1).max()), out_scale=1.0), q, factor,
                                  n_hypotheses=3, latent_dim=2, n_classes=2)
    for f in model.field.fields:
        _randomise_film(f, 0.1)
        with torch.no_grad():
            f.base.log_offset.fill_(math.log(30.0) - float(factor.log().mean()))
    rots = random_rotations(6)
    truth = torch.tensor([0, 1, 0, 1, 1, 0])
    with torch.no_grad():
        rate = model.latent_log_rate(rots, torch.zeros(6), torch.arange(1024), torch.zeros(6, 2), truth).exp()
    images = torch.poisson(rate).reshape(6, 32, 32)
    # one encoder hypothesis (and its Rz(pi) partner) plus one 'search' proposal at the true pose
    guide = LatentGuide(mask, latent_dim=2, n_classes=2, n_heads=1, n_search=1, features=32, channels=4,
                        search=lambda images, pixels: rots[:, None], latent_scorer=model.class_hypothesis_logpost)
    with pytest.raises(ValueError, match="class-aware latent_scorer"):  # the plain pose scorer ignores the class
        LatentGuide(mask, latent_dim=2, n_classes=2, n_heads=1, scorer=model.hypothesis_logpost)
    post = guide.latent_posterior(images)
    torch.testing.assert_close(post.class_probs.sum(-1), torch.ones(6))
    torch.testing.assert_close(post.hypothesis_weights.sum(-1), torch.ones(6, 2))
    assert torch.equal(post.class_probs.argmax(-1), truth)
    assert bool(torch.all(post.hypothesis_weights[torch.arange(6), truth].argmax(-1) == 2))  # the true pose wins
    loss = TraceEnum_ELBO(max_plate_nesting=MAX_PLATE_NESTING).differentiable_loss(
        model, guide, SPIBatch(images, torch.arange(6), torch.arange(1024)), 6)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.field.fields[1].film.mlp[0].weight.grad.abs().sum() > 0
    assert guide.latent_head.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------- latent posteriors shrink with photons
def _grid_posterior(model: HeterogeneousSPIModel, rots: torch.Tensor, shift: float, y: torch.Tensor,
                    grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and sd ``(n,)`` of ``p(z | y) ∝ N(z; 0, 1) p(y | R, s, z)`` on a 1D grid ``(G, n)`` per pattern."""
    n, g = rots.shape[0], grid.shape[0]
    rates = model.latent_log_rate(rots[None].expand(g, n, 3, 3), torch.full((g, n), shift), torch.arange(0, 1024, 2),
                                  grid[:, :, None], None)  # (G, n, M)
    log_post = torch.distributions.Poisson(rates.exp()).log_prob(y).sum(-1) - 0.5 * grid**2
    w = torch.softmax(log_post.double(), 0)  # (G, n): a uniform grid per pattern
    mean = (w * grid).sum(0)
    return mean, (w * (grid - mean) ** 2).sum(0).sqrt()


def test_exact_latent_posterior_shrinks_with_photons(detector) -> None:
    """The exact posterior of a 1D latent (grid integration, known pose and scale) narrows as 1/sqrt(photons)
    and covers the true value."""
    q, factor, _ = detector
    torch.manual_seed(5)
    model = HeterogeneousSPIModel(SirenField(q_max=float(q.norm(dim=-1).max()), out_scale=1.0), q, factor,
                                  latent_dim=1)
    _randomise_film(model.field.fields[0], 0.3)
    n = 4
    rots = random_rotations(n)
    z_true = torch.randn(n, 1)
    sds, errs = {}, {}
    with torch.no_grad():
        base = model.latent_log_rate(rots, torch.zeros(n), torch.arange(0, 1024, 2), z_true, None)
        level = math.log(1e3) - float(torch.logsumexp(base, -1).mean())  # ~1e3 photons a pattern
        for photons in (1.0, 16.0):
            shift = level + math.log(photons)
            y = torch.poisson((base + shift).exp())
            # locate on a coarse grid, then zoom twice: the last grid spans +-8 sd with 60 intervals
            mean, sd = _grid_posterior(model, rots, shift, y, torch.linspace(-4, 4, 81)[:, None].expand(81, n))
            half = torch.full((n,), 0.3)
            for _ in range(2):
                mean, sd = _grid_posterior(model, rots, shift, y, mean.float() + half * torch.linspace(-1, 1, 61)[:, None])
                half = (8 * sd).float()
            assert bool(torch.all(sd > 0.25 * (2 * half / 60)))  # ... so the grid resolves the posterior
            sds[photons], errs[photons] = sd, (mean - z_true[:, 0]).abs()
    ratio = sds[16.0] / sds[1.0]
    assert float(ratio.median()) < 0.4  # 1/sqrt(16) = 0.25 in the Gaussian limit
    for photons in (1.0, 16.0):
        assert bool(torch.all(errs[photons] < 4 * sds[photons]))


# ---------------------------------------------------------------------- priors
def test_latent_priors_and_specs() -> None:
    prior = make_latent_prior("normal:scale=2", 3)
    x = torch.zeros(4, 3)
    torch.testing.assert_close(prior(4).log_prob(x), torch.full((4,), 3 * (-math.log(2) - 0.5 * math.log(2 * math.pi))))
    t = make_latent_prior("studentt:df=3", 1)
    assert float(t(1).log_prob(torch.tensor([[10.0]]))) > float(make_latent_prior("normal", 1)(1).log_prob(torch.tensor([[10.0]])))
    assert make_class_prior("learned", 2).log_probs().exp().tolist() == [0.5, 0.5]
    for bad, match in [("gauss", "expected one of normal"), ("normal:scale", "key=number"), ("normal:width=1", "unknown option")]:
        with pytest.raises(ValueError, match=match):
            make_latent_prior(bad, 2)
    with pytest.raises(ValueError, match="n_classes"):
        make_class_prior("uniform", 1)


# ---------------------------------------------------------------------- ensemble simulator
def test_superellipsoid_p2_is_the_closed_form_sphere() -> None:
    geom = get_preset("reference-32")
    q = geom.q_vectors().reshape(-1, 3)
    exact = sphere_transform(np.linalg.norm(q, axis=1), 30.0, rho_e=0.5)
    errors = []
    for n in (24, 64):
        F = superellipsoid_transform(q, 30.0, 2.0, rho_e=0.5, n_voxels=n)
        errors.append(np.abs(F - exact).max() / exact[0 if exact.ndim == 0 else ...].max())
    assert errors[1] < 5e-4 and errors[1] < errors[0] / 4  # converges as h^2
    F = superellipsoid_transform(q, 30.0, 2.0, rho_e=0.5, n_voxels=40)
    intensity, closed = np.abs(F) ** 2, exact**2  # 3 (sin x - x cos x) / x^3, squared
    bright = closed > 1e-2 * closed.max()
    np.testing.assert_allclose(intensity[bright], closed[bright], rtol=0.03)
    assert abs(F.imag).max() < 1e-6 * abs(F).max()  # a centrosymmetric body: real transform


def test_superellipsoid_volumes_and_family() -> None:
    assert superellipsoid_volume(1.0, 2.0) == pytest.approx(4 / 3 * math.pi)
    assert superellipsoid_volume(1.0, 1.0) == pytest.approx(4 / 3)  # the octahedron |x|+|y|+|z| <= 1
    assert superellipsoid_volume(1.0, 400.0) == pytest.approx(8.0, rel=1e-2)  # the cube limit
    for p in (2.0, 4.0, 10.0):
        a = superellipsoid_half_width(1000.0, p)
        centres, occ, h = superellipsoid_voxels(a, p, 40)
        assert occ.sum() * h**3 == pytest.approx(1000.0, rel=2e-3)
        assert np.abs(centres).max() < a
    with pytest.raises(ValueError, match="exponent p"):
        superellipsoid_volume(1.0, 0.5)


def test_parse_ensemble() -> None:
    spec = parse_ensemble("shapes:p=2..12;radius=25;levels=8")
    assert spec.continuous and spec.exponents == (2.0, 12.0) and spec.radius == 25.0 and spec.n_classes == 0
    spec = parse_ensemble("structures:2CEX,1EI7;fractions=1,3")
    assert spec.structures == ("2CEX", "1EI7") and spec.class_probs().tolist() == [0.25, 0.75]
    for bad in ("blobs:p=2", "shapes:p=2;size=3", "shapes:p=5..2", "structures:2CEX;fractions=1,1"):
        with pytest.raises(ValueError, match="expected"):
            parse_ensemble(bad)


def test_simulated_ensemble_stores_truth_that_explains_the_patterns(tmp_path) -> None:
    """Cube vs sphere at ~1e3 photons: /truth/class and /truth/latent are stored, the photon level is as asked,
    and each pattern is better explained by its own class's transform (at its true pose) than by the other's."""
    path = tmp_path / "ens.h5"
    summary = simulate_ensemble("shapes:p=2,20;radius=30;voxels=24", "reference-32", 48, path, mean_photons=1e3,
                                seed=1, progress=False)
    latent, classes = read_truth_labels(path)
    assert latent.shape == (48, 1) and classes.shape == (48,)
    np.testing.assert_array_equal(latent[:, 0], np.array([2.0, 20.0])[classes])
    assert 10 < np.bincount(classes).min()
    assert 700 < summary.mean_photons < 1400
    with h5py.File(path) as f:
        assert f["truth/latent"].attrs["names"] == "exponent"
    with SPIDataset(path) as data:
        counts = data.read(np.arange(48)).reshape(48, -1)[:, data.mask.reshape(-1)]
        rots, scales, c = quaternions_to_rotations(data.truth_quaternions()), data.truth_scales(), data.photons_per_unit_intensity
        geom = data.geometry
    q = geom.q_vectors()[geom.good_pixels()]
    weights = geom.pixel_factor()[geom.good_pixels()]
    ll = np.zeros((48, 2))
    rotated = np.einsum("bij,kj->bki", rots, q)
    for k, p in enumerate((2.0, 20.0)):
        a = superellipsoid_half_width(4 / 3 * math.pi * 30.0**3, p)
        lam = c * scales[:, None] * weights * np.abs(superellipsoid_transform(rotated, a, p, n_voxels=24)) ** 2
        ll[:, k] = poisson.logpmf(counts, lam).sum(-1)
    assert (ll.argmax(1) == classes).mean() >= 0.9


def test_simulated_continuous_and_structure_ensembles(tmp_path) -> None:
    latent, classes = None, None
    simulate_ensemble("shapes:p=2..16;levels=4;voxels=16", "reference-32", 20, tmp_path / "c.h5", seed=2, progress=False)
    latent, classes = read_truth_labels(tmp_path / "c.h5")
    assert classes is None and latent.shape == (20, 1)
    assert set(np.round(latent[:, 0], 6)) <= set(np.round(np.exp(np.linspace(np.log(2), np.log(16), 4)), 6))
    simulate_ensemble("structures:2CEX,1EI7", "reference-32", 12, tmp_path / "s.h5", seed=2, progress=False)
    latent, classes = read_truth_labels(tmp_path / "s.h5")
    np.testing.assert_array_equal(latent[:, 0], classes)
    with SPIDataset(tmp_path / "s.h5") as data:
        assert data.n_patterns == 12


def test_hinge_moves_one_half_rigidly_by_the_angle(tmp_path) -> None:
    """2CEX@hinge=25: the fixed half only translates (recentring), the moving half turns by exactly 25 degrees about
    the hinge axis e2 (Kabsch on its atoms), nothing enters the fixed half, and the ensemble spec reads it."""
    from bayes_spi.sim.hinge import _flat, hinge_frame, load_ensemble_member
    from bayes_spi.sim.structure import load_structure

    mol = load_structure("2CEX")
    moved = load_ensemble_member("2CEX@hinge=25")
    _, a, _ = _flat(mol)
    _, b, _ = _flat(moved)
    e1, e2, _ = hinge_frame(mol)
    half = a @ e1 > 0
    assert 0.3 < half.mean() < 0.7
    shift = (b - a)[~half]
    np.testing.assert_allclose(shift, np.broadcast_to(shift.mean(0), shift.shape), atol=1e-9)  # fixed half: a shift
    b = b - shift.mean(0)  # back in mol's frame
    pa, pb = a[half] - a[half].mean(0), b[half] - b[half].mean(0)
    u, _, vt = np.linalg.svd(pb.T @ pa)
    rot = u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt  # Kabsch: pb ~ pa @ rot.T
    np.testing.assert_allclose(pa @ rot.T, pb, atol=1e-8)  # rigid
    angle = np.degrees(np.arccos(np.clip((np.trace(rot) - 1) / 2, -1, 1)))
    axis = np.array([rot[2, 1] - rot[1, 2], rot[0, 2] - rot[2, 0], rot[1, 0] - rot[0, 1]])
    assert angle == pytest.approx(25.0, abs=1e-6) and abs(axis @ e2) / np.linalg.norm(axis) == pytest.approx(1.0)
    assert float((b[half] @ e1).min()) > 0.0  # the cleft opens: no atom moves into the fixed half
    assert moved.n_electrons == pytest.approx(mol.n_electrons)
    np.testing.assert_allclose(_flat(load_ensemble_member("2CEX@hinge=0"))[1], a, atol=1e-9)
    with pytest.raises(ValueError, match=r"2CEX@hinge=abc.*expected NAME@hinge=DEG"):
        load_ensemble_member("2CEX@hinge=abc")
    with pytest.raises(ValueError, match=r"hinge angle in \[0, 90\]"):
        load_ensemble_member("2CEX@hinge=120")
    simulate_ensemble("structures:2CEX,2CEX@hinge=25", "reference-32", 8, tmp_path / "h.h5", seed=2, progress=False)
    with h5py.File(tmp_path / "h.h5") as f:
        assert f["simulation"].attrs["structure"] == "2CEX,2CEX@hinge=25"


# ---------------------------------------------------------------------- enumeration fast path, training start, outputs
def test_enumerated_class_fast_path_equals_general_selection() -> None:
    """c = arange(K) along an enumeration dim (as TraceEnum_ELBO passes it): each class's field at its own latent."""
    torch.manual_seed(6)
    fields = LatentFields(SirenField(q_max=Q_MAX, out_scale=1.0), latent_dim=2, n_classes=3)
    for f in fields.fields:
        _randomise_film(f)
    q = torch.randn(4, 1, 5, 7, 3) * 0.05  # (K_h, 1, B, M, 3): poses enumerated at dim -3 of the batch
    z = torch.randn(3, 5, 2)  # (K_c, B, d): a latent per class
    c = torch.arange(3).reshape(3, 1)
    fast = fields.log_intensity(q, z, c)
    assert fast.shape == (4, 3, 5, 7)
    for k in range(3):
        torch.testing.assert_close(fast[:, k], fields.fields[k].log_intensity(q[:, 0], z[k]))
    general = fields.log_intensity(q, z, c.expand(3, 5))  # the same classes, not of the (K, 1) form: torch.where
    torch.testing.assert_close(fast, general)


def test_class_start_separates_two_radial_populations() -> None:
    from bayes_spi.infer.heterogeneous import class_radial_profiles

    rng = np.random.default_rng(0)
    q_norm = rng.uniform(0.0, 0.1, 600)
    factor = np.full(600, 1e-3)
    truth = rng.integers(0, 2, 200)
    widths = np.array([0.02, 0.05])[truth]
    lam = 2.0 * np.exp(-(q_norm[None, :] / widths[:, None]) ** 2) + 0.02
    labels, profiles = class_radial_profiles(rng.poisson(lam), q_norm, factor, 2, seed=1)
    assert max((labels == truth).mean(), (labels != truth).mean()) > 0.97
    inner = [float(prof[0] - prof[len(prof) // 2]) for _, prof in profiles]  # drop of log I to mid-q
    narrow = int(np.argmax(inner))
    assert np.mean(labels[truth == 0] == narrow) > 0.97  # the narrow population's cluster has the steep profile


def test_latent_outputs_roundtrip_and_volumes(tmp_path) -> None:
    from bayes_spi.grid import grid_q
    from bayes_spi.posterior.latent import (LatentSummary, intensity_at_latents, principal_latent_path,
                                            read_latent_posterior, write_latent_posterior)

    rng = np.random.default_rng(1)
    summary = LatentSummary(rng.dirichlet([1, 1], 10).astype(np.float32), rng.normal(size=(10, 2)).astype(np.float32),
                            rng.uniform(0.1, 1, (10, 2)).astype(np.float32), rng.normal(size=(10, 2, 2)).astype(np.float32),
                            rng.uniform(0.1, 1, (10, 2, 2)).astype(np.float32))
    back = read_latent_posterior(write_latent_posterior(tmp_path / "l.h5", summary))
    for name in ("class_probs", "z_mean", "z_sd", "z_loc", "z_scale"):
        np.testing.assert_array_equal(getattr(back, name), getattr(summary, name))
    torch.manual_seed(7)
    fields = LatentFields(SirenField(q_max=Q_MAX, out_scale=1.0), latent_dim=2, n_classes=2)
    _randomise_film(fields.fields[1])
    z = np.array([[0.5, -1.0], [2.0, 0.0]])
    vol = intensity_at_latents(fields, z, 7, Q_MAX, cls=1)
    q, _ = grid_q(7, Q_MAX)
    with torch.no_grad():
        direct = fields.fields[1](torch.as_tensor(q[2, 5, 1], dtype=torch.float32), torch.tensor([2.0, 0.0]))
    assert vol.shape == (2, 7, 7, 7) and float(vol[1, 2, 5, 1]) == pytest.approx(float(direct), rel=1e-5)
    assert not np.allclose(vol[0], vol[1])  # the FiLM'd field changes with z
    line = principal_latent_path(np.c_[np.arange(10.0), 2 * np.arange(10.0)], 3)
    np.testing.assert_allclose(line, [[0, 0], [4.5, 9], [9, 18]], atol=1e-9)


def test_fit_config_heterogeneous_settings() -> None:
    from bayes_spi.infer.config import FitConfig

    config = FitConfig(latent_dim=2, n_classes=3)
    # the search and the EMC warm start are class-aware (bayes_spi.guides.class_search, infer.class_emc); the exact
    # EMC polish (one homogeneous field) is off
    assert config.heterogeneous and (config.n_search, config.emc_fraction, config.polish_iterations) == (2, 0.75, 0)
    assert not FitConfig().heterogeneous and FitConfig().n_search == 2
    with pytest.raises(ValueError, match="expected siren, fouriernet or hybrid"):
        FitConfig(latent_dim=1, field="voxel")
    with pytest.raises(ValueError, match="n_classes"):
        FitConfig(n_classes=0)
    with pytest.raises(ValueError, match="latent_nodes"):
        FitConfig(latent_dim=1, latent_nodes=0)
    with pytest.raises(ValueError, match="latent_anneal"):
        FitConfig(latent_dim=1, latent_anneal=1.5)
    with pytest.raises(ValueError, match="latent_anneal_beta"):
        FitConfig(latent_dim=1, latent_anneal=0.5, latent_anneal_beta=0.0)


def test_cli_fit_heterogeneous_end_to_end(tmp_path) -> None:
    """`fit --latent-dim 1 --classes 2` on a tiny cube/sphere ensemble: the settings reach config.yaml, and the run
    writes the per-pattern latent posteriors (class probabilities summing to 1) and per-class intensity volumes along
    the latent path."""
    from click.testing import CliRunner

    from bayes_spi.cli.main import cli

    data = tmp_path / "ens.h5"
    simulate_ensemble("shapes:p=2,20;voxels=16", "reference-32", 32, data, seed=1, progress=False)
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["fit", str(data), "-o", str(run), "--latent-dim", "1", "--classes", "2",
                                      "--max-images", "32", "--batch-size", "16", "--grid", "9", "--no-progress",
                                      "--n-heads", "1", "--pixels-per-pattern", "128", "--no-truth",
                                      "--search-rotations", "512"])
    assert result.exit_code == 0, result.output
    with h5py.File(run / "latent_posterior.h5") as f:
        probs, z_mean, z_sd = f["latent/class_probs"][()], f["latent/z_mean"][()], f["latent/z_sd"][()]
    assert probs.shape == (32, 2) and z_mean.shape == (32, 1) and np.all(z_sd > 0)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    with h5py.File(run / "intensity_latent.h5") as f:
        for cls in (0, 1):
            vol = f[f"class_{cls}/intensity"][()]
            assert vol.shape[1:] == (9, 9, 9) and np.all(np.isfinite(vol)) and np.all(vol > 0)
    from bayes_spi.infer.load import load_trained
    from bayes_spi.infer.volumes import read_intensity
    from bayes_spi.posterior.latent import intensity_at_latents

    # one volume per class at its members' mean latent, each that class's field (checked against the saved model)
    fields = load_trained(run).model.field
    members = probs.argmax(1) == 1
    with h5py.File(run / "latent_posterior.h5") as f:
        z1 = f["latent/z_loc"][()][members, 1].mean(0) if members.any() else np.zeros(1)
    own = [read_intensity(run / f"intensity_class{c}.h5")[0] for c in (0, 1)]
    q_run = fields.fields[0].q_max
    direct = intensity_at_latents(fields, z1[None].astype(np.float64), 9, q_run, 1)[0]
    np.testing.assert_allclose(own[1], direct, rtol=1e-4)
    assert not np.allclose(own[0], own[1], rtol=1e-3)
    import yaml

    assert (run / "report" / "latent.png").stat().st_size > 1000
    # the class posterior written is the refined one (the default), the guide's kept beside it; it is the refiner's on
    # the saved fields, and the per-class volumes' members above were read from it
    from bayes_spi.posterior.class_refine import refined_class_posteriors

    with h5py.File(run / "latent_posterior.h5") as f:
        assert f["latent/class_probs"].attrs["source"] == "refined" and f["latent/guide_class_probs"].shape == (32, 2)
    trained = load_trained(run)
    with SPIDataset(data) as ds:
        again = refined_class_posteriors(trained.model, ds, n_rotations=512, cache_grid=trained.config.cache_grid,
                                         latent_per_dim=trained.config.latent_nodes, seed=trained.config.seed + 12345)
    np.testing.assert_allclose(probs, again.class_probs, rtol=1e-4, atol=1e-5)
    settings = yaml.safe_load((run / "config.yaml").read_text())["settings"]
    assert (settings["latent_dim"], settings["n_classes"], settings["n_search"]) == (1, 2, 2)
    # the ArviZ export carries the same structure posteriors (all pixels scored, as latent_posterior.h5's)
    result = CliRunner().invoke(cli, ["posterior", str(run), str(data), "-o", str(tmp_path / "post.nc"), "--draws", "5",
                                      "--no-refine", "--score-pixels", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    import h5netcdf

    with h5netcdf.File(tmp_path / "post.nc", "r") as f:
        np.testing.assert_allclose(f["sample_stats/class_probs"][...], probs, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(f["sample_stats/latent_mean"][...], z_mean, rtol=1e-4, atol=1e-5)
        assert f["posterior/latent_z"].shape == (1, 5, 32, 1) and f["posterior/class_index"].shape == (1, 5, 32)
    # refined (the default): each pattern on its own class's field at its latent; with d = 1 on the field, not a cube
    result = CliRunner().invoke(cli, ["posterior", str(run), str(data), "-o", str(tmp_path / "ref.nc"), "--draws", "5",
                                      "--max-patterns", "8", "--no-progress"])
    assert result.exit_code == 0, result.output
    with h5netcdf.File(tmp_path / "ref.nc", "r") as f:
        assert f.attrs["refine_on"] == "field" and "most probable class" in f.attrs["pose_posterior_structure"]
        assert np.all(np.isfinite(f["sample_stats/cone_radius_deg"][...]))


# ---------------------------------------------------------------------- the export's pose refinement per class
@pytest.mark.parametrize("latent_dim, refine_on", [(0, "cache"), (0, "field"), (1, "cache")])
def test_export_refines_each_pattern_on_its_own_class_field(tmp_path, detector, latent_dim: int,
                                                            refine_on: str) -> None:
    """`bayes-spi posterior` on a heterogeneous fit: each pattern's hypotheses are refined against the field of its
    most probable class at its latent (the cube per class, or the field itself; with a continuous latent the field
    at the guide's z). Patterns of class 1 start 3 degrees off their true pose: refined on class 1's field they
    reach it; on class 0's field (what the export did before) they do not."""
    from types import SimpleNamespace

    from bayes_spi.dataio.h5 import H5Writer
    from bayes_spi.posterior.mixture import MixturePosterior
    from bayes_spi.posterior.netcdf import ExportSettings, guide_batches
    from bayes_spi.posterior.refine import refine_posterior
    from bayes_spi.so3 import geodesic_angle, rotvec_to_rotmat

    q, factor, mask = detector
    torch.manual_seed(11)
    model = HeterogeneousSPIModel(SirenField(q_max=float(q.norm(dim=-1).max()), out_scale=1.0), q, factor,
                                  n_hypotheses=3, latent_dim=latent_dim, n_classes=2)
    for f in model.field.fields:
        if latent_dim:
            _randomise_film(f, 0.3)
        with torch.no_grad():
            f.base.log_offset.fill_(math.log(20.0) - float(factor.log().mean()))
    model.eval()
    n = 6
    truth = torch.tensor([1, 0, 1, 1, 0, 1])
    z_true = torch.full((n, latent_dim), 1.5)
    rots = random_rotations(n)
    good = torch.nonzero(mask.reshape(-1)).squeeze(-1)
    with torch.no_grad():
        rate = model.latent_log_rate(rots, torch.zeros(n), torch.arange(1024), z_true if latent_dim else None,
                                     truth).exp()
    images = torch.poisson(rate).reshape(n, 32, 32) * mask
    geom = get_preset("reference-32").with_mask(mask.numpy().astype(bool))
    path = tmp_path / "tiny.h5"
    with H5Writer(path, geom) as writer:
        writer.append(images.numpy().astype(np.int32))
    axes = torch.randn(n, 3)
    start = rots @ rotvec_to_rotmat(axes / axes.norm(dim=-1, keepdim=True) * (3.0 / 180 * math.pi))  # 3 degrees off
    guide = LatentGuide(mask, latent_dim=latent_dim, n_classes=2, n_heads=1, n_search=1, features=32, channels=4,
                        search=lambda images, pixels: start[:, None], latent_scorer=model.class_hypothesis_logpost)
    if latent_dim:  # the guide's q(z | y, c) is centred on the true latent
        with torch.no_grad():
            guide.latent_head.weight.zero_()
            guide.latent_head.bias.view(2, 2, latent_dim)[:, 0] = 5.0 * math.atanh(1.5 / 5.0)
    trained = SimpleNamespace(guide=guide, model=model)
    settings = ExportSettings(n_refine=1, n_iter=4, score_pixels=0, refine_on=refine_on, cache_grid=97)
    with SPIDataset(path) as data:
        ((idx, _, post, latent),) = list(guide_batches(trained, data, settings))
    assert np.array_equal(latent.class_probs.argmax(1), truth.numpy())  # the class-aware scores find the class
    err = geodesic_angle(post.rotations[:, 0], rots) * 180 / math.pi
    start_err = geodesic_angle(start, rots) * 180 / math.pi
    torch.testing.assert_close(start_err, torch.full((n,), 3.0), atol=1e-3, rtol=0)
    assert float(err.max()) < 1.0, err  # every pattern reaches its true pose on its own class's field
    # the same start refined on class 0's field (the old behaviour) misses the class-1 patterns' poses
    with torch.no_grad(), guide.evaluating():
        gp = guide.posterior(images, good)
    gp.weights = torch.nn.functional.one_hot(torch.full((n,), 2), 3).float()  # the search's start, as above
    z0 = z_true if latent_dim else None
    wrong = refine_posterior(model, images, MixturePosterior.from_guide(gp), n_refine=1, n_iter=4, pixels=good,
                             log_intensity=lambda x: model.field.fields[0].log_intensity(x, z0))
    hit = (geodesic_angle(wrong.rotations[:, 0], rots) * 180 / math.pi)[truth == 1]
    assert float(hit.min()) > 1.0, hit


# ---------------------------------------------------------------------- the latent's data start
def test_ring_anisotropy_is_unbiased_and_orders_patterns(detector) -> None:
    """The debiased ring power: mean 0 for isotropic Poisson rings, (eps/2)^2 for a 1 + eps cos(2 phi) ring; the
    anisotropy score orders patterns by eps and maps them to N(0, 1) quantiles; the start weights favour the
    latent point nearest each pattern's start latent."""
    from bayes_spi.infer.latent_start import AnisotropyScore, ring_anisotropy, start_node_log_weights

    gen = torch.Generator().manual_seed(3)
    phi = torch.linspace(-math.pi, math.pi, 65, dtype=torch.float64)[:-1]
    radius = torch.ones(64, dtype=torch.float64)
    edges = torch.tensor([0.5, 1.5], dtype=torch.float64)
    for eps in (0.0, 0.5):
        rate = 20.0 * (1 + eps * torch.cos(2 * phi))
        a = ring_anisotropy(torch.poisson(rate.expand(4000, 64), generator=gen), radius, phi, edges)[:, 0]
        se = float(a.std()) / math.sqrt(len(a))
        assert abs(float(a.mean()) - (eps / 2) ** 2) < 4 * se, (float(a.mean()), se)
    q, _, mask = detector
    qd = q.double()
    az = torch.atan2(qd[:, 1], qd[:, 0])
    eps = torch.rand(400, generator=gen, dtype=torch.float64) * 0.8
    rate = 3.0 * (1 + eps[:, None] * torch.cos(2 * az)[None, :]) * torch.exp(-qd.norm(dim=-1) / 0.05)[None, :]
    images = torch.poisson(rate, generator=gen).reshape(400, 32, 32)
    score = AnisotropyScore.fit(images[:256], q, mask.reshape(-1), q_limit=0.08)
    z0 = score(images)
    from scipy.stats import spearmanr

    assert spearmanr(z0.numpy(), eps.numpy()).statistic > 0.8
    assert abs(float(z0[:256].mean())) < 0.1 and abs(float(z0[:256].std()) - 1.0) < 0.1
    nodes = torch.tensor([[-1.7], [0.0], [1.7]], dtype=torch.float64)
    logw = start_node_log_weights(torch.tensor([-2.0, 0.1, 1.5]), nodes, torch.log(torch.tensor([1 / 6, 2 / 3, 1 / 6])))
    torch.testing.assert_close(logw.exp().sum(-1), torch.ones(3, dtype=torch.float64))
    assert torch.equal(logw.argmax(-1), torch.tensor([0, 1, 2]))


def test_class_emc_per_pattern_node_weights() -> None:
    """ClassGridMarginal's per-pattern latent point weights (used once): the prior's give today's marginal; weights
    on one point put all the responsibility there."""
    from bayes_spi.infer.class_emc import ClassGridMarginal
    from bayes_spi.so3 import super_fibonacci_rotmat

    torch.manual_seed(2)
    model = HeterogeneousSPIModel(SirenField(0.125), torch.randn(64, 3) * 0.03, torch.full((64,), 1e-3),
                                  latent_dim=1, n_classes=2)
    for f in model.field.fields:
        _randomise_film(f)
    emc = ClassGridMarginal(model, super_fibonacci_rotmat(32), cache_grid=9)
    images = torch.poisson(torch.ones(4, 8, 8) * 3)
    base = emc(images, torch.arange(64))
    emc.pattern_log_node_weights = emc.log_node_weights.expand(4, 3).clone()
    same = emc(images, torch.arange(64))
    torch.testing.assert_close(same.log_marginal, base.log_marginal)
    assert emc.pattern_log_node_weights is None  # used once
    emc.pattern_log_node_weights = torch.tensor([0.0, -torch.inf, -torch.inf]).expand(4, 3)
    one = emc(images, torch.arange(64))
    torch.testing.assert_close(one.responsibilities[:, :, 0].sum((-1, -2)), torch.ones(4))
    emc.pattern_log_node_weights = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="per-pattern latent point log-weights"):
        emc(images, torch.arange(64))


def test_grid_class_posteriors_classify_patterns_of_each_class(tmp_path, detector) -> None:
    """The fine-grid class posterior of the fitted fields (no encoder): patterns simulated from class c's field at
    random poses are given to class c, with probabilities that sum to one."""
    from bayes_spi.dataio.h5 import H5Writer
    from bayes_spi.posterior.latent import grid_class_posteriors

    q, factor, mask = detector
    torch.manual_seed(5)
    model = HeterogeneousSPIModel(SirenField(q_max=float(q.norm(dim=-1).max()), out_scale=1.0), q, factor,
                                  n_classes=2)
    for f in model.field.fields:
        with torch.no_grad():
            f.base.log_offset.fill_(math.log(5.0) - float(factor.log().mean()))
    truth = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    with torch.no_grad():
        rate = model.latent_log_rate(random_rotations(8), torch.zeros(8), torch.arange(1024), None, truth).exp()
    images = torch.poisson(rate).reshape(8, 32, 32) * mask
    path = tmp_path / "two.h5"
    with H5Writer(path, get_preset("reference-32").with_mask(mask.numpy().astype(bool))) as writer:
        writer.append(images.numpy().astype(np.int32))
    with SPIDataset(path) as data:
        probs = grid_class_posteriors(model, data, n_rotations=2048, cache_grid=33, batch_size=3)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    assert np.array_equal(probs.argmax(1), truth.numpy()) and probs.max(1).min() > 0.9
