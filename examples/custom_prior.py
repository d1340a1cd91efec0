"""Fit bayes-spi from Python with your own prior and a different likelihood.

The model's priors and likelihood are objects passed to its constructor, so swapping one means writing
a small class and handing it over; the trainer stays the same. This script:

1. defines a custom fluence-scale prior, ``GammaScalePrior`` (``s ~ Gamma(k, k)``: mean 1, relative
   spread ``1/sqrt(k)``), from scratch: a ``ScalePrior`` whose ``forward(n)`` returns a Pyro
   distribution with batch shape ``(n,)``;
2. takes the built-in preferred-orientation pose prior and the Poisson + Gaussian read-out likelihood
   (``PoissonGaussianLikelihood``: counts ``round(max(Poisson + N(0, sigma^2), 0))``, the detector model
   of ``bayes-spi simulate --artifacts G``);
3. builds the model (``SPIModel``) and guide with them and fits with the standard ``Trainer``.

Usage::

    python examples/custom_prior.py                 # simulates a small 2CEX data set in a temp dir
    python examples/custom_prior.py data.h5 -o run --steps 200 --readout-sigma 0.3

Writing a pose prior instead: subclass ``PosePrior``; ``forward(n)`` returns a distribution over
rotation matrices with batch shape ``(n,)``, event shape ``(3, 3)`` and ``log_prob`` taken with respect
to the normalised Haar measure (the uniform prior has ``log_prob == 0``), as
``bayes_spi.distributions.PreferredOrientationSO3`` does.

Note: ``model.pt`` records the config's prior specs, not this custom object; reload such a model by
building it the same way and loading ``torch.load("run/model.pt", weights_only=True)["model"]`` into it.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch

from bayes_spi.dataio.h5 import SPIDataset
from bayes_spi.infer.build import build_model_and_guide
from bayes_spi.infer.config import FitConfig
from bayes_spi.infer.trainer import Trainer
from bayes_spi.models.likelihoods import PoissonGaussianLikelihood
from bayes_spi.models.priors import PreferredOrientationPrior, ScalePrior

__all__ = ["GammaScalePrior", "simulate_example_data", "main"]


class GammaScalePrior(ScalePrior):
    """Fluence scale ``s ~ Gamma(shape, rate=shape)``: mean 1, standard deviation ``1 / sqrt(shape)``.

    Example:
        >>> GammaScalePrior(10.0)(4).sample().shape
        torch.Size([4])
    """

    def __init__(self, shape: float = 10.0) -> None:
        super().__init__()
        if not shape > 0:
            raise ValueError(f"expected a positive Gamma shape, got {shape}")
        self.register_buffer("shape", torch.tensor(float(shape)))  # a buffer: moves with .to(device)

    def forward(self, n: int) -> dist.TorchDistribution:
        return dist.Gamma(self.shape, self.shape).expand([n])


def simulate_example_data(directory: Path, n_patterns: int = 512, readout_sigma: float = 0.3, seed: int = 0) -> Path:
    """A small data set: the packaged 2CEX protein on the 32x32 reference detector, with fluence jitter,
    Poisson noise, Gaussian read-out noise and a beam stop (artifacts ``FPGB``)."""
    from bayes_spi.sim.simulate import simulate

    path = Path(directory) / "2cex_reference32.h5"
    simulate("2CEX", "reference-32", n_patterns, path, artifacts="FPGB", readout_sigma=readout_sigma,
             fluence_jitter="lognormal:0.3", mean_photons=1e4, truth_grid=17, seed=seed, progress=False)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, fit, print a summary; returns ``{"model", "guide", "trainer", "run_dir", "metrics"}``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", nargs="?", help="bayes-spi HDF5 file (default: simulate a small one)")
    ap.add_argument("-o", "--out", default=None, help="run directory (default: a temp dir)")
    ap.add_argument("--steps", type=int, default=100, help="SVI steps")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--n-patterns", type=int, default=512, help="patterns to simulate when no data is given")
    ap.add_argument("--readout-sigma", type=float, default=0.3, help="read-out noise of the detector (photons)")
    ap.add_argument("--gamma-shape", type=float, default=11.0, help="shape k of the Gamma(k, k) scale prior")
    ap.add_argument("--kappa", type=float, default=0.5, help="preferred-orientation concentration (0 = uniform)")
    ap.add_argument("--field-width", type=int, default=64)
    ap.add_argument("--grid", type=int, default=33, help="odd size of the output intensity cube")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bayes_spi_example_")) if not (args.data and args.out) else None
    data = Path(args.data) if args.data else simulate_example_data(work, args.n_patterns, args.readout_sigma)
    run_dir = Path(args.out) if args.out else work / "run"

    dataset = SPIDataset(data)
    epochs = -(-args.steps * args.batch_size // dataset.n_patterns)  # enough passes for the requested steps
    config = FitConfig(batch_size=args.batch_size, epochs=max(epochs, 1), max_images=args.steps * args.batch_size,
                       field_width=args.field_width, device="cpu", log_every=max(1, min(20, args.steps)))

    # ---- the swapped pieces: plain objects handed to SPIModel's constructor
    pose_prior = PreferredOrientationPrior(axis=(0.0, 0.0, 1.0), concentration=args.kappa)
    scale_prior = GammaScalePrior(args.gamma_shape)
    likelihood = PoissonGaussianLikelihood(readout_sigma=args.readout_sigma)

    pyro.set_rng_seed(config.seed)
    model, guide = build_model_and_guide(dataset.geometry, config, pose_prior=pose_prior,
                                         scale_prior=scale_prior, likelihood=likelihood)
    trainer = Trainer(dataset, config, run_dir, progress=False, model=model, guide=guide)
    try:
        state = trainer.fit()
        outputs = trainer.save_outputs(grid=args.grid)
    finally:
        dataset.close()

    with open(trainer.metrics_path, newline="") as fh:
        metrics = list(csv.DictReader(fh))
    print(f"model: pose prior {model.pose_prior}, scale prior {type(model.scale_prior).__name__}"
          f"(shape={float(model.scale_prior.shape):g}), likelihood {model.likelihood.config()}")
    print(f"fitted {state.step} steps on {data} ({state.images_seen} images)")
    if metrics:
        print(f"final ELBO per image: {float(metrics[-1]['elbo_per_image']):.6g}")
    print("outputs: " + ", ".join(str(p) for p in outputs.values()))
    return {"model": model, "guide": guide, "trainer": trainer, "run_dir": run_dir, "metrics": metrics}


if __name__ == "__main__":
    main()
