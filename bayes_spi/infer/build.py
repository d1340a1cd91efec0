"""Build the model and guide for a detector geometry from a :class:`FitConfig`.

Example:
    >>> from bayes_spi.geometry import get_preset
    >>> model, guide = build_model_and_guide(get_preset("reference-32"), FitConfig(), device="cpu")
    >>> guide.n_hypotheses
    8
"""

from __future__ import annotations

import torch

from bayes_spi.geometry import Geometry
from bayes_spi.guides.amortized import AmortizedGuide
from bayes_spi.guides.search import OrientationSearch
from bayes_spi.infer.config import FitConfig
from bayes_spi.models.fields import IntensityField, SirenField, FourierNetField, VoxelField
from bayes_spi.models.likelihoods import PoissonLikelihood
from bayes_spi.models.priors import LogNormalScalePrior, UniformPosePrior
from bayes_spi.models.spi import SPIModel

__all__ = ["build_field", "build_model_and_guide", "detector_tensors"]


def detector_tensors(geometry: Geometry) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q (P, 3)`` in 1/A, ``pixel_factor (P,)`` (solid angle x polarization), ``mask (n_y, n_x)`` bool."""
    q = torch.as_tensor(geometry.q_vectors(), dtype=torch.float64).reshape(-1, 3)
    factor = torch.as_tensor(geometry.solid_angle() * geometry.polarization_factor(), dtype=torch.float64)
    mask = torch.as_tensor(geometry.good_pixels(), dtype=torch.bool)
    return q, factor.reshape(-1), mask


def build_field(config: FitConfig, q_max: float) -> IntensityField:
    """The intensity field named by ``config.field``."""
    if config.field == "voxel":
        return VoxelField(q_max, n=config.voxel_grid)
    cls = SirenField if config.field == "siren" else FourierNetField
    return cls(q_max, width=config.field_width, depth=config.field_depth, w0=config.field_w0)


def build_model_and_guide(
    geometry: Geometry, config: FitConfig, device: torch.device | str = "cpu"
) -> tuple[SPIModel, AmortizedGuide]:
    """Model (field, priors, likelihood) and guide (encoder + heads) on ``device``."""
    q, factor, mask = detector_tensors(geometry)
    field = build_field(config, float(q.norm(dim=-1).max()))
    guide = AmortizedGuide(
        mask,
        n_heads=config.n_heads,
        features=config.encoder_features,
        channels=config.encoder_channels,
        transform=config.transform,
        n_search=config.n_search,
    )
    model = SPIModel(
        field,
        q,
        factor,
        pose_prior=UniformPosePrior(),
        scale_prior=LogNormalScalePrior(config.scale_prior_sigma),
        likelihood=PoissonLikelihood(background=config.background),
        n_hypotheses=guide.n_hypotheses,
    )
    model, guide = model.to(device), guide.to(device)
    guide.attach_scorer(model.hypothesis_loglik)
    if config.n_search:
        guide.attach_search(OrientationSearch(model, config.search_rotations, config.n_search, seed=config.seed + 12345))
    return model, guide
