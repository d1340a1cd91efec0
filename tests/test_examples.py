"""The examples under examples/ and the prior/likelihood options of `bayes-spi fit`, end to end on tiny data."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pyro.distributions as dist
import pytest
import torch
import yaml
from click.testing import CliRunner
from pyro import poutine

from bayes_spi.cli.main import cli
from bayes_spi.dataio.h5 import SPIDataset
from bayes_spi.distributions import PoissonGaussianCounts, PreferredOrientationSO3
from bayes_spi.models.likelihoods import PoissonGaussianLikelihood
from bayes_spi.models.priors import EmpiricalScalePrior, PreferredOrientationPrior
from bayes_spi.models.spi import SPIBatch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
N_PATTERNS = 32
TINY = ["--steps", "2", "--batch-size", "16", "--field-width", "16", "--grid", "9"]


def _load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bayes_spi_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def custom_prior() -> ModuleType:
    return _load_example("custom_prior")


@pytest.fixture(scope="module")
def data_file(custom_prior: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example's own default data set (2CEX, reference-32, artifacts FPGB), tiny."""
    path = custom_prior.simulate_example_data(tmp_path_factory.mktemp("data"), n_patterns=N_PATTERNS,
                                              readout_sigma=0.3, seed=1)
    with SPIDataset(path) as ds:
        assert ds.n_patterns == N_PATTERNS
    return path


def _model_trace(model: torch.nn.Module, data: Path) -> poutine.Trace:
    with SPIDataset(data) as ds:
        idx, counts = next(iter(ds.iter_batches(8, shuffle=False)))
    batch = SPIBatch(torch.as_tensor(counts), torch.as_tensor(idx), torch.arange(400, 464))
    trace = poutine.trace(model).get_trace(batch, N_PATTERNS)
    trace.compute_log_prob()
    return trace


def _finite_elbos(rows: list[dict[str, str]]) -> bool:
    return bool(rows) and all(math.isfinite(float(r["elbo_per_image"])) for r in rows)


def test_custom_prior_example(custom_prior: ModuleType, data_file: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    out = custom_prior.main([str(data_file), "-o", str(run), *TINY, "--gamma-shape", "9", "--kappa", "1.5"])
    model = out["model"]
    # the model carries the objects the script built
    assert isinstance(model.scale_prior, custom_prior.GammaScalePrior) and float(model.scale_prior.shape) == 9.0
    assert isinstance(model.pose_prior, PreferredOrientationPrior) and float(model.pose_prior.kappa) == 1.5
    assert isinstance(model.likelihood, PoissonGaussianLikelihood) and model.likelihood.readout_sigma == 0.3
    # the standard trainer ran and wrote its outputs
    assert out["trainer"].state.step == 2
    ck = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    assert float(ck["model"]["scale_prior.shape"]) == 9.0 and float(ck["model"]["pose_prior.kappa"]) == 1.5
    with open(run / "metrics.csv", newline="") as fh:
        assert _finite_elbos(list(csv.DictReader(fh)))
    assert _finite_elbos(out["metrics"])
    assert "final ELBO per image" in capsys.readouterr().out
    # the custom prior's density is what the model scores
    trace = _model_trace(model, data_file)
    scale = trace.nodes["scale"]
    assert isinstance(scale["fn"].base_dist if hasattr(scale["fn"], "base_dist") else scale["fn"], dist.Gamma)
    expected = dist.Gamma(torch.tensor(9.0), torch.tensor(9.0)).log_prob(scale["value"])
    assert torch.allclose(scale["unscaled_log_prob"], expected)
    assert torch.allclose(scale["log_prob"], expected * N_PATTERNS / 8)  # the plate scales it by N / B
    pose = trace.nodes["pose"]
    assert isinstance(pose["fn"], PreferredOrientationSO3)
    assert torch.allclose(pose["unscaled_log_prob"], model.pose_prior(8).log_prob(pose["value"]))
    assert isinstance(trace.nodes["counts"]["fn"], PoissonGaussianCounts)


def test_custom_likelihood_example(data_file: Path, tmp_path: Path) -> None:
    example = _load_example("custom_likelihood")
    out = example.main([str(data_file), "-o", str(tmp_path / "run"), *TINY[2:], "--steps", "1", "--dispersion", "30"])
    model = out["model"]
    assert isinstance(model.likelihood, example.NegativeBinomialLikelihood) and model.likelihood.dispersion == 30.0
    assert (tmp_path / "run" / "model.pt").is_file() and _finite_elbos(out["metrics"])
    trace = _model_trace(model, data_file)
    counts = trace.nodes["counts"]
    assert isinstance(counts["fn"], dist.GammaPoisson)
    # mean lambda, variance lambda + lambda^2 / r
    d = model.likelihood(torch.tensor([math.log(6.0)]))
    assert float(d.mean) == pytest.approx(6.0, rel=1e-5) and float(d.variance) == pytest.approx(6 + 36 / 30, rel=1e-5)


# ---------------------------------------------------------------------------------------------- CLI
# one exact EMC iteration on a 512-rotation grid: a tiny fit at about half the cost (no test here is about either)
FIT_TINY = ["--batch-size", "16", "--max-images", "16", "--field-width", "16", "--n-heads", "1",
            "--polish-iterations", "1", "--search-rotations", "512",
            "--pixels-per-pattern", "64", "--grid", "9", "--no-progress", "--no-truth"]


def test_cli_fit_with_priors_and_likelihood(data_file: Path, tmp_path: Path) -> None:
    from bayes_spi.infer.load import load_trained

    run = tmp_path / "run"
    args = ["fit", str(data_file), "-o", str(run), *FIT_TINY, "--pose-prior", "preferred:axis=0,0,1:kappa=2",
            "--scale-prior", "pr772", "--likelihood", "poisson-gaussian:sigma=0.3"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    settings = yaml.safe_load((run / "config.yaml").read_text())["settings"]
    assert settings["pose_prior"] == {"name": "preferred", "axis": [0.0, 0.0, 1.0], "kappa": 2.0}
    assert settings["scale_prior"] == {"name": "pr772", "smoothing": None}
    assert settings["likelihood"] == {"name": "poisson-gaussian", "sigma": 0.3, "background": 0.0}
    assert settings["intensity_prior"] == {"name": "none"}
    trained = load_trained(run)
    model = trained.model
    assert isinstance(model.pose_prior, PreferredOrientationPrior) and float(model.pose_prior.kappa) == 2.0
    assert isinstance(model.scale_prior, EmpiricalScalePrior)
    assert isinstance(model.likelihood, PoissonGaussianLikelihood) and model.likelihood.readout_sigma == 0.3
    ck = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    assert torch.equal(ck["model"]["scale_prior.locs"], EmpiricalScalePrior.pr772().locs)


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--pose-prior", "preferred:kappa=-2", "preferred: kappa: expected a number >= 0, got -2"),
        ("--pose-prior", "sideways", "unknown pose prior 'sideways': expected one of uniform, preferred"),
        ("--scale-prior", "empirical:file=/no/such/totals.npy", "/no/such/totals.npy"),
        ("--likelihood", "poisson-gaussian", "missing parameter sigma"),
        ("--intensity-prior", "flat", "expected one of none, wilson"),
    ],
)
def test_cli_bad_spec_fails_before_writing(data_file: Path, tmp_path: Path, option: str, value: str,
                                            message: str) -> None:
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["fit", str(data_file), "-o", str(run), *FIT_TINY, option, value])
    assert result.exit_code != 0
    assert option in result.output and message in " ".join(result.output.split()), result.output
    assert not run.exists()
