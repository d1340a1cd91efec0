"""The verdict of a half-set run: each half's verdict, and whether the two independent fits agree.

The single-fit verdict (:mod:`bayes_spi.infer.verdict`) cannot see a fit that converged to a wrong but
self-consistent solution: a nearly symmetric particle fitted in another symmetry-related frame, or a
twin-mixed field, predicts held-out patterns and is stable. Two fits on disjoint halves of the data do not
share their starting point, their mini-batches or their noise, so they land in the same wrong solution only
by chance. ``bayes-spi fit --half-sets`` therefore writes ``RUN/verdict.json`` with:

- each half's own status (the worse of the two counts);
- **agreement**: the *speckle* FSC of the two aligned intensities (shell means removed, so the radial
  profile that every fit reproduces, right or wrong, does not count) averaged over the inner shells
  ``|q| <= q_max / 2`` (the shells where the data hold several photons per speckle at the photon counts
  this tool is built for). Below :data:`MIN_INNER_SPECKLE_FSC` the two halves describe different
  structures and the run is ``failed``: at least one half (and so the full data's fit, made the same way)
  converged to a wrong solution.

Example::

    v = assess_halfsets([half1_verdict, half2_verdict], speckle_curve)
    print(v.summary())
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bayes_spi.config.commands import flag
from bayes_spi.infer.verdict import STATUSES, Verdict

__all__ = ["MIN_INNER_SPECKLE_FSC", "INNER_FRACTION", "inner_speckle_fsc", "assess_halfsets"]

#: the mean speckle FSC of the two halves over the inner shells must reach this (measured, 4,000 patterns a
#: half at ~1e3 photons: 0.99 for 2CEX at 32x32, whose halves are right; 0.56 for the near-octahedral 156 A
#: 6-mer at 64x64, whose halves are both wrong, speckle correlation 0.05 with the truth; BENCHMARKS.md)
MIN_INNER_SPECKLE_FSC = 0.7
#: the inner shells: ``|q| <= INNER_FRACTION * q_max``
INNER_FRACTION = 0.5


def inner_speckle_fsc(curve: Any, q_max: float, fraction: float = INNER_FRACTION) -> float:
    """Voxel-weighted mean of a speckle FSC curve over its shells with ``0 < |q| <= fraction * q_max``.

    Args:
        curve: an :class:`~bayes_spi.analysis.fsc.FSCCurve` (``q``, ``fsc``, ``n_voxels``, each ``(S,)``).
        q_max: the detector's ``q_max`` in 1/A.
        fraction: the inner fraction of ``q_max``.

    Returns:
        The mean (NaN when no shell qualifies).

    Example:
        >>> from bayes_spi.analysis.fsc import FSCCurve
        >>> c = FSCCurve(q=[0.0, 0.1, 0.2, 0.3], fsc=[1.0, 0.8, 0.4, 0.0], n_voxels=[1, 10, 30, 60])
        >>> round(inner_speckle_fsc(c, q_max=0.4), 3)
        0.5
    """
    if not (np.isfinite(q_max) and q_max > 0 and 0 < fraction <= 1):
        raise ValueError(f"expected q_max > 0 and 0 < fraction <= 1, got q_max={q_max}, fraction={fraction}")
    q = np.asarray(curve.q, dtype=np.float64)
    fsc = np.asarray(curve.fsc, dtype=np.float64)
    w = np.asarray(curve.n_voxels, dtype=np.float64)
    keep = (q > 0) & (q <= fraction * q_max + 1e-12) & np.isfinite(fsc) & (w > 0)
    if not keep.any():
        return float("nan")
    return float(np.sum(fsc[keep] * w[keep]) / np.sum(w[keep]))


def assess_halfsets(halves: list[dict[str, Any] | None], speckle: Any, q_max: float) -> Verdict:
    """Combine the two halves' verdicts with their agreement.

    Args:
        halves: each half's verdict as a dict (``verdict.json``: ``status``, ``reasons``, ``checks``);
            ``None`` for a half without one.
        speckle: the half-set speckle FSC curve (:func:`bayes_spi.infer.halfsets.halfset_fsc`).
        q_max: the detector's ``q_max`` in 1/A.

    Returns:
        A :class:`~bayes_spi.infer.verdict.Verdict` with checks ``halves`` (the two statuses),
        ``inner_speckle_fsc`` and ``min_inner_speckle_fsc``.
    """
    if len(halves) != 2:
        raise ValueError(f"expected the verdicts of 2 halves, got {len(halves)}")
    statuses = [(h or {}).get("status", "unconverged") for h in halves]
    for s in statuses:
        if s not in STATUSES:
            raise ValueError(f"expected a status in {STATUSES}, got {s!r}")
    reasons: list[str] = []
    for name, h, s in zip(("half1", "half2"), halves, statuses):
        if h is None:
            reasons.append(f"{name}: no verdict (the fit did not finish)")
        elif s != "converged":
            reasons += [f"{name}: {r}" for r in h.get("reasons", [])] or [f"{name}: {s}"]
    agree = inner_speckle_fsc(speckle, q_max) if speckle is not None else float("nan")
    status = max(statuses, key=STATUSES.index)
    if not np.isfinite(agree) or agree < MIN_INNER_SPECKLE_FSC:
        status = "failed"
        reasons.append(
            f"the two half-set fits disagree: speckle FSC over |q| <= {INNER_FRACTION:g} q_max is {agree:.3f} "
            f"(< {MIN_INNER_SPECKLE_FSC}); independent fits of the same particle reproduce each other's speckles, "
            f"so at least one converged to a wrong solution (e.g. a near-symmetric frame); try more patterns, "
            f"{flag('symmetry')} if the particle has one, or a finer orientation grid")
    checks = {"halves": statuses, "inner_speckle_fsc": agree, "min_inner_speckle_fsc": MIN_INNER_SPECKLE_FSC,
              "inner_fraction": INNER_FRACTION}
    for key in ("gain_per_photon", "probe_ambiguous_fraction", "effective_hypotheses"):
        vals = [((h or {}).get("checks") or {}).get(key) for h in halves]
        if all(isinstance(v, (int, float)) for v in vals):
            checks[key] = float(np.mean(vals))
    return Verdict(status=status, reasons=reasons, checks=checks)
