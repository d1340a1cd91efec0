"""Evaluate a finished run against the ground truth stored in a simulated data file.

Compares ``posterior.h5`` (per-image pose and fluence scale) and the trained intensity field in
``model.pt`` with ``/truth`` of the data file:

- orientation error after the best global rotation ``G`` (``R_true ~= G R_est``;
  :func:`bayes_spi.metrics.orientation_error_summary`), raw and modulo the per-image ``Rz(pi)``
  ambiguity, and the fraction of images in the wrong ``Rz(pi)`` mode. A mirror of the molecule changes
  the intensity only by a rotation (Friedel), so the SO(3) alignment already allows for inversion;
- Pearson correlation of the per-image fluence scales (posterior mean vs true jitter);
- Pearson correlation of ``I`` and of ``log I`` on the truth grid, inside the sphere
  ``|q| <= q_max`` of the detector (pixel centres), with the field sampled at ``G^T q``
  (``I_est(x) = I_true(G x)``, so ``I_true(q) = I_est(G^T q)``); ``G`` is the global rotation of the
  alignment modulo ``Rz(pi)`` (robust when some images sit in the other mode).

Example::

    d = evaluate_run("run/", "data.h5")
    print(format_evaluation(d))
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from bayes_spi.dataio.h5 import DataFormatError, SPIDataset, quaternions_to_rotations
from bayes_spi.geometry import Geometry
from bayes_spi.infer.build import build_field, detector_tensors
from bayes_spi.infer.config import FitConfig
from bayes_spi.infer.outputs import field_on_grid
from bayes_spi.metrics import fluence_correlation, intensity_correlation, orientation_error_summary
from bayes_spi.models.fields import IntensityField

__all__ = ["EVALUATION_KEYS", "evaluate_run", "format_evaluation", "load_field"]

#: keys of :func:`evaluate_run`'s result, in display order
EVALUATION_KEYS: tuple[str, ...] = (
    "median_pose_error_deg",
    "mean_pose_error_deg",
    "median_pose_error_mod_rotz_deg",
    "mean_pose_error_mod_rotz_deg",
    "wrong_mode_fraction",
    "fluence_corr",
    "intensity_corr",
    "log_intensity_corr",
    "n_patterns",
)


def load_field(model_path: str | os.PathLike[str], geometry: Geometry | None = None) -> tuple[IntensityField, float]:
    """Rebuild the trained intensity field from ``model.pt``; returns ``(field, q_max)`` (eval mode, CPU).

    ``q_max`` (1/A, the largest ``|q|`` of the detector's pixel centres, as in training) comes from the
    geometry stored in ``model.pt`` (or ``geometry`` if given).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file lacks ``config``/``model`` entries or the field's weights do not fit.
    """
    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"{os.fspath(path)}: not found (expected the run's trained model)")
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ck, dict) or "config" not in ck or "model" not in ck:
        raise ValueError(f"{os.fspath(path)}: expected a dict with 'config' and 'model' entries")
    config = FitConfig.from_dict(ck["config"])
    if geometry is None:
        if "geometry" not in ck:
            raise ValueError(f"{os.fspath(path)}: field geometry: expected a stored geometry (or pass one)")
        geometry = Geometry.from_dict(ck["geometry"], mask=ck.get("mask"))
    q, _, _ = detector_tensors(geometry)
    q_max = float(q.norm(dim=-1).max())
    field = build_field(config, q_max)
    state = {k[len("field."):]: v for k, v in ck["model"].items() if k.startswith("field.")}
    if not state:
        raise ValueError(f"{os.fspath(path)}: field model: expected 'field.*' entries, got none")
    try:
        field.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{os.fspath(path)}: field model: weights do not match the config ({exc})") from None
    field.eval()
    return field, q_max


def evaluate_run(
    run_dir: str | os.PathLike[str],
    truth_path: str | os.PathLike[str],
    posterior_path: str | os.PathLike[str] | None = None,
    model_path: str | os.PathLike[str] | None = None,
) -> dict[str, float]:
    """Compare a run's outputs with the truth of a simulated data file.

    Args:
        run_dir: the run directory (``posterior.h5``, ``model.pt``).
        truth_path: the data file with ``/truth`` (quaternions, scales; ``intensity`` optional: without it
            the intensity correlations are NaN).
        posterior_path, model_path: override the files inside ``run_dir``.

    Returns:
        A flat dict of floats with the keys in :data:`EVALUATION_KEYS`.

    Raises:
        FileNotFoundError: a file is missing.
        DataFormatError: the data file has no truth poses/scales.
        ValueError: the posterior and the truth disagree in the number of patterns.
    """
    run_dir = Path(run_dir)
    post_path = Path(posterior_path) if posterior_path is not None else run_dir / "posterior.h5"
    mdl_path = Path(model_path) if model_path is not None else run_dir / "model.pt"
    if not post_path.is_file():
        raise FileNotFoundError(f"{os.fspath(post_path)}: not found (expected the run's per-image posterior)")
    with h5py.File(post_path, "r") as f:
        for name in ("pose_quaternion", "scale_mean"):
            if name not in f:
                raise ValueError(f"{os.fspath(post_path)}: field /{name}: expected a dataset, got missing")
        quat = np.asarray(f["pose_quaternion"][()], dtype=np.float64)
        scale = np.asarray(f["scale_mean"][()], dtype=np.float64)
    with SPIDataset(truth_path) as ds:
        R_true = ds.truth_rotations()
        s_true = ds.truth_scales()
        try:
            I_true, voxel = ds.truth_intensity()
        except DataFormatError:
            I_true, voxel = None, float("nan")
        geometry = ds.geometry
    n = len(R_true)
    if quat.shape != (n, 4) or scale.shape != (n,):
        raise ValueError(f"{os.fspath(post_path)}: pose_quaternion/scale_mean: expected shapes ({n}, 4)/({n},) "
                         f"(the truth file's N), got {quat.shape}/{scale.shape}")
    R_est = quaternions_to_rotations(quat)
    summ = orientation_error_summary(R_est, R_true)
    out: dict[str, float] = {
        "median_pose_error_deg": summ["median_error_deg"],
        "mean_pose_error_deg": summ["mean_error_deg"],
        "median_pose_error_mod_rotz_deg": summ["median_error_mod_rotz_pi_deg"],
        "mean_pose_error_mod_rotz_deg": summ["mean_error_mod_rotz_pi_deg"],
        "wrong_mode_fraction": summ["wrong_mode_fraction"],
        "fluence_corr": fluence_correlation(scale, s_true) if n >= 2 else float("nan"),
        "intensity_corr": float("nan"),
        "log_intensity_corr": float("nan"),
        "n_patterns": float(n),
    }
    if I_true is not None:
        field, q_max = load_field(mdl_path, geometry)
        n_grid = I_true.shape[0]
        G = np.asarray(summ["G_mod_rotz_pi"], dtype=np.float64)
        # truth grid: q = (i - n//2) * voxel, i.e. grid_q(n, (n//2) * voxel); I_true(q) = I_est(G^T q)
        I_est, _ = field_on_grid(field, n_grid, (n_grid // 2) * voxel, rotation=G.T)
        ax = (np.arange(n_grid) - n_grid // 2) * voxel
        qx, qy, qz = np.meshgrid(ax, ax, ax, indexing="ij")
        sphere = qx**2 + qy**2 + qz**2 <= q_max**2 * (1 + 1e-9)
        out["intensity_corr"] = intensity_correlation(I_est, I_true, mask=sphere, transform="none")
        out["log_intensity_corr"] = intensity_correlation(I_est, I_true, mask=sphere, transform="log")
    return {k: float(out[k]) for k in EVALUATION_KEYS}


_LABELS = {
    "median_pose_error_deg": ("median orientation error", "deg"),
    "mean_pose_error_deg": ("mean orientation error", "deg"),
    "median_pose_error_mod_rotz_deg": ("median error mod Rz(pi)", "deg"),
    "mean_pose_error_mod_rotz_deg": ("mean error mod Rz(pi)", "deg"),
    "wrong_mode_fraction": ("wrong Rz(pi) mode fraction", ""),
    "fluence_corr": ("fluence correlation", ""),
    "intensity_corr": ("intensity correlation", ""),
    "log_intensity_corr": ("log-intensity correlation", ""),
    "n_patterns": ("patterns", ""),
}


def format_evaluation(d: dict[str, Any]) -> str:
    """A small aligned two-column table of an :func:`evaluate_run` result (unknown keys appended)."""
    keys = [k for k in EVALUATION_KEYS if k in d] + [k for k in d if k not in EVALUATION_KEYS]
    rows = []
    for k in keys:
        label, unit = _LABELS.get(k, (k, ""))
        v = d[k]
        if k == "n_patterns" and isinstance(v, (int, float)) and math.isfinite(v):
            text = f"{int(v)}"
        elif isinstance(v, (int, float)):
            text = f"{v:.4g}" if unit else f"{v:.4f}"
        else:
            text = str(v)
        rows.append((label, f"{text} {unit}".rstrip()))
    width = max((len(r[0]) for r in rows), default=0)
    return "\n".join(f"  {label:<{width}}  {value}" for label, value in rows)
