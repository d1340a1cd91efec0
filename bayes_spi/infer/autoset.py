"""Fit settings derived from the data: the field's bandwidth and the orientation grid's density.

The defaults of :class:`~bayes_spi.infer.config.FitConfig` were tuned on one small protein; a particle
three times larger has speckles three times finer, needs a field of three times the bandwidth and an
orientation grid about three times finer along each axis. :func:`data_settings` estimates the particle
size from the data (:func:`bayes_spi.analysis.sampling.estimate_sampling`) and sets ``field_w0``,
``field_width``, ``search_rotations`` and ``cache_grid`` from it, scales the exact EMC iterations up for dim
patterns (``polish_iterations`` x ``sqrt(1000 / photons per pattern)``, rounded, at most 4x), anneals them for
particles with at least ``ANNEAL_SPECKLES`` speckles from the centre to the edge (``polish_beta`` from
:func:`anneal_beta`), and chooses the ``hybrid`` field (SIREN plus
a voxel residual for the final exact EMC iterations: one voxel per detector pixel step but at most 4.5 per speckle,
up to twice as fine where the data's photons fill the voxels, :func:`voxel_grid_for`), unless the user gave
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

__all__ = ["ANNEAL_SPECKLES", "AUTO_FIELDS", "FINE_VOXELS_PER_SPECKLE", "MAX_VOXEL_GRID", "MIN_VOXEL_PHOTONS",
           "VOXELS_PER_SPECKLE", "anneal_beta", "data_settings", "voxel_grid_for"]

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

#: with photons to spare the merged grid goes finer, up to this many voxels per speckle width (and two per pixel step)
FINE_VOXELS_PER_SPECKLE = 9.0

#: ... as long as a reached voxel still receives this many merged photons on average (BENCHMARKS.md, fourteenth
#: session; 2CEX, 8,000 patterns at 1e4 photons: on 32x32 45^3 -> 89^3 voxels, ~200 photons a voxel, median pose
#: error 1.9 -> 1.0 deg, speckle correlation 0.957 -> 0.977; on 64x64 63^3 -> 91^3, ~200 a voxel, 1.6 -> 1.3 deg,
#: 0.965 -> 0.962, but 113^3, ~105 a voxel, 1.4 deg and 0.944; at 1e3 photons on 32x32 89^3, ~20 a voxel, lost
#: 2.6 -> 3.5 deg and 0.927 -> 0.857)
MIN_VOXEL_PHOTONS = 200.0

#: the largest voxel grid :func:`voxel_grid_for` chooses
MAX_VOXEL_GRID = 129

#: at and above this many speckles from the centre to the detector edge the exact EMC iterations are annealed:
#: ``polish_beta = anneal_beta(photons per pattern)`` and at least two grid iterations before the refined ones
ANNEAL_SPECKLES = 10.0


def voxel_grid_for(q_max: float, field_of_view_A: float, diameter_A: float, merged_photons: float = 0.0) -> int:
    """Voxels per side of the hybrid field's merged grid over ``[-q_max, q_max]^3`` (odd, at most
    :data:`MAX_VOXEL_GRID`).

    The base grid has one voxel per detector pixel step (``dq = 1 / field of view``), as EMC merges, but no finer than
    :data:`VOXELS_PER_SPECKLE` voxels across a speckle (``1 / D``): with few photons finer voxels only split them
    (2CEX on 64x64 at 1e3 photons: 89^3 voxels 0.77 in speckle correlation, 57^3 0.88). With many photons the
    trilinear grid's own blur dominates instead: merged at the *true* poses, 2CEX at 1e4 photons on 32x32 loses
    178 nats a pattern of held-out likelihood to the exact intensity on 45^3 voxels (poses 0.95 deg off), 27 on
    89^3 (0.60 deg). So the grid goes up to twice as fine (:data:`FINE_VOXELS_PER_SPECKLE`, two voxels per pixel
    step), the finest whose reached voxels (the ball ``|q| <= q_max``: ``pi / 6`` of the cube) still receive
    :data:`MIN_VOXEL_PHOTONS` of the ``merged_photons`` on average.

    Args:
        q_max: the detector's largest ``|q|`` (1/A); field_of_view_A, diameter_A: from the sampling report (A).
        merged_photons: photons the exact iterations merge (patterns x photons per pattern; 0: the base grid).

    Example:
        >>> voxel_grid_for(0.122, 172.0, 48.0)           # the base grid: one voxel per pixel step
        43
        >>> voxel_grid_for(0.122, 172.0, 48.0, 8000 * 1e4)   # 8,000 patterns at 1e4 photons: twice as fine
        85
        >>> voxel_grid_for(0.122, 172.0, 48.0, 8000 * 1e3)   # at 1e3 photons the base grid
        43
        >>> voxel_grid_for(0.1255, 345.0, 54.4, 8000 * 1e4)  # 64x64 at 1e4 photons: ~200 photons a voxel
        91
    """
    if q_max <= 0 or field_of_view_A <= 0 or diameter_A <= 0 or merged_photons < 0:
        raise ValueError(f"expected positive q_max, field of view and diameter and merged_photons >= 0, got {q_max}, "
                         f"{field_of_view_A}, {diameter_A} and {merged_photons}")
    base = min(2 * int(math.ceil(q_max * min(field_of_view_A, VOXELS_PER_SPECKLE * diameter_A))) + 1, MAX_VOXEL_GRID)
    fine = min(2 * int(math.ceil(q_max * min(2.0 * field_of_view_A, FINE_VOXELS_PER_SPECKLE * diameter_A))) + 1,
               MAX_VOXEL_GRID)
    for n in range(fine, base, -2):
        if merged_photons / (math.pi / 6.0 * n ** 3) >= MIN_VOXEL_PHOTONS:
            return n
    return base


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
        # the photons the exact iterations merge: the patterns there are now (a followed file's first ones), at
        # most polish_patterns
        merged = int(getattr(dataset, "n_patterns", 0) or 0)
        if config.polish_patterns:
            merged = min(merged, int(config.polish_patterns))
        updates["voxel_grid"] = voxel_grid_for(report.q_max, report.field_of_view_A, report.diameter_A,
                                               report.photons_per_pattern * merged)
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
