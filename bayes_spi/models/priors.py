"""Prior objects injected into :class:`~bayes_spi.models.spi.SPIModel`.

A prior is a small ``nn.Module`` (so it moves with ``.to(device)`` and may hold learnable
parameters) whose call returns a Pyro distribution for ``n`` patterns:

- a pose prior returns a distribution on SO(3) with batch shape ``(n,)`` and event shape ``(3, 3)``;
- a scale prior returns a distribution on ``(0, inf)`` with batch shape ``(n,)``.

Swapping a prior means passing another such object to the model's constructor. Densities on SO(3)
are taken with respect to the normalised Haar measure (``UniformSO3().log_prob == 0``), so a pose
prior's ``log_prob`` and the guide's :class:`~bayes_spi.distributions.so3.LieNormalSO3` are
consistent in the ELBO.

Built-ins (and their spec names, see :mod:`bayes_spi.config.specs` and :func:`make_pose_prior`,
:func:`make_scale_prior`):

- poses: :class:`UniformPosePrior` (``uniform``), :class:`PreferredOrientationPrior` (``preferred``:
  the beam direction ``R @ e_z`` von Mises-Fisher about an axis);
- scales: :class:`LogNormalScalePrior` (``lognormal``), :class:`EmpiricalScalePrior` (``pr772``: the
  packaged PR772 photon-count histogram; ``empirical``: any file of per-image photon totals).

A custom prior is any ``PosePrior`` / ``ScalePrior`` subclass whose ``forward(n)`` returns such a
distribution (see ``examples/custom_prior.py``).

Example:
    >>> prior = LogNormalScalePrior(sigma=0.5)
    >>> prior(4).sample().shape
    torch.Size([4])
    >>> make_pose_prior("preferred:axis=1,0,0;kappa=3")(2).sample().shape
    torch.Size([2, 3, 3])
"""

from __future__ import annotations

import math
import os
from importlib import resources
from typing import Any, Callable

import numpy as np
import pyro.distributions as dist
import torch
from torch import nn

from bayes_spi.dataio.photon_totals import PhotonTotals, load_photon_totals
from bayes_spi.distributions.empirical import LogNormalMixture, bin_log_values, silverman_bandwidth
from bayes_spi.distributions.preferred import PreferredOrientationSO3
from bayes_spi.distributions.so3 import UniformSO3
from bayes_spi.config.specs import FLAGS, normalize_spec

__all__ = [
    "PosePrior",
    "ScalePrior",
    "UniformPosePrior",
    "PreferredOrientationPrior",
    "LogNormalScalePrior",
    "EmpiricalScalePrior",
    "POSE_PRIORS",
    "SCALE_PRIORS",
    "make_pose_prior",
    "make_scale_prior",
]


class PosePrior(nn.Module):
    """Interface: ``prior(n) -> Distribution`` on SO(3), batch shape ``(n,)``, event shape ``(3, 3)``."""

    def forward(self, n: int) -> dist.TorchDistribution:
        raise NotImplementedError


class ScalePrior(nn.Module):
    """Interface: ``prior(n) -> Distribution`` on ``(0, inf)``, batch shape ``(n,)``."""

    def forward(self, n: int) -> dist.TorchDistribution:
        raise NotImplementedError


class UniformPosePrior(PosePrior):
    """Uniform (Haar) prior on SO(3): every orientation equally likely (log density 0)."""

    def forward(self, n: int) -> dist.TorchDistribution:
        return UniformSO3().expand([n])


class LogNormalScalePrior(ScalePrior):
    """Fluence scale ``s ~ LogNormal(-sigma^2/2, sigma)``: mean 1, the field carries the absolute scale."""

    def __init__(self, sigma: float = 0.5) -> None:
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"expected a positive log-normal sigma, got {sigma}")
        self.register_buffer("sigma", torch.tensor(float(sigma)))

    def forward(self, n: int) -> dist.TorchDistribution:
        return dist.LogNormal(-0.5 * self.sigma**2, self.sigma).expand([n])


class PreferredOrientationPrior(PosePrior):
    """Preferred orientation: the beam direction ``d = R @ e_z`` (molecule frame) is von Mises-Fisher
    about ``axis`` with concentration ``kappa``; the in-plane angle is uniform (see
    :class:`~bayes_spi.distributions.preferred.PreferredOrientationSO3`). ``kappa = 0`` is uniform.

    Args:
        axis: preferred direction, 3 numbers (normalised here; not all 0).
        concentration: ``kappa >= 0``.

    Example:
        >>> prior = PreferredOrientationPrior((0.0, 0.0, 1.0), concentration=5.0)
        >>> prior(3).log_prob(torch.eye(3).expand(3, 3, 3)).shape
        torch.Size([3])
    """

    def __init__(self, axis: Any = (0.0, 0.0, 1.0), concentration: float = 1.0) -> None:
        super().__init__()
        a = torch.as_tensor(axis, dtype=torch.get_default_dtype()).reshape(-1)
        if a.shape != (3,) or not torch.isfinite(a).all() or float(a.norm()) == 0:
            raise ValueError(f"expected a non-zero finite axis of 3 numbers, got {axis!r}")
        kappa = float(concentration)
        if not (math.isfinite(kappa) and kappa >= 0):
            raise ValueError(f"expected a concentration kappa >= 0, got {concentration!r}")
        self.register_buffer("axis", a / a.norm())
        self.register_buffer("kappa", torch.tensor(kappa))

    def forward(self, n: int) -> dist.TorchDistribution:
        return PreferredOrientationSO3(self.axis, self.kappa).expand([n])

    def extra_repr(self) -> str:
        return f"axis={self.axis.tolist()}, kappa={float(self.kappa):g}"


class EmpiricalScalePrior(ScalePrior):
    r"""Fluence scale distribution measured on real data: a smoothed histogram in ``log s``, mean 1.

    ``log s`` is a weighted Gaussian mixture (components at the log photon totals or bin centres,
    one width ``h``; :class:`~bayes_spi.distributions.empirical.LogNormalMixture`), shifted so that
    ``E[s] = 1`` exactly (the field carries the absolute scale, as with the log-normal prior).

    Build it with :meth:`from_file` (per-image photon totals or a histogram; formats in
    :mod:`bayes_spi.dataio.photon_totals`), :meth:`pr772` (the packaged PR772 histogram) or
    :meth:`from_totals`.

    Args:
        log_centres: ``(J,)`` component locations (log photon totals; any offset, it is normalised away).
        weights: ``(J,)`` non-negative weights, positive sum.
        bandwidth: ``h > 0``, kernel width in ``log s``.

    Example:
        >>> prior = EmpiricalScalePrior.pr772()
        >>> round(float(prior(1).mean), 6)
        1.0
    """

    def __init__(self, log_centres: Any, weights: Any, bandwidth: float) -> None:
        super().__init__()
        lc = np.asarray(log_centres, dtype=np.float64).reshape(-1)
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if lc.size < 1 or w.shape != lc.shape:
            raise ValueError(f"expected log_centres and weights of the same shape (J,), got {lc.shape} and {w.shape}")
        if not np.all(np.isfinite(lc)) or not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
            raise ValueError("expected finite log_centres and finite weights >= 0 with a positive sum")
        h = float(bandwidth)
        if not (math.isfinite(h) and h > 0):
            raise ValueError(f"expected a bandwidth (smoothing) > 0, got {bandwidth!r}")
        keep = w > 0
        lc, p = lc[keep], w[keep] / w.sum()
        # E[s] = sum_j p_j exp(m_j + h^2 / 2) = 1
        shift = math.log(float((p * np.exp(lc - lc.max())).sum())) + float(lc.max()) + 0.5 * h * h
        dtype = torch.get_default_dtype()
        self.register_buffer("locs", torch.as_tensor(lc - shift, dtype=dtype))
        self.register_buffer("logits", torch.as_tensor(np.log(p), dtype=dtype))
        self.register_buffer("bandwidth", torch.tensor(h, dtype=dtype))

    def forward(self, n: int) -> dist.TorchDistribution:
        return LogNormalMixture(self.locs, self.logits, self.bandwidth).expand([n])

    def extra_repr(self) -> str:
        return f"components={self.locs.numel()}, bandwidth={float(self.bandwidth):.4g}"

    @classmethod
    def from_totals(cls, totals: PhotonTotals, bins: int = 100, smoothing: float | None = None
                    ) -> "EmpiricalScalePrior":
        """From weighted photon totals (see :func:`~bayes_spi.dataio.photon_totals.load_photon_totals`).

        Args:
            totals: per-image totals or histogram bin centres with weights.
            bins: per-image totals are first histogrammed into this many equal bins of ``log s``
                (empty bins dropped), which keeps ``log_prob`` cheap; a histogram is used as given.
            smoothing: kernel width ``h`` in ``log s``; ``None``: Silverman's rule
                ``0.9 min(sd, IQR/1.34) n^(-1/5)`` on the log totals (``n`` the number of images, or the
                effective number ``(sum w)^2 / sum w^2`` when unknown), at least the bin spacing in ``log s``.
        """
        if int(bins) < 2:
            raise ValueError(f"expected bins >= 2, got {bins!r}")
        lv = np.log(totals.values)
        w = totals.weights
        n = totals.n_samples if totals.n_samples is not None else float(w.sum() ** 2 / (w**2).sum())
        rule = silverman_bandwidth(lv, w, n)
        if totals.binned:
            centres, weights = lv, w
            spacing = float(np.median(np.diff(np.unique(lv)))) if np.unique(lv).size > 1 else 0.0
        elif lv.size > int(bins):
            centres, weights, spacing = bin_log_values(totals.values, int(bins))
        else:
            centres, weights, spacing = lv, w, 0.0
        h = float(smoothing) if smoothing is not None else max(rule, spacing)
        if not h > 0:
            raise ValueError("expected photon totals with some spread to set the smoothing, got identical "
                             "values: give smoothing explicitly")
        return cls(centres, weights, h)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], bins: int = 100, smoothing: float | None = None
                  ) -> "EmpiricalScalePrior":
        """From a file of per-image photon totals or their histogram (``.npy``, ``.npz``, ``.csv``; formats in
        :mod:`bayes_spi.dataio.photon_totals`); ``bins`` and ``smoothing`` as in :meth:`from_totals`.

        Raises:
            FileNotFoundError: no such file.
            ValueError: bad content (the message names the file and the field).
        """
        return cls.from_totals(load_photon_totals(path), bins=bins, smoothing=smoothing)

    @classmethod
    def pr772(cls, smoothing: float | None = None) -> "EmpiricalScalePrior":
        """The packaged PR772 per-image photon-count histogram (332 images, spread 0.32x - 2.6x the mean)."""
        ref = resources.files("bayes_spi.resources").joinpath("pr772_photons_per_image.npy")
        with resources.as_file(ref) as path:
            return cls.from_file(path, smoothing=smoothing)


#: pose-prior spec name -> factory taking the spec's parameters (see :data:`bayes_spi.config.specs.SCHEMAS`)
POSE_PRIORS: dict[str, Callable[..., PosePrior]] = {
    "uniform": UniformPosePrior,
    "preferred": lambda axis, kappa: PreferredOrientationPrior(axis, kappa),
}

#: scale-prior spec name -> factory taking the spec's parameters
SCALE_PRIORS: dict[str, Callable[..., ScalePrior]] = {
    "lognormal": lambda sigma: LogNormalScalePrior(sigma),
    "pr772": lambda smoothing: EmpiricalScalePrior.pr772(smoothing=smoothing),
    "empirical": lambda file, bins, smoothing: EmpiricalScalePrior.from_file(file, bins=bins, smoothing=smoothing),
}


def make_pose_prior(spec: str | dict[str, Any]) -> PosePrior:
    """The pose prior of a spec, e.g. ``"uniform"`` or ``{"name": "preferred", "axis": [0, 0, 1], "kappa": 2}``.

    Raises:
        ValueError: unknown name or bad parameters (the message names ``--pose-prior`` and what was expected).
    """
    s = normalize_spec("pose_prior", spec)
    return POSE_PRIORS[s["name"]](**{k: v for k, v in s.items() if k != "name"})


def make_scale_prior(spec: str | dict[str, Any]) -> ScalePrior:
    """The scale prior of a spec, e.g. ``"lognormal:sigma=0.5"``, ``"pr772"``, ``"empirical:file=x.npy"``.

    Raises:
        ValueError: unknown name, bad parameters, or a bad photon-count file (names flag, file and field).
        FileNotFoundError: the ``empirical`` file does not exist.
    """
    s = normalize_spec("scale_prior", spec)
    params = {k: v for k, v in s.items() if k != "name"}
    try:
        return SCALE_PRIORS[s["name"]](**params)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{FLAGS['scale_prior']} {s['name']}: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{FLAGS['scale_prior']} {s['name']}: {exc}") from None
