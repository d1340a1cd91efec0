"""RunDir: its file names are the ones a tiny fit (and the phasing of it) actually writes; it tells a run
directory from any other; its lock is the fit's lock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bayes_spi.infer.rundir import FRESH_START_FILES, RUN_FILE_NAMES, RUN_MARKERS, RunDir, RunLockedError
from bayes_spi.workflows.fit import RUN_FILES, run_fit

#: tiny fit settings: 48 patterns / 16 = 3 steps (as tests/test_workflows.py)
SETTINGS = {"batch_size": 16, "epochs": 1, "field_width": 16, "n_heads": 1, "pixels_per_pattern": 64}
N_PATTERNS = 48

#: what a fit with the truth writes, at the least (a variational field would add intensity_sd*)
FIT_WRITES = ("config", "log", "metrics", "checkpoint", "model", "intensity_mrc", "intensity", "posterior",
              "verdict", "sampling", "evaluation", "fsc", "report", "report_dir", "overview")


@pytest.fixture(scope="module")
def fitted(simulated, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    data = simulated(N_PATTERNS, truth_grid=9, chunk=16)  # the file of tests/test_workflows.py
    run = tmp_path_factory.mktemp("rundir") / "run"
    result = run_fit(data, run, SETTINGS, grid=9, progress=False, echo=lambda text, err: None)
    return run, result


def test_names_are_what_a_fit_writes(fitted: tuple[Path, dict]) -> None:
    run_path, result = fitted
    run = RunDir(run_path)
    written = {p.name for p in run_path.iterdir()}
    names = set(RUN_FILE_NAMES.values())
    assert written <= names, f"files a fit writes that RunDir does not name: {sorted(written - names)}"
    for key in FIT_WRITES:
        assert run.has(key), f"{key}: expected {run.path(key)} after a fit"
    assert not run.has("lock")  # released at the end of the fit
    assert run.is_run() and run.holds_fit()
    # the fit's own record of its outputs uses the same paths
    for path in result["outputs"].values():
        assert path.parent == run_path and path.name in names
    assert result["outputs"]["report"] == run.path("report")
    assert run.read_config().batch_size == SETTINGS["batch_size"]
    assert run.read_info()["outputs"]["grid"] == 9


def test_names_are_what_phasing_writes(fitted: tuple[Path, dict]) -> None:
    from bayes_spi.workflows.phase import run_phase

    run_path, _ = fitted
    run = RunDir(run_path)
    record = run_phase(run_path, starts=1, iterations=5)
    assert Path(record["out"]) == run.path("density")
    assert run.has("density") and run.has("density_json")


def test_is_run_refuses_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    assert not RunDir(tmp_path).is_run()                          # empty
    (tmp_path / "data.h5").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a run\n")
    (tmp_path / "config.yaml").mkdir()                            # a folder with a run file's name
    assert not RunDir(tmp_path).is_run()
    assert not RunDir(tmp_path / "missing").is_run()              # no such directory
    assert not RunDir(tmp_path / "notes.txt").is_run()            # a file
    assert not RunDir(tmp_path).holds_fit()
    for key in RUN_MARKERS:                                       # any one marker makes a run
        d = tmp_path / f"only_{key}"
        d.mkdir()
        RunDir(d).path(key).write_text("")
        assert RunDir(d).is_run(), key


def test_names_keys_and_lock(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert len(set(RUN_FILE_NAMES.values())) == len(RUN_FILE_NAMES)   # one key per name
    assert run.path("posterior") == tmp_path / "posterior.h5" and os.fspath(run) == os.fspath(tmp_path)
    with pytest.raises(KeyError, match="expected one of"):
        run.path("posterior.h5")
    assert RUN_FILES == FRESH_START_FILES
    assert {name.removesuffix(".tmp") for name in FRESH_START_FILES} <= set(RUN_FILE_NAMES.values())
    assert run.sub("half1").path("model") == tmp_path / "half1" / "model.pt"
    with run.lock():
        assert run.has("lock") and run.live_lock_owner()[0] == os.getpid()
        with pytest.raises(RunLockedError):
            run.lock().acquire()
    assert not run.has("lock") and run.live_lock_owner() is None


def test_report_command_refuses_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from bayes_spi.cli.main import cli
    from bayes_spi.cli.report import RUN_MARKERS as CLI_MARKERS

    assert CLI_MARKERS == ("config.yaml", "run.log", "model.pt", "metrics.csv", "checkpoint.pt")
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code != 0 and "expected a run directory" in result.output, result.output
    assert "config.yaml, run.log, model.pt, metrics.csv, checkpoint.pt" in result.output


def test_a_zombie_lock_owner_is_dead(tmp_path: Path) -> None:
    """A lock whose owner exited but was never reaped (a zombie, e.g. an orphaned torchrun rank) is stale."""
    import socket
    import subprocess
    import sys
    import time

    from bayes_spi.infer.rundir import _pid_alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.01)
    try:
        assert not _pid_alive(child.pid)  # exited, not yet reaped: os.kill(pid, 0) alone would say alive
        assert _pid_alive(os.getpid())
        run = RunDir(tmp_path)
        run.path("lock").write_text(f"pid={child.pid}\nhost={socket.gethostname()}\n")
        assert run.live_lock_owner() is None
        with run.lock():  # the stale lock is taken over
            assert run.live_lock_owner()[0] == os.getpid()
    finally:
        child.wait()
