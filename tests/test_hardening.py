"""Regression tests for the defects of issue 8: unsafe torch files, the run-directory lock, full disks,
tracebacks instead of messages, inputs that must be refused, silent overwrites and the smaller items.

Each test names the defect it guards (``d1`` ... ``d8``). A failure is always a clean one-line error: the
CLI exits with a message (``SystemExit``), never with an uncaught exception.
"""

from __future__ import annotations

import errno
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bayes_spi.cli.main import cli
from bayes_spi.dataio.h5 import DataFormatError, H5Writer, SPIDataset, write_simulation
from bayes_spi.geometry import get_preset

#: tiny fit settings (as tests/test_cli_fit.py): 48 patterns / 16 = 3 steps an epoch
# one exact EMC iteration on a 512-rotation grid: a tiny fit at about half the cost (no test here is about either)
TINY = ["--batch-size", "16", "--epochs", "2", "--field-width", "16", "--n-heads", "1",
        "--polish-iterations", "1", "--search-rotations", "512",
        "--pixels-per-pattern", "64", "--grid", "9", "--no-progress", "--no-truth"]
N_PATTERNS = 48


def _invoke(args: list[str]):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _clean_error(res, *patterns: str) -> str:
    """The command failed with a message (no traceback) that matches every pattern; returns the output."""
    assert res.exit_code != 0, res.output
    assert isinstance(res.exception, SystemExit), f"traceback instead of a message: {res.exception!r}\n{res.output}"
    out = " ".join(res.output.split())  # one line, whatever the terminal wrapping
    for pat in patterns:
        assert re.search(pat, out, re.I), f"{pat!r} not in: {out}"
    return out


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def data_file(simulated) -> Path:
    return simulated(N_PATTERNS, truth_grid=9, chunk=16)


@pytest.fixture(scope="module")
def fitted_run(data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("fit") / "run"
    res = _invoke(["fit", data_file, "-o", run, *TINY])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return run


@pytest.fixture()
def run_copy(fitted_run: Path, tmp_path: Path) -> Path:
    """A private copy of the fitted run, free to damage."""
    dst = tmp_path / "run"
    shutil.copytree(fitted_run, dst)
    return dst


class _Payload:
    """Pickles to a call of ``Path.touch(marker)``: what a crafted torch file would run on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _plant(path: Path, marker: Path, base: dict | None = None) -> None:
    ck = dict(base or {})
    ck["model"] = _Payload(marker)
    torch.save(ck, path)


# ================================================================ 1. code execution from files
def test_d1_model_pt_payload_does_not_run(run_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    good = torch.load(run_copy / "model.pt", weights_only=True)  # the real file holds only tensors and plain values
    assert isinstance(good["mask"], torch.Tensor) and good["mask"].dtype == torch.bool
    _plant(run_copy / "model.pt", marker, {"config": good["config"], "geometry": good["geometry"]})
    for args in (["export", run_copy, "--grid", "5", "-o", tmp_path / "e"],
                 ["phase", run_copy, "-o", tmp_path / "d.mrc", "--starts", "1", "--iterations", "10"]):
        _clean_error(_invoke(args), r"model\.pt", "nothing in it was executed")
        assert not marker.exists(), f"the payload ran ({args[0]})"
    from bayes_spi.infer.load import load_trained
    from bayes_spi.torchfile import TorchFileError

    with pytest.raises(TorchFileError, match=r"model\.pt"):
        load_trained(run_copy)
    assert not marker.exists()


def test_d1_old_model_pt_with_numpy_mask_is_refused_and_rewritten_by_resume(run_copy: Path, data_file: Path,
                                                                            tmp_path: Path) -> None:
    ck = torch.load(run_copy / "model.pt", weights_only=True)
    ck["mask"] = ck["mask"].numpy()  # as bayes-spi wrote it before: loading it needs numpy's unpickler
    torch.save(ck, run_copy / "model.pt")
    _clean_error(_invoke(["export", run_copy, "--grid", "5", "-o", tmp_path / "e"]), r"model\.pt", "numpy",
                 "--resume")
    res = _invoke(["fit", data_file, "-o", run_copy, "--resume", "--no-progress", "--no-truth"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert isinstance(torch.load(run_copy / "model.pt", weights_only=True)["mask"], torch.Tensor)


def test_d1_checkpoint_payload_does_not_run(run_copy: Path, data_file: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    good = torch.load(run_copy / "checkpoint.pt", weights_only=True)
    _plant(run_copy / "checkpoint.pt", marker, good)
    metrics = _digest(run_copy / "metrics.csv")
    _clean_error(_invoke(["fit", data_file, "-o", run_copy, "--resume", "--no-progress"]), r"checkpoint\.pt",
                 "nothing in it was executed")
    assert not marker.exists(), "the payload ran"
    assert _digest(run_copy / "metrics.csv") == metrics, "the run was touched"


# ================================================================ 2. one fit per run directory
def _lock_text(pid: int) -> str:
    return f"pid={pid}\nhost={platform.node()}\n"


def test_d2_second_fit_on_a_locked_run_refuses_at_once(data_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / "fit.lock").write_text(_lock_text(owner.pid))
        t0 = time.perf_counter()
        res = _invoke(["fit", data_file, "-o", run, *TINY])
        _clean_error(res, "in use by another bayes-spi fit", f"pid {owner.pid}", r"fit\.lock")
        assert time.perf_counter() - t0 < 10
        assert sorted(p.name for p in run.iterdir()) == ["fit.lock"], "the locked run was written to"
        # --resume and --force are refused the same way
        _clean_error(_invoke(["fit", data_file, "-o", run, *TINY, "--force"]), "in use")
    finally:
        owner.kill()
        owner.wait()


def test_d2_concurrent_fits_on_one_run(data_file: Path, tmp_path: Path, fit_in_background) -> None:
    """A real fit in another process holds the lock: a second fit is refused at once, leaving the first one's
    files alone; once the first is killed (-9, its lock left behind), a new fit takes the stale lock over."""
    import signal

    run = tmp_path / "run"
    long_fit = [*TINY, "--epochs", "400", "--checkpoint-every", "1"]
    with fit_in_background(data_file, run, long_fit, cwd=tmp_path) as proc:
        config = (run / "config.yaml").read_text()
        for extra in ([], ["--force"], ["--resume"]):
            t0 = time.perf_counter()
            _clean_error(_invoke(["fit", data_file, "-o", run, *TINY, *extra]), "in use by another bayes-spi fit",
                         f"pid {proc.pid}")
            assert time.perf_counter() - t0 < 10
        assert proc.poll() is None, "the first fit was disturbed"
        assert (run / "config.yaml").read_text() == config
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert f"pid={proc.pid}" in (run / "fit.lock").read_text(), "kill -9 leaves the lock behind"
    res = _invoke(["fit", data_file, "-o", run, *TINY, "--force"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert not (run / "fit.lock").exists()


def test_d2_stale_lock_is_taken_over_and_released(data_file: Path, tmp_path: Path, monkeypatch) -> None:
    from bayes_spi.infer.trainer import Trainer

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / "fit.lock").write_text(_lock_text(dead.pid))
    seen: list[str] = []
    original = Trainer.save_checkpoint

    def spy(self):
        seen.append((self.run_dir / "fit.lock").read_text())
        return original(self)

    monkeypatch.setattr(Trainer, "save_checkpoint", spy)
    res = _invoke(["fit", data_file, "-o", run, *TINY])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert seen and all(f"pid={os.getpid()}" in text for text in seen), seen  # held by this fit while it ran
    assert not (run / "fit.lock").exists(), "the lock is released at the end"


# ================================================================ 3. disk full
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_d3_fit_disk_full_keeps_last_checkpoint(data_file: Path, tmp_path: Path, monkeypatch) -> None:
    import bayes_spi.torchfile as tf

    run = tmp_path / "run"
    real_save = torch.save
    calls = []

    def save(obj, f, *a, **k):  # the first checkpoint is written; the next write runs out of space half-way
        calls.append(obj["state"]["step"])
        if len(calls) == 1:
            return real_save(obj, f, *a, **k)
        Path(f).write_bytes(b"partial")
        _enospc()

    monkeypatch.setattr(tf.torch, "save", save)
    res = _invoke(["fit", data_file, "-o", run, *TINY, "--checkpoint-every", "2"])
    _clean_error(res, "no space left", r"checkpoint\.pt", "last good checkpoint is kept")
    assert len(calls) == 2
    monkeypatch.undo()
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["state"]["step"] == calls[0] < calls[1], "the last good checkpoint is the one on disk"
    assert not list(run.glob("*.tmp")), "temporaries are removed"
    assert not (run / "fit.lock").exists()


def test_d3_simulate_disk_full_removes_temporary(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "sim.h5"
    args = ["simulate", "-o", out, "--n-patterns", "4", "--truth-grid", "0", "--no-progress"]
    # the disk fills while appending patterns
    monkeypatch.setattr(H5Writer, "append", _enospc)
    _clean_error(_invoke(args), "no space left", re.escape(str(out)))
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    monkeypatch.undo()
    # ... or only when the file is closed and moved into place (close() raised inside __exit__ before)
    import bayes_spi.dataio.h5 as h5mod

    monkeypatch.setattr(h5mod.os, "replace", _enospc)
    _clean_error(_invoke(args), "no space left")
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_d3_export_and_posterior_disk_full(fitted_run: Path, data_file: Path, tmp_path: Path, monkeypatch) -> None:
    import bayes_spi.atomic as atomic

    monkeypatch.setattr(atomic.os, "fsync", _enospc)  # every atomic write fails when it is flushed to disk
    out = tmp_path / "e"
    _clean_error(_invoke(["export", fitted_run, "--grid", "5", "-o", out]), "no space left", r"intensity\.(mrc|h5)")
    assert not list(out.glob("*"))
    nc = tmp_path / "p" / "post.nc"
    _clean_error(_invoke(["posterior", fitted_run, data_file, "-o", nc, "--no-progress", "--draws", "2",
                          "--max-patterns", "2", "--no-refine"]), "no space left", r"post\.nc")
    assert not (tmp_path / "p").exists(), "the failed export left its temporary file or an empty directory"


def test_d3_atomic_writers_report_and_clean_up(tmp_path: Path) -> None:
    from bayes_spi.atomic import WriteError, atomic_path

    path = tmp_path / "a.json"
    path.write_text("old")
    with pytest.raises(WriteError, match=r"a\.json: could not write the file: no space left"):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            _enospc()
    assert path.read_text() == "old" and not list(tmp_path.glob("*.tmp"))


# ================================================================ 4. messages, not tracebacks
@pytest.mark.parametrize("damage", ["empty", "truncated", "foreign"])
def test_d4_bad_model_pt_is_a_message(run_copy: Path, tmp_path: Path, damage: str) -> None:
    model = run_copy / "model.pt"
    raw = model.read_bytes()
    if damage == "empty":
        model.write_bytes(b"")
    elif damage == "truncated":
        model.write_bytes(raw[: len(raw) // 2])
    else:
        model.write_text("this is not a torch file\n")
    for args in (["export", run_copy, "--grid", "5", "-o", tmp_path / "e"],
                 ["posterior", run_copy, run_copy / "nope.h5", "-o", tmp_path / "p.nc"]):
        _clean_error(_invoke(args), re.escape(str(model)))


def test_d4_corrupt_posterior_files_are_messages(run_copy: Path, data_file: Path, tmp_path: Path) -> None:
    (run_copy / "posterior.h5").write_bytes(b"\x89HDF garbage" * 10)
    _clean_error(_invoke(["evaluate", run_copy, "--truth", data_file, "--no-density", "--no-write"]),
                 r"posterior\.h5", "unreadable")
    nc = tmp_path / "posterior.nc"
    nc.write_bytes(b"CDF garbage" * 10)
    from bayes_spi.posterior.coverage import coverage_from_netcdf

    with pytest.raises(ValueError, match=r"posterior\.nc.*unreadable"):
        coverage_from_netcdf(nc, data_file)


def test_d4_unwritable_outputs_are_messages(fitted_run: Path, data_file: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _clean_error(_invoke(["fit", data_file, "-o", blocker / "run", *TINY]), "expected a writable directory")
    _clean_error(_invoke(["phase", fitted_run, "-o", blocker / "d.mrc", "--starts", "1", "--iterations", "10"]),
                 "expected a writable directory")
    _clean_error(_invoke(["posterior", fitted_run, data_file, "-o", blocker / "p.nc", "--no-progress"]),
                 "expected a writable directory")
    _clean_error(_invoke(["simulate", "-o", blocker / "s.h5", "--n-patterns", "2", "--no-progress"]),
                 "expected a writable directory")


def test_d4_missing_cuda_is_refused_before_anything_is_written(data_file: Path, tmp_path: Path,
                                                                monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = tmp_path / "run"
    _clean_error(_invoke(["fit", data_file, "-o", run, *TINY, "--device", "cuda"]), "--device", "no CUDA")
    assert not run.exists(), "a partial run directory was left behind"


def test_d4_one_pattern_file_is_refused_without_leftovers(tmp_path: Path) -> None:
    geom = get_preset("reference-32")
    data = write_simulation(tmp_path / "one.h5", np.ones((1, *geom.shape), np.int32), geom)
    run = tmp_path / "run"
    _clean_error(_invoke(["fit", data, "-o", run, *TINY]), r"one\.h5", "at least 2 patterns", "got 1")
    assert not run.exists(), "config.yaml / run.log were left behind"


def test_d4_non_integer_float_counts_are_refused(tmp_path: Path) -> None:
    geom = get_preset("reference-32")
    path = tmp_path / "float.h5"
    write_simulation(path, np.ones((4, *geom.shape), np.int32), geom)
    with h5py.File(path, "r+") as f:
        del f["data/counts"]
        counts = np.ones((4, *geom.shape), np.float32)
        counts[2, 5, 5] = 1.5
        f.create_dataset("data/counts", data=counts)
    with SPIDataset(path) as ds:
        ds.read([0, 1])  # whole numbers in a float dtype are fine
        with pytest.raises(DataFormatError, match=r"float\.h5.*/data/counts.*non-integer value 1\.5.*pattern index 2"):
            ds.read([2])
    run = tmp_path / "run"
    _clean_error(_invoke(["fit", path, "-o", run, *TINY]), "non-integer")
    assert not run.exists()


# ================================================================ 5. refused inputs
def test_d5_all_masked_mask_is_refused(tmp_path: Path) -> None:
    geom = get_preset("reference-32")
    path = tmp_path / "masked.h5"
    write_simulation(path, np.ones((4, *geom.shape), np.int32), geom)
    with h5py.File(path, "r+") as f:
        f["geometry/mask"][...] = 0
    with pytest.raises(DataFormatError, match=r"masked\.h5.*/geometry/mask.*at least one good pixel"):
        SPIDataset(path)
    run = tmp_path / "run"
    _clean_error(_invoke(["fit", path, "-o", run, *TINY]), "at least one good pixel")
    assert not run.exists()


def test_d5_density_given_to_phase_is_refused(fitted_run: Path, tmp_path: Path) -> None:
    density = tmp_path / "density.mrc"
    res = _invoke(["phase", fitted_run, "-o", density, "--starts", "1", "--iterations", "10", "--no-progress"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    _clean_error(_invoke(["phase", density, "-o", tmp_path / "again.mrc", "--starts", "1", "--iterations", "10"]),
                 r"density\.mrc", "expected an intensity volume", "density")
    assert not (tmp_path / "again.mrc").exists()


def test_d5_report_refuses_non_runs_and_bad_truth(fitted_run: Path, tmp_path: Path) -> None:
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    _clean_error(_invoke(["report", empty]), "expected a run directory")
    assert not (empty / "report.html").exists()
    bad = tmp_path / "truth.h5"
    bad.write_bytes(b"not hdf5 at all")
    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    html = _digest(run / "report.html")
    _clean_error(_invoke(["report", run, "--truth", bad]), "--truth", r"truth\.h5")
    assert _digest(run / "report.html") == html


# ================================================================ 6. no silent overwrites
def test_d6_simulate_and_posterior_do_not_overwrite(fitted_run: Path, data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.h5"
    out.write_text("precious")
    _clean_error(_invoke(["simulate", "-o", out, "--n-patterns", "2", "--truth-grid", "0", "--no-progress"]),
                 "already exists", "--force")
    assert out.read_text() == "precious"
    res = _invoke(["simulate", "-o", out, "--n-patterns", "2", "--truth-grid", "0", "--no-progress", "--force"])
    assert res.exit_code == 0, res.output
    with SPIDataset(out) as ds:
        assert ds.n_patterns == 2
    nc = tmp_path / "post.nc"
    nc.write_text("precious")
    _clean_error(_invoke(["posterior", fitted_run, data_file, "-o", nc, "--no-progress", "--draws", "2"]),
                 "already exists", "--force")
    assert nc.read_text() == "precious"


def test_d6_export_keeps_the_runs_own_intensity(run_copy: Path) -> None:
    before = {name: _digest(run_copy / name) for name in ("intensity.mrc", "intensity.h5")}
    res = _invoke(["export", run_copy, "--grid", "5"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert {name: _digest(run_copy / name) for name in before} == before
    assert (run_copy / "intensity_g5.mrc").is_file() and (run_copy / "intensity_g5.h5").is_file()
    _clean_error(_invoke(["export", run_copy, "--grid", "5", "--stem", "intensity"]), "already exists", "--force")
    _clean_error(_invoke(["export", run_copy, "--grid", "5"]), "already exists")  # a second export too
    assert {name: _digest(run_copy / name) for name in before} == before
    res = _invoke(["export", run_copy, "--grid", "5", "--force"])
    assert res.exit_code == 0, res.output


def test_d6_resume_keeps_the_original_grid(fitted_run: Path, data_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    res = _invoke(["fit", data_file, "-o", run, "--resume", "--no-progress", "--no-truth"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    with h5py.File(run / "intensity.h5", "r") as f:
        assert f["intensity"].shape == (9, 9, 9), "--resume used the default grid instead of the run's"


# ================================================================ 8. smaller items
def test_d8_symlink_loop_and_directory_inputs_say_what_they_are(fitted_run: Path, tmp_path: Path) -> None:
    loop = tmp_path / "loop.h5"
    os.symlink(loop, loop)
    out = _clean_error(_invoke(["fit", loop, "-o", tmp_path / "r1", *TINY]), "symbolic link loop")
    assert "not found" not in out
    folder = tmp_path / "folder.h5"
    folder.mkdir()
    out = _clean_error(_invoke(["fit", folder, "-o", tmp_path / "r2", *TINY]), "directory")
    assert "not found" not in out
    out = _clean_error(_invoke(["simulate", "-o", tmp_path / "s.h5", "--mask", folder, "--n-patterns", "2",
                                "--no-progress"]), "mask file", "directory")
    assert "not found" not in out
    out = _clean_error(_invoke(["phase", loop, "-o", tmp_path / "d.mrc"]), "symbolic link loop")
    assert "not found" not in out
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(run / "model.pt", run / "model.pt")
    out = _clean_error(_invoke(["export", run, "--grid", "5", "-o", tmp_path / "e"]), "symbolic link loop")
    assert "not found" not in out


def test_d8_nan_quaternion_errors_name_the_file(run_copy: Path, data_file: Path, tmp_path: Path) -> None:
    with h5py.File(run_copy / "posterior.h5", "r+") as f:
        q = f["pose_quaternion"][()]
        q[3] = np.nan
        f["pose_quaternion"][...] = q
    _clean_error(_invoke(["evaluate", run_copy, "--truth", data_file, "--no-density", "--no-write"]),
                 re.escape(str(run_copy / "posterior.h5")), "pose_quaternion", "non-finite")
    bad = tmp_path / "bad.h5"
    shutil.copy(data_file, bad)
    with h5py.File(bad, "r+") as f:
        f["truth/quaternions"][0] = np.nan
    with SPIDataset(bad) as ds, pytest.raises(DataFormatError, match=r"bad\.h5.*/truth/quaternions"):
        ds.truth_rotations()


def test_d8_failed_posterior_leaves_no_empty_directory(fitted_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.h5"
    geom = get_preset("reference-64")  # another detector than the run's
    write_simulation(other, np.ones((2, *geom.shape), np.int32), geom)
    out = tmp_path / "new" / "deeper" / "post.nc"
    _clean_error(_invoke(["posterior", fitted_run, other, "-o", out, "--no-progress", "--draws", "2"]))
    assert not (tmp_path / "new").exists()


def test_d8_int32_overflow_in_simulate_is_explained(tmp_path: Path) -> None:
    out = tmp_path / "bright.h5"
    _clean_error(_invoke(["simulate", "-o", out, "--n-patterns", "2", "--truth-grid", "0", "--mean-photons", "1e16",
                          "--no-progress"]), "int32", "--mean-photons")
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_d8_design_notes_cited_by_docstrings_are_in_the_repository() -> None:
    root = Path(__file__).resolve().parent.parent
    design = root / "docs" / "DESIGN.md"
    assert design.is_file()
    sections = set(re.findall(r"^## (\d+)\.", design.read_text(encoding="utf-8"), re.M))
    cites = []
    for py in (root / "bayes_spi").rglob("*.py"):
        for line in py.read_text(encoding="utf-8").splitlines():
            if "DESIGN" in line:
                cites.append((py.name, line))
                assert "docs/DESIGN.md" in line, f"{py}: cites DESIGN without its path: {line.strip()}"
                for n in re.findall(r"DESIGN\.md`*\s+section (\d+)", line):
                    assert n in sections, f"{py}: section {n} is not in docs/DESIGN.md"
    assert len(cites) >= 5
