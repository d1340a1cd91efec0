"""Exact-iteration variants from one trained model: the stochastic stages once, the exact EMC iterations many ways.

The exact iterations (:mod:`bayes_spi.infer.polish`) are the last stage of a fit; comparing their settings on
fits trained separately mixes in the training's own variation. ``train`` runs a fit's stochastic stages once
with the data-derived defaults and ``polish_iterations = 0`` (its settings saved to ``RUN/cfg.json``);
``polish`` copies that run directory to ``OUT`` and resumes it with the given exact-iteration settings, printing
one JSON line per iteration with the speckle correlation against ``/truth/intensity`` (after alignment) over the
scored q range and inside its inner 0.4 and 0.25, then the truth-free verdict. ``poses`` prints the orientation
errors of the first ``N`` patterns on a run's field (after the best global rotation), twice: at the grid argmax (a
crude estimate that overstates the Rz(pi) twins, 17% against 2% on the 269 A cell, BENCHMARKS.md ninth session)
and at the pose the refined merge takes (the two best grid rotations and their twins refined on the field's cube,
the best Laplace evidence wins: ``refined_*``), with the field's own preference of the true pose over its twin
(both refined: ``field_llr_true_vs_twin_median``, ``field_prefers_twin``) and the Laplace width of the refined
pose (``refined_laplace_sigma_deg``, what the field says the error should be); ``refined_c2f_*``: the same with the
refinement first on the inner half of ``|q|`` (``EMCPolish.refine_coarse``).

Example::

    python benchmarks/bench_polish_variants.py train data.h5 runs/base
    python benchmarks/bench_polish_variants.py polish data.h5 runs/base runs/annealed 0.04 4 polish_refined=2
    python benchmarks/bench_polish_variants.py poses data.h5 runs/annealed 300
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["score", "train", "polish", "poses"]


def score(trainer: Any, ds: Any) -> dict[str, float]:
    """Speckle correlation of the trainer's field with ``/truth/intensity`` over the scored q range (``"1.0"``) and
    inside its inner 0.4 and 0.25 (``compare_to_reference``: aligned, shells standardised)."""
    from bayes_spi.analysis.compare import compare_to_reference
    from bayes_spi.infer.outputs import field_on_grid

    I_true, dq = ds.truth_intensity()
    qn = ds.geometry.q_magnitudes()[ds.mask]
    n = I_true.shape[0]
    trainer.model.eval()
    with torch.no_grad():
        I_est, _ = field_on_grid(trainer.model.field, n, (n // 2) * dq)
    q_lo, q_top = float(qn.min()), min(float(qn.max()), (n // 2) * dq)
    return {str(f): round(compare_to_reference(I_est, I_true, dq, q_lo + f * (q_top - q_lo), q_min=q_lo).speckle_corr, 4)
            for f in (1.0, 0.4, 0.25)}


def _settings(items: list[str]) -> dict[str, Any]:
    return {k: json.loads(v) for k, v in (s.split("=", 1) for s in items)}


def train(data: Path, run: Path, extra: dict[str, Any]) -> None:
    """The stochastic stages of a default fit (data-derived settings), no exact iterations."""
    import pyro

    from bayes_spi.dataio.h5 import SPIDataset
    from bayes_spi.infer.autoset import data_settings
    from bayes_spi.infer.config import FitConfig
    from bayes_spi.infer.trainer import Trainer

    given = {"epochs": 2, "seed": 0, "log_every": 50, "checkpoint_every": 400, "device": "cpu", **extra}
    ds = SPIDataset(data)
    cfg, sampling = data_settings(ds, FitConfig(**given), given)
    print(sampling.summary(), flush=True)
    run.mkdir(parents=True, exist_ok=True)
    (run / "cfg.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    pyro.set_rng_seed(cfg.seed)
    t0 = time.perf_counter()
    tr = Trainer(ds, dataclasses.replace(cfg, polish_iterations=0), run, progress=False)
    tr.fit()
    tr.save_checkpoint()
    print(json.dumps({"stage": "trained", "wall_s": round(time.perf_counter() - t0), **score(tr, ds)}), flush=True)


def polish(data: Path, run: Path, out: Path, beta: float, iterations: int, extra: dict[str, Any]) -> None:
    """Copy ``run`` to ``out`` and run ``iterations`` exact iterations with ``polish_beta = beta`` (and ``extra``)."""
    from bayes_spi.dataio.h5 import SPIDataset
    from bayes_spi.infer.config import FitConfig
    from bayes_spi.infer.trainer import Trainer
    from bayes_spi.infer.verdict import assess_fit

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(run, out)
    cfg = FitConfig(**json.loads((run / "cfg.json").read_text()))
    cfg = dataclasses.replace(cfg, polish_iterations=iterations, polish_beta=beta, **extra)
    (out / "cfg.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    ds = SPIDataset(data)
    tr = Trainer(ds, cfg, out, progress=False)
    t0 = time.perf_counter()

    def on_step(st: Any) -> None:
        print(json.dumps({"iteration": st.polished, "wall_s": round(time.perf_counter() - t0), **score(tr, ds)}),
              flush=True)

    tr.fit(resume=True, on_step=on_step)
    v = assess_fit(tr)
    print(json.dumps({"verdict": v.status, "reasons": v.reasons, "wall_s": round(time.perf_counter() - t0)}),
          flush=True)


def poses(data: Path, run: Path, n: int) -> None:
    """Grid-argmax and refined-merge orientations of the first ``n`` patterns on the run's field against the truth
    (module docstring)."""
    from bayes_spi.dataio.h5 import SPIDataset
    from bayes_spi.guides.search import grid_log_lambda
    from bayes_spi.infer.config import FitConfig
    from bayes_spi.infer.outputs import field_log_cache
    from bayes_spi.infer.polish import EMCPolish
    from bayes_spi.infer.trainer import Trainer
    from bayes_spi.metrics import orientation_error_summary
    from bayes_spi.models.fields import SirenVoxelField
    from bayes_spi.posterior.local import refine_on_cache
    from bayes_spi.so3 import rotz_pi

    if (run / "cfg.json").is_file():
        cfg = FitConfig(**json.loads((run / "cfg.json").read_text()))
    else:  # a run made by ``bayes-spi fit`` or ``bench_robust.py``: its model file's config
        from bayes_spi.infer.load import read_model_file

        cfg = read_model_file(run)[2]
    ds = SPIDataset(data)
    tr = Trainer(ds, cfg, run, progress=False)
    tr.fit(resume=True)  # loads the checkpoint; a finished run does no more work
    m = tr.model.eval()
    f = m.field
    nv = f.n_voxel if isinstance(f, SirenVoxelField) else f.n
    pix = torch.nonzero(tr._good.reshape(-1)).squeeze(-1)
    with torch.no_grad():
        cache = field_log_cache(f, nv, m.q_max)
        log_lam = grid_log_lambda(cache, tr.emc.rotations, m.q[pix], m.log_pixel_factor[pix], m.q_max, chunk=512)
        y = torch.as_tensor(ds.read(np.arange(n))).reshape(n, -1)[:, pix].to(log_lam.dtype)
        ll = y @ log_lam.T - y.sum(-1, keepdim=True) * torch.logsumexp(log_lam, -1)  # (n, G) profiled
        best = ll.argmax(-1)
    R_true = ds.truth_rotations(slice(0, n))
    s = orientation_error_summary(tr.emc.rotations[best].numpy(), R_true)
    out = {k: round(float(v), 3) for k, v in s.items() if np.isscalar(v)}
    out["within_15_deg"] = round(float(np.mean(s["errors_deg"] <= 15)), 3)
    out["within_15_deg_mod_rotz_pi"] = round(float(np.mean(s["errors_mod_rotz_pi_deg"] <= 15)), 3)
    # the refined merge's choice (EMCPolish._refined_modes: 2 best grid rotations and their twins, refined)
    pol = EMCPolish(m, tr.emc.rotations, cache_grid=nv)
    q, lw = m.q[pix], m.log_pixel_factor[pix]
    rz = rotz_pi(dtype=q.dtype)
    starts = tr.emc.rotations[ll.topk(2, -1).indices]
    starts = torch.cat([starts, starts @ rz], 1)  # (n, 4, 3, 3)
    step = math.degrees(0.5 * pol.spacing)
    inner = q.norm(dim=-1) < 0.5 * q.norm(dim=-1).max()
    for tag, coarse in (("refined", False), ("refined_c2f", True)):  # one stage; inner half of |q| first
        chosen, sigma = [], []
        for a in range(0, n, 32):
            begin = starts[a:a + 32]
            if coarse:
                begin = refine_on_cache(cache, begin, q[inner], lw[inner], y[a:a + 32][:, inner], m.q_max,
                                        n_iter=pol.refine_iterations, max_step_deg=step).rotations
            mo = refine_on_cache(cache, begin, q, lw, y[a:a + 32], m.q_max, n_iter=pol.refine_iterations,
                                 max_step_deg=step)
            k = mo.log_evidence.argmax(-1)
            rows = torch.arange(len(k))
            chosen.append(mo.rotations[rows, k])
            sigma.append(mo.sigmas[rows, k].norm(dim=-1))
        rr = orientation_error_summary(torch.cat(chosen).numpy(), R_true)
        out[f"{tag}_median_error_deg"] = round(float(rr["median_error_deg"]), 3)
        out[f"{tag}_median_error_mod_rotz_pi_deg"] = round(float(rr["median_error_mod_rotz_pi_deg"]), 3)
        out[f"{tag}_p90_error_mod_rotz_pi_deg"] = round(float(np.percentile(rr["errors_mod_rotz_pi_deg"], 90)), 3)
        out[f"{tag}_wrong_mode_fraction"] = round(float(rr["wrong_mode_fraction"]), 4)
        out[f"{tag}_laplace_sigma_deg"] = round(math.degrees(float(torch.cat(sigma).median())), 3)
        if not coarse:
            r = rr
    # the field's own preference: the true pose (in the fit's frame) against its twin, both refined
    R_fit = torch.as_tensor(r["G_mod_rotz_pi"].T @ R_true, dtype=q.dtype)
    pair = torch.stack([R_fit, R_fit @ rz], 1)
    llr = torch.cat([(lambda mo: mo.loglik[:, 0] - mo.loglik[:, 1])(
        refine_on_cache(cache, pair[a:a + 32], q, lw, y[a:a + 32], m.q_max, n_iter=6, max_step_deg=4.0))
        for a in range(0, n, 32)])
    out["field_llr_true_vs_twin_median"] = round(float(llr.median()), 2)
    out["field_prefers_twin"] = round(float((llr < 0).double().mean()), 4)
    print(json.dumps(out), flush=True)


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if len(argv) >= 3 and argv[0] == "train":
        train(Path(argv[1]), Path(argv[2]), _settings(argv[3:]))
    elif len(argv) >= 6 and argv[0] == "polish":
        polish(Path(argv[1]), Path(argv[2]), Path(argv[3]), float(argv[4]), int(argv[5]), _settings(argv[6:]))
    elif len(argv) == 4 and argv[0] == "poses":
        poses(Path(argv[1]), Path(argv[2]), int(argv[3]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
