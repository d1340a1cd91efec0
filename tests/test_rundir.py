"""RunDir: its file names are the ones a tiny fit (and the phasing of it) actually writes; it tells a run
directory from any other; its lock is the fit's lock."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from bayes_spi.infer.rundir import FRESH_START_FILES, RUN_FILE_NAMES, RUN_MARKERS, RunDir, RunLockedError
from bayes_spi.workflows.fit import RUN_FILES, run_fit

#: tiny fit settings: 48 patterns / 16 = 3 steps (as tests/test_workflows.py)
# one exact EMC iteration on a 512-rotation grid: a tiny fit at about half the cost (no test here is about either)
SETTINGS = {"batch_size": 16, "epochs": 1, "field_width": 16, "n_heads": 1, "pixels_per_pattern": 64,
            "polish_iterations": 1, "search_rotations": 512}
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


# ---------------------------------------------------------------------------------------- format versions
#: the JSON files of a run, each read through RunDir.read_json
JSON_KEYS = ("evaluation", "verdict", "sampling", "fsc", "reference", "coverage", "density_json", "halfsets_summary")


def _newer(key: str) -> str:
    """The message for a file of the run file ``key`` at version 99 (none of them is there yet)."""
    name = re.escape(RUN_FILE_NAMES[key])
    return (rf"{name}: field format_version: run made by a newer bayes-spi: {name} format 99, this version reads 1 "
            r"\(update bayes-spi")


def test_every_versioned_file_of_a_fit_carries_its_version(fitted: tuple[Path, dict]) -> None:
    """What the fit (and phasing) wrote carries the format version this bayes-spi writes, and reads back."""
    import json

    import h5py
    import torch
    import yaml

    from bayes_spi.infer.rundir import FORMAT_VERSION_KEY, RUN_FORMAT_VERSIONS

    run_path, _ = fitted
    run = RunDir(run_path)
    current = {key: RunDir.format_version(key) for key in RUN_FORMAT_VERSIONS}
    assert set(current.values()) == {1}
    for key in ("evaluation", "verdict", "sampling", "fsc"):
        assert json.loads(run.path(key).read_text())[FORMAT_VERSION_KEY] == current[key], key
        doc = run.read_json(key)
        assert FORMAT_VERSION_KEY not in doc and doc, key
    assert yaml.safe_load(run.path("config").read_text())[FORMAT_VERSION_KEY] == current["config"]
    for key in ("model", "checkpoint"):
        assert torch.load(run.path(key), weights_only=True)[FORMAT_VERSION_KEY] == current[key], key
        assert run.read_torch(key)[FORMAT_VERSION_KEY] == current[key]
    with h5py.File(run.path("posterior"), "r") as f:
        assert f.attrs[FORMAT_VERSION_KEY] == current["posterior"]
    with run.open_h5("posterior") as f:
        assert f["pose_quaternion"].shape == (N_PATTERNS, 4)
    if run.has("density_json"):  # test_names_are_what_phasing_writes ran first
        assert json.loads(run.path("density_json").read_text())[FORMAT_VERSION_KEY] == current["density_json"]


@pytest.mark.parametrize("key", JSON_KEYS)
def test_json_readers_refuse_a_newer_version_and_read_older_layouts(tmp_path: Path, key: str) -> None:
    """read_json: the current version and a file from before versions (no field) read; version 99 is refused with
    the file, the field and the versions this bayes-spi reads; the version is not in what it returns."""
    import json

    from bayes_spi.infer.rundir import RunFormatError

    run = RunDir(tmp_path)
    path = run.write_json(key, {"a": 1.5, "b": None})
    assert json.loads(path.read_text()) == {"format_version": 1, "a": 1.5, "b": None}
    assert run.read_json(key) == {"a": 1.5, "b": None}
    path.write_text(json.dumps({"a": 2}))  # the previous layout: no version
    assert run.read_json(key) == {"a": 2}
    path.write_text(json.dumps({"format_version": 99, "a": 2}))
    with pytest.raises(RunFormatError, match=_newer(key)):
        run.read_json(key)
    for bad in (0, "1", 1.0, True):
        path.write_text(json.dumps({"format_version": bad}))
        with pytest.raises(RunFormatError, match=r"field format_version: expected a format version \(an integer"):
            run.read_json(key)


def test_commands_read_json_files_through_the_versioned_reader(fitted: tuple[Path, dict], tmp_path: Path) -> None:
    """read_verdict (posterior, half-sets), the report's RunData (verdict, evaluation, fsc) and the fsc.json merge
    refuse a newer file, naming it; a verdict of the previous layout still reads."""
    import json
    import shutil

    from bayes_spi.infer.evaluate import write_fsc_json
    from bayes_spi.infer.rundir import RunFormatError
    from bayes_spi.infer.verdict import read_verdict
    from bayes_spi.report.rundata import RunData

    run_path = tmp_path / "run"
    run_path.mkdir()
    for key in ("config", "verdict", "evaluation", "fsc"):
        shutil.copy(RunDir(fitted[0]).path(key), run_path)
    run = RunDir(run_path)
    verdict = json.loads(run.path("verdict").read_text())
    del verdict["format_version"]
    run.path("verdict").write_text(json.dumps(verdict))  # written before versions
    assert read_verdict(run_path)["status"] == verdict["status"] == RunData(run_path).verdict["status"]
    for key, read in (("verdict", lambda: read_verdict(run_path)), ("verdict", lambda: RunData(run_path).verdict),
                      ("evaluation", lambda: RunData(run_path).evaluation), ("fsc", lambda: RunData(run_path).fsc),
                      ("fsc", lambda: write_fsc_json(run_path, {}))):
        keep = run.path(key).read_text()
        run.path(key).write_text(json.dumps({**json.loads(keep), "format_version": 99}))
        with pytest.raises(RunFormatError, match=_newer(key)):
            read()
        run.path(key).write_text(keep)
    assert RunData(run_path).fsc is not None and RunData(run_path).evaluation is not None


def test_config_yaml_versions(tmp_path: Path) -> None:
    """config.yaml: the current version and the previous layout (no format_version) read; a newer one is refused by
    read_config / read_run_info (and so by --resume, posterior and report)."""
    import yaml

    from bayes_spi.infer.config import FitConfig
    from bayes_spi.infer.rundir import RunFormatError, read_config, read_run_info, write_config

    path = write_config(tmp_path, FitConfig(epochs=3), "data.h5", ["bayes-spi", "fit"])
    doc = yaml.safe_load(path.read_text())
    assert doc["format_version"] == 1 and read_config(tmp_path).epochs == 3
    del doc["format_version"]
    path.write_text(yaml.safe_dump(doc))
    assert read_config(tmp_path).epochs == 3
    path.write_text(yaml.safe_dump({**doc, "format_version": 99}))
    for read in (read_config, read_run_info, lambda d: RunDir(d).read_info()):
        with pytest.raises(RunFormatError, match=_newer("config")):
            read(tmp_path)


def test_torch_file_versions(fitted: tuple[Path, dict], tmp_path: Path) -> None:
    """model.pt (read_model_file: export, phase, posterior, evaluate, report) and checkpoint.pt (--resume's check):
    the current version and the previous layout (no entry) read; a newer one is refused with the message."""
    import torch

    from bayes_spi.infer.load import read_model_file
    from bayes_spi.infer.rundir import RunFormatError
    from bayes_spi.workflows.errors import WorkflowError
    from bayes_spi.workflows.fit import _check_checkpoint

    run = RunDir(tmp_path)
    for key in ("model", "checkpoint"):
        ck = torch.load(RunDir(fitted[0]).path(key), weights_only=True)
        torch.save(ck, run.path(key))
        assert run.read_torch(key)["format_version"] == 1
        ck.pop("format_version")
        torch.save(ck, run.path(key))  # the previous layout
        assert "format_version" not in run.read_torch(key)
        if key == "model":
            assert read_model_file(tmp_path)[2] == read_model_file(fitted[0])[2]
        else:
            _check_checkpoint(run.path(key))
        torch.save({**ck, "format_version": 99}, run.path(key))
        with pytest.raises(RunFormatError, match=_newer(key)):
            run.read_torch(key)
    with pytest.raises(RunFormatError, match=_newer("model")):
        read_model_file(tmp_path)
    with pytest.raises(WorkflowError, match=_newer("checkpoint")):
        _check_checkpoint(run.path("checkpoint"))


def test_hdf5_run_file_versions(fitted: tuple[Path, dict], tmp_path: Path) -> None:
    """posterior.h5 (the report, evaluate) and halfsets.h5: the root attribute format_version is checked; a file
    without it (the previous layout) reads."""
    import shutil

    import h5py
    import numpy as np

    from bayes_spi.infer.halfsets import read_split, write_split
    from bayes_spi.infer.rundir import RunFormatError
    from bayes_spi.report.rundata import RunData

    run = RunDir(tmp_path)
    shutil.copy(RunDir(fitted[0]).path("posterior"), run.path("posterior"))
    h1, h2 = write_split(tmp_path, 10, seed=1)
    assert np.array_equal(read_split(tmp_path)[0], h1)
    assert RunData(tmp_path).n_patterns == N_PATTERNS
    for key in ("posterior", "halfsets"):
        with h5py.File(run.path(key), "a") as f:
            del f.attrs["format_version"]  # the previous layout
    assert np.array_equal(read_split(tmp_path)[1], h2) and RunData(tmp_path).n_patterns == N_PATTERNS
    for key, read in (("posterior", lambda: RunData(tmp_path).n_patterns), ("posterior", lambda: run.open_h5(key)),
                      ("halfsets", lambda: read_split(tmp_path))):
        with h5py.File(run.path(key), "a") as f:
            f.attrs["format_version"] = np.int64(99)
        with pytest.raises(RunFormatError, match=_newer(key)):
            read()
