"""A one-page PNG report of a fit: ELBO and speed, the reconstructed intensity, pose errors.

``report.png`` in the run directory holds:

- ELBO per image against images seen, and images/s (from ``metrics.csv``);
- the three central slices (``q_x = 0``, ``q_y = 0``, ``q_z = 0``) of ``log10 I`` (from ``intensity.h5``);
- with a simulated truth: the histogram of per-image orientation errors after the best global rotation,
  raw and modulo the Rz(pi) ambiguity, and the hypothesis-weight of the chosen pose.

Example::

    write_report("run1", truth_path="data.h5")
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import h5py
import numpy as np

from bayes_spi.atomic import atomic_path

__all__ = ["write_report"]


def _metrics(run_dir: Path) -> dict[str, np.ndarray]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {k: np.array([float(r[k]) for r in rows]) for k in ("images_seen", "elbo_per_image", "images_per_s")}


def write_report(run_dir: str | os.PathLike, truth_path: str | os.PathLike | None = None) -> Path:
    """Write ``run_dir/report.png`` (see the module doc) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    m = _metrics(run_dir)
    with h5py.File(run_dir / "intensity.h5", "r") as f:
        vol = np.asarray(f["intensity"][()], dtype=np.float64)
        dq = float(f["intensity"].attrs["voxel_size_inv_A"])
    errors = None
    if truth_path is not None:
        from bayes_spi.dataio.h5 import SPIDataset, quaternions_to_rotations
        from bayes_spi.metrics import orientation_error_summary

        with h5py.File(run_dir / "posterior.h5", "r") as f:
            quat = f["pose_quaternion"][()]
            w_best = f["hypothesis_weights"][()].max(axis=1)
        with SPIDataset(truth_path) as ds:
            errors = orientation_error_summary(quaternions_to_rotations(quat), ds.truth_rotations())

    fig, axes = plt.subplots(2, 3, figsize=(14, 8.5))
    ax = axes[0, 0]
    ax.plot(m["images_seen"], m["elbo_per_image"], lw=1)
    ax.set_xlabel("images seen")
    ax.set_ylabel("ELBO per image (nats)")
    lo = np.percentile(m["elbo_per_image"], 5)
    ax.set_ylim(lo - 0.1 * abs(lo), m["elbo_per_image"].max() + 0.05 * abs(lo))
    ax.set_title("ELBO (more pixels enter as the radius widens)")
    ax = axes[0, 1]
    ax.plot(m["images_seen"], m["images_per_s"], lw=1, color="tab:green")
    ax.set_xlabel("images seen")
    ax.set_ylabel("images / s")
    ax.set_title("training speed")
    ax = axes[0, 2]
    if errors is not None:
        bins = np.linspace(0, 180, 61)
        ax.hist(errors["errors_deg"], bins=bins, alpha=0.6, label=f"raw (median {errors['median_error_deg']:.1f})")
        ax.hist(errors["errors_mod_rotz_pi_deg"], bins=bins, alpha=0.6,
                label=f"mod Rz(pi) (median {errors['median_error_mod_rotz_pi_deg']:.1f})")
        ax.set_xlabel("orientation error after global alignment (deg)")
        ax.set_ylabel("patterns")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title(f"pose errors (mean weight of chosen hypothesis {w_best.mean():.2f})")
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "no truth given", ha="center", va="center")
    c = vol.shape[0] // 2
    extent = [-c * dq, c * dq, -c * dq, c * dq]
    logv = np.log10(np.clip(vol, vol[vol > 0].min() if np.any(vol > 0) else 1e-30, None))
    vmin, vmax = np.percentile(logv, [1, 99.9])
    for ax, (name, sl) in zip(axes[1], [("q_z = 0", logv[:, :, c].T), ("q_y = 0", logv[:, c, :].T),
                                         ("q_x = 0", logv[c, :, :].T)]):
        im = ax.imshow(sl, origin="lower", extent=extent, vmin=vmin, vmax=vmax, cmap="magma")
        ax.set_title(f"log10 I, central slice {name}")
        ax.set_xlabel("q (1/A)")
    fig.colorbar(im, ax=axes[1].tolist(), shrink=0.8, label="log10 I")
    fig.suptitle(f"bayes-spi run {run_dir}")
    out = run_dir / "report.png"
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return out
