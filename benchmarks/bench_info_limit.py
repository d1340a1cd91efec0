#!/usr/bin/env python
"""The verdict's information limit of a saved fit, beside the truth: how far out the data support the intensity.

Copies the run directory (``cfg.json`` + ``checkpoint.pt``, as ``bench_polish_variants.py`` writes them) to a
temporary folder, resumes it (a finished run does no more work), and prints

* ``bayes_spi.infer.verdict.information_gain`` on the run's held-out probe patterns: the gain per photon over the
  radial average, per ``|q|`` shell, which shells are informative and the information limit (as a fraction of
  ``q_max``), with each pixel at the pose found on the other half of the pattern's pixels (the verdict's rule);
* with ``--all-pixel-pose``, the same with the pose chosen on all pixels (the biased variant it replaced);
* the speckle correlation of the field with ``/truth/intensity`` over the scored range and its inner 0.4 and 0.25
  (``bench_polish_variants.score``).

Example::

    python benchmarks/bench_info_limit.py DATA.h5 RUN_DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("run", type=Path, help="a run directory with cfg.json and checkpoint.pt")
    ap.add_argument("--all-pixel-pose", action="store_true", help="also the limit with the pose on all pixels")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from bayes_spi.dataio.h5 import SPIDataset
    from bayes_spi.infer import verdict
    from bayes_spi.infer.config import FitConfig
    from bayes_spi.infer.trainer import Trainer
    from bench_polish_variants import score

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(args.run, run)
        names = {f.name for f in dataclasses.fields(FitConfig)}
        cfg = FitConfig(**{k: v for k, v in json.loads((run / "cfg.json").read_text()).items() if k in names})
        ds = SPIDataset(args.data)
        tr = Trainer(ds, cfg, run, progress=False)
        tr.fit(resume=True)
        for name, held_out in [("held-out pose", True)] + ([("all-pixel pose", False)] if args.all_pixel_pose else []):
            gain = verdict.information_gain(tr.model, tr.guide, tr.probe_images, tr._good, held_out_pose=held_out)
            print(f"{name}: gain {gain['gain_per_photon']:.4f} nats/photon, limit {gain['information_fraction']:.3f} "
                  f"of q_max ({gain['information_q']:.4f} 1/A); per shell "
                  f"{[round(v, 3) for v in gain['shell_gain_per_photon']]}, informative {gain['shell_informative']}")
        print("truth: speckle correlation over the scored range / inner 0.4 / inner 0.25", score(tr, ds))


if __name__ == "__main__":
    main()
