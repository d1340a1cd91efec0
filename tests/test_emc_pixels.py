"""The EMC warm start's pixels: drawn in proportion to the data's mean counts (``emc_pixel_sampling="photons"``),
and its orientation posterior given the pixels it reads (``emc_subset_posterior``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyro
import pytest
import torch

from bayes_spi.dataio.h5 import SPIDataset
from bayes_spi.infer.config import FitConfig
from bayes_spi.infer.trainer import Trainer
from bayes_spi.models.spi import SPIBatch

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(batch_size=8, field_width=16, n_heads=1, pixels_per_pattern=64, n_search=0, encoder_channels=4,
            encoder_features=16, device="cpu", seed=2, emc_fraction=0.5, search_rotations=64, cache_grid=9,
            auto_settings=False)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bayes_spi.sim.simulate import simulate

    path = tmp_path_factory.mktemp("data") / "tiny.h5"
    simulate("2CEX", "reference-32", 64, path, truth_grid=9, chunk=64, progress=False, mean_photons=1e3, seed=3)
    return path


def _trainer(data_file: Path, tmp_path: Path, **settings) -> Trainer:
    pyro.clear_param_store()
    return Trainer(SPIDataset(data_file), FitConfig(**{**TINY, **settings}), tmp_path / "run", progress=False)


def test_pixel_weights_are_mean_counts_plus_a_floor(data_file: Path, tmp_path: Path) -> None:
    trainer = _trainer(data_file, tmp_path)
    w = trainer.pixel_photons()
    with SPIDataset(data_file) as d:
        counts = d.read(np.arange(d.n_patterns)).reshape(d.n_patterns, -1).astype(np.float64)
        good = d.mask.reshape(-1)
    mean = counts.mean(0)
    np.testing.assert_allclose(w.numpy()[good], mean[good] + 0.1 * mean[good].mean(), rtol=1e-9, atol=1e-9)
    assert np.all(w.numpy()[~good] == 0)


def test_first_draw_follows_the_weights(data_file: Path, tmp_path: Path) -> None:
    """Gumbel top-k: the first pixel drawn has probability exactly proportional to its weight (checked on
    weight quartiles over 4,000 draws of one pixel; standard error <= 0.008)."""
    trainer = _trainer(data_file, tmp_path)
    step = trainer.total_steps  # radius 1: every good pixel eligible
    eligible = torch.nonzero(trainer._good).squeeze(-1)
    w = trainer.pixel_photons()[eligible]
    order = torch.argsort(w)
    quartile = torch.empty_like(order)
    quartile[order] = torch.arange(order.numel()) * 4 // order.numel()
    expected = torch.stack([w[quartile == k].sum() for k in range(4)]) / w.sum()
    position = {int(p): i for i, p in enumerate(eligible)}
    hits = torch.zeros(4, dtype=torch.float64)
    n = 4000
    for _ in range(n):
        pixels, n_eligible = trainer.select_pixels(step, 1, by_photons=True)
        hits[quartile[position[int(pixels[0])]]] += 1
    assert n_eligible == eligible.numel()
    np.testing.assert_allclose((hits / n).numpy(), expected.numpy(), atol=0.03)
    assert float(expected[3]) > 2 * float(expected[0])  # the weights do differ (else the check is empty)


def test_photon_draws_hold_more_photons_and_respect_mask_and_radius(data_file: Path, tmp_path: Path) -> None:
    trainer = _trainer(data_file, tmp_path)
    w = trainer.pixel_photons()
    held = {True: [], False: []}
    for by_photons in (True, False):
        for _ in range(50):
            pixels, _ = trainer.select_pixels(0, 64, by_photons=by_photons)  # step 0: the curriculum's radius
            assert pixels.unique().numel() == pixels.numel() == 64
            assert bool(trainer._good[pixels].all())
            assert float(trainer._qnorm[pixels].max()) <= trainer.radius(0) * trainer._q_max + 1e-9
            held[by_photons].append(float(w[pixels].sum()))
    assert np.mean(held[True]) > 1.3 * np.mean(held[False])


def test_subset_posterior_is_the_posterior_of_the_pixels_read(data_file: Path, tmp_path: Path) -> None:
    """With ``emc_subset_posterior`` the warm start's posterior is ``softmax(ll of the pixels read)``; without it the
    subsample's log-likelihood is scaled up by ``n_eligible / M`` (sharper)."""
    for subset in (True, False):
        trainer = _trainer(data_file, tmp_path, emc_subset_posterior=subset)
        trainer.initialise_offset()
        pixels, n_eligible = trainer.select_pixels(trainer.total_steps, 64)
        idx = np.arange(8)
        batch = SPIBatch(torch.as_tensor(trainer.dataset.read(idx)), torch.as_tensor(idx), pixels, n_eligible)
        assert batch.pixel_weight > 2
        with torch.no_grad():
            ref = trainer.emc(batch.images, pixels, 1.0 if subset else batch.pixel_weight, 1.0)
        expected = float(ref.effective_orientations.mean())
        trainer.emc_step(batch)
        assert trainer.emc_terms["effective_poses"] == pytest.approx(expected, rel=1e-6)
