"""Class-aware orientation search and the class-aware EMC warm start of a heterogeneous fit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pyro.infer import TraceEnum_ELBO
from scipy.special import logsumexp
from scipy.stats import poisson

from bayes_spi.geometry import get_preset
from bayes_spi.guides.class_search import ClassOrientationSearch, latent_nodes
from bayes_spi.guides.latent import LatentGuide
from bayes_spi.guides.search import cube_points
from bayes_spi.infer.build import detector_tensors
from bayes_spi.infer.class_emc import ClassGridMarginal
from bayes_spi.models.conditional_field import ConditionalField
from bayes_spi.models.fields import SirenField
from bayes_spi.models.heterogeneous import HeterogeneousSPIModel
from bayes_spi.models.latent import LearnedClassPrior, make_latent_prior
from bayes_spi.models.spi import MAX_PLATE_NESTING, SPIBatch
from bayes_spi.so3 import geodesic_angle, random_rotmat, rotz_pi, super_fibonacci_rotmat
from bayes_spi.trilinear import sample_cube

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise_film(field: ConditionalField, std: float = 0.3) -> None:
    with torch.no_grad():
        field.film.mlp[-1].weight.normal_(0.0, std)
        field.film.mlp[-1].bias.normal_(0.0, std / 3)


def test_latent_nodes_are_the_gauss_hermite_rule() -> None:
    """3 points of N(0, s^2): 0 and +-sqrt(3) s with weights 2/3, 1/6, 1/6; a Student-t prior reweights them by
    p(z) / N(z; 0, 1), normalised; no latent: one node of weight 1."""
    z, log_w = latent_nodes(make_latent_prior("normal:scale=2", 1), 1, 3)
    np.testing.assert_allclose(z[:, 0].numpy(), [-2 * math.sqrt(3), 0.0, 2 * math.sqrt(3)], atol=1e-12)
    np.testing.assert_allclose(log_w.exp().numpy(), [1 / 6, 2 / 3, 1 / 6], atol=1e-12)
    z2, log_w2 = latent_nodes(make_latent_prior("normal", 2), 2, 3)
    assert z2.shape == (9, 2) and float(log_w2.exp()[4]) == pytest.approx(4 / 9)
    zt, log_wt = latent_nodes(make_latent_prior("studentt:df=3", 1), 1, 3)
    from scipy.stats import norm, t

    w = np.array([1 / 6, 2 / 3, 1 / 6]) * t.pdf(zt[:, 0].numpy(), 3) / norm.pdf(zt[:, 0].numpy())
    np.testing.assert_allclose(log_wt.exp().numpy(), w / w.sum(), rtol=1e-6)
    assert latent_nodes(None, 0)[0] is None


@pytest.mark.parametrize("per_dim", [1, 2, 3, 5])
def test_equal_latent_nodes_are_the_bin_means_of_equal_probability_bins(per_dim: int) -> None:
    """The equal rule: per_dim bins of equal Normal(0, s^2) probability, each point at its bin's conditional mean
    (SciPy's truncated normal mean), weights 1/per_dim; mean 0, variance below s^2 (the within-bin variance is
    lost) and rising towards it with more points; a product grid in 2 dimensions; unknown rules are refused."""
    from scipy.stats import norm, truncnorm

    s = 2.0
    z, log_w = latent_nodes(make_latent_prior(f"normal:scale={s}", 1), 1, per_dim, rule="equal")
    edges = norm.ppf(np.linspace(0, 1, per_dim + 1))
    expected = [s * truncnorm.mean(a, b) for a, b in zip(edges[:-1], edges[1:])]
    np.testing.assert_allclose(z[:, 0].numpy(), expected, atol=1e-9)
    np.testing.assert_allclose(log_w.exp().numpy(), np.full(per_dim, 1 / per_dim), atol=1e-12)
    w = log_w.exp().numpy()
    assert float(w @ z[:, 0].numpy()) == pytest.approx(0.0, abs=1e-9)
    var = float(w @ z[:, 0].numpy() ** 2)
    assert var < s**2
    if per_dim > 1:
        coarser = latent_nodes(make_latent_prior(f"normal:scale={s}", 1), 1, per_dim - 1, rule="equal")[0]
        assert var > float((coarser[:, 0] ** 2).mean())
    z2, log_w2 = latent_nodes(make_latent_prior("normal", 2), 2, per_dim, rule="equal")
    assert z2.shape == (per_dim**2, 2)
    np.testing.assert_allclose(log_w2.exp().numpy(), np.full(per_dim**2, per_dim**-2.0), atol=1e-12)
    with pytest.raises(ValueError, match="rule"):
        latent_nodes(None, 1, 3, rule="simpson")


def test_the_model_latent_rule_reaches_the_search_and_the_emc() -> None:
    """HeterogeneousSPIModel(latent_rule='equal'): the class-aware search and the EMC warm start evaluate the fields
    at the equal rule's points with equal weights; an unknown rule is refused by the model and by FitConfig."""
    from bayes_spi.infer.config import FitConfig

    q = torch.randn(64, 3) * 0.03
    model = HeterogeneousSPIModel(SirenField(q_max=0.2), q, torch.full((64,), 1e-3), latent_dim=1,
                                  latent_rule="equal")
    emc = ClassGridMarginal(model, super_fibonacci_rotmat(8), cache_grid=5)
    search = ClassOrientationSearch(model, n_rotations=8, n_keep=1, cache_grid=5)
    expected = latent_nodes(model.latent_prior, 1, 3, rule="equal")
    for nodes, log_w in ((emc.nodes, emc.log_node_weights), (search.nodes, search.log_node_weights)):
        np.testing.assert_allclose(nodes.numpy(), expected[0].numpy())
        np.testing.assert_allclose(log_w.exp().numpy(), [1 / 3] * 3, atol=1e-12)
    with pytest.raises(ValueError, match="latent_rule"):
        HeterogeneousSPIModel(SirenField(q_max=0.2), q, torch.full((64,), 1e-3), latent_dim=1, latent_rule="x")
    with pytest.raises(ValueError, match="latent_rule"):
        FitConfig(latent_dim=1, latent_rule="x")


@pytest.fixture(scope="module")
def detector() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return detector_tensors(get_preset("reference-32"))


def _two_class_model(q: torch.Tensor, factor: torch.Tensor, photons: float) -> HeterogeneousSPIModel:
    torch.manual_seed(7)
    model = HeterogeneousSPIModel(SirenField(q_max=float(q.norm(dim=-1).max()), out_scale=1.5), q, factor,
                                  latent_dim=1, n_classes=2)
    for f in model.field.fields:
        _randomise_film(f, 0.3)
    with torch.no_grad():  # ~photons per pattern at z = 0
        lvl = torch.logsumexp(model.field.fields[0].log_intensity(q.float()) + factor.log().float(), -1)
        for f in model.field.fields:
            f.base.log_offset.add_(math.log(photons) - float(lvl))
    return model


def test_class_search_proposes_each_class_and_its_true_pose(detector) -> None:
    """Patterns simulated from class k's field at known poses and latent points: class k's best proposal is within
    the grid covering radius of the truth (modulo the Rz(pi) partner), class k has the higher grid likelihood, the grid
    posterior mean of z has the true latent's sign; the guide built on the search proposes C n_keep poses, gives
    the true class, and centres q(z | c) on the search's latent mean."""
    q, factor, mask = detector
    model = _two_class_model(q, factor, 3e3)
    n = 8
    torch.manual_seed(8)
    rots = random_rotmat(n)
    truth = torch.tensor([0, 1, 0, 1, 0, 1, 1, 0])
    z_true = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, -1.0, 1.0, -1.0])[:, None] * math.sqrt(3)
    pixels = torch.arange(1024)
    with torch.no_grad():
        rate = model.latent_log_rate(rots, torch.zeros(n), pixels, z_true, truth).exp()
    images = torch.poisson(rate).reshape(n, 32, 32)
    search = ClassOrientationSearch(model, n_rotations=4096, n_keep=2, cache_grid=41)
    props = search(images, pixels)
    assert props.shape == (n, 4, 3, 3)
    spacing = (8 * math.pi**2 / 4096) ** (1 / 3)  # ~0.27 rad
    rows = torch.arange(n)
    own = props.reshape(n, 2, 2, 3, 3)[rows, truth, 0]  # (n, 3, 3): class truth's best proposal
    err = torch.minimum(geodesic_angle(own, rots), geodesic_angle(own, rots @ rotz_pi()))
    # within the grid's covering radius (~1.5 spacings) of the truth; a wrong pose is ~2 rad off
    assert float(err.max()) < 1.5 * spacing and float(err.mean()) < spacing, err
    assert torch.equal(search.last_class_loglik.argmax(-1), truth)
    assert torch.equal(torch.sign(search.last_latent_mean[rows, truth, 0]), torch.sign(z_true[:, 0]))
    guide = LatentGuide(mask, latent_dim=1, n_classes=2, n_heads=1, features=32, channels=4,
                        n_search=search.n_proposals, search=search, latent_scorer=model.class_hypothesis_logpost)
    post = guide.latent_posterior(images, pixels)
    assert post.pose.rotations.shape == (n, 2 + 4, 3, 3) and torch.equal(post.class_probs.argmax(-1), truth)
    head = guide.latent_head(guide.last_features).reshape(n, 2, 2, 1)[:, :, 0]
    torch.testing.assert_close(post.latent_loc, search.last_latent_mean.float() + 5 * torch.tanh(head / 5))
    # the best hypothesis of the true class is a search proposal (the encoder is untrained)
    assert bool(torch.all(post.hypothesis_weights[rows, truth].argmax(-1) >= 2))
    model.n_hypotheses = guide.n_hypotheses
    loss = TraceEnum_ELBO(max_plate_nesting=MAX_PLATE_NESTING).differentiable_loss(model, guide, SPIBatch(images, rows, pixels), n)
    assert torch.isfinite(loss)


def test_class_emc_estep_equals_brute_force() -> None:
    """log p(y_i) = logsumexp_{c,l,g}(log pi_c + log w_l + ll_iclg) - log G and the responsibilities, against a
    loop over classes, latent points (2-point Gauss-Hermite: z = +-1, w = 1/2) and rotations with SciPy's Poisson
    pmf at the profile scale on caches built here; the gradient reaches both class fields and the class prior. With
    the latent tempered (latent_beta = gamma < 1) the marginal is log sum_c pi_c exp(logsumexp_l(gamma m_cl) / gamma),
    m_cl = log w_l + logsumexp_g ll - log G, by hand; as gamma -> 0 every latent point takes its prior share."""
    torch.manual_seed(9)
    q = torch.randn(48, 3) * 0.04
    factor = torch.full((48,), 1e-3)
    prior = LearnedClassPrior(2)
    with torch.no_grad():
        prior.logits.copy_(torch.tensor([0.4, -0.3]))
    model = HeterogeneousSPIModel(SirenField(q_max=float(q.norm(dim=-1).max()), out_scale=1.0), q, factor,
                                  latent_dim=1, n_classes=2, class_prior=prior)
    for f in model.field.fields:
        _randomise_film(f, 0.3)
        with torch.no_grad():
            f.base.log_offset.fill_(math.log(4e3))
    rotations = super_fibonacci_rotmat(16)
    emc = ClassGridMarginal(model, rotations, cache_grid=9, latent_per_dim=2)
    images = torch.poisson(torch.full((3, 6, 8), 2.0))
    pixels = torch.arange(48)
    out = emc(images, pixels)
    y = images.reshape(3, -1).double().numpy()
    n_tot = y.sum(1)
    pts, log_pi = cube_points(9, emc.q_max), prior.log_probs().detach().double().numpy()
    ll = np.zeros((3, 2, 2, 16))
    with torch.no_grad():
        for c in range(2):
            for l, z in enumerate((-1.0, 1.0)):
                cube = model.field.fields[c].log_intensity(pts, torch.tensor([z])).reshape(1, 1, 9, 9, 9)
                for g in range(16):
                    lam = (sample_cube(cube, q @ rotations[g].T, emc.q_max) + factor.log()).exp().double().numpy()
                    s = n_tot / lam.sum()
                    ll[:, c, l, g] = poisson.logpmf(y, s[:, None] * lam[None]).sum(1)
    joint = ll + log_pi[None, :, None, None] + math.log(0.5)
    want = logsumexp(joint.reshape(3, -1), axis=1) - math.log(16)
    np.testing.assert_allclose(out.log_marginal.detach().double().numpy(), want, rtol=1e-5)
    resp = np.exp(joint - logsumexp(joint.reshape(3, -1), axis=1)[:, None, None, None])
    # the E-step runs in float32: log-likelihoods of a few hundred nats carry ~1e-5 of rounding, so the
    # responsibilities agree to a relative 1e-4 (an absolute 1e-5 failed on 2 of 192 with numpy 2.4 / scipy 1.17)
    np.testing.assert_allclose(out.responsibilities.double().numpy(), resp, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(out.class_probs.sum(-1).numpy(), 1.0, rtol=1e-5)
    out.log_marginal.sum().backward()
    for f in model.field.fields:
        assert f.base.net.first.grad.abs().sum() > 0 and f.film.mlp[-1].weight.grad.abs().sum() > 0
    assert prior.logits.grad.abs().sum() > 0
    m = logsumexp(ll, axis=-1) - math.log(16) + math.log(0.5)  # (B, C, L)
    for gamma in (0.3, 1e-4):
        emc.latent_beta = gamma
        tempered = emc(images, pixels)
        per_class = logsumexp(gamma * m, axis=-1) / gamma + log_pi[None]
        np.testing.assert_allclose(tempered.log_marginal.detach().double().numpy(), logsumexp(per_class, axis=1),
                                   rtol=1e-5)
        lat = np.exp(gamma * m - logsumexp(gamma * m, axis=-1)[..., None])
        got = tempered.responsibilities.double().numpy()
        np.testing.assert_allclose(got.sum((1, 2, 3)), 1.0, rtol=1e-5)
        np.testing.assert_allclose(got.sum(-1) / got.sum((-2, -1))[..., None], lat, atol=1e-5)
    assert np.allclose(lat, 0.5, atol=1e-3)  # gamma -> 0: the prior's weights
    emc.latent_beta = 0.0
    with pytest.raises(ValueError, match="latent_beta"):
        emc(images, pixels)


def test_netcdf_export_carries_the_structure_posteriors(tmp_path) -> None:
    """The ArviZ export of a heterogeneous fit: class probabilities and the q(z | c) parameters as written, the
    mixture moments by the law of total variance, draws whose class frequencies and z moments match q within
    Monte Carlo error, the same draws whatever the batching, and the file opens in ArviZ."""
    az = pytest.importorskip("arviz")
    from bayes_spi.posterior import MixturePosterior, export_batches
    from bayes_spi.posterior.netcdf import ExportSettings, LatentBatch

    rng = np.random.default_rng(3)
    n, n_c, n_d, n_draws = 6, 3, 2, 4000
    probs = rng.dirichlet(np.ones(n_c), n)
    loc, scale = rng.normal(0, 2, (n, n_c, n_d)), rng.uniform(0.1, 0.5, (n, n_c, n_d))
    rots = random_rotmat(n, dtype=torch.float64)
    pose = MixturePosterior(rots[:, None], torch.diag_embed(torch.full((n, 3), 0.05, dtype=torch.float64))[:, None],
                            torch.ones(n, 1, dtype=torch.float64), torch.zeros(n, 1, dtype=torch.float64),
                            torch.full((n, 1), 0.1, dtype=torch.float64))
    settings = ExportSettings(n_draws=n_draws, refine=False)
    idx = np.arange(10, 10 + n)

    def batches(step: int):
        for s in range(0, n, step):
            sl = slice(s, s + step)
            part = MixturePosterior(pose.rotations[sl], pose.pose_tril[sl], pose.weights[sl], pose.log_scale_loc[sl],
                                    pose.log_scale_sd[sl])
            yield idx[sl], np.full(len(idx[sl]), 1e3), part, LatentBatch(probs[sl], loc[sl], scale[sl])

    one, two = tmp_path / "one.nc", tmp_path / "two.nc"
    export_batches(batches(n), one, idx, 1, settings, latent_shape=(n_c, n_d))
    export_batches(batches(4), two, idx, 1, settings, latent_shape=(n_c, n_d))
    idata = az.from_netcdf(one)
    st, post = idata.sample_stats, idata.posterior
    np.testing.assert_allclose(st["class_probs"].values, probs, rtol=1e-6)
    np.testing.assert_allclose(st["latent_loc"].values, loc, rtol=1e-6)
    w = probs[..., None]
    mean = (w * loc).sum(1)
    var = (w * (scale**2 + loc**2)).sum(1) - mean**2
    np.testing.assert_allclose(st["latent_mean"].values, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st["latent_sd"].values, np.sqrt(var), rtol=1e-5)
    z, cls = post["latent_z"].values[0], post["class_index"].values[0]  # (D, N, d), (D, N)
    assert z.shape == (n_draws, n, n_d) and cls.shape == (n_draws, n)
    freq = np.stack([(cls == c).mean(0) for c in range(n_c)], 1)
    assert np.all(np.abs(freq - probs) < 4 * np.sqrt(probs * (1 - probs) / n_draws) + 1e-9)
    assert np.all(np.abs(z.mean(0) - mean) < 4 * np.sqrt(var / n_draws))
    assert list(st["class_probs"].coords["pattern"].values) == list(idx)
    import h5netcdf

    with h5netcdf.File(one, "r") as a, h5netcdf.File(two, "r") as b:
        np.testing.assert_array_equal(a["posterior/latent_z"][...], b["posterior/latent_z"][...])
        np.testing.assert_array_equal(a["posterior/class_index"][...], b["posterior/class_index"][...])


def test_heterogeneous_trainer_warm_start_is_class_aware(tmp_path) -> None:
    """A heterogeneous fit's warm start is the class-aware grid marginal on the search's grid, one warm-start step
    raises the batch's log marginal, and the level moves every class field's offset (they share the scales)."""
    from bayes_spi.dataio.h5 import SPIDataset
    from bayes_spi.infer.config import FitConfig
    from bayes_spi.infer.heterogeneous import HeterogeneousTrainer
    from bayes_spi.sim.ensemble import simulate_ensemble

    data = tmp_path / "ens.h5"
    simulate_ensemble("shapes:p=2,20;voxels=16", "reference-32", 32, data, seed=2, progress=False)
    config = FitConfig(latent_dim=1, n_classes=2, n_heads=1, n_search=1, search_rotations=256, cache_grid=17,
                       batch_size=16, emc_pixels=256, auto_settings=False, encoder_features=32, encoder_channels=4,
                       device="cpu", emc_fraction=1.0, lr=1e-3)
    with SPIDataset(data) as ds:
        trainer = HeterogeneousTrainer(ds, config, tmp_path / "run", progress=False)
        assert isinstance(trainer.emc, ClassGridMarginal) and trainer.guide.n_search == 2
        assert torch.equal(trainer.emc.rotations, trainer.guide.search.rotations)
        trainer.initialise_offset(32)
        images = torch.as_tensor(ds.read(np.arange(16)))
        pixels, n_eligible = trainer.select_pixels(0, 256)
        batch = SPIBatch(images, torch.arange(16), pixels, n_eligible)
        before = float(trainer.emc(images, pixels).log_marginal.detach().mean())
        for _ in range(3):
            trainer.emc_step(batch)
        after = float(trainer.emc(images, pixels).log_marginal.detach().mean())
        assert after > before
        offsets = torch.stack([f.log_offset.detach().clone() for f in trainer.model.field.fields])
        shift = trainer._shift_level(trainer._prior_log_scale() + 0.5)
        assert shift == pytest.approx(0.5)
        torch.testing.assert_close(torch.stack([f.log_offset for f in trainer.model.field.fields]), offsets + 0.5)


def test_both_searches_share_the_grid_search_accessors() -> None:
    """OrientationSearch and ClassOrientationSearch share one base (model, grid, cache): the same rotation grid for
    the same settings, the model held outside the module tree, and each cache setter refuses a cube of another
    shape, naming the expected one ((1, 1, n, n, n) for one field, (C, L, n, n, n) per class and latent point)."""
    from bayes_spi.guides.search import GridSearchBase, OrientationSearch
    from bayes_spi.models.spi import SPIModel

    q, w = torch.randn(64, 3) * 0.03, torch.full((64,), 1e-3)
    one = OrientationSearch(SPIModel(SirenField(0.125), q, w), n_rotations=64, n_keep=2, cache_grid=9)
    het = HeterogeneousSPIModel(SirenField(0.125), q, w, latent_dim=1, n_classes=2)
    many = ClassOrientationSearch(het, n_rotations=64, n_keep=2, cache_grid=9)
    assert isinstance(one, GridSearchBase) and isinstance(many, GridSearchBase)
    assert torch.equal(one.rotations, many.rotations) and many.model is het
    assert one.n_keep == many.n_keep == 2 and many.n_proposals == 4 and one.q_max == many.q_max
    with pytest.raises(ValueError, match=r"expected a cache of shape \(1, 1, 9, 9, 9\), got shape \(2, 3, 9, 9, 9\)"):
        one.cache = torch.zeros(2, 3, 9, 9, 9)
    with pytest.raises(ValueError, match=r"expected a cache of shape \(2, 3, 9, 9, 9\), got shape \(1, 1, 9, 9, 9\)"):
        many.cache = torch.zeros(1, 1, 9, 9, 9)
    many.cache = torch.zeros(2, 3, 9, 9, 9)
    one.cache = None
    assert one.cache is None and many.cache.shape == (2, 3, 9, 9, 9)
