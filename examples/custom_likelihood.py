"""Fit bayes-spi from Python with a likelihood you write yourself.

A likelihood is an object with ``__call__(log_rate) -> distribution``, elementwise: the model hands it the
log expected counts ``(..., M, B)`` (``M`` pixels in the ``pixels`` plate, ``B`` patterns) and observes the
counts under the returned distribution, whose batch shape must be that of ``log_rate``. This script writes an
over-dispersed one, ``NegativeBinomialLikelihood``: ``y ~ GammaPoisson`` with mean ``lambda`` and
variance ``lambda + lambda^2 / r`` (extra shot-to-shot fluctuations, e.g. of the background, on top of
photon counting; ``r -> inf`` is Poisson). It then fits with the standard ``Trainer``; compare the ELBO
with the built-ins ``PoissonLikelihood`` and ``PoissonGaussianLikelihood``
(``bayes-spi fit --likelihood poisson-gaussian:sigma=0.3``).

Usage::

    python examples/custom_likelihood.py                 # simulates a small 2CEX data set in a temp dir
    python examples/custom_likelihood.py data.h5 -o run --steps 200 --dispersion 50
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
from torch import Tensor

from bayes_spi.dataio.h5 import SPIDataset
from bayes_spi.infer.build import build_model_and_guide
from bayes_spi.infer.config import FitConfig
from bayes_spi.infer.trainer import Trainer
from bayes_spi.models.likelihoods import Likelihood

__all__ = ["NegativeBinomialLikelihood", "main"]


class NegativeBinomialLikelihood(Likelihood):
    """``y ~ GammaPoisson(r, r / lambda)``: mean ``lambda = exp(log_rate)``, variance ``lambda + lambda^2 / r``.

    Example:
        >>> import torch
        >>> NegativeBinomialLikelihood(50.0)(torch.zeros(2, 3)).log_prob(torch.ones(2, 3)).shape
        torch.Size([2, 3])
    """

    name = "negative-binomial"

    def __init__(self, dispersion: float = 50.0) -> None:
        if not dispersion > 0:
            raise ValueError(f"expected a positive dispersion r, got {dispersion}")
        self.dispersion = float(dispersion)

    def __call__(self, log_rate: Tensor) -> dist.TorchDistribution:
        rate = log_rate.clamp(max=30.0).exp().clamp(min=1e-30)
        r = self.dispersion
        return dist.GammaPoisson(rate.new_tensor(r).expand(rate.shape), r / rate)

    def config(self) -> dict:
        return {"name": self.name, "dispersion": self.dispersion}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, fit, print a summary; returns ``{"model", "guide", "trainer", "run_dir", "metrics"}``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", nargs="?", help="bayes-spi HDF5 file (default: simulate a small one)")
    ap.add_argument("-o", "--out", default=None, help="run directory (default: a temp dir)")
    ap.add_argument("--steps", type=int, default=100, help="SVI steps")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--n-patterns", type=int, default=512, help="patterns to simulate when no data is given")
    ap.add_argument("--dispersion", type=float, default=50.0, help="r of the negative binomial (inf: Poisson)")
    ap.add_argument("--field-width", type=int, default=64)
    ap.add_argument("--grid", type=int, default=33, help="odd size of the output intensity cube")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bayes_spi_example_")) if not (args.data and args.out) else None
    if args.data:
        data = Path(args.data)
    else:
        from bayes_spi.sim.simulate import simulate

        data = work / "2cex_reference32.h5"
        simulate("2CEX", "reference-32", args.n_patterns, data, artifacts="FPB", mean_photons=1e4, truth_grid=17,
                 progress=False)
    run_dir = Path(args.out) if args.out else work / "run"

    dataset = SPIDataset(data)
    epochs = -(-args.steps * args.batch_size // dataset.n_patterns)  # enough passes for the requested steps
    config = FitConfig(batch_size=args.batch_size, epochs=max(epochs, 1), max_images=args.steps * args.batch_size,
                       field_width=args.field_width, device="cpu", log_every=max(1, min(20, args.steps)))

    likelihood = NegativeBinomialLikelihood(args.dispersion)  # handed to SPIModel's constructor
    pyro.set_rng_seed(config.seed)
    model, guide = build_model_and_guide(dataset.geometry, config, likelihood=likelihood)
    trainer = Trainer(dataset, config, run_dir, progress=False, model=model, guide=guide)
    try:
        state = trainer.fit()
        outputs = trainer.save_outputs(grid=args.grid)
    finally:
        dataset.close()

    with open(trainer.metrics_path, newline="") as fh:
        metrics = list(csv.DictReader(fh))
    print(f"likelihood {model.likelihood.config()}; fitted {state.step} steps on {data} ({state.images_seen} images)")
    if metrics:
        print(f"final ELBO per image: {float(metrics[-1]['elbo_per_image']):.6g}")
    print("outputs: " + ", ".join(str(p) for p in outputs.values()))
    return {"model": model, "guide": guide, "trainer": trainer, "run_dir": run_dir, "metrics": metrics}


if __name__ == "__main__":
    main()
