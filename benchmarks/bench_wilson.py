"""Wilson prior benchmark: the foundation benchmark at low fluence, without and with the Wilson prior.

Simulates ``--n-patterns`` patterns of 2CEX on the binned reference geometry (``--size``), about
``--photons`` photons per pattern (default 1e3, the low-fluence regime where a prior should matter),
artifacts F (lognormal fluence jitter 0.3) and P (Poisson), then fits each variant for at most
``--minutes`` (each) from the same data and seed:

- ``none``: the default model (SIREN field, no intensity prior);
- ``wilson``: the same plus the Wilson prior factor (use (a), ``--wilson`` JSON: the spec of
  :func:`bayes_spi.models.intensity_priors.make_intensity_prior`);
- ``variational``: the variational amplitude field (use (b), ``--variational`` JSON: keyword arguments of
  :func:`bayes_spi.models.variational_field.make_variational_field`); also writes ``intensity_sd.mrc``.

Models are built in Python (:func:`bayes_spi.infer.build.build_model_and_guide`, then the prior or the
field swapped in) and trained by :class:`bayes_spi.infer.trainer.Trainer`. For each variant it prints
median/mean orientation error (raw and modulo Rz(pi), after the best global rotation), the intensity
FSC resolution at 0.5 and 0.143 (nm; :func:`bayes_spi.analysis.fsc.intensity_fsc` within the detector's
``q_max``, field sampled at ``G^T q``), the same for the "speckle" FSC (amplitudes with each shell's mean
removed: the plain intensity FSC is dominated by the radial profile and stays above 0.5 even for a barely
trained field), intensity correlations, images/s. One JSON object per variant goes
to ``OUT/<variant>/result.json``, all of them to ``OUT/results.json``. Record results in BENCHMARKS.md.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_wilson.py --size 32 --photons 1e3 --minutes 20 --out bench_out/wilson
    .venv/bin/python benchmarks/bench_wilson.py --variants none,wilson --wilson '{"name": "wilson", "weight": 0.3}'
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyro
import torch

from bayes_spi.analysis.fsc import ball_mask, intensity_fsc
from bayes_spi.dataio.h5 import SPIDataset, quaternions_to_rotations
from bayes_spi.infer.build import build_model_and_guide, detector_tensors
from bayes_spi.infer.config import FitConfig
from bayes_spi.infer.outputs import field_on_grid
from bayes_spi.infer.rundir import setup_logging, write_config
from bayes_spi.infer.trainer import Trainer
from bayes_spi.metrics import intensity_correlation, orientation_error_summary
from bayes_spi.models.intensity_priors import make_intensity_prior
from bayes_spi.models.variational_field import make_variational_field
from bayes_spi.sim.simulate import simulate

ROOT = Path(__file__).resolve().parents[1]
PDB = "2CEX"  # the packaged structure (bayes_spi/resources): nothing outside the repository
VARIANTS = ("none", "wilson", "variational")


def build_variant(dataset: SPIDataset, cfg: FitConfig, variant: str, wilson: dict[str, Any],
                  variational: dict[str, Any]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Model and guide for one variant (CPU): the default construction, given the variant's field or prior."""
    pyro.set_rng_seed(cfg.seed)
    q, _, _ = detector_tensors(dataset.geometry)
    q_max = float(q.norm(dim=-1).max())
    field = None
    if variant == "variational":
        kw = {"width": cfg.field_width, "depth": cfg.field_depth, "w0": cfg.field_w0, **variational}
        field = make_variational_field(q_max, **kw)
    elif variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {list(VARIANTS)}, got {variant!r}")
    model, guide = build_model_and_guide(dataset.geometry, cfg, "cpu", field=field)
    if variant == "wilson":
        model.intensity_prior = make_intensity_prior(wilson, q_max)
    return model, guide


def evaluate(run: Path, model: torch.nn.Module, data: Path, q_max: float) -> dict[str, float]:
    """Orientation errors from ``run/posterior.h5`` and intensity FSC / correlations of ``model.field``."""
    with h5py.File(run / "posterior.h5", "r") as f:
        R_est = quaternions_to_rotations(np.asarray(f["pose_quaternion"][()], dtype=np.float64))
    with SPIDataset(data) as ds:
        R_true = ds.truth_rotations()
        I_true, voxel = ds.truth_intensity()
    summ = orientation_error_summary(R_est, R_true)
    n = I_true.shape[0]
    G = np.asarray(summ["G_mod_rotz_pi"], dtype=np.float64)
    I_est, _ = field_on_grid(model.field, n, (n // 2) * voxel, rotation=G.T)
    sphere = ball_mask(n, voxel, q_max)
    out = {
        "median_pose_error_deg": summ["median_error_deg"],
        "mean_pose_error_deg": summ["mean_error_deg"],
        "median_pose_error_mod_rotz_deg": summ["median_error_mod_rotz_pi_deg"],
        "mean_pose_error_mod_rotz_deg": summ["mean_error_mod_rotz_pi_deg"],
        "wrong_mode_fraction": summ["wrong_mode_fraction"],
        "intensity_corr": intensity_correlation(I_est, I_true, mask=sphere, transform="none"),
        "log_intensity_corr": intensity_correlation(I_est, I_true, mask=sphere, transform="log"),
    }
    q_top = min(q_max, (n // 2) * voxel)
    curve = intensity_fsc(I_est, I_true, voxel, q_max=q_top, mask=sphere)
    # the same with each shell's mean removed: the speckle alone (the plain intensity FSC is dominated by the
    # radial profile, which any field learns)
    centred = intensity_fsc(I_est, I_true, voxel, q_max=q_top, mask=sphere, speckle=True)
    out.update({
        "speckle_fsc_res_nm_0.5": centred.resolution_nm(0.5),
        "speckle_fsc_crosses_0.5": float(centred.crosses(0.5)),
        "speckle_fsc_res_nm_0.143": centred.resolution_nm(0.143),
        "intensity_fsc_res_nm_0.5": curve.resolution_nm(0.5),
        "intensity_fsc_crosses_0.5": float(curve.crosses(0.5)),
        "intensity_fsc_res_nm_0.143": curve.resolution_nm(0.143),
        "intensity_fsc_crosses_0.143": float(curve.crosses(0.143)),
        "detector_res_nm": 0.1 / q_max,
    })
    return out


def run_variant(variant: str, data: Path, out: Path, cfg: FitConfig, wilson: dict[str, Any],
                variational: dict[str, Any], argv: list[str]) -> dict[str, Any]:
    run = out / variant
    run.mkdir(parents=True, exist_ok=True)
    ds = SPIDataset(data)
    write_config(run, cfg, data, argv)
    setup_logging(run)
    model, guide = build_variant(ds, cfg, variant, wilson, variational)
    trainer = Trainer(ds, cfg, run, progress=False, model=model, guide=guide)
    t0 = time.perf_counter()
    state = trainer.fit()
    t_fit = time.perf_counter() - t0
    t1 = time.perf_counter()
    trainer.save_outputs(grid=65)  # a variational field's intensity_sd.mrc too
    t_export = time.perf_counter() - t1
    result: dict[str, Any] = {"variant": variant}
    result.update(evaluate(run, model, data, trainer._q_max))
    result.update({
        "images_seen": state.images_seen, "steps": state.step, "fit_wall_s": round(t_fit, 1),
        "export_wall_s": round(t_export, 1), "images_per_s": round(state.images_seen / max(t_fit, 1e-9), 1),
        "spec": wilson if variant == "wilson" else (variational if variant == "variational" else {}),
    })
    (run / "result.json").write_text(json.dumps(result, indent=2, default=str))
    ds.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=32, choices=(32, 64, 128))
    ap.add_argument("--n-patterns", type=int, default=30000)
    ap.add_argument("--photons", type=float, default=1e3)
    ap.add_argument("--minutes", type=float, default=20.0, help="time budget per variant")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "wilson")
    ap.add_argument("--fit", type=json.loads, default={}, help="JSON dict of FitConfig overrides (all variants)")
    ap.add_argument("--wilson", type=json.loads, default={"name": "wilson", "weight": 1.0, "sigma": "learned",
                                                          "diameter_A": 72.0, "n_points": 1024},
                    help="JSON intensity-prior spec for the 'wilson' variant")
    ap.add_argument("--variational", type=json.loads, default={"grid": 33, "prior": {"sigma": "learned"}},
                    help="JSON keyword arguments of make_variational_field for the 'variational' variant")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = sorted(set(variants) - set(VARIANTS))
    if bad:
        ap.error(f"--variants: expected names from {list(VARIANTS)}, got {bad}")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data.h5"
    t0 = time.perf_counter()
    if not data.exists():
        simulate(PDB, f"reference-{args.size}", args.n_patterns, data, artifacts="FP",
                 mean_photons=args.photons, fluence_jitter="lognormal:0.3", seed=args.seed, truth_grid=65,
                 progress=False)
    t_sim = time.perf_counter() - t0
    cfg = FitConfig(**{"epochs": args.epochs, "max_minutes": args.minutes, "seed": args.seed, **args.fit})
    results = []
    for variant in variants:
        res = run_variant(variant, data, out, cfg, args.wilson, args.variational, sys.argv)
        print(json.dumps(res, default=str), flush=True)
        results.append(res)
    summary = {
        "size": args.size, "photons": args.photons, "n_patterns_in_file": args.n_patterns,
        "simulate_wall_s": round(t_sim, 1), "minutes_per_variant": args.minutes,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''} threads={torch.get_num_threads()}".strip(),
        "torch": torch.__version__, "config": cfg.to_dict(), "results": results,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    keys = ["median_pose_error_deg", "median_pose_error_mod_rotz_deg", "wrong_mode_fraction",
            "intensity_fsc_res_nm_0.5", "intensity_fsc_res_nm_0.143", "speckle_fsc_res_nm_0.5",
            "speckle_fsc_res_nm_0.143", "intensity_corr", "log_intensity_corr",
            "images_per_s", "images_seen"]
    print("\n| figure | " + " | ".join(r["variant"] for r in results) + " |")
    print("| --- |" + " --- |" * len(results))
    for k in keys:
        cells = [f"{r[k]:.4g}" if isinstance(r.get(k), (int, float)) else str(r.get(k, "n/a")) for r in results]
        print(f"| {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
