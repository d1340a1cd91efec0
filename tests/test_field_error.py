"""The half-merge estimate of the field's pose error (bayes_spi.posterior.fielderror): the merge is the exact
M-step (a constant field is returned exactly, a Friedel pair is merged once per mate), identical half cubes
give zero, and independent half-cube errors give the half fields' true pose scatter."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bayes_spi.geometry import get_preset
from bayes_spi.guides.search import cube_points
from bayes_spi.posterior.fielderror import HalfMerge, estimate_field_pose_error, split_halves
from bayes_spi.posterior.local import refine_on_cache
from bayes_spi.posterior.mixture import MixturePosterior
from bayes_spi.so3 import random_rotmat, rotmat_to_rotvec
from bayes_spi.trilinear import sample_cube


def _detector() -> tuple[torch.Tensor, torch.Tensor, float]:
    geom = get_preset("reference-32")
    q = torch.as_tensor(geom.q_vectors().reshape(-1, 3), dtype=torch.float64)
    return q, torch.zeros(q.shape[0], dtype=torch.float64), float(q.norm(dim=-1).max())


def _speckles(x: torch.Tensor, q_max: float, seed: int = 3) -> torch.Tensor:
    """A Friedel-symmetric log I of Gaussian speckles (as tests/test_local_refine.py)."""
    gen = torch.Generator().manual_seed(seed)
    c = (torch.rand(40, 3, generator=gen, dtype=torch.float64) * 2 - 1) * 0.8 * q_max
    w = 0.08 * q_max
    i = (torch.exp(-((x[..., None, :] - c) ** 2).sum(-1) / (2 * w * w)).sum(-1)
         + torch.exp(-((x[..., None, :] + c) ** 2).sum(-1) / (2 * w * w)).sum(-1))
    return torch.log(i + 0.02)


def test_merge_of_a_constant_field_is_exact_and_counts_friedel_mates():
    q, log_w, q_max = _detector()
    log_w = torch.log(torch.linspace(0.5, 1.5, q.shape[0], dtype=torch.float64))  # pixel factors must cancel
    R = random_rotmat(20, generator=torch.Generator().manual_seed(0)).double()
    log_s = torch.linspace(-0.3, 0.3, 20, dtype=torch.float64)
    # expected counts of I = 3 (not integers: the merge is linear in the counts)
    y = 3.0 * log_s.exp()[:, None] * log_w.exp()[None]
    m = HalfMerge(17, q_max, q, log_w)
    m.add(y, R, log_s)
    cube = m.log_cube()
    np.testing.assert_allclose(cube.numpy(), math.log(3.0), atol=1e-5)  # reached voxels, shells, and the rest
    # every photon is splatted twice (at R q and -R q); trilinear weights sum to one per point
    np.testing.assert_allclose(float(m.sums[..., 0].sum()), 2 * float(y.sum()), rtol=1e-10)
    with pytest.raises(ValueError, match="expected counts"):
        m.add(y[:, :10], R, log_s)
    with pytest.raises(ValueError, match="no pattern added"):
        HalfMerge(17, q_max, q, log_w).log_cube()


def test_split_halves_partitions_the_patterns():
    probes, a, b = split_halves(101, 11, seed=2)
    assert len(probes) == 11 and abs(len(a) - len(b)) <= 1
    assert sorted(np.concatenate([probes, a, b]).tolist()) == list(range(101))
    with pytest.raises(ValueError, match="n_probes"):
        split_halves(10, 10)


@pytest.fixture(scope="module")
def probes():
    q, log_w, q_max = _detector()
    n = 49
    pts = cube_points(n, q_max).double()
    truth = _speckles(pts, q_max).reshape(1, 1, n, n, n)
    gen = torch.Generator().manual_seed(4)
    R = random_rotmat(48, generator=gen).double()
    lam = 3e4 * torch.softmax(sample_cube(truth, torch.einsum("bij,mj->bmi", R, q), q_max), dim=-1)
    y = torch.poisson(lam, generator=gen)
    return {"q": q, "log_w": log_w, "q_max": q_max, "n": n, "pts": pts, "truth": truth, "R": R, "y": y}


def _smooth_noise(pts: torch.Tensor, q_max: float, amplitude: float, seed: int) -> torch.Tensor:
    """A smooth random log-intensity error (Friedel-symmetric Gaussian bumps of random sign)."""
    gen = torch.Generator().manual_seed(seed)
    c = (torch.rand(200, 3, generator=gen, dtype=torch.float64) * 2 - 1) * q_max
    a = torch.randn(200, generator=gen, dtype=torch.float64) * amplitude
    w = 0.06 * q_max
    g = (a * (torch.exp(-((pts[..., None, :] - c) ** 2).sum(-1) / (2 * w * w))
              + torch.exp(-((pts[..., None, :] + c) ** 2).sum(-1) / (2 * w * w)))).sum(-1)
    return g


def test_identical_half_cubes_give_no_field_error(probes):
    p = probes
    est = estimate_field_pose_error(p["truth"], p["truth"], p["q"], p["log_w"], p["y"], p["R"], p["q_max"])
    assert est.sigma_rad < 1e-6 and est.n_probes == 48


def test_independent_half_errors_give_the_half_fields_pose_scatter(probes):
    """sqrt(2) sigma_field is one half field's pose error per axis: compare it with the probes' actual modes on
    one half cube against the modes on the true cube (the photons' own error cancels)."""
    p = probes
    n = p["n"]
    shape = (1, 1, n, n, n)
    cube_a = p["truth"] + _smooth_noise(p["pts"], p["q_max"], 1.0, 10).reshape(shape)
    cube_b = p["truth"] + _smooth_noise(p["pts"], p["q_max"], 1.0, 11).reshape(shape)
    est = estimate_field_pose_error(cube_a, cube_b, p["q"], p["log_w"], p["y"], p["R"], p["q_max"], trim=1.0)
    on_truth = refine_on_cache(p["truth"], p["R"][:, None], p["q"], p["log_w"], p["y"], p["q_max"],
                               n_iter=6).rotations[:, 0]
    e_a = rotmat_to_rotvec(on_truth.transpose(-1, -2) @ est.rotations_a)
    e_b = rotmat_to_rotvec(on_truth.transpose(-1, -2) @ est.rotations_b)
    actual = float(torch.cat([e_a, e_b]).pow(2).mean().sqrt())  # per axis, one half field
    assert math.radians(0.3) < actual < math.radians(5.0)  # the errors move the modes measurably, within a basin
    assert 0.8 < math.sqrt(2.0) * est.sigma_rad / actual < 1.25  # measured 0.97 (also at half and twice the error)
    # half the error amplitude: a smaller estimate
    half = estimate_field_pose_error(p["truth"] + 0.5 * (cube_a - p["truth"]), p["truth"] + 0.5 * (cube_b - p["truth"]),
                                     p["q"], p["log_w"], p["y"], p["R"], p["q_max"], trim=1.0)
    assert half.sigma_rad < 0.6 * est.sigma_rad


def test_field_against_halves_gives_the_fields_own_pose_error(probes):
    """A fitted field whose noise is the average of the halves' and which has a bias of its own: sigma_field is
    the rms per axis of its modes' error (against the modes on the true cube), noise and bias together."""
    p = probes
    n = p["n"]
    shape = (1, 1, n, n, n)
    eps_a = _smooth_noise(p["pts"], p["q_max"], 1.0, 10).reshape(shape)
    eps_b = _smooth_noise(p["pts"], p["q_max"], 1.0, 11).reshape(shape)
    bias = _smooth_noise(p["pts"], p["q_max"], 1.2, 12).reshape(shape)
    cube_f = p["truth"] + 0.5 * (eps_a + eps_b) + bias
    est = estimate_field_pose_error(p["truth"] + eps_a, p["truth"] + eps_b, p["q"], p["log_w"], p["y"], p["R"],
                                    p["q_max"], cube_f=cube_f, trim=1.0)
    on_truth = refine_on_cache(p["truth"], p["R"][:, None], p["q"], p["log_w"], p["y"], p["q_max"],
                               n_iter=6).rotations[:, 0]
    actual = float(rotmat_to_rotvec(on_truth.transpose(-1, -2) @ est.rotations_f).pow(2).mean().sqrt())
    assert math.radians(0.3) < actual < math.radians(5.0)
    # measured 1.10; with a smaller bias it over-estimates (1.28 at half this bias, 1.67 with none: the pose error of
    # a field error grows faster than linearly, so the average of two half errors moves the modes less than the
    # linear rule says): on the safe side
    assert 0.8 < est.sigma_rad / actual < 1.4
    assert est.noise_sigma_rad < 0.6 * est.sigma_rad  # the bias is not noise


def test_inflated_adds_an_isotropic_tangent_variance():
    L = torch.diag_embed(torch.tensor([[[0.01, 0.02, 0.03]]], dtype=torch.float64))
    post = MixturePosterior(torch.eye(3, dtype=torch.float64).expand(1, 1, 3, 3), L, torch.ones(1, 1),
                            torch.zeros(1, 1), torch.full((1, 1), 0.1))
    out = post.inflated(0.04 ** 2)
    cov = out.pose_tril @ out.pose_tril.transpose(-1, -2)
    np.testing.assert_allclose(cov[0, 0].numpy(), np.diag([0.01, 0.02, 0.03]) ** 2 + 0.04 ** 2 * np.eye(3), atol=1e-12)
    assert torch.equal(out.log_scale_sd, post.log_scale_sd)
    assert post.inflated(0.0) is post
    with pytest.raises(ValueError, match="pose_variance"):
        post.inflated(-1.0)
