"""Memory flat in N for `evaluate` and `report`: peak RSS of each on a synthetic run of 10^5 and 10^6 patterns.

``make`` writes, in ``--workdir`` (never the repository), for each N: a data file in the bayes-spi format
(reference-32 detector; ``/data/counts`` is an (N, 32, 32) dataset left unwritten, its chunks never stored, since
neither command reads counts; ``/truth/quaternions`` uniformly random poses, ``/truth/scales`` a lognormal jitter)
and a run directory whose ``posterior.h5`` is laid out as ``write_posterior`` writes it (float32, gzip, 4096-row
chunks): poses ``G^T R_true`` with 3-degree noise, a fifth of them in the ``Rz(pi)`` twin, 4% outliers;
``pose_sigma_rad``, ``hypothesis_weights (N, 4)`` and noisy scales.

Each measurement runs in a fresh child process (peak RSS = its ``ru_maxrss``; a child past ``--timeout`` is killed
and its VmHWM so far is reported; times exclude the imports): ``import`` (the modules alone, the floor), ``evaluate``
(``evaluate_run_full(density=False)``: poses and fluence), ``report_data`` (``RunData``: posterior, truth,
alignment, cones, calibration: everything the figures use). With ``--baseline-src DIR`` (a copy of the package
before this change, e.g. ``git archive main bayes_spi | tar -x -C DIR``) the same children also run on that code,
side by side in one run.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_report_memory.py --workdir /work/bench_tmp/reportmem \\
        --baseline-src /work/bench_tmp/reportmem/main_src
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 100_000

CHILD = r"""
import json, resource, sys, time
stage, run, data = sys.argv[1], sys.argv[2], sys.argv[3]
t0 = time.perf_counter()
import numpy as np
from bayes_spi.infer.evaluate import evaluate_run_full
from bayes_spi.report.rundata import RunData
t0, out = time.perf_counter(), {"code": __import__("bayes_spi").__file__.rsplit("/", 2)[0]}
if stage == "evaluate":
    ev = evaluate_run_full(run, data, density=False)
    out.update({k: ev.scalars[k] for k in ("median_pose_error_mod_rotz_deg", "wrong_mode_fraction", "fluence_corr")})
elif stage == "report_data":
    rd = RunData(run, truth_path=data)
    post, truth, al, cones, cal = rd.posterior, rd.truth, rd.alignment, rd.cones, rd.calibration
    out.update({"n_used": len(post["R"]), "median_error_mod_rotz_deg": float(np.median(al["errors_mod_rotz_pi_deg"])),
                "calibration_patterns": len(cal["errors_deg"])})
out["seconds"] = time.perf_counter() - t0
out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
print("RESULT " + json.dumps(out))
"""


def make(workdir: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """The data file and run directory of ``n`` patterns (see the module doc); reused when present."""
    import h5py
    from scipy.spatial.transform import Rotation

    from bayes_spi.dataio.h5 import write_simulation
    from bayes_spi.geometry import get_preset

    data, run = workdir / f"truth_{n}.h5", workdir / f"run_{n}"
    if data.exists() and (run / "posterior.h5").exists():
        return data, run
    t0 = time.perf_counter()
    tmp = data.with_suffix(".tmp.h5")
    write_simulation(tmp, np.zeros((1, 32, 32), dtype=np.int32), get_preset("reference-32"),
                     quaternions=np.array([[1.0, 0.0, 0.0, 0.0]]), scales=np.ones(1))
    run.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    G = Rotation.from_rotvec([0.4, -0.9, 0.3]).as_matrix()
    rz = np.diag([-1.0, -1.0, 1.0])
    ptmp = run / "posterior.tmp.h5"
    with h5py.File(tmp, "a") as f, h5py.File(ptmp, "w") as p:
        f["data/counts"].resize(n, axis=0)  # never written: no chunk stored
        f["truth/quaternions"].resize(n, axis=0)
        f["truth/scales"].resize(n, axis=0)
        ds = {name: p.create_dataset(name, shape=shape, dtype="f4", chunks=(4096,) + shape[1:], compression="gzip")
              for name, shape in (("pose_quaternion", (n, 4)), ("pose_sigma_rad", (n, 3)),
                                  ("hypothesis_weights", (n, 4)), ("scale_mean", (n,)))}
        for s in range(0, n, BLOCK):
            b = min(BLOCK, n - s)
            R_true = Rotation.random(b, random_state=rng.integers(2**31)).as_matrix()
            noise = Rotation.from_rotvec(rng.normal(0.0, np.radians(3.0) / np.sqrt(3.0), (b, 3))).as_matrix()
            R_est = G.T[None] @ R_true @ noise
            flip = rng.random(b) < 0.2
            R_est[flip] = R_est[flip] @ rz
            out = rng.random(b) < 0.04
            R_est[out] = Rotation.random(int(out.sum()), random_state=rng.integers(2**31)).as_matrix()
            scales = np.exp(rng.normal(0.0, 0.3, b))
            f["truth/quaternions"][s:s + b] = Rotation.from_matrix(R_true).as_quat(scalar_first=True)
            f["truth/scales"][s:s + b] = scales
            ds["pose_quaternion"][s:s + b] = Rotation.from_matrix(R_est).as_quat(scalar_first=True)
            ds["pose_sigma_rad"][s:s + b] = np.radians(rng.uniform(1.0, 5.0, (b, 3)))
            w = rng.dirichlet(np.ones(4) * 0.3, b)
            ds["hypothesis_weights"][s:s + b] = w
            ds["scale_mean"][s:s + b] = scales * np.exp(rng.normal(0.0, 0.1, b))
    tmp.rename(data)
    ptmp.rename(run / "posterior.h5")
    print(f"wrote {data.name} ({data.stat().st_size / 2**20:.0f} MiB) and {run.name}/posterior.h5 "
          f"({(run / 'posterior.h5').stat().st_size / 2**20:.0f} MiB), {n:,} patterns, in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return data, run


def vm_hwm_mib(pid: int) -> float:
    """Peak resident set size (VmHWM) of a live process in MiB (0 if gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def measure(src: Path, stage: str, run: Path, data: Path, timeout: float) -> dict:
    """One child process on the package in ``src``: its result, peak RSS and time (or a timeout)."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, stage, str(run), str(data)], env=env, cwd=run,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0, hwm = time.perf_counter(), 0.0
    while child.poll() is None:
        hwm = max(hwm, vm_hwm_mib(child.pid))
        if time.perf_counter() - t0 > timeout:
            child.kill()
            child.wait()
            return {"timeout": True, "seconds": time.perf_counter() - t0, "peak_rss_mib": hwm}
        time.sleep(0.2)
    out, err = child.communicate()
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"child {stage} on {src} failed:\n{err[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--baseline-src", type=Path, default=None, help="a copy of the package before this change")
    ap.add_argument("--baseline-max-n", type=int, default=1_000_000,
                    help="run the baseline only up to this N (it holds every pattern in memory)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per child")
    args = ap.parse_args()
    if ROOT in args.workdir.resolve().parents:
        raise SystemExit("--workdir: expected a folder outside the repository")
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.node()} {os.cpu_count()} cores; python {platform.python_version()}", flush=True)
    codes = [("this branch", ROOT)] + ([("baseline", args.baseline_src)] if args.baseline_src else [])
    rows = []
    for n in args.n:
        data, run = make(args.workdir, n)
        for label, src in codes:
            if label == "baseline" and n > args.baseline_max_n:
                continue
            for stage in ("import", "evaluate", "report_data"):
                r = measure(src, stage, run, data, args.timeout)
                rows.append((n, label, stage, r))
                extra = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                         if k not in ("seconds", "peak_rss_mib")}
                print(f"N={n:>9,}  {label:<12} {stage:<12} peak RSS {r['peak_rss_mib']:7.0f} MiB  "
                      f"{r['seconds']:7.1f} s  {extra}", flush=True)
    print("\n| N | code | stage | peak RSS (MiB) | above import (MiB) | time (s) |\n|---|---|---|---|---|---|")
    floor = {(n, label): r["peak_rss_mib"] for n, label, stage, r in rows if stage == "import"}
    for n, label, stage, r in rows:
        t = f"> {r['seconds']:.0f} (killed)" if r.get("timeout") else f"{r['seconds']:.1f}"
        print(f"| {n:,} | {label} | {stage} | {r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - floor[(n, label)]:.0f} "
              f"| {t} |")


if __name__ == "__main__":
    main()
