"""Build the model and guide for a detector geometry from a :class:`FitConfig`.

The priors and the likelihood come from the specs in the config (``pose_prior``, ``scale_prior``,
``likelihood``, ``intensity_prior``; see :mod:`bayes_spi.config.specs`).

Example:
    >>> from bayes_spi.geometry import get_preset
    >>> model, guide = build_model_and_guide(get_preset("reference-32"), FitConfig(), device="cpu")
    >>> guide.n_hypotheses          # 2 x n_heads encoder hypotheses + n_search search proposals
    10
"""

from __future__ import annotations

from typing import Any

import torch

from bayes_spi.config.fields import field_kind
from bayes_spi.config.specs import FLAGS
from bayes_spi.geometry import Geometry
from bayes_spi.guides.amortized import AmortizedGuide, count_hypotheses
from bayes_spi.guides.search import OrientationSearch
from bayes_spi.infer.config import FitConfig
from bayes_spi.models.fields import IntensityField
from bayes_spi.models.background import PixelBackground
from bayes_spi.models.likelihoods import Likelihood, make_likelihood
from bayes_spi.models.priors import PosePrior, ScalePrior, make_pose_prior, make_scale_prior
from bayes_spi.models.spi import SPIModel, detector_q_max

__all__ = ["build_background", "build_field", "build_model_and_guide", "build_intensity_prior", "detector_tensors"]


def detector_tensors(geometry: Geometry) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q (P, 3)`` in 1/A, ``pixel_factor (P,)`` (solid angle x polarization), ``mask (n_y, n_x)`` bool."""
    q = torch.as_tensor(geometry.q_vectors(), dtype=torch.float64).reshape(-1, 3)
    factor = torch.as_tensor(geometry.pixel_factor(), dtype=torch.float64)
    mask = torch.as_tensor(geometry.good_pixels(), dtype=torch.bool)
    return q, factor.reshape(-1), mask


def build_background(config: FitConfig, geometry: Geometry, n_patterns: int) -> PixelBackground | None:
    """The measured background of ``config.background_file`` (binned by ``config.mask_bin``) with its scale
    (``config.background_scale``), 0 on masked pixels; ``None`` without a background file.

    Raises:
        FileNotFoundError / DataFormatError: the file is missing or not a map of the detector's shape.
    """
    if not config.background_file:
        return None
    from bayes_spi.dataio.masks import read_pixel_map

    rate = read_pixel_map(config.background_file, geometry.shape, config.mask_bin) * geometry.good_pixels()
    return PixelBackground(torch.as_tensor(rate.reshape(-1)), config.background_scale, n_patterns=n_patterns)


def build_field(config: FitConfig, q_max: float) -> IntensityField:
    """The intensity field named by ``config.field`` (its constructor and settings from the registry
    :data:`bayes_spi.config.fields.FIELDS`), invariant under ``config.symmetry``."""
    field = field_kind(config.field).build(q_max, config)
    field.set_symmetry(config.symmetry)
    return field


def build_intensity_prior(spec: dict[str, Any], q_max: float) -> torch.nn.Module | None:
    """The intensity prior of ``spec`` (``None`` for ``{"name": "none"}``), from
    :func:`bayes_spi.models.intensity_priors.make_intensity_prior` (imported only when needed).

    Raises:
        ValueError: the spec names a prior but :mod:`bayes_spi.models.intensity_priors` is missing.
    """
    if spec.get("name", "none") == "none":
        return None
    try:
        from bayes_spi.models.intensity_priors import make_intensity_prior
    except ImportError as exc:
        raise ValueError(f"{FLAGS['intensity_prior']} {spec.get('name')}: expected the module "
                         f"bayes_spi.models.intensity_priors, got an import error ({exc})") from None
    return make_intensity_prior(spec, q_max)


def build_model_and_guide(
    geometry: Geometry,
    config: FitConfig,
    device: torch.device | str = "cpu",
    *,
    pose_prior: PosePrior | None = None,
    scale_prior: ScalePrior | None = None,
    likelihood: Likelihood | None = None,
    intensity_prior: torch.nn.Module | None = None,
    background: PixelBackground | None = None,
    n_patterns: int = 1,
    field: IntensityField | None = None,
) -> tuple[SPIModel, AmortizedGuide]:
    """Model (field, priors, likelihood) and guide (encoder + heads) on ``device``.

    The priors and the likelihood are built from the config's specs, unless objects are given (e.g. a
    custom prior from Python, see ``examples/custom_prior.py``): those are passed to
    :class:`SPIModel`'s constructor as they are (``config.yaml`` then still shows the config's specs); so is a
    given ``field`` (instead of ``config.field``'s; e.g. a variational field with settings of its own).
    With ``config.background_file`` and no ``background`` given, the model gets a zero background map with
    ``n_patterns`` scales to be filled from a state dict (:func:`build_background` reads the file).
    """
    q, factor, mask = detector_tensors(geometry)
    q_max = detector_q_max(q)
    if field is None:
        field = build_field(config, q_max)
    if config.heterogeneous:
        from bayes_spi.infer.heterogeneous import build_heterogeneous

        if background is None and getattr(config, "background_file", ""):
            background = PixelBackground(torch.zeros(q.shape[0]), config.background_scale,
                                         n_patterns=max(n_patterns, 1))
        return build_heterogeneous(field, q, factor, mask, config, device, pose_prior=pose_prior,
                                   scale_prior=scale_prior, likelihood=likelihood, background=background,
                                   pixel_q=None if geometry.is_grid else q.reshape(*geometry.shape, 3))
    extra = {}
    if intensity_prior is None:
        intensity_prior = build_intensity_prior(config.intensity_prior, q_max)
    if intensity_prior is not None:  # passed only when set: SPIModel may predate the argument
        extra["intensity_prior"] = intensity_prior
    if background is None and getattr(config, "background_file", ""):
        background = PixelBackground(torch.zeros(q.shape[0]), config.background_scale, n_patterns=max(n_patterns, 1))
    if background is not None:
        extra["background"] = background
    model = SPIModel(
        field,
        q,
        factor,
        pose_prior=pose_prior if pose_prior is not None else make_pose_prior(config.pose_prior),
        scale_prior=scale_prior if scale_prior is not None else make_scale_prior(config.scale_prior),
        likelihood=likelihood if likelihood is not None else make_likelihood(config.likelihood),
        n_hypotheses=count_hypotheses(config.n_heads, config.n_search),
        **extra,
    ).to(device)
    search = None
    if config.n_search:
        search = OrientationSearch(model, config.search_rotations, config.n_search, seed=config.seed + 12345,
                                   cache_grid=config.cache_grid, grid=config.search_grid, symmetry=config.symmetry)
    guide = AmortizedGuide(
        mask,
        n_heads=config.n_heads,
        features=config.encoder_features,
        channels=config.encoder_channels,
        transform=config.transform,
        n_search=config.n_search,
        pixel_q=None if geometry.is_grid else q.reshape(*geometry.shape, 3),
        scorer=model.hypothesis_logpost,
        search=search,
        field_guide=model.field.guide_sample if getattr(model.field, "is_variational", False) else None,
    ).to(device)
    return model, guide
