"""Memory flat in N: peak RSS while 10^6 patterns stream through the data path and while a fit runs over 2x10^5.

Stages (each prints its figures; ``--stages`` picks them):

``make``
    Writes the data files with the package's own writer (:class:`bayes_spi.dataio.h5.H5Writer`: chunked,
    gzip) at the ``reference-32`` detector: sparse counts (``--photons`` per pattern, ~0.2 per pixel) drawn
    by Poisson from the trilinear truth intensity of 2CEX (simulated once, exact transform) at uniformly
    random orientations with a lognormal fluence jitter. ``N1 = --n-stream`` patterns (10^6: ~0.3 GB) and
    ``N2 = --n-fit`` patterns (2x10^5). Kept in ``--workdir`` (never the repository) and reused.
``stream``
    In this process: every pattern of the ``N1`` file through :meth:`SPIDataset.iter_batches` in the
    training order (shuffled chunks), with VmRSS sampled every 0.2 s by a thread; prints RSS after each
    10% of the patterns and the peak.
``fit``
    ``bayes-spi fit`` in a child process, ``--online`` (each pattern once: the whole file is streamed),
    on the ``N2`` file and, for comparison in the same run, on a file of ``N2 / 10`` patterns; the parent
    samples the child's VmRSS every 0.5 s and tags each sample with the stage in the child's ``run.log``
    (EMC warm start, SVI, exact EMC polish over all patterns, outputs incl. ``posterior.h5`` over all
    patterns). Prints peak RSS per stage and the fit's images/s. Small settings (batch 512, 64-wide field,
    small encoder) so that the full stream finishes in minutes, not hours: what is measured is memory.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_memory.py --workdir /work/bench_tmp/mem
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

#: the fit's settings: small and fast, every stage that touches all patterns on (polish over all of them)
FIT_ARGS = ["--online", "--batch-size", "512", "--field-width", "32", "--n-heads", "1", "--search-rotations", "1024",
            "--pixels-per-pattern", "128", "--emc-fraction", "0.5", "--polish-iterations", "1",
            "--polish-patterns", "0", "--checkpoint-every", "100", "--log-every", "20", "--grid", "33",
            "--no-truth", "--no-progress", "--seed", "0"]


def rss_mib(pid: int | str = "self") -> float:
    """Resident set size (VmRSS) of a process in MiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


class Sampler(threading.Thread):
    """Samples VmRSS of ``pid`` every ``dt`` seconds into ``samples`` ``[(t, MiB, tag)]``; ``tag()`` labels them."""

    def __init__(self, pid: int | str = "self", dt: float = 0.2, tag=lambda: "") -> None:
        super().__init__(daemon=True)
        self.pid, self.dt, self.tag = pid, dt, tag
        self.samples: list[tuple[float, float, str]] = []
        self._halt = threading.Event()
        self.t0 = time.perf_counter()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append((time.perf_counter() - self.t0, rss_mib(self.pid), self.tag()))
            self._halt.wait(self.dt)

    def stop(self) -> list[tuple[float, float, str]]:
        self._halt.set()
        self.join()
        return self.samples


def make_file(path: Path, n: int, photons: float, seed: int, block: int = 2000) -> None:
    """``n`` patterns of sparse counts on reference-32 from the trilinear 2CEX truth intensity (see module doc)."""
    from bayes_spi.dataio.h5 import H5Writer, SPIDataset
    from bayes_spi.geometry import get_preset
    from bayes_spi.infer.build import detector_tensors
    from bayes_spi.sim.simulate import simulate
    from bayes_spi.so3 import random_rotmat
    from bayes_spi.trilinear import sample_cube

    if path.exists():
        return
    truth = path.with_name("truth_2cex_65.h5")
    if not truth.exists():
        simulate("2CEX", "reference-32", 16, truth, truth_grid=65, progress=False, seed=1)
    with SPIDataset(truth) as ds:
        vol, voxel = ds.truth_intensity()
    n_grid = vol.shape[0]
    cube = torch.as_tensor(vol, dtype=torch.float64).reshape(1, 1, n_grid, n_grid, n_grid)
    half = (n_grid // 2) * voxel
    geom = get_preset("reference-32")
    q, factor, mask = detector_tensors(geom)
    base = factor * 1.0
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    with H5Writer(path, geom, chunk_patterns=256, expected_patterns=n,
                  simulation_attrs={"structure": "2CEX", "note": "bench_memory: trilinear truth, sparse counts",
                                    "mean_photons": photons, "seed": seed}) as w:
        for s in range(0, n, block):
            b = min(block, n - s)
            R = random_rotmat(b, generator=gen).double()
            lam = sample_cube(cube, torch.einsum("bij,mj->bmi", R, q), half).clamp(min=0) * base
            lam = lam * mask.reshape(-1)
            scale = torch.exp(0.3 * torch.randn(b, 1, generator=gen, dtype=torch.float64))
            lam = photons * scale * lam / lam.sum(-1, keepdim=True)
            counts = torch.poisson(lam, generator=gen).to(torch.int32).reshape(b, *geom.shape)
            w.append(counts.numpy())
            if (s // block) % 50 == 0:
                print(f"  {path.name}: {s + b}/{n} patterns ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB, {n} patterns) in {time.perf_counter() - t0:.0f} s",
          flush=True)


def stage_stream(path: Path, batch: int) -> dict:
    """Stream every pattern of ``path`` in the training order; RSS at each 10% and the peak."""
    from bayes_spi.dataio.h5 import SPIDataset

    sampler = Sampler()
    sampler.start()
    rows = []
    t0 = time.perf_counter()
    with SPIDataset(path) as ds:
        n = ds.n_patterns
        marks = {int(math.ceil(n * k / 10)) for k in range(1, 11)}
        done, photons = 0, 0.0
        for idx, counts in ds.iter_batches(batch, shuffle=True, seed=0):
            done += len(idx)
            photons += float(counts.sum())
            if any(done >= m > done - len(idx) for m in marks):
                rows.append({"patterns": done, "rss_mib": round(rss_mib(), 1),
                             "patterns_per_s": round(done / (time.perf_counter() - t0))})
                print(f"  stream: {done}/{n} patterns, RSS {rows[-1]['rss_mib']:.0f} MiB, "
                      f"{rows[-1]['patterns_per_s']} patterns/s", flush=True)
    samples = sampler.stop()
    return {"n_patterns": n, "mean_photons": photons / n, "wall_s": round(time.perf_counter() - t0, 1),
            "peak_rss_mib": round(max(s[1] for s in samples), 1), "at": rows}


#: (marker in a run.log line, stage name); the last line's first match names the stage (the polish stage shows as
#: "svi" until its first iteration's line)
STAGES = [("posterior.h5", "posterior.h5"), ("wrote model.pt", "done"), ("training done", "outputs"),
          ("verdict", "outputs"), ("exact EMC iteration", "polish"), ("[EMC warm start", "emc"), (" step ", "svi"),
          ("sampling", "setup"), ("data ", "setup")]


def _stage_of(log_path: Path) -> str:
    """The stage the child is in, from the last recognised line of its run.log."""
    try:
        lines = log_path.read_text().splitlines()[-3:]
    except FileNotFoundError:
        return "start"
    for line in reversed(lines):
        for key, name in STAGES:
            if key in line:
                return name
    return "start"


def stage_fit(data: Path, out: Path) -> dict:
    """``bayes-spi fit`` in a child process on every pattern of ``data`` (online); peak RSS per stage."""
    run = out / f"run_{data.stem}"
    cmd = [sys.executable, "-m", "bayes_spi.cli.main", "fit", str(data), "-o", str(run), "--force", *FIT_ARGS]
    t_cpu = os.times()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = Sampler(proc.pid, dt=0.5, tag=lambda: _stage_of(run / "run.log"))
    sampler.start()
    output = proc.communicate()[0]
    samples = sampler.stop()
    failed = None
    if proc.returncode != 0:  # still report the memory measured up to the failure
        failed = f"exit {proc.returncode}: {output.strip().splitlines()[-1] if output.strip() else ''}"
        print(f"fit failed ({proc.returncode}):\n{output[-3000:]}", file=sys.stderr, flush=True)
    per_stage: dict[str, float] = {}
    for _, mib, tag in samples:
        per_stage[tag] = max(per_stage.get(tag, 0.0), mib)
    log = (run / "run.log").read_text()
    rate = [line for line in log.splitlines() if "training done" in line or "posterior.h5:" in line]
    timeline = [(round(t), round(m)) for t, m, _ in samples[:: max(1, len(samples) // 40)]]
    cpu = os.times()
    return {"n_patterns": int(data.stem.split("_")[-1]), "wall_s": round(time.perf_counter() - t0, 1),
            "child_cpu_s": round(cpu.children_user + cpu.children_system - t_cpu.children_user
                                 - t_cpu.children_system, 1),
            "peak_rss_mib": round(max(m for _, m, _ in samples), 1),
            "peak_rss_by_stage_mib": {k: round(v, 1) for k, v in per_stage.items()},
            "log": [line.split("INFO", 1)[-1].strip() for line in rate], "rss_timeline_s_mib": timeline,
            "failed": failed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/work/bench_tmp/mem"))
    ap.add_argument("--n-stream", type=int, default=1_000_000)
    ap.add_argument("--n-fit", type=int, default=200_000)
    ap.add_argument("--photons", type=float, default=200.0)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--stages", default="make,stream,fit")
    ap.add_argument("--skip-tenth", action="store_true", help="fit only the --n-fit file, not the tenth beside it")
    args = ap.parse_args()
    if ROOT in args.workdir.resolve().parents:
        raise SystemExit(f"--workdir {args.workdir}: expected a directory outside the repository")
    args.workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    stages = args.stages.split(",")
    big, small = args.workdir / f"stream_{args.n_stream}.h5", args.workdir / f"fit_{args.n_fit}.h5"
    tenth = args.workdir / f"fit_{args.n_fit // 10}.h5"
    result: dict = {"machine": f"{platform.node()} {os.cpu_count()} cores, torch {torch.__version__}",
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if "make" in stages:  # the files the other stages ask for
        if "stream" in stages:
            make_file(big, args.n_stream, args.photons, seed=1)
        if "fit" in stages:
            make_file(small, args.n_fit, args.photons, seed=2)
            if not args.skip_tenth:
                make_file(tenth, args.n_fit // 10, args.photons, seed=3)
    if "stream" in stages and "make" in stages:  # a fresh process: the generator's memory must not count
        cmd = [sys.executable, __file__, "--workdir", str(args.workdir), "--n-stream", str(args.n_stream),
               "--batch", str(args.batch), "--stages", "stream"]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        result["stream"] = json.loads(line)["stream"]
        print(json.dumps({"stream": result["stream"]}), flush=True)
    elif "stream" in stages:
        result["stream"] = stage_stream(big, args.batch)
        print(json.dumps({"stream": result["stream"]}), flush=True)
    if "fit" in stages:
        if not args.skip_tenth:
            result["fit_tenth"] = stage_fit(tenth, args.workdir)
            print(json.dumps({"fit_tenth": result["fit_tenth"]}), flush=True)
        result["fit_all"] = stage_fit(small, args.workdir)
        print(json.dumps({"fit_all": result["fit_all"]}), flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
