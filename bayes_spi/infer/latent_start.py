r"""A data start for the continuous latent: a rotation-invariant anisotropy score orders the patterns.

A FiLM latent that starts at zero gives every latent point the same field (a symmetric start, as the classes
have without :func:`bayes_spi.infer.heterogeneous.class_radial_profiles`): the EMC warm start's latent
responsibilities then stay near the prior's, and the latent points separate slowly. The class start uses the
radial profile; along a continuum of shapes of equal volume the radial profile hardly changes (the cube-to-sphere
benchmark: ``|Spearman| 0.12`` of its first principal component with the exponent), but how strongly the pattern
varies *around* each ring does: a sphere's pattern is isotropic, a cube's is not, at every orientation. Per
pattern and ring ``r`` (good pixels ``P_r`` at azimuths ``phi_k``, counts ``y_k``, total ``N_r``)::

    a_r = sum_{h=1..H} (|sum_k y_k exp(-i h phi_k)|^2 - N_r) / N_r^2

is an unbiased estimate, under Poisson noise, of ``sum_h |lambda_h|^2 / lambda_0^2`` (the ring's angular power
relative to its mean, the ``- N_r`` removing the shot noise's ``E|c_h|^2``): independent of the fluence, so
the fluence jitter does not enter. The score is the first principal component of the rings' ranks (each ring's
``a_r`` turned into its empirical quantile among the start sample's, standardised), and the start latent
``z0_i`` the standard normal quantile of pattern ``i``'s score among the start sample's: ordered as the data,
distributed as the latent prior. (Its sign is arbitrary, like the latent's.) On the cube-to-sphere continuum
its |Spearman| with the exponent is ~0.69 (BENCHMARKS.md).

During the first part of the EMC warm start (``FitConfig.latent_start``, a fraction of that stage) the latent
points' weights per pattern become ``w_il ∝ w_l exp(-(z_l,1 - z0_i)^2 / (2 s^2))`` (``s`` = 0.5; only the first
latent dimension): each latent point's field is trained mostly by the patterns that score near it, so the points
start apart along the data's order; after that the prior's weights return and the model takes over.

Example:
    >>> import torch
    >>> from bayes_spi.geometry import get_preset
    >>> from bayes_spi.infer.build import detector_tensors
    >>> q, _, mask = detector_tensors(get_preset("reference-32"))
    >>> images = torch.poisson(torch.full((16, 32, 32), 5.0))
    >>> score = AnisotropyScore.fit(images, q, mask.reshape(-1), n_rings=3)
    >>> score(images[:4]).shape
    torch.Size([4])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["AnisotropyScore", "ring_anisotropy", "start_node_log_weights"]

#: width (in prior standard deviations) of the data start's pull of each pattern towards its start latent
START_WIDTH = 0.5


def ring_anisotropy(counts: Tensor, radius: Tensor, phi: Tensor, edges: Tensor, harmonics: int = 12) -> Tensor:
    """The debiased angular power ``a_r`` of the module doc: ``(B, R)`` for ``counts (B, P)`` on pixels at
    ``radius (P,)`` (any unit) and azimuth ``phi (P,)`` (rad), rings ``[edges[r], edges[r + 1])`` (``R + 1``)."""
    if counts.dim() != 2 or counts.shape[1] != radius.shape[0] or radius.shape != phi.shape:
        raise ValueError(f"expected counts (B, P) with radius, phi (P,), got shapes {tuple(counts.shape)}, "
                         f"{tuple(radius.shape)}, {tuple(phi.shape)}")
    y = counts.double()
    h = torch.arange(1, harmonics + 1, dtype=torch.float64, device=y.device)
    out = []
    for r in range(edges.numel() - 1):
        sel = (radius >= edges[r]) & (radius < edges[r + 1])
        ang = h[:, None] * phi[sel].double()[None, :]  # (H, P_r)
        ys = y[:, sel]
        n_r = ys.sum(-1)
        power = (ys @ torch.cos(ang).T) ** 2 + (ys @ torch.sin(ang).T) ** 2  # (B, H)
        out.append((power - n_r[:, None]).sum(-1) / n_r.clamp(min=1.0) ** 2)
    return torch.stack(out, -1)


def _quantiles(values: Tensor, reference: Tensor) -> Tensor:
    """Each column's empirical quantile in ``(0, 1)`` against the sorted ``reference`` column ``(S, R)``."""
    n = reference.shape[0]
    ranks = torch.stack([torch.searchsorted(reference[:, j].contiguous(), values[:, j].contiguous())
                         for j in range(values.shape[1])], -1)
    return (ranks.double() + 0.5) / (n + 1.0)


@dataclass
class AnisotropyScore:
    """The start latent ``z0`` of the module doc, fitted on a sample of patterns (:meth:`fit`).

    Attributes:
        pixels: ``(P,)`` flat indices (into a pattern's ``n_y * n_x`` pixels) of the pixels scored.
        radius, phi: ``(P,)`` their ``|q|`` and azimuth ``atan2(q_y, q_x)``.
        edges: ``(R + 1,)`` ring edges (in ``|q|``).
        reference: ``(S, R)`` the sample's ``a_r``, sorted per ring.
        loading: ``(R,)`` the first principal axis of the sample's standardised ring ranks.
        scores: ``(S,)`` the sample's scores along it, sorted.
        harmonics: ``H``.
    """

    pixels: Tensor
    radius: Tensor
    phi: Tensor
    edges: Tensor
    reference: Tensor
    loading: Tensor
    scores: Tensor
    harmonics: int = 12

    @classmethod
    def fit(cls, images: Tensor, q: Tensor, good: Tensor, q_limit: float | None = None, n_rings: int = 6,
            harmonics: int = 12) -> "AnisotropyScore":
        """Fit on ``images (S, n_y, n_x)`` (``S >= 8``) with pixel ``q (n_y * n_x, 3)`` (detector frame, beam
        along ``z``), scoring the ``good (n_y * n_x,)`` pixels with ``|q| <= q_limit`` (default all; pass the
        inscribed circle's radius for whole rings); the rings split that ``|q|`` range evenly."""
        if images.dim() != 3 or images.shape[0] < 8:
            raise ValueError(f"expected images of shape (S >= 8, n_y, n_x), got shape {tuple(images.shape)}")
        n_pix = images.shape[1] * images.shape[2]
        if q.shape != (n_pix, 3) or good.shape != (n_pix,):
            raise ValueError(f"expected q ({n_pix}, 3) and good ({n_pix},), got shapes {tuple(q.shape)}, "
                             f"{tuple(good.shape)}")
        if n_rings < 1:
            raise ValueError(f"expected n_rings >= 1, got {n_rings}")
        q = q.double().cpu()
        radius = q.norm(dim=-1)
        use = good.cpu().bool() & (radius > 0)
        if q_limit is not None:
            use &= radius <= q_limit
        pixels = torch.nonzero(use).squeeze(-1)
        if pixels.numel() < 8 * n_rings:
            raise ValueError(f"expected at least {8 * n_rings} pixels to score, got {pixels.numel()}")
        radius, phi = radius[pixels], torch.atan2(q[pixels, 1], q[pixels, 0])
        edges = torch.linspace(float(radius.min()), float(radius.max()) * (1 + 1e-9), n_rings + 1,
                               dtype=torch.float64)
        a = ring_anisotropy(images.reshape(images.shape[0], -1)[:, pixels].cpu(), radius, phi, edges, harmonics)
        reference = a.sort(0).values
        u = cls._standardise(_quantiles(a, reference))
        _, _, vt = torch.linalg.svd(u - u.mean(0), full_matrices=False)
        loading = vt[0] * torch.sign(vt[0].sum())  # larger anisotropy -> larger score
        scores = (u @ loading).sort().values
        return cls(pixels, radius, phi, edges, reference, loading, scores, harmonics)

    @staticmethod
    def _standardise(u: Tensor) -> Tensor:
        return (u - 0.5) * (12.0**0.5)  # a uniform quantile's mean 1/2 and sd 1/sqrt(12)

    def __call__(self, images: Tensor) -> Tensor:
        """``z0 (B,)`` for ``images (B, n_y, n_x)``: the standard normal quantile of the score (on the CPU)."""
        flat = images.reshape(images.shape[0], -1)[:, self.pixels.to(images.device)].cpu()
        a = ring_anisotropy(flat, self.radius, self.phi, self.edges, self.harmonics)
        s = self._standardise(_quantiles(a, self.reference)) @ self.loading
        u = (torch.searchsorted(self.scores, s.contiguous()).double() + 0.5) / (self.scores.numel() + 1.0)
        return torch.special.ndtri(u)


def start_node_log_weights(z0: Tensor, nodes: Tensor, log_node_weights: Tensor, width: float = START_WIDTH
                           ) -> Tensor:
    """Per-pattern latent point log-weights ``(B, L)``: the prior's ``log w_l`` plus the pull
    ``-(z_l,1 - z0_i)^2 / (2 width^2)``, normalised over ``l`` (``z0 (B,)``, ``nodes (L, d)``)."""
    if nodes.dim() != 2 or nodes.shape[0] != log_node_weights.shape[0]:
        raise ValueError(f"expected nodes (L, d) and log weights (L,), got shapes {tuple(nodes.shape)}, "
                         f"{tuple(log_node_weights.shape)}")
    if not width > 0:
        raise ValueError(f"expected width > 0, got {width}")
    logits = log_node_weights[None, :] - (nodes[None, :, 0] - z0[:, None].to(nodes.dtype)) ** 2 / (2.0 * width**2)
    return torch.log_softmax(logits, -1)
