"""Rotation-invariant angular correlations of diffraction patterns (Kam 1977) and a truth-free check of a fit.

Patterns taken at uniformly random orientations have statistics that do not depend on the orientations:
the beam axis is a symmetry axis of the Ewald sphere, so the **angular correlation**

    C(r1, r2, d) = < I(r1, phi) I(r2, phi + d) >          (mean over patterns and over phi)

of the intensity on two detector rings ``r1, r2`` depends only on the angle ``d`` between them. It can be
measured from the counts without knowing any pose (Poisson noise is unbiased except on identical pixels,
so the shot-noise bin ``r1 = r2, d = 0`` is left out), and it can be predicted from a fitted 3D intensity
by averaging over random poses. A fit can be self-consistent (decisive poses, stable, a large information
gain) and wrong: a nearly symmetric particle fitted into another frame, a structure that explains each
pattern with a pose drawn from a non-uniform subset of SO(3). Such a structure does not reproduce the
data's angular correlations, which no pose assignment can change. That is the posterior predictive check
here (:func:`invariant_agreement`).

The statistic compared, per ring pair, is the correlation over ``d`` of the model's and the data's
``C(r1, r2, .)`` with their means over ``d`` removed (the radial profile and the fluence moments only scale
or shift it). The data's own noise ceiling comes from two random halves of the patterns: their correlation
``r_AB`` gives the reliability ``rel = 2 r_AB / (1 + r_AB)`` of the full set (Spearman-Brown), and a perfect
model correlates with the data at about ``sqrt(rel)``. The **agreement** is the mean, over ring pairs with
``rel >= 0.8``, of ``corr(model, data) / sqrt(rel)``: ~1 for a right model, lower for a wrong one.

Only pairs of different rings count: a ring with itself gives its angular power spectrum, which the speckle
size sets whatever the structure. Even so, part of the correlation is generic (two unrelated random fields
with the same speckle size agree at 0.55-0.7), so the scale is not 0-1: measured (BENCHMARKS.md, "Truth-free
checks"), fits that found the truth score 0.92-0.99 (2CEX, Dragonfly's TMV data, a 150 A asymmetric
assembly, a 1e2-photon fit whose structure is roughly right), a near-octahedral 6-mer fitted confidently
wrong 0.82-0.84.

Assumes uniformly distributed orientations (the default pose prior) and a detector whose rings are centred
on the beam (flat or per-pixel q: the bins use each pixel's q).

Example:
    >>> import torch
    >>> from bayes_spi.analysis.invariants import PolarBins
    >>> g = torch.stack(torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij"), -1)
    >>> q = torch.cat([g.reshape(-1, 2), torch.zeros(256, 1)], -1)
    >>> bins = PolarBins(q, torch.ones(256), n_rings=4, n_phi=16)
    >>> X = bins.images(torch.rand(3, 256))
    >>> tuple(X.shape), tuple(bins.correlation_sum(X).shape)
    ((3, 4, 16), (4, 4, 16))
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from bayes_spi.so3 import random_rotmat

__all__ = ["PolarBins", "invariant_agreement", "MIN_RELIABILITY", "MIN_PAIRS"]

#: ring pairs whose data-half reliability is below this are too noisy to judge a model on
MIN_RELIABILITY = 0.8
#: fewer reliable ring pairs than this: no verdict (too few photons or patterns)
MIN_PAIRS = 5


class PolarBins:
    """Pixels binned into ``n_rings`` rings of ``|q|`` x ``n_phi`` azimuthal sectors about the beam.

    Args:
        q: ``(M, 3)`` scattering vectors of the pixels used (lab frame, beam along z).
        factor: ``(M,)`` per-pixel solid angle x polarization (the counts are divided by it, so that a
            bin holds an intensity estimate: polarization breaks the symmetry about the beam axis).
        n_rings, n_phi: bins.

    Raises:
        ValueError: shapes that do not match, or fewer than 2 rings / 4 sectors.
    """

    def __init__(self, q: Tensor, factor: Tensor, n_rings: int = 12, n_phi: int = 48) -> None:
        if q.dim() != 2 or q.shape[-1] != 3:
            raise ValueError(f"expected q of shape (M, 3), got shape {tuple(q.shape)}")
        if factor.shape != q.shape[:1]:
            raise ValueError(f"expected factor of shape ({q.shape[0]},), got shape {tuple(factor.shape)}")
        if n_rings < 2 or n_phi < 4:
            raise ValueError(f"expected n_rings >= 2 and n_phi >= 4, got {n_rings} and {n_phi}")
        q = q.double()
        qn = q.norm(dim=-1)
        span = (qn.max() - qn.min()).clamp(min=1e-30)
        ring = ((qn - qn.min()) / span * n_rings).long().clamp(max=n_rings - 1)
        phi = torch.atan2(q[:, 1], q[:, 0])
        sector = ((phi + math.pi) / (2 * math.pi) * n_phi).long().clamp(min=0, max=n_phi - 1)
        self.n_rings, self.n_phi = n_rings, n_phi
        self.bin = ring * n_phi + sector  # (M,)
        self.factor_sum = torch.zeros(n_rings * n_phi, dtype=torch.float64).index_add_(0, self.bin, factor.double())
        self.valid = (self.factor_sum > 0).double().reshape(n_rings, n_phi)
        fv = torch.fft.rfft(self.valid, dim=-1)
        #: (n_rings, n_rings, n_phi) number of valid sector pairs at each lag
        self.pairs = torch.fft.irfft(fv.conj()[:, None] * fv[None], n=n_phi, dim=-1).round()
        # pairs of different rings: a ring with itself gives its angular power spectrum, set mostly by the speckle
        # size whatever the structure (and its lag 0 holds the shot noise)
        use = torch.triu(torch.ones(n_rings, n_rings, dtype=torch.bool), diagonal=1)[..., None].expand(-1, -1, n_phi)
        #: (n_rings, n_rings, n_phi) the entries compared (different rings, valid pairs)
        self.use = use & (self.pairs > 0.5)

    def images(self, counts: Tensor) -> Tensor:
        """Counts or rates ``(B, M)`` -> intensity estimates per bin ``(B, n_rings, n_phi)`` (0 in empty bins)."""
        if counts.dim() != 2 or counts.shape[-1] != self.bin.numel():
            raise ValueError(f"expected counts of shape (B, {self.bin.numel()}), got shape {tuple(counts.shape)}")
        s = torch.zeros(counts.shape[0], self.factor_sum.numel(), dtype=torch.float64,
                        device=counts.device).index_add_(1, self.bin.to(counts.device), counts.double())
        x = s / self.factor_sum.to(counts.device).clamp(min=1e-300)
        return x.reshape(-1, self.n_rings, self.n_phi) * self.valid.to(counts.device)

    def correlation_sum(self, X: Tensor) -> Tensor:
        """``sum_b sum_phi X[b, r1, phi] X[b, r2, phi + d]`` for ``X (B, n_rings, n_phi)``: ``(n_rings, n_rings, n_phi)``."""
        F = torch.fft.rfft(X, dim=-1)
        return torch.fft.irfft(torch.einsum("bip,bjp->ijp", F.conj(), F), n=self.n_phi, dim=-1).cpu()

    def correlation(self, S: Tensor, n: int) -> Tensor:
        """The mean angular correlation from a :meth:`correlation_sum` over ``n`` patterns."""
        return S / max(n, 1) / self.pairs.clamp(min=1)

    def row_correlation(self, A: Tensor, B: Tensor) -> Tensor:
        """Per ring pair, the correlation over the lag of ``A`` and ``B`` ``(n_rings, n_rings, n_phi)``, their means
        over the lag removed: ``(n_rings, n_rings)`` (NaN where a pair has no variation)."""
        m = self.use.double()
        k = m.sum(-1, keepdim=True).clamp(min=1)
        a = (A - (A * m).sum(-1, keepdim=True) / k) * m
        b = (B - (B * m).sum(-1, keepdim=True) / k) * m
        den = ((a * a).sum(-1) * (b * b).sum(-1)).sqrt()
        return torch.where(den > 0, (a * b).sum(-1) / den.clamp(min=1e-300), torch.full_like(den, math.nan))


@torch.no_grad()
def invariant_agreement(model: Any, pixels: Tensor, batches: Iterable[Tensor], n_rotations: int = 2048,
                        seed: int = 0, n_rings: int = 12, n_phi: int = 48) -> dict[str, Any]:
    """How well a fitted model reproduces the data's rotation-invariant angular correlations.

    Args:
        model: a fitted :class:`~bayes_spi.models.spi.SPIModel` (its ``q``, ``log_pixel_factor`` and
            ``total_log_rate``).
        pixels: ``(M,)`` flat indices of the good pixels.
        batches: the data, an iterable of counts ``(B, n_y, n_x)`` or ``(B, n_y * n_x)`` (streamed; memory does
            not grow with the number of patterns).
        n_rotations: uniformly random poses averaged for the model's prediction.
        seed: of the data's random halves and the model's poses.

    Returns:
        ``{"invariant_agreement", "invariant_pairs", "invariant_poor_fraction", "invariant_patterns"}``:
        the agreement (``None`` with fewer than :data:`MIN_PAIRS` reliable ring pairs), the number of ring
        pairs it averages, the fraction of them below 0.5, and the number of patterns read.
    """
    q = model.q[pixels]
    bins = PolarBins(q.cpu(), model.log_pixel_factor[pixels].exp().cpu(), n_rings, n_phi)
    gen = torch.Generator().manual_seed(seed)
    shape = (n_rings, n_rings, n_phi)
    s_a, s_b = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    n_a = n_b = 0
    for counts in batches:
        y = torch.as_tensor(counts).cpu()
        X = bins.images(y.reshape(y.shape[0], -1)[:, pixels.cpu()])
        half = torch.rand(X.shape[0], generator=gen) < 0.5
        s_a += bins.correlation_sum(X[half])
        s_b += bins.correlation_sum(X[~half])
        n_a += int(half.sum())
        n_b += int((~half).sum())
    s_m = torch.zeros(shape, dtype=torch.float64)
    chunk = 128
    device = q.device
    for start in range(0, n_rotations, chunk):
        k = min(chunk, n_rotations - start)
        R = random_rotmat(k, generator=gen).to(device=device, dtype=q.dtype)
        lam = model.total_log_rate(R, torch.zeros(k, device=device, dtype=q.dtype), pixels).exp()
        s_m += bins.correlation_sum(bins.images(lam.cpu()))
    out: dict[str, Any] = {"invariant_agreement": None, "invariant_pairs": 0, "invariant_poor_fraction": None,
                           "invariant_patterns": n_a + n_b}
    if min(n_a, n_b) < 2:
        return out
    c_a, c_b = bins.correlation(s_a, n_a), bins.correlation(s_b, n_b)
    c_d = bins.correlation(s_a + s_b, n_a + n_b)
    c_m = bins.correlation(s_m, n_rotations)
    r_ab = bins.row_correlation(c_a, c_b)
    rel = 2 * r_ab / (1 + r_ab)
    r_md = bins.row_correlation(c_m, c_d)
    upper = torch.triu(torch.ones(n_rings, n_rings, dtype=torch.bool), diagonal=1)
    ok = upper & torch.isfinite(rel) & torch.isfinite(r_md) & (rel >= MIN_RELIABILITY)
    out["invariant_pairs"] = int(ok.sum())
    if int(ok.sum()) < MIN_PAIRS:
        return out
    ratio = r_md[ok] / rel[ok].sqrt()
    out["invariant_agreement"] = float(ratio.mean())
    out["invariant_poor_fraction"] = float((ratio < 0.5).double().mean())
    return out
