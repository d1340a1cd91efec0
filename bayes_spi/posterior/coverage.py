r"""Calibration on simulations: how often do the credible regions hold the truth?

**Pose.** Poses are defined up to one global rotation ``G`` (``R_true ~= G R_est``, see
:mod:`bayes_spi.metrics`). ``G`` is found by :func:`bayes_spi.metrics.align_rotations` between the posterior
mean poses and the true poses (robust Procrustes; one 3-parameter fit over all patterns). Pattern ``i`` is
covered at mass ``p`` when ``angle(M_i, G^T R_true_i) <= r_i(p)``, its cone radius. "mod Rz(pi)" uses the
alignment modulo the per-pattern Rz(pi) twin and the radii of the distances to the nearer of ``M``,
``M Rz(pi)`` (the coverage of a posterior that is asked only for the pose up to the twin).

**Fluence.** Scales are defined up to one global factor, so the log scales are aligned by a single offset
``c``: the maximum-likelihood offset under the per-pattern posteriors, the precision-weighted mean
``c = sum_i (log s_true_i - m_i) / t_i^2 / sum_i 1 / t_i^2`` (``m_i``, ``t_i``: posterior mean and sd of
``log s_i``). Pattern ``i`` is covered at ``p`` when ``s_true_i exp(-c)`` lies in its central (equal-tailed)
interval of mass ``p``.

Example::

    d = coverage_from_netcdf("posterior.nc", "data.h5")
    print(format_coverage(d))
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import h5netcdf
import numpy as np
import torch

from bayes_spi.dataio.h5 import SPIDataset, quaternions_to_rotations
from bayes_spi.metrics import align_rotations
from bayes_spi.so3 import geodesic_angle, rotz_pi_numpy

__all__ = ["angles_rad", "log_scale_offset", "pose_coverage", "scale_coverage", "read_summaries",
           "coverage_from_netcdf", "format_coverage"]

_ROTZ_PI = rotz_pi_numpy()


def angles_rad(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Geodesic angles (rad) between rotations ``A (N, 3, 3)`` and ``B (N, 3, 3)``: ``(N,)``."""
    return geodesic_angle(torch.as_tensor(A, dtype=torch.float64), torch.as_tensor(B, dtype=torch.float64)).numpy()


def _key(p: float) -> str:
    return f"{round(100 * p):d}"


def pose_coverage(
    mean_rotations: np.ndarray,
    cone_radius: np.ndarray,
    R_true: np.ndarray,
    levels: Sequence[float],
    cone_radius_mod_rotz: np.ndarray | None = None,
    G: np.ndarray | None = None,
) -> dict[str, Any]:
    """Fraction of patterns whose aligned true pose lies inside their credible cones.

    Args:
        mean_rotations: ``(N, 3, 3)`` posterior mean poses ``M``.
        cone_radius: ``(N, L)`` cone radii (rad) at ``levels``.
        R_true: ``(N, 3, 3)`` true poses.
        levels: the ``L`` credible masses.
        cone_radius_mod_rotz: ``(N, L)`` radii modulo Rz(pi) (rad); adds the ``_mod_rotz`` entries.
        G: the global alignment (default: fitted by :func:`align_rotations` on ``M``).

    Returns:
        ``pose_coverage_50`` etc. (fraction covered), ``median_cone_radius_50_deg`` etc.,
        ``median_pose_error_deg`` (of ``M``), with ``cone_radius_mod_rotz`` the same with ``_mod_rotz``
        and ``wrong_mode_fraction``; ``G`` (list of lists).
    """
    M = np.asarray(mean_rotations, dtype=np.float64)
    Rt = np.asarray(R_true, dtype=np.float64)
    radius = np.asarray(cone_radius, dtype=np.float64)
    lv = [float(p) for p in levels]
    if M.shape != Rt.shape or M.ndim != 3 or radius.shape != (len(M), len(lv)):
        raise ValueError(f"expected mean_rotations and R_true (N, 3, 3) and cone_radius (N, {len(lv)}), got "
                         f"{M.shape}, {Rt.shape}, {radius.shape}")
    if G is None:
        G, _, _ = align_rotations(M, Rt)
    err = angles_rad(M, G.T @ Rt)
    out: dict[str, Any] = {"n_patterns": int(len(M))}
    for j, p in enumerate(lv):
        out[f"pose_coverage_{_key(p)}"] = float(np.mean(err <= radius[:, j]))
    for j, p in enumerate(lv):
        out[f"median_cone_radius_{_key(p)}_deg"] = float(np.degrees(np.median(radius[:, j])))
    out["median_pose_error_deg"] = float(np.degrees(np.median(err)))
    out["G"] = np.asarray(G).tolist()
    if cone_radius_mod_rotz is not None:
        rm = np.asarray(cone_radius_mod_rotz, dtype=np.float64)
        Gm, _, flipped = align_rotations(M, Rt, modulo_rotz_pi=True)
        truth = Gm.T @ Rt
        err_m = np.minimum(angles_rad(M, truth), angles_rad(M @ _ROTZ_PI, truth))
        for j, p in enumerate(lv):
            out[f"pose_coverage_mod_rotz_{_key(p)}"] = float(np.mean(err_m <= rm[:, j]))
        out["median_pose_error_mod_rotz_deg"] = float(np.degrees(np.median(err_m)))
        out["wrong_mode_fraction"] = float(np.mean(flipped))
    return out


def log_scale_offset(log_scale_mean: np.ndarray, log_scale_sd: np.ndarray, s_true: np.ndarray) -> float:
    """The global offset ``c`` of the log scales: the precision-weighted mean of ``log s_true - m`` (see the
    module doc), all ``(N,)``."""
    prec = 1.0 / np.maximum(log_scale_sd, 1e-12) ** 2
    return float(np.sum((np.log(s_true) - log_scale_mean) * prec) / np.sum(prec))


def scale_coverage(log_scale_mean: np.ndarray, log_scale_sd: np.ndarray, intervals: np.ndarray,
                   s_true: np.ndarray, levels: Sequence[float]) -> dict[str, float]:
    """Fraction of patterns whose aligned true scale lies in its central interval.

    Args:
        log_scale_mean, log_scale_sd: ``(N,)`` posterior mean and sd of ``log s``.
        intervals: ``(N, L, 2)`` equal-tailed intervals of ``s`` at ``levels``.
        s_true: ``(N,)`` true scales.
        levels: the ``L`` credible masses.

    Returns:
        ``scale_coverage_50`` etc., ``log_scale_offset`` (``c``), ``median_log_scale_sd``.
    """
    m = np.asarray(log_scale_mean, dtype=np.float64)
    t = np.asarray(log_scale_sd, dtype=np.float64)
    iv = np.asarray(intervals, dtype=np.float64)
    st = np.asarray(s_true, dtype=np.float64)
    lv = [float(p) for p in levels]
    if not (m.shape == t.shape == st.shape and iv.shape == (len(m), len(lv), 2)):
        raise ValueError(f"expected (N,) means, sds, truths and (N, {len(lv)}, 2) intervals, got "
                         f"{m.shape}, {t.shape}, {st.shape}, {iv.shape}")
    if np.any(st <= 0):
        raise ValueError("expected positive true scales, got a value <= 0")
    c = log_scale_offset(m, t, st)
    aligned = st * np.exp(-c)
    out: dict[str, float] = {}
    for j, p in enumerate(lv):
        out[f"scale_coverage_{_key(p)}"] = float(np.mean((iv[:, j, 0] <= aligned) & (aligned <= iv[:, j, 1])))
    out["log_scale_offset"] = c
    out["median_log_scale_sd"] = float(np.median(t))
    return out


def _rotations(quat: np.ndarray, path: str, field: str) -> np.ndarray:
    """:func:`quaternions_to_rotations`, its error naming the file and the field."""
    try:
        return quaternions_to_rotations(quat)
    except ValueError as exc:
        raise ValueError(f"{path}: field {field}: {exc}") from None


def read_summaries(path: str | os.PathLike[str], truth_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The per-pattern summaries of an exported posterior (``bayes-spi posterior``) and the matching truth.

    Returns:
        ``pattern (N,)``, ``levels`` (list), ``mean_rotation (N, 3, 3)``, ``cone_radius`` and
        ``cone_radius_mod_rotz`` ``(N, L)`` (rad), ``log_scale_mean``, ``log_scale_sd`` ``(N,)``,
        ``scale_eti (N, L, 2)``, ``attrs`` (the export's ``pose_temperature``, ``scale_temperature``,
        ``refine`` where recorded), ``R_true (N, 3, 3)``, ``s_true (N,)``.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: the posterior file lacks a field or names patterns the data file does not have.
        DataFormatError: the data file has no truth.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found (expected a posterior from `bayes-spi posterior`)")
    try:
        f = h5netcdf.File(path, "r")
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: expected a netCDF posterior from `bayes-spi posterior`, got an unreadable file "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    with f:
        if "sample_stats" not in f.groups:
            raise ValueError(f"{path}: field /sample_stats: expected a group, got missing")
        g = f.groups["sample_stats"]
        need = ("pattern", "credible_mass", "mean_pose_quaternion", "cone_radius_deg", "cone_radius_mod_rotz_deg",
                "log_scale_mean", "log_scale_sd", "scale_eti")
        missing = [name for name in need if name not in g.variables]
        if missing:
            raise ValueError(f"{path}: field /sample_stats/{missing[0]}: expected a variable, got missing")

        def var(name: str) -> np.ndarray:
            return np.asarray(g.variables[name][:], dtype=np.float64)

        pat = np.asarray(g.variables["pattern"][:], dtype=np.int64)
        out: dict[str, Any] = {
            "pattern": pat,
            "levels": [float(p) for p in g.variables["credible_mass"][:]],
            "mean_rotation": _rotations(var("mean_pose_quaternion"), path, "/sample_stats/mean_pose_quaternion"),
            "cone_radius": np.radians(var("cone_radius_deg")),
            "cone_radius_mod_rotz": np.radians(var("cone_radius_mod_rotz_deg")),
            "log_scale_mean": var("log_scale_mean"),
            "log_scale_sd": var("log_scale_sd"),
            "scale_eti": var("scale_eti"),
            "attrs": {k: f.attrs[k] for k in ("pose_temperature", "scale_temperature", "refine") if k in f.attrs},
        }
    with SPIDataset(truth_path) as ds:
        if pat.size and (pat.min() < 0 or pat.max() >= ds.n_patterns):
            raise ValueError(f"{path}: field /sample_stats/pattern: expected indices in [0, {ds.n_patterns}) "
                             f"(the data file's patterns), got [{pat.min()}, {pat.max()}]")
        out["R_true"] = ds.truth_rotations()[pat]
        out["s_true"] = ds.truth_scales()[pat]
    return out


def coverage_from_netcdf(path: str | os.PathLike[str], truth_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Pose and fluence coverage of an exported posterior (``bayes-spi posterior``) against a data file's truth.

    Returns:
        The entries of :func:`pose_coverage` and :func:`scale_coverage`, ``levels``, and the export's
        ``pose_temperature``, ``scale_temperature``, ``refine``.

    Raises:
        As :func:`read_summaries`.
    """
    d = read_summaries(path, truth_path)
    levels = d["levels"]
    out = pose_coverage(d["mean_rotation"], d["cone_radius"], d["R_true"], levels, d["cone_radius_mod_rotz"])
    out.update(scale_coverage(d["log_scale_mean"], d["log_scale_sd"], d["scale_eti"], d["s_true"], levels))
    out["levels"] = levels
    out.update({k: float(v) for k, v in d["attrs"].items()})
    return out


def format_coverage(d: dict[str, Any]) -> str:
    """A small table of a :func:`coverage_from_netcdf` result: nominal mass vs observed coverage."""
    levels = d.get("levels", [0.5, 0.9])
    rows = [("credible mass", *[f"{p:.0%}" for p in levels])]
    labels = [("pose", "pose_coverage_{}"), ("pose mod Rz(pi)", "pose_coverage_mod_rotz_{}"),
              ("fluence scale", "scale_coverage_{}"), ("median cone radius (deg)", "median_cone_radius_{}_deg")]
    for label, pattern in labels:
        vals = [d.get(pattern.format(_key(p))) for p in levels]
        if all(v is None for v in vals):
            continue
        fmt = "{:.2f}" if "radius" in pattern else "{:.1%}"
        rows.append((label, *["-" if v is None else fmt.format(v) for v in vals]))
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  " + "  ".join(c.ljust(width[i]) if i == 0 else c.rjust(width[i]) for i, c in enumerate(r))
             for r in rows]
    extra = []
    if "median_pose_error_deg" in d:
        extra.append(f"median error of the mean pose {d['median_pose_error_deg']:.2f} deg")
    if "wrong_mode_fraction" in d:
        extra.append(f"wrong Rz(pi) mode {d['wrong_mode_fraction']:.1%}")
    extra.append(f"patterns {d.get('n_patterns', '?')}")
    return "\n".join(lines + ["  " + ", ".join(extra)])
