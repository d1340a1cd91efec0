"""Live use: a data file written by a concurrent process (HDF5 SWMR) is followed as the patterns arrive, by
the reader alone and by `bayes-spi fit --online --follow`; `report` and `export` read a fit that is still
running from its latest checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner

from bayes_spi.cli.main import cli
from bayes_spi.dataio.follow import open_following
from bayes_spi.dataio.h5 import SPIDataset

#: a writer process: copies SOURCE's patterns (with their truth) into LIVE in bursts, HDF5 SWMR, flushed
#: after each; before burst k > 0 it waits for the file GO_k to exist, if GATED; it closes (marks the file
#: complete) unless KEEP_OPEN, in which case it sleeps until it is killed
WRITER = """
import sys, time
from pathlib import Path
from bayes_spi.dataio.h5 import H5Writer, SPIDataset
source, live, bursts, gated, keep_open = sys.argv[1], Path(sys.argv[2]), [int(b) for b in sys.argv[3].split(",")], \
    sys.argv[4] == "1", sys.argv[5] == "1"
src = SPIDataset(source)
w = H5Writer(live, src.geometry, with_truth=True, swmr=True, chunk_patterns=16)
w.set_truth_attrs({"photons_per_unit_intensity": src.photons_per_unit_intensity})
start = 0
q, s = src.truth_quaternions(), src.truth_scales()
for k, n in enumerate(bursts):
    if k and gated:
        while not (live.parent / f"GO_{k}").exists():
            time.sleep(0.05)
    elif k:
        time.sleep(0.4)
    w.append(src.read(slice(start, start + n)).astype("int32"), q[start:start + n], s[start:start + n])
    start += n
if keep_open:
    time.sleep(600)
w.close()
"""


def _writer(source: Path, live: Path, bursts: list[int], gated: bool, keep_open: bool = False) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(source), str(live), ",".join(map(str, bursts)),
                             "1" if gated else "0", "1" if keep_open else "0"], env=env, stderr=subprocess.PIPE)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def test_reader_streams_a_growing_file_until_the_writer_goes_quiet_or_completes(simulated, tmp_path: Path) -> None:
    source = simulated(96, truth_grid=17, chunk=32)
    with SPIDataset(source) as src:
        expected = src.read(slice(0, 40))
    live = tmp_path / "quiet.h5"
    writer = _writer(source, live, [12, 8, 20], gated=True, keep_open=True)
    waits: list[tuple[int, int]] = []
    try:
        ds = open_following(live, timeout=30, min_patterns=2, poll_s=0.05,
                            on_wait=lambda c, a, idle, t: waits.append((c, a)))
        ds.timeout = 1.0  # from here on: end after 1 s without a new pattern
        ds.report_every = 0.2
        got = []
        for idx, counts in ds.follow_batches(8):
            if int(idx[-1]) == 7:  # the first batch: let the writer add its second burst
                (tmp_path / "GO_1").touch()
            got.append((idx, counts))
        # 12 + 8 patterns arrived, the third burst was never released: the stream ended by the timeout
        assert ds.end_reason == "timeout" and not ds.following
        idx = np.concatenate([g[0] for g in got])
        assert np.array_equal(idx, np.arange(20))
        assert [len(g[0]) for g in got] == [8, 8, 4]  # full batches while following, then the remainder
        assert np.array_equal(np.concatenate([g[1] for g in got]), expected[:20])
        assert waits and waits[-1] == (16, 20)  # a progress report while caught up, before the timeout
        assert ds.n_patterns == 20 and len(list(ds.iter_batches(16, shuffle=False))) == 2  # static from here on
        ds.close()
    finally:
        _stop(writer)
    live = tmp_path / "complete.h5"
    writer = _writer(source, live, [16, 16, 8], gated=False)
    try:
        with open_following(live, timeout=30, poll_s=0.05) as ds:
            idx = np.concatenate([i for i, _ in ds.follow_batches(16)])
            assert ds.end_reason == "complete"
            assert np.array_equal(idx, np.arange(40))
        assert writer.wait(timeout=30) == 0, writer.stderr.read().decode()
        with SPIDataset(live) as done, h5py.File(live, "r") as f:  # a complete, ordinary bayes-spi file
            assert done.n_patterns == 40 and np.array_equal(done.read(slice(0, 40)), expected)
            assert int(f["data/complete"][0]) == 1
    finally:
        _stop(writer)


def _fit(args: list[str]) -> None:
    torch.set_num_threads(1)
    cli.main(args=args, prog_name="bayes-spi", standalone_mode=False)


def test_fit_follows_a_file_being_written_and_report_export_read_it_meanwhile(simulated, tmp_path: Path) -> None:
    source = simulated(96, truth_grid=17, chunk=32)
    live, run = tmp_path / "live.h5", tmp_path / "run"
    writer = _writer(source, live, [48, 48], gated=True)
    fit = None
    try:
        fit = mp.get_context("fork").Process(target=_fit, args=([
            "fit", str(live), "-o", str(run), "--online", "--follow", "--follow-timeout", "60", "--batch-size", "16",
            "--field-width", "16", "--n-heads", "1", "--pixels-per-pattern", "64", "--grid", "9", "--no-progress",
            "--no-truth", "--polish-iterations", "1", "--search-rotations", "512", "--checkpoint-every", "1",
            "--log-every", "1"],))
        fit.start()
        deadline = time.monotonic() + 120
        while not (run / "checkpoint.pt").exists():
            assert fit.is_alive(), "the fit ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint.pt after 120 s"
            time.sleep(0.05)
        # the fit is running (the writer holds back its second burst): report and export read its checkpoint
        res = CliRunner().invoke(cli, ["export", str(run), "--grid", "9"])
        assert res.exit_code == 0, res.output + repr(res.exception)
        assert (run / "intensity_g9.mrc").is_file() and (run / "intensity_g9.h5").is_file()
        with h5py.File(run / "intensity_g9.h5", "r") as f:
            vol = f["intensity"][()]
        assert vol.shape == (9, 9, 9) and np.isfinite(vol).all() and vol.max() > 0
        res = CliRunner().invoke(cli, ["report", str(run)])
        assert res.exit_code == 0, res.output + repr(res.exception)
        made = res.output.split("figures in")[1].split(")")[0]
        assert "slices" in made, made  # the central slices of the current field, from the checkpoint
        assert fit.is_alive() and not (run / "model.pt").exists() and (run / "fit.lock").exists()
        (tmp_path / "GO_1").touch()
        fit.join(timeout=240)
        assert fit.exitcode == 0
        assert writer.wait(timeout=30) == 0, writer.stderr.read().decode()
    finally:
        _stop(writer)
        if fit is not None and fit.is_alive():
            fit.kill()
            fit.join()
    model = torch.load(run / "model.pt", weights_only=True)
    # the probe set was drawn from the 48 patterns present at the start (2 held out): all others were fitted
    assert model["state"]["images_seen"] == 96 - 2
    with h5py.File(run / "posterior.h5", "r") as f:
        assert f["pose_quaternion"].shape[0] == 96
    log = (run / "run.log").read_text()
    assert "waiting for patterns: 48 fitted, 48 in live.h5" in log
    assert "live.h5 to its end (complete): 96 patterns" in log


def test_follow_needs_online_and_a_file_that_appears(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["fit", str(tmp_path / "live.h5"), "-o", str(tmp_path / "run"), "--follow",
                                   "--no-progress"])
    assert res.exit_code != 0 and "--follow streams a file as it is written, once: expected --online" in res.output
    assert not (tmp_path / "run").exists()
    # the file never appears: a clear error once --follow-timeout has passed, nothing written
    t0 = time.monotonic()
    res = CliRunner().invoke(cli, ["fit", str(tmp_path / "live.h5"), "-o", str(tmp_path / "run"), "--online",
                                   "--follow", "--follow-timeout", "0.5", "--no-progress"])
    assert res.exit_code != 0 and "not found (waited 0.5 s for the writer to create it)" in res.output, res.output
    assert time.monotonic() - t0 < 20 and not (tmp_path / "run" / "config.yaml").exists()
