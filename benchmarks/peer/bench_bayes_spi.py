#!/usr/bin/env python
"""bayes-spi on a converted Dragonfly data set, scored like Dragonfly's EMC (`score_emc.py`) against wall time.

Runs the default pipeline (settings from the data, EMC warm start, SVI with the amortized guide) on one
thread, saving the field every ``--snapshot-every`` images with the training wall time (snapshots and
scoring are not timed), then scores every snapshot against ``/truth/intensity``: the field on the truth
grid, rotated onto the truth (``align_intensity_rotation``), and

* ``speckle_corr``: ``score_emc.speckle_corr`` (sqrt I, one-voxel shell means removed, Pearson), over the
  same voxels as for Dragonfly (beam-stop radius + 1 <= |q|/voxel <= inscribed circle), so the two
  programs' numbers are directly comparable;
* ``speckle_corr_std``: :func:`bayes_spi.analysis.compare.speckle_correlation` (each shell standardised).

Writes ``OUT/score.csv`` and prints a table. The truth-free verdict of the fit is printed at the end.

Example::

    .venv/bin/python benchmarks/peer/bench_bayes_spi.py --data /work/peer/h5/tmv190_20k.h5 --out /work/peer/bayes/tmv190 \\
        --epochs 2 --snapshot-every 2560
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--snapshot-every", type=int, default=2560, help="images between field snapshots")
    ap.add_argument("--set", nargs="*", default=[], help="extra FitConfig settings KEY=JSON")
    ap.add_argument("--r-min", type=float, default=4.0, help="voxels (Dragonfly: beam-stop radius + 1)")
    ap.add_argument("--r-max", type=float, default=None, help="voxels (default: the inscribed circle)")
    ap.add_argument("--score-only", action="store_true")
    ap.add_argument("--resume", action="store_true", help="continue a killed run from OUT/run/checkpoint.pt")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from bayes_spi.analysis.align import align_intensity_rotation, rotate_volume
    from bayes_spi.analysis.compare import speckle_correlation
    from bayes_spi.dataio.h5 import SPIDataset
    from bayes_spi.infer.autoset import data_settings
    from bayes_spi.infer.build import build_field
    from bayes_spi.infer.config import FitConfig
    from bayes_spi.infer.outputs import field_on_grid
    from bayes_spi.infer.trainer import Trainer
    from bayes_spi.infer.verdict import assess_fit
    from score_emc import radius, speckle_corr

    snaps = args.out / "snapshots"
    snaps.mkdir(parents=True, exist_ok=True)
    ds = SPIDataset(args.data)
    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    cfg = FitConfig(**{"epochs": args.epochs, "device": "cpu", "log_every": 40, "checkpoint_every": 10**6, **extra})
    cfg, rep = data_settings(ds, cfg, extra)
    print(rep.summary(), flush=True)
    (args.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    if not args.score_only:
        trainer = Trainer(ds, cfg, args.out / "run", progress=False)
        last = [0, -1]

        def snap(st) -> None:
            if (st.images_seen - last[0] >= args.snapshot_every or st.step >= trainer.total_steps) \
                    and (st.images_seen, st.polished) != tuple(last):
                last[:] = [st.images_seen, st.polished]
                torch.save({"field": trainer.model.field.state_dict(), "wall_s": st.elapsed_s,
                            "images": st.images_seen, "emc": trainer.in_emc(st.step - 1), "polished": st.polished},
                           snaps / f"snap_{st.images_seen:08d}_{st.polished}.pt")

        t0 = time.perf_counter()
        trainer.fit(resume=args.resume, on_step=snap)
        print(f"fit: {time.perf_counter() - t0:.0f} s wall, {trainer.state.images_seen} images", flush=True)
        verdict = assess_fit(trainer)
        print(verdict.summary(), flush=True)
        (args.out / "verdict.json").write_text(json.dumps(verdict.to_dict(), indent=1, default=str))

    truth, dq = ds.truth_intensity()
    n = truth.shape[0]
    geom = ds.geometry
    q = geom.q_vectors().reshape(-1, 3)
    mask = ds.mask.reshape(-1)
    det = geom.detector
    # the inscribed circle: the largest |q| of the pixels on the detector's central row/column edge
    r_max = args.r_max if args.r_max is not None else float(
        np.linalg.norm(geom.q_vectors()[det.n_y // 2, 0]) / dq)
    r = radius(n)
    rows = []
    q_max = float(np.linalg.norm(q[mask], axis=1).max())
    for path in sorted(snaps.glob("snap_*.pt")):
        ck = torch.load(path, map_location="cpu", weights_only=True)
        field = build_field(cfg, q_max)
        field.load_state_dict(ck["field"])
        vol, _ = field_on_grid(field, n, (n // 2) * dq)
        R = align_intensity_rotation(truth, vol, n_rotations=3000, r_min=args.r_min, r_max=r_max)
        aligned = rotate_volume(vol, R)
        stage = f"exact EMC {ck['polished']}" if ck.get("polished") else ("emc" if ck["emc"] else "svi")
        row = {"images": ck["images"], "wall_s": round(ck["wall_s"], 1), "stage": stage,
               "speckle_corr": speckle_corr(aligned, truth, r, args.r_min, r_max),
               "speckle_corr_outer": speckle_corr(aligned, truth, r, max(args.r_min, r_max / 2), r_max),
               "speckle_corr_std": speckle_correlation(aligned, truth, dq, r_max * dq, args.r_min * dq)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(args.out / "score.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("| images | wall s | stage | speckle corr (outer) | standardised |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['images']} | {row['wall_s']:.0f} | {row['stage']} | {row['speckle_corr']:.3f} "
              f"({row['speckle_corr_outer']:.3f}) | {row['speckle_corr_std']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
