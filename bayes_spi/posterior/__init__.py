"""Per-pattern posterior export (ArviZ netCDF) and its calibration on simulations.

- :mod:`~bayes_spi.posterior.mixture`: the posterior of one pattern (mixture on SO(3) x R+), draws, summaries.
- :mod:`~bayes_spi.posterior.refine`: Gauss-Newton refinement of the guide's hypotheses, Laplace spreads.
- :mod:`~bayes_spi.posterior.netcdf`: the streamed netCDF writer (``bayes-spi posterior``).
- :mod:`~bayes_spi.posterior.coverage`: coverage of the credible cones and intervals against a truth.
- :mod:`~bayes_spi.posterior.calibration`: per-run temperatures fitted on a simulation, stored as JSON.

Example::

    from bayes_spi.infer.load import load_trained
    from bayes_spi.dataio.h5 import SPIDataset
    from bayes_spi.posterior import ExportSettings, coverage_from_netcdf, write_posterior_netcdf

    with SPIDataset("data.h5") as ds:
        write_posterior_netcdf(load_trained("run1"), ds, "posterior.nc", ExportSettings(n_draws=200))
    print(coverage_from_netcdf("posterior.nc", "data.h5"))
"""

from bayes_spi.posterior.calibration import fit_temperatures, load_calibration, save_calibration
from bayes_spi.posterior.coverage import coverage_from_netcdf, format_coverage, pose_coverage, scale_coverage
from bayes_spi.posterior.mixture import LEVELS, MixturePosterior, PosteriorDraws, PosteriorSummary, draw, summarize
from bayes_spi.posterior.netcdf import ExportSettings, export_batches, write_posterior_netcdf
from bayes_spi.posterior.refine import refine_posterior

__all__ = [
    "LEVELS",
    "MixturePosterior",
    "PosteriorDraws",
    "PosteriorSummary",
    "draw",
    "summarize",
    "refine_posterior",
    "ExportSettings",
    "export_batches",
    "write_posterior_netcdf",
    "pose_coverage",
    "scale_coverage",
    "coverage_from_netcdf",
    "format_coverage",
    "fit_temperatures",
    "save_calibration",
    "load_calibration",
]
