"""The fit workflow from Python: the same run directory as ``bayes-spi fit``, and errors as values, not exits."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from bayes_spi.cli.main import cli
from bayes_spi.infer.config import FitConfig
from bayes_spi.workflows.errors import WorkflowError
from bayes_spi.workflows.fit import given_settings, run_fit

#: tiny fit settings: 48 patterns / 16 = 3 steps
# one exact EMC iteration on a 512-rotation grid: a tiny fit at about half the cost (no test here is about either)
SETTINGS = {"batch_size": 16, "epochs": 1, "field_width": 16, "n_heads": 1, "pixels_per_pattern": 64,
            "polish_iterations": 1, "search_rotations": 512}
CLI_SETTINGS = ["--batch-size", "16", "--epochs", "1", "--field-width", "16", "--n-heads", "1",
                "--pixels-per-pattern", "64", "--polish-iterations", "1", "--search-rotations", "512"]
N_PATTERNS = 48


@pytest.fixture(scope="module")
def data_file(simulated) -> Path:
    return simulated(N_PATTERNS, truth_grid=9, chunk=16)  # the file of tests/test_hardening.py


def _files(run: Path) -> set[str]:
    return {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}


def test_python_api_and_cli_make_the_same_run_directory(data_file: Path, tmp_path: Path) -> None:
    cli_run, api_run = tmp_path / "cli", tmp_path / "api"
    res = CliRunner().invoke(cli, ["fit", str(data_file), "-o", str(cli_run), *CLI_SETTINGS, "--grid", "9",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    messages: list[tuple[str, bool]] = []
    result = run_fit(data_file, api_run, SETTINGS, grid=9, progress=False,
                     echo=lambda text, err: messages.append((text, err)))

    assert _files(api_run) == _files(cli_run)
    assert {"config.yaml", "run.log", "checkpoint.pt", "model.pt", "verdict.json", "evaluation.json",
            "report.html"} <= _files(api_run)
    assert not (api_run / "fit.lock").exists()  # the lock is released at the end
    cfg_api = yaml.safe_load((api_run / "config.yaml").read_text())
    cfg_cli = yaml.safe_load((cli_run / "config.yaml").read_text())
    assert cfg_api["settings"] == cfg_cli["settings"]
    assert result["run_dir"] == api_run and result["outputs"]["report"] == api_run / "report.html"
    assert result["evaluation"] is not None and messages  # the sampling summary went to echo

    # the Python run is a run like any other: it resumes (nothing left to train) and keeps its grid
    again = run_fit(None, api_run, resume=True, progress=False, check_data=False, echo=lambda text, err: None)
    assert again["state"].step == result["state"].step


def test_workflow_errors_are_values(data_file: Path, tmp_path: Path) -> None:
    with pytest.raises(WorkflowError) as info:
        run_fit(data_file, tmp_path / "r", SETTINGS, resume=True, force=True)
    assert info.value.kind == "usage" and "--resume" in str(info.value)
    with pytest.raises(WorkflowError) as info:
        run_fit(data_file, tmp_path / "r", SETTINGS, grid=4)
    assert (info.value.kind, info.value.setting) == ("parameter", "grid")
    with pytest.raises(WorkflowError, match="unknown names") as info:
        run_fit(data_file, tmp_path / "r", {"batch_sise": 16})
    assert info.value.kind == "parameter"
    with pytest.raises(WorkflowError, match="not found"):
        run_fit(tmp_path / "missing.h5", tmp_path / "r", SETTINGS)
    assert not (tmp_path / "r").exists()  # nothing was written


def test_given_settings() -> None:
    assert given_settings(None) == {}
    assert given_settings({"lr": 0.01}) == {"lr": 0.01}
    assert given_settings(FitConfig(batch_size=16, epochs=3)) == {"batch_size": 16, "epochs": 3}
