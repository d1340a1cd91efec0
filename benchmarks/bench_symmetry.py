"""An icosahedral particle fitted with and without ``--symmetry I``, side by side (same data, same settings).

The particle: 60 copies of a compact fragment of the packaged 2CEX (the atoms within ``--subunit-radius`` of its
centre) under the rotations of I in its standard orientation, at ``--shell-radius`` from the origin
(:func:`bayes_spi.sim.symmetric.symmetric_assembly`; ~75 A across with the defaults, speckle oversampling
2.4 on the 32x32 detector), simulated by ``bayes-spi simulate --symmetry I`` (exact NUFFT transform,
lognormal fluence jitter, Poisson noise, beam stop).

Three fits: without the group (``C1``), with ``--symmetry I`` (its default: as many orientations in the pose
fundamental zone as ``C1`` has in SO(3), a 3.9x finer spacing at the same cost), and ``I-coarse`` (the C1 grid's
spacing, 60 times fewer orientations). Each fit runs the default pipeline (settings from the data, EMC warm start, SVI, exact EMC iterations) on one
thread, one after the other. Every ``--eval-every`` steps (and after each exact EMC iteration) the clock is
paused and the current field is scored against the true intensity: the global rotation from the held-out
probe patterns' most probable poses (aligned to the truth modulo the group), then the speckle correlation
(:func:`bayes_spi.analysis.compare.speckle_correlation`) inside the measured shell. Printed: the time and
images to reach each speckle-correlation threshold, the final speckle correlation, the speckle FSC 0.5 / 0.143
resolutions, and the median orientation error modulo the group (and modulo Rz(pi)) of the probe patterns.

Example::

    python benchmarks/bench_symmetry.py --out /tmp/bench_sym --n-patterns 4000 --epochs 1 --thresholds 0.3 0.4 0.5 0.7
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main", "fit_with_trace"]


def _simulate(path: Path, args: argparse.Namespace) -> None:
    from bayes_spi.geometry import get_preset
    from bayes_spi.sim.simulate import simulate
    from bayes_spi.sim.structure import load_structure
    from bayes_spi.sim.symmetric import symmetric_assembly

    shell = symmetric_assembly(load_structure("2CEX"), "I", args.shell_radius, args.subunit_radius)
    simulate(shell, get_preset(args.geometry), args.n_patterns, path, artifacts="FPB", mean_photons=args.photons,
             fluence_jitter="lognormal:0.3", truth_grid=33, seed=1, progress=False)


def _score(trainer: Any, truth: dict[str, Any], final: bool = False) -> dict[str, float]:
    """Speckle correlation of the current field with the truth (aligned by the probe poses modulo I), the
    probe patterns' median orientation errors; ``final``: also the speckle FSC and the speckle correlation after
    a volume alignment that ignores the poses (:func:`~bayes_spi.analysis.compare.compare_to_reference`)."""
    import torch

    from bayes_spi.analysis.compare import compare_to_reference, speckle_correlation
    from bayes_spi.infer.outputs import field_on_grid
    from bayes_spi.metrics import orientation_error_summary

    was = trainer.model.training
    trainer.model.eval()
    if trainer.guide.search is not None:
        trainer.guide.search.refresh()
    R_est = trainer.probe_poses().double().numpy()
    R_true = truth["R"][trainer.holdout[: len(R_est)]]
    summ = orientation_error_summary(R_est, R_true, group=truth["group"])
    n, dq = truth["I"].shape[0], truth["dq"]
    with torch.no_grad():
        I_est, _ = field_on_grid(trainer.model.field, n, (n // 2) * dq, rotation=summ["G_mod_rotz_pi"].T)
    trainer.model.train(was)
    out = {"speckle_corr": speckle_correlation(I_est, truth["I"], dq, truth["q_max"], truth["q_min"]),
           "median_error_deg": summ["median_error_deg"], "median_error_mod_rotz_deg": summ["median_error_mod_rotz_pi_deg"],
           "wrong_mode": summ["wrong_mode_fraction"]}
    if final:
        with torch.no_grad():
            I_raw, _ = field_on_grid(trainer.model.field, n, (n // 2) * dq)
        out.update(_volume_scores(I_raw, truth))
    return out


def _volume_scores(I_est: np.ndarray, truth: dict[str, Any]) -> dict[str, Any]:
    """Speckle correlation and speckle FSC after a volume alignment that ignores the poses. The FSC resolutions
    skip the shells below 4 voxels: an icosahedral intensity has no spherical harmonics of degree 1-5, so its
    innermost shells are nearly isotropic and their speckle FSC is noise (the first crossing would be there)."""
    from bayes_spi.analysis.compare import compare_to_reference
    from bayes_spi.analysis.fsc import FSCCurve

    dq = truth["dq"]
    cmp = compare_to_reference(I_est, truth["I"], dq, truth["q_max"], q_min=truth["q_min"])
    c = cmp.speckle_fsc
    keep = c.q >= 4 * dq * (1 - 1e-9)
    outer = FSCCurve(c.q[keep], c.fsc[keep], c.n_voxels[keep])
    return {"speckle_corr_volume_aligned": float(cmp.speckle_corr),
            "speckle_fsc_0.5_nm": outer.resolution_nm(0.5), "speckle_fsc_0.143_nm": outer.resolution_nm(0.143),
            "speckle_fsc_0.5_crosses": bool(outer.crosses(0.5)),
            "mean_outer_speckle_fsc": float(np.nanmean(outer.fsc)), "speckle_fsc": c.to_dict()}


def fit_with_trace(data: Path, out: Path, variant: str, args: argparse.Namespace, truth: dict[str, Any],
                   rotations: int | None = None) -> dict[str, Any]:
    """One fit (default pipeline) with the score traced every ``args.eval_every`` steps (clock paused).

    ``variant``: ``C1``, ``I`` (the default: as many rotations in the fundamental zone as C1 has in SO(3), a
    |G|^(1/3) times finer spacing at the same E-step cost) or ``I-coarse`` (``--search-rotations`` = ``rotations``
    / |G|: the fundamental zone at the C1 grid's spacing, |G| times cheaper E-steps)."""
    symmetry = variant.split("-")[0]
    import torch

    from bayes_spi.dataio.h5 import SPIDataset
    from bayes_spi.infer.autoset import data_settings
    from bayes_spi.infer.config import FitConfig
    from bayes_spi.infer.trainer import Trainer

    torch.set_num_threads(1)
    given = {"epochs": args.epochs, "batch_size": 32, "seed": 0, "device": "cpu", "symmetry": symmetry,
             "log_every": 50, "checkpoint_every": 100000}
    if variant == "I-coarse":
        given["search_rotations"] = int(np.ceil(rotations / 60))
    trace: list[dict[str, float]] = []
    with SPIDataset(data) as ds:
        config, _ = data_settings(ds, FitConfig(**given), given)
        trainer = Trainer(ds, config, out, progress=False)
        paused = [0.0]
        t0 = time.perf_counter()
        last = [-1, -1]

        def on_step(st: Any) -> None:
            if st.step - last[0] < args.eval_every and st.polished == last[1] and st.step < trainer.total_steps:
                return
            t_in = time.perf_counter()
            row = {"step": st.step, "images": st.images_seen, "polished": st.polished,
                   "wall_s": t_in - t0 - paused[0], **_score(trainer, truth)}
            trace.append(row)
            print(f"  [{variant}] step {st.step:5d} images {st.images_seen:6d} EMC-iter {st.polished} "
                  f"t {row['wall_s']:6.1f} s  speckle corr {row['speckle_corr']:.3f}  median error mod group "
                  f"{row['median_error_deg']:.1f} (mod Rz(pi) {row['median_error_mod_rotz_deg']:.1f}) deg", flush=True)
            last[0], last[1] = st.step, st.polished
            paused[0] += time.perf_counter() - t_in

        trainer.fit(on_step=on_step)
        wall = time.perf_counter() - t0 - paused[0]
        final = _score(trainer, truth, final=True)
    rotations = int(trainer.emc.rotations.shape[0])
    return {"symmetry": variant, "wall_s": wall, "images": trace[-1]["images"] if trace else 0,
            "grid_rotations": rotations, "trace": trace, "final": final}


def _checkpoint_volume(run: Path, data: Path, truth: dict[str, Any]) -> np.ndarray:
    """The intensity on the truth's grid from a run's ``checkpoint.pt``."""
    import torch

    from bayes_spi.dataio.h5 import SPIDataset
    from bayes_spi.infer.build import build_field, detector_tensors
    from bayes_spi.infer.config import FitConfig
    from bayes_spi.infer.outputs import field_on_grid
    from bayes_spi.models.spi import detector_q_max
    from bayes_spi.torchfile import load_torch_file

    ck = load_torch_file(run / "checkpoint.pt", map_location="cpu", what="a checkpoint")
    with SPIDataset(data) as ds:
        q, _, _ = detector_tensors(ds.geometry)
    field = build_field(FitConfig.from_dict(ck["config"]), detector_q_max(q))
    field.load_state_dict({k[len("field."):]: v for k, v in ck["model"].items() if k.startswith("field.")})
    field.eval()
    n, dq = truth["I"].shape[0], truth["dq"]
    with torch.no_grad():
        return field_on_grid(field, n, (n // 2) * dq)[0]


def _time_to(trace: list[dict[str, float]], threshold: float) -> tuple[float, int] | None:
    for row in trace:
        if row["speckle_corr"] >= threshold:
            return row["wall_s"], int(row["images"])
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n-patterns", type=int, default=4000)
    p.add_argument("--photons", type=float, default=1e4)
    p.add_argument("--geometry", default="reference-32")
    p.add_argument("--shell-radius", type=float, default=30.0)
    p.add_argument("--subunit-radius", type=float, default=8.0)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9])
    p.add_argument("--variants", nargs="+", choices=["C1", "I", "I-coarse"], default=["C1", "I", "I-coarse"],
                   help="I-coarse: --symmetry I with --search-rotations 1/60 of C1's (the C1 grid's spacing)")
    p.add_argument("--rescore", action="store_true",
                   help="recompute the final volume scores of OUT/results.json from the runs' checkpoints")
    args = p.parse_args()

    from bayes_spi.dataio.h5 import SPIDataset
    from bayes_spi.symmetry import point_group

    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "ico.h5"
    if not data.exists():
        t = time.perf_counter()
        _simulate(data, args)
        print(f"simulated {args.n_patterns} patterns in {time.perf_counter() - t:.0f} s")
    with SPIDataset(data) as ds:
        I_true, dq = ds.truth_intensity()
        qn = ds.geometry.q_magnitudes()[ds.mask]
        truth = {"R": ds.truth_rotations(), "I": np.asarray(I_true, dtype=np.float64), "dq": dq,
                 "q_max": min(float(qn.max()), (I_true.shape[0] // 2) * dq), "q_min": float(qn.min()),
                 "group": point_group("I").rotations}
    if args.rescore:
        results = json.loads((args.out / "results.json").read_text())
        for r in results:
            r["final"].update(_volume_scores(_checkpoint_volume(args.out / f"run_{r['symmetry']}", data, truth), truth))
    else:
        results = []
        for variant in args.variants:
            print(f"fit {variant}", flush=True)
            c1 = [r["grid_rotations"] for r in results if r["symmetry"] == "C1"]
            results.append(fit_with_trace(data, args.out / f"run_{variant}", variant, args, truth,
                                          rotations=c1[0] if c1 else 6015))
    with open(args.out / "results.json", "w") as fh:
        json.dump(results, fh, indent=1, default=float)
    print("\n| --symmetry | grid rotations | fit wall (s) | images | "
          + " | ".join(f"time to {t:g} (s / images)" for t in args.thresholds)
          + " | final speckle corr (pose / volume aligned) | speckle FSC 0.5 / 0.143 (nm, shells >= 4) | mean speckle "
          "FSC (shells >= 4) | median error mod I (mod Rz(pi)) deg |")
    print("| --- " * (8 + len(args.thresholds)) + "|")
    for r in results:
        f = r["final"]
        hits = [_time_to(r["trace"], t) for t in args.thresholds]
        cells = " | ".join("-" if h is None else f"{h[0]:.0f} / {h[1]}" for h in hits)
        print(f"| {r['symmetry']} | {r['grid_rotations']} | {r['wall_s']:.0f} | {r['images']} | {cells} | "
              f"{f['speckle_corr']:.3f} / {f['speckle_corr_volume_aligned']:.3f} | {f['speckle_fsc_0.5_nm']:.2f} / {f['speckle_fsc_0.143_nm']:.2f} | {f['mean_outer_speckle_fsc']:.3f} | "
              f"{f['median_error_deg']:.1f} ({f['median_error_mod_rotz_deg']:.1f}) |")


if __name__ == "__main__":
    main()
