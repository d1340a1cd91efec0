"""Does the half-merge estimate of the field's pose error (bayes_spi.posterior.fielderror) match the truth?

For a fitted run on simulated data: the default export's refined posterior (cube, two hypotheses) of the first
``--patterns`` patterns; ``--probes`` of them held out, the rest merged in two random halves at their posterior
poses; every probe refined on each half's cube, and on the fitted field's cube of the same size. Printed beside the
truth (after the global alignment, modulo nothing): each pose's median error, the posterior's Laplace spread, the
half-merge ``sigma_field``, and the 50 / 90% cone coverage of the probes' best hypothesis (a Gaussian tangent cone:
``|eps| <= sigma sqrt(chi2_3(p))`` in per-axis units) with the default temperature alone and with ``sigma_field``
added.

Example::

    python benchmarks/bench_field_error.py RUN RUN/../data.h5 --patterns 4000 --probes 400
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from bayes_spi.dataio.h5 import SPIDataset
from bayes_spi.infer.load import load_trained
from bayes_spi.metrics import align_rotations
from bayes_spi.posterior.fielderror import HalfMerge, estimate_field_pose_error, split_halves
from bayes_spi.posterior.local import refine_on_cache
from bayes_spi.posterior.netcdf import DEFAULT_POSE_TEMPERATURE, ExportSettings, export_log_cube, guide_batches
from bayes_spi.so3 import geodesic_angle_numpy, rotmat_to_rotvec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--patterns", type=int, default=4000)
    ap.add_argument("--probes", type=int, default=400)
    ap.add_argument("--grid", type=int, default=0, help="merge cube voxels per side (0: the fit's search cube)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    trained = load_trained(args.run)
    model, guide = trained.model, trained.guide
    n_grid = args.grid or int(getattr(getattr(guide, "search", None), "cache_grid", 41))
    with SPIDataset(args.data) as ds:
        n = min(args.patterns, ds.n_patterns)
        settings = ExportSettings(max_patterns=n)
        R_best, ls_best, sig = np.zeros((n, 3, 3)), np.zeros(n), np.zeros(n)
        for idx, _, post in guide_batches(trained, ds, settings):
            k = post.weights.argmax(-1)
            b = torch.arange(k.numel())
            R_best[idx] = post.rotations[b, k].double().numpy()
            ls_best[idx] = post.log_scale_loc[b, k].double().numpy()
            cov = post.pose_tril[b, k] @ post.pose_tril[b, k].transpose(-1, -2)
            sig[idx] = (cov.diagonal(dim1=-2, dim2=-1).sum(-1) / 3).sqrt().double().numpy()
        t_export = time.perf_counter() - t0
        good = torch.nonzero(guide.mask.reshape(-1).cpu() & torch.as_tensor(ds.mask.reshape(-1))).squeeze(-1)
        q, log_w = model.q[good].double(), model.log_pixel_factor[good].double()
        probes, half_a, half_b = split_halves(n, args.probes, seed=0)
        merges = []
        t1 = time.perf_counter()
        for half in (half_a, half_b):
            m = HalfMerge(n_grid, model.q_max, q, log_w)
            for j in range(0, len(half), 256):
                sel = half[j:j + 256]
                y = torch.as_tensor(ds.read(sel)).reshape(len(sel), -1)[:, good]
                m.add(y, torch.as_tensor(R_best[sel]), torch.as_tensor(ls_best[sel]))
            merges.append(m.log_cube())
        t_merge = time.perf_counter() - t1
        y_p = torch.as_tensor(ds.read(probes)).reshape(len(probes), -1)[:, good].double()
        R_true = ds.truth_rotations()[:n]
    t2 = time.perf_counter()
    est = estimate_field_pose_error(merges[0], merges[1], q, log_w, y_p, torch.as_tensor(R_best[probes]), model.q_max)
    t_est = time.perf_counter() - t2
    cube_f = export_log_cube(model.field, n_grid, model.q_max).double()
    R_f = refine_on_cache(cube_f, torch.as_tensor(R_best[probes])[:, None], q, log_w, y_p, model.q_max,
                          n_iter=6).rotations[:, 0].numpy()
    G, _, _ = align_rotations(R_best, R_true)
    true_p = G.T @ R_true[probes]

    def err(R: np.ndarray) -> np.ndarray:
        return np.degrees(geodesic_angle_numpy(R, true_p))

    e_best, e_f, e_a, e_b = err(R_best[probes]), err(R_f), err(est.rotations_a.numpy()), err(est.rotations_b.numpy())
    # tangent error of the best hypothesis in per-axis sigmas; Gaussian cones: |eps|^2 / sigma^2 <= chi2_3(p)
    eps = rotmat_to_rotvec(torch.as_tensor(np.swapaxes(R_best[probes], -1, -2) @ true_p)).numpy()
    e2 = (eps ** 2).sum(-1)
    s2 = sig[probes] ** 2
    out = {"run": str(args.run), "patterns": n, "probes": len(probes), "merge_grid": n_grid,
           "median_err_export_deg": float(np.median(e_best)), "median_err_field_cube_deg": float(np.median(e_f)),
           "median_err_half_a_deg": float(np.median(e_a)), "median_err_half_b_deg": float(np.median(e_b)),
           "median_laplace_sigma_deg": float(np.degrees(np.median(sig[probes]))),
           "median_laplace_sigma_tempered_deg": float(np.degrees(np.median(sig[probes])) * DEFAULT_POSE_TEMPERATURE),
           "truth_rms_err_per_axis_deg": float(np.degrees(np.sqrt(np.median(e2) / stats.chi2.ppf(0.5, 3)))),
           **est.to_dict()}
    for p in (0.5, 0.9):
        c = stats.chi2.ppf(p, 3)
        t = DEFAULT_POSE_TEMPERATURE
        out[f"coverage_{round(100 * p)}_default"] = float(np.mean(e2 <= c * t * t * s2))
        out[f"coverage_{round(100 * p)}_inflated"] = float(np.mean(e2 <= c * (t * t * s2 + est.sigma_rad ** 2)))
    out.update({"export_s": t_export, "merge_s": t_merge, "estimate_s": t_est})
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
