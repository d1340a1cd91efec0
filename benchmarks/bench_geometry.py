"""Per-pixel detector geometry in a fit: does the assembled encoder input cost anything, and does a multi-panel
detector with a gap, a tilted panel and an off-centre beam fit as well?

Three fits of 2CEX (1e4 photons, default settings, one thread), side by side in one run:

* ``grid``: the reference-32 detector as the flat grid (the CNN reads the raw 32 x 32 array);
* ``positions``: the same detector given by its pixel positions (``Geometry.from_positions``): the same ``q`` and
  pixel factors (to 1e-13), so the same simulated counts, but the encoder assembles the patterns in
  ``(q_x, q_y)`` (:mod:`bayes_spi.guides.encoder`);
* ``panels``: two 16 x 32 panels 2.5 pixels apart, the lower one tilted by 10 degrees, the beam 2.3 / 1.7 pixels
  off the middle (the layout of ``tests/test_cxi.py``), fitted from a CXI file in the CXIDB layout.

Per fit: the verdict, the median orientation error (mod Rz(pi)), the wrong-mode fraction, the speckle
correlation with the true intensity and the wall time; a Markdown table to stdout.

Example::

    python benchmarks/bench_geometry.py --out bench_out/geometry --n-patterns 4000 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np


def panels_geometry():  # noqa: ANN201 - a Geometry
    from bayes_spi.geometry import Geometry, Panel

    p, d = 0.1 / 32, 0.2
    t = math.radians(10.0)
    upper = Panel((18.3 * p, 18.95 * p, d), (-p, 0.0, 0.0), (0.0, -p, 0.0), n_fs=32, n_ss=16)
    lower = Panel((18.3 * p, 0.45 * p, d), (-p, 0.0, 0.0), (0.0, -p * math.cos(t), p * math.sin(t)), n_fs=32, n_ss=16)
    return Geometry.from_panels([upper, lower], photon_energy_ev=4600.0, name="two-panels")


def fit_one(name: str, data: Path, out: Path, epochs: int) -> dict:
    from bayes_spi.analysis.compare import compare_to_reference
    from bayes_spi.cli.fit import run_fit
    from bayes_spi.dataio.h5 import SPIDataset
    from bayes_spi.infer.evaluate import evaluate_run, load_field
    from bayes_spi.infer.outputs import field_on_grid

    t0 = time.perf_counter()
    given = {"epochs": epochs, "seed": 0, "log_every": 50, "checkpoint_every": 400, "device": "cpu"}
    res = run_fit(data, out / "run", given, force=True, grid=33, truth=False, progress=False, check_data=False)
    row: dict = {"fit": name, "wall_s": time.perf_counter() - t0, "verdict": res["verdict"].status}
    truth = out / "truth.h5" if (out / "truth.h5").exists() else data
    ev = evaluate_run(out / "run", truth)
    for key in ("median_pose_error_deg", "median_pose_error_mod_rotz_deg", "wrong_mode_fraction"):
        row[key] = ev[key]
    with SPIDataset(truth) as ds:
        intensity, dq = ds.truth_intensity()
        qn = ds.geometry.q_magnitudes()[ds.mask]
    field, _ = load_field(out / "run" / "model.pt")
    n = intensity.shape[0]
    estimate, _ = field_on_grid(field, n, (n // 2) * dq)
    cmp = compare_to_reference(estimate, intensity, dq, min(float(qn.max()), (n // 2) * dq), q_min=float(qn.min()))
    row["speckle_corr"] = cmp.speckle_corr
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n-patterns", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=["grid", "positions", "panels"])
    args = ap.parse_args()

    import h5py
    import torch

    from bayes_spi.dataio.h5 import SPIDataset
    from bayes_spi.geometry import Geometry, get_preset
    from bayes_spi.sim.simulate import simulate

    torch.set_num_threads(1)
    ref = get_preset("reference-32")
    geoms = {"grid": ref,
             "positions": Geometry.from_positions(ref.pixel_positions(), photon_energy_ev=4600.0,
                                                  pixel_size_m=ref.detector.pixel_size_m, name="reference-32-pixels"),
             "panels": panels_geometry()}
    rows = []
    for name in args.only:
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        data = out / "data.h5"
        if not data.exists():
            simulate("2CEX", geoms[name], args.n_patterns, data, artifacts="FPB", mean_photons=1e4, truth_grid=65,
                     seed=1, progress=False)
        if name == "panels":  # fitted from a CXI file in the CXIDB layout
            cxi = out / "data.cxi"
            with SPIDataset(data) as ds, h5py.File(cxi, "w") as f:
                counts = ds.read(slice(None)).astype(np.int32)
                det = f.create_group("entry_1/instrument_1/detector_1")
                det.create_dataset("data", data=counts.reshape(-1, 2, 16, 32), chunks=(64, 2, 16, 32),
                                   compression="gzip")
                pan = geoms[name].detector
                det["corner_positions"] = np.stack([pan.positions_m[0, 0] - 0.5 * (pan.fs_m[0, 0] + pan.ss_m[0, 0]),
                                                    pan.positions_m[16, 0] - 0.5 * (pan.fs_m[16, 0] + pan.ss_m[16, 0])])
                det["basis_vectors"] = np.stack([np.stack([pan.ss_m[0, 0], pan.fs_m[0, 0]]),
                                                 np.stack([pan.ss_m[16, 0], pan.fs_m[16, 0]])])
                det["mask"] = np.where(ds.mask, 0, 1).astype(np.uint32).reshape(2, 16, 32)
                f["entry_1/instrument_1/source_1/energy"] = 4600.0 * 1.602176634e-19
            data.rename(out / "truth.h5")
            data = cxi
        if name == "positions":
            with SPIDataset(args.out / "grid" / "data.h5") as a, SPIDataset(data) as b:
                same = bool(np.array_equal(a.read(slice(None)), b.read(slice(None))))
            print(f"positions: counts identical to the grid's: {same}", flush=True)
        row = fit_one(name, data, out, args.epochs)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| fit | verdict | median err (mod Rz pi) | wrong mode | speckle corr | wall s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['fit']} | {r['verdict']} | {r['median_pose_error_deg']:.2f} ({r['median_pose_error_mod_rotz_deg']:.2f})"
              f" | {100 * r['wrong_mode_fraction']:.1f}% | {r['speckle_corr']:.3f} | {r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
