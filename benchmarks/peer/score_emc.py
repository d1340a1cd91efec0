#!/usr/bin/env python
"""Score a Dragonfly EMC run (output/output_XXX.h5 + logs/EMC.log) against the true intensity.

Quality measure ("speckle correlation"): Pearson correlation of ``sqrt(max(I, 0))`` between the EMC
intensity and the true intensity over the voxels of the measured ball ``r_min <= |q| <= r_max`` after
removing, from each volume separately, the mean over each one-voxel ``|q|`` shell (shell means removed),
after rotating the EMC volume onto the truth with ``bayes_spi.analysis.align.align_intensity_rotation``
(log-intensity shell-standardised features, SO(3) search; Friedel makes inversions redundant).
``speckle_corr_outer`` is the same restricted to ``|q| > r_max / 2``.

Grids: Dragonfly's EMC volume and ``make_intensities``' cube both live in detector voxel units (q_sep, see
dragonfly_to_h5.py), centred at ``n//2``; they differ only in size (EMC: ``2 ceil(q_max) + 3``), so the larger
one is centre-cropped. ``r_max`` defaults to the largest ``|q|`` of Dragonfly mask==0 pixels (inscribed circle,
the ball every orientation covers); ``r_min`` defaults to the beam-stop radius + 1 voxel.

Wall time: per-iteration ``time`` column of Dragonfly's ``logs/EMC.log`` (its own timer), cumulated.

Usage (bayes-spi venv):
    /work/main/.venv/bin/python benchmarks/peer/score_emc.py --run /work/peer/runs/tmv190 \
        [--truth /work/peer/h5/tmv190_20k.h5] [--iters 1,2,4,8,12] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import configparser
import glob
import json
import os
import re
import sys
import time

import h5py
import numpy as np


def centre_crop(vol: np.ndarray, n: int) -> np.ndarray:
    m = vol.shape[0]
    if m == n:
        return vol
    if m < n:
        out = np.zeros((n, n, n), dtype=vol.dtype)
        o = (n - m) // 2
        out[o:o + m, o:o + m, o:o + m] = vol
        return out
    o = (m - n) // 2
    return vol[o:o + n, o:o + n, o:o + n]


def radius(n: int) -> np.ndarray:
    a = np.arange(n) - n // 2
    return np.sqrt(a[:, None, None] ** 2 + a[None, :, None] ** 2 + a[None, None, :] ** 2)


def speckle_corr(a: np.ndarray, b: np.ndarray, r: np.ndarray, r_min: float, r_max: float) -> float:
    """Pearson corr of sqrt(I) with one-voxel shell means removed, over r_min <= r <= r_max."""
    sel = (r >= r_min) & (r <= r_max)
    shell = np.floor(r[sel] + 0.5).astype(np.int64)
    va = np.sqrt(np.clip(a[sel], 0, None))
    vb = np.sqrt(np.clip(b[sel], 0, None))
    cnt = np.maximum(np.bincount(shell), 1)
    va = va - (np.bincount(shell, weights=va) / cnt)[shell]
    vb = vb - (np.bincount(shell, weights=vb) / cnt)[shell]
    den = np.sqrt((va * va).sum() * (vb * vb).sum())
    return float((va * vb).sum() / den) if den > 0 else float("nan")


def read_log(path: str) -> dict[int, float]:
    times = {}
    if os.path.exists(path):
        for line in open(path):
            m = re.match(r"^\s*(\d+)\s+([0-9.eE+-]+)\s", line)
            if m:
                times[int(m.group(1))] = float(m.group(2))
    return times


def load_truth(path: str) -> np.ndarray:
    if h5py.is_hdf5(path):
        with h5py.File(path, "r") as f:
            return f["truth/intensity"][()].astype(np.float64)
    raw = np.fromfile(path, dtype="<f8")
    n = round(raw.size ** (1 / 3))
    return raw.reshape(n, n, n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="score a Dragonfly EMC run against the truth intensity")
    ap.add_argument("--run", required=True, help="Dragonfly run folder (config.ini, output/, logs/)")
    ap.add_argument("--truth", help="bayes-spi .h5 (/truth/intensity) or Dragonfly intensities.bin "
                    "(default: [make_intensities] out_intensity_file of the run's config)")
    ap.add_argument("--config", default="config.ini")
    ap.add_argument("--iters", help="comma list of iterations to score (default: all available)")
    ap.add_argument("--r-min", type=float, default=None)
    ap.add_argument("--r-max", type=float, default=None)
    ap.add_argument("--n-rotations", type=int, default=4000, help="coarse rotations of the alignment")
    ap.add_argument("--csv", help="also write the table as CSV")
    args = ap.parse_args(argv)

    from bayes_spi.analysis.align import align_intensity_rotation, rotate_volume

    run = os.path.abspath(args.run)
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(run, args.config))

    def resolve(section: str, key: str) -> str:
        v = cfg.get(section, key).strip()
        while ":::" in v:
            s, k = v.split(":::")
            v = cfg.get(s, k).strip()
        return v if os.path.isabs(v) else os.path.join(run, v)

    truth_path = args.truth or resolve("make_intensities", "out_intensity_file")
    truth = load_truth(truth_path)
    n = truth.shape[0]
    r = radius(n)
    with h5py.File(resolve("emc", "in_detector_file"), "r") as f:
        q = np.sqrt(f["qx"][()] ** 2 + f["qy"][()] ** 2 + f["qz"][()] ** 2)
        mask = f["mask"][()]
    r_max = args.r_max if args.r_max is not None else float(q[mask == 0].max())
    r_min = args.r_min if args.r_min is not None else float(cfg.getfloat("parameters", "stoprad")) + 1.0
    out_dir = resolve("emc", "output_folder")
    log = read_log(resolve("emc", "log_file"))
    files = sorted(glob.glob(os.path.join(out_dir, "output_[0-9][0-9][0-9].h5")))
    its = [int(os.path.basename(p)[7:10]) for p in files]
    if args.iters:
        want = {int(x) for x in args.iters.split(",")}
        its = [i for i in its if i in want]
    rows = []
    cum = 0.0
    cum_by_it = {}
    for i in sorted(log):
        cum += log[i]
        cum_by_it[i] = cum
    print(f"# run={run} truth={truth_path} n={n} r_min={r_min:.2f} r_max={r_max:.2f} (voxels)")
    print(f"{'iter':>4} {'iter_s':>8} {'wall_s':>8} {'speckle_corr':>12} {'outer':>7} {'align':>6} {'score_s':>7}")
    for it in its:
        t0 = time.time()
        with h5py.File(os.path.join(out_dir, f"output_{it:03d}.h5"), "r") as f:
            vol = f["intens"][()]
        vol = centre_crop(vol[0] if vol.ndim == 4 else vol, n).astype(np.float64)
        vol[vol < 0] = 0  # Dragonfly marks unmeasured voxels with -1
        R, s = align_intensity_rotation(truth, vol, n_rotations=args.n_rotations, r_min=r_min, r_max=r_max,
                                        return_score=True)
        aligned = rotate_volume(vol, R)
        sc = speckle_corr(aligned, truth, r, r_min, r_max)
        sco = speckle_corr(aligned, truth, r, max(r_min, r_max / 2), r_max)
        row = {"iteration": it, "iter_s": log.get(it, 0.0), "wall_s": cum_by_it.get(it, 0.0),
               "speckle_corr": sc, "speckle_corr_outer": sco, "align_score": s,
               "score_s": time.time() - t0}
        rows.append(row)
        print(f"{it:>4} {row['iter_s']:>8.1f} {row['wall_s']:>8.1f} {sc:>12.4f} {sco:>7.4f} {s:>6.3f} "
              f"{row['score_s']:>7.1f}", flush=True)
    if args.csv:
        with open(args.csv, "w") as fh:
            fh.write(",".join(rows[0].keys()) + "\n")
            for row in rows:
                fh.write(",".join(f"{v}" for v in row.values()) + "\n")
    print(json.dumps({"r_min": r_min, "r_max": r_max, "n": n}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
