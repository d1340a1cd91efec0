"""Rotation-invariant angular correlations (Kam) and the verdict's predictive check built on them."""

from __future__ import annotations

import math

import pytest
import torch

from bayes_spi.analysis.invariants import PolarBins, invariant_agreement
from bayes_spi.models.fields import VoxelField
from bayes_spi.models.spi import SPIModel
from bayes_spi.so3 import random_rotmat


def _flat_q(n_pix: int, step: float = 0.012) -> torch.Tensor:
    ax = (torch.arange(n_pix) - (n_pix - 1) / 2) * step
    qx, qy = torch.meshgrid(ax, ax, indexing="xy")
    return torch.stack([qx, qy, 0.5 * (qx**2 + qy**2)], -1).reshape(-1, 3)


def _model(seed: int, n_pix: int = 24, n: int = 9) -> SPIModel:
    q = _flat_q(n_pix)
    field = VoxelField(float(q.norm(dim=-1).max()), n=n)
    with torch.no_grad():
        field.grid.copy_(torch.randn(field.grid.shape, generator=torch.Generator().manual_seed(seed)))
    return SPIModel(field, q, torch.full((q.shape[0],), 1e-3))


def _patterns(model: SPIModel, n: int, photons: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    R = random_rotmat(n, generator=g)
    with torch.no_grad():
        lam = model.log_rate(R, torch.zeros(n), torch.arange(model.q.shape[0])).exp()
    lam = lam * photons / lam.sum(-1, keepdim=True)
    return torch.poisson(lam, generator=g)


def test_correlation_of_a_harmonic_is_the_closed_form() -> None:
    """Rings holding a_r cos(k phi + t) have sum_phi x1(phi) x2(phi + d) = n/2 a1 a2 cos(k d), whatever t."""
    q = _flat_q(16)
    bins = PolarBins(q, torch.ones(256), n_rings=3, n_phi=24)
    k, n_phi = 3, 24
    phi = torch.arange(n_phi, dtype=torch.float64) * 2 * math.pi / n_phi
    a = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    X = torch.stack([a[:, None] * torch.cos(k * phi + t) for t in (0.3, 1.7)])  # two patterns, other phases
    S = bins.correlation_sum(X.double())
    d = torch.arange(n_phi, dtype=torch.float64)
    want = 2 * n_phi / 2 * a[:, None, None] * a[None, :, None] * torch.cos(k * d * 2 * math.pi / n_phi)
    torch.testing.assert_close(S, want, atol=1e-10, rtol=1e-10)


def test_polar_bins_validate_shapes() -> None:
    with pytest.raises(ValueError, match="expected q of shape"):
        PolarBins(torch.zeros(5, 2), torch.ones(5))
    bins = PolarBins(_flat_q(8), torch.ones(64), n_rings=2, n_phi=8)
    with pytest.raises(ValueError, match=r"expected counts of shape \(B, 64\)"):
        bins.images(torch.zeros(3, 63))


def test_right_model_agrees_and_a_wrong_one_does_not() -> None:
    """Patterns of field A at uniform random poses: A reproduces their angular correlations (agreement near 1), so
    does A turned by 90 deg (the check is blind to the frame, as it must be); another field B on the same detector
    does not. No poses are used."""
    a, b = _model(0), _model(5)
    turned = _model(0)
    with torch.no_grad():
        turned.field.grid.copy_(torch.rot90(a.field.grid, 1, dims=(-1, -2)))
    data = _patterns(a, 3000, 3000.0, seed=2)
    pixels = torch.arange(a.q.shape[0])
    batches = lambda: (data[i:i + 500] for i in range(0, 3000, 500))  # noqa: E731
    right = invariant_agreement(a, pixels, batches(), n_rotations=1024)
    wrong = invariant_agreement(b, pixels, batches(), n_rotations=1024)
    rotated = invariant_agreement(turned, pixels, batches(), n_rotations=1024)
    assert right["invariant_patterns"] == 3000
    assert right["invariant_pairs"] >= 5 and wrong["invariant_pairs"] >= 5
    assert right["invariant_agreement"] > 0.95, right
    assert rotated["invariant_agreement"] > 0.95, rotated
    assert wrong["invariant_agreement"] < 0.75, wrong


def test_no_verdict_without_enough_signal() -> None:
    """A handful of dim patterns has no reliable ring pair: the agreement is None, not a number."""
    a = _model(0)
    data = _patterns(a, 20, 5.0, seed=3)
    out = invariant_agreement(a, torch.arange(a.q.shape[0]), [data], n_rotations=128)
    assert out["invariant_agreement"] is None
    assert out["invariant_pairs"] < 5
