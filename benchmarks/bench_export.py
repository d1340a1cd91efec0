"""Export throughput beside the fit's: posterior.h5 (before/after issue 10) and `bayes-spi posterior` (netCDF).

For a fitted run (``--run``, its ``model.pt``) and its data file (``--data``) it measures, in one process and
one thread, on the first ``--patterns`` patterns:

- ``posterior.h5 (issue-10 reference)``: the refinement as it was before issue 10 (the guide's hypothesis
  scores on the field, then the two-pass Gauss-Newton of ``--reference``: a copy of the old
  ``bayes_spi/posterior/local.py``, e.g. ``git show 89a8557:bayes_spi/posterior/local.py > /tmp/local_ref.py``),
  batches of 128, and the current :func:`bayes_spi.infer.outputs.write_posterior`;
- ``bayes-spi posterior`` (netCDF, 200 draws): refined on the field itself (``--refine-on field``), on the
  default cube (four times as fine as the search's), on ``posterior.h5``'s cube (twice as fine: the default
  before 2026-11-30), summaries only;
- the fit's training throughput on the same data and detector: ``--steps`` SVI steps of the run's settings
  (batch ``--batch-size``), as ``benchmarks/bench_profile.py`` times them.

Rates are per CPU-second of this thread (``time.thread_time``; with ``OMP_NUM_THREADS=1`` that is the work,
whatever else runs on a shared machine) and by the wall clock. Prints a table and a JSON line.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_export.py --run RUN --data RUN/data.h5 \\
        --reference /tmp/local_ref.py --patterns 1024
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


class Head:
    """The first ``n`` patterns of a data set, as ``write_posterior`` reads them."""

    def __init__(self, ds, n: int) -> None:
        self.ds, self.n_patterns, self.path = ds, min(n, ds.n_patterns), ds.path

    def iter_batches(self, batch_size: int, shuffle: bool = False):
        for s in range(0, self.n_patterns, batch_size):
            idx = np.arange(s, min(s + batch_size, self.n_patterns))
            yield idx, self.ds.read(idx)


def timed(fn) -> tuple[float, float]:
    c0, w0 = time.thread_time(), time.perf_counter()
    fn()
    return time.thread_time() - c0, time.perf_counter() - w0


def reference_export(guide, head: Head, ref_module, batch_size: int = 128) -> None:
    """posterior.h5's work before issue 10 (without the file): scored guide posterior + the old refinement."""
    from bayes_spi.infer.outputs import field_log_cache, refine_cache_grid

    model = guide.search.model
    good = torch.nonzero(guide.mask.reshape(-1)).squeeze(-1)
    pick = torch.randperm(good.numel(), generator=torch.Generator().manual_seed(0))[:512]
    score = good[pick].sort().values
    cache = field_log_cache(model.field, refine_cache_grid(guide), model.q_max)
    for _, counts in head.iter_batches(batch_size):
        images = torch.as_tensor(counts)
        with torch.no_grad():
            post = guide.posterior(images, score)
        y = images.reshape(images.shape[0], -1)[:, good].float()
        ref_module.refine_with_twins(cache, post.rotations, model.q[good], model.log_pixel_factor[good], y,
                                     model.q_max, n_keep=4)


def training_rate(data: Path, config, batch_size: int, steps: int) -> float:
    """SVI images per CPU-second with the run's settings on ``data`` (after 2 warm-up steps)."""
    import pyro

    from bayes_spi.dataio.h5 import SPIDataset
    from bayes_spi.infer.trainer import Trainer
    from bayes_spi.models.spi import SPIBatch

    cfg = dataclasses.replace(config, batch_size=batch_size)
    pyro.set_rng_seed(0)
    with SPIDataset(data) as ds, tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(ds, cfg, Path(tmp) / "run", progress=False)
        trainer.initialise_offset()
        busy = 0.0
        for i in range(steps + 2):
            sel = np.arange(i * batch_size, (i + 1) * batch_size) % ds.n_patterns
            trainer.state.step = trainer.emc_end + i
            pixels, n_eligible = trainer.select_pixels(trainer.state.step)
            batch = SPIBatch(torch.as_tensor(ds.read(np.sort(sel))), torch.as_tensor(np.sort(sel)), pixels, n_eligible)
            c0 = time.thread_time()
            trainer.step(batch)
            if i >= 2:
                busy += time.thread_time() - c0
    return steps * batch_size / busy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--reference", type=Path, default=None, help="the old local.py (see the module doc)")
    ap.add_argument("--patterns", type=int, default=1024)
    ap.add_argument("--nc-patterns", type=int, default=256, help="patterns for the field-refined netCDF export")
    ap.add_argument("--batch-size", type=int, default=32, help="the fit's batch size for the training rate")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import bayes_spi.posterior.calibration  # noqa: F401  (imports SciPy: not inside the timings)
    from bayes_spi.dataio.h5 import SPIDataset
    from bayes_spi.infer.load import load_trained
    from bayes_spi.infer.outputs import write_posterior
    from bayes_spi.posterior.netcdf import ExportSettings, write_posterior_netcdf

    trained = load_trained(args.run)
    ds = SPIDataset(args.data)
    head = Head(ds, args.patterns)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.reference is not None:
            spec = importlib.util.spec_from_file_location("local_ref", args.reference)
            ref = importlib.util.module_from_spec(spec)
            sys.modules["local_ref"] = ref  # its dataclass needs its module registered
            spec.loader.exec_module(ref)
            rows["posterior.h5, before (scores + two-pass refinement)"] = dict(
                zip(("cpu", "wall"), timed(lambda: reference_export(trained.guide, head, ref))), n=head.n_patterns)
        rows["posterior.h5, now"] = dict(zip(("cpu", "wall"), timed(
            lambda: write_posterior(trained.guide, head, Path(tmp) / "p.h5"))), n=head.n_patterns)
        from bayes_spi.infer.outputs import refine_cache_grid
        from bayes_spi.posterior.netcdf import export_cache_grid

        g4, g2 = export_cache_grid(trained.guide), refine_cache_grid(trained.guide)
        for name, kw, n in [("bayes-spi posterior --refine-on field", {"refine_on": "field"}, args.nc_patterns),
                            (f"bayes-spi posterior (default: cube {g4}^3)", {}, args.patterns),
                            (f"bayes-spi posterior --cache-grid {g2} (posterior.h5's)", {"cache_grid": g2},
                             args.patterns),
                            ("bayes-spi posterior --summaries-only", {"summaries_only": True}, args.patterns)]:
            st = ExportSettings(max_patterns=n, **kw)
            rows[name] = dict(zip(("cpu", "wall"), timed(
                lambda: write_posterior_netcdf(trained, ds, Path(tmp) / "p.nc", st))), n=n)
            rows[name]["bytes_per_pattern"] = (Path(tmp) / "p.nc").stat().st_size / n
    train = training_rate(args.data, trained.config, args.batch_size, args.steps)
    print(f"\n{'export':<58s} {'patterns':>8s} {'per CPU-s':>10s} {'per wall-s':>10s}")
    out = {}
    for name, r in rows.items():
        out[name] = {"patterns": r["n"], "patterns_per_cpu_s": round(r["n"] / r["cpu"], 1),
                     "patterns_per_wall_s": round(r["n"] / r["wall"], 1)}
        if "bytes_per_pattern" in r:
            out[name]["bytes_per_pattern"] = round(r["bytes_per_pattern"])
        print(f"{name:<58s} {r['n']:>8d} {r['n'] / r['cpu']:>10.1f} {r['n'] / r['wall']:>10.1f}")
    print(f"{'training (SVI steps, batch ' + str(args.batch_size) + ')':<58s} {'':>8s} {train:>10.1f}")
    print(json.dumps({"machine": f"{platform.node()} {os.cpu_count()} cores, torch {torch.__version__}",
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "exports": out,
                      "training_images_per_cpu_s": round(train, 1)}))


if __name__ == "__main__":
    main()
