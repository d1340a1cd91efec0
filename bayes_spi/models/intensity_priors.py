r"""Wilson-style priors on the intensity field (docs/DESIGN.md section 3; Careless's Wilson prior).

Two pieces:

- ``Sigma(|q|)``, the mean intensity at ``|q|`` (Wilson's statistics, see
  :mod:`bayes_spi.distributions.wilson`), as a :class:`RadialProfile`: a smooth learned log-profile
  (Gaussian radial basis functions in ``|q| / q_max``) and/or a fixed shape computed from the
  composition, ``sum_j occ_j^2 f_j(|q|)^2`` (:func:`composition_sigma`, IT92 form factors), with a
  learned log-scale. Profiles give ``log Sigma`` **relative to the field's level** ``exp(log_offset)``:
  the field's absolute units are arbitrary (fluence, ``r_e^2`` and the pixel factors are folded into
  them), so the prior uses ``log Sigma_abs(|q|) = field.log_offset.detach() + profile.log_sigma(|q|)``
  (detached: the prior learns its own scale, it does not drag the field's level).
- :class:`WilsonPrior`, use (a) of the design: a weighted ``pyro.factor`` of the Wilson log density of
  the field's intensity at random ``q`` points (called once per step by
  :class:`~bayes_spi.models.spi.SPIModel`, outside the ``patterns`` plate, so it counts once per step,
  not ``N / B`` times).

Weighting of the factor (a MAP-style prior on a continuous field needs a choice). The Wilson density
describes *independent* values of ``|F|^2``; the field has about one independent value per speckle. A
real molecule of diameter ``D`` has ``F(q)`` band-limited to real-space extent ``D``, so ``F`` is
determined by samples on a grid of spacing ``1/D`` (Shannon), and Friedel's law ``F(-q) = F(q)^*``
halves the count: the ball ``|q| <= q_max`` holds

.. math:: N_{\rm eff} = \tfrac12 \cdot \tfrac{4\pi}{3} (D\,q_{max})^3

independent Wilson variables (about 1,450 for 2CEX, ``D ~ 72.6`` A, with ``q_max = 0.122`` 1/A on the
32-pixel reference detector). Each step draws ``n_points`` fresh points uniformly in the ball and returns
``weight * N_eff / n_points * sum_i log p_Wilson(I(q_i) | Sigma(|q_i|))``: an unbiased Monte Carlo
estimate of ``weight * N_eff * E_q[log p]``, i.e. the log prior of ``N_eff`` independent speckles.

The density is with respect to ``dI`` (the textbook Wilson density, ``density="intensity"``, default):
its log is ``-log Sigma - I / Sigma``, so as a MAP penalty it is L1-like shrinkage of bright values and
lets ``I -> 0`` (the speckle minima) at no cost. ``density="log_intensity"`` uses the density of
``log I`` instead (adds ``log I``: the field is parameterised in ``log I``), whose maximum is at
``I = Sigma``: shrinkage towards the radial profile.

Example:
    >>> import torch
    >>> from bayes_spi.models.fields import SirenField
    >>> prior = make_intensity_prior({"name": "wilson", "weight": 1.0, "diameter_A": 60}, q_max=0.125)
    >>> prior.log_factor(SirenField(0.125)).shape
    torch.Size([])
    >>> make_intensity_prior({"name": "none"}, q_max=0.125) is None
    True
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from bayes_spi.distributions.wilson import wilson_intensity_log_prob

if TYPE_CHECKING:  # pragma: no cover
    from bayes_spi.models.fields import IntensityField
    from bayes_spi.sim.structure import Structure

__all__ = [
    "RadialProfile",
    "composition_sigma",
    "composition_profile",
    "make_sigma_profile",
    "shannon_count",
    "sample_ball",
    "IntensityPrior",
    "NoIntensityPrior",
    "WilsonPrior",
    "make_intensity_prior",
    "INTENSITY_PRIORS",
    "SIGMA_KINDS",
    "DEFAULT_DIAMETER_A",
]

#: names accepted by :func:`make_intensity_prior`
INTENSITY_PRIORS = ("none", "wilson")
#: values of the ``sigma`` key: how ``Sigma(|q|)`` is obtained
SIGMA_KINDS = ("learned", "composition")
#: molecule diameter used for the factor's weight when neither ``diameter_A`` nor a structure is given
DEFAULT_DIAMETER_A = 60.0


# ---------------------------------------------------------------------------------------- Sigma(|q|)
class RadialProfile(nn.Module):
    r"""A smooth radial log-profile ``log Sigma(|q|)`` (relative to the field's level, see module doc).

    .. math:: \log\Sigma(|q|) = c + b(x) + \sum_{k=0}^{K-1} a_k \exp\!\big(-\tfrac12 ((x - x_k)/h)^2\big),
        \quad x = \min(|q| / q_{max}, 1),\ x_k = k / (K - 1),\ h = 1 / (K - 1)

    with ``c`` a learned log-scale, ``b`` an optional fixed base shape (a table of ``log Sigma`` on a
    uniform grid of ``x`` in ``[0, 1]``, linearly interpolated, e.g. from the composition) and ``a_k``
    learned coefficients (initialised at 0: the profile starts flat, or at the base shape).

    Args:
        q_max: largest ``|q|`` (1/A); beyond it the profile is constant.
        n_basis: ``K`` radial basis functions (0: none; a single one is a constant).
        base_log_sigma: ``(T,)`` fixed ``log Sigma`` table on ``linspace(0, q_max, T)``, ``T >= 2``.
        learn_scale: learn ``c`` (else fixed at ``log_scale``).
        log_scale: initial ``c``.

    Example:
        >>> p = RadialProfile(0.125, n_basis=6)
        >>> p.log_sigma(torch.tensor([0.0, 0.05, 0.2])).tolist()  # starts flat
        [0.0, 0.0, 0.0]
    """

    def __init__(
        self,
        q_max: float,
        n_basis: int = 8,
        base_log_sigma: Tensor | None = None,
        learn_scale: bool = True,
        log_scale: float = 0.0,
    ) -> None:
        super().__init__()
        if not (q_max > 0 and math.isfinite(q_max)):
            raise ValueError(f"expected a positive finite q_max, got {q_max}")
        if n_basis < 0:
            raise ValueError(f"expected n_basis >= 0, got {n_basis}")
        self.q_max = float(q_max)
        self.n_basis = int(n_basis)
        if learn_scale:
            self.log_scale = nn.Parameter(torch.tensor(float(log_scale)))
        else:
            self.register_buffer("log_scale", torch.tensor(float(log_scale)))
        self.coef = nn.Parameter(torch.zeros(self.n_basis)) if self.n_basis > 0 else None
        self.register_buffer("centres", torch.linspace(0.0, 1.0, max(self.n_basis, 1)))
        self.width = 1.0 / max(self.n_basis - 1, 1)
        if base_log_sigma is not None:
            base = torch.as_tensor(base_log_sigma, dtype=torch.float32).reshape(-1)
            if base.numel() < 2 or not torch.all(torch.isfinite(base)):
                raise ValueError(f"expected a finite base_log_sigma table of >= 2 values, "
                                 f"got shape {tuple(base.shape)}")
            self.register_buffer("base", base)
        else:
            self.base = None

    def log_sigma(self, q_abs: Tensor) -> Tensor:
        """``log Sigma`` (relative) at ``|q|`` ``(...)`` in 1/A -> ``(...)``."""
        x = (q_abs / self.q_max).clamp(0.0, 1.0)
        out = self.log_scale.to(x.dtype) + torch.zeros_like(x)
        if self.base is not None:
            t = x * (self.base.numel() - 1)
            i0 = t.floor().clamp(max=self.base.numel() - 2).long()
            frac = t - i0
            base = self.base.to(x.dtype)
            out = out + (1.0 - frac) * base[i0] + frac * base[i0 + 1]
        if self.coef is not None:
            phi = torch.exp(-0.5 * ((x[..., None] - self.centres.to(x.dtype)) / self.width) ** 2)
            out = out + phi @ self.coef.to(x.dtype)
        return out

    def forward(self, q_abs: Tensor) -> Tensor:
        """``Sigma`` (relative) at ``|q|`` ``(...)`` -> ``(...)`` positive."""
        return self.log_sigma(q_abs).exp()


def composition_sigma(structure: "Structure", q_abs: np.ndarray | Tensor) -> np.ndarray:
    r"""Wilson's mean intensity from the composition, ``Sigma(|q|) = sum_j occ_j^2 f_j(|q|)^2`` (electrons^2).

    ``f_j`` are the IT92 form factors (:func:`bayes_spi.sim.structure.form_factor`). Occupancies enter
    squared because the molecular transform weights each atom's amplitude by its occupancy
    (``F = sum_j occ_j f_j exp(2 pi i q . r_j)``, as :mod:`bayes_spi.sim.transform` computes it); for
    fully occupied atoms this is the textbook ``sum_j f_j^2``.

    Args:
        structure: a :class:`~bayes_spi.sim.structure.Structure`.
        q_abs: ``|q|`` in 1/A (no 2 pi), any shape.

    Returns:
        ``Sigma`` with the shape of ``q_abs``, float64.

    Example:
        >>> from bayes_spi.sim.structure import Structure
        >>> s = Structure.from_arrays(["C"], np.zeros((1, 3)))
        >>> round(float(composition_sigma(s, np.array(0.0))), 1)  # f_C(0)^2 ~ 6^2
        36.0
    """
    from bayes_spi.sim.structure import form_factor

    q = q_abs.detach().cpu().numpy() if isinstance(q_abs, Tensor) else np.asarray(q_abs)
    q = q.astype(np.float64)
    out = np.zeros(q.shape)
    for el, occ in structure.occupancies.items():
        out += float(np.sum(occ**2)) * form_factor(el, q) ** 2
    return out


def composition_profile(
    structure: "Structure", q_max: float, n_table: int = 257, n_basis: int = 0, learn_scale: bool = True
) -> RadialProfile:
    """A :class:`RadialProfile` with the shape of :func:`composition_sigma` and a learned log-scale.

    The table is normalised by the ball average ``<Sigma> = int_0^q_max Sigma(q) 3 q^2 dq / q_max^3``, so
    ``log_scale = 0`` means "the ball-averaged Sigma equals the field's level ``exp(log_offset)``".
    ``n_basis > 0`` adds learned smooth corrections on top of the composition shape.
    """
    x = np.linspace(0.0, float(q_max), int(n_table))
    sig = composition_sigma(structure, x)
    w = 3.0 * x**2 / q_max**3
    mean_ball = float(np.sum(0.5 * (sig[1:] * w[1:] + sig[:-1] * w[:-1]) * np.diff(x)))
    base = torch.as_tensor(np.log(sig / mean_ball), dtype=torch.float32)
    return RadialProfile(q_max, n_basis=n_basis, base_log_sigma=base, learn_scale=learn_scale)


def _load_structure_spec(structure: Any) -> "Structure":
    from bayes_spi.sim.structure import Structure, load_structure

    if isinstance(structure, Structure):
        return structure
    if isinstance(structure, (str, os.PathLike)):
        return load_structure(structure)
    raise ValueError(f"intensity prior setting structure: expected a structure file path or built-in name "
                     f"(e.g. '2CEX'), got {structure!r}")


def make_sigma_profile(
    sigma: str, q_max: float, structure: Any = None, n_basis: int = 8
) -> RadialProfile:
    """``Sigma(|q|)`` by name: ``"learned"`` (flat start, ``n_basis`` learned RBFs and a learned scale) or
    ``"composition"`` (shape from ``structure``, a path, built-in name or :class:`Structure`, learned scale).

    Raises:
        ValueError: unknown ``sigma`` or a missing/unreadable structure for ``"composition"``.
    """
    if sigma == "learned":
        return RadialProfile(q_max, n_basis=n_basis)
    if sigma == "composition":
        if structure is None:
            raise ValueError("intensity prior setting structure: expected a structure (path or built-in name, "
                             "e.g. '2CEX') with sigma='composition', got None")
        return composition_profile(_load_structure_spec(structure), q_max)
    raise ValueError(f"intensity prior setting sigma: expected one of {list(SIGMA_KINDS)}, got {sigma!r}")


# ---------------------------------------------------------------------------------------- (a) prior factor
def shannon_count(diameter_A: float, q_max: float) -> float:
    """Independent Wilson variables in the ball ``|q| <= q_max`` for a molecule of diameter ``D``:
    ``(4 pi / 3) (D q_max)^3 / 2`` (Shannon spacing ``1/D`` of ``F``, Friedel pairs counted once)."""
    if not (diameter_A > 0 and q_max > 0):
        raise ValueError(f"expected positive diameter_A and q_max, got {diameter_A!r} and {q_max!r}")
    return 0.5 * 4.0 / 3.0 * math.pi * (diameter_A * q_max) ** 3


def sample_ball(n: int, radius: float, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None, generator: torch.Generator | None = None) -> Tensor:
    """``n`` points ``(n, 3)`` uniform in the ball of ``radius`` (torch's global RNG unless ``generator``)."""
    d = torch.randn(n, 3, device=device, dtype=dtype, generator=generator)
    d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    r = torch.rand(n, 1, device=device, dtype=dtype, generator=generator) ** (1.0 / 3.0)
    return radius * r * d


class IntensityPrior(nn.Module):
    """Interface: ``log_factor(field) -> ()`` tensor, added to the model's log joint once per step."""

    def log_factor(self, field: "IntensityField") -> Tensor:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Settings (for logs and ``config.yaml``)."""
        return {"name": "none"}


class NoIntensityPrior(IntensityPrior):
    """No prior on the field (a flat prior): ``log_factor`` is 0. The model skips the factor site."""

    def log_factor(self, field: "IntensityField") -> Tensor:
        return field.log_offset.new_zeros(())


class WilsonPrior(IntensityPrior):
    """Use (a): weighted Wilson log density of ``I_theta`` at fresh random ``q`` in the ball (module doc).

    Args:
        profile: ``Sigma(|q|)`` relative to the field's level (:class:`RadialProfile`).
        q_max: radius of the ball (1/A), the largest ``|q|`` of the detector.
        weight: multiplies the factor (1: the log prior of ``n_effective`` independent speckles).
        n_points: random points per step.
        n_effective: number of independent Wilson variables the factor stands for (see
            :func:`shannon_count`).
        centric: centric statistics (not for single molecules; for completeness).
        density: ``"intensity"`` (density w.r.t. ``dI``) or ``"log_intensity"`` (w.r.t. ``d log I``).
    """

    def __init__(
        self,
        profile: RadialProfile,
        q_max: float,
        weight: float = 1.0,
        n_points: int = 1024,
        n_effective: float = 1000.0,
        centric: bool = False,
        density: str = "intensity",
    ) -> None:
        super().__init__()
        if not (weight >= 0 and math.isfinite(weight)):
            raise ValueError(f"intensity prior setting weight: expected a finite number >= 0, got {weight!r}")
        if n_points < 1:
            raise ValueError(f"intensity prior setting n_points: expected >= 1, got {n_points!r}")
        if not n_effective > 0:
            raise ValueError(f"expected n_effective > 0, got {n_effective!r}")
        if density not in ("intensity", "log_intensity"):
            raise ValueError(f"intensity prior setting density: expected 'intensity' or 'log_intensity', "
                             f"got {density!r}")
        self.profile = profile
        self.q_max = float(q_max)
        self.weight = float(weight)
        self.n_points = int(n_points)
        self.n_effective = float(n_effective)
        self.centric = bool(centric)
        self.density = density

    def log_sigma(self, field: "IntensityField", q_abs: Tensor) -> Tensor:
        """Absolute ``log Sigma(|q|)`` in the field's units: ``field.log_offset`` (detached) + profile."""
        return field.log_offset.detach().to(q_abs.dtype) + self.profile.log_sigma(q_abs)

    def log_density(self, field: "IntensityField", q: Tensor) -> Tensor:
        """Per-point Wilson log density ``(P,)`` of the field's intensity at ``q (P, 3)``."""
        log_i = field.log_intensity(q)
        lp = wilson_intensity_log_prob(log_i, self.log_sigma(field, q.norm(dim=-1)), self.centric)
        if self.density == "log_intensity":
            lp = lp + log_i
        return lp

    def log_factor(self, field: "IntensityField", q: Tensor | None = None) -> Tensor:
        """``weight * n_effective / P * sum_i log p(I(q_i))`` with ``q (P, 3)`` (default: ``n_points`` fresh
        points uniform in the ball, from torch's global RNG)."""
        if q is None:
            ref = field.log_offset
            q = sample_ball(self.n_points, self.q_max, device=ref.device, dtype=ref.dtype)
        if q.dim() != 2 or q.shape[-1] != 3:
            raise ValueError(f"expected q of shape (P, 3), got shape {tuple(q.shape)}")
        return self.weight * self.n_effective / q.shape[0] * self.log_density(field, q).sum()

    def config(self) -> dict[str, Any]:
        return {"name": "wilson", "weight": self.weight, "n_points": self.n_points,
                "n_effective": self.n_effective, "centric": self.centric, "density": self.density}


_WILSON_KEYS = {
    "name": "'wilson'",
    "weight": "a number >= 0 (default 1.0)",
    "sigma": f"one of {list(SIGMA_KINDS)} (default 'learned')",
    "structure": "a structure file path or built-in name such as '2CEX' (required for sigma='composition')",
    "diameter_A": f"the molecule's diameter in A (default: from the structure, else {DEFAULT_DIAMETER_A})",
    "n_points": "random q points per step, >= 1 (default 1024)",
    "n_basis": "radial basis functions of the learned profile, >= 0 (default 8)",
    "centric": "bool (default False)",
    "density": "'intensity' (default) or 'log_intensity'",
}


def make_intensity_prior(spec: dict[str, Any] | None, q_max: float) -> IntensityPrior | None:
    """Build an intensity prior from a plain dict (e.g. ``FitConfig.intensity_prior``).

    ``{"name": "none"}`` (or ``None``, or ``{}``) -> ``None`` (no prior). ``{"name": "wilson", "weight": 1.0,
    "sigma": "learned" | "composition", "structure": "2CEX", "diameter_A": 72, "n_points": 1024, "n_basis": 8,
    "centric": False, "density": "intensity"}`` -> :class:`WilsonPrior` (all keys but ``name`` optional).

    Args:
        spec: the settings.
        q_max: the largest ``|q|`` of the detector (1/A).

    Raises:
        ValueError: unknown name or key, or a bad value (the message lists what is expected).

    Example:
        >>> p = make_intensity_prior({"name": "wilson", "diameter_A": 72}, q_max=0.12)
        >>> type(p).__name__, round(p.n_effective)
        ('WilsonPrior', 1351)
    """
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ValueError(f"intensity prior: expected a dict such as {{'name': 'wilson'}}, got {spec!r}")
    name = spec.get("name", "none")
    if name not in INTENSITY_PRIORS:
        raise ValueError(f"intensity prior setting name: expected one of {list(INTENSITY_PRIORS)}, got {name!r}")
    if name == "none":
        extra = sorted(set(spec) - {"name"})
        if extra:
            raise ValueError(f"intensity prior 'none': expected no other settings, got {extra}")
        return None
    unknown = sorted(set(spec) - set(_WILSON_KEYS))
    if unknown:
        expected = "; ".join(f"{k}: {v}" for k, v in _WILSON_KEYS.items())
        raise ValueError(f"intensity prior 'wilson': unknown settings {unknown}; expected keys {expected}")
    sigma = spec.get("sigma", "learned")
    structure = spec.get("structure")
    n_basis = spec.get("n_basis", 8)
    if isinstance(n_basis, bool) or not isinstance(n_basis, int) or n_basis < 0:
        raise ValueError(f"intensity prior setting n_basis: expected an integer >= 0, got {n_basis!r}")
    mol = _load_structure_spec(structure) if structure is not None else None
    if sigma not in SIGMA_KINDS:
        raise ValueError(f"intensity prior setting sigma: expected one of {list(SIGMA_KINDS)}, got {sigma!r}")
    profile = make_sigma_profile(sigma, q_max, mol, n_basis)
    diameter = spec.get("diameter_A")
    if diameter is None:
        diameter = 2.0 * mol.radius() if mol is not None else DEFAULT_DIAMETER_A
    if isinstance(diameter, bool) or not isinstance(diameter, (int, float)) or not diameter > 0:
        raise ValueError(f"intensity prior setting diameter_A: expected a positive number, got {diameter!r}")
    weight = spec.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ValueError(f"intensity prior setting weight: expected a number >= 0, got {weight!r}")
    n_points = spec.get("n_points", 1024)
    if isinstance(n_points, bool) or not isinstance(n_points, int):
        raise ValueError(f"intensity prior setting n_points: expected an integer >= 1, got {n_points!r}")
    centric = spec.get("centric", False)
    if not isinstance(centric, bool):
        raise ValueError(f"intensity prior setting centric: expected a bool, got {centric!r}")
    return WilsonPrior(profile, q_max, weight=float(weight), n_points=n_points,
                       n_effective=shannon_count(float(diameter), q_max), centric=centric,
                       density=spec.get("density", "intensity"))
