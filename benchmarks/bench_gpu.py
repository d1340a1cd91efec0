"""Throughput and memory of each fit stage on one device: images/s and peak memory vs batch size.

For a simulated data set (default: 2CEX on the 128x128 reference detector, the papers' geometry, 1e4 photons)
it runs, for every batch size, a short fit of each stage on ``--device`` and prints one JSON line per
(stage, batch size): the EMC warm start (``emc_fraction=1``), SVI with the amortized guide
(``emc_fraction=0``), one exact EMC iteration (``polish``) over ``--polish-patterns`` patterns, and the
``posterior.h5`` export (``export``: refined local modes of every pattern, patterns/s; the batch size is capped
by the export's work-array budget on a large detector).
Images/s are measured after ``--warmup`` steps; peak memory is ``torch.cuda.max_memory_allocated`` on a GPU
and the process's peak RSS on the CPU. A batch size that runs out of memory is reported as such and ends the
sweep for that stage. Made for one short run on a lent GPU machine (``benchmarks/gpu_check.sh``); it also runs
on the CPU with small settings (a smoke test).

Example::

    python benchmarks/bench_gpu.py --device cuda --detector 128 --batches 32 128 512 1024
    python benchmarks/bench_gpu.py --device cpu --detector 32 --n-patterns 256 --batches 16 --steps 4
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]


def _peak_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _stage(data: Path, out: Path, device: str, stage: str, batch: int, steps: int, warmup: int,
           polish_patterns: int) -> dict:
    import torch

    from bayes_spi.dataio.h5 import SPIDataset
    from bayes_spi.infer.autoset import data_settings
    from bayes_spi.infer.config import FitConfig
    from bayes_spi.infer.trainer import Trainer

    ds = SPIDataset(data)
    images = (steps + warmup) * batch * (4 if stage == "emc" else 1)  # an EMC step takes 4 data batches
    base = {"device": device, "batch_size": batch, "epochs": max(1, -(-images // ds.n_patterns)),
            "checkpoint_every": 10**6, "log_every": 10**6, "max_images": images, "polish_iterations": 0,
            "emc_fraction": 1.0 if stage in ("emc", "polish", "export") else 0.0}
    cfg, _ = data_settings(ds, FitConfig(**base), given=dict(base))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    trainer = Trainer(ds, cfg, out / f"{stage}_{batch}", progress=False)
    marks: list[tuple[int, float]] = []

    def on_step(st) -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        marks.append((st.images_seen, time.perf_counter()))

    row: dict = {"stage": stage, "batch_size": batch, "device": device, "detector": list(ds.shape)}
    try:
        trainer.fit(on_step=on_step)
        if stage == "export":  # posterior.h5 (refined local modes) over the whole file with the fitted guide
            from bayes_spi.infer.outputs import write_posterior

            if trainer.guide.search is not None:
                trainer.guide.search.refresh()
            t0 = time.perf_counter()
            write_posterior(trainer.guide, ds, out / f"posterior_{batch}.h5", batch_size=batch, device=device)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            row["patterns_per_s"] = ds.n_patterns / (time.perf_counter() - t0)
        elif stage == "polish":
            from bayes_spi.infer.polish import EMCPolish

            field = trainer.model.field
            n_vox = getattr(field, "n_voxel", getattr(field, "n", 0))
            pol = EMCPolish(trainer.model, trainer.emc.rotations, cache_grid=n_vox, batch_size=max(batch, 128),
                            max_patterns=polish_patterns)
            t0 = time.perf_counter()
            pol.iterate(ds, torch.nonzero(trainer._good.reshape(-1)).squeeze(-1))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            row["patterns_per_s"] = min(polish_patterns or ds.n_patterns, ds.n_patterns) / (time.perf_counter() - t0)
        else:
            if len(marks) > warmup + 1:
                (i0, t0), (i1, t1) = marks[warmup], marks[-1]
                row["images_per_s"] = (i1 - i0) / max(t1 - t0, 1e-9)
        row["peak_memory_GiB"] = _peak_bytes(device) / 2**30
    except torch.cuda.OutOfMemoryError:  # the sweep's end for this stage
        row["error"] = "out of memory"
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--detector", default="128", choices=["32", "64", "128"])
    ap.add_argument("--n-patterns", type=int, default=4096)
    ap.add_argument("--photons", type=float, default=1e4)
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128, 512, 1024])
    ap.add_argument("--stages", nargs="+", default=["emc", "svi", "polish", "export"],
                    choices=["emc", "svi", "polish", "export"])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per (stage, batch size)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--polish-patterns", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=None, help="working directory (default: a temporary one)")
    args = ap.parse_args(argv)

    from bayes_spi.sim.simulate import simulate

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        data = out / f"2cex_{args.detector}.h5"
        if not data.exists():
            simulate("2CEX", f"reference-{args.detector}", args.n_patterns, data, mean_photons=args.photons,
                     progress=False)
        for stage in args.stages:
            for batch in args.batches:
                row = _stage(data, out, args.device, stage, batch, args.steps, args.warmup, args.polish_patterns)
                print(json.dumps(row), flush=True)
                if "error" in row:
                    break
    return 0


if __name__ == "__main__":
    sys.exit(main())
