"""Robustness grid: particle size x photons per pattern x detector, default settings, no per-cell tuning.

For every cell: simulate ``--n-patterns`` patterns with bayes-spi's own simulator (exact NUFFT transform,
Poisson noise, lognormal fluence jitter, beam stop), report the speckle oversampling (field of view /
particle extent, from the structure), and unless the cell is undersampled (< 2) or ``--fit-undersampled``
is given, fit with the defaults (``bayes-spi fit`` settings, ``--epochs``) on one thread and record:
the truth-free verdict, the median orientation error (also modulo Rz(pi)), the wrong-mode fraction, the
speckle correlation with the true intensity after alignment, the speckle FSC 0.5 resolution and the
wall time. One JSON line per cell goes to ``OUT/results.jsonl`` (cells already there are skipped, so an
interrupted grid resumes) and a Markdown table to stdout.

Particles: 2CEX (~65 A extent), and asymmetric assemblies of randomly rotated 2CEX copies at random
positions (``benchmarks/make_assembly.py --layout random``): 4 copies in a ball of 50 A (~150 A extent) and
10 in a ball of 120 A (~300 A). (Symmetric layouts make the true orientations ambiguous up to the
approximate point group, which confounds the pose errors.) Detectors: the papers' reference geometry
binned to 32x32, 64x64 and 128x128 (field of view 172, 345, 690 A).

Example::

    python benchmarks/bench_robust.py --out bench_out/robust --cells 50:1e3:32 150:1e3:64 --epochs 2
    python benchmarks/bench_robust.py --out bench_out/robust            # the whole 27-cell grid (hours)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

SIZES = {"50": ("2CEX", None), "150": ("assembly", (4, 50.0)), "300": ("assembly", (10, 120.0))}
PHOTONS = ("1e2", "1e3", "1e4")
DETECTORS = ("32", "64", "128")


def structure_file(size: str, out: Path) -> str:
    kind, params = SIZES[size]
    if kind == "2CEX":
        return "2CEX"
    from make_assembly import assembly_positions, write_pdb

    copies, radius = params
    path = out / f"assembly_random_{copies}x{radius:.0f}.pdb"
    if not path.exists():
        e, p = assembly_positions(copies, radius, seed=1, layout="random")
        write_pdb(str(path), e, p)
    return str(path)


def extent_A(path: str) -> float:
    from bayes_spi.sim.structure import load_structure

    s = load_structure(path)
    p = np.concatenate([s.positions[e] for e in s.elements])
    sub = p[:: max(1, len(p) // 3000)]
    return float(np.linalg.norm(sub[:, None] - sub[None], axis=-1).max())


def run_cell(size: str, photons: str, det: str, args: argparse.Namespace) -> dict:
    import torch

    from bayes_spi.analysis.compare import compare_to_reference
    from bayes_spi.cli.fit import run_fit
    from bayes_spi.dataio.h5 import SPIDataset
    from bayes_spi.geometry import get_preset
    from bayes_spi.infer.evaluate import evaluate_run
    from bayes_spi.infer.outputs import field_on_grid
    from bayes_spi.infer.evaluate import load_field
    from bayes_spi.sim.simulate import simulate

    torch.set_num_threads(1)
    name = f"{size}A_{photons}_{det}px"
    cell = args.out / name
    cell.mkdir(parents=True, exist_ok=True)
    pdb = structure_file(size, args.out)
    geom = get_preset(f"reference-{det}")
    ext = extent_A(pdb)
    over = geom.field_of_view_A / ext
    row: dict = {"cell": name, "size_A": float(size), "extent_A": ext, "photons": float(photons), "detector": int(det),
                 "oversampling": over, "undersampled": bool(over < 2.0)}
    if over < 2.0 and not args.fit_undersampled:
        row["status"] = "undersampled (not fitted)"
        return row
    data = cell / "data.h5"
    if not data.exists():
        simulate(pdb, geom, args.n_patterns, data, artifacts="FPB", mean_photons=float(photons),
                 fluence_jitter="lognormal:0.3", truth_grid=65, seed=1, progress=False)
    t0 = time.perf_counter()
    given = {"epochs": args.epochs, "seed": 0, "log_every": 50, "checkpoint_every": 400, "device": "cpu",
             **{k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}}
    res = run_fit(data, cell / "run", given, force=True, grid=33, truth=False, progress=False, check_data=False)
    row["wall_s"] = time.perf_counter() - t0
    row["images_per_s"] = res["images_per_s"]
    row["verdict"] = res["verdict"].status
    row["verdict_reasons"] = res["verdict"].reasons
    row["gain_per_photon"] = res["verdict"].checks.get("gain_per_photon")
    ev = evaluate_run(cell / "run", data)
    for k in ("median_pose_error_deg", "median_pose_error_mod_rotz_deg", "wrong_mode_fraction"):
        row[k] = ev[k]
    with SPIDataset(data) as ds:
        I_true, dq = ds.truth_intensity()
        qn = ds.geometry.q_magnitudes()[ds.mask]
    field, _ = load_field(cell / "run" / "model.pt")
    n = I_true.shape[0]
    I_est, _ = field_on_grid(field, n, (n // 2) * dq)
    cmp = compare_to_reference(I_est, I_true, dq, min(float(qn.max()), (n // 2) * dq), q_min=float(qn.min()))
    row["speckle_corr"] = cmp.speckle_corr
    row["speckle_fsc_res_nm_0.5"] = cmp.speckle_fsc.resolution_nm(0.5)
    row["status"] = "fitted"
    return row


def table(rows: list[dict]) -> str:
    head = ("| cell | oversampling | verdict | median err (mod Rz pi) | wrong mode | speckle corr | wall s |\n"
            "|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if r.get("status") != "fitted":
            lines.append(f"| {r['cell']} | {r['oversampling']:.2f} | {r.get('status')} | | | | |")
            continue
        lines.append(f"| {r['cell']} | {r['oversampling']:.2f} | {r['verdict']} | {r['median_pose_error_deg']:.1f} "
                     f"({r['median_pose_error_mod_rotz_deg']:.1f}) | {100 * r['wrong_mode_fraction']:.0f}% | "
                     f"{r['speckle_corr']:.3f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cells", nargs="*", default=None, help="SIZE:PHOTONS:DETECTOR, e.g. 50:1e3:32 (default: all)")
    ap.add_argument("--n-patterns", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--fit-undersampled", action="store_true")
    ap.add_argument("--set", nargs="*", default=[], help="extra fit settings KEY=JSON, e.g. field='\"hybrid\"'")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cells = ([tuple(c.split(":")) for c in args.cells] if args.cells else
             [(s, p, d) for s in SIZES for p in PHOTONS for d in DETECTORS])
    path = args.out / "results.jsonl"
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            done[r["cell"]] = r
    rows = []
    for size, photons, det in cells:
        name = f"{size}A_{photons}_{det}px"
        if name in done:
            rows.append(done[name])
            continue
        print(f"cell {name} ...", flush=True)
        row = run_cell(size, photons, det, args)
        rows.append(row)
        with open(path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        print(json.dumps(row), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
