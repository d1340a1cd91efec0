"""Intensity fields conditional on a per-pattern structure latent ``z`` and class ``c``.

:class:`ConditionalField` wraps a SIREN-family field (:class:`~bayes_spi.models.fields.SirenField`,
``FourierNetField``, ``SirenVoxelField``) and modulates its main network by FiLM (feature-wise linear
modulation, as in pi-GAN): a small MLP maps ``z (..., d)`` to a scale ``gamma_l`` and a shift
``beta_l`` per layer ``l``, and the SIREN's layers become::

    h_1 = cos(w0 (1 + gamma_1(z)) W_1 x)                 first layer: frequencies scaled, no shift
    h_l = sin((1 + gamma_l(z)) (W_l h_{l-1} + b_l) + beta_l(z))     hidden layers

A frequency scale keeps the first layer even in ``q`` (``cos`` of ``+-x`` is the same), and every later
feature is a function of even features, so the field stays Friedel-symmetric for every ``z``; scaling
the first layer's frequencies is what a change of particle size does to a transform. The MLP's last
layer starts at zero, so at initialisation ``gamma = beta = 0`` for every ``z``: the conditional field
*is* the wrapped field, and the data have to pull the latent into use. The radial profile, the
FourierNet envelope and the voxel residual of the wrapped field are shared by all ``z``.

:class:`LatentFields` holds one conditional field per class and evaluates the class (and latent) of
each pattern: ``log I(q; z, c) = log I_c(q; z)``.

Shapes: ``q (..., B, M, 3)`` molecule-frame ``q`` for ``B`` patterns and ``M`` pixels, ``z (..., B, d)``
broadcastable with ``q.shape[:-2]``, classes ``c`` broadcastable with ``q.shape[:-2]``.

Example:
    >>> import torch
    >>> from bayes_spi.models.fields import SirenField
    >>> base = SirenField(q_max=0.125)
    >>> cond = ConditionalField(base, latent_dim=2)
    >>> q = torch.randn(3, 5, 3) * 0.05
    >>> bool(torch.equal(cond.log_intensity(q, torch.randn(3, 2)), base.log_intensity(q)))
    True
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from bayes_spi.models.fields import FourierNetField, SirenField, SirenVoxelField

__all__ = ["FiLM", "ConditionalField", "LatentFields"]


class FiLM(nn.Module):
    """``z (..., d) -> (gammas, betas)``, each a list of ``n_layers`` tensors ``(..., width)``; zero at init.

    Args:
        latent_dim: ``d``.
        n_layers: modulated layers (the first one has a scale only; its beta is returned as zeros).
        width: features per layer.
        hidden: width of the MLP's hidden layer.
    """

    def __init__(self, latent_dim: int, n_layers: int, width: int, hidden: int = 64) -> None:
        super().__init__()
        self.n_layers, self.width = int(n_layers), int(width)
        self.mlp = nn.Sequential(nn.Linear(latent_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2 * self.n_layers * self.width))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, z: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        out = self.mlp(z).reshape(*z.shape[:-1], 2, self.n_layers, self.width)
        gammas = [out[..., 0, layer, :] for layer in range(self.n_layers)]
        betas = [out[..., 1, layer, :] for layer in range(self.n_layers)]
        return gammas, betas


class ConditionalField(nn.Module):
    """A SIREN-family field whose main network is FiLM-modulated by ``z`` (see the module docstring).

    Args:
        base: the field to condition (it becomes a submodule; its parameters are trained as usual).
        latent_dim: ``d >= 0``; ``0`` gives a field that ignores ``z`` (the homogeneous model).
        hidden: FiLM MLP width.
    """

    def __init__(self, base: SirenField, latent_dim: int, hidden: int = 64) -> None:
        super().__init__()
        if not isinstance(base, SirenField):
            raise ValueError(f"expected a SIREN-family field (siren, fouriernet, hybrid) to condition, got "
                             f"{type(base).__name__}")
        if isinstance(latent_dim, bool) or int(latent_dim) != latent_dim or latent_dim < 0:
            raise ValueError(f"latent_dim: expected an integer >= 0, got {latent_dim!r}")
        self.base = base
        self.latent_dim = int(latent_dim)
        net = base.net
        self.film = (FiLM(self.latent_dim, 1 + len(net.hidden), net.first.shape[0], hidden)
                     if self.latent_dim else None)

    @property
    def q_max(self) -> float:
        return self.base.q_max

    @property
    def log_offset(self) -> nn.Parameter:
        return self.base.log_offset

    def _net(self, x: Tensor, z: Tensor | None) -> Tensor:
        """The modulated main network at scaled ``x (..., B, M, 3)``: ``(..., B, M)``."""
        net = self.base.net
        if self.film is None or z is None:
            return net(x)
        gammas, betas = self.film(z)
        gammas = [g.unsqueeze(-2) for g in gammas]  # (..., B, 1, W): shared by a pattern's pixels
        betas = [b.unsqueeze(-2) for b in betas]
        h = torch.cos(net.w0_first * (1.0 + gammas[0]) * (x @ net.first.T))
        for layer, gamma, beta in zip(net.hidden, gammas[1:], betas[1:]):
            h = torch.sin((1.0 + gamma) * (layer.w0 * layer.linear(h)) + beta)
        return net.out(h).squeeze(-1)

    def log_intensity(self, q: Tensor, z: Tensor | None = None) -> Tensor:
        """``log I(q; z)`` ``(..., B, M)`` for ``q (..., B, M, 3)`` and ``z (..., B, d)``.

        ``z=None`` evaluates the field at the prior mean ``z = 0`` (exactly the wrapped field at
        initialisation); then ``q`` may have any shape ``(..., 3)``.
        """
        base = self.base
        base._check(q)
        if z is not None and self.latent_dim and z.shape[-1] != self.latent_dim:
            raise ValueError(f"expected z of shape (..., B, {self.latent_dim}), got shape {tuple(z.shape)}")
        fold = getattr(base, "symmetry_fold", None)
        if fold is None:
            return self._log_intensity(q, z)
        images = fold(q)  # (G, ..., 3): the point group's images of q, as the wrapped field folds them
        out = self._log_intensity(images, z)
        return out[0] if images.shape[0] == 1 else out.mean(0)

    def _log_intensity(self, q: Tensor, z: Tensor | None) -> Tensor:
        """``log I(q; z)`` before the point-group symmetrisation."""
        base = self.base
        if z is None and self.film is not None:
            z = q.new_zeros(self.latent_dim)  # a lone z (d,): its FiLM parameters (1, W) broadcast over q
        x = q / base.q_max
        g = self._net(x, z)
        if isinstance(base, FourierNetField):
            g = g + base.small(x)
        g = g + base.radial_log_profile(q.norm(dim=-1))
        if isinstance(base, SirenVoxelField):
            g = g + base.residual_log_intensity(q)
        return base.log_offset + base.log_clamp * torch.tanh(g / base.log_clamp)

    def forward(self, q: Tensor, z: Tensor | None = None) -> Tensor:
        """``I(q; z)`` ``(..., B, M)``."""
        return self.log_intensity(q, z).exp()


class LatentFields(nn.Module):
    """One :class:`ConditionalField` per class: ``log I(q; z, c) = log I_c(q; z)``.

    Args:
        base: the field of class 0; classes ``1..K-1`` get deep copies re-initialised with fresh random
            SIREN weights (their radial profile and offset are copied, so every class starts from the
            same spherically averaged intensity but a different anisotropic part).
        latent_dim: ``d >= 0``.
        n_classes: ``K >= 1``.
    """

    def __init__(self, base: SirenField, latent_dim: int = 0, n_classes: int = 1, hidden: int = 64) -> None:
        super().__init__()
        if isinstance(n_classes, bool) or int(n_classes) != n_classes or n_classes < 1:
            raise ValueError(f"n_classes: expected a positive integer, got {n_classes!r}")
        fields = []
        for k in range(int(n_classes)):
            field = base if k == 0 else copy.deepcopy(base)
            if k:
                _reinit_siren(field)
            fields.append(ConditionalField(field, latent_dim, hidden))
        self.fields = nn.ModuleList(fields)
        self.latent_dim = int(latent_dim)
        self.n_classes = int(n_classes)

    @property
    def q_max(self) -> float:
        return self.fields[0].q_max

    @property
    def log_offset(self) -> nn.Parameter:
        return self.fields[0].log_offset

    def class_log_intensity(self, q: Tensor, z: Tensor | None = None) -> Tensor:
        """``log I_c(q; z)`` for every class: ``(K, ..., B, M)``."""
        return torch.stack([field.log_intensity(q, z) for field in self.fields])

    def log_intensity(self, q: Tensor, z: Tensor | None = None, c: Tensor | None = None) -> Tensor:
        """``log I(q; z, c)`` ``(..., B, M)``; ``c`` ``(..., B)`` int (``None``: class 0)."""
        if c is None or self.n_classes == 1:
            return self.fields[0].log_intensity(q, z)
        enumerated = self._enumerated_log_intensity(q, z, c)
        if enumerated is not None:
            return enumerated
        out = self.fields[0].log_intensity(q, z)
        for k in range(1, self.n_classes):
            out = torch.where((c == k).unsqueeze(-1), self.fields[k].log_intensity(q, z), out)
        return out

    def _enumerated_log_intensity(self, q: Tensor, z: Tensor | None, c: Tensor) -> Tensor | None:
        """The fast path for an enumerated class ``c = arange(K)`` along one dimension ``(K, 1, ..., 1)`` (as
        ``TraceEnum_ELBO`` passes it): class ``k``'s field is evaluated at its own slice of ``z`` (and ``q``)
        only, instead of every field at every class's latent. ``None`` when ``c`` is not of that form."""
        k_cls = self.n_classes
        if c.dim() == 0 or c.shape[0] != k_cls or c.numel() != k_cls:
            return None
        if not torch.equal(c.reshape(-1), torch.arange(k_cls, device=c.device, dtype=c.dtype)):
            return None
        e = c.dim()  # c's first dim is the batch dim -e (B the last batch dim)
        z_dim, q_dim = -1 - e, -2 - e  # that dim in z (..., B, d) and in q (..., B, M, 3)
        z_split = z is not None and z.dim() >= 1 + e and z.shape[z_dim] == k_cls
        q_split = q.dim() >= 2 + e and q.shape[q_dim] == k_cls
        outs = []
        for k, field in enumerate(self.fields):
            zk = z.narrow(z_dim, k, 1) if z_split else z
            qk = q.narrow(q_dim, k, 1) if q_split else q
            outs.append(field.log_intensity(qk, zk))
        out_dim = -1 - e
        if any(o.dim() < e + 1 for o in outs):
            return None
        if not all(o.shape[out_dim] == 1 for o in outs):
            return None  # a slice still spans all classes (nothing class-specific to split): use the general path
        return torch.cat(outs, dim=out_dim)

    def forward(self, q: Tensor, z: Tensor | None = None, c: Tensor | None = None) -> Tensor:
        return self.log_intensity(q, z, c).exp()

    @torch.no_grad()
    def set_radial_profile(self, q_norm: Tensor, log_i: Tensor) -> None:
        """Set every class's radial profile and offset (see :meth:`SirenField.set_radial_profile`)."""
        for field in self.fields:
            field.base.set_radial_profile(q_norm, log_i)


def _reinit_siren(field: SirenField) -> None:
    """Fresh random weights for the SIREN parts of ``field`` (same distributions as a new field)."""
    fresh = type(field.net)(field.net.first.shape[0], 1 + len(field.net.hidden), field.net.w0_first)
    with torch.no_grad():
        # keep the wrapped field's output scale (out_scale): rescale the fresh output layer to its spread
        ratio = field.net.out.weight.abs().max() / fresh.out.weight.abs().max().clamp(min=1e-30)
        fresh.out.weight.mul_(ratio)
    field.net = fresh
