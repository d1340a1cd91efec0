"""Data-parallel throughput: the same fit on 1 process and on 2 processes (torchrun, gloo), side by side.

Every configuration fits the same file with the same settings (the same global batch, the same steps: the
same total work); the figure is the training images/s that `bayes-spi fit` logs ("training done: ... images/s",
from the end of the first step: start-up, outputs and the report excluded). Configurations, run in turn,
``--repeats`` times (interleaved, so that a change of the machine's load hits all alike):

* ``1 proc x T threads``: one process, ``OMP_NUM_THREADS=T`` (T = the cores given to the benchmark);
* ``1 proc x 1 thread`` (with ``--single-thread``);
* ``N procs x T/N threads``: ``torchrun --nproc-per-node N``.

Example::

    python benchmarks/bench_ddp.py --n-patterns 1024 --out bench_out/ddp
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fit(data: Path, run: Path, procs: int, threads: int, settings: list[str]) -> tuple[float, float, int]:
    """``(training images/s, wall s, images)`` of one fit."""
    shutil.rmtree(run, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    fit = ["-m", "bayes_spi.cli.main", "fit", str(data), "-o", str(run), *settings]
    if procs == 1:
        cmd = [sys.executable, *fit]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port",
               str(_free_port()), *fit]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    m = re.search(r"training done: step (\d+), (\d+) images, ([0-9.]+) images/s", (run / "run.log").read_text())
    if m is None:
        raise RuntimeError(f"{run / 'run.log'}: no 'training done' line")
    return float(m.group(3)), wall, int(m.group(2))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench_out/ddp"))
    p.add_argument("--data", type=Path, default=None, help="a data file (default: simulate one)")
    p.add_argument("--n-patterns", type=int, default=1024)
    p.add_argument("--size", type=int, default=32, choices=(32, 64))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--cores", type=int, default=2, help="threads of the one-process run (= cores used)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--single-thread", action="store_true", help="also time 1 process x 1 thread")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data
    if data is None:
        data = args.out / f"data_{args.size}_{args.n_patterns}.h5"
        if not data.exists():
            from bayes_spi.sim.simulate import simulate

            simulate("2CEX", f"reference-{args.size}", args.n_patterns, data, truth_grid=17, chunk=64,
                     progress=False, artifacts="FPB", mean_photons=1e4, seed=3)
    settings = ["--epochs", "1", "--batch-size", str(args.batch_size), "--polish-iterations", "0", "--grid", "9",
                "--no-truth", "--no-check-data", "--no-progress", "--device", "cpu", "--log-every", "10",
                "--checkpoint-every", "1000"]
    configs = [(1, args.cores), *([(1, 1)] if args.single_thread else []),
               (args.procs, max(args.cores // args.procs, 1))]
    rates: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    walls: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    images = 0
    for rep in range(args.repeats):
        for procs, threads in configs:
            rate, wall, images = _fit(data, args.out / f"run_{procs}x{threads}", procs, threads, settings)
            rates[(procs, threads)].append(rate)
            walls[(procs, threads)].append(wall)
            print(f"repeat {rep + 1}: {procs} proc x {threads} thread(s): {rate:.1f} images/s "
                  f"({images} images, {wall:.0f} s wall incl. start-up and outputs)", flush=True)
    base = statistics.median(rates[configs[0]])
    print(f"\n{data.name}: {images} images per fit, global batch {args.batch_size}, {args.size}x{args.size}")
    print("| configuration | training images/s (median of runs) | runs | ratio to 1 proc x "
          f"{args.cores} threads |")
    print("| --- | --- | --- | --- |")
    for c in configs:
        med = statistics.median(rates[c])
        runs = ", ".join(f"{r:.1f}" for r in rates[c])
        print(f"| {c[0]} proc x {c[1]} thread(s) | {med:.1f} | {runs} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
