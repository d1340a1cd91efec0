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

``--refine-on field cache`` exports the same slice refined on the trained field and on the cached ``log I``
cube side by side (one process, one thread with ``--threads 1``), each with its own default temperatures
unless given, and prints a comparison table: coverage, patterns per CPU-second of this thread
(``time.thread_time``) and by the wall clock, and the angle between the first path's mean poses and the
others'. ``cache:N`` uses a cube of ``N^3`` voxels; ``--calibration-from`` takes each path's temperatures
from a ``--calibrate`` run on another slice (a held-out check)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_coverage.py RUN RUN/data.h5 --max-patterns 512 \\
        --threads 1 --refine-on field cache cache:65 --calibrate --out /tmp/cov_b
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_coverage.py RUN RUN/data.h5 --first 512 \\
        --max-patterns 1024 --threads 1 --refine-on field cache cache:65 --calibration-from /tmp/cov_b --out /tmp/cov_c
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bayes_spi.dataio.h5 import SPIDataset
from bayes_spi.infer.load import load_trained
from bayes_spi.posterior.calibration import fit_temperatures, load_calibration, save_calibration
from bayes_spi.posterior.coverage import angles_rad, coverage_from_netcdf, format_coverage, read_summaries
from bayes_spi.posterior.netcdf import (
    DEFAULT_POSE_TEMPERATURE,
    DEFAULT_SCALE_TEMPERATURE,
    ExportSettings,
    export_cache_grid,
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
    ap.add_argument("--refine-on", nargs="+", type=_refine_on, default=["cache"],
                    help="what the refinement evaluates: field, cache (the export's default cube) or cache:N (a cube "
                         "of N^3 voxels); several: side by side, one subfolder of --out each")
    ap.add_argument("--calibration-from", type=Path, default=None,
                    help="an --out of a --calibrate run with the same --refine-on list: each path's temperatures")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    refine = not args.no_refine
    trained = load_trained(args.run)
    results: dict[str, dict[str, Any]] = {}
    for refine_on in args.refine_on:
        out = args.out / refine_on.replace(":", "") if len(args.refine_on) > 1 else args.out
        out.mkdir(parents=True, exist_ok=True)
        path, _, grid = refine_on.partition(":")
        pose_t, scale_t = args.pose_temperature, args.scale_temperature
        if args.calibration_from is not None:  # the temperatures calibrated for this path on another slice
            sub = args.calibration_from / out.relative_to(args.out)
            pose_t, scale_t = load_calibration(sub / "calibration.json")
        settings = ExportSettings(n_draws=args.draws, batch_size=args.batch_size, refine=refine,
                                  n_refine=args.n_refine, pose_temperature=pose_t, scale_temperature=scale_t,
                                  max_patterns=args.max_patterns,
                                  first_pattern=args.first, refine_on=path, cache_grid=int(grid) if grid else None)
        results[refine_on] = _one(args, trained, settings, out, refine)
    if len(results) > 1:
        _compare(args, results)
    return 0


def _refine_on(text: str) -> str:
    """``field``, ``cache`` or ``cache:N`` (``N`` odd >= 3)."""
    path, _, grid = text.partition(":")
    if path not in ("field", "cache") or (grid and (path != "cache" or not grid.isdigit() or int(grid) < 3
                                                   or int(grid) % 2 == 0)):
        raise argparse.ArgumentTypeError(f"expected field, cache or cache:N (N odd >= 3), got {text!r}")
    return text


def _one(args: argparse.Namespace, trained: Any, settings: ExportSettings, out: Path, refine: bool
         ) -> dict[str, Any]:
    """Export one slice with ``settings`` into ``out/posterior.nc``; coverage (and calibration) against the truth."""
    nc = out / "posterior.nc"
    t0, c0 = time.perf_counter(), time.thread_time()
    with SPIDataset(args.data) as ds:
        write_posterior_netcdf(trained, ds, nc, settings)
        n = len(settings.pattern_range(ds.n_patterns))
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    cov = coverage_from_netcdf(nc, args.data)
    cov.update({"run": str(args.run), "data": str(args.data), "first_pattern": args.first, "export_s": wall,
                "export_cpu_s": cpu, "patterns_per_s": n / wall, "patterns_per_cpu_s": n / cpu,
                "n_draws": args.draws, "refine_on": settings.refine_on, "posterior": str(nc)})
    cube = None
    if settings.refine and settings.refine_on == "cache":
        cube = settings.cache_grid if settings.cache_grid is not None else export_cache_grid(trained.guide)
    cov["cache_grid"] = cube
    grid = f" (cube {cube}^3)" if cube is not None else ""
    print(f"{args.run}  patterns {args.first}..{args.first + n - 1}  refine={refine} on {settings.refine_on}{grid}  "
          f"temperatures: pose {settings.pose_temperature} scale {settings.scale_temperature}")
    print(format_coverage(cov))
    print(f"  export {wall:.0f} s wall ({n / wall:.1f} patterns/s), {cpu:.1f} CPU-s of this thread "
          f"({n / cpu:.1f} patterns per CPU-s)", flush=True)
    if args.calibrate:
        cal = fit_temperatures(nc, args.data)
        cal.update({"run": str(args.run), "first_pattern": args.first, "refine": refine,
                    "refine_on": settings.refine_on})
        print("  calibration: " + ", ".join(f"{k} {v:.3f}" for k, v in cal.items() if "temperature" in k))
        save_calibration(out / "calibration.json", cal)
        cov["calibration"] = cal
    cov.pop("G", None)
    (out / "coverage.json").write_text(json.dumps(cov, indent=2) + "\n")
    return cov


def _compare(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> None:
    """Print the side-by-side table of :func:`_one`'s results and the mean poses' disagreement."""
    keys = [("pose 50/90 (%)", "pose_coverage_{}"), ("pose mod Rz(pi) 50/90 (%)", "pose_coverage_mod_rotz_{}"),
            ("fluence 50/90 (%)", "scale_coverage_{}")]
    print("\n| refine on | temperatures (pose / scale) | " + " | ".join(k for k, _ in keys)
          + " | median cone 50/90 (deg) | median pose error (deg) | patterns per CPU-s | patterns/s (wall) |")
    print("|" + " --- |" * (len(keys) + 6))
    for name, c in results.items():
        name = name if c["cache_grid"] is None else f"cache ({c['cache_grid']}^3)"
        cells = [f"{100 * c[f.format(50)]:.1f} / {100 * c[f.format(90)]:.1f}" for _, f in keys]
        print(f"| {name} | {c['pose_temperature']:g} / {c['scale_temperature']:g} | " + " | ".join(cells)
              + f" | {c['median_cone_radius_50_deg']:.2f} / {c['median_cone_radius_90_deg']:.2f}"
              + f" | {c['median_pose_error_deg']:.2f} | {c['patterns_per_cpu_s']:.1f} | {c['patterns_per_s']:.1f} |")
    names = list(results)
    a = read_summaries(results[names[0]]["posterior"], args.data)["mean_rotation"]
    for other in names[1:]:
        b = read_summaries(results[other]["posterior"], args.data)["mean_rotation"]
        ang = np.degrees(angles_rad(a, b))
        print(f"mean poses {names[0]} vs {other}: median {np.median(ang):.2f} deg, 90th percentile "
              f"{np.quantile(ang, 0.9):.2f} deg, over 5 deg {np.mean(ang > 5):.1%}")


if __name__ == "__main__":
    sys.exit(main())
