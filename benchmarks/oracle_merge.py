"""The ceiling of a data set: merge every pattern at its TRUE pose and fluence scale, score against the truth.

No fit can place the patterns better than their true poses, so the speckle correlation of this merge (the same
trilinear M-step as the exact EMC iterations, :mod:`bayes_spi.infer.polish`, with each pattern's weight 1 at its
true rotation, Friedel mates merged) bounds what a fit of the same patterns into the same voxels can reach; the
gap between a fit and this number is the fit's, not the data's. Printed as one JSON line per voxel count:
speckle correlation over the whole scored q range and inside its inner 0.4 and 0.25, and the mean photons a
reached voxel received.

What a given pose error costs: ``--pose-noise-deg E`` merges at the true poses turned by random rotations whose
angle has median ``E`` degrees (isotropic Gaussian rotation vectors, per-axis sigma ``E / 1.538``, the median of a
Maxwell distribution), and ``--twin-fraction F`` merges a random fraction ``F`` of the patterns at their Rz(pi)
twins. A fit whose poses have those errors cannot do better than that merge.

Example::

    python benchmarks/oracle_merge.py bench_out/robust/300A_1e3_128px/data.h5 --voxels 65 129
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["merge_true_poses", "score_cube"]


def merge_true_poses(data: Path, n: int, max_patterns: int = 0, batch: int = 64, pose_noise_deg: float = 0.0,
                     twin_fraction: float = 0.0, seed: int = 0) -> tuple[np.ndarray, float, float]:
    """Merge the patterns of ``data`` at their true poses into an ``(n, n, n)`` intensity cube over the detector's
    ``[-q_max, q_max]^3``. Returns the cube (up to one overall factor), its half width (1/A) and the mean photons
    per reached voxel. ``pose_noise_deg`` (median angle of a random turn of each pose) and ``twin_fraction``
    (patterns merged at ``R Rz(pi)``) degrade the poses on purpose (module docstring)."""
    from scipy.spatial.transform import Rotation
    from bayes_spi.dataio.h5 import SPIDataset
    from bayes_spi.trilinear import splat_cube

    with SPIDataset(data) as ds:
        geom = ds.geometry
        mask = np.asarray(ds.mask).reshape(-1)
        q = torch.as_tensor(geom.q_vectors().reshape(-1, 3)[mask], dtype=torch.float64)
        pf = torch.as_tensor(geom.pixel_factor().reshape(-1)[mask], dtype=torch.float64)
        hw = float(q.norm(dim=-1).max()) * 1.0001
        total = ds.n_patterns if not max_patterns else min(max_patterns, ds.n_patterns)
        num = torch.zeros(n, n, n, dtype=torch.float64)
        den = torch.zeros(n, n, n, dtype=torch.float64)
        rng = np.random.default_rng(seed)
        rz = np.diag([-1.0, -1.0, 1.0])
        for s in range(0, total, batch):
            rows = slice(s, min(s + batch, total))
            R = ds.truth_rotations(rows)
            if pose_noise_deg > 0:
                sigma = np.deg2rad(pose_noise_deg) / 1.538
                R = R @ Rotation.from_rotvec(rng.normal(scale=sigma, size=(len(R), 3))).as_matrix()
            if twin_fraction > 0:
                flip = rng.random(len(R)) < twin_fraction
                R = np.where(flip[:, None, None], R @ rz, R)
            R = torch.as_tensor(R, dtype=torch.float64)
            g = torch.as_tensor(ds.truth_scales(rows), dtype=torch.float64)
            y = torch.as_tensor(ds.read(np.arange(rows.start, rows.stop)).reshape(R.shape[0], -1)[:, mask],
                                dtype=torch.float64)
            x = torch.einsum("bij,mj->bmi", R, q).reshape(-1, 3)
            vals = torch.stack([y.reshape(-1), (g[:, None] * pf[None]).reshape(-1)], -1)
            both = splat_cube(x, vals, n, hw)
            num += both[..., 0]
            den += both[..., 1]
    num = num + num.flip(0, 1, 2)
    den = den + den.flip(0, 1, 2)
    reached = den > 1e-6 * float(den.max())
    cube = torch.where(reached, num / den.clamp(min=1e-30), torch.zeros_like(num))
    return cube.numpy(), hw, float(num[reached].mean() / 2)


def score_cube(cube: np.ndarray, hw: float, data: Path) -> dict[str, float]:
    """Speckle correlation of ``cube`` (over ``[-hw, hw]^3``) with ``/truth/intensity``, read at the truth's voxels,
    over the scored q range and its inner 0.4 and 0.25 (the robustness grid's measure, no alignment needed)."""
    from bayes_spi.analysis.compare import speckle_correlation
    from bayes_spi.dataio.h5 import SPIDataset
    from bayes_spi.grid import grid_q
    from bayes_spi.trilinear import sample_cube

    with SPIDataset(data) as ds:
        I_true, dq = ds.truth_intensity()
        qn = ds.geometry.q_magnitudes()[ds.mask]
    m = I_true.shape[0]
    pts, _ = grid_q(m, (m // 2) * dq)
    I_est = sample_cube(torch.as_tensor(cube)[None, None], torch.as_tensor(pts.reshape(-1, 3), dtype=torch.float64),
                        hw).reshape(m, m, m).numpy()
    q_lo, q_top = float(qn.min()), min(float(qn.max()), (m // 2) * dq)
    out = {}
    for frac in (1.0, 0.4, 0.25):
        out[f"speckle_corr_{frac}"] = round(float(speckle_correlation(I_est, I_true, dq, q_lo + frac * (q_top - q_lo),
                                                                      q_lo)), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("--voxels", type=int, nargs="+", default=[65])
    ap.add_argument("--max-patterns", type=int, default=0)
    ap.add_argument("--pose-noise-deg", type=float, default=0.0, help="median angle of a random turn of each pose")
    ap.add_argument("--twin-fraction", type=float, default=0.0, help="fraction merged at their Rz(pi) twins")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for n in args.voxels:
        t0 = time.perf_counter()
        cube, hw, per_voxel = merge_true_poses(args.data, n, args.max_patterns, pose_noise_deg=args.pose_noise_deg,
                                               twin_fraction=args.twin_fraction)
        row = {"data": str(args.data), "voxels": n, "pose_noise_deg": args.pose_noise_deg,
               "twin_fraction": args.twin_fraction, "photons_per_reached_voxel": round(per_voxel, 2),
               **score_cube(cube, hw, args.data), "wall_s": round(time.perf_counter() - t0, 1)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
