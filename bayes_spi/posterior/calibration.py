r"""Temperatures that make a run's credible regions nominal, fitted on a simulation with truth, stored as JSON.

The refined posterior (:mod:`bayes_spi.posterior.refine`) is conditional on the trained intensity field. Its
remaining errors move the true pose (and scale) further from the posterior mean than the Laplace spreads
say, by a factor that depends on how well the field converged (foundation benchmark: 1.2 for the pose;
the 10-minute demo fit: 1.75), and within a run the same factor makes the 50% and the 90% regions nominal.
So each run gets two temperatures, multiplying the tangent-space and the log-scale spreads:

- pose: cone radii scale with the temperature (for unimodal, small-spread posteriors), so the temperature
  that makes level ``p`` nominal is ``T_used * quantile_p(error_i / r_i(p))``; we store the mean over levels.
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

import h5netcdf
import numpy as np
from scipy import stats

from bayes_spi.atomic import atomic_path
from bayes_spi.dataio.h5 import SPIDataset, quaternions_to_rotations
from bayes_spi.metrics import align_rotations
from bayes_spi.posterior.coverage import angles_rad

__all__ = ["fit_temperatures", "save_calibration", "load_calibration"]


def fit_temperatures(path: str | os.PathLike[str], truth_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Pose and scale temperatures that make an exported posterior's regions nominal against the truth.

    Returns:
        ``pose_temperature``, ``scale_temperature`` (means over the levels), the per-level values
        ``pose_temperature_for_50`` etc., ``n_patterns``, ``calibrated_on`` (the data file), ``posterior``.

    Raises:
        FileNotFoundError, ValueError: as :func:`bayes_spi.posterior.coverage.coverage_from_netcdf`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found (expected a posterior from `bayes-spi posterior`)")
    with h5netcdf.File(path, "r") as f:
        if "sample_stats" not in f.groups:
            raise ValueError(f"{path}: field /sample_stats: expected a group, got missing")
        g = f.groups["sample_stats"]
        pat = np.asarray(g.variables["pattern"][:], dtype=np.int64)
        levels = [float(p) for p in g.variables["credible_mass"][:]]
        M = quaternions_to_rotations(np.asarray(g.variables["mean_pose_quaternion"][:], dtype=np.float64))
        radius = np.radians(np.asarray(g.variables["cone_radius_deg"][:], dtype=np.float64))
        m = np.asarray(g.variables["log_scale_mean"][:], dtype=np.float64)
        t = np.asarray(g.variables["log_scale_sd"][:], dtype=np.float64)
        pose_used = float(f.attrs.get("pose_temperature", 1.0))
        scale_used = float(f.attrs.get("scale_temperature", 1.0))
    with SPIDataset(truth_path) as ds:
        if pat.min() < 0 or pat.max() >= ds.n_patterns:
            raise ValueError(f"{path}: field /sample_stats/pattern: expected indices in [0, {ds.n_patterns}), "
                             f"got [{pat.min()}, {pat.max()}]")
        R_true = ds.truth_rotations()[pat]
        s_true = ds.truth_scales()[pat]
    G, _, _ = align_rotations(M, R_true)
    err = angles_rad(M, G.T @ R_true)
    out: dict[str, Any] = {}
    for j, p in enumerate(levels):
        out[f"pose_temperature_for_{round(100 * p)}"] = float(pose_used * np.quantile(err / radius[:, j], p))
    prec = 1.0 / np.maximum(t, 1e-12) ** 2
    c = np.sum((np.log(s_true) - m) * prec) / np.sum(prec)
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
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(calibration, indent=2, allow_nan=False) + "\n", encoding="utf-8")


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
