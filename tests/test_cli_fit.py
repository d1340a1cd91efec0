"""`bayes-spi fit` and `bayes-spi demo` end to end on tiny problems: outputs, exact resume, bad inputs,
and the evaluation's rotation side."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import mrcfile
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from scipy.spatial.transform import Rotation

from bayes_spi import __version__
from bayes_spi.cli.main import cli
from bayes_spi.dataio.h5 import SPIDataset, write_simulation
from bayes_spi.geometry import get_preset
from bayes_spi.infer.config import FitConfig
from bayes_spi.infer.evaluate import EVALUATION_KEYS, evaluate_run, format_evaluation
from bayes_spi.infer.outputs import field_on_grid
from bayes_spi.models.fields import IntensityField

#: tiny fit settings: 96 patterns / 16 = 6 steps per epoch, 2 epochs = 12 steps
# one exact EMC iteration on a 512-rotation grid: a tiny fit at about half the cost (no test here is about either)
TINY = ["--batch-size", "16", "--epochs", "2", "--field-width", "16", "--n-heads", "1",
        "--polish-iterations", "1", "--search-rotations", "512",
        "--pixels-per-pattern", "64", "--grid", "17", "--no-progress"]
N_PATTERNS = 96
TOTAL_STEPS = 12


def _invoke(args: list[str]):
    result = CliRunner().invoke(cli, args)
    return result


@pytest.fixture(scope="module")
def data_file(simulated) -> Path:
    return simulated(N_PATTERNS, truth_grid=17, chunk=32)


@pytest.fixture(scope="module")
def fitted_run(data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    run = tmp_path_factory.mktemp("fit") / "run"
    result = _invoke(["fit", str(data_file), "-o", str(run), *TINY, "--log-every", "5"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return run, result.output


# ---------------------------------------------------------------------------------------------- (1)
def test_fit_writes_all_outputs(fitted_run: tuple[Path, str], data_file: Path) -> None:
    run, output = fitted_run
    # config.yaml: every setting, the version, the command line
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["bayes_spi_version"] == __version__
    assert "fit" in cfg["command"] and "--batch-size 16" in cfg["command"]
    assert cfg["settings"]["batch_size"] == 16 and cfg["settings"]["field_width"] == 16
    assert cfg["settings"]["log_every"] == 5 and cfg["settings"]["n_heads"] == 1
    assert cfg["data"]["path"] == str(data_file.resolve()) and cfg["data"]["n_patterns"] == N_PATTERNS
    assert cfg["versions"]["torch"] == str(torch.__version__) and cfg["device"] == "cpu"
    assert re.match(r"\d{4}-\d\d-\d\dT", cfg["created"])
    # run.log: timestamped INFO lines
    log_text = (run / "run.log").read_text()
    # the EMC warm start takes the first 9 of the 12 data batches in steps of emc_batches=4 (4, 8, 9), then SVI
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO +step 8/12 .*EMC warm start", log_text, re.M), log_text
    assert re.search(r"INFO +step 10/12 images \d+ ", log_text) and "EMC" not in log_text.split("step 10/12")[1].splitlines()[0]
    # metrics.csv: one row per log interval (and the last step)
    with open(run / "metrics.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        rows = list(reader)
    for col in ("step", "images_seen", "elbo_per_image", "images_per_s"):
        assert col in header
    assert [int(r["step"]) for r in rows] == [8, 10, 12]
    # 3 of the 96 patterns (1/32) are held out for the verdict and never trained on: 2 epochs see 2 x 93
    images = [int(r["images_seen"]) for r in rows]
    assert images == sorted(images) and images[-1] == 2 * (N_PATTERNS - 3)
    assert all(math.isfinite(float(r["elbo_per_image"])) for r in rows)
    # model.pt
    ck = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    assert ck["state"]["step"] == TOTAL_STEPS and any(k.startswith("field.") for k in ck["model"])
    # intensity.mrc / .h5: 17^3, voxel size = q spacing (1/A) up to the detector's q_max
    geom = get_preset("reference-32")
    q_max = float(torch.as_tensor(geom.q_vectors(), dtype=torch.float32).norm(dim=-1).max())
    with mrcfile.open(run / "intensity.mrc", permissive=False) as mrc:
        assert mrc.data.shape == (17, 17, 17)
        assert float(mrc.voxel_size.x) == pytest.approx(q_max / 8, rel=1e-5)
        assert np.all(np.isfinite(mrc.data)) and float(mrc.data.min()) >= 0
    with h5py.File(run / "intensity.h5") as f:
        assert f["intensity"].shape == (17, 17, 17)
        assert f["intensity"].attrs["voxel_size_inv_A"] == pytest.approx(q_max / 8, rel=1e-5)
    # posterior.h5
    with h5py.File(run / "posterior.h5") as f:
        quat = f["pose_quaternion"][()]
        w = f["hypothesis_weights"][()]
        sd = f["scale_sd"][()]
        refined = int(f.attrs["refined"])
        mean_best, ambiguous = float(f.attrs["mean_best_weight"]), float(f.attrs["ambiguous_fraction"])
        hq = f["hypothesis_quaternions"][()]
    assert quat.shape == (N_PATTERNS, 4)
    np.testing.assert_allclose(np.linalg.norm(quat, axis=1), 1.0, atol=1e-5)
    # report.png: a real PNG of the expected size (2 x 3 panels; figure size x dpi of the overview), not blank
    import matplotlib.image as mpimg

    png = run / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(png)
    from bayes_spi.report.figures import overview_size_px

    assert img.shape[:2] == overview_size_px() and img[..., :3].std() > 0.05
    # hypotheses: 4 refined local modes, the two best seeds and their Rz(pi) twins (weights may be 0 for a
    # merged duplicate); the best one is the pose
    assert w.shape == (N_PATTERNS, 4) and refined == 1
    best = hq[np.arange(N_PATTERNS), w.argmax(1)]
    np.testing.assert_allclose(np.abs((best * quat).sum(1)), 1.0, atol=1e-5)
    assert mean_best == pytest.approx(float(w.max(1).mean()), abs=1e-5)
    assert ambiguous == pytest.approx(float((w.max(1) < 0.9).mean()), abs=1e-9)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-5)
    assert np.all(sd > 0)
    # evaluation.json and the summary
    ev = json.loads((run / "evaluation.json").read_text())
    verdict = json.loads((run / "verdict.json").read_text())
    assert ev.pop("verdict") == verdict["status"] in ("converged", "unconverged", "failed")
    assert ev.pop("format_version") == verdict["format_version"] == 1  # read back through RunDir.read_json
    assert set(ev) == set(EVALUATION_KEYS)
    # the truth-free verdict is printed with its numbers, and the sampling report was written
    assert "FIT " in output and "nats/photon" in output and "predicted better than by the radial average" in output
    assert 0 <= verdict["checks"]["information_q"] <= max(verdict["checks"]["shell_q_edges"])
    sampling = json.loads((run / "sampling.json").read_text())
    assert sampling["diameter_A"] > 0 and sampling["oversampling"] > 0
    assert ev["n_patterns"] == N_PATTERNS
    for key in EVALUATION_KEYS:
        assert math.isfinite(ev[key]), key
    assert 0 <= ev["median_pose_error_mod_rotz_deg"] <= ev["median_pose_error_deg"] + 1e-6 <= 180
    assert "images/s" in output and "final ELBO" in output and "median orientation error" in output
    assert str(run) in output
    # no half-written files after a clean run
    assert not list(run.glob("*.tmp"))


def test_config_roundtrip(fitted_run: tuple[Path, str]) -> None:
    from bayes_spi.infer.rundir import read_config

    run, _ = fitted_run
    cfg = read_config(run)
    assert cfg.batch_size == 16 and cfg.pixels_per_pattern == 64 and cfg.epochs == 2


# ---------------------------------------------------------------------------------------------- (2)
def _metric_rows(path: Path) -> list[tuple[str, str, str]]:
    with open(path, newline="") as fh:
        return [(r["step"], r["images_seen"], r["elbo_per_image"]) for r in csv.DictReader(fh)]


def test_resume_after_kill_matches_uninterrupted(data_file: Path, tmp_path: Path, fit_in_background) -> None:
    args = [*TINY, "--epochs", "3", "--log-every", "1", "--checkpoint-every", "2"]  # 18 steps
    killed = tmp_path / "killed"
    with fit_in_background(data_file, killed, [*args, "--no-truth"], cwd=tmp_path) as proc:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "model.pt").exists(), "the run finished before it was killed: the test proves nothing"
    step_at_kill = torch.load(killed / "checkpoint.pt", weights_only=True)["state"]["step"]
    assert 2 <= step_at_kill < 18

    # --resume: settings from config.yaml; a differing training option is ignored with a warning
    res = _invoke(["fit", str(data_file), "-o", str(killed), "--resume", "--no-progress", "--no-truth",
                   "--lr", "0.5", "--grid", "17"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "ignoring --lr" in res.output

    ref = tmp_path / "ref"
    res = _invoke(["fit", str(data_file), "-o", str(ref), *args, "--no-truth"])
    assert res.exit_code == 0, res.output + repr(res.exception)

    a = torch.load(killed / "model.pt", weights_only=True)
    b = torch.load(ref / "model.pt", weights_only=True)
    assert a["state"]["step"] == b["state"]["step"] == 18
    for part in ("model", "guide"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.allclose(a[part][key].double(), b[part][key].double(), rtol=1e-6, atol=1e-7), (part, key)
    rows_a, rows_b = _metric_rows(killed / "metrics.csv"), _metric_rows(ref / "metrics.csv")
    # the EMC warm start (14 of 18 batches) takes steps of up to emc_batches=4 data batches, then SVI one each
    assert [r[0] for r in rows_b] == [str(s) for s in (4, 8, 12, 14, 15, 16, 17, 18)]
    assert rows_a == rows_b
    for run in (killed, ref):
        assert not list(run.glob("*.tmp"))
    assert "resumed from" in (killed / "run.log").read_text()


# ---------------------------------------------------------------------------------------------- (3)
def _snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _copy_with(src: Path, dst: Path, edit) -> Path:
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


def _assert_clean_error(result, *needles: str) -> None:
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


def test_missing_data_file(tmp_path: Path) -> None:
    res = _invoke(["fit", str(tmp_path / "nothere.h5"), "-o", str(tmp_path / "run"), "--no-progress"])
    _assert_clean_error(res, "nothere.h5", "not found")
    assert res.exit_code == 1
    assert not (tmp_path / "run").exists()


def test_file_without_counts(tmp_path: Path) -> None:
    bad = tmp_path / "layout.h5"
    with h5py.File(bad, "w") as f:
        f.attrs["format"] = "bayes-spi"
        f.attrs["format_version"] = 1
        f.create_dataset("data/other", data=np.zeros(3))
    res = _invoke(["fit", str(bad), "-o", str(tmp_path / "run"), "--no-progress"])
    _assert_clean_error(res, "layout.h5", "/data/counts", "expected")
    assert res.exit_code == 1


def test_mismatched_mask(data_file: Path, tmp_path: Path) -> None:
    def edit(f: h5py.File) -> None:
        del f["geometry/mask"]
        f["geometry"].create_dataset("mask", data=np.ones((16, 16), dtype=np.uint8))

    bad = _copy_with(data_file, tmp_path / "mask.h5", edit)
    res = _invoke(["fit", str(bad), "-o", str(tmp_path / "run"), "--no-progress"])
    _assert_clean_error(res, "mask.h5", "/geometry/mask", "(32, 32)")
    assert res.exit_code == 1


@pytest.mark.parametrize("kind", ["negative", "nan"])
def test_bad_counts_leave_resumed_run_untouched(kind: str, data_file: Path, fitted_run: tuple[Path, str],
                                                tmp_path: Path) -> None:
    def edit(f: h5py.File) -> None:
        counts = f["data/counts"][()]
        if kind == "negative":
            counts[70, 10, 10] = -3  # (10, 10) is a good pixel (the beam stop is at the centre)
            del f["data/counts"]
            f.create_dataset("data/counts", data=counts, chunks=(32, 32, 32))
        else:
            fl = counts.astype(np.float32)
            fl[70, 10, 10] = np.nan
            del f["data/counts"]
            f.create_dataset("data/counts", data=fl, chunks=(32, 32, 32))

    bad = _copy_with(data_file, tmp_path / f"{kind}.h5", edit)
    run = tmp_path / "run"
    shutil.copytree(fitted_run[0], run)
    before = _snapshot(run)
    res = _invoke(["fit", str(bad), "-o", str(run), "--resume", "--no-progress"])
    expected = "non-negative" if kind == "negative" else "finite"
    _assert_clean_error(res, f"{kind}.h5", "/data/counts", expected, "pattern index 70")
    assert res.exit_code == 1
    assert _snapshot(run) == before
    # and a fresh fit on it writes nothing
    res = _invoke(["fit", str(bad), "-o", str(tmp_path / "fresh"), "--no-progress"])
    _assert_clean_error(res, "/data/counts", expected)
    assert not (tmp_path / "fresh").exists()


def test_unknown_geometry_preset(tmp_path: Path) -> None:
    res = _invoke(["simulate", "-o", str(tmp_path / "x.h5"), "--geometry", "reference-33", "--no-progress"])
    _assert_clean_error(res, "--geometry", "reference-33", "reference-32")
    assert not (tmp_path / "x.h5").exists()


def test_existing_run_needs_resume_or_force(data_file: Path, fitted_run: tuple[Path, str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(fitted_run[0], run)
    before = _snapshot(run)
    res = _invoke(["fit", str(data_file), "-o", str(run), *TINY])
    _assert_clean_error(res, str(run), "--resume", "--force")
    assert res.exit_code == 1
    assert _snapshot(run) == before
    res = _invoke(["fit", str(data_file), "-o", str(tmp_path / "new"), "--resume", "--no-progress"])
    _assert_clean_error(res, "checkpoint.pt")


# ---------------------------------------------------------------------------------------------- evaluation side
class _Anisotropic(IntensityField):
    """``I(q) = exp(-q^T A q / q_max^2) * (1 + q_x^2/q_max^2)``, optionally at ``G q``."""

    def __init__(self, q_max: float, G: np.ndarray | None = None) -> None:
        super().__init__(q_max)
        self.register_buffer("A", torch.tensor([[1.0, 0.3, 0.0], [0.3, 4.0, 0.5], [0.0, 0.5, 9.0]]))
        self.register_buffer("G", torch.as_tensor(np.eye(3) if G is None else G, dtype=torch.float32))

    def log_intensity(self, q: torch.Tensor) -> torch.Tensor:
        x = (q @ self.G.T) / self.q_max
        return -(x @ self.A * x).sum(-1) + torch.log1p(x[..., 0] ** 2)


def test_evaluation_rotation_side(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reconstruction equal to the truth rotated, ``I_est(x) = I_true(G x)``, with poses
    ``R_est = G^T R_true`` scores a perfect evaluation; the opposite side does not."""
    geom = get_preset("reference-32")
    n, n_grid = 40, 17
    q_max = geom.q_max
    R_true = Rotation.random(n, random_state=1).as_matrix()
    G = Rotation.from_rotvec([0.4, -0.9, 0.3]).as_matrix()
    truth_field = _Anisotropic(q_max)
    I_true, dq = field_on_grid(truth_field, n_grid, q_max)
    scales = np.exp(np.random.default_rng(0).normal(0, 0.3, n))
    data = write_simulation(tmp_path / "truth.h5", np.zeros((n, 32, 32), dtype=np.int32), geom,
                            quaternions=Rotation.from_matrix(R_true).as_quat(scalar_first=True),
                            scales=scales, intensity=I_true, voxel_size=dq)
    run = tmp_path / "run"
    run.mkdir()
    R_est = np.swapaxes(G, -1, -2)[None] @ R_true
    with h5py.File(run / "posterior.h5", "w") as f:
        f["pose_quaternion"] = Rotation.from_matrix(R_est).as_quat(scalar_first=True)
        f["scale_mean"] = 2.0 * scales
    import bayes_spi.infer.evaluate as ev_mod

    est = _Anisotropic(q_max, G)  # I_est(x) = I_true(G x)
    monkeypatch.setattr(ev_mod, "load_field", lambda path, geometry=None: (est, q_max))
    d = evaluate_run(run, data)
    assert set(d) == set(EVALUATION_KEYS)
    assert d["median_pose_error_deg"] < 1e-3 and d["median_pose_error_mod_rotz_deg"] < 1e-3
    assert d["wrong_mode_fraction"] == 0.0
    assert d["fluence_corr"] == pytest.approx(1.0, abs=1e-9)
    assert d["intensity_corr"] > 0.9999 and d["log_intensity_corr"] > 0.9999
    # the wrong side (sampling at G q) is clearly worse: the test can fail
    wrong, _ = field_on_grid(est, n_grid, q_max, rotation=G)
    from bayes_spi.metrics import intensity_correlation

    assert intensity_correlation(wrong, I_true, transform="log") < 0.99
    table = format_evaluation(d)
    assert "median orientation error" in table and "intensity correlation" in table


# ---------------------------------------------------------------------------------------------- (4)
def test_demo_quick(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    res = _invoke(["demo", "--out", str(out), "--quick", "--no-progress"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    m = re.search(r"median orientation error: ([-+\w.]+) deg", res.output)
    m2 = re.search(r"median orientation error mod Rz\(pi\): ([-+\w.]+) deg", res.output)
    c = re.search(r"intensity correlation: ([-+\w.]+)", res.output)
    assert m and m2 and c, res.output
    for value in (m.group(1), m2.group(1), c.group(1)):
        assert math.isfinite(float(value))
    assert 0 <= float(m2.group(1)) <= float(m.group(1)) <= 180
    assert -1 <= float(c.group(1)) <= 1
    for name in ("data.h5", "config.yaml", "model.pt", "posterior.h5", "evaluation.json"):
        assert (out / name).is_file(), name
    with SPIDataset(out / "data.h5") as ds:
        assert ds.n_patterns == 256 and ds.has_truth


# ---------------------------------------------------------------------------------------------- resume hazards
class _Interrupt(Exception):
    """Stands in for a kill right after a given step (in-process, cheap)."""


def _tiny_trainer(data_file: Path, run: Path, **overrides):
    import pyro

    from bayes_spi.infer.config import FitConfig
    from bayes_spi.infer.trainer import Trainer

    # emc_fraction 0: these tests exercise the step mechanics one data batch per step (SVI); the EMC warm start
    # (several batches per step) has its own resume test below
    cfg = FitConfig(**{"batch_size": 16, "epochs": 1, "field_width": 16, "n_heads": 1, "pixels_per_pattern": 64,
                       "encoder_features": 32, "encoder_channels": 8, "emc_fraction": 0.0, **overrides})
    pyro.set_rng_seed(cfg.seed)
    return Trainer(SPIDataset(data_file), cfg, run, progress=False)


def _stop_after(step: int):
    def hook(state) -> None:
        if state.step == step:
            raise _Interrupt

    return hook


def test_resume_between_log_rows_keeps_metrics(data_file: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut"
    t = _tiny_trainer(data_file, cut, log_every=4, checkpoint_every=2)
    with pytest.raises(_Interrupt):
        t.fit(on_step=_stop_after(3))  # last checkpoint: step 2, mid log interval
    t.dataset.close()
    t = _tiny_trainer(data_file, cut, log_every=4, checkpoint_every=2)
    t.fit(resume=True)
    t.dataset.close()
    ref = tmp_path / "ref"
    t = _tiny_trainer(data_file, ref, log_every=4, checkpoint_every=2)
    t.fit()
    t.dataset.close()
    assert _metric_rows(cut / "metrics.csv") == _metric_rows(ref / "metrics.csv")


def test_resume_inside_the_emc_warm_start_is_exact(data_file: Path, tmp_path: Path) -> None:
    """Killed after the first EMC step (4 data batches), resumed: the same model as an uninterrupted fit."""
    kw = {"epochs": 2, "emc_fraction": 0.75, "emc_batches": 4, "log_every": 1, "checkpoint_every": 4,
          "search_rotations": 256, "cache_grid": 17}
    cut = tmp_path / "cut"
    t = _tiny_trainer(data_file, cut, **kw)
    with pytest.raises(_Interrupt):
        t.fit(on_step=_stop_after(8))  # the checkpoint at step 4 (one EMC step) is the one resumed from
    t.dataset.close()
    t = _tiny_trainer(data_file, cut, **kw)
    t.fit(resume=True)
    t.dataset.close()
    resumed = t.model.state_dict()
    ref = tmp_path / "ref"
    t = _tiny_trainer(data_file, ref, **kw)
    t.fit()
    t.dataset.close()
    assert t.state.step == 12 and t.emc_end == 9
    for k, v in t.model.state_dict().items():
        assert torch.allclose(v, resumed[k], rtol=1e-6, atol=1e-7), k
    assert _metric_rows(cut / "metrics.csv") == _metric_rows(ref / "metrics.csv")


def test_log_every_does_not_change_training(data_file: Path, tmp_path: Path) -> None:
    states = []
    for every in (1, 6):
        t = _tiny_trainer(data_file, tmp_path / f"log{every}", log_every=every, checkpoint_every=100)
        t.fit()
        t.dataset.close()
        states.append({k: v.clone() for k, v in t.model.state_dict().items()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_max_minutes_sizes_the_schedule_instead_of_cutting_it(data_file: Path, tmp_path: Path) -> None:
    """A budget far shorter than the data's schedule: the trainer measures its throughput, shortens the schedule
    and runs it to its end (radius 1, final learning rate), rather than stopping half-way through it."""
    t = _tiny_trainer(data_file, tmp_path / "run", epochs=30, emc_fraction=0.5, emc_batches=2, max_minutes=0.04,
                      search_rotations=256, cache_grid=17, checkpoint_every=1000, log_every=1000)
    t.fit()
    t.dataset.close()
    st = t.state
    assert t.data_steps == 180
    assert 0 < st.planned_steps < t.data_steps, st  # the schedule was sized from the measured throughput
    assert st.step == t.total_steps == st.planned_steps  # ... and completed
    assert t.radius(st.step) == 1.0
    assert st.elapsed_s < 1.5 * 60 * 0.04 + 5.0
