r"""Temperatures that make a run's credible regions nominal, fitted on a simulation with truth, stored as JSON.

The refined posterior (:mod:`bayes_spi.posterior.refine`) is conditional on the trained intensity field. Its
remaining errors move the true pose (and scale) further from the posterior mean than the Laplace spreads
say, by a factor that depends on how well the field converged (foundation benchmark: 1.2 for the pose;
the 10-minute demo fit: 1.75), and within a run the same factor makes the 50% and the 90% regions nominal.
So each run gets two temperatures, multiplying the tangent-space and the log-scale spreads:

- pose: cone radii scale with the temperature (for unimodal, small-spread posteriors), so the temperature
  that makes level ``p`` nominal is ``T_used * quantile_p(error_i / r_i(p))``; we store the mean over levels.
  A temperature widens a cone; it cannot move it to another mode. A pattern whose mean pose is more than
  :data:`FAR_MODE_DEG` from the truth (an Rz(pi) twin, a wrong grid mode) and outside the level's region is
  lost at any sane temperature. Counted as misses, a fraction ``f`` of them needs level ``p / (1 - f)`` of the
  others (the same temperature as the plain quantile); where ``f`` puts ``p`` out of reach, that level is
  capped at ``(1 + p) / 2`` (without the cap a 12% twin fraction gave T = 175 and 60-degree cones that still
  missed the twins). ``far_mode_fraction`` is reported; the hypothesis weights carry the mode uncertainty.
- scale: with ``z_i = |log s_true_i - c - m_i| / t_i`` (``c``: the global offset of
  :mod:`bayes_spi.posterior.coverage`), ``T_used * quantile_p(z) / Phi^-1((1 + p) / 2)``, averaged likewise.

Workflow: export a slice of a simulation that matches the real data with ``bayes-spi posterior ... --truth
--calibrate`` (writes ``calibration.json`` beside the output), then export with ``--calibration FILE``.

Example::

    cal = fit_temperatures("cal.nc", "sim.h5")
    save_calibration("calibration.json", cal)
    pose_t, scale_t = load_calibration("calibration.json")
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from scipy import stats

from bayes_spi.atomic import write_json
from bayes_spi.metrics import align_rotations
from bayes_spi.posterior.coverage import angles_rad, log_scale_offset, read_summaries

__all__ = ["FAR_MODE_DEG", "fit_temperatures", "save_calibration", "load_calibration"]

#: a mean pose further than this from the truth sits in another mode: it does not set the pose temperatures
FAR_MODE_DEG = 45.0


def fit_temperatures(path: str | os.PathLike[str], truth_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Pose and scale temperatures that make an exported posterior's regions nominal against the truth.

    Returns:
        ``pose_temperature``, ``scale_temperature`` (means over the levels), the per-level values
        ``pose_temperature_for_50`` etc., ``far_mode_fraction`` (mean poses more than :data:`FAR_MODE_DEG` from
        the truth; see the module docstring for how they count), ``n_patterns``,
        ``calibrated_on`` (the data file), ``posterior``.

    Raises:
        FileNotFoundError, ValueError: as :func:`bayes_spi.posterior.coverage.read_summaries`.
    """
    path = os.fspath(path)
    d = read_summaries(path, truth_path)
    pat, levels, M, radius = d["pattern"], d["levels"], d["mean_rotation"], d["cone_radius"]
    m, t, R_true, s_true = d["log_scale_mean"], d["log_scale_sd"], d["R_true"], d["s_true"]
    pose_used = float(d["attrs"].get("pose_temperature", 1.0))
    scale_used = float(d["attrs"].get("scale_temperature", 1.0))
    G, _, _ = align_rotations(M, R_true)
    err = angles_rad(M, G.T @ R_true)
    far = err > np.radians(FAR_MODE_DEG)
    out: dict[str, Any] = {"far_mode_fraction": float(np.mean(far))}
    for j, p in enumerate(levels):
        ratio = err / radius[:, j]
        lost = far & (ratio > 1)  # in another mode and outside this level's region: a miss at any sane temperature
        f = float(np.mean(lost))
        if f > 0.5:  # mostly lost: a failed fit; widen on all of them
            level_t = np.quantile(ratio, p)
        else:  # the temperature that covers p of all patterns, the lost ones counted as misses ...
            level_t = np.quantile(ratio[~lost], min(p / (1 - f), (1 + p) / 2))  # ... capped where out of reach
        out[f"pose_temperature_for_{round(100 * p)}"] = float(pose_used * level_t)
    c = log_scale_offset(m, t, s_true)
    z = np.abs(np.log(s_true) - c - m) / t
    for p in levels:
        out[f"scale_temperature_for_{round(100 * p)}"] = float(scale_used * np.quantile(z, p)
                                                              / stats.norm.ppf((1 + p) / 2))
    out["pose_temperature"] = float(np.mean([out[f"pose_temperature_for_{round(100 * p)}"] for p in levels]))
    out["scale_temperature"] = float(np.mean([out[f"scale_temperature_for_{round(100 * p)}"] for p in levels]))
    out.update({"n_patterns": int(len(pat)), "calibrated_on": os.fspath(truth_path), "posterior": path})
    return out


def save_calibration(path: str | os.PathLike[str], calibration: dict[str, Any]) -> None:
    """Write ``calibration`` (at least ``pose_temperature``, ``scale_temperature``) as JSON, atomically."""
    write_json(path, calibration, allow_nan=False)


def load_calibration(path: str | os.PathLike[str]) -> tuple[float, float]:
    """``(pose_temperature, scale_temperature)`` from a calibration JSON file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, or a temperature missing or not a positive number.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: expected a JSON calibration file, got invalid JSON ({exc})") from None
    values = []
    for key in ("pose_temperature", "scale_temperature"):
        v = data.get(key) if isinstance(data, dict) else None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{path}: field {key}: expected a positive number, got {v!r}")
        values.append(float(v))
    return values[0], values[1]
