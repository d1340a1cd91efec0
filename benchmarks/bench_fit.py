"""Foundation benchmark: simulate 2CEX, fit it on the CPU under a time budget, print the figures.

Simulates ``--n-patterns`` patterns of 2CEX (the packaged structure) on the binned reference
geometry (``--size`` 32 or 64 pixels), about ``--photons`` photons per pattern, artifacts F (lognormal
fluence jitter 0.3) and P (Poisson), then runs ``bayes-spi fit`` in-process for at most ``--minutes``
and evaluates against the truth. Prints one JSON object with images/s, wall time, peak memory (RSS),
median/mean orientation error (raw and modulo the Rz(pi) two-fold ambiguity, after the best global
rotation), fluence correlation and intensity correlation. Record results in BENCHMARKS.md.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_fit.py --size 32 --minutes 30 --out bench_out/s32
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from bayes_spi.dataio.h5 import SPIDataset
from bayes_spi.infer.config import FitConfig
from bayes_spi.infer.evaluate import evaluate_run
from bayes_spi.infer.rundir import setup_logging, write_config
from bayes_spi.infer.trainer import Trainer
from bayes_spi.sim.simulate import simulate

ROOT = Path(__file__).resolve().parents[1]
PDB = "2CEX"  # the packaged structure (bayes_spi/resources): nothing outside the repository


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=32, choices=(32, 64, 128))
    ap.add_argument("--n-patterns", type=int, default=None, help="default: what the time budget can use")
    ap.add_argument("--photons", type=float, default=1e4)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out")
    ap.add_argument("--fit", type=json.loads, default={}, help="JSON dict of FitConfig overrides")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data.h5"
    n = args.n_patterns or (50_000 if args.size == 32 else 15_000)
    t0 = time.perf_counter()
    if not data.exists():
        simulate(PDB, f"reference-{args.size}", n, data, artifacts="FP", mean_photons=args.photons,
                 fluence_jitter="lognormal:0.3", seed=args.seed, truth_grid=65, progress=False)
    t_sim = time.perf_counter() - t0

    cfg = FitConfig(**{"epochs": args.epochs, "max_minutes": args.minutes, "seed": args.seed, **args.fit})
    run = out / "run"
    run.mkdir(exist_ok=True)
    ds = SPIDataset(data)
    write_config(run, cfg, data, sys.argv)
    setup_logging(run)
    trainer = Trainer(ds, cfg, run, progress=False)
    t1 = time.perf_counter()
    state = trainer.fit()
    t_fit = time.perf_counter() - t1
    trainer.save_outputs(grid=65)
    result = evaluate_run(run, data)
    result.update({
        "size": args.size, "n_patterns_in_file": n, "images_seen": state.images_seen, "steps": state.step,
        "fit_wall_s": round(t_fit, 1), "simulate_wall_s": round(t_sim, 1),
        "images_per_s": round(state.images_seen / max(t_fit, 1e-9), 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''} threads={torch.get_num_threads()}".strip(),
        "torch": torch.__version__, "config": cfg.to_dict(),
    })
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
