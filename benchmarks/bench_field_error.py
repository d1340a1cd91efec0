"""Does the half-merge estimate of the field's pose error (bayes_spi.posterior.fielderror) match the truth?

For a fitted run on simulated data: :func:`~bayes_spi.posterior.fielderror.measure_field_pose_error` (the default
export's refined posterior of the first ``--patterns`` patterns, ``--probes`` of them held out, the rest merged in
two random halves at their posterior poses, every probe refined on each half's cube). Printed beside the truth
(after the global alignment): the probes' median pose error, their Laplace spread, ``sigma_field``, the truth's
rms error per axis, and the 50 / 90% coverage of Gaussian tangent cones (``|eps|^2 <= chi2_3(p) var``) around the
most probable hypothesis with the default temperature alone and with ``sigma_field^2`` added (what the export does).

Example::

    python benchmarks/bench_field_error.py RUN DATA.h5 --patterns 4096 --probes 512 --out fe.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from bayes_spi.dataio.h5 import SPIDataset
from bayes_spi.infer.load import load_trained
from bayes_spi.metrics import align_rotations
from bayes_spi.posterior.fielderror import measure_field_pose_error
from bayes_spi.posterior.netcdf import DEFAULT_POSE_TEMPERATURE
from bayes_spi.so3 import geodesic_angle_numpy, rotmat_to_rotvec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--patterns", type=int, default=4096)
    ap.add_argument("--probes", type=int, default=512)
    ap.add_argument("--grid", type=int, default=0, help="merge cube voxels per side (0: the fit's search cube)")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    trained = load_trained(args.run)
    with SPIDataset(args.data) as ds:
        est = measure_field_pose_error(trained, ds, n_patterns=args.patterns, n_probes=args.probes,
                                       grid=args.grid or None)
        R_true = ds.truth_rotations()[est.probes]
    seconds = time.perf_counter() - t0

    R0 = est.start_rotations.numpy()
    G, _, _ = align_rotations(R0, R_true)
    true_p = G.T @ R_true
    eps = rotmat_to_rotvec(torch.as_tensor(np.swapaxes(R0, -1, -2) @ true_p)).numpy()
    e2 = (eps ** 2).sum(-1)
    s2 = est.laplace_sigma_rad.numpy() ** 2
    t = DEFAULT_POSE_TEMPERATURE
    out = {"run": str(args.run), "patterns": args.patterns, **est.to_dict(),
           "median_err_deg": float(np.degrees(np.median(np.sqrt(e2)))),
           "median_err_half_a_deg": float(np.median(np.degrees(geodesic_angle_numpy(est.rotations_a.numpy(), true_p)))),
           "truth_rms_per_axis_deg": float(np.degrees(np.sqrt(np.mean(np.sort(e2)[: int(0.95 * len(e2))]) / 3))),
           "median_laplace_sigma_deg": float(np.degrees(np.median(np.sqrt(s2)))),
           "median_err_field_cube_deg": float(np.median(np.degrees(geodesic_angle_numpy(est.rotations_f.numpy(),
                                                                                         true_p)))),
           "seconds": seconds}
    for p in (0.5, 0.9):
        c = stats.chi2.ppf(p, 3)
        out[f"coverage_{round(100 * p)}_default"] = float(np.mean(e2 <= c * t * t * s2))
        out[f"coverage_{round(100 * p)}_inflated"] = float(np.mean(e2 <= c * (t * t * s2 + est.sigma_rad ** 2)))
        out[f"coverage_{round(100 * p)}_noise_only"] = float(np.mean(e2 <= c * (t * t * s2 + est.noise_sigma_rad ** 2)))
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
