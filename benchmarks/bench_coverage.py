"""Calibration benchmark: export a run's posterior with truth and report the coverage of its credible regions.

Runs the netCDF export (``bayes-spi posterior``) on a slice of a simulated data file and prints the
fraction of patterns whose (globally aligned) true pose lies inside the 50% / 90% credible cones, and the
same for the fluence scale, with the time taken. ``--calibrate`` also prints the pose and scale temperatures that
would make each level nominal on this slice (:mod:`bayes_spi.posterior.calibration`) and writes them to
``calibration.json``: calibrate on one
slice, then check it with ``--pose-temperature`` / ``--scale-temperature`` on another slice.

Usage::

    .venv/bin/python benchmarks/bench_coverage.py bench_out/s32/run bench_out/s32/data.h5 \\
        --first 0 --max-patterns 512 --pose-temperature 1 --calibrate --out /tmp/cov_cal
    .venv/bin/python benchmarks/bench_coverage.py bench_out/s32/run bench_out/s32/data.h5 \\
        --first 512 --max-patterns 1536 --out /tmp/cov_s32
    .venv/bin/python benchmarks/bench_coverage.py bench_out/s32/run bench_out/s32/data.h5 --no-refine \\
        --max-patterns 1024 --out /tmp/cov_guide
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bayes_spi.dataio.h5 import SPIDataset
from bayes_spi.infer.load import load_trained
from bayes_spi.posterior.calibration import fit_temperatures, save_calibration
from bayes_spi.posterior.coverage import coverage_from_netcdf, format_coverage
from bayes_spi.posterior.netcdf import (
    DEFAULT_POSE_TEMPERATURE,
    DEFAULT_SCALE_TEMPERATURE,
    ExportSettings,
    write_posterior_netcdf,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_coverage"))
    ap.add_argument("--first", type=int, default=0, help="first pattern index")
    ap.add_argument("--max-patterns", type=int, default=2000)
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--no-refine", action="store_true", help="the amortized guide's posterior as trained")
    ap.add_argument("--n-refine", type=int, default=2)
    ap.add_argument("--pose-temperature", type=float, default=None,
                    help=f"default {DEFAULT_POSE_TEMPERATURE} with refinement, 1 without")
    ap.add_argument("--scale-temperature", type=float, default=None,
                    help=f"default {DEFAULT_SCALE_TEMPERATURE} with refinement, 1 without")
    ap.add_argument("--calibrate", action="store_true", help="print and store the pose temperature of this slice")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    refine = not args.no_refine
    temp = args.pose_temperature if args.pose_temperature is not None else (DEFAULT_POSE_TEMPERATURE if refine else 1.0)
    settings = ExportSettings(n_draws=args.draws, batch_size=args.batch_size, refine=refine, n_refine=args.n_refine,
                              pose_temperature=temp, scale_temperature=args.scale_temperature,
                              max_patterns=args.max_patterns, first_pattern=args.first)
    trained = load_trained(args.run)
    nc = args.out / "posterior.nc"
    t0 = time.perf_counter()
    with SPIDataset(args.data) as ds:
        write_posterior_netcdf(trained, ds, nc, settings)
        n = len(settings.pattern_range(ds.n_patterns))
    wall = time.perf_counter() - t0
    cov = coverage_from_netcdf(nc, args.data)
    cov.update({"run": str(args.run), "data": str(args.data), "first_pattern": args.first, "export_s": wall,
                "patterns_per_s": n / wall, "n_draws": args.draws})
    print(f"{args.run}  patterns {args.first}..{args.first + n - 1}  refine={refine}  temperatures: pose "
          f"{settings.pose_temperature} scale {settings.scale_temperature}")
    print(format_coverage(cov))
    print(f"  export {wall:.0f} s ({n / wall:.1f} patterns/s)")
    if args.calibrate:
        cal = fit_temperatures(nc, args.data)
        cal.update({"run": str(args.run), "first_pattern": args.first, "refine": refine})
        print("  calibration: " + ", ".join(f"{k} {v:.3f}" for k, v in cal.items() if "temperature" in k))
        save_calibration(args.out / "calibration.json", cal)
        cov["calibration"] = cal
    cov.pop("G", None)
    (args.out / "coverage.json").write_text(json.dumps(cov, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
