"""Reload a finished run: the trained model (field, priors, likelihood) and guide from ``model.pt``.

Example::

    trained = load_trained("run1")           # or the path of model.pt
    post = trained.guide.posterior(images)   # per-pattern posterior parameters
    I = trained.model.field(q)               # the intensity field
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bayes_spi.geometry import Geometry
from bayes_spi.guides.amortized import AmortizedGuide
from bayes_spi.infer.build import build_model_and_guide
from bayes_spi.infer.config import FitConfig
from bayes_spi.infer.rundir import RunDir
from bayes_spi.models.spi import SPIModel
from bayes_spi.paths import check_input_file

__all__ = ["Trained", "load_trained", "model_path_of", "read_model_file", "stored_geometry"]


@dataclass
class Trained:
    """A reloaded run: ``model`` and ``guide`` in eval mode on ``device``, with the fit's settings.

    Attributes:
        model, guide: the trained :class:`SPIModel` and :class:`AmortizedGuide` (the guide's scorer and
            orientation search are attached and the search cache is filled from the trained field).
        config: the fit's :class:`FitConfig`.
        geometry: the detector geometry the model was trained on (with its mask).
        q_max: largest ``|q|`` of the detector's pixel centres (1/A).
        path: the ``model.pt`` file.
    """

    model: SPIModel
    guide: AmortizedGuide
    config: FitConfig
    geometry: Geometry
    q_max: float
    path: Path


def model_path_of(run: str | os.PathLike[str]) -> Path:
    """``run/model.pt`` for a run directory, or ``run`` itself when it names a file (``*.pt`` or existing).

    A fit that is still running has no ``model.pt`` yet: its latest ``checkpoint.pt`` (written atomically,
    with the same entries) is read instead, without the run's lock, so that ``report`` and ``export`` show the
    reconstruction as it forms."""
    p = Path(run)
    if p.suffix == ".pt" or p.is_file():
        return p
    run_dir = RunDir(p)
    model = run_dir.path("model")
    if not model.exists() and run_dir.path("checkpoint").is_file():
        return run_dir.path("checkpoint")
    return model


def read_model_file(run: str | os.PathLike[str], need: tuple[str, ...] = ("config", "model")
                    ) -> tuple[Path, dict, FitConfig]:
    """``(path, checkpoint dict, FitConfig)`` of a run's ``model.pt`` (a run directory or the file).

    The file is read with ``weights_only=True`` (:func:`bayes_spi.torchfile.load_torch_file`): a crafted
    file cannot run code.

    Raises:
        FileNotFoundError: no ``model.pt`` (IsADirectoryError / OSError with an accurate message for a
            directory or a symbolic-link loop).
        ValueError: not a bayes-spi model file (empty, truncated, foreign, an entry of ``need`` missing) or
            an invalid config (:class:`~bayes_spi.torchfile.TorchFileError` is a ValueError); a format version
            this bayes-spi cannot read (:class:`~bayes_spi.infer.rundir.RunFormatError`, a ValueError).
    """
    path = model_path_of(run)
    check_input_file(path, "the trained model of a finished run (model.pt)")
    key = "checkpoint" if path.name == RunDir.name("checkpoint") else "model"  # a running fit's checkpoint
    ck = RunDir(path.parent).read_torch(key, path, map_location="cpu",
                                        what=f"a bayes-spi model file ({RunDir.name('model')})")
    missing = [k for k in need if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise ValueError(f"{os.fspath(path)}: expected a bayes-spi model file with entries {', '.join(need)}; "
                         f"missing {missing}")
    try:
        if not isinstance(ck["config"], dict):
            raise TypeError(f"expected a mapping, got {type(ck['config']).__name__}")
        config = FitConfig.from_dict(ck["config"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{os.fspath(path)}: field config: {exc}") from None
    return path, ck, config


def stored_geometry(ck: dict, path: Path) -> Geometry:
    """The detector geometry (with its mask) stored in a ``model.pt`` checkpoint dict."""
    if "geometry" not in ck:
        raise ValueError(f"{os.fspath(path)}: field geometry: expected a stored geometry, got missing")
    mask = ck.get("mask")
    if isinstance(mask, torch.Tensor):
        mask = mask.cpu().numpy()
    if not isinstance(ck["geometry"], dict):
        raise ValueError(f"{os.fspath(path)}: field geometry: expected a mapping, got {type(ck['geometry']).__name__}")
    try:
        return Geometry.from_dict(ck["geometry"], mask=None if mask is None else np.asarray(mask, dtype=bool))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{os.fspath(path)}: field geometry: expected a stored detector geometry ({exc})") from None


def load_trained(run: str | os.PathLike[str], device: torch.device | str = "cpu") -> Trained:
    """Rebuild model and guide from a run directory (or its ``model.pt``).

    Raises:
        FileNotFoundError: no ``model.pt``.
        ValueError: the file is not a bayes-spi model (missing entries) or its weights do not fit its config.
    """
    path, ck, config = read_model_file(run, ("config", "geometry", "model", "guide"))
    geometry = stored_geometry(ck, path)
    bg_scales = ck["model"].get("background.log_scale") if isinstance(ck["model"], dict) else None
    model, guide = build_model_and_guide(geometry, config, device=device,
                                         n_patterns=1 if bg_scales is None else max(int(bg_scales.numel()), 1))
    for name, module in (("model", model), ("guide", guide)):
        try:
            module.load_state_dict(ck[name])
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise ValueError(f"{os.fspath(path)}: field {name}: weights do not match the config ({exc})") from None
    model.eval()
    guide.eval()
    guide.weight_floor = 0.0
    if guide.search is not None:
        with torch.no_grad():
            guide.search.refresh()
    q_max = model.q_max
    return Trained(model, guide, config, geometry, q_max, path)
