"""Priors over the per-pattern structure latents of a heterogeneous model.

Like the pose and scale priors (:mod:`bayes_spi.models.priors`), a prior is a small ``nn.Module``
injected into the model; its call returns a Pyro distribution for ``n`` patterns:

- a latent prior (continuous ``z_i``, site ``latent``): batch shape ``(n,)``, event shape ``(d,)``;
- a class prior (discrete ``c_i``, site ``class``): ``Categorical`` with batch shape ``(n,)`` over
  ``K`` classes; :meth:`ClassPrior.log_probs` gives ``log pi`` ``(K,)``.

Built-ins (spec names for :func:`make_latent_prior` / :func:`make_class_prior`):

- latents: :class:`NormalLatentPrior` (``normal``, ``normal:scale=1``): ``Normal(0, scale^2 I_d)``;
  :class:`StudentTLatentPrior` (``studentt:df=4``): heavier tails, for a few outlying structures;
- classes: :class:`UniformClassPrior` (``uniform``): ``pi = 1/K`` fixed; :class:`LearnedClassPrior`
  (``learned``): ``pi = softmax(logits)`` a point estimate (type-II maximum likelihood) fitted with
  the field.

A custom prior is any ``LatentPrior`` subclass with ``latent_dim`` and ``forward(n)``.

Example:
    >>> NormalLatentPrior(2)(5).sample().shape
    torch.Size([5, 2])
    >>> make_class_prior("uniform", 3).log_probs().exp()
    tensor([0.3333, 0.3333, 0.3333])
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import Tensor, nn

__all__ = [
    "LATENT_RULES",
    "LatentPrior",
    "NormalLatentPrior",
    "StudentTLatentPrior",
    "ClassPrior",
    "UniformClassPrior",
    "LearnedClassPrior",
    "make_latent_prior",
    "make_class_prior",
]

#: the latent quadrature's rules (``FitConfig.latent_rule``; :func:`bayes_spi.guides.class_search.latent_nodes`)
LATENT_RULES: tuple[str, ...] = ("equal", "hermite")


class LatentPrior(nn.Module):
    """Base class: ``forward(n)`` returns a distribution with batch ``(n,)`` and event ``(d,)``."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        if isinstance(latent_dim, bool) or int(latent_dim) != latent_dim or latent_dim < 1:
            raise ValueError(f"latent_dim: expected a positive integer, got {latent_dim!r}")
        self.latent_dim = int(latent_dim)
        self.register_buffer("_zero", torch.zeros(()))

    def forward(self, n: int) -> dist.TorchDistribution:
        raise NotImplementedError


class NormalLatentPrior(LatentPrior):
    """``z_i ~ Normal(0, scale^2 I_d)``."""

    def __init__(self, latent_dim: int, scale: float = 1.0) -> None:
        super().__init__(latent_dim)
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale: expected a positive number, got {scale!r}")
        self.scale = float(scale)

    def forward(self, n: int) -> dist.TorchDistribution:
        loc = self._zero.expand(n, self.latent_dim)
        return dist.Normal(loc, torch.full_like(loc, self.scale)).to_event(1)

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, scale={self.scale}"


class StudentTLatentPrior(LatentPrior):
    """``z_id ~ StudentT(df, 0, scale)`` independently per coordinate."""

    def __init__(self, latent_dim: int, df: float = 4.0, scale: float = 1.0) -> None:
        super().__init__(latent_dim)
        if not (df > 0 and scale > 0):
            raise ValueError(f"expected positive df and scale, got {df!r}, {scale!r}")
        self.df, self.scale = float(df), float(scale)

    def forward(self, n: int) -> dist.TorchDistribution:
        loc = self._zero.expand(n, self.latent_dim)
        return dist.StudentT(torch.full_like(loc, self.df), loc, torch.full_like(loc, self.scale)).to_event(1)

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, df={self.df}, scale={self.scale}"


class ClassPrior(nn.Module):
    """Base class of ``c_i ~ Categorical(pi)``: subclasses implement :meth:`log_probs` ``(K,)``."""

    def __init__(self, n_classes: int) -> None:
        super().__init__()
        if isinstance(n_classes, bool) or int(n_classes) != n_classes or n_classes < 2:
            raise ValueError(f"n_classes: expected an integer >= 2, got {n_classes!r}")
        self.n_classes = int(n_classes)

    def log_probs(self) -> Tensor:
        """``log pi`` ``(K,)``."""
        raise NotImplementedError

    def forward(self, n: int) -> dist.TorchDistribution:
        return dist.Categorical(logits=self.log_probs().expand(n, self.n_classes))


class UniformClassPrior(ClassPrior):
    """``pi = 1/K``, fixed."""

    def __init__(self, n_classes: int) -> None:
        super().__init__(n_classes)
        self.register_buffer("_logits", torch.full((self.n_classes,), -math.log(self.n_classes)))

    def log_probs(self) -> Tensor:
        return self._logits


class LearnedClassPrior(ClassPrior):
    """``pi = softmax(logits)``: the class fractions as a learnable point estimate (starts uniform)."""

    def __init__(self, n_classes: int) -> None:
        super().__init__(n_classes)
        self.logits = nn.Parameter(torch.zeros(self.n_classes))

    def log_probs(self) -> Tensor:
        return torch.log_softmax(self.logits, dim=-1)


def _parse(spec: str) -> tuple[str, dict[str, float]]:
    name, _, rest = spec.strip().partition(":")
    opts: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in rest.split(";"))):
        key, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError(part)
            opts[key.strip().lower()] = float(value)
        except ValueError:
            raise ValueError(f"prior spec {spec!r}: expected options 'key=number' separated by ';', got {part!r}") from None
    return name.strip().lower(), opts


def make_latent_prior(spec: str, latent_dim: int) -> LatentPrior:
    """A latent prior from its spec: ``normal``, ``normal:scale=2``, ``studentt:df=4;scale=1``."""
    name, opts = _parse(spec)
    try:
        if name == "normal":
            return NormalLatentPrior(latent_dim, **opts)
        if name == "studentt":
            return StudentTLatentPrior(latent_dim, **opts)
    except TypeError:
        raise ValueError(f"latent prior {spec!r}: unknown option among {sorted(opts)}") from None
    raise ValueError(f"latent prior: expected one of normal, studentt, got {spec!r}")


def make_class_prior(spec: str, n_classes: int) -> ClassPrior:
    """A class prior from its spec: ``uniform`` or ``learned``."""
    name, opts = _parse(spec)
    if opts:
        raise ValueError(f"class prior {spec!r}: expected no options, got {sorted(opts)}")
    if name == "uniform":
        return UniformClassPrior(n_classes)
    if name == "learned":
        return LearnedClassPrior(n_classes)
    raise ValueError(f"class prior: expected one of uniform, learned, got {spec!r}")
