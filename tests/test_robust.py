"""Robust fitting: settings from the data, the EMC E-step, the truth-free verdict, low-photon encoder inputs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bayes_spi.analysis.compare import compare_to_reference, speckle_correlation
from bayes_spi.analysis.sampling import diameter_from_profile, estimate_sampling, sampling_report
from bayes_spi.guides.encoder import PatternEncoder
from bayes_spi.infer.emc import GridMarginal, cache_grid_for
from bayes_spi.infer.verdict import elbo_checks, information_gain, information_limit_note, pose_change_deg, shell_gains
from bayes_spi.models.fields import SirenField, VoxelField
from bayes_spi.models.spi import SPIModel
from bayes_spi.so3 import random_rotmat, super_fibonacci_rotmat


def _sphere(q: np.ndarray, d: float) -> np.ndarray:
    x = np.pi * q * d
    return (3 * (np.sin(x) - x * np.cos(x)) / x**3) ** 2


@pytest.mark.parametrize("diameter", [40.0, 120.0, 250.0])
def test_diameter_of_uniform_spheres_from_their_radial_profile(diameter: float) -> None:
    """Closed form: a uniform sphere's intensity; the estimate is calibrated, not fitted, so this can fail."""
    q = np.arange(0.6 / 250, 0.06, 0.0012)  # a beam stop hides the lowest shells
    assert diameter_from_profile(q, _sphere(q, diameter)) == pytest.approx(diameter, rel=0.1)


def test_diameter_of_a_protein_from_simulated_patterns(tmp_path: Path) -> None:
    """2CEX (largest distance between atoms ~65 A) from 300 simulated patterns at 1e4 photons."""
    from bayes_spi.dataio.h5 import SPIDataset
    from bayes_spi.sim.simulate import simulate

    data = tmp_path / "d.h5"
    simulate("2CEX", "reference-32", 300, data, artifacts="FPB", mean_photons=1e4, truth_grid=0, seed=2,
             progress=False)
    with SPIDataset(data) as ds:
        rep = estimate_sampling(ds, n_patterns=300)
        from bayes_spi.infer.autoset import data_settings
        from bayes_spi.infer.config import FitConfig

        cfg, _ = data_settings(ds, FitConfig(field_w0=7.0), given={"field_w0": 7.0})
        off, _ = data_settings(ds, FitConfig(auto_settings=False), given={})
    assert cfg.field_w0 == 7.0  # given settings always win
    assert cfg.search_rotations == rep.grid_rotations and cfg.cache_grid % 2 == 1 and cfg.cache_grid >= 33
    assert off == FitConfig(auto_settings=False)  # --no-auto-settings changes nothing
    assert 45.0 < rep.diameter_A < 85.0, rep
    assert rep.oversampling == pytest.approx(172.5 / rep.diameter_A, rel=0.02)
    assert not rep.undersampled
    assert rep.photons_per_pattern == pytest.approx(1e4, rel=0.1)


@pytest.mark.parametrize("diameter", [50.0, 90.0, 140.0])
def test_diameter_from_a_sphere_speckle_contrast(diameter: float) -> None:
    """Closed form: the contrast of a sphere's speckle, plus a fluence-jitter constant, at whole-pixel lags."""
    from bayes_spi.analysis.sampling import diameter_from_contrast

    dq = np.arange(1, 17) / 345.0
    c = 0.7 * _sphere(dq, diameter) + 0.12
    assert diameter_from_contrast(dq, c, 5.0, 345.0) == pytest.approx(diameter, rel=0.02)
    with pytest.raises(ValueError, match="expected >= 3 finite lags"):
        diameter_from_contrast(dq[:2], c[:2], 5.0, 345.0)


def test_a_central_hole_that_hides_the_central_speckle_switches_to_the_speckle_contrast(tmp_path: Path) -> None:
    """A 4-pixel beam stop on reference-32 hides 2CEX's central speckle: the radial profile alone says ~28 A;
    the speckle contrast keeps the estimate in the range of the protein (largest distance ~65 A)."""
    from bayes_spi.analysis import sampling
    from bayes_spi.dataio.h5 import SPIDataset
    from bayes_spi.sim.simulate import simulate

    data = tmp_path / "d.h5"
    simulate("2CEX", "reference-32", 600, data, artifacts="FPB", mean_photons=1e3, truth_grid=0, seed=2,
             beamstop_radius=4.0, progress=False)
    with SPIDataset(data) as ds:
        rep = estimate_sampling(ds, n_patterns=600)
        with pytest.MonkeyPatch.context() as mp:  # the radial profile alone
            mp.setattr(sampling, "HIDDEN_CENTRE", np.inf)
            alone = estimate_sampling(ds, n_patterns=600)
    assert alone.diameter_A < 40.0, alone  # the failure this guards against
    assert 50.0 < rep.diameter_A < 95.0, rep


def test_undersampled_setups_are_reported() -> None:
    rep = sampling_report(240.0, field_of_view_A=345.0, q_max=0.125, q_edge=0.089, photons_per_pattern=1e4,
                          n_good_pixels=4096)
    assert rep.undersampled and rep.oversampling == pytest.approx(345 / 240)
    assert "WARNING" in rep.summary() and "oversampling" in rep.summary()
    ok = sampling_report(60.0, 345.0, 0.125, 0.089, 1e4, 4096)
    assert not ok.undersampled and "WARNING" not in ok.summary()
    # a larger particle needs a finer grid and a wider field bandwidth
    assert rep.grid_rotations >= ok.grid_rotations and rep.field_w0 > ok.field_w0
    assert cache_grid_for(0.054, 200.0) > cache_grid_for(0.054, 60.0)


def _min_angles(grid: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    tr = torch.einsum("aij,bij->ab", probes, grid)  # trace(P^T G)
    return torch.acos(((tr - 1) / 2).clamp(-1, 1)).min(-1).values


def test_super_fibonacci_grid_is_orthonormal_and_covers_so3_better_than_random() -> None:
    g = super_fibonacci_rotmat(2048, dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64).expand(2048, 3, 3)
    assert torch.allclose(g @ g.transpose(-1, -2), eye, atol=1e-10)
    assert torch.allclose(torch.linalg.det(g), torch.ones(2048, dtype=torch.float64), atol=1e-10)
    probes = random_rotmat(3000, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    rnd = random_rotmat(2048, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    worst_fib, worst_rnd = _min_angles(g, probes).max(), _min_angles(rnd, probes).max()
    spacing = (8 * math.pi**2 / 2048) ** (1 / 3)
    assert worst_fib < 0.85 * worst_rnd
    assert worst_fib < 0.95 * spacing  # no holes: the covering radius stays below the typical spacing


def _voxel_model(n: int = 9, n_pix: int = 8) -> SPIModel:
    torch.manual_seed(0)
    ax = (torch.arange(n_pix) - (n_pix - 1) / 2) * 0.012
    qx, qy = torch.meshgrid(ax, ax, indexing="xy")
    q = torch.stack([qx, qy, 0.5 * (qx**2 + qy**2)], -1).reshape(-1, 3)
    q_max = float(q.norm(dim=-1).max())
    field = VoxelField(q_max, n=n)
    field.grid.data.normal_(0.0, 1.0)
    return SPIModel(field, q, torch.full((q.shape[0],), 1e-3))


def test_grid_marginal_equals_the_brute_force_mixture_over_the_grid() -> None:
    """With a voxel field on the cache's own grid the interpolation is exact: log p(y) must equal
    log mean_g prod_k Poisson(y_k | s_g lambda_gk) with s_g the maximum-likelihood scale, computed here
    from the model's own log_rate."""
    model = _voxel_model()
    rots = super_fibonacci_rotmat(64)
    emc = GridMarginal(model, rots, cache_grid=9, chunk=16)
    pixels = torch.arange(64)
    images = torch.poisson(torch.full((3, 8, 8), 2.0))
    post = emc(images, pixels)
    y = images.reshape(3, -1).double()
    log_lam = model.log_rate(rots[:, None].expand(64, 3, 3, 3), torch.zeros(64, 3), pixels).double()  # (G, B, M)
    log_s = y.sum(-1).log() - torch.logsumexp(log_lam, -1)
    rate = (log_lam + log_s[..., None]).exp()
    ll = torch.distributions.Poisson(rate).log_prob(y).sum(-1)  # (G, B)
    expected = torch.logsumexp(ll, 0) - math.log(64)
    assert torch.allclose(post.log_marginal.detach().double(), expected, atol=2e-3 * float(expected.abs().max()))
    assert torch.allclose(post.weights.double(), torch.softmax(ll.T, -1), atol=1e-4)
    # tempering broadens the posterior
    hot = emc(images, pixels, beta=0.2)
    assert float(hot.effective_orientations.mean()) > float(post.effective_orientations.mean())


def test_grid_marginal_gradient_reaches_the_field() -> None:
    model = _voxel_model()
    emc = GridMarginal(model, super_fibonacci_rotmat(32), cache_grid=9)
    post = emc(torch.poisson(torch.full((2, 8, 8), 3.0)), torch.arange(64))
    post.log_marginal.sum().backward()
    g = model.field.grid.grad
    assert g is not None and torch.isfinite(g).all() and float(g.abs().sum()) > 0


def test_siren_field_starts_at_the_radial_profile_and_nearly_isotropic() -> None:
    torch.manual_seed(0)
    field = SirenField(0.1, w0=30.0)
    q = torch.linspace(0.0, 0.1, 20)
    prof = -40.0 * q  # log I falling by e^-4 over q_max
    field.set_radial_profile(q, prof + 3.0)
    dirs = torch.nn.functional.normalize(torch.randn(50, 3), dim=-1)
    for r in (0.02, 0.05, 0.09):
        vals = field.log_intensity(r * dirs).detach()
        assert float(vals.mean()) == pytest.approx(3.0 - 40.0 * r, abs=0.05)
        assert float(vals.std()) < 0.05  # anisotropy at initialisation: tiny


def test_encoder_inputs_stay_bounded_at_a_hundredth_of_a_photon_per_pixel() -> None:
    """The crash on Dragonfly data: per-pixel spreads from one sparse batch divided by ~0."""
    torch.manual_seed(1)
    mask = torch.ones(32, 32, dtype=torch.bool)
    enc = PatternEncoder(32, 32, features=8, channels=4)
    first = torch.poisson(torch.full((32, 32, 32), 0.01))
    enc(first, mask)  # sets the standardisation
    later = torch.poisson(torch.full((64, 32, 32), 0.01))
    from bayes_spi.guides.encoder import transform_counts

    x = (transform_counts(later, mask) - enc.pixel_mean) / enc.pixel_std
    assert float(x.abs().max()) < 100.0
    assert torch.isfinite(enc(later, mask)).all()


def test_speckle_correlation_ignores_shell_means_and_scale() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((15, 15, 15)) + 0.1
    a = a + a[::-1, ::-1, ::-1]
    r = np.sqrt(((np.indices(a.shape) - 7) ** 2).sum(0))
    radial = np.exp(-r)  # a steep shared fall-off
    assert speckle_correlation(a * radial, 3 * a * radial, 0.01, 0.07) == pytest.approx(1.0)
    b = rng.random((15, 15, 15)) + 0.1
    b = b + b[::-1, ::-1, ::-1]
    assert abs(speckle_correlation(a * radial, b * radial, 0.01, 0.07)) < 0.1


def test_compare_to_reference_aligns_a_rotated_reconstruction() -> None:
    from bayes_spi.analysis.align import rotate_volume
    from bayes_spi.sim.structure import load_structure
    from bayes_spi.sim.transform import intensity_on_grid

    I_ref, dq = intensity_on_grid(load_structure("2CEX"), 25, 0.08)
    R = random_rotmat(1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)[0].numpy()
    moved = rotate_volume(I_ref, R)
    res = compare_to_reference(moved, I_ref, dq, q_max=0.075, n_rotations=1500)
    assert res.speckle_corr > 0.9
    unrelated = compare_to_reference(np.ones_like(I_ref) + 0.01 * np.random.default_rng(0).random(I_ref.shape),
                                     I_ref, dq, q_max=0.075, n_rotations=300)
    assert unrelated.speckle_corr < 0.5


def test_elbo_checks_flag_a_spike_and_a_rising_elbo() -> None:
    rows = [{"images_seen": 100.0 * i, "elbo_per_image": -1000.0 + 0.01 * (i % 3), "radius": 1.0} for i in range(60)]
    calm = elbo_checks(rows)
    assert calm["elbo_spikes"] == 0 and abs(calm["elbo_rel_change"]) < 1e-4
    rows[40]["elbo_per_image"] = -1500.0  # a 50% drop: a collapse
    assert elbo_checks(rows)["elbo_spikes"] >= 1
    rising = [{"images_seen": 100.0 * i, "elbo_per_image": -1000.0 + 5.0 * i, "radius": 1.0} for i in range(60)]
    assert elbo_checks(rising)["elbo_rel_change"] > 0.005


def test_pose_change_allows_the_rotz_pi_twin() -> None:
    R = random_rotmat(20, generator=torch.Generator().manual_seed(0))
    flip = torch.diag(torch.tensor([-1.0, -1.0, 1.0]))
    assert pose_change_deg(R, R @ flip) == pytest.approx(0.0, abs=0.1)  # float32 acos near 1
    other = random_rotmat(20, generator=torch.Generator().manual_seed(1))
    assert pose_change_deg(R, other) > 45.0


def test_information_gain_separates_a_true_3d_model_from_its_radial_average() -> None:
    """Patterns drawn from the model itself at known poses: the model gains information over the radial
    average; a model whose field is made isotropic gains none."""
    from bayes_spi.guides.amortized import AmortizedGuide

    torch.manual_seed(2)
    model = _voxel_model(n=9, n_pix=16)
    model.field.grid.data.mul_(1.5)
    mask = torch.ones(16, 16, dtype=torch.bool)
    guide = AmortizedGuide(mask, n_heads=1, features=8, channels=4)
    R = random_rotmat(64, generator=torch.Generator().manual_seed(3))
    pixels = torch.arange(256)
    with torch.no_grad():
        rate = model.log_rate(R, torch.zeros(64), pixels).exp()
        rate = rate * 2000 / rate.sum(-1, keepdim=True)
    images = torch.poisson(rate).reshape(64, 16, 16)

    class Oracle:  # the guide's posterior with the true pose as its most probable hypothesis
        def posterior(self, images, pixels=None):
            post = guide.posterior(images, pixels)
            post.rotations = torch.cat([R[:, None], post.rotations[:, 1:]], 1)
            post.weights = torch.nn.functional.one_hot(torch.zeros(64, dtype=torch.long), post.weights.shape[1]).float()
            return post

    good = torch.ones(256, dtype=torch.bool)
    gain = information_gain(model, Oracle(), images, good)
    assert gain["gain_per_photon"] > 0.02, gain
    assert gain["information_q"] > 0 and len(gain["shell_gain_per_photon"]) == 8
    model.field.grid.data.zero_()  # isotropic: nothing beyond the radial average to gain
    flat = information_gain(model, Oracle(), images, good)
    assert flat["gain_per_photon"] < 0.01, flat
    assert flat["information_q"] < gain["information_q"]


def test_shell_gains_find_where_the_model_stops_predicting_the_data() -> None:
    """Speckled patterns drawn from a known rate: the true rate is informative in every shell (the limit is the
    last edge), the radial (flat) rate in none (limit 0) and with ~0 gain per photon; a model right only inside
    0.6 q_max stops there (its wrong outer shells lose photons: negative gain); an empty central shell (a beam
    stop) or an isotropic centre (the central speckle) is skipped, not a break; the per-photon gain of the true model matches the closed form
    E[x log x] = 1 - Euler's gamma for exponential speckle at low counts, within 25%."""
    g = torch.Generator().manual_seed(5)
    m = 4000
    qn = torch.rand(m, generator=g, dtype=torch.float64) * 0.1
    speckle = torch.distributions.Exponential(torch.tensor(1.0, dtype=torch.float64)).sample((m,))
    rate = 0.02 * speckle  # ~80 photons per pattern: the low-count regime
    y = torch.poisson(rate.expand(400, m), generator=g)
    flat = torch.full((m,), 0.02, dtype=torch.float64).log()
    true = shell_gains(y, rate.log().expand(400, m), flat, qn, 0.1)
    assert all(true["shell_informative"]) and true["information_q"] == pytest.approx(0.1)
    assert np.mean(true["shell_gain_per_photon"]) == pytest.approx(1 - np.euler_gamma, rel=0.25)
    none = shell_gains(y, flat.expand(400, m), flat, qn, 0.1)
    assert not any(none["shell_informative"]) and none["information_q"] == 0.0
    assert max(abs(v) for v in none["shell_gain_per_photon"]) < 1e-9
    other = torch.distributions.Exponential(torch.tensor(1.0, dtype=torch.float64)).sample((m,))
    part = torch.where(qn < 0.06, rate, 0.02 * other)
    half = shell_gains(y, part.log().expand(400, m), flat, qn, 0.1, n_shells=10)
    assert half["information_q"] == pytest.approx(0.06)
    assert all(v < 0 for v in half["shell_gain_per_photon"][6:])
    keep = qn >= 0.02  # nothing in the first two of ten shells
    stop = shell_gains(y[:, keep], rate[keep].log().expand(400, -1), flat[keep], qn[keep], 0.1, n_shells=10)
    assert stop["shell_informative"][:2] == [False, False] and stop["information_q"] == pytest.approx(0.1)
    iso = torch.where(qn < 0.02, torch.full_like(rate, 0.02), rate)  # an isotropic centre, speckle outside it
    y_iso = torch.poisson(iso.expand(400, m), generator=g)
    centre = shell_gains(y_iso, iso.log().expand(400, m), flat, qn, 0.1, n_shells=10)
    assert centre["shell_informative"][:2] == [False, False] and centre["information_q"] == pytest.approx(0.1)


def test_information_limit_note_only_inside_the_inscribed_circle() -> None:
    assert information_limit_note({"information_q": 0.08, "inscribed_q": 0.07}) is None
    assert information_limit_note({"information_q": None, "inscribed_q": 0.07}) is None
    note = information_limit_note({"information_q": 0.04, "inscribed_q": 0.08})
    assert "2.50 nm" in note and "50%" in note and "1.25 nm" in note and "--half-sets" in note


def test_pose_decisiveness_separates_determined_from_undetermined_poses() -> None:
    """Bright patterns of an anisotropic field have decisive refined poses; the same patterns against an
    isotropic field (every pose equally good) have none: the verdict's 'poses not determined' check."""
    from bayes_spi.guides.amortized import AmortizedGuide
    from bayes_spi.guides.search import OrientationSearch
    from bayes_spi.infer.verdict import MAX_AMBIGUOUS, pose_decisiveness

    torch.manual_seed(4)
    model = _voxel_model(n=9, n_pix=16)
    model.field.grid.data.mul_(2.0)
    mask = torch.ones(16, 16, dtype=torch.bool)
    search = OrientationSearch(model, n_rotations=2048, n_keep=2, cache_grid=17)
    guide = AmortizedGuide(mask, n_heads=1, n_search=2, features=8, channels=4, search=search)
    R = random_rotmat(48, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        rate = model.log_rate(R, torch.zeros(48), torch.arange(256)).exp()
        rate = rate * 2e4 / rate.sum(-1, keepdim=True)
    images = torch.poisson(rate).reshape(48, 16, 16)
    good = torch.ones(16, 16, dtype=torch.bool)
    sharp = pose_decisiveness(model, guide, images, good)
    assert sharp["probe_ambiguous_fraction"] < 0.2, sharp
    model.field.grid.data.zero_()
    search.refresh()
    flat = pose_decisiveness(model, guide, images, good)
    assert flat["probe_ambiguous_fraction"] > MAX_AMBIGUOUS, flat


def test_the_held_out_pose_does_not_fit_the_noise() -> None:
    """Patterns (400 photons) drawn from a field at random poses, scored against a *different* random field: a pose
    chosen on all pixels among 2,048 fits their noise, so the wrong field seems to beat a flat model (0.09
    nats/photon); with each half's pose chosen on the other half it gains little (under a quarter of the true
    field's gain). The true field keeps a clear gain either way."""
    from bayes_spi.guides.search import OrientationSearch
    from bayes_spi.infer.verdict import _held_out_pose_log_rate

    torch.manual_seed(6)
    model = _voxel_model(n=9, n_pix=16)
    model.field.grid.data.mul_(2.0)
    search = OrientationSearch(model, n_rotations=2048, n_keep=1, cache_grid=17)
    R = random_rotmat(200, generator=torch.Generator().manual_seed(7))
    pixels = torch.arange(256)
    with torch.no_grad():
        rate = model.log_rate(R, torch.zeros(200), pixels).exp()
        rate = rate * 400 / rate.sum(-1, keepdim=True)  # 400 photons a pattern
    y = torch.poisson(rate, generator=torch.Generator().manual_seed(8))
    qn = model.q.norm(dim=-1).double()
    flat = torch.zeros(256, dtype=torch.float64)  # the radial model of a flat detector: every pixel alike

    class Guide:
        pass

    guide = Guide()
    guide.search = search

    def gains() -> tuple[float, float]:
        search.refresh()
        with torch.no_grad():
            best = search.rotations[search.grid_loglik(y.reshape(200, 16, 16), pixels).argmax(-1)]
            all_pix = model.log_rate(best, torch.zeros(200), pixels).double()
            held = _held_out_pose_log_rate(model, guide, y.reshape(200, 16, 16), pixels, all_pix)
        total = [shell_gains(y, lam, flat, qn, float(qn.max()), n_shells=1)["shell_gain_per_photon"][0]
                 for lam in (all_pix, held)]
        return total[0], total[1]

    true_all, true_held = gains()
    assert true_held > 0.05 and true_all > 0.05, (true_all, true_held)
    with torch.no_grad():
        model.field.grid.data.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(9))  # a wrong field
    wrong_all, wrong_held = gains()
    assert wrong_all > wrong_held + 0.05, (wrong_all, wrong_held)
    assert wrong_held < 0.25 * true_held, (wrong_held, true_held)


@pytest.mark.parametrize(("photons", "expected"), [(1e4, 3), (1e3, 3), (900.0, 3), (300.0, 5), (100.0, 9), (1.0, 12)])
def test_dim_patterns_get_more_exact_emc_iterations(monkeypatch: pytest.MonkeyPatch, photons: float,
                                                     expected: int) -> None:
    """polish_iterations x sqrt(1000 / photons per pattern), rounded, between 1x and 4x; a given value wins."""
    from types import SimpleNamespace

    from bayes_spi.infer import autoset
    from bayes_spi.infer.config import FitConfig

    rep = SimpleNamespace(field_w0=20.0, diameter_A=60.0, q_max=0.06, grid_rotations=4096, field_of_view_A=172.0,
                          photons_per_pattern=photons, speckles_per_radius=3.6)
    monkeypatch.setattr(autoset, "estimate_sampling", lambda ds, n_patterns: rep)
    cfg, _ = autoset.data_settings(None, FitConfig(polish_iterations=3), given={})
    assert cfg.polish_iterations == expected and cfg.polish_beta == 1.0  # a small particle: not annealed
    kept, _ = autoset.data_settings(None, FitConfig(polish_iterations=3), given={"polish_iterations": 3})
    assert kept.polish_iterations == 3


@pytest.mark.parametrize(("speckles", "photons", "given", "beta", "iterations"), [
    (3.6, 1e3, {}, 1.0, 3),                            # 2CEX on 32/64: untempered
    (12.8, 1e3, {}, 0.0385, 4),                        # the 141 A 4-mer on 64x64: annealed, two grid iterations first
    (12.8, 1e4, {}, 0.0100, 4),                        # brighter patterns start colder
    (12.8, 1e2, {}, 0.0996, 9),                        # dimmer ones warmer, with more iterations
    (17.3, 1e3, {"polish_iterations": 3}, 0.0385, 3),  # a given number of iterations wins
    (17.3, 1e3, {"polish_beta": 1.0}, 1.0, 3),         # so does a given tempering
    (17.3, 1e7, {}, 2.33e-6, 4),                       # very bright patterns: tiny, never 0
])
def test_large_particles_get_annealed_exact_iterations(monkeypatch: pytest.MonkeyPatch, speckles: float,
                                                       photons: float, given: dict, beta: float,
                                                       iterations: int) -> None:
    """From ANNEAL_SPECKLES speckles across the radius: polish_beta = anneal_beta(photons per pattern) and at least
    polish_refined + 2 iterations (the schedule then anneals two grid iterations before the refined ones)."""
    from types import SimpleNamespace

    from bayes_spi.infer import autoset
    from bayes_spi.infer.config import FitConfig
    from bayes_spi.infer.polish import polish_beta_schedule

    rep = SimpleNamespace(field_w0=50.0, diameter_A=190.0, q_max=0.06, grid_rotations=16384, field_of_view_A=690.0,
                          photons_per_pattern=photons, speckles_per_radius=speckles)
    monkeypatch.setattr(autoset, "estimate_sampling", lambda ds, n_patterns: rep)
    cfg, _ = autoset.data_settings(None, FitConfig(), given=given)
    assert cfg.polish_beta == pytest.approx(beta, abs=6e-4, rel=0.1) and cfg.polish_iterations == iterations
    assert 0 < cfg.polish_beta <= 1
    if beta < 1 and iterations == 4:
        sched = polish_beta_schedule(cfg.polish_beta, cfg.polish_iterations, cfg.polish_refined)
        assert sched[0] == cfg.polish_beta and sched[2:] == [1.0, 1.0]
        assert sched[1] == pytest.approx(cfg.polish_beta ** 0.5)  # geometric: half way in log beta


def test_anneal_beta_is_dragonflys_automatic_start() -> None:
    """exp(-6.5 (N 1e-5)^0.15) (Dragonfly's iterate.c): falls with the photons, 1 without any."""
    from bayes_spi.infer.autoset import anneal_beta

    photons = np.array([1e2, 3e2, 1e3, 3e3, 1e4])
    beta = np.array([anneal_beta(n) for n in photons])
    np.testing.assert_allclose(beta, np.exp(-6.5 * (photons / 1e5) ** 0.15))
    assert np.all(np.diff(beta) < 0) and anneal_beta(0.0) == 1.0
    assert 0.0375 < anneal_beta(1e3) < 0.0395  # the Dragonfly TMV log's 0.038595 at ~1,000 photons a frame
    with pytest.raises(ValueError, match="photons_per_pattern"):
        anneal_beta(-1.0)


@pytest.mark.parametrize(("fov", "diameter", "expected"), [
    (172.0, 60.0, 2 * 11 + 1),   # oversampling 2.9: one voxel per pixel step, ceil(0.06 * 172) = 11
    (345.0, 54.0, 2 * 15 + 1),   # oversampling 6.4: 4.5 voxels per speckle, ceil(0.06 * 243) = 15
    (833.0, 110.0, 2 * 30 + 1),  # oversampling 7.6: ceil(0.06 * 495) = 30
    (5000.0, 2000.0, 129),       # capped
])
def test_voxel_grid_is_one_per_pixel_step_but_at_most_4_5_per_speckle(monkeypatch: pytest.MonkeyPatch, fov: float,
                                                                       diameter: float, expected: int) -> None:
    """The hybrid field's voxels: dq = max(1 / field of view, 1 / (4.5 D)); a given value wins."""
    from types import SimpleNamespace

    from bayes_spi.infer import autoset
    from bayes_spi.infer.config import FitConfig

    rep = SimpleNamespace(field_w0=20.0, diameter_A=diameter, q_max=0.06, grid_rotations=4096, field_of_view_A=fov,
                          photons_per_pattern=1e3, speckles_per_radius=diameter * 0.06)
    monkeypatch.setattr(autoset, "estimate_sampling", lambda ds, n_patterns: rep)
    cfg, _ = autoset.data_settings(None, FitConfig(), given={})
    assert cfg.field == "hybrid" and cfg.voxel_grid == expected
    kept, _ = autoset.data_settings(None, FitConfig(voxel_grid=89), given={"voxel_grid": 89})
    assert kept.voxel_grid == 89


@pytest.mark.parametrize(("q_max", "fov", "diameter"), [(0.122, 172.0, 48.0), (0.245, 345.0, 48.0), (0.06, 833.0, 110.0)])
def test_voxel_grid_goes_finer_only_where_the_merged_photons_fill_its_voxels(q_max: float, fov: float,
                                                                            diameter: float) -> None:
    """``voxel_grid_for``: the base grid without photons; with more photons never coarser, at most twice as fine
    (two voxels per pixel step, 9 per speckle) and capped; a finer grid than the base only where its reached voxels
    (the ball, pi / 6 of the cube) get MIN_VOXEL_PHOTONS on average."""
    from bayes_spi.infer.autoset import (FINE_VOXELS_PER_SPECKLE, MAX_VOXEL_GRID, MIN_VOXEL_PHOTONS, VOXELS_PER_SPECKLE,
                                         voxel_grid_for)

    base = min(2 * int(np.ceil(q_max * min(fov, VOXELS_PER_SPECKLE * diameter))) + 1, MAX_VOXEL_GRID)
    fine = min(2 * int(np.ceil(q_max * min(2 * fov, FINE_VOXELS_PER_SPECKLE * diameter))) + 1, MAX_VOXEL_GRID)
    assert voxel_grid_for(q_max, fov, diameter) == base
    grids = [voxel_grid_for(q_max, fov, diameter, p) for p in np.geomspace(1e5, 1e11, 25)]
    assert all(g % 2 == 1 and base <= g <= fine for g in grids)
    assert grids == sorted(grids) and grids[-1] == fine
    for p, g in zip(np.geomspace(1e5, 1e11, 25), grids):
        if g > base:  # this grid's voxels are filled, the next finer one's are not (or it is the finest)
            assert p / (np.pi / 6 * g**3) >= MIN_VOXEL_PHOTONS
            assert g == fine or p / (np.pi / 6 * (g + 2) ** 3) < MIN_VOXEL_PHOTONS
    with pytest.raises(ValueError, match="merged_photons"):
        voxel_grid_for(q_max, fov, diameter, -1.0)


def test_data_settings_size_the_voxel_grid_from_the_photons_the_exact_iterations_merge(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """8,000 patterns at 1e4 photons get a finer grid than at 1e2; ``polish_patterns`` bounds the patterns counted."""
    from types import SimpleNamespace

    from bayes_spi.infer import autoset
    from bayes_spi.infer.config import FitConfig

    def grid(photons: float, n: int, **cfg: object) -> int:
        rep = SimpleNamespace(field_w0=20.0, diameter_A=48.0, q_max=0.122, grid_rotations=4096, field_of_view_A=172.0,
                              photons_per_pattern=photons, speckles_per_radius=48.0 * 0.122)
        monkeypatch.setattr(autoset, "estimate_sampling", lambda ds, n_patterns: rep)
        return autoset.data_settings(SimpleNamespace(n_patterns=n), FitConfig(**cfg), given={})[0].voxel_grid

    assert grid(1e4, 8000) == autoset.voxel_grid_for(0.122, 172.0, 48.0, 8e7) > grid(1e2, 8000) == 43
    assert grid(1e4, 8000, polish_patterns=100) == autoset.voxel_grid_for(0.122, 172.0, 48.0, 1e6)


def test_a_search_on_fixed_pixels_reads_its_table_with_the_same_numbers() -> None:
    """``OrientationSearch.fixed_pixels`` (the export's pass) gives the per-batch interpolation's log-likelihoods
    and proposals, on exactly its pixels (another pixel set is interpolated as before); the table is dropped on
    leaving, on refresh, and the export's pixels are every good pixel up to the table's budget."""
    from bayes_spi.guides.search import OrientationSearch, search_pixels_for
    from bayes_spi.models.fields import SirenField
    from bayes_spi.models.spi import SPIModel

    gen = torch.Generator().manual_seed(0)
    q, w = torch.randn(200, 3, generator=gen) * 0.03, torch.rand(200, generator=gen) * 1e-3 + 1e-4
    search = OrientationSearch(SPIModel(SirenField(0.125, w0=8.0), q, w), n_rotations=256, n_keep=3, cache_grid=13)
    images = torch.poisson(torch.full((5, 200), 2.0), generator=gen).reshape(5, 10, 20)
    pixels, other = torch.arange(0, 200, 2), torch.arange(1, 200, 2)
    ll, log_s = search.grid_loglik(images, pixels, return_log_scale=True)
    ll_other = search.grid_loglik(images, other)
    with search.fixed_pixels(pixels) as chosen:
        assert search._table is not None and torch.equal(chosen, pixels)  # all of them: within the budget
        ll_t, log_s_t = search.grid_loglik(images, pixels, return_log_scale=True)
        torch.testing.assert_close(ll_t, ll, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(log_s_t, log_s, rtol=1e-5, atol=1e-5)
        assert torch.equal(search(images, pixels), search.rotations[ll.topk(3, dim=-1).indices])
        torch.testing.assert_close(search.grid_loglik(images, other), ll_other)
    assert search._table is None
    with search.fixed_pixels(pixels, budget=256 * 30) as chosen:  # over the budget: a subset, its own table
        assert chosen.shape == (30,) and torch.equal(search._table[0], chosen)
    good = torch.arange(1000)
    assert torch.equal(search_pixels_for(256, good, budget=256 * 1000), good)
    sub = search_pixels_for(256, good, budget=256 * 100)
    assert sub.shape == (100,) and bool((sub[1:] > sub[:-1]).all())
