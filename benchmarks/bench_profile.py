"""Where the time of one training step goes, at 32x32, 64x64 and 128x128 (the reference geometries).

For each ``--sizes`` (the ``reference-N`` presets) it simulates ``--patterns`` patterns of 2CEX (kept in
``--workdir``, reused), builds the :class:`~bayes_spi.infer.trainer.Trainer` with the settings a fit
derives from those data (``bayes_spi.infer.autoset.data_settings``, ``--batch-size``), and times
``--steps`` SVI steps (after ``--warmup``) and as many EMC warm-start steps, split into parts by timers
on the methods that do the work (CPU time of the thread on the CPU, run it with ``OMP_NUM_THREADS=1``: on a
shared machine the other jobs do not count; wall time synchronised on CUDA):

- ``search cache``: :meth:`OrientationSearch.refresh` (the field on the search's cube, every
  ``search_every`` steps; every EMC step rebuilds its cube inside ``emc``);
- ``encoder``: the guide's CNN; ``search``: the orientation search (``G`` grid rotations x pixels);
  ``scores``: the guide's hypothesis scores (the field at ``K`` hypotheses x pixels, no gradient);
  ``guide other``: heads, 6D -> rotation, distributions;
- ``model (likelihood)``: :meth:`SPIModel.forward` under ``TraceEnum_ELBO`` (the field at the sampled
  poses of every enumerated hypothesis, Poisson log-probabilities);
- ``ELBO other``: Pyro's tracing, enumeration and sums (the step's forward minus guide and model);
- ``backward``, ``optimizer`` (gradient clipping, Adam, schedule); ``emc``: the grid marginal
  (:class:`~bayes_spi.infer.emc.GridMarginal`, cube + ``G x M`` log-likelihoods, forward).

Prints one table per size (ms per step, share, images/s) and a JSON line. Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_profile.py --workdir /work/bench_tmp/profile
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyro
import torch

from bayes_spi.dataio.h5 import SPIDataset
from bayes_spi.guides.amortized import AmortizedGuide
from bayes_spi.guides.encoder import PatternEncoder
from bayes_spi.guides.search import OrientationSearch
from bayes_spi.infer.autoset import data_settings
from bayes_spi.infer.config import FitConfig
from bayes_spi.infer.emc import GridMarginal
from bayes_spi.infer.trainer import Trainer
from bayes_spi.models.spi import SPIModel
from bayes_spi.sim.simulate import simulate

TIMES: dict[str, float] = defaultdict(float)
_DEVICE = {"cuda": False}


def _sync() -> None:
    if _DEVICE["cuda"]:
        torch.cuda.synchronize()


def clock() -> float:
    """CPU time of this thread on the CPU (with one torch thread, the step's work: immune to the other jobs of a
    shared machine), wall time on CUDA (synchronised)."""
    return time.perf_counter() if _DEVICE["cuda"] else time.thread_time()


@contextmanager
def timed(label: str):
    _sync()
    t0 = clock()
    try:
        yield
    finally:
        _sync()
        TIMES[label] += clock() - t0


def _wrap(cls: type, name: str, label: str) -> None:
    """Time every call of ``cls.name`` under ``label`` (class-level, so bound methods made later are timed)."""
    fn = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        with timed(label):
            return fn(self, *args, **kwargs)

    setattr(cls, name, wrapper)


def install_timers() -> None:
    _wrap(PatternEncoder, "forward", "encoder")
    _wrap(OrientationSearch, "__call__", "search")
    _wrap(OrientationSearch, "refresh", "search cache")
    _wrap(SPIModel, "hypothesis_logpost", "scores")
    _wrap(SPIModel, "forward", "model (likelihood)")
    _wrap(AmortizedGuide, "forward", "guide total")
    _wrap(GridMarginal, "__call__", "emc")

    def optimizer_step(self, loss):
        with timed("backward"):
            loss.backward()
        with timed("optimizer"):
            torch.nn.utils.clip_grad_norm_(self.params, self.config.clip_norm)
            self.optim.step()
            self.scheduler.step()

    Trainer._optimizer_step = optimizer_step


def data_file(workdir: Path, size: int, n: int) -> Path:
    path = workdir / f"2cex_{size}_{n}.h5"
    if not path.exists():
        t0 = time.perf_counter()
        simulate("2CEX", f"reference-{size}", n, path, truth_grid=0, chunk=64, progress=False, seed=5,
                 artifacts="FPB", mean_photons=1e4)
        print(f"simulated {path.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def profile_size(size: int, args: argparse.Namespace) -> dict:
    path = data_file(args.workdir, size, args.patterns)
    ds = SPIDataset(path)
    given = {"batch_size": args.batch_size, "device": args.device}
    cfg, _ = data_settings(ds, FitConfig(batch_size=args.batch_size, device=args.device, epochs=100), given)
    pyro.set_rng_seed(0)
    run = args.workdir / f"run_{size}"
    trainer = Trainer(ds, cfg, run, progress=False)
    trainer.initialise_offset()
    dev = trainer.device
    idx_all = np.arange(ds.n_patterns)
    out: dict = {"size": size, "batch_size": args.batch_size, "pixels_per_pattern": cfg.pixels_per_pattern,
                 "good_pixels": int(ds.mask.sum()), "search_rotations": cfg.search_rotations,
                 "n_hypotheses": trainer.guide.n_hypotheses, "field": cfg.field, "field_width": cfg.field_width,
                 "cache_grid": cfg.cache_grid, "emc_pixels": cfg.emc_pixels}
    for phase in ("svi", "emc"):
        trainer.model.train()
        trainer.guide.train()
        step0 = trainer.emc_end if phase == "svi" else 0  # the SVI phase starts after the warm start
        n_total = args.warmup + args.steps
        for i in range(n_total):
            if i == args.warmup:
                TIMES.clear()
                t0, w0 = clock(), time.perf_counter()
            sel = idx_all[(i * args.batch_size) % ds.n_patterns:][: args.batch_size]
            if len(sel) < args.batch_size:
                sel = idx_all[: args.batch_size]
            counts = torch.as_tensor(ds.read(sel), device=dev)
            from bayes_spi.models.spi import SPIBatch

            trainer.state.step = step0 + i
            pixels, n_eligible = trainer.select_pixels(trainer.state.step, cfg.emc_pixels if phase == "emc" else None)
            batch = SPIBatch(counts, torch.as_tensor(sel, device=dev), pixels.to(dev), n_eligible)
            trainer.guide.weight_floor = trainer.weight_floor(trainer.state.step)
            with timed("step"):
                loss = trainer.emc_step(batch) if phase == "emc" else trainer.step(batch)
            if not np.isfinite(loss):
                raise SystemExit(f"{size}x{size} {phase}: loss {loss} at step {i}")
        busy, wall = clock() - t0, time.perf_counter() - w0
        t = {k: v / args.steps * 1e3 for k, v in TIMES.items()}  # ms per step
        step = t.pop("step")
        parts: dict[str, float] = {}
        if phase == "svi":
            guide = t.get("guide total", 0.0)
            inner = sum(t.get(k, 0.0) for k in ("encoder", "search", "scores"))
            parts = {"search cache": t.get("search cache", 0.0), "encoder": t.get("encoder", 0.0),
                     "search": t.get("search", 0.0), "scores": t.get("scores", 0.0), "guide other": guide - inner,
                     "model (likelihood)": t.get("model (likelihood)", 0.0)}
            fwd = step - t.get("backward", 0.0) - t.get("optimizer", 0.0) - t.get("search cache", 0.0)
            parts["ELBO other"] = fwd - guide - t.get("model (likelihood)", 0.0)
        else:
            parts = {"emc": t.get("emc", 0.0)}
        parts["backward"] = t.get("backward", 0.0)
        parts["optimizer"] = t.get("optimizer", 0.0)
        parts["rest"] = step - sum(parts.values())
        out[phase] = {"ms_per_step": round(step, 1), "images_per_s": round(args.batch_size * args.steps / busy, 1),
                      "images_per_s_wall": round(args.batch_size * args.steps / wall, 1),
                      "parts_ms": {k: round(v, 1) for k, v in parts.items()}}
        print(f"\n{size}x{size} {phase.upper()} step (batch {args.batch_size}, {cfg.pixels_per_pattern if phase == 'svi' else cfg.emc_pixels} "
              f"pixels of {out['good_pixels']}, {trainer.guide.n_hypotheses} hypotheses, G={cfg.search_rotations}, "
              f"cube {cfg.cache_grid}^3, {cfg.field} field width {cfg.field_width}): {step:.0f} ms/step, "
              f"{out[phase]['images_per_s']:.0f} images/s ({out[phase]['images_per_s_wall']:.0f} by the wall clock)", flush=True)
        for k, v in parts.items():
            print(f"  {k:<20s} {v:8.1f} ms  {100 * v / step:5.1f}%", flush=True)
    ds.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/work/bench_tmp/profile"))
    ap.add_argument("--sizes", default="32,64,128")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--patterns", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    _DEVICE["cuda"] = str(args.device).startswith("cuda")
    install_timers()
    res = {"machine": f"{platform.node()} {os.cpu_count()} cores, torch {torch.__version__}, "
                      f"threads {torch.get_num_threads()}", "device": args.device,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "sizes": []}
    for size in (int(s) for s in args.sizes.split(",")):
        res["sizes"].append(profile_size(size, args))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
