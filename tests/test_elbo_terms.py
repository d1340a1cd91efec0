"""The logged ELBO terms come from the model and guide traces: they sum to the ELBO (TraceEnum_ELBO at the same
draws) and include the intensity prior and the amplitude KL; the pixels plate keeps the ELBO of the scaled sum."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from bayes_spi.dataio.h5 import SPIDataset
from bayes_spi.infer.config import FitConfig
from bayes_spi.infer.elbo_terms import site_terms
from bayes_spi.infer.trainer import METRIC_FIELDS, Trainer
from bayes_spi.models.spi import MAX_PLATE_NESTING, SPIBatch

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(batch_size=8, field_width=16, n_heads=1, pixels_per_pattern=64, n_search=0, encoder_channels=4,
            encoder_features=16, device="cpu", seed=2, emc_fraction=0.0)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bayes_spi.sim.simulate import simulate

    path = tmp_path_factory.mktemp("data") / "tiny.h5"
    simulate("2CEX", "reference-32", 16, path, truth_grid=9, chunk=16, progress=False, mean_photons=1e4, seed=3)
    return path


def _trainer_and_batch(data_file: Path, tmp_path: Path, **settings) -> tuple[Trainer, SPIBatch]:
    pyro.clear_param_store()
    trainer = Trainer(SPIDataset(data_file), FitConfig(**{**TINY, **settings}), tmp_path / "run", progress=False)
    trainer.initialise_offset()
    idx = np.arange(8)
    pixels, n_eligible = trainer.select_pixels(trainer.total_steps)  # radius 1: every good pixel eligible
    batch = SPIBatch(torch.as_tensor(trainer.dataset.read(idx)), torch.as_tensor(idx), pixels, n_eligible)
    return trainer, batch


def _elbo_at_the_logged_draw(trainer: Trainer, batch: SPIBatch) -> float:
    """``-TraceEnum_ELBO / n_total`` with the random stream ``elbo_terms`` uses (same draws)."""
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(trainer.config.seed + 7919 * trainer.state.step)
        return -trainer.elbo.loss(trainer.model, trainer.guide, batch, trainer.n_total) / trainer.n_total


def _sum_of_terms(row: dict[str, float]) -> float:
    kl = sum(row[k] for k in METRIC_FIELDS if k.startswith("kl_"))
    return row["loglik_per_image"] - kl + row["log_intensity_prior"]


@pytest.mark.parametrize("settings, term", [
    ({"intensity_prior": {"name": "wilson", "n_points": 256}}, "log_intensity_prior"),
    ({"field": "variational", "variational_grid": 9}, "kl_amplitude"),
])
def test_logged_terms_sum_to_the_elbo_and_include_the_global_terms(data_file, tmp_path, settings, term):
    trainer, batch = _trainer_and_batch(data_file, tmp_path, **settings)
    row = trainer.elbo_terms(batch)
    assert set(row) <= set(METRIC_FIELDS) and all(math.isfinite(v) for v in row.values())
    elbo = _elbo_at_the_logged_draw(trainer, batch)
    assert _sum_of_terms(row) == pytest.approx(elbo, rel=1e-5, abs=1e-3)
    # the global term is there and not negligible: a tenth of a nat per image or more at n_total = 16
    assert abs(row[term]) > 0.1
    assert row["kl_pose"] > 0 and row["kl_hypothesis"] >= -1e-6 and row["kl_other"] == 0.0
    # and it is the prior's own value: the factor (Wilson) or the kl_weight-scaled KL (amplitudes) over n_total
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(trainer.config.seed + 7919 * trainer.state.step)
        terms = site_terms(trainer.model, trainer.guide, batch, trainer.n_total, max_plate_nesting=MAX_PLATE_NESTING)
    site = "intensity_prior" if term == "log_intensity_prior" else "amplitude"
    sign = 1.0 if site == "intensity_prior" else -1.0
    assert row[term] == pytest.approx(sign * float(terms[site]) / trainer.n_total, rel=1e-6)


def test_the_pixels_plate_scales_the_likelihood_like_the_hand_sum():
    """Tiny model, fixed subsample: log p = sum_i (N/B) (n_pixels/M) sum_{k in subset} log Poisson(y_ik | rate)."""
    rate = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 1.5, 2.5, 3.5]])  # (B=2, P=4)
    y = torch.tensor([[0.0, 3.0, 2.0, 5.0], [1.0, 1.0, 4.0, 2.0]])
    pixels = torch.tensor([1, 3])

    def model(n_total: int, n_pixels: int) -> None:
        with pyro.plate("patterns", n_total, subsample=torch.arange(2), dim=-1):
            with pyro.plate("pixels", n_pixels, subsample=pixels, dim=-2):
                pyro.sample("counts", dist.Poisson(rate[:, pixels].T), obs=y[:, pixels].T)

    def guide(n_total: int, n_pixels: int) -> None:
        pass

    terms = site_terms(model, guide, 10, 4, max_plate_nesting=MAX_PLATE_NESTING)
    hand = sum(math.log(math.exp(-r) * r**k / math.factorial(int(k)))
               for row_r, row_y in zip(rate[:, pixels].tolist(), y[:, pixels].tolist()) for r, k in zip(row_r, row_y))
    assert float(terms["counts"]) == pytest.approx(hand * (10 / 2) * (4 / 2), rel=1e-6)
    loss = Trace_ELBO(max_plate_nesting=MAX_PLATE_NESTING).loss(model, guide, 10, 4)
    assert -loss == pytest.approx(float(terms["counts"]), rel=1e-6)
