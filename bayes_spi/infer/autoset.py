"""Fit settings derived from the data: the field's bandwidth and the orientation grid's density.

The defaults of :class:`~bayes_spi.infer.config.FitConfig` were tuned on one small protein; a particle
three times larger has speckles three times finer, needs a field of three times the bandwidth and an
orientation grid about three times finer along each axis. :func:`data_settings` estimates the particle
size from the data (:func:`bayes_spi.analysis.sampling.estimate_sampling`) and sets ``field_w0``,
``field_width``, ``search_rotations`` and ``cache_grid`` from it, scales the exact EMC iterations up for dim
patterns (``polish_iterations`` x ``sqrt(1000 / photons per pattern)``, rounded, at most 4x), anneals them for
particles with at least ``ANNEAL_SPECKLES`` speckles from the centre to the edge (``polish_beta`` from
:func:`anneal_beta`), and chooses the ``hybrid`` field (SIREN plus
a voxel residual, one voxel per detector pixel step but at most 4.5 per speckle, for the final exact EMC iterations), unless the user gave
them; it also reports the speckle oversampling and warns when the detector cannot resolve the speckles.

Example::

    config, report = data_settings(SPIDataset("data.h5"), FitConfig(), given={})
    print(report.summary())
"""

from __future__ import annotations

import dataclasses
import math
import logging
from typing import Any

from bayes_spi.analysis.sampling import SamplingReport, estimate_sampling
from bayes_spi.config.fields import FIELDS
from bayes_spi.infer.config import FitConfig

__all__ = ["ANNEAL_SPECKLES", "AUTO_FIELDS", "VOXELS_PER_SPECKLE", "anneal_beta", "data_settings"]

log = logging.getLogger("bayes_spi")

#: settings :func:`data_settings` may set (only those not given explicitly)
AUTO_FIELDS: tuple[str, ...] = ("field_w0", "field_width", "search_rotations", "cache_grid", "field", "voxel_grid",
                                 "polish_iterations", "polish_beta")

#: photons per pattern at and above which the exact EMC iterations keep their configured number
POLISH_REFERENCE_PHOTONS = 1000.0
#: at most this many times the configured exact EMC iterations for dim patterns
POLISH_MAX_FACTOR = 4

#: the merged voxel grid is at most this many voxels per speckle width ``1 / D`` (finer only splits the photons)
VOXELS_PER_SPECKLE = 4.5

#: at and above this many speckles from the centre to the detector edge the exact EMC iterations are annealed:
#: ``polish_beta = anneal_beta(photons per pattern)`` and at least two grid iterations before the refined ones
ANNEAL_SPECKLES = 10.0


def anneal_beta(photons_per_pattern: float) -> float:
    """The annealed exact iterations' first tempering: Dragonfly's automatic start per frame,
    ``exp(-6.5 (N / 1e5)^0.15)`` for ``N`` photons (its ``iterate.c``): 0.100 at 1e2 photons, 0.038 at 1e3, 0.010
    at 1e4. Dimmer patterns have flatter likelihoods and need less tempering: on the 141 A 4-mer (64x64) at 1e2
    photons a fixed 0.04 spread every pattern over nearly the whole grid and lost the structure (0.286 in speckle
    correlation after 9 iterations, 0.300 untempered), this start reached 0.362; at 1e3 and 1e4 it is within
    noise of the fixed 0.04 it replaced (BENCHMARKS.md, ninth session).

    Example:
        >>> round(anneal_beta(1e3), 4), round(anneal_beta(1e2), 4), anneal_beta(0.0)
        (0.0385, 0.0996, 1.0)
    """
    if photons_per_pattern < 0:
        raise ValueError(f"expected photons_per_pattern >= 0, got {photons_per_pattern}")
    return math.exp(-6.5 * (photons_per_pattern * 1e-5) ** 0.15)


#: above this many speckles across the measured ball's radius the field gets twice the width
WIDE_FIELD_SPECKLES = 8.0


def data_settings(dataset: Any, config: FitConfig, given: dict[str, Any] | None = None,
                  n_patterns: int = 2000) -> tuple[FitConfig, SamplingReport]:
    """``(config with the data-derived settings, the sampling report)``.

    Args:
        dataset: an :class:`~bayes_spi.dataio.h5.SPIDataset` (or subset); its first ``n_patterns`` are read.
        config: the settings so far.
        given: settings the user gave explicitly (never replaced).
    """
    report = estimate_sampling(dataset, n_patterns=n_patterns)
    if not config.auto_settings:
        return config, report
    given = given or {}
    updates: dict[str, Any] = {}
    kind = FIELDS[config.field]
    if "field_w0" not in given and kind.neural:
        updates["field_w0"] = round(report.field_w0, 1)
    if ("field_width" not in given and kind.neural
            and report.diameter_A * report.q_max >= WIDE_FIELD_SPECKLES):
        # capacity: a 64-wide SIREN plateaued at a speckle correlation of 0.88 (outer shells 0.66) on a 195 A
        # particle, 128 wide reached 0.905 (0.80) in the same images (BENCHMARKS.md)
        updates["field_width"] = max(config.field_width, 128)
    if "search_rotations" not in given and config.n_search > 0:
        # with a point group the grid covers the pose fundamental zone only, with the same number of rotations:
        # the same E-step cost and a |G|^(1/3) times finer spacing (the exact merge of an icosahedral particle
        # went from 0.77 to 0.93 in speckle correlation with it, BENCHMARKS.md)
        updates["search_rotations"] = int(report.grid_rotations)
    if "cache_grid" not in given:
        from bayes_spi.infer.emc import cache_grid_for

        updates["cache_grid"] = cache_grid_for(report.q_max, report.diameter_A)
    if "field" not in given and config.field == "siren":
        # SIREN plus a voxel residual: the stochastic stages train it like the SIREN; the final exact EMC
        # iterations (polish_iterations) merge all patterns into its voxels (BENCHMARKS.md: 0.92 -> 0.97)
        updates["field"] = "hybrid"
    if "voxel_grid" not in given and "voxel_grid" in FIELDS[updates.get("field", config.field)].settings:
        # one voxel per detector pixel step (dq = 1 / field of view), as EMC merges: a coarser grid blurs the
        # steep low-q fall-off in the M-step (2.2 pixels per voxel lost 0.02 in speckle correlation); but no finer
        # than VOXELS_PER_SPECKLE voxels across a speckle (1 / D) when the detector oversamples more: finer
        # voxels only split the photons (2CEX on 64x64 at 1e3 photons, oversampling ~6: 89^3 voxels 0.77 in
        # speckle correlation, 71^3 0.85, 65^3 0.86, 57^3 0.88; the 195 A TMV set at oversampling 4.75: 93^3
        # 0.970, 85^3 0.968, 77^3 0.964; BENCHMARKS.md)
        length = min(report.field_of_view_A, VOXELS_PER_SPECKLE * report.diameter_A)
        updates["voxel_grid"] = min(2 * int(math.ceil(report.q_max * length)) + 1, 129)
    if "polish_iterations" not in given and config.polish_iterations > 0 and report.photons_per_pattern > 0:
        # dim patterns carry less orientation information each: EMC needs more iterations to converge (2CEX at
        # 1e2 photons: 3 iterations reached a speckle correlation of 0.49, 10 reached 0.63; at 1e3 the log
        # marginal gains < 1e-3 nats/photon by the third, BENCHMARKS.md); iterations are cheap on sparse data
        factor = math.sqrt(POLISH_REFERENCE_PHOTONS / report.photons_per_pattern)
        n = int(round(config.polish_iterations * min(max(factor, 1.0), POLISH_MAX_FACTOR)))  # ~1e3 photons: unchanged
        if n != config.polish_iterations:
            updates["polish_iterations"] = n
    n_polish = updates.get("polish_iterations", config.polish_iterations)
    if ("polish_beta" not in given and config.polish_beta == 1.0 and n_polish > 0
            and report.speckles_per_radius >= ANNEAL_SPECKLES):
        # a large particle's poses are decided by fine speckles: untempered exact iterations lock in the blurred
        # field's imprecise poses (269 A on 128x128 at 1e3 photons: the refined merge's poses 4.0 -> 2.5 deg
        # median, Rz(pi) twins 9% -> 2%, speckle correlation 0.21 -> 0.31; 141 A on 64x64: 0.747 -> 0.756 at 1e3,
        # 0.300 -> 0.362 at 1e2 with anneal_beta's warmer start, neutral at 1e4; on 2CEX, 4-5 speckles, annealing
        # lost 0.012-0.015; BENCHMARKS.md, eighth and ninth sessions)
        updates["polish_beta"] = float(f"{anneal_beta(report.photons_per_pattern):.3g}")  # never rounded to 0
        if "polish_iterations" not in given and n_polish < config.polish_refined + 2:
            updates["polish_iterations"] = config.polish_refined + 2
    if updates:
        log.info("settings from the data: %s", ", ".join(f"{k}={v}" for k, v in updates.items()))
    return dataclasses.replace(config, **updates), report
