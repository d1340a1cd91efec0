#!/usr/bin/env python
"""Score a Dragonfly EMC run made from a bayes-spi data file (``h5_to_dragonfly.py``) against that file's
``/truth/intensity``, with the measure of bayes-spi's robustness grid (``benchmarks/bench_robust.py``).

Measure: :func:`bayes_spi.analysis.compare.compare_to_reference` on the truth's grid (voxel ``dq``): rotational
alignment of the reconstruction onto the truth (4,000 coarse rotations + refinement), then the speckle
correlation (``sqrt(I)``, each ``|q|`` shell standardised) over ``q_min <= |q| <= q_max`` with
``q_min`` = smallest good-pixel ``|q|`` and ``q_max = min(largest good-pixel |q|, (n // 2) dq)``, exactly as
``bench_robust.run_cell`` scores a bayes-spi fit (there the field is sampled on the truth grid; here EMC's
volume is resampled onto it).

EMC's volume is in Dragonfly voxels (``voxel_inv_A`` from the run's ``conversion.json``, centre ``size // 2``);
it is resampled onto the truth grid by trilinear interpolation (``scipy.ndimage.map_coordinates``); Dragonfly's
unmeasured voxels (``-1``) count as 0. The speckle FSC resolution at 0.5 comes along.

Poses (``--quat``): Dragonfly writes each frame's most likely orientation (``orientations``, an index into its
quaternion list for ``num_div``; dump the list with ``/work/peer/quat/dump_quat NUM_DIV FILE``, a 10-line C
program calling Dragonfly's ``quat_gen``, see benchmarks/peer/README.md). Dragonfly slices its model at
``rot q`` with ``rot`` = ``make_rot_quat(quaternion)`` (src/interp.c), and the volume axes are bayes-spi's
``x, y, z``; bayes-spi's ``/truth/quaternions`` give ``R`` with pixels sampling ``I(R q)``. So ``rot`` is the
estimate of ``R``, and :func:`bayes_spi.metrics.orientation_error_summary` gives the median error after the
best global rotation, raw and modulo ``Rz(pi)``, and the wrong-mode fraction (``--pose-stride`` frames).

``ball``: the measure of ``score_emc.py`` (the peer benchmark on Dragonfly's own data) on the same aligned volume:
``sqrt(I)`` with one-voxel shell means removed (not divided by the shells' spread), over the ball
``q_min + dq <= |q| <= q_in`` (``q_in`` = largest ``|q|`` of Dragonfly mask-0 pixels, the inscribed circle). It
weights the bright low-q shells; the grid's measure weights every voxel of the shells out to the corner alike, so
it is much harsher on EMC's noisy high-q voxels (Dragonfly's own 2CEX at 8,000 frames, iteration 4: 0.22 vs 0.84).

Wall time: Dragonfly's own per-iteration ``time`` column of ``logs/EMC.log``, cumulated; ``beta``,
``rms_change`` and ``info_rate`` (mutual information) come from the same log.

Usage (bayes-spi venv)::

    /work/main/.venv/bin/python benchmarks/peer/score_emc_h5.py --run /work/peer/runs/6mer_s1 \
        --data /work/robust/150A_1e3_64px/data.h5 [--iters 0,1,5] [--csv score.csv]
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import re
import sys
import time

import h5py
import numpy as np
from scipy.ndimage import map_coordinates

__all__ = ["read_emc_log", "resample_to_grid", "dragonfly_rotations", "main"]


def read_emc_log(path: str) -> dict[int, dict[str, float]]:
    """Rows of Dragonfly's ``EMC.log``: iteration -> ``time, rms_change, info_rate, log_likelihood, num_rot, beta``."""
    rows: dict[int, dict[str, float]] = {}
    if not os.path.exists(path):
        return rows
    keys = ("time", "rms_change", "info_rate", "log_likelihood", "num_rot", "beta")
    for line in open(path):
        if re.match(r"^\s*\d+\s+[0-9.eE+-]+\s", line):
            parts = line.split()
            rows[int(parts[0])] = {k: float(v) for k, v in zip(keys, parts[1:])}
    return rows


def resample_to_grid(vol: np.ndarray, voxel_inv_A: float, n: int, dq: float) -> np.ndarray:
    """EMC volume ``(m, m, m)`` (voxel ``voxel_inv_A``, centre ``m // 2``) -> ``(n, n, n)`` at voxel ``dq`` (centre
    ``n // 2``), trilinear; outside the EMC volume 0."""
    m = vol.shape[0]
    a = (np.arange(n) - n // 2) * (dq / voxel_inv_A) + m // 2
    coords = np.stack(np.meshgrid(a, a, a, indexing="ij")).reshape(3, -1)
    return map_coordinates(vol, coords, order=1, mode="constant", cval=0.0).reshape(n, n, n)


def dragonfly_rotations(quaternions: np.ndarray) -> np.ndarray:
    """``(N, 3, 3)`` matrices of Dragonfly's ``make_rot_quat`` for quaternions ``(N, 4)`` ``(q0, q1, q2, q3)``."""
    q0, q1, q2, q3 = (quaternions[:, k] for k in range(4))
    return np.stack([
        np.stack([1 - 2 * (q2 * q2 + q3 * q3), 2 * (q1 * q2 + q0 * q3), 2 * (q1 * q3 - q0 * q2)], -1),
        np.stack([2 * (q1 * q2 - q0 * q3), 1 - 2 * (q1 * q1 + q3 * q3), 2 * (q0 * q1 + q2 * q3)], -1),
        np.stack([2 * (q0 * q2 + q1 * q3), 2 * (q2 * q3 - q0 * q1), 1 - 2 * (q1 * q1 + q2 * q2)], -1),
    ], 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="score an EMC run of a bayes-spi data file against its truth")
    ap.add_argument("--run", required=True, help="run folder written by h5_to_dragonfly.py")
    ap.add_argument("--data", required=True, help="the bayes-spi data file (with /truth/intensity)")
    ap.add_argument("--iters", help="comma list of iterations (default: all)")
    ap.add_argument("--n-rotations", type=int, default=4000)
    ap.add_argument("--csv", help="also write the table as CSV")
    ap.add_argument("--det", help="Dragonfly detector file if the run has no data/det.h5")
    ap.add_argument("--quat", help="Dragonfly's quaternion list for the run's num_div (float64 N x 5: q0..q3, weight)")
    ap.add_argument("--pose-stride", type=int, default=4, help="score the poses of every k-th frame")
    args = ap.parse_args(argv)

    from bayes_spi.analysis.compare import compare_to_reference
    from bayes_spi.analysis.fsc import radial_index
    from bayes_spi.dataio.h5 import SPIDataset

    with open(os.path.join(args.run, "conversion.json")) as fh:
        voxel = float(json.load(fh)["voxel_inv_A"])
    with SPIDataset(args.data) as ds:
        I_true, dq = ds.truth_intensity()
        qn = ds.geometry.q_magnitudes()[ds.mask]
        R_true = ds.truth_rotations()[:: args.pose_stride] if args.quat else None
    rots = dragonfly_rotations(np.fromfile(args.quat, dtype="<f8").reshape(-1, 5)[:, :4]) if args.quat else None
    I_true = np.asarray(I_true, dtype=np.float64)
    n = I_true.shape[0]
    q_max = min(float(qn.max()), (n // 2) * dq)
    q_min = float(qn.min())
    with h5py.File(os.path.join(args.run, "data", "det.h5") if os.path.exists(os.path.join(args.run, "data", "det.h5"))
                   else args.det, "r") as f:
        qd = np.sqrt(f["qx"][()] ** 2 + f["qy"][()] ** 2 + f["qz"][()] ** 2)
        q_in = float(qd[f["mask"][()] == 0].max()) * voxel
    r = radial_index(n)
    ball = (r >= q_min / dq + 1.0) & (r <= q_in / dq)
    log = read_emc_log(os.path.join(args.run, "logs", "EMC.log"))
    files = sorted(glob.glob(os.path.join(args.run, "output", "output_[0-9][0-9][0-9].h5")))
    its = [int(os.path.basename(p)[7:10]) for p in files]
    if args.iters:
        want = {int(x) for x in args.iters.split(",")}
        its = [i for i in its if i in want]
    print(f"# run={args.run} data={args.data} truth n={n} dq={dq:.6g} emc voxel={voxel:.6g} "
          f"q {q_min:.4f}-{q_max:.4f} 1/A")
    print(f"{'iter':>4} {'iter_s':>7} {'wall_s':>7} {'beta':>7} {'info':>6} {'speckle':>8} {'ball':>6} {'sFSC0.5nm':>9} "
          f"{'pose_med':>8} {'mod_rz':>7} {'wrong':>6} {'score_s':>7}")
    rows = []
    for it in its:
        t0 = time.time()
        with h5py.File(os.path.join(args.run, "output", f"output_{it:03d}.h5"), "r") as f:
            vol = np.asarray(f["intens"][()], dtype=np.float64)
        vol = vol[0] if vol.ndim == 4 else vol
        vol[vol < 0] = 0.0  # Dragonfly marks unmeasured voxels with -1
        I_est = resample_to_grid(vol, voxel, n, dq)
        res = compare_to_reference(I_est, I_true, dq, q_max, q_min=q_min, n_rotations=args.n_rotations)
        a = np.sqrt(np.clip(res.aligned, 0, None))[ball]
        b = np.sqrt(np.clip(I_true, 0, None))[ball]
        shell = np.floor(r[ball] + 0.5).astype(np.int64)
        cnt = np.maximum(np.bincount(shell), 1)
        a = a - (np.bincount(shell, weights=a) / cnt)[shell]
        b = b - (np.bincount(shell, weights=b) / cnt)[shell]
        ball_corr = float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))
        pose = {"median_pose_error_deg": float("nan"), "median_pose_error_mod_rotz_deg": float("nan"),
                "wrong_mode_fraction": float("nan")}
        if rots is not None and it > 0:
            from bayes_spi.metrics import orientation_error_summary

            with h5py.File(os.path.join(args.run, "output", f"output_{it:03d}.h5"), "r") as f:
                best = np.asarray(f["orientations"][()])[:: args.pose_stride]
            summ = orientation_error_summary(rots[best], R_true, seed=0)
            pose = {"median_pose_error_deg": summ["median_error_deg"],
                    "median_pose_error_mod_rotz_deg": summ["median_error_mod_rotz_pi_deg"],
                    "wrong_mode_fraction": summ["wrong_mode_fraction"]}
        wall = sum(row_["time"] for i, row_ in log.items() if i <= it)
        lr = log.get(it, {})
        row = {"iteration": it, "iter_s": lr.get("time", 0.0), "wall_s": wall, "beta": lr.get("beta", float("nan")),
               "info_rate": lr.get("info_rate", float("nan")), "rms_change": lr.get("rms_change", float("nan")),
               "speckle_corr": res.speckle_corr, "ball_corr": ball_corr,
               "speckle_fsc_res_nm_0.5": res.speckle_fsc.resolution_nm(0.5),
               **pose, "score_s": time.time() - t0}
        rows.append(row)
        print(f"{it:>4} {row['iter_s']:>7.1f} {wall:>7.1f} {row['beta']:>7.4f} {row['info_rate']:>6.3f} "
              f"{row['speckle_corr']:>8.4f} {ball_corr:>6.3f} {row['speckle_fsc_res_nm_0.5']:>9.2f} "
              f"{pose['median_pose_error_deg']:>8.1f} "
              f"{pose['median_pose_error_mod_rotz_deg']:>7.1f} {pose['wrong_mode_fraction']:>6.2f} {row['score_s']:>7.1f}",
              flush=True)
    if args.csv and rows:
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
