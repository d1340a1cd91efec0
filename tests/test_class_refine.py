"""The refined (off-grid) class posterior of a heterogeneous fit: bayes_spi.posterior.class_refine."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bayes_spi.geometry import get_preset
from bayes_spi.guides.class_search import class_grid_loglik
from bayes_spi.infer.build import detector_tensors
from bayes_spi.infer.class_emc import ClassGridMarginal
from bayes_spi.guides.search import orientation_grid
from bayes_spi.models.fields import SirenField
from bayes_spi.models.heterogeneous import HeterogeneousSPIModel
from bayes_spi.models.latent import LearnedClassPrior
from bayes_spi.posterior.class_refine import ClassModeRefiner
from bayes_spi.posterior.local import profile_loglik
from bayes_spi.so3 import random_rotmat, rotvec_to_rotmat
from bayes_spi.trilinear import sample_cube

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def detector() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return detector_tensors(get_preset("reference-32"))


def _two_states(detector, rate: float, perturb: float, n_classes: int = 2, seed: int = 5) -> HeterogeneousSPIModel:
    """Class fields that are one random SIREN, the later ones with a perturbed output layer (``perturb``: how far
    the states differ), about ``rate`` photons per pixel on average."""
    q, factor, _ = detector
    torch.manual_seed(seed)
    model = HeterogeneousSPIModel(SirenField(q_max=float(q.norm(dim=-1).max()), out_scale=1.0), q, factor,
                                  n_classes=n_classes,
                                  class_prior=LearnedClassPrior(n_classes) if n_classes > 1 else None)
    first = model.field.fields[0]
    with torch.no_grad():
        first.base.log_offset.fill_(math.log(rate) - float(factor.log().mean()))
        for f in model.field.fields[1:]:
            f.load_state_dict(first.state_dict())
            f.base.net.out.weight.add_(torch.randn_like(f.base.net.out.weight) * perturb)
    return model


def _simulate(model: HeterogeneousSPIModel, classes: torch.Tensor, pixels: torch.Tensor, seed: int) -> torch.Tensor:
    """Poisson counts ``(B, M)`` of each class's field at random poses, fluence 1."""
    gen = torch.Generator().manual_seed(seed)
    R = random_rotmat(len(classes), generator=gen)
    with torch.no_grad():
        rate = model.latent_log_rate(R, torch.zeros(len(classes)), pixels, None, classes).exp()
    return torch.poisson(rate, generator=gen)


def test_refined_posterior_labels_what_the_coarse_grid_mislabels(detector) -> None:
    """Two states that differ in fine speckles, ~2,000 photons: summed over a coarse grid (1,024 orientations,
    ~21 degrees) the class posterior mislabels a third of the patterns; refined off the grid it labels them as the
    true model does and agrees with a 32x finer grid."""
    q, _, mask = detector
    pixels = torch.nonzero(mask.reshape(-1)).squeeze(-1)
    model = _two_states(detector, rate=2.0, perturb=0.03)
    truth = torch.arange(32) % 2
    y = _simulate(model, truth, pixels, seed=3)
    coarse = ClassGridMarginal(model, orientation_grid(1024), cache_grid=33)(
        torch.zeros(32, 1024).index_copy(1, pixels, y).reshape(32, 32, 32), pixels).class_probs
    refined = ClassModeRefiner(model, n_rotations=1024, cache_grid=33)(y, pixels)
    fine = ClassGridMarginal(model, orientation_grid(32768), cache_grid=33)(
        torch.zeros(32, 1024).index_copy(1, pixels, y).reshape(32, 32, 32), pixels).class_probs
    acc = {name: float((p.argmax(1) == truth).double().mean()) for name, p in
           (("coarse", coarse), ("refined", refined.class_probs), ("fine", fine))}
    assert acc["coarse"] <= 0.8 and acc["refined"] >= 0.9, acc
    assert int((refined.class_probs.argmax(1) == fine.argmax(1)).sum()) >= 30, acc
    torch.testing.assert_close(refined.class_probs.sum(1), torch.ones(32, dtype=torch.float64))
    # the patterns the coarse grid got wrong are (mostly) the ones the refinement puts right
    fixed = (coarse.argmax(1) != truth) & (refined.class_probs.argmax(1) == truth)
    assert int(fixed.sum()) >= 6


def test_one_class_and_identical_fields(detector) -> None:
    """One class: probability 1. Two identical fields: every pattern's posterior is the prior (the evidences are
    equal), tempered as the EMC warm start tempers it: ``pi_c^beta`` normalised."""
    _, _, mask = detector
    pixels = torch.nonzero(mask.reshape(-1)).squeeze(-1)
    one = _two_states(detector, rate=1.0, perturb=0.0, n_classes=1)
    y = _simulate(one, torch.zeros(5, dtype=torch.long), pixels, seed=1)
    out = ClassModeRefiner(one, n_rotations=256, cache_grid=17)(y, pixels)
    assert out.class_probs.shape == (5, 1) and torch.equal(out.class_probs, torch.ones(5, 1, dtype=torch.float64))
    two = _two_states(detector, rate=1.0, perturb=0.0)
    with torch.no_grad():
        two.class_prior.logits.copy_(torch.log(torch.tensor([0.3, 0.7])))
    for beta, expected in ((1.0, [0.3, 0.7]), (0.5, [math.sqrt(0.3), math.sqrt(0.7)])):
        p = ClassModeRefiner(two, n_rotations=256, cache_grid=17, beta=beta)(y, pixels).class_probs
        e = torch.tensor(expected, dtype=torch.float64)
        torch.testing.assert_close(p, (e / e.sum()).expand(5, 2), rtol=0, atol=1e-6)


def _log_integral(model: HeterogeneousSPIModel, refiner: ClassModeRefiner, y: torch.Tensor, pixels: torch.Tensor,
                  R0: torch.Tensor, half_width: float, n: int) -> torch.Tensor:
    """``log ∫ exp(ll(R0 exp(eps))) J(eps) d^3 eps`` over the cube ``|eps_i| <= half_width`` by the midpoint rule on
    ``n^3`` points (``J = 2 (1 - cos t) / t^2``: the Haar density in rotation-vector coordinates), float64."""
    h = 2 * half_width / n
    ax = (torch.arange(n, dtype=torch.float64) + 0.5) * h - half_width
    eps = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    t = eps.norm(dim=-1)
    log_j = torch.log(2 * (1 - torch.cos(t)) / t.clamp(min=1e-12) ** 2).where(t > 1e-6, torch.zeros_like(t))
    R = R0.double() @ rotvec_to_rotmat(eps)  # (P, 3, 3)
    qd = model.q[pixels].double()
    cube = refiner.caches[0, 0][None, None].double()
    ll = torch.cat([profile_loglik(sample_cube(cube, torch.einsum("pij,mj->pmi", R[s:s + 2048], qd), refiner.q_max)
                                   + model.log_pixel_factor[pixels].double(), y.double()[None])
                    for s in range(0, R.shape[0], 2048)])
    return torch.logsumexp(ll + log_j, 0) + 3 * math.log(h)


def test_evidence_equals_numerical_integrals(detector) -> None:
    """``log p(y | c) |SO(3)|`` of the refiner against numerical integrals of the same likelihood (the same cube):
    at ~2,000 photons (the Laplace modes carry it) a midpoint rule around the best mode; at tens of photons (mostly
    the grid term: nearly flat) the sum over a 16x finer grid."""
    _, _, mask = detector
    pixels = torch.nonzero(mask.reshape(-1)).squeeze(-1)
    model = _two_states(detector, rate=2.0, perturb=0.0, n_classes=1)
    y = _simulate(model, torch.zeros(1, dtype=torch.long), pixels, seed=2)
    refiner = ClassModeRefiner(model, n_rotations=2048, cache_grid=33, n_iter=8)
    out = refiner(y, pixels)
    assert float(out.mode_share[0, 0, 0]) > 0.999
    # the best mode again (refine_on_cache on the refiner's seeds), then a grid of +-6 sd around it
    from bayes_spi.posterior.local import refine_on_cache

    ll, _ = class_grid_loglik(refiner.caches, refiner.rotations, model.q[pixels], model.log_pixel_factor[pixels], y,
                              refiner.q_max)
    seeds = refiner._seeds(ll[:, 0, 0].double())
    modes = refine_on_cache(refiner.caches[0, 0][None, None], refiner.rotations[seeds], model.q[pixels],
                            model.log_pixel_factor[pixels], y, refiner.q_max, n_iter=8,
                            max_step_deg=math.degrees(0.5 * refiner.spacing))
    best = int(modes.log_evidence[0].argmax())
    half = 5 * float(modes.sigmas[0, best].max())
    numeric = _log_integral(model, refiner, y[0], pixels, modes.rotations[0, best], half, 25)
    # the Laplace volume uses the Gauss-Newton (expected) curvature of a trilinearly read likelihood: ~0.25 nats
    # above the integral here (4 nats lower the midpoint rule would have missed the peak: -log(1/sigma^3 ...))
    assert abs(float(out.log_evidence[0, 0, 0]) - float(numeric)) < 0.35, (float(out.log_evidence[0, 0, 0]),
                                                                          float(numeric))
    # one grid rotation's cell instead of the refined mode: the coarse grid's estimate is far off
    coarse = float(torch.logsumexp(ll[0, 0, 0].double(), -1)) + refiner.log_cell
    assert abs(coarse - float(numeric)) > 5.0
    # nearly flat: tens of photons
    faint = _two_states(detector, rate=0.01, perturb=0.0, n_classes=1)
    y = _simulate(faint, torch.zeros(4, dtype=torch.long), pixels, seed=4)
    out = ClassModeRefiner(faint, n_rotations=2048, cache_grid=33)(y, pixels)
    fine = orientation_grid(32768)
    caches = ClassModeRefiner(faint, rotations=fine[:1], cache_grid=33).caches
    ll, _ = class_grid_loglik(caches, fine, faint.q[pixels], faint.log_pixel_factor[pixels], y, refiner.q_max)
    grid_integral = torch.logsumexp(ll[:, 0, 0].double(), -1) + math.log(8 * math.pi ** 2 / 32768)
    # the grid term's units are the Laplace terms' (a cell's Haar volume): off by log(8 pi^2) = 4.4 otherwise; the
    # rest is the coarse grid's own quadrature error at a few tens of photons
    np.testing.assert_allclose(out.log_evidence[:, 0, 0].numpy(), grid_integral.numpy(), atol=0.3)
