"""The verdict's truth-free checks on finished fits whose truth is known: does each check separate them?

For every ``RUN:DATA:LABEL`` given (a run directory or ``model.pt``, its data file, and what the truth says
about the fit, e.g. ``right`` / ``wrong``), prints the two data-based checks of
:func:`bayes_spi.infer.verdict.assess_fit` that can be recomputed from a finished run:

- the pose posteriors' spread over the search grid (:func:`~bayes_spi.infer.verdict.pose_decisiveness`) on
  ``--patterns`` patterns spread over the data: the median effective number of grid orientations and the
  fraction above :data:`~bayes_spi.infer.verdict.MAX_POSE_SPREAD`;
- the rotation-invariant agreement (:func:`~bayes_spi.analysis.invariants.invariant_agreement`) on the first
  16,384 patterns, for ``--seeds`` seeds of its random halves and model poses (its own noise).

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_truthfree.py \\
        --fit /work/peer/bayes/tmv_s3/run:/work/peer/h5/tmv190_20k.h5:right ...
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fit", nargs="+", required=True, help="RUN:DATA:LABEL")
    ap.add_argument("--patterns", type=int, default=128)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from bayes_spi.analysis.invariants import invariant_agreement
    from bayes_spi.dataio.sources import open_dataset
    from bayes_spi.infer.load import load_trained
    from bayes_spi.infer.verdict import INVARIANT_PATTERNS, MAX_POSE_SPREAD, pose_decisiveness

    print("| fit | truth | pose spread (median) | patterns spread > %g | invariant agreement (seeds) |" % MAX_POSE_SPREAD)
    print("|---|---|---|---|---|")
    for item in args.fit:
        run, data, label = item.rsplit(":", 2)
        t = load_trained(run)
        ds = open_dataset(data)
        good = t.guide.mask.reshape(-1)
        pixels = torch.nonzero(good).squeeze(-1)
        n = len(ds)
        idx = np.unique(np.linspace(0, n - 1, min(args.patterns, n)).astype(np.int64))
        images = torch.as_tensor(np.asarray(ds.read(idx)), dtype=torch.float32)
        dec = pose_decisiveness(t.model, t.guide, images, good)
        m = min(n, INVARIANT_PATTERNS)
        agree = []
        for seed in range(args.seeds):
            batches = (torch.as_tensor(np.asarray(ds.read(np.arange(s, min(m, s + 512))))) for s in range(0, m, 512))
            agree.append(invariant_agreement(t.model, pixels, batches, n_rotations=1024, seed=seed)["invariant_agreement"])
        txt = ", ".join("n/a" if a is None else f"{a:.3f}" for a in agree)
        print(f"| {run} | {label} | {dec.get('probe_pose_spread', float('nan')):.1f} | "
              f"{dec.get('probe_ambiguous_fraction', float('nan')):.2f} | {txt} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
