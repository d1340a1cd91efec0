r"""A variational intensity field: a posterior over the amplitudes ``|F(q)|`` (use (b) of docs/DESIGN.md section 3).

The intensity is ``I(q) = |F(q)|^2`` with the amplitude a **global** latent variable on a grid (Careless's
surrogate posterior, adapted to a 3D continuum):

- Latent: the amplitudes ``F_n`` at the nodes ``n`` of an ``(n, n, n)`` grid over ``[-q_max, q_max]^3``
  (``q = (i - n//2) dq``, ``dq = q_max / (n//2)``), only the Friedel-independent half (flat index
  ``<= (n^3 - 1) / 2``; node ``f`` mirrors to ``n^3 - 1 - f``, i.e. ``q -> -q``) and only the nodes
  within ``q_max + sqrt(3) dq`` (those that trilinear interpolation inside the ball ``|q| <= q_max`` can
  reach). That vector is the Pyro site ``amplitude`` (event shape ``(L,)``), sampled **outside** the
  ``patterns`` plate, so its KL is counted once per step (not ``N / B`` times) and the learned posterior
  width is that of all the data merged, not of one observation.
- Prior (model): ``F_n ~ WilsonAmplitude(Sigma(|q_n|))`` independently, Rayleigh by default, with
  ``Sigma`` a :class:`~bayes_spi.models.intensity_priors.RadialProfile` relative to the field's level
  (``log Sigma_abs = log_offset.detach() + profile``).
- Posterior (guide): ``F_n ~ LogNormal(loc(q_n), scale(q_n))`` independently, ``loc`` and ``scale`` output
  by a SIREN whose first layer is even (``cos(w0 W q)``, as :class:`~bayes_spi.models.fields.SirenField`),
  so they are Friedel-symmetric; samples are reparameterised.
- Likelihood: ``I(q) = (sum_c w_c(q) F_c)^2``, the trilinear interpolation of the sampled amplitude grid
  at the rotated pixel points, squared. Points with ``|q| > q_max`` are moved radially onto the sphere
  ``|q| = q_max`` (the field represents the ball).

The draw is passed as an argument, never stored on the field: the model samples ``amplitude``
(:meth:`VariationalAmplitudeField.model_sample`, called by :class:`~bayes_spi.models.spi.SPIModel`) and passes
the draw to ``log_intensity(q, amplitude)`` through its rate; the guide samples it first thing in its
``forward`` (:meth:`VariationalAmplitudeField.guide_sample`, the ``field_guide`` of
:class:`~bayes_spi.guides.amortized.AmortizedGuide`) and scores its pose hypotheses with that draw. Under
``TraceEnum_ELBO`` the model's site is replayed with the guide's draw, so both use the same amplitudes.
Without a draw, :meth:`log_intensity` is the log of the posterior **mean** intensity ``E[I(q)]``
(hypothesis scoring outside training, the orientation search, export).

Posterior moments of ``I(q)`` (:meth:`intensity_moments`) are exact for the interpolated field: with
``F = sum_c w_c F_c`` a weighted sum of independent log-normals, the cumulants add,
``K_j = sum_c w_c^j kappa_j(F_c)``, and ``E[F^2] = K_2 + K_1^2``,
``Var[F^2] = K_4 + 4 K_3 K_1 + 2 K_2^2 + 4 K_2 K_1^2``. The log-normal cumulants, with
``m = exp(mu + s^2/2)`` and ``e = expm1(s^2)``: ``kappa_1 = m``, ``kappa_2 = m^2 e``,
``kappa_3 = m^3 e^2 (e + 3)``, ``kappa_4 = m^4 e^2 (16 e + 15 e^2 + 6 e^3 + e^4)`` (no cancellation at
small ``s``). At a node this is ``E I = exp(2 mu + 2 s^2)``, ``Var I = (exp(4 s^2) - 1) exp(4 mu + 4 s^2)``.
:func:`moments_on_grid` evaluates them on an export grid (``intensity_sd.mrc``).

Grid spacing and the prior's strength: the Wilson prior treats the nodes as independent, which is right at
the Shannon spacing of ``F`` (``dq = 1/D`` for a molecule of diameter ``D``); a finer grid (needed for
accurate interpolation) makes the prior ``(1 / (D dq))^3`` times too strong. ``kl_weight`` (Careless's
``w_F``) scales the site's log densities in model and guide alike (a tempered KL); ``(D dq)^3`` corrects
for the oversampling approximately. Default 1 (the plain ELBO).

Example:
    >>> import torch
    >>> field = VariationalAmplitudeField(q_max=0.125, grid=9, width=16, depth=2)
    >>> q = torch.randn(5, 3) * 0.05
    >>> mean, sd = field.intensity_moments(q)
    >>> mean.shape, bool(torch.all(sd > 0))
    (torch.Size([5]), True)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import Tensor, nn

from bayes_spi.distributions.wilson import WilsonAmplitude, kl_lognormal_wilson
from bayes_spi.grid import centred_index, grid_q
from bayes_spi.models.fields import IntensityField, _EvenSiren
from bayes_spi.models.intensity_priors import RadialProfile, make_sigma_profile

__all__ = ["VariationalAmplitudeField", "make_variational_field", "moments_on_grid", "lognormal_cumulants"]

_CORNERS = torch.tensor([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=torch.long)  # (8, 3)


def lognormal_cumulants(loc: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """First four cumulants of ``LogNormal(loc, scale)`` (elementwise, stable at small ``scale``).

    Example:
        >>> k1, k2, k3, k4 = lognormal_cumulants(torch.tensor(0.0), torch.tensor(1e-3))
        >>> round(float(k2), 9)  # ~ variance s^2 for small s
        1e-06
    """
    m = torch.exp(loc + 0.5 * scale**2)
    e = torch.expm1(scale**2)
    e2 = e * e
    return m, m**2 * e, m**3 * e2 * (e + 3.0), m**4 * e2 * (16.0 * e + 15.0 * e2 + 6.0 * e2 * e + e2 * e2)


class _EvenSirenHeads(_EvenSiren):
    """:class:`~bayes_spi.models.fields._EvenSiren` with ``n_out`` outputs ``(..., n_out)`` (even in ``x``)."""

    def __init__(self, width: int, depth: int, w0_first: float, n_out: int) -> None:
        super().__init__(width, depth, w0_first)
        self.out = nn.Linear(width, n_out)
        bound = math.sqrt(6.0 / width) * 0.1
        nn.init.uniform_(self.out.weight, -bound, bound)
        nn.init.zeros_(self.out.bias)


class VariationalAmplitudeField(IntensityField):
    """Amplitude grid as a global latent with a LogNormal posterior from a SIREN (module doc).

    Args:
        q_max: largest ``|q|`` (1/A): the detector's largest pixel ``|q|``.
        grid: ``n``, odd, >= 3: nodes per side over ``[-q_max, q_max]``.
        width, depth, w0: the posterior network (as :class:`~bayes_spi.models.fields.SirenField`).
        profile: Wilson ``Sigma(|q|)`` relative to the level (default: a learned flat-start profile).
        centric: centric Wilson prior (half-normal amplitudes) instead of Rayleigh.
        scale_init: initial posterior log-scale ``s`` (0.1: start near a point estimate; the Wilson
            prior's own spread of ``log F`` is about 0.64).
        kl_weight: scales the ``amplitude`` site (model and guide): the KL weight ``w_F``.
        log_offset: initial ``log I`` level; ``loc = (log_offset + g) / 2``.
        log_clamp: the network's ``g`` (a ``log I`` deviation) is soft-clamped to ``(-log_clamp, log_clamp)``.
        max_scale: upper bound of the posterior log-scale.
    """

    is_variational = True

    def __init__(
        self,
        q_max: float,
        grid: int = 33,
        width: int = 64,
        depth: int = 3,
        w0: float = 10.0,
        profile: RadialProfile | None = None,
        centric: bool = False,
        scale_init: float = 0.1,
        kl_weight: float = 1.0,
        log_offset: float = 0.0,
        log_clamp: float = 25.0,
        max_scale: float = 3.0,
    ) -> None:
        super().__init__(q_max, log_offset)
        if isinstance(grid, bool) or int(grid) != grid or grid < 3 or grid % 2 == 0:
            raise ValueError(f"expected an odd grid size >= 3, got {grid!r}")
        if not 0 < scale_init < max_scale:
            raise ValueError(f"expected 0 < scale_init < max_scale, got scale_init={scale_init}, max_scale={max_scale}")
        if not (kl_weight > 0 and math.isfinite(kl_weight)):
            raise ValueError(f"expected a positive finite kl_weight, got {kl_weight!r}")
        self.n = int(grid)
        self.dq = self.q_max / (self.n // 2)
        self.centric = bool(centric)
        self.kl_weight = float(kl_weight)
        self.log_clamp = float(log_clamp)
        self.min_scale = 1e-3
        self.max_scale = float(max_scale)
        self.profile = profile if profile is not None else RadialProfile(q_max)
        self.net = _EvenSirenHeads(width, depth, w0, 2)
        with torch.no_grad():
            self.net.out.bias[1] = math.log(math.expm1(scale_init - self.min_scale))

        # latent nodes: Friedel half (flat index <= centre), within reach of the ball
        n = self.n
        ax = torch.from_numpy(centred_index(n)) * self.dq
        node_q = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), dim=-1).reshape(-1, 3)
        flat = torch.arange(n**3)
        reach = self.q_max + math.sqrt(3.0) * self.dq * (1.0 + 1e-6)
        keep = (flat <= (n**3 - 1) // 2) & (node_q.norm(dim=-1) <= reach)
        latent_index = flat[keep]
        n_latent = int(latent_index.numel())
        node_latent = torch.full((n**3,), n_latent, dtype=torch.long)  # n_latent: the zero slot
        node_latent[latent_index] = torch.arange(n_latent)
        node_latent[n**3 - 1 - latent_index] = torch.arange(n_latent)
        self.n_latent = n_latent
        self.register_buffer("latent_index", latent_index, persistent=False)
        self.register_buffer("node_latent", node_latent, persistent=False)
        self.register_buffer("latent_q", node_q[latent_index].float(), persistent=False)

    # ------------------------------------------------------------------ posterior and prior
    def posterior_params(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """LogNormal ``(loc, scale)`` of ``|F|`` at ``q (..., 3)`` (1/A): two ``(...)`` tensors."""
        self._check(q)
        raw = self.net(q / self.q_max)
        g = self.log_clamp * torch.tanh(raw[..., 0] / self.log_clamp)
        loc = 0.5 * (self.log_offset + g)
        scale = (F.softplus(raw[..., 1]) + self.min_scale).clamp(max=self.max_scale)
        return loc, scale

    def latent_posterior(self) -> dist.LogNormal:
        """``q(F)`` at the latent nodes: LogNormal with batch shape ``(L,)``."""
        loc, scale = self.posterior_params(self.latent_q)
        return dist.LogNormal(loc, scale)

    def prior_log_sigma(self) -> Tensor:
        """``log Sigma`` at the latent nodes ``(L,)`` in the field's units."""
        return self.log_offset.detach() + self.profile.log_sigma(self.latent_q.norm(dim=-1))

    def latent_prior(self) -> WilsonAmplitude:
        """``p(F)`` at the latent nodes: Wilson amplitudes with batch shape ``(L,)``."""
        return WilsonAmplitude(self.prior_log_sigma().exp(), centric=self.centric)

    def kl(self) -> Tensor:
        """Closed-form ``KL(q(F) || p(F))`` summed over the latent nodes (times ``kl_weight``), ``()``."""
        loc, scale = self.posterior_params(self.latent_q)
        return self.kl_weight * kl_lognormal_wilson(loc, scale, self.prior_log_sigma().exp(), self.centric).sum()

    # ------------------------------------------------------------------ Pyro sites
    def model_sample(self) -> Tensor:
        """Model side: ``amplitude ~ Wilson`` (global site, event ``(L,)``); returns the draw ``(L,)``."""
        with poutine.scale(scale=self.kl_weight):
            return pyro.sample("amplitude", self.latent_prior().to_event(1))

    def guide_sample(self) -> Tensor:
        """Guide side: ``amplitude ~ LogNormal(loc, scale)`` (reparameterised); returns the draw ``(L,)``."""
        with poutine.scale(scale=self.kl_weight):
            return pyro.sample("amplitude", self.latent_posterior().to_event(1))

    # ------------------------------------------------------------------ interpolation
    def corners(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """Trilinear stencil at ``q (..., 3)``: latent indices ``(..., 8)`` (``L`` = the zero slot, unused
        inside the ball) and weights ``(..., 8)`` summing to 1."""
        self._check(q)
        if self.symmetry_fold is not None:  # point group: every moment is read at the folded q (set_symmetry)
            q = self.symmetry_fold(q)[0]
        n = self.n
        qn = q.norm(dim=-1, keepdim=True)
        q = q * torch.clamp(self.q_max / qn.clamp_min(1e-30), max=1.0)
        x = ((q / self.q_max + 1.0) * (0.5 * (n - 1))).clamp(0.0, n - 1.0)
        i0 = x.detach().floor().clamp(0, n - 2)
        t = x - i0
        corners = _CORNERS.to(q.device)
        idx = i0.long()[..., None, :] + corners  # (..., 8, 3)
        flat = (idx[..., 0] * n + idx[..., 1]) * n + idx[..., 2]
        tc = t[..., None, :]
        w = torch.where(corners.bool(), tc, 1.0 - tc).prod(-1)
        return self.node_latent[flat], w

    def _gather(self, values: Tensor, idx: Tensor) -> Tensor:
        ext = torch.cat([values, values.new_zeros(1)])
        return ext[idx]

    def amplitude(self, q: Tensor, sample: Tensor) -> Tensor:
        """Interpolated amplitude ``(...)`` at ``q (..., 3)`` from a latent draw ``sample (L,)``."""
        idx, w = self.corners(q)
        return (w.to(sample.dtype) * self._gather(sample, idx)).sum(-1)

    def intensity_moments(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and standard deviation of ``I(q) = F(q)^2``, ``q (..., 3)`` -> ``(...)``, ``(...)``.

        Exact for the interpolated field (module doc), computed in float64, returned in ``q``'s dtype.
        """
        loc, scale = self.posterior_params(self.latent_q)
        kappas = lognormal_cumulants(loc.double(), scale.double())
        idx, w = self.corners(q)
        w = w.double()
        k1, k2, k3, k4 = (((w**j) * self._gather(kap, idx)).sum(-1) for j, kap in enumerate(kappas, start=1))
        mean = k2 + k1**2
        var = k4 + 4.0 * k3 * k1 + 2.0 * k2**2 + 4.0 * k2 * k1**2
        return mean.to(q.dtype), var.clamp_min(0.0).sqrt().to(q.dtype)

    def mean_intensity(self, q: Tensor) -> Tensor:
        """Posterior mean ``E[I(q)] = K_2 + K_1^2`` (cheaper than :meth:`intensity_moments`), ``(...)``."""
        loc, scale = self.posterior_params(self.latent_q)
        k1, k2, _, _ = lognormal_cumulants(loc.double(), scale.double())
        idx, w = self.corners(q)
        w = w.double()
        a = (w * self._gather(k1, idx)).sum(-1)
        b = (w**2 * self._gather(k2, idx)).sum(-1)
        return (b + a**2).to(q.dtype)

    def set_symmetry(self, name: str | None) -> None:
        """Point-group symmetry by folding ``q`` in :meth:`corners` (so the draws, the mean and the moments
        are all invariant): only for the groups whose fold has one image (``C1``, ``I``, ``O``, even ``Dn``).

        Raises:
            ValueError: another group (its symmetrisation would average intensities, not amplitudes).
        """
        super().set_symmetry(name)
        if self.symmetry_fold is not None and self.symmetry_fold.n_images != 1:
            group = self.symmetry
            self.symmetry_fold = None
            raise ValueError(f"symmetry {group} with field variational: expected C1, I, O or Dn with n even "
                             f"(groups whose Laue group is generated by mirrors), got {group}")

    def log_intensity(self, q: Tensor, amplitude: Tensor | None = None) -> Tensor:
        """``log I(q)``, ``q (..., 3)`` -> ``(...)``: ``2 log F(q)`` of the draw ``amplitude (L,)`` (the site
        ``amplitude``) when given, else the posterior mean ``log E[I(q)]``.

        Raises:
            ValueError: ``amplitude`` is not of shape ``(L,)``.
        """
        if amplitude is None:
            return torch.log(self.mean_intensity(q).clamp_min(1e-30))
        if amplitude.shape != (self.n_latent,):
            raise ValueError(f"expected an amplitude sample of shape ({self.n_latent},), got shape "
                             f"{tuple(amplitude.shape)}")
        return 2.0 * torch.log(self.amplitude(q, amplitude).clamp_min(1e-30))

    def config(self) -> dict[str, Any]:
        """Settings (for logs)."""
        return {"field": "variational", "grid": self.n, "n_latent": self.n_latent, "kl_weight": self.kl_weight,
                "centric": self.centric}


def make_variational_field(
    q_max: float,
    grid: int = 33,
    width: int = 64,
    depth: int = 3,
    w0: float = 10.0,
    prior: dict[str, Any] | RadialProfile | None = None,
    scale_init: float = 0.1,
    kl_weight: float = 1.0,
) -> VariationalAmplitudeField:
    """Build a :class:`VariationalAmplitudeField` (what ``build_field`` calls for ``field == "variational"``).

    Args:
        q_max: the detector's largest ``|q|`` (1/A).
        grid, width, depth, w0, scale_init, kl_weight: see :class:`VariationalAmplitudeField`.
        prior: ``Sigma(|q|)``: a :class:`RadialProfile`, or a dict ``{"sigma": "learned" | "composition",
            "structure": "2CEX", "n_basis": 8, "centric": False}`` (all optional; default learned), or ``None``.

    Raises:
        ValueError: unknown prior keys or values.

    Example:
        >>> f = make_variational_field(0.12, grid=9, width=16, depth=2, prior={"sigma": "learned"})
        >>> f.n_latent > 0
        True
    """
    centric = False
    if isinstance(prior, RadialProfile):
        profile = prior
    elif prior is None:
        profile = RadialProfile(q_max)
    elif isinstance(prior, dict):
        known = {"sigma", "structure", "n_basis", "centric", "name"}
        unknown = sorted(set(prior) - known)
        if unknown:
            raise ValueError(f"variational field prior: unknown settings {unknown}; expected keys {sorted(known)}")
        if prior.get("name", "wilson") != "wilson":
            raise ValueError(f"variational field prior name: expected 'wilson', got {prior.get('name')!r}")
        centric = prior.get("centric", False)
        if not isinstance(centric, bool):
            raise ValueError(f"variational field prior centric: expected a bool, got {centric!r}")
        profile = make_sigma_profile(prior.get("sigma", "learned"), q_max, prior.get("structure"),
                                     prior.get("n_basis", 8))
    else:
        raise ValueError(f"variational field prior: expected a dict, a RadialProfile or None, got {prior!r}")
    return VariationalAmplitudeField(q_max, grid=grid, width=width, depth=depth, w0=w0, profile=profile,
                                     centric=centric, scale_init=scale_init, kl_weight=kl_weight)


@torch.no_grad()
@torch.no_grad()
def moments_on_grid(field: VariationalAmplitudeField, n: int, q_max: float, rotation: np.ndarray | None = None,
                    chunk: int = 65536) -> tuple[np.ndarray, np.ndarray, float]:
    """Posterior mean and sd of ``I`` on the grid of :func:`bayes_spi.grid.grid_q`.

    Returns ``(mean (n, n, n), sd (n, n, n), dq)`` float64, indexed ``[ix, iy, iz]`` (optionally at
    ``rotation @ q``); write the sd with ``write_intensity(sd, dq, run_dir, stem="intensity_sd")``.
    """
    q, dq = grid_q(n, q_max)
    flat = torch.as_tensor(q.reshape(-1, 3), dtype=torch.float32)
    if rotation is not None:
        flat = flat @ torch.as_tensor(rotation, dtype=torch.float32).T
    dev = field.log_offset.device
    means, sds = [], []
    for i in range(0, flat.shape[0], chunk):
        m, s = field.intensity_moments(flat[i:i + chunk].to(dev))
        means.append(m.double().cpu())
        sds.append(s.double().cpu())
    return torch.cat(means).reshape(n, n, n).numpy(), torch.cat(sds).reshape(n, n, n).numpy(), dq
