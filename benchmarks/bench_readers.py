#!/usr/bin/env python
"""Foreign data in: ``bayes-spi convert`` of Dragonfly's .emc, time and peak memory against N, and the read
speed of the .emc read directly against the converted bayes-spi file.

Inputs: a Dragonfly photons file and its detector (default: the 200,000-frame TMV data set of
``benchmarks/peer/README.md``, 64x64 pixels, ~1000 photons a frame). Each conversion runs in its own process
under ``/usr/bin/time -v`` (peak resident memory); the read test streams shuffled batches of 64 patterns
(the fit's access pattern) through ``open_dataset`` for both files, in one process, side by side.

Usage::

    python benchmarks/bench_readers.py [--photons P.emc --detector D.h5 --energy EV] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PEER = Path("/work/peer/runs/tmv190_200k/data")


def convert(photons: Path, detector: Path, energy: float, out: Path, n: int) -> tuple[float, float]:
    """Seconds and peak RSS (MiB) of ``bayes-spi convert`` of the first ``n`` frames, in a fresh process."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "bayes_spi.cli.main", "convert", str(photons), "--detector",
           str(detector), "--photon-energy", str(energy), "-o", str(out), "--max-patterns", str(n), "--force",
           "--no-progress"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - t0
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    return seconds, rss_kb / 1024.0


def read_rate(ds, n_batches: int, batch: int = 64) -> float:
    """Patterns per second of shuffled batches (the fit's order)."""
    it = ds.iter_batches(batch, shuffle=True, seed=1)
    next(it)
    t0 = time.perf_counter()
    seen = 0
    for _ in range(n_batches):
        idx, counts = next(it)
        seen += len(idx)
    return seen / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photons", type=Path, default=PEER / "photons.emc")
    ap.add_argument("--detector", type=Path, default=PEER / "det_sim.h5")
    ap.add_argument("--energy", type=float, default=12398.4198 / 2.0)
    ap.add_argument("--out-dir", type=Path, default=Path("/tmp/bench_readers"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[20000, 200000])
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    from bayes_spi.dataio.sources import open_dataset

    print(f"source {args.photons} ({args.photons.stat().st_size / 2**20:.0f} MiB), detector {args.detector}")
    print("| frames | convert s | frames/s | peak RSS MiB | output MiB |")
    print("|---:|---:|---:|---:|---:|")
    outputs = {}
    for n in args.sizes:
        out = args.out_dir / f"conv_{n}.h5"
        seconds, rss = convert(args.photons, args.detector, args.energy, out, n)
        outputs[n] = out
        print(f"| {n} | {seconds:.1f} | {n / seconds:.0f} | {rss:.0f} | {out.stat().st_size / 2**20:.1f} |")
    biggest = outputs[max(outputs)]
    with open_dataset(args.photons, detector=args.detector, photon_energy_ev=args.energy) as emc, \
            open_dataset(biggest) as h5:
        rates = {}
        for name, ds in (("emc", emc), ("h5", h5), ("emc again", emc), ("h5 again", h5)):
            rates[name] = read_rate(ds, 150)
        same = np.array_equal(emc.read([7, 123456 % emc.n_patterns]), h5.read([7, 123456 % h5.n_patterns]))
    print(f"shuffled batches of 64 (patterns/s): " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items())
          + f"; same counts: {same}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
